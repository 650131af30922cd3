"""From credentials to an open, locked maildrop: authenticate, become the account, open the spool.

The one place where adapter exceptions become RFC 2449/3206 response codes (`error_codes`), and
where login successes and failures are logged. Loaded only when a client sends PASS or AUTH.
"""

from __future__ import annotations

import os
import time

from pop3d import auth, limits, log, names, privs, protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d import maildrop
    from pop3d.config import Config


def error_codes() -> tuple[tuple[type[BaseException], bytes], ...]:
    """Adapter exception -> response code. Messages of these exceptions go to the log, never
    the wire. Built when needed: the credential check comes first, and needs no `maildrop`."""
    from pop3d import maildrop

    return (
        (maildrop.MaildropInUseError, protocol.IN_USE),
        (maildrop.MaildropFormatError, protocol.SYS_PERM),
        (maildrop.MaildropPermError, protocol.SYS_PERM),
        (privs.PrivilegeError, protocol.SYS_PERM),
        (auth.AuthUnavailableError, protocol.SYS_TEMP),
        (maildrop.MaildropError, protocol.SYS_TEMP),
        (OSError, protocol.SYS_TEMP),
    )


# Checked against a real hash when the name is malformed, so that case costs what a wrong password does.
_INVALID_NAME = "\0invalid"


class LoginRefused(Exception):
    """Not an error of the server: the login cannot go on (reason for the log only)."""

    def __init__(self, reason: str, code: bytes = protocol.SYS_PERM) -> None:
        super().__init__(reason)
        self.code = code


def expand_mailbox(template: str, user: str, home: str | None) -> str:
    """The maildrop path from the `mailbox` template: %u user, %h home directory, %% a percent.

    Refused if its file name is reserved (a dotlock, a temporary: see `names`)."""
    if "%h" in template and not home:
        raise LoginRefused("mailbox template uses %h but the account has no home directory")
    try:
        return names.spool_path(template, user, home)
    except names.ReservedNameError as e:
        raise LoginRefused(str(e)) from None


def authenticate(config: Config, raw_user: bytes, password: bytes, peer: str) -> auth.Account | bytes:
    """Check the credentials: the account, or the response code of the failure.

    Runs with the privileges the check needs (root, for PAM and a root-only htpasswd file), and
    touches no maildrop. Every failure is logged and answered `auth_failure_delay` seconds (at
    least limits.AUTH_FAILURE_FLOOR) after the check began, whatever failed and however long it
    took (as long as that is shorter): an unknown user, a wrong password, a malformed name and a
    disabled account cannot be told apart.
    """
    started = time.monotonic()
    name = auth.valid_username(raw_user)
    shown = name if name is not None else log.escape(raw_user)
    code = protocol.AUTH
    try:
        account, why = _check(config, name, password, peer)
        if account is not None:
            return account
        log.info(f"login failed: user={shown} rip={peer}: {why}")
    except LoginRefused as e:
        log.error(f"login refused: user={shown} rip={peer}: {e}")
        code = e.code
    except auth.AuthUnavailableError as e:
        log.error(f"login failed: user={shown} rip={peer}: {e}")
        code = protocol.SYS_TEMP
    delay = max(float(config.auth_failure_delay), limits.AUTH_FAILURE_FLOOR)  # type: ignore[arg-type]
    time.sleep(max(0.0, started + delay - time.monotonic()))
    return code


def open_maildrop(config: Config, account: auth.Account, peer: str) -> bytes | tuple[str, maildrop.Maildrop]:
    """Become the account, then open, lock and scan its maildrop: (user, maildrop), or a code.

    Nothing of the maildrop is opened, locked or read before the switch, and the spool must
    belong to the account the session now runs as (system user, or mail_user for htpasswd).
    """
    from pop3d import maildrop

    shown = log.escape(account.name)
    try:
        if auth.valid_username(account.name.encode("utf-8", "surrogateescape")) != account.name:
            # The name the client sent was valid; the account database's own name for it is
            # not (winbind's DOMAIN\user): it would reach %u, a path, the index file's name.
            raise LoginRefused("the account database names this account outside pop3d's user names")
        path = expand_mailbox(str(config.mailbox), account.name, account.home)
        root = os.geteuid() == 0
        index_file = _index_file(config, account) if root else None  # root makes its directory
        _drop_privileges(config, account, path)
        if not root:
            index_file = _index_file(config, account)
        opened = maildrop.Maildrop.open(
            path,
            locks=tuple(config.locks),  # type: ignore[arg-type]
            lock_timeout=float(config.lock_timeout),  # type: ignore[arg-type]
            stale_lock=float(config.stale_lock),  # type: ignore[arg-type]
            mbox_format=str(config.mbox_format),
            expected_uid=os.geteuid(),
            log=log.warning,
            mda_locks=str(config.mda_locks),
            index=index_file,
        )
    except LoginRefused as e:
        log.error(f"login refused: user={shown} rip={peer}: {e}")
        return e.code
    except Exception as e:
        if isinstance(e, privs.PrivilegeError) and e.fatal:
            log.error(f"login aborted: user={shown} rip={peer}: {e}")
            os._exit(70)  # EX_SOFTWARE: this process may still be root; nothing more may run
        for kind, code in error_codes():
            if isinstance(e, kind):
                log.error(f"login failed: user={shown} rip={peer}: {e}")
                return code
        raise
    log.info(
        f"login: user={account.name} rip={peer} uid={os.geteuid()} "
        f"messages={opened.listing.count} size={opened.listing.total_size} scanned={opened.scanned}"
    )
    return account.name, opened


def _index_file(config: Config, account: auth.Account) -> str | None:
    """The maildrop's index file (pop3d/index.py), its directory made by root for the account
    before the privilege drop; None when `index_dir` is empty or unusable (logged)."""
    if not config.index_dir:
        return None
    from pop3d import index

    directory = index.prepare(str(config.index_dir), account.uid, account.gid, log.warning)
    return index.file_for(directory, account.name) if directory is not None else None


def _check(config: Config, name: str | None, password: bytes, peer: str) -> tuple[auth.Account | None, str]:
    """(account, "") if the credentials are right, else (None, why); the same work either way."""
    if config.auth == "htpasswd":
        checker = auth.HtpasswdAuthenticator(str(config.htpasswd))
        good = checker.authenticate(name if name is not None else _INVALID_NAME, password)
        if name is None:
            return None, "invalid user name"
        if not good:
            return None, "unknown user or wrong password"
        return _virtual_account(config, name), ""
    system = auth.SystemAuthenticator(str(config.pam_service), int(config.first_uid))  # type: ignore[call-overload]
    try:
        account = system.authenticate(name, password, peer)
    finally:
        log.reopen()  # a PAM module may have called closelog(): keep ident and facility
    return account, system.reason


def _virtual_account(config: Config, name: str) -> auth.Account:
    """htpasswd users have no system account: their sessions run as mail_user (or as the caller)."""
    if os.geteuid() != 0:
        return auth.Account(name, os.geteuid(), os.getegid(), None)
    if not config.mail_user:
        raise LoginRefused("htpasswd users need mail_user when pop3d runs as root")
    import pwd

    try:
        entry = pwd.getpwnam(str(config.mail_user))
    except KeyError:
        raise LoginRefused(f"mail_user {config.mail_user!r} does not exist") from None
    return auth.Account(name, entry.pw_uid, entry.pw_gid, None)


def preload(config: Config | None = None, every: bool = False) -> None:
    """Import now what the session needs after dropping root.

    The account may not be able to read the interpreter's or pop3d's files (a Python under
    /root, a mode-700 checkout), and a failed import mid-session would end it with an error.
    Waits for a `preload_behind` still running, then makes sure (an import failed there is
    tried again here, and raises here). `every`: also what only some sessions use (a listener
    forks sessions of every kind, and imports once for all of them).
    """
    global _preloaded
    wait_preload()
    if not _preloaded:
        _import_session_modules(_needs_re(config) or every, every)
        _preloaded = True


def wait_preload() -> None:
    """Wait for a `preload_behind` still running (a process must not exit in its middle)."""
    global _preloading
    waiting, _preloading = _preloading, None
    if waiting is not None:
        waiting.acquire()


def preload_behind(config: Config) -> None:
    """Start `preload`'s imports in a thread: they then run while the main thread waits for the
    credentials and while the password hash runs in C (PAM and ctypes release the GIL), not
    after. `preload()` waits for it; call it before dropping root (`open_maildrop` does).

    Start it with the stop signals blocked: the thread inherits the mask, so a SIGTERM goes to
    the main thread and interrupts what it is waiting on.
    """
    global _preloading
    if _preloaded:
        return  # a listener loaded all of it before forking this session: nothing to overlap
    import _thread

    done = _thread.allocate_lock()
    done.acquire()
    needs_re = _needs_re(config)

    def work() -> None:
        try:
            _import_session_modules(needs_re, False)
        except BaseException:
            pass  # preload() tries again in the main thread, where a failure is reported
        finally:
            done.release()

    _preloading = done
    _thread.start_new_thread(work, ())


_preloading = None  # the lock a running preload_behind releases when done
_preloaded = False  # preload() has run in this process (or in the listener that forked it)


def _needs_re(config: Config | None) -> bool:
    """Whether the scanner will need `re` (~3 ms to import): for mboxrd's quoted From lines, and
    for the UID digests without the C accelerator."""
    from pop3d import bulk

    return config is None or config.mbox_format == "mboxrd" or not bulk.ACCELERATED


def _import_session_modules(needs_re: bool, every: bool) -> None:
    """The modules the session needs after the drop. Not hashlib (OpenSSL, ~2 ms): the UID
    digests of a small spool use CPython's built-in SHA-256, and a big spool's scan imports
    hashlib then, or keeps to the built-in one if the account cannot (mbox._sha256_for)."""
    import array  # noqa: F401
    import binascii  # noqa: F401
    import fcntl  # noqa: F401
    import grp  # noqa: F401
    import mmap  # noqa: F401
    import pwd  # noqa: F401
    import struct  # noqa: F401
    import zlib  # noqa: F401

    from pop3d import bulk, index, locking, maildrop, mbox  # noqa: F401

    bulk.builtin_sha256()
    if needs_re:
        mbox._regexes()  # compiled now (~0.5 ms), not at the first scan
        bulk.strip_volatile(b"")  # the same, for the Python version's pattern
    if every:
        import hashlib  # noqa: F401


def groups_for(config: Config, account: auth.Account, path: str) -> list[int]:
    """The supplementary groups a session keeps: the account's own, plus `mail` only if needed.

    A system user gets the groups a login gives it (initgroups); htpasswd users get mail_user's
    primary group. `mail` is added, as Debian's MDAs (procmail, dotlockfile) have it, only
    when the spool directory is writable through group mail and not otherwise (Debian's
    `/var/mail` is root:mail 2775): dotlocks and the update journal are created there.
    """
    system = config.auth == "system"
    groups = set(os.getgrouplist(account.name, account.gid)) if system else {account.gid}
    mail_gid = _mail_group_needed(os.path.dirname(path), account.uid)
    if mail_gid is not None:
        groups.add(mail_gid)
    return sorted(groups)


def _mail_group_needed(directory: str, uid: int) -> int | None:
    """Group mail's gid if the spool directory needs it (root:mail, group-writable, like Debian's
    /var/mail) and is reached through a path no user controls; else None.

    Decided on the path itself, not through it: `mailbox = %h/mail/inbox` with `~/mail ->
    /var/mail` must not give the user group mail. See `_resolve_trusted`.
    """
    import grp
    import stat

    try:
        mail_gid = grp.getgrnam("mail").gr_gid
    except KeyError:
        return None
    st = _resolve_trusted(directory)
    if st is None:
        return None
    mode = st.st_mode
    if st.st_uid != 0 or mode & stat.S_IWOTH or not mode & stat.S_IWGRP or st.st_gid != mail_gid:
        return None
    return mail_gid


def _resolve_trusted(directory: str) -> os.stat_result | None:
    """The directory's status if the kernel reaches it only through entries no user controls:
    every directory on the way (symbolic links resolved as the kernel does) and every link is
    owned by root, and no directory before the last is writable by a group or others unless it
    is sticky (/tmp: nobody else can rename or remove root's entries there). Else None."""
    import stat

    pending = [part for part in directory.split("/") if part]
    path = "/"
    hops = 0
    st = os.lstat(path)
    while pending:
        if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            return None  # a user (or a group) could swap the next entry
        part = pending.pop(0)
        if part == ".":
            continue
        path = os.path.dirname(path) if part == ".." else os.path.join(path, part)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if st.st_uid != 0 or hops > 40:
                    return None
                target = os.readlink(path)
                pending[:0] = [part for part in target.split("/") if part]
                path = "/" if target.startswith("/") else os.path.dirname(path)
                st = os.lstat(path)
                continue
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
    return st


def _drop_privileges(config: Config, account: auth.Account, path: str) -> None:
    """As root, become the account for good before the maildrop is touched (docs/SECURITY.md)."""
    preload(config)
    if os.geteuid() != 0:
        if os.geteuid() != account.uid:
            raise LoginRefused("cannot serve another account's maildrop without root")
        return
    privs.become(account.uid, account.gid, groups_for(config, account, path))
