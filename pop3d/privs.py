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


def check_setup(config: Config) -> None:
    """Started as root: what privilege separation needs must be there, or ConfigError.

    At start, not at a login: a login that passed the check must not fail for a reason known
    in advance (issue 12). The accounts pop3d runs as must exist and not be root:
    `preauth_user` runs the dialogue before login (root parses no client byte, so it cannot be
    empty), `mail_user` is what htpasswd users' sessions become. `preauth_chroot` must be
    usable (`empty_directory`).
    """
    from pop3d.config import ConfigError

    try:
        os.close(empty_directory(str(config.preauth_chroot)))
    except PrivilegeError as e:
        raise ConfigError(str(e)) from None

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


def confine(uid: int, gid: int, root: int, spare_fds: int = 0) -> None:
    """As root, lock the pre-authentication process up, or raise (PrivilegeError, OSError).

    In order: chroot into the empty directory open on `root` (`empty_directory`; the descriptor
    is closed), become uid/gid with no supplementary groups, then forbid new processes
    (RLIMIT_NPROC = 0) and new descriptors: RLIMIT_NOFILE is set to the lowest free descriptor
    number plus `spare_fds` (what a TLS handshake needs), so no other descriptor can be made;
    those already open, whatever their number, stay usable. Code running here can then neither
    reach a file, nor open a network connection, nor keep the client connection alive in a
    child after the handover. Everything it needs must already be imported and open. Nothing
    here is optional: a process that could not be confined must not serve.
    """
    import resource

    try:
        os.fstat(0)
    except OSError:  # keep fd 0 taken, so that the descriptor limit leaves no free number
        null = os.open(os.devnull, os.O_RDWR)
        if null != 0:
            os.dup2(null, 0, inheritable=False)
            os.close(null)
    os.fchdir(root)
    os.close(root)
    os.chroot(".")
    os.chdir("/")
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


def empty_directory(path: str) -> int:
    """A descriptor of the directory the pre-authentication process is chrooted into, made if
    missing (mode 755, parents too), or PrivilegeError saying why it cannot be used.

    Proved on the open descriptor (no race with the path): a directory, not a symbolic link,
    owned by root, writable by no one else, and empty. Not under /tmp (as popa3d's
    /var/lib/popa3d and Dovecot's base_dir/empty): no user can fill or replace it.
    """
    import stat

    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            _make_directories(path)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise PrivilegeError(f"preauth_chroot {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PrivilegeError(
                f"preauth_chroot {path}: owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}: "
                "it must be root's and writable by no one else"
            )
        if os.listdir(fd):
            raise PrivilegeError(f"preauth_chroot {path}: not empty")
    except OSError as e:
        os.close(fd)
        raise PrivilegeError(f"preauth_chroot {path}: {e.strerror}") from None
    except PrivilegeError:
        os.close(fd)
        raise
    return fd


def _make_directories(path: str) -> None:
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _make_directories(parent)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
