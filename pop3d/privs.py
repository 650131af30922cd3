"""Become the account that owns the maildrop, for good, before touching it; confine the
pre-authentication process. Knows nothing of POP3."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config


class PrivilegeError(Exception):
    """Privileges could not be dropped, or root could be regained: the session must not go on.

    `fatal` is set when the process may still hold root: the caller must exit at once.
    """

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def check_accounts(config: Config) -> None:
    """Started as root: the accounts pop3d runs as must exist and not be root (ConfigError).

    At start, not at a login: a login that passed the check must not fail for a reason known
    in advance (issue 12). `preauth_user` runs the dialogue before login: root parses no client
    byte, so it cannot be empty. `mail_user` is what htpasswd users' sessions become.
    """
    from pop3d.config import ConfigError

    accounts = [("preauth_user", str(config.preauth_user))]
    if config.auth == "htpasswd":
        accounts.append(("mail_user", str(config.mail_user)))
    for key, name in accounts:
        if not name:
            raise ConfigError(f"{key} is empty: pop3d started as root needs an unprivileged account here")
        import pwd

        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            raise ConfigError(f"{key}: no account {name!r}") from None
        if uid == 0:
            raise ConfigError(f"{key}: {name!r} has uid 0; pop3d never serves a client as root")


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Irrevocably switch real, effective and saved ids to uid/gid with exactly these groups.

    Order matters: supplementary groups and gid while still root, uid last. Then prove it:
    every id is the target, and neither setuid(0) nor setgid(0) nor setgroups() works.
    """
    if uid == 0:
        raise PrivilegeError("refusing to serve a maildrop as root")
    wanted = sorted(set(groups))
    try:
        os.setgroups(wanted)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise PrivilegeError(
            f"cannot switch to uid {uid} gid {gid}: {e.strerror}", fatal=os.geteuid() == 0
        ) from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError("ids did not change as requested", fatal=True)
    if sorted(set(os.getgroups())) != wanted:
        raise PrivilegeError(f"supplementary groups are {os.getgroups()}, not {wanted}", fatal=True)
    for attempt in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setgroups([0])):
        try:
            attempt()
        except OSError:
            continue
        raise PrivilegeError("root could be regained after dropping privileges", fatal=True)


def confine(uid: int, gid: int, spare_fds: int = 0) -> str:
    """As root, lock the pre-authentication process up; returns what was not possible ("" if all).

    In order: chroot into an empty directory that no longer exists (nothing to read, nothing can
    be created in it), become uid/gid with no supplementary groups, then forbid new processes
    (RLIMIT_NPROC = 0) and new descriptors: RLIMIT_NOFILE is set to the lowest free descriptor
    number plus `spare_fds` (what a TLS handshake needs), so no other descriptor can be made;
    those already open, whatever their number, stay usable. Code running here can then neither
    reach a file, nor open a network connection, nor keep the client connection alive in a
    child after the handover. Everything it needs must already be imported and open.
    """
    import resource

    try:
        os.fstat(0)
    except OSError:  # keep fd 0 taken, so that the descriptor limit leaves no free number
        null = os.open(os.devnull, os.O_RDWR)
        if null != 0:
            os.dup2(null, 0, inheritable=False)
            os.close(null)
    missing = ""
    try:
        _chroot_empty()
    except OSError as e:
        missing = f"no chroot ({e.strerror})"
    become(uid, gid, [])
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    lowest = 1  # fd 0 is in use (above)
    while True:
        try:
            os.fstat(lowest)
        except OSError:
            break
        lowest += 1
    # poll(2) needs nfds <= the limit: the session polls one descriptor at a time.
    limit = max(1, lowest + spare_fds)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return missing


def _chroot_empty() -> None:
    """chroot into a fresh directory, then remove it: an empty root that cannot gain entries."""
    base = "/tmp"
    for _ in range(5):
        path = f"{base}/pop3d-empty.{os.getpid()}.{os.urandom(6).hex()}"
        try:
            os.mkdir(path, 0o111)
        except FileExistsError:
            continue
        break
    else:
        raise OSError(17, "cannot create a directory in /tmp")
    try:
        # O_PATH: no read permission needed (mode 111), so root needs no CAP_DAC_* (the
        # systemd units keep none); fchdir only needs search permission.
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchdir(fd)
        finally:
            os.close(fd)
    finally:
        os.rmdir(path)
    os.chroot(".")
    os.chdir("/")
