"""Mailbox locks taken the way Debian's MDAs take them: dotlock, fcntl, flock.

Knows nothing of POP3. Postfix `local`, Exim `appendfile`, procmail and liblockfile agree on a
dotlock `<mbox>.lock` beside the mailbox plus an fcntl lock on the mailbox itself; we take the
configured methods in order, each attempt non-blocking, and drop everything we hold before
sleeping, so a process that takes the same locks in another order can never deadlock with us.

The dotlock is a file that already holds its content, linked to the lock name: an anonymous
`O_TMPFILE` file where the file system has them (a process killed before the link leaves nothing
behind); on NFS, liblockfile's NFS-safe algorithm: a uniquely named temporary file in the same
directory is `link()`ed to the lock name, and success is judged by the temporary file's link
count (2), never by link()'s return value (an NFS retransmission can report EEXIST for a link
that was made). The lock holds `<pid>:<host>:<boot id>:<pid namespace>` and a newline: liblockfile
(`dotlockfile -p`) reads the pid with atoi() and stops at the first colon; Dovecot trusts the
pid only when everything after that colon is its own host name, so to it this lock is another
host's (judged by its age, as Dovecot judges every lock it cannot prove local).

A dotlock is stale (and broken, if it looks like a lock: see `_read_lock`) when it was left
untouched for `stale` seconds (every MDA's rule), or, judged by what it names (`_stale`):
- pop3d's own lock naming this host: made during another boot (its boot id is not this boot's;
  on a shared file system only if also older than this boot), or made in this pid namespace by
  a process that is not running. A lock of another pid namespace (a container on this kernel)
  has pids that mean nothing here: judged by age only. No clock is involved: exact.
- `pid:host` naming this host (Dovecot, pop3d before the boot id): its pid is not running.
- only a pid (liblockfile, procmail's "0") or nothing (Postfix, Exim, a power cut): older than
  this kernel's boot (/proc/stat's btime), and only on a file system local to this kernel
  (`_local_directory`), where no process that made it can still run. Never by its pid: a
  process of another pid namespace (a container) may hold it, and its pid means nothing here.
- any other host's lock: by age only.
Host names must therefore be unique among the hosts (and containers with their own pid
namespace) that share a spool directory. btime moves when the clock is stepped (a host without
a real-time clock syncing after boot): a foreign lock taken before the step may then look older
than boot; pop3d's own locks do not depend on it.

Creating the dotlock needs write access to the spool directory. Debian's `/var/mail` is
`root:mail 2775`: the session must keep group `mail` when it drops to the user (as Debian's MDAs
do); otherwise creation fails with `LockPermissionError` naming the directory.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from . import limits, names

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

METHODS = ("dotlock", "fcntl", "flock")
# errno values of a non-blocking fcntl/flock that lost to another holder.
_BUSY = (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK)


class LockError(Exception):
    """A lock could not be taken or kept for a reason other than contention."""


class LockTimeoutError(LockError):
    """Another process held a lock for the whole timeout: the mailbox is in use."""


class LockPermissionError(LockError):
    """The dotlock cannot be created: no write access to the spool directory."""


def _noop_log(message: str) -> None:
    pass


def _host_name() -> str:
    """This host's name as it is written in our dotlocks (and Dovecot's): the kernel's nodename."""
    return os.uname().nodename


def _boot_time() -> float | None:
    """When this host booted (seconds since the epoch, /proc/stat's btime), or None if unknown."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


_BOOT_ID: list[str | None] = []  # this boot's id, read once per process


def _this_boot() -> str | None:
    """This boot's random id (/proc/sys/kernel/random/boot_id: a new one at every boot, the same
    in every container on this kernel), or None if unknown."""
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                text = f.read(64).strip().decode("ascii")
        except (OSError, UnicodeDecodeError):
            text = ""
        _BOOT_ID.append(text if _is_boot_id(text) else None)
    return _BOOT_ID[0]


def _is_boot_id(text: str) -> bool:
    """True for a boot id as the kernel writes it: a UUID in lower-case hexadecimal."""
    return (
        len(text) == 36
        and not text.strip("0123456789abcdef-")
        and text[8] == text[13] == text[18] == text[23] == "-"
    )


def _pid_namespace() -> int | None:
    """The identity (nsfs inode) of the pid namespace our pids are numbers in, or None."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _lock_content(pid: int) -> bytes:
    """What our dotlock holds: `pid:host:boot id:pid namespace` and a newline, or Dovecot's
    `pid:host` where this boot or namespace cannot be named."""
    host = _host_name().encode("ascii", "surrogateescape")
    boot, pidns = _this_boot(), _pid_namespace()
    if boot is None or pidns is None:
        return b"%d:%s\n" % (pid, host)
    return b"%d:%s:%s:%d\n" % (pid, host, boot.encode(), pidns)


def process_running(pid: int) -> bool:
    """True unless no process `pid` runs here (a zombie no longer runs: its locks are gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read(512).rpartition(b")")[2].split()[:1]
    except OSError:
        return True  # /proc hidden from us (hidepid): it exists
    return state != [b"Z"]


# File systems that only this host's kernel writes to (an NFS export of one is checked apart).
# Anything else (nfs, cifs, ceph, gfs2, ocfs2, 9p, virtiofs, fuse.*, ...) may be shared with
# another host or another kernel, whose pids and boot time mean nothing here.
_LOCAL_FILESYSTEMS = frozenset(
    ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "jfs", "reiserfs", "zfs",
     "bcachefs", "nilfs2", "overlay", "vfat", "exfat", "hfsplus")
)  # fmt: skip


def _local_directory(directory: str) -> bool:
    """True if `directory` is on a local file system (by its device in /proc/self/mountinfo)
    and this host exports nothing over NFS (/proc/fs/nfsd/exports is empty or absent)."""
    try:
        dev = os.stat(directory).st_dev
        want = f"{os.major(dev)}:{os.minor(dev)}".encode()
        fstype = None
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields, _, rest = line.partition(b" - ")
                parts = fields.split()
                if len(parts) > 2 and parts[2] == want and rest:
                    fstype = rest.split()[0].decode("ascii", "replace")
        if fstype not in _LOCAL_FILESYSTEMS:
            return False
        with open("/proc/fs/nfsd/exports", "rb") as f:
            exported = any(line.strip() and not line.startswith(b"#") for line in f)
        return not exported
    except FileNotFoundError as e:
        return e.filename == "/proc/fs/nfsd/exports"  # no NFS server here
    except OSError:
        return False


def _host_tag() -> str:
    """This host's name reduced to characters safe in a file name (for unique temp names on NFS)."""
    name = os.uname().nodename or "localhost"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64]


def _read_lock(lock_path: str) -> tuple[os.stat_result, bytes | None]:
    """The dotlock's status and content, the content None unless it looks like a lock.

    A lock is a regular file of at most `limits.DOTLOCK_MAX_SIZE` octets holding nothing (Postfix,
    whose locks are mode 000, and Exim; any lock after a power cut), a pid (liblockfile,
    procmail's "0"), or a pid, `:` and a host name (Dovecot, pop3d), each with an optional final
    newline. A non-empty file we cannot read is not judged: None.
    """
    st = os.lstat(lock_path)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limits.DOTLOCK_MAX_SIZE:
        return st, None
    if st.st_size == 0:
        return st, b""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError:
        return st, None
    try:
        st = os.fstat(fd)
        content = os.pread(fd, limits.DOTLOCK_MAX_SIZE + 1, 0)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or _lock_owner(content) is None:
        return st, None
    return st, content


def _lock_owner(content: bytes) -> tuple[int, str, str, int] | None:
    """Who made a lock with this content, (pid, host, boot id, pid namespace) with 0 or ""
    where it says nothing, or None if it is no lock content. Content: empty, `pid`, `pid:host`
    (Dovecot; a host name may hold a colon) or pop3d's `pid:host:boot id:pid namespace`."""
    line = content[:-1] if content.endswith(b"\n") else content
    pid, colon, rest = line.partition(b":")
    if b"\n" in line or b"\0" in line or (pid and not pid.isdigit()) or (colon and not (pid and rest)):
        return None
    host = rest.decode("ascii", "surrogateescape")
    head, _, pidns = host.rpartition(":")
    named, _, boot = head.rpartition(":")
    if named and pidns.isdigit() and _is_boot_id(boot):
        return int(pid), named, boot, int(pidns)
    return int(pid or b"0"), host, "", 0


def _retry(attempt: Callable[[], bool], timeout: float) -> bool:
    """Call `attempt` until it returns True (then True) or `timeout` seconds pass (then False)."""
    deadline = time.monotonic() + timeout
    delay = limits.LOCK_RETRY_MIN
    while not attempt():
        now = time.monotonic()
        if now >= deadline:
            return False
        # Jitter (50-100 %) keeps two contending sessions from retrying in lockstep.
        jitter = 0.5 + os.urandom(1)[0] / 510
        time.sleep(min(delay * jitter, deadline - now))
        delay = min(delay * 2, limits.LOCK_RETRY_MAX)
    return True


class MailboxLock:
    """The configured locks on one mailbox: acquire with a bounded wait, refresh, verify, release.

    `fd` is the open mailbox (O_RDWR, as fcntl write locks need); None when the mailbox does not
    exist, in which case only the dotlock can be taken (fcntl/flock are skipped).
    """

    __slots__ = (
        "_acquired",
        "_anonymous",
        "_dot_content",
        "_dot_fd",
        "_dot_id",
        "_doubted",
        "_held",
        "_local",
        "_log",
        "_namesake",
        "busy_method",
        "fd",
        "lock_path",
        "methods",
        "path",
        "stale",
        "timeout",
    )

    def __init__(
        self,
        path: str,
        fd: int | None = None,
        methods: Sequence[str] = ("dotlock", "fcntl"),
        timeout: float = limits.DEFAULT_LOCK_TIMEOUT,
        stale: float = limits.DEFAULT_STALE_LOCK,
        log: Callable[[str], None] | None = None,
    ) -> None:
        methods = tuple(methods)
        for method in methods:
            if method not in METHODS:
                raise ValueError(f"unknown lock method {method!r}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"lock method listed twice: {methods!r}")
        self.path = path
        self.lock_path = names.dotlock(path)
        self.fd = fd
        self.methods = methods
        self.timeout = float(timeout)
        self.stale = float(stale)
        self._log = log or _noop_log
        self._held: list[str] = []
        self._dot_fd = -1
        self._dot_id = (0, 0)
        self._anonymous = True  # O_TMPFILE until the file system says it has none (NFS)
        self._dot_content = b""
        self.busy_method = ""  # which lock was busy in the last failed round (for the log)
        self._acquired = False
        self._doubted = False  # logged once: a file at the dotlock's name that is no lock
        self._namesake = False  # logged once: a lock of another boot of a host of our name
        self._local: bool | None = None  # _local_directory of the spool's directory, once asked

    # ------------------------------------------------------------------ acquire

    def acquire(self) -> None:
        """Take every configured lock, retrying until the timeout; raise LockTimeoutError then."""
        if self._acquired:
            raise LockError("locks already held")
        if not _retry(self._try_all, self.timeout):
            raise LockTimeoutError(
                f"{self.path}: {self.busy_method} lock held by another process for {self.timeout:g} s"
            )

    def _try_all(self) -> bool:
        """One round: every method without blocking; on any miss, release what this round took."""
        for method in self.methods:
            try:
                if method == "dotlock":
                    got = self._try_dotlock()
                elif self.fd is None:
                    continue  # nothing to fcntl/flock: the mailbox does not exist
                elif method == "fcntl":
                    got = self._try_fcntl()
                else:
                    got = self._try_flock()
            except BaseException:
                self.release()
                raise
            if not got:
                self.busy_method = method
                self.release()
                return False
            self._held.append(method)
        self._acquired = True
        return True

    def _try_dotlock(self) -> bool:
        directory = os.path.dirname(self.lock_path) or "."
        content = _lock_content(os.getpid())
        for _ in range(2):  # a second try right after breaking a stale lock
            fd, tmp = self._new_lock_file(directory, content)
            try:
                link_error: OSError | None = None
                try:
                    if tmp is not None:
                        os.link(tmp, self.lock_path)
                    else:
                        # An anonymous file is linked through its /proc name, which linkat must
                        # follow: Python calls linkat (AT_SYMLINK_FOLLOW), not link(), only
                        # when given a directory fd (ignored for an absolute path).
                        os.link(f"/proc/self/fd/{fd}", self.lock_path, src_dir_fd=fd)
                except OSError as e:
                    link_error = e
                st = os.fstat(fd)  # judged by the link count, whatever link() said
            except BaseException:
                os.close(fd)
                raise
            finally:
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except FileNotFoundError:
                        pass
            if st.st_nlink == (2 if tmp is not None else 1):
                self._dot_fd = fd
                self._dot_id = (st.st_dev, st.st_ino)
                self._dot_content = content
                return True
            os.close(fd)
            if tmp is None and link_error is not None and link_error.errno == errno.ENOENT:
                self._anonymous = False  # no /proc: named temporaries from now on
                continue
            if link_error is not None and link_error.errno != errno.EEXIST:
                raise self._dotlock_error(link_error, directory)
            # The new file's mtime is the file system's "now": no clock skew with an NFS server.
            if not self._break_if_stale(st.st_mtime):
                return False
        return False

    def _new_lock_file(self, directory: str, content: bytes) -> tuple[int, str | None]:
        """A file holding `content`, to be linked to the lock name: (descriptor, its temporary
        name, or None when it has none).

        Anonymous (O_TMPFILE) where the file system allows it, so that a process killed before
        the link leaves nothing behind. Otherwise (NFS has no O_TMPFILE) a uniquely named
        temporary in pop3d's own namespace, made NFS-safely as liblockfile does and removed
        right after the link; a process killed between the two leaves it, named after its host
        and pid.
        """
        flags = os.O_RDWR | os.O_CLOEXEC
        if self._anonymous:
            try:
                fd = os.open(directory, flags | os.O_TMPFILE, 0o644)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise self._dotlock_error(e, directory) from e
                self._anonymous = False
            else:
                return self._filled(fd, content), None
        tag = f"{_host_tag()}-{os.getpid()}-{os.urandom(4).hex()}"
        tmp = names.own(self.path, f"{names.DOTLOCK_TEMP}-{tag}")
        try:
            fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise self._dotlock_error(e, directory) from e
        try:
            return self._filled(fd, content), tmp
        except BaseException:
            os.unlink(tmp)
            raise

    @staticmethod
    def _filled(fd: int, content: bytes) -> int:
        try:
            os.write(fd, content)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _dotlock_error(self, e: OSError, directory: str) -> LockError:
        if e.errno == errno.EACCES:
            return LockPermissionError(
                f"cannot create dotlock {self.lock_path}: no write access to {directory} "
                "(the session must keep the spool directory's group, e.g. mail)"
            )
        if e.errno == errno.EPERM:
            return LockError(f"cannot create dotlock {self.lock_path}: {e.strerror} (no hard links here?)")
        return LockError(f"cannot create dotlock {self.lock_path}: {e.strerror or e}")

    def _break_if_stale(self, fs_now: float) -> bool:
        """Remove a dotlock untouched for longer than `stale`; True if the lock name is free now.

        Only a file that looks like a lock is ever removed (see `_read_lock`): a file holding
        mail at that name stays, and the maildrop stays locked until someone looks at it.
        """
        try:
            st, content = _read_lock(self.lock_path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if content is None:
            if not self._doubted:
                self._doubted = True
                self._log(f"{self.lock_path} is not a lock file (type, size or content): left alone")
            return False
        why = self._stale(st, content, fs_now)
        if why is None:
            return False
        # Re-check just before unlinking: another breaker may have replaced it meanwhile.
        try:
            again = os.lstat(self.lock_path)
        except FileNotFoundError:
            return True
        if (again.st_ino, again.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
            return False
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        self._log(f"broke stale dotlock {self.lock_path} ({why})")
        return True

    def _stale(self, st: os.stat_result, content: bytes, fs_now: float) -> str | None:
        """Why the lock is stale, or None (see the module's docstring)."""
        age = fs_now - st.st_mtime
        if age > self.stale:
            return f"untouched for {age:.0f} s > {self.stale:g} s"
        pid, host, boot, pidns = _lock_owner(content) or (0, "", "", 0)
        if host and host != _host_name():
            return None  # another host's: its pids and boot mean nothing here
        if boot:
            return self._own_stale(st, pid, boot, pidns)
        if host and pid > 0:
            return None if process_running(pid) else f"its process {pid} is not running on this host"
        if self._local_here() and st.st_mtime < (_boot_time() or 0.0):
            return "made before this host booted"
        return None

    def _own_stale(self, st: os.stat_result, pid: int, boot: str, pidns: int) -> str | None:
        """Why a lock pop3d made on a host of our name is stale, or None: exact, by the boot
        and the pid namespace it names, then by its pid."""
        this_boot = _this_boot()
        if this_boot is None:
            return None
        if boot != this_boot:
            if self._local_here():
                return "made before this host's current boot"
            if st.st_mtime < (_boot_time() or 0.0):
                return "made before this host booted"
            if not self._namesake:
                self._namesake = True
                self._log(
                    f"{self.lock_path} names this host but another boot, and is younger than this "
                    "boot: does another host share this host name? Judged by its age only"
                )
            return None
        if pidns != _pid_namespace():
            return None  # another pid namespace on this kernel (a container): pids differ
        if pid > 0 and not process_running(pid):
            return f"its process {pid} is not running on this host"
        return None

    def _local_here(self) -> bool:
        """Whether the spool directory's file system is written by this kernel alone."""
        if self._local is None:
            self._local = _local_directory(os.path.dirname(self.lock_path) or ".")
        return self._local

    def _try_fcntl(self) -> bool:
        import fcntl

        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                return False
            raise LockError(f"fcntl lock on {self.path}: {e.strerror or e}") from e
        return True

    def _try_flock(self) -> bool:
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
        except OSError as e:
            if e.errno in _BUSY:
                return False
            raise LockError(f"flock on {self.path}: {e.strerror or e}") from e
        return True

    # ------------------------------------------------------------ while held

    @property
    def held(self) -> bool:
        """True between a successful acquire() and release()."""
        return self._acquired

    def refresh(self) -> bool:
        """Touch our dotlock so no MDA judges it stale; True if every lock is still ours.

        Touches our own inode through its descriptor, so a lock that was broken and re-created
        by someone else is never touched by us.
        """
        if "dotlock" in self._held:
            try:
                os.utime(self._dot_fd)
            except OSError:
                return False
        return self.verify()

    def verify(self) -> bool:
        """True if the locks are held and the dotlock (when taken) still is the file we created."""
        if not self._acquired:
            return False
        if "dotlock" not in self._held:
            return True
        try:
            st = os.lstat(self.lock_path)
            if (st.st_dev, st.st_ino) != self._dot_id:
                return False
            return os.pread(self._dot_fd, limits.DOTLOCK_MAX_SIZE + 1, 0) == self._dot_content
        except OSError:
            return False

    # ---------------------------------------------------------------- release

    def release(self) -> None:
        """Drop every lock we hold, in reverse order; safe to call any number of times."""
        self._acquired = False
        while self._held:
            method = self._held.pop()
            try:
                if method == "dotlock":
                    self._release_dotlock()
                else:
                    import fcntl

                    if method == "fcntl":
                        fcntl.lockf(self.fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
                    else:
                        fcntl.flock(self.fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
            except OSError as e:
                self._log(f"releasing {method} lock on {self.path}: {e.strerror or e}")

    def _release_dotlock(self) -> None:
        fd, self._dot_fd = self._dot_fd, -1
        try:
            st = os.lstat(self.lock_path)
            if (st.st_dev, st.st_ino) == self._dot_id:
                os.unlink(self.lock_path)
            else:
                self._log(f"dotlock {self.lock_path} was replaced by another process; left alone")
        except FileNotFoundError:
            self._log(f"dotlock {self.lock_path} was removed by another process")
        finally:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> MailboxLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------ session lock


class SessionLock:
    """pop3d's own lock on one mailbox: POP3 sessions exclude each other with it, MDAs never see it.

    An exclusive flock(2) on an empty file beside the mailbox (`names.session_lock`). It dies with
    its process, so a session killed with SIGKILL leaves no stale lock, at most the empty file,
    which the next session locks and reuses. `release` removes the file while still holding the
    lock and only if the name still is the file we locked; a session that opened the file just
    before that finds, once it has the lock, that the name no longer names its file, and starts
    again. A file there that is not an empty regular file of ours is refused, never touched.
    """

    __slots__ = ("_fd", "path", "timeout")

    def __init__(self, mailbox: str, timeout: float = limits.DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = names.session_lock(mailbox)
        self.timeout = float(timeout)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        """Take the lock, retrying until the timeout; LockTimeoutError then (another session)."""
        if self._fd >= 0:
            raise LockError("session lock already held")
        if not _retry(self._try, self.timeout):
            raise LockTimeoutError(f"{self.path}: held by another session for {self.timeout:g} s")

    def _try(self) -> bool:
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            directory = os.path.dirname(self.path) or "."
            if e.errno == errno.EACCES:
                raise LockPermissionError(f"cannot create {self.path}: no write access to {directory}") from e
            raise LockError(f"cannot open session lock {self.path}: {e.strerror or e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size or st.st_uid != os.geteuid():
                raise LockError(f"{self.path}: not an empty file of ours; left alone")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in _BUSY:
                    os.close(fd)
                    return False
                raise LockError(f"flock on {self.path}: {e.strerror or e}") from e
            if not self._names(fd):
                os.close(fd)  # removed by its last holder meanwhile: lock what the name is now
                return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def _names(self, fd: int) -> bool:
        """True if our path still names the file open as fd."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def release(self) -> None:
        """Remove the file (still locked, still ours) and drop the lock; idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if self._names(fd):
                os.unlink(self.path)
        except OSError:
            pass  # an unlocked empty file left behind is harmless: the next session reuses it
        finally:
            os.close(fd)
