"""User names, and every file name pop3d derives from one, decided in one place.

The rule (docs/DATA-SAFETY.md, "Names and derived files"): a spool's file name is never in the
*reserved namespace*, and every file pop3d or an MDA derives from a spool is in it:

- `reserved(name)` is true for names starting with `.`, for the dotlock names every MDA uses,
  `X.lock` and `X.lock.*` (Exim's hitching posts `<spool>.lock.<host>.<time>.<pid>`), and for
  the link temporaries of mail readers that unlink that name before creating it, whatever the
  host: mutt's `mutt_dotlock` (`<spool>.<short host>.<pid>`: at least two dots, digits last) and
  GNU Mailutils (`<spool>.<pid>.<time>.<host>`: two all-digit components followed by more).
  Those shapes hold for every spool name and every host name, so they hold on a spool
  directory shared by hosts whose names pop3d cannot know.
- The MDA-visible dotlock is `<spool>.lock` (Postfix, Exim, procmail, liblockfile agree on it).
  pop3d's own files are `.pop3d-<kind>.<spool name>` beside the spool (`own`), where `kind`
  has no `.`: so the name splits back into one kind and one spool name, and files of two
  spools or of two kinds never coincide. liblockfile's (`.lk*`), Dovecot's (`.temp.*`) and
  procmail's temporaries (`_*`, created with O_EXCL, never removed unless made) need nothing more.
- `valid_username` refuses reserved names, and `spool_path` refuses a template expansion whose
  file name is reserved: so no valid user's spool is another user's dotlock, journal,
  temporary, set-aside journal or session lock, whatever `mailbox` template is used.
  `check_template` refuses at start a template whose every spool would be refused.
- Files kept elsewhere for a user (the index of issue 13) are `<dir>/<user name>`, and their
  temporaries `own(<dir>/<user name>, kind)`: a user name is one safe path component, never
  reserved, so it reaches neither a temporary nor another user's file.

Pure string work (no I/O): imported on the path to the greeting (auth's name check).
"""

from __future__ import annotations

from pop3d import limits

# Conservative on purpose: a name reaches paths (%u), log lines and PAM.
NAME_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-@+"
# The prefix of every file pop3d names for itself.
OWN_PREFIX = ".pop3d-"
# Kinds of pop3d's own files beside a spool (`own`). Each is a word without "."; the update
# engine, the locks and the future session lock (issue 17) take theirs from here.
JOURNAL = "journal"
JOURNAL_TEMP = "journal-tmp"
SESSION_LOCK = "session"
UNUSABLE = "unusable"  # + "-<time>-<pid>": a journal put aside for the administrator
DOTLOCK_TEMP = "lk"  # + "-<host>-<pid>-<random>": the file linked to the dotlock
INDEX_TEMP = "index-tmp"  # own(user_file(index directory, user)): the index being written
# Where pop3d before this rule kept its journal: read (and moved into `own`) only once proven.
LEGACY_JOURNAL_SUFFIX = ".pop3d-journal"


class ReservedNameError(ValueError):
    """A name (or a spool path) falls in the reserved namespace; the text says why."""


def reserved(name: str) -> str | None:
    """Why `name` may not be a spool's (or a user's) file name, or None if it may.

    Compared case-insensitively: on a case-folding file system `X.LOCK` is `X.lock`.
    """
    if not name:
        return "an empty file name"
    if name[0] == ".":
        return "names starting with '.' are for lock and temporary files"
    folded = name.lower()
    if folded.endswith(".lock") or ".lock." in folded:
        return "names ending in '.lock' or containing '.lock.' are MDAs' dotlocks"
    parts = folded.split(".")
    if len(parts) >= 3 and _digits(parts[-1]):
        return "names of the form X.HOST.NUMBER are mutt's dotlock temporaries"
    if any(_digits(parts[i]) and _digits(parts[i + 1]) for i in range(1, len(parts) - 2)):
        return "names of the form X.NUMBER.NUMBER.HOST are GNU Mailutils' dotlock temporaries"
    return None


def _digits(part: str) -> bool:
    return part.isascii() and part.isdigit()


def valid_username(raw: bytes) -> str | None:
    """The name as str if safe to use in a path, a log line or a PAM call, else None.

    ASCII letters, digits and `._-@+` only, 1..MAX_USERNAME octets, no leading `-` (option
    injection) or `.` (hidden files, `..`), no `..` anywhere, and not a reserved file name
    (`alice.lock` would be alice's dotlock, `alice.vm.4242` mutt's temporary for it). Everything
    else, including NUL, controls, spaces, `/` and non-ASCII, is refused; the caller answers it
    like a bad password.
    """
    if not 0 < len(raw) <= limits.MAX_USERNAME:
        return None
    if raw.translate(None, NAME_CHARS):  # something outside the set is left over
        return None
    if raw[:1] == b"-" or b".." in raw:
        return None
    name = raw.decode("ascii")
    return None if reserved(name) else name


def expand(template: str, user: str, home: str | None) -> str:
    """The `mailbox` template with %u (user), %h (home directory) and %% (a percent) replaced."""
    out = []
    i = 0
    while i < len(template):
        char = template[i]
        if char == "%" and i + 1 < len(template):
            code = template[i + 1]
            out.append({"u": user, "h": home or "", "%": "%"}.get(code, "%" + code))
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def spool_path(template: str, user: str, home: str | None) -> str:
    """The user's spool from the template; ReservedNameError if its file name is reserved."""
    path = expand(template, user, home)
    why = reserved(path.rpartition("/")[2])
    if why is not None:
        raise ReservedNameError(f"the spool {path!r} of user {user!r} has a reserved file name: {why}")
    return path


def check_template(template: str) -> None:
    """ReservedNameError if every spool the template can make has a reserved file name.

    The file name part is expanded with a name no rule refuses; whatever it makes reserved is
    literal text of the template (`/var/mail/.%u`, `%h/.mbox`, `/var/mail/%u.lock`, `/var/mail/%u/`).
    """
    probe = expand(template, "u", "/h")
    why = reserved(probe.rpartition("/")[2])
    if why is not None:
        raise ReservedNameError(f"{template!r}: the spool's file name cannot follow this rule: {why}")


def dotlock(spool: str) -> str:
    """The dotlock every MDA takes: `<spool>.lock`."""
    return spool + ".lock"


def own(path: str, kind: str) -> str:
    """pop3d's file of this kind for `path`: `.pop3d-<kind>.<name>` in the same directory."""
    if "." in kind or "/" in kind or not kind:
        raise ValueError(f"bad kind {kind!r}")
    directory, slash, name = path.rpartition("/")
    return f"{directory}{slash}{OWN_PREFIX}{kind}.{name}"


def journal(spool: str) -> str:
    return own(spool, JOURNAL)


def journal_temp(spool: str) -> str:
    return own(spool, JOURNAL_TEMP)


def unusable_journal(spool: str, stamp: str) -> str:
    return own(spool, f"{UNUSABLE}-{stamp}")


def session_lock(spool: str) -> str:
    """pop3d's private session lock (issue 17): no MDA takes it, no user name reaches it."""
    return own(spool, SESSION_LOCK)


def legacy_journal(spool: str) -> str:
    """The journal name of earlier versions: a user name can reach it, so it is only read."""
    return spool + LEGACY_JOURNAL_SUFFIX


def user_file(directory: str, user: str) -> str:
    """A file kept for `user` outside the spool's directory (e.g. an index): `<directory>/<user>`.

    Its temporaries are `own(user_file(...), kind)`. ValueError for a name `valid_username`
    would refuse (a caller must never build a path from an unchecked name).
    """
    if valid_username(user.encode("ascii", "replace")) != user:
        raise ValueError(f"not a valid user name: {user!r}")
    return f"{directory.rstrip('/')}/{user}"
