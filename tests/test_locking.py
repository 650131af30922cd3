"""pop3d.locking against real second processes and real tools (dotlockfile from liblockfile-bin).

Every contender is a separate process: fcntl locks are per process, so a lock held by this
test process itself would prove nothing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import dotlock_content, in_pid_namespace, needs_pid_namespaces

from pop3d.locking import LockError, LockPermissionError, LockTimeoutError, MailboxLock

IS_ROOT = os.geteuid() == 0
DOTLOCKFILE = shutil.which("dotlockfile")
needs_dotlockfile = pytest.mark.skipif(
    DOTLOCKFILE is None, reason="dotlockfile not installed (apt-get install liblockfile-bin)"
)

HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    if sys.argv[2] == "fcntl":
        fcntl.lockf(fd, fcntl.LOCK_EX)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()          # hold until the test closes our stdin
    """
)


class Holder:
    """Another process holding an fcntl or flock lock on a file until stopped."""

    def __init__(self, path: Path, kind: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"locked\n"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    path = tmp_path / "alice"
    path.write_bytes(b"From a Thu Nov 26 10:00:00 2026\n\nhi\n\n")
    return path


def our_content(pid: int | None = None) -> bytes:
    """What our dotlock holds: `<pid>:<host>:<boot id>:<pid namespace>` and a newline."""
    return dotlock_content(os.getpid() if pid is None else pid)


def leftovers(directory: Path, keep: set[str]) -> set[str]:
    return set(os.listdir(directory)) - keep


def run_dotlockfile(*args: str) -> int:
    assert DOTLOCKFILE is not None
    return subprocess.run([DOTLOCKFILE, *args], capture_output=True, timeout=30).returncode


def test_dotlock_holds_our_pid_and_leaves_nothing_behind(mbox: Path) -> None:
    fd = os.open(mbox, os.O_RDWR)
    lock = MailboxLock(str(mbox), fd)
    lock.acquire()
    try:
        lock_file = Path(str(mbox) + ".lock")
        assert lock_file.read_bytes() == our_content()
        assert leftovers(mbox.parent, {"alice", "alice.lock"}) == set()  # temp name removed
        assert lock.held and lock.verify()
    finally:
        lock.release()
        lock.release()  # idempotent
        os.close(fd)
    assert not lock_file.exists()
    assert not lock.held and not lock.verify()


KILLED_BEFORE_THE_LINK = textwrap.dedent(
    """
    import os, signal, sys
    from pop3d import locking

    def link(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # a session killed between creating and linking

    locking.os.link = link
    locking.MailboxLock(sys.argv[1], None, ("dotlock",), 1.0).acquire()
    """
)


def test_a_session_killed_while_taking_the_dotlock_leaves_no_file(mbox: Path) -> None:
    """The file linked to the lock name is anonymous (O_TMPFILE) until the link: a process
    killed before it leaves nothing in the spool directory, which no one would remove."""
    done = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_THE_LINK, str(mbox)],
        capture_output=True,
        timeout=30,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    assert done.returncode == -9, done.stderr
    assert leftovers(mbox.parent, {"alice"}) == set()


def test_without_anonymous_files_a_named_temporary_is_linked_and_removed(mbox: Path) -> None:
    """NFS has no O_TMPFILE: then liblockfile's way, a unique name in pop3d's namespace."""
    lock = MailboxLock(str(mbox), None, ("dotlock",))
    lock._anonymous = False
    lock.acquire()
    try:
        assert Path(str(mbox) + ".lock").read_bytes() == our_content()
        assert leftovers(mbox.parent, {"alice", "alice.lock"}) == set()
    finally:
        lock.release()
    assert leftovers(mbox.parent, {"alice"}) == set()


def test_unknown_or_repeated_method_is_refused(mbox: Path) -> None:
    with pytest.raises(ValueError):
        MailboxLock(str(mbox), None, ("dotlock", "lockf"))
    with pytest.raises(ValueError):
        MailboxLock(str(mbox), None, ("fcntl", "fcntl"))


@pytest.mark.parametrize("kind", ["fcntl", "flock"])
def test_lock_held_by_another_process_times_out(mbox: Path, kind: str) -> None:
    holder = Holder(mbox, kind)
    fd = os.open(mbox, os.O_RDWR)
    try:
        lock = MailboxLock(str(mbox), fd, ("dotlock", kind), timeout=0.4)
        started = time.monotonic()
        with pytest.raises(LockTimeoutError, match=kind):
            lock.acquire()
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 3
        # Between rounds everything is released: no dotlock of ours is left behind.
        assert not Path(str(mbox) + ".lock").exists()
        holder.stop()
        lock.acquire()  # free now
        lock.release()
    finally:
        holder.stop()
        os.close(fd)


def test_waits_for_a_lock_released_within_the_timeout(mbox: Path) -> None:
    holder = Holder(mbox, "fcntl")
    fd = os.open(mbox, os.O_RDWR)
    try:
        lock = MailboxLock(str(mbox), fd, timeout=10)
        started = time.monotonic()
        import threading

        threading.Timer(0.3, holder.stop).start()
        lock.acquire()
        assert 0.25 < time.monotonic() - started < 3
        lock.release()
    finally:
        holder.stop()
        os.close(fd)


def test_missing_mailbox_is_locked_by_dotlock_only(tmp_path: Path) -> None:
    path = tmp_path / "nobody-here"
    lock = MailboxLock(str(path), None, ("dotlock", "fcntl", "flock"))
    lock.acquire()
    assert Path(str(path) + ".lock").exists() and not path.exists()
    lock.release()
    assert os.listdir(tmp_path) == []


@needs_dotlockfile
def test_dotlockfile_lock_makes_us_wait_then_fail(mbox: Path) -> None:
    lock_name = str(mbox) + ".lock"
    assert run_dotlockfile("-l", lock_name) == 0
    fd = os.open(mbox, os.O_RDWR)
    try:
        lock = MailboxLock(str(mbox), fd, timeout=0.5)
        with pytest.raises(LockTimeoutError, match="dotlock"):
            lock.acquire()
        assert Path(lock_name).exists()  # theirs, untouched
        assert run_dotlockfile("-u", lock_name) == 0
        lock.acquire()
        lock.release()
    finally:
        os.close(fd)


@needs_dotlockfile
def test_our_lock_makes_dotlockfile_fail(mbox: Path) -> None:
    lock_name = str(mbox) + ".lock"
    lock = MailboxLock(str(mbox), None, ("dotlock",))
    lock.acquire()
    try:
        assert run_dotlockfile("-r", "0", "-l", lock_name) != 0
        assert run_dotlockfile("-p", "-r", "0", "-l", lock_name) != 0  # pid check: we are alive
        assert run_dotlockfile("-r", "2", "-i", "0", "-l", lock_name) != 0  # fresh: not stale
        assert lock.verify()
    finally:
        lock.release()
    assert run_dotlockfile("-r", "0", "-l", lock_name) == 0
    assert run_dotlockfile("-u", lock_name) == 0


@needs_dotlockfile
def test_refresh_keeps_dotlockfile_from_breaking_an_idle_lock(mbox: Path) -> None:
    """liblockfile breaks a dotlock untouched for 5 minutes; we age ours instead of waiting."""
    lock_name = str(mbox) + ".lock"
    lock = MailboxLock(str(mbox), None, ("dotlock",))
    lock.acquire()
    try:
        long_ago = time.time() - 400
        os.utime(lock_name, (long_ago, long_ago))  # a long idle session without refresh ...
        assert lock.refresh()  # ... but the session refreshes
        assert os.stat(lock_name).st_mtime > time.time() - 60
        # With retries (it breaks stale locks between tries, here without sleeping) it still fails.
        assert run_dotlockfile("-r", "2", "-i", "0", "-l", lock_name) != 0
        assert lock.verify()
        # Without the refresh, dotlockfile breaks it, and verify() notices.
        os.utime(lock_name, (long_ago, long_ago))
        assert run_dotlockfile("-r", "2", "-i", "0", "-l", lock_name) == 0
        assert not lock.verify()
        assert not lock.refresh()  # touching our orphaned inode does not make it ours again
    finally:
        lock.release()
    assert Path(lock_name).exists()  # dotlockfile's lock is not ours to remove
    assert run_dotlockfile("-u", lock_name) == 0


def test_stale_dotlock_is_broken_with_a_log_line(mbox: Path) -> None:
    lock_name = Path(str(mbox) + ".lock")
    lock_name.write_bytes(b"99999\n")
    long_ago = time.time() - 30
    os.utime(lock_name, (long_ago, long_ago))
    messages: list[str] = []
    lock = MailboxLock(str(mbox), None, ("dotlock",), timeout=2, stale=10, log=messages.append)
    lock.acquire()
    try:
        assert lock_name.read_bytes() == our_content()
        assert any("stale" in m and str(lock_name) in m for m in messages)
    finally:
        lock.release()


def test_fresh_foreign_dotlock_is_not_broken(mbox: Path) -> None:
    lock_name = Path(str(mbox) + ".lock")
    lock_name.write_bytes(b"0\n")
    lock = MailboxLock(str(mbox), None, ("dotlock",), timeout=0.3, stale=10)
    with pytest.raises(LockTimeoutError):
        lock.acquire()
    assert lock_name.read_bytes() == b"0\n"


def boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise AssertionError("no btime in /proc/stat")


def dead_pid() -> int:
    """The pid of a process that ran here and is gone (reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant(lock_name: Path, content: bytes, mtime: float | None = None) -> None:
    lock_name.write_bytes(content)
    if mtime is not None:
        os.utime(lock_name, (mtime, mtime))


def take(mbox: Path, messages: list[str], timeout: float = 2) -> None:
    """Take and release the dotlock (stale_lock of ~30 years: only the pid or boot rule can break)."""
    lock = MailboxLock(str(mbox), None, ("dotlock",), timeout=timeout, stale=1e9, log=messages.append)
    lock.acquire()
    lock.release()


@pytest.mark.parametrize("form", ["ours", "dovecot"])
def test_dotlock_of_a_dead_process_here_is_stale_at_once(mbox: Path, form: str) -> None:
    """liblockfile's rule, for the locks that say where their pid is a pid: a lock whose process
    is not running is stale at once, whatever its age. Ours name this host, this boot and this
    pid namespace; Dovecot's `pid:host` (no newline) names this host."""
    pid = dead_pid()
    lock_name = Path(str(mbox) + ".lock")
    plant(lock_name, our_content(pid) if form == "ours" else b"%d:%s" % (pid, os.uname().nodename.encode()))
    messages: list[str] = []
    take(mbox, messages)
    assert any(f"process {pid} is not running" in m for m in messages), messages


def test_bare_pid_is_never_judged_by_our_pids(mbox: Path) -> None:
    """Review F2: liblockfile's `pid\n` says nothing of the pid namespace it was written in (a
    container's MDA on a shared spool directory): a pid not running here proves nothing, the
    lock holds until stale_lock (or this host's boot, below)."""
    lock_name = Path(str(mbox) + ".lock")
    bare = b"%d\n" % dead_pid()
    plant(lock_name, bare)
    with pytest.raises(LockTimeoutError):
        take(mbox, [], timeout=0.3)
    assert lock_name.read_bytes() == bare


def other_boot() -> str:
    """A boot id that is not this boot's."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ("1" if boot[0] == "0" else "0") + boot[1:]


def test_our_lock_of_an_earlier_boot_is_stale_at_once(mbox: Path) -> None:
    """Review F5: the boot id in our lock says exactly whether it was made during this boot; no
    clock is read. A lock of an earlier boot, whatever its time and even if its pid runs now (a
    reused pid), is stale at once on this local file system."""
    lock_name = Path(str(mbox) + ".lock")
    earlier = b"%d:%s:%s:%d\n" % (
        os.getppid(),
        os.uname().nodename.encode(),
        other_boot().encode(),
        os.stat("/proc/self/ns/pid").st_ino,
    )
    plant(lock_name, earlier)
    messages: list[str] = []
    take(mbox, messages)
    assert any("before this host's current boot" in m for m in messages), messages


def test_our_lock_of_another_pid_namespace_is_judged_by_age(mbox: Path) -> None:
    """A lock pop3d made in another pid namespace of this kernel (a container with our host
    name): its pid is no pid here, so it holds until stale_lock."""
    lock_name = Path(str(mbox) + ".lock")
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    theirs = b"%d:%s:%s:%d\n" % (
        dead_pid(),
        os.uname().nodename.encode(),
        boot.encode(),
        os.stat("/proc/self/ns/pid").st_ino + 1,
    )
    plant(lock_name, theirs)
    with pytest.raises(LockTimeoutError):
        take(mbox, [], timeout=0.3)
    assert lock_name.read_bytes() == theirs


def test_namesake_of_another_boot_on_a_shared_file_system(mbox: Path) -> None:
    """On a shared file system a lock naming our host but another boot is our earlier boot's
    only if it is older than this boot; a younger one is a host using our name (cloned VMs):
    judged by age only, with a log line."""
    lock_name = Path(str(mbox) + ".lock")
    theirs = b"%d:%s:%s:%d\n" % (
        dead_pid(),
        os.uname().nodename.encode(),
        other_boot().encode(),
        os.stat("/proc/self/ns/pid").st_ino,
    )
    for mtime, broken in ((None, False), (boot_time() - 1, True)):
        plant(lock_name, theirs, mtime)
        messages: list[str] = []
        lock = MailboxLock(str(mbox), None, ("dotlock",), timeout=0.3, stale=1e9, log=messages.append)
        lock._local = False  # as on NFS
        if broken:
            lock.acquire()
            lock.release()
            assert any("made before this host booted" in m for m in messages), messages
        else:
            with pytest.raises(LockTimeoutError):
                lock.acquire()
            assert lock_name.read_bytes() == theirs
            assert any("another host share this host name" in m for m in messages), messages


HELD_UNTIL_STDIN_CLOSES = textwrap.dedent(
    """
    import sys
    from pop3d.locking import MailboxLock
    lock = MailboxLock(sys.argv[1], None, ("dotlock",), 5.0)
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
    """
)


@needs_pid_namespaces
def test_our_live_lock_in_another_pid_namespace_is_respected(mbox: Path) -> None:
    """Review F2: a pop3d in a container of this kernel that shares our host name (no UTS
    namespace of its own) holds the lock; its pid is no process here. Before, the lock named
    this host and was broken at once by its pid; it names its pid namespace now."""
    holder = in_pid_namespace(f'exec "{sys.executable}" -c "$1" "$2"', HELD_UNTIL_STDIN_CLOSES, str(mbox))
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        lock_name = Path(str(mbox) + ".lock")
        held = lock_name.read_bytes()
        pid = int(held.split(b":")[0])
        assert not Path(f"/proc/{pid}").exists()  # no such process in this pid namespace
        messages: list[str] = []
        with pytest.raises(LockTimeoutError):
            take(mbox, messages, timeout=0.5)
        assert lock_name.read_bytes() == held and not messages
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        holder.stdout.close()


def test_our_live_lock_older_than_boot_is_respected(mbox: Path) -> None:
    """Review F5: when the clock is stepped forward after boot (a host without a real-time clock
    syncing with NTP), /proc/stat's btime moves forward with it, and a lock taken before the
    step looks older than boot. Ours are judged by boot id and pid, never by that time."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HELD_UNTIL_STDIN_CLOSES, str(mbox)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        lock_name = Path(str(mbox) + ".lock")
        plant(lock_name, lock_name.read_bytes(), boot_time() - 1)  # as after a clock step
        with pytest.raises(LockTimeoutError):
            take(mbox, [], timeout=0.3)
        assert lock_name.read_bytes() == our_content(holder.pid)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        holder.stdout.close()


def test_dotlock_of_a_zombie_is_stale(mbox: Path) -> None:
    """A session killed and not yet reaped is a zombie: kill(pid, 0) still succeeds, but it holds
    no lock any more (its fcntl locks are gone too)."""
    pid = os.fork()
    if pid == 0:  # take the lock and die without releasing it
        lock = MailboxLock(str(mbox), None, ("dotlock",))
        lock.acquire()
        os._exit(0)
    try:
        lock_name = Path(str(mbox) + ".lock")
        assert wait_for_zombie(pid)
        assert lock_name.read_bytes() == our_content(pid)
        messages: list[str] = []
        take(mbox, messages)
        assert any(f"process {pid} is not running" in m for m in messages), messages
    finally:
        os.waitpid(pid, 0)


def wait_for_zombie(pid: int) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
        if state == b"Z":
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("content", [b"", b"0\n", b"0", b"liblockfile"])
def test_dotlock_older_than_boot_is_stale(mbox: Path, content: bytes) -> None:
    """After a power cut the dotlock survives empty (its pid was never synced): older than this
    host's boot, no process that made it can still run, in any pid namespace of this kernel."""
    lock_name = Path(str(mbox) + ".lock")
    if content == b"liblockfile":
        content = b"%d\n" % os.getppid()  # a running pid proves nothing either way
    plant(lock_name, content, boot_time() - 1)
    messages: list[str] = []
    take(mbox, messages)
    assert any("before this host booted" in m for m in messages), messages


def test_live_holder_and_fresh_empty_lock_are_respected(mbox: Path) -> None:
    lock_name = Path(str(mbox) + ".lock")
    for content in (our_content(), b"%d\n" % os.getppid(), b""):
        plant(lock_name, content)
        with pytest.raises(LockTimeoutError):
            take(mbox, [], timeout=0.3)
        assert lock_name.read_bytes() == content


def test_dotlock_of_another_host_is_judged_by_age_only(mbox: Path) -> None:
    """NFS: another host's pid and boot mean nothing here. Its lock, even with a pid that is not
    running here and older than our boot, is broken only once untouched for stale_lock."""
    lock_name = Path(str(mbox) + ".lock")
    theirs = b"%d:other-host.example.org\n" % dead_pid()
    plant(lock_name, theirs, boot_time() - 1)
    with pytest.raises(LockTimeoutError):
        take(mbox, [], timeout=0.3)
    assert lock_name.read_bytes() == theirs
    messages: list[str] = []
    lock = MailboxLock(
        str(mbox), None, ("dotlock",), timeout=2, stale=time.time() - boot_time() - 60, log=messages.append
    )
    lock.acquire()
    lock.release()
    assert any("untouched for" in m for m in messages), messages


@needs_dotlockfile
def test_dotlockfile_breaks_the_lock_of_a_killed_session_and_we_break_its_by_age(mbox: Path) -> None:
    """Interop both ways with liblockfile's pid check (`dotlockfile -p`): it reads the pid at the
    start of our lock (atoi stops at the colon) and breaks it once that process is gone. The bare
    `pid\n` a `dotlockfile -p` leaves behind names no pid namespace: we break it by its age."""
    lock_name = str(mbox) + ".lock"
    pid = os.fork()
    if pid == 0:
        MailboxLock(str(mbox), None, ("dotlock",)).acquire()
        os.kill(os.getpid(), 9)  # SIGKILL with the lock held
    os.waitpid(pid, 0)
    assert Path(lock_name).read_bytes() == our_content(pid)
    assert run_dotlockfile("-p", "-r", "0", "-l", lock_name) == 0  # broken by liblockfile
    assert Path(lock_name).read_bytes() == b"%d\n" % os.getpid()  # -p: the caller's pid
    assert run_dotlockfile("-u", lock_name) == 0
    shell = subprocess.run(
        ["sh", "-c", f"{DOTLOCKFILE} -p -l {lock_name} && echo $$"], capture_output=True, timeout=30
    )
    assert shell.returncode == 0
    assert Path(lock_name).read_bytes() == shell.stdout  # the shell's pid; the shell has exited
    with pytest.raises(LockTimeoutError):
        take(mbox, [], timeout=0.3)
    plant(Path(lock_name), shell.stdout, time.time() - 30)
    messages: list[str] = []
    lock = MailboxLock(str(mbox), None, ("dotlock",), timeout=2, stale=10, log=messages.append)
    lock.acquire()
    lock.release()
    assert any("untouched for" in m for m in messages), messages


def test_verify_detects_a_broken_and_replaced_dotlock(mbox: Path) -> None:
    lock_name = Path(str(mbox) + ".lock")
    messages: list[str] = []
    lock = MailboxLock(str(mbox), None, ("dotlock",), log=messages.append)
    lock.acquire()
    assert lock.verify()
    lock_name.unlink()
    lock_name.write_bytes(our_content())  # same content, another file
    assert not lock.verify()
    lock.release()
    assert lock_name.exists()  # someone else's now: never removed by us
    assert any("replaced" in m for m in messages)


ORDER_WORKER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[4])
    from pop3d.locking import MailboxLock
    path, order, marker = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3]
    fd = os.open(path, os.O_RDWR)
    for _ in range(25):
        lock = MailboxLock(path, fd, order, timeout=30)
        lock.acquire()
        m = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)   # fails if both hold the locks
        time.sleep(0.002)
        os.close(m)
        os.unlink(marker)
        lock.release()
    """
)


def test_opposite_lock_orders_neither_deadlock_nor_overlap(mbox: Path) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    marker = str(mbox.parent / "inside")
    procs = [
        subprocess.Popen([sys.executable, "-c", ORDER_WORKER, str(mbox), order, marker, root])
        for order in ("dotlock,fcntl", "fcntl,dotlock", "dotlock,fcntl,flock", "flock,fcntl,dotlock")
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    assert leftovers(mbox.parent, {"alice"}) == set()


def test_no_write_access_to_the_spool_directory_is_a_clear_error(tmp_path: Path) -> None:
    spool_dir = tmp_path / "mail"
    spool_dir.mkdir()
    (spool_dir / "alice").write_bytes(b"")
    spool_dir.chmod(0o755)
    path = str(spool_dir / "alice")
    if not IS_ROOT:
        spool_dir.chmod(0o555)
        try:
            with pytest.raises(LockPermissionError, match="group"):
                MailboxLock(path, None, ("dotlock",), timeout=0.2).acquire()
        finally:
            spool_dir.chmod(0o755)
        return
    # As root, prove it in a child that became `nobody` (root ignores directory permissions).
    tmp_path.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                MailboxLock(path, None, ("dotlock",), timeout=0.2).acquire()
            except LockPermissionError as e:
                code = 0 if "group" in str(e) else 2
            except LockError:
                code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.listdir(spool_dir) == ["alice"]


# ---------------------------------------------------------------- session lock (issue 17)

SESSION_HOLDER = textwrap.dedent(
    """
    import sys
    from pop3d.locking import SessionLock
    lock = SessionLock(sys.argv[1], timeout=0)
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()          # hold until the test closes our stdin (or kills us)
    lock.release()
    """
)


def session_holder(mailbox: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SESSION_HOLDER, str(mailbox)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
    return proc


def test_session_lock_excludes_sessions_but_no_mda_lock(mbox: Path) -> None:
    from pop3d.locking import SessionLock
    from pop3d.names import session_lock as session_lock_path

    holder = session_holder(mbox)
    try:
        assert Path(session_lock_path(str(mbox))).parent == mbox.parent
        assert Path(session_lock_path(str(mbox))).name == ".pop3d-session.alice"
        with pytest.raises(LockTimeoutError):
            SessionLock(str(mbox), timeout=0.3).acquire()
        # What an MDA takes is free: dotlock, fcntl and flock on the mailbox.
        fd = os.open(mbox, os.O_RDWR)
        try:
            with MailboxLock(str(mbox), fd, ("dotlock", "fcntl", "flock"), timeout=0):
                pass
        finally:
            os.close(fd)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=10) == 0
        holder.stdout.close()  # type: ignore[union-attr]
    assert leftovers(mbox.parent, {"alice"}) == set()  # released: the file is gone


def test_session_lock_dies_with_a_killed_session(mbox: Path) -> None:
    """SIGKILL leaves at most an empty unlocked file: the next session locks it at once."""
    from pop3d.locking import SessionLock

    holder = session_holder(mbox)
    holder.kill()
    holder.wait(timeout=10)
    holder.stdout.close()  # type: ignore[union-attr]
    holder.stdin.close()  # type: ignore[union-attr]
    assert leftovers(mbox.parent, {"alice"}) == {".pop3d-session.alice"}
    lock = SessionLock(str(mbox), timeout=0)
    lock.acquire()  # no wait, no stale state to judge
    lock.release()
    assert leftovers(mbox.parent, {"alice"}) == set()


@pytest.mark.parametrize("kind", ["mail", "symlink", "directory"])
def test_session_lock_refuses_what_is_not_its_file(mbox: Path, kind: str) -> None:
    from pop3d.locking import SessionLock
    from pop3d.names import session_lock as session_lock_path

    name = Path(session_lock_path(str(mbox)))
    if kind == "mail":
        name.write_bytes(b"From x Thu Nov 26 10:00:00 2026\n\nnot a lock\n\n")
    elif kind == "symlink":
        name.symlink_to(mbox)
    else:
        name.mkdir()
    with pytest.raises(LockError):
        SessionLock(str(mbox), timeout=0).acquire()
    assert name.is_symlink() if kind == "symlink" else name.exists()  # left alone
    if kind == "mail":
        assert name.read_bytes().endswith(b"not a lock\n\n")
