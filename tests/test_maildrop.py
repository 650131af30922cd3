"""pop3d.maildrop: safe open, locking against real processes and MDAs, the crash-safe update.

Every expectation is an exact byte string built from the generated messages, never from the
scanner: after an update the spool must be the kept raw messages (From_ line and separator
included) in order, plus whatever was appended; after a crash and recovery it must be either
that or the untouched original, nothing in between.
"""

from __future__ import annotations

import errno
import os
import pwd
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dotlock_content, wait_for

from pop3d import names as pop3d_names
from pop3d import update as update_module
from pop3d.locking import MailboxLock
from pop3d.maildrop import (
    Maildrop,
    MaildropChangedError,
    MaildropFormatError,
    MaildropInUseError,
    MaildropPermError,
    MaildropTempError,
)
from pop3d.update import STOP_AFTER_ENV

IS_ROOT = os.geteuid() == 0
DOTLOCKFILE = shutil.which("dotlockfile")
PROCMAIL = shutil.which("procmail")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")
STEPS = range(1, 9)  # the update's step boundaries (docs/UPDATE.md)
# mda_locks: the update and its crash safety must be the same whichever way the locks are held.
MODES = ["session", "brief"]


# ------------------------------------------------------------------ spool material


def make_messages(rng: random.Random, count: int, big: int = 0) -> list[bytes]:
    """Raw mbox messages as MDAs write them: From_ line, headers, body, one blank separator.

    Varied: LF and CRLF storage, `>From ` and unquoted `From ` body lines (never after a blank
    line), dot lines, empty bodies, 8-bit bytes, a few large ones.
    """
    messages = []
    for i in range(count):
        crlf = rng.random() < 0.15
        nl = b"\r\n" if crlf else b"\n"
        head = [b"From: sender%d@example.org" % i, b"Subject: message %d %x" % (i, rng.getrandbits(32))]
        lines: list[bytes] = []
        n_lines = rng.choice([0, 1, 3, 20, 200, 2000]) if i >= big else 30000
        for k in range(n_lines):
            r = rng.random()
            if r < 0.03:
                line = b">From quoted %d" % k
            elif r < 0.05 and lines and lines[-1]:
                line = b"From unquoted, not after a blank line %d" % k
            elif r < 0.08:
                line = b"." * rng.randint(1, 3) + b"dot line"
            elif r < 0.12:
                line = b""
            elif r < 0.14:
                line = bytes(rng.randrange(128, 256) for _ in range(20))
            else:
                line = b"line %d of message %d: %s" % (k, i, b"x" * rng.randint(0, 70))
            if line.startswith(b"From ") and lines and not lines[-1]:
                line = b">" + line
            lines.append(line)
        body = b"".join(line + nl for line in lines)
        messages.append(
            b"From sender%d@example.org Thu Nov 26 10:%02d:%02d 2026\n" % (i, i % 60, i % 59)
            + b"".join(h + nl for h in head)
            + nl
            + body
            + nl
        )
    return messages


def expected(messages: list[bytes], deleted: set[int] | frozenset[int]) -> bytes:
    return b"".join(m for i, m in enumerate(messages) if i not in deleted)


def write_spool(path: Path, data: bytes, mode: int = 0o600) -> None:
    with open(path, "wb") as f:
        f.write(data)
    path.chmod(mode)


def names(directory: Path) -> set[str]:
    return set(os.listdir(directory))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "mail"
    directory.mkdir()
    return directory


@pytest.fixture
def small(spool_dir: Path) -> tuple[Path, list[bytes]]:
    messages = make_messages(random.Random(7), 12)
    path = spool_dir / "alice"
    write_spool(path, b"".join(messages))
    return path, messages


# ----------------------------------------------------------------------- open


def test_open_lists_and_streams_messages(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    with Maildrop.open(str(path)) as md:
        assert md.listing.count == len(messages)
        assert Path(str(path) + ".lock").read_bytes() == dotlock_content(os.getpid())
        for i, raw in enumerate(messages):
            sent = b"".join(md.iter_message(i))
            assert len(sent) == md.listing.size(i)
            subject = raw.split(b"\n")[2].rstrip(b"\r")
            assert subject.startswith(b"Subject: ") and subject in sent
    assert names(path.parent) == {"alice"}


def test_missing_spool_is_an_empty_locked_maildrop(spool_dir: Path) -> None:
    path = spool_dir / "alice"
    md = Maildrop.open(str(path))
    assert md.listing.count == 0
    assert names(spool_dir) == {"alice.lock", ".pop3d-session.alice"}  # locked; no spool created
    md.commit(frozenset())
    md.close()
    assert names(spool_dir) == set()


def test_empty_spool_is_an_empty_maildrop(spool_dir: Path) -> None:
    path = spool_dir / "alice"
    write_spool(path, b"")
    with Maildrop.open(str(path)) as md:
        assert md.listing.count == 0


def test_not_an_mbox_is_a_format_error(spool_dir: Path) -> None:
    path = spool_dir / "alice"
    write_spool(path, b"Subject: no From_ line\n\nhello\n")
    with pytest.raises(MaildropFormatError):
        Maildrop.open(str(path))
    assert names(spool_dir) == {"alice"}  # lock released


def test_symlink_hardlink_directory_are_refused(small: tuple[Path, list[bytes]]) -> None:
    path, _ = small
    directory = path.parent
    (directory / "link").symlink_to(path)
    with pytest.raises(MaildropPermError, match="symbolic"):
        Maildrop.open(str(directory / "link"))
    os.link(path, directory / "hard")
    with pytest.raises(MaildropPermError, match="hard link"):
        Maildrop.open(str(path))
    os.unlink(directory / "hard")
    (directory / "dir").mkdir()
    with pytest.raises(MaildropPermError, match="directory"):
        Maildrop.open(str(directory / "dir"))
    assert names(directory) == {"alice", "link", "dir"}  # no lock left behind


def test_fifo_is_refused_without_blocking(spool_dir: Path) -> None:
    fifo = spool_dir / "alice"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(MaildropPermError, match="regular"):
        Maildrop.open(str(fifo))
    assert time.monotonic() - started < 2


def test_wrong_owner_is_refused(small: tuple[Path, list[bytes]]) -> None:
    path, _ = small
    with pytest.raises(MaildropPermError, match="owned by"):
        Maildrop.open(str(path), expected_uid=os.geteuid() + 1)
    with Maildrop.open(str(path), expected_uid=os.geteuid()) as md:
        assert md.listing.count == 12


# ---------------------------------------------------------------- in use / locks


HOLD_FCNTL = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_fcntl_lock_of_another_process_means_in_use(small: tuple[Path, list[bytes]]) -> None:
    path, _ = small
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FCNTL, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        with pytest.raises(MaildropInUseError):
            Maildrop.open(str(path), lock_timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 3
        assert names(path.parent) == {"alice"}
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()  # type: ignore[union-attr]
    with Maildrop.open(str(path), lock_timeout=0.5):
        pass


@pytest.mark.skipif(DOTLOCKFILE is None, reason="dotlockfile not installed (liblockfile-bin)")
def test_dotlockfile_lock_means_in_use_and_ours_stops_dotlockfile(small: tuple[Path, list[bytes]]) -> None:
    path, _ = small
    lock = str(path) + ".lock"
    assert subprocess.run([DOTLOCKFILE, "-l", lock], timeout=30).returncode == 0  # type: ignore[list-item]
    with pytest.raises(MaildropInUseError):
        Maildrop.open(str(path), lock_timeout=0.5)
    assert subprocess.run([DOTLOCKFILE, "-u", lock], timeout=30).returncode == 0  # type: ignore[list-item]
    with Maildrop.open(str(path)) as md:
        result = subprocess.run([DOTLOCKFILE, "-r", "0", "-l", lock], timeout=30)  # type: ignore[list-item]
        assert result.returncode != 0
        assert md.refresh_lock()


def test_second_maildrop_on_the_same_spool_is_in_use(small: tuple[Path, list[bytes]]) -> None:
    path, _ = small
    with Maildrop.open(str(path)), pytest.raises(MaildropInUseError):
        Maildrop.open(str(path), lock_timeout=0.3)


# ------------------------------------------------------------ mda_locks = brief


def test_brief_holds_only_its_session_lock_between_scan_and_update(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    md = Maildrop.open(str(path), mda_locks="brief", lock_timeout=0.5)
    try:
        assert names(path.parent) == {"alice", ".pop3d-session.alice"}  # no dotlock
        holder = subprocess.Popen(  # an fcntl lock is free at once
            [sys.executable, "-c", HOLD_FCNTL, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        # ... and the update waits for it no longer than the lock timeout: nothing written.
        with pytest.raises(MaildropInUseError):
            md.commit(frozenset({0}))
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()
    finally:
        md.close()
    assert path.read_bytes() == b"".join(messages)
    assert names(path.parent) == {"alice"}


def test_brief_second_open_is_in_use_and_the_first_still_updates(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    with Maildrop.open(str(path), mda_locks="brief") as md:
        with pytest.raises(MaildropInUseError):
            Maildrop.open(str(path), lock_timeout=0.3, mda_locks="brief")
        md.commit(frozenset({2}))
    assert path.read_bytes() == expected(messages, {2})


@pytest.mark.parametrize("settled", [True, False])
def test_brief_verify_sees_a_rewrite_right_after_the_scan(
    spool_dir: Path, settled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify() skips its reads while the spool is in the state the scan saw, but only when the
    clock had passed that state's ctime: else a rewrite in the same tick could keep the state."""
    from pop3d import maildrop as maildrop_module

    messages = [
        b"From a@b Thu Nov 26 10:00:0%d 2026\nSubject: %d\n\nbody %d\n\n" % (i, i, i) for i in range(4)
    ]
    path = spool_dir / "alice"
    write_spool(path, b"".join(messages))
    ctime = path.stat().st_ctime_ns
    if settled:
        assert wait_for(
            lambda: maildrop_module._settled(maildrop_module._ctime_clock(), ctime), interval=0.001
        )
    else:
        monkeypatch.setattr(maildrop_module, "_ctime_clock", lambda: ctime)  # still that tick
    with Maildrop.open(str(path), mda_locks="brief") as md:
        assert (md._quiet is not None) == settled  # the shortcut is armed only when it is safe
        md.verify(1)
        with open(path, "r+b") as f:  # messages 2 and 3 swap: same sizes, same offsets
            f.write(b"".join([messages[0], messages[2], messages[1], messages[3]]))
        with pytest.raises(MaildropChangedError):
            md.verify(1)
        md.verify(0)  # untouched


def test_brief_update_refuses_a_journal_that_appeared(small: tuple[Path, list[bytes]]) -> None:
    """Only a crashed update of another process (a session-mode one, during a switch of modes)
    can leave a journal during a brief session: never replace it; the next open recovers."""
    path, messages = small
    md = Maildrop.open(str(path), mda_locks="brief")
    journal = Path(pop3d_names.journal(str(path)))
    journal.write_bytes(b"a committed journal")
    with pytest.raises(MaildropTempError, match="journal"):
        md.commit(frozenset({1}))
    assert path.read_bytes() == b"".join(messages) and journal.read_bytes() == b"a committed journal"


class NfsAttributeCache:
    """What these tests need of an NFS client's attribute cache: once `hold()` is called (or, with
    `at_next_open`, from the spool's next open on), fstat of the spool's inode reports the status
    it had then, until the spool is opened again by path (close-to-open consistency revalidates
    it; no fcntl lock is taken: `locks = dotlock`)."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, at_next_open: bool = False) -> None:
        self.path = str(path)
        self.real_fstat, self.real_open = os.fstat, os.open
        self.held: os.stat_result | None = None
        self.at_next_open = at_next_open
        self.opened = threading.Event()
        monkeypatch.setattr(os, "fstat", self.fstat)
        monkeypatch.setattr(os, "open", self.open)

    def hold(self) -> None:
        self.held = os.stat(self.path)

    def fstat(self, fd: int) -> os.stat_result:
        st = self.real_fstat(fd)
        held = self.held
        return held if held is not None and (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino) else st

    def open(self, name: object, flags: int, *args: object, **kwargs: object) -> int:
        fd = self.real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]
        if os.fspath(name) == self.path:  # type: ignore[call-overload]
            self.held = self.real_fstat(fd) if self.at_next_open else None
            self.at_next_open = False
            self.opened.set()
        return fd


APPENDED = b"From other-host Thu Nov 26 11:00:00 2026\nSubject: appended\n\nnew\n\n"


@pytest.mark.parametrize("deleted", [{0}, {3, 4}])
def test_brief_update_sizes_the_spool_through_a_fresh_open(
    small: tuple[Path, list[bytes]], deleted: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review F6. On NFS a descriptor open since login may report the client's cached
    attributes: Linux revalidates them only at an open (close-to-open) or an fcntl lock. With
    `locks = dotlock` alone, a brief session's update sized the spool through the descriptor it
    had since login, so another host's append was cut off. It opens the spool again now."""
    path, messages = small
    md = Maildrop.open(str(path), locks=("dotlock",), mda_locks="brief")
    NfsAttributeCache(path, monkeypatch).hold()
    with open(path, "ab") as f:  # another host's MDA delivers
        f.write(APPENDED)
    md.commit(frozenset(deleted))
    monkeypatch.undo()
    assert path.read_bytes() == expected(messages, deleted) + APPENDED
    assert names(path.parent) == {"alice"}


def test_login_sizes_the_spool_through_an_open_made_under_the_dotlock(
    small: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same at login (either mode): the spool is opened before the locks are taken (fcntl
    needs a descriptor), and pop3d then waits for the dotlock of an MDA that is appending. The
    status cached at that first open predates the append: the listing missed it and the update
    of a short session cut it off. The spool is opened again once the locks are held."""
    path, messages = small
    mda = MailboxLock(str(path), None, ("dotlock",))
    mda.acquire()
    cache = NfsAttributeCache(path, monkeypatch, at_next_open=True)
    opened: list[Maildrop] = []
    login = threading.Thread(
        target=lambda: opened.append(Maildrop.open(str(path), locks=("dotlock",), lock_timeout=20))
    )
    login.start()
    try:
        assert cache.opened.wait(20)  # pop3d has the spool open and waits for the dotlock
        with open(path, "ab") as f:
            f.write(APPENDED)
    finally:
        mda.release()
        login.join(30)
    md = opened[0]
    assert md.listing.count == len(messages) + 1
    md.commit(frozenset({0}))
    monkeypatch.undo()
    assert path.read_bytes() == expected(messages, {0}) + APPENDED


# -------------------------------------------------------------------- update


@pytest.mark.parametrize(
    "pattern", ["first", "last", "all", "middle", "every-other", "oldest-half", "all-but-last", "random"]
)
def test_update_keeps_exactly_the_kept_bytes(spool_dir: Path, pattern: str) -> None:
    rng = random.Random(pattern)
    messages = make_messages(rng, 40, big=1)
    n = len(messages)
    deleted = {
        "first": {0},
        "last": {n - 1},
        "all": set(range(n)),
        "middle": {17, 18, 25},
        "every-other": set(range(0, n, 2)),
        "oldest-half": set(range(n // 2)),
        "all-but-last": set(range(n - 1)),
        "random": {i for i in range(n) if rng.random() < 0.3},
    }[pattern]
    path = spool_dir / "alice"
    write_spool(path, b"".join(messages), mode=0o620)
    if IS_ROOT:
        os.chown(path, pwd.getpwnam("nobody").pw_uid, 8)
    before = os.stat(path)
    md = Maildrop.open(str(path))
    md.commit(frozenset(deleted))
    after = os.stat(path)
    assert path.read_bytes() == expected(messages, deleted)
    assert (after.st_ino, after.st_uid, after.st_gid, after.st_mode) == (
        before.st_ino,
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert names(spool_dir) == {"alice"}  # no lock, journal or temp file left
    with Maildrop.open(str(path)) as again:
        assert again.listing.count == n - len(deleted)


def test_deleting_nothing_writes_nothing(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    old = time.time() - 1000
    os.utime(path, (old, old))
    before = os.stat(path)
    Maildrop.open(str(path)).commit(frozenset())
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (
        before.st_mtime_ns,
        before.st_ctime_ns,
        before.st_size,
    )
    assert path.read_bytes() == b"".join(messages)


def test_close_without_commit_changes_nothing(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    md = Maildrop.open(str(path))
    md.close()
    md.close()
    with pytest.raises(MaildropTempError):
        md.commit(frozenset({0}))
    assert path.read_bytes() == b"".join(messages)
    assert names(path.parent) == {"alice"}


def test_mail_appended_by_a_non_locking_writer_is_kept(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    md = Maildrop.open(str(path))
    new = b"From late@example.org Thu Nov 26 11:00:00 2026\nSubject: late\n\narrived mid-session\n\n"
    with open(path, "ab") as f:  # ignores every lock, like a careless delivery agent
        f.write(new)
    md.commit(frozenset({0, 5}))
    assert path.read_bytes() == expected(messages, {0, 5}) + new
    assert names(path.parent) == {"alice"}


def test_spool_truncated_by_someone_else_aborts_without_writing(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    md = Maildrop.open(str(path))
    os.truncate(path, len(messages[0]) + len(messages[1]))
    shortened = path.read_bytes()
    with pytest.raises(MaildropTempError, match="shrank"):
        md.commit(frozenset({0}))
    assert path.read_bytes() == shortened
    assert names(path.parent) == {"alice"}


def test_spool_rewritten_in_place_aborts_without_writing(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    md = Maildrop.open(str(path))
    offset = sum(len(m) for m in messages[:6])
    with open(path, "r+b") as f:  # same size, a From_ line moved away: the scan no longer holds
        f.seek(offset)
        f.write(b"X")
    changed = path.read_bytes()
    with pytest.raises(MaildropTempError, match="rewritten"):
        md.commit(frozenset({2}))
    assert path.read_bytes() == changed


@pytest.mark.parametrize(
    "deleted, moved",
    [
        (set(range(6)), 11),  # a kept message the move only references (not journalled)
        ({0}, 11),  # the last kept message, read by the journal pass
        ({9, 10, 11}, 9),  # truncate only: the From_ line the spool is cut at
    ],
)
def test_moved_from_line_aborts_without_writing(
    small: tuple[Path, list[bytes]], deleted: set[int], moved: int
) -> None:
    """The From_ lines an update relies on are checked before anything is written."""
    path, messages = small
    md = Maildrop.open(str(path))
    offset = sum(len(m) for m in messages[:moved])
    with open(path, "r+b") as f:  # same size, the From_ line is gone: the scan no longer holds
        f.seek(offset)
        f.write(b"X")
    changed = path.read_bytes()
    with pytest.raises(MaildropTempError, match="rewritten"):
        md.commit(frozenset(deleted))
    assert path.read_bytes() == changed
    assert names(path.parent) == {"alice"}  # the temporary journal is gone too


def test_spool_replaced_by_rename_aborts(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    md = Maildrop.open(str(path))
    other = path.parent / "other"
    write_spool(other, b"".join(messages))
    os.rename(other, path)
    with pytest.raises(MaildropTempError, match="replaced"):
        md.commit(frozenset({0}))
    assert path.read_bytes() == b"".join(messages)


def test_broken_dotlock_aborts_the_update(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    md = Maildrop.open(str(path))
    lock = Path(str(path) + ".lock")
    lock.unlink()  # broken by an impatient MDA, which then took the lock itself
    lock.write_bytes(b"0\n")
    assert not md.refresh_lock()
    with pytest.raises(MaildropTempError, match="dotlock"):
        md.commit(frozenset({0}))
    assert path.read_bytes() == b"".join(messages)
    assert lock.read_bytes() == b"0\n"  # not ours: left in place


def written_bytes_of_commit(path: Path, deleted: set[int]) -> int:
    """Bytes a child process passes to write(2) during commit (from /proc/self/io wchar)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            md = Maildrop.open(str(path))

            def wchar() -> int:
                with open("/proc/self/io", "rb") as f:
                    return int(dict(line.split(b": ") for line in f.read().splitlines())[b"wchar"])

            before = wchar()
            md.commit(frozenset(deleted))
            os.write(w, b"%d" % (wchar() - before))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return int(data)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_update_cost_is_proportional_to_the_moved_tail(spool_dir: Path) -> None:
    messages = make_messages(random.Random(3), 60, big=2)
    data = b"".join(messages)
    path = spool_dir / "alice"
    n = len(messages)
    tail = len(data) - len(messages[0])  # bytes kept after the first deleted message
    cases = {
        "first": ({0}, 2 * tail),  # journal + move
        "oldest-half": (set(range(n // 2)), len(expected(messages, set(range(n // 2))))),  # move only
        "last": ({n - 1}, 0),  # truncate only
        "all": (set(range(n)), 0),
    }
    for deleted, bound in cases.values():
        write_spool(path, data)
        assert written_bytes_of_commit(path, deleted) <= bound + 65536
        assert path.read_bytes() == expected(messages, deleted)


# ----------------------------------------------------------------- disk full


def commit_in_child(path: Path, deleted: set[int], fsize: int | None = None) -> str:
    """Open and commit in a forked child; returns "ok", "temp" (MaildropTempError) or "error"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = b"error"
        try:
            os.close(r)
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
            md = Maildrop.open(str(path))
            try:
                md.commit(frozenset(deleted))
                result = b"ok"
            except MaildropTempError:
                result = b"temp"
        except BaseException:
            traceback.print_exc()
        finally:
            os.write(w, result)
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_file_size_limit_during_update_leaves_spool_identical(spool_dir: Path) -> None:
    messages = make_messages(random.Random(11), 50, big=2)
    data = b"".join(messages)
    path = spool_dir / "alice"
    write_spool(path, data)
    assert commit_in_child(path, {0}, fsize=128 * 1024) == "temp"  # EFBIG on the journal
    assert path.read_bytes() == data
    assert names(spool_dir) == {"alice"}
    assert commit_in_child(path, {0}) == "ok"  # and without the limit it works
    assert path.read_bytes() == expected(messages, {0})


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if not IS_ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mountpoint)])
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_disk_full_during_update_leaves_spool_identical(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = make_messages(random.Random(5), 40, big=1)
    data = b"".join(messages)
    assert 2_000_000 < len(data) < 2_900_000, len(data)
    path = small_fs / "alice"
    write_spool(path, data)
    # The journal for DELE 1 needs ~the whole spool: the free-space check refuses it.
    with pytest.raises(MaildropTempError, match="nothing deleted"):
        Maildrop.open(str(path)).commit(frozenset({1}))
    assert path.read_bytes() == data and names(small_fs) == {"alice"}
    # Past a lying free-space check, the reservation itself fails with ENOSPC.
    real = os.fstatvfs
    plenty = os.statvfs_result((4096, 4096, 1 << 30, 1 << 30, 1 << 30, 1 << 20, 1 << 20, 1 << 20, 0, 255))
    monkeypatch.setattr(update_module.os, "fstatvfs", lambda fd: plenty)
    with pytest.raises(MaildropTempError, match="space"):
        Maildrop.open(str(path)).commit(frozenset({1}))
    monkeypatch.setattr(update_module.os, "fstatvfs", real)
    assert path.read_bytes() == data and names(small_fs) == {"alice"}
    # Deleting the older half moves the rest without journalling it: that fits.
    deleted = set(range(len(messages) // 2 + 5))
    Maildrop.open(str(path)).commit(frozenset(deleted))
    assert path.read_bytes() == expected(messages, deleted)


def test_journal_write_error_mid_pass_aborts_cleanly(
    spool_dir: Path, crash_spool: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where posix_fallocate reserves nothing, ENOSPC comes from a journal write in the middle
    of the pass (its CRC helper thread still running): nothing deleted, nothing left behind."""
    original = b"".join(crash_spool)
    path = spool_dir / "alice"
    write_spool(path, original)
    real = update_module._pwrite_all
    calls: list[int] = []

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(update_module, "_pwrite_all", pwrite)
    threads = len(os.listdir("/proc/self/task"))
    with pytest.raises(MaildropTempError, match="nothing deleted"):
        Maildrop.open(str(path)).commit(frozenset({0}))
    assert len(calls) == 3
    assert path.read_bytes() == original and names(spool_dir) == {"alice"}
    deadline = time.monotonic() + 10  # the helper thread has ended (it may take a moment to exit)
    while len(os.listdir("/proc/self/task")) > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) <= threads
    monkeypatch.undo()
    Maildrop.open(str(path)).commit(frozenset({0}))  # and then it works
    assert path.read_bytes() == expected(crash_spool, {0})


# ----------------------------------------------------------- crashes and recovery


def start_committer(
    path: Path, deleted: set[int], stop_after: int | None = None, mda_locks: str = "session"
) -> tuple[int, int]:
    """Fork a child that opens the maildrop, reports "o", commits, reports "c"; (pid, pipe).

    With mda_locks="brief" the child holds no MDA lock between the two: the commit takes them."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            if stop_after is not None:
                os.environ[STOP_AFTER_ENV] = str(stop_after)
            # stale_lock=0: the dotlock a SIGKILLed predecessor left behind is broken at once.
            md = Maildrop.open(str(path), lock_timeout=10, stale_lock=0, mda_locks=mda_locks)
            os.write(w, b"o")
            md.commit(frozenset(deleted))
            os.write(w, b"c")
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def finish(pid: int, r: int) -> tuple[int, bytes]:
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    return os.waitstatus_to_exitcode(status), report


def recover(path: Path, stop_after: int | None = None, mda_locks: str = "session") -> tuple[int, list[str]]:
    """Open (and so recover) the maildrop in the test process, or in a child stopped at a step.

    (In brief mode this also removes the session lock file a killed session left behind.)"""
    if stop_after is not None:
        pid, r = start_committer(path, set(), stop_after, mda_locks)
        code, _ = finish(pid, r)
        return code, []
    logs: list[str] = []
    Maildrop.open(str(path), lock_timeout=10, stale_lock=0, log=logs.append, mda_locks=mda_locks).close()
    return 0, logs


def check_recovered(path: Path, original: bytes, updated: bytes, *, must_be_updated: bool | None) -> bytes:
    """The spool is `original` or `updated` as required, and nothing else is left beside it: no
    journal, temporary or lock file (the dotlock's file is anonymous until it is linked, so even
    a session killed inside that step leaves none)."""
    data = path.read_bytes()
    if must_be_updated is True:
        assert data == updated
    elif must_be_updated is False:
        assert data == original
    else:
        assert data in (original, updated)
    assert names(path.parent) - {path.name} == set()
    return data


def deletion_patterns(rng: random.Random, n: int) -> list[set[int]]:
    return [
        {0},
        {1, 2},
        set(range(n // 2)),  # old mail expired: the tail mostly moves by reference
        {n - 1},  # truncate only
        {n // 3, n - 2},
        {i for i in range(n) if rng.random() < 0.3},
    ]


@pytest.fixture(scope="module")
def crash_spool() -> list[bytes]:
    messages = make_messages(random.Random(2026), 90, big=3)
    assert 3_000_000 < sum(map(len, messages)) < 9_000_000  # several MB
    return messages


@pytest.mark.parametrize("mda_locks", MODES)
@pytest.mark.parametrize("step", STEPS)
def test_stop_at_each_step_then_recover(
    spool_dir: Path, crash_spool: list[bytes], step: int, mda_locks: str
) -> None:
    messages = crash_spool
    original = b"".join(messages)
    path = spool_dir / "alice"
    for deleted in deletion_patterns(random.Random(step), len(messages)):
        write_spool(path, original)
        code, report = finish(*start_committer(path, deleted, stop_after=step, mda_locks=mda_locks))
        finished = report == b"oc"
        # Steps 1-8 exist only when a journal is written; a truncate-only update has step 7 alone.
        assert code == (0 if finished else 137)
        recover(path, mda_locks=mda_locks)
        updated = expected(messages, deleted)
        check_recovered(path, original, updated, must_be_updated=finished or step >= 3)


@pytest.mark.parametrize("step", [3, 4, 5, 6, 7])
def test_mail_delivered_between_crash_and_recovery_is_kept(
    spool_dir: Path, crash_spool: list[bytes], step: int
) -> None:
    """After a crash the fcntl lock is gone: an fcntl-only MDA appends before anyone recovers."""
    messages = crash_spool
    path = spool_dir / "alice"
    new = b"From mda@example.org Thu Nov 26 12:00:00 2026\nSubject: meanwhile\n\n" + b"x" * 300_000 + b"\n\n"
    for deleted in ({0}, {3, 4, 7}, set(range(50))):
        # Recovery moves the new mail with a chained update (steps 1-3 are the chain's); let it
        # die there too before the final recovery.
        for nested in (None, 1, 2, 3):
            write_spool(path, b"".join(messages))
            code, _ = finish(*start_committer(path, deleted, stop_after=step))
            assert code == 137
            with open(path, "ab") as f:
                f.write(new)
            if nested is not None:
                assert recover(path, stop_after=nested)[0] in (0, 137)
            recover(path)
            assert path.read_bytes() == expected(messages, deleted) + new
            assert names(spool_dir) == {"alice"}


def test_mail_appended_while_the_update_runs_is_kept(
    small: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer ignoring the locks appends after the size check: the update moves it too."""
    path, messages = small
    new = b"From racer@example.org Thu Nov 26 14:00:00 2026\nSubject: racing\n\nhi\n\n"
    real_step = update_module._step
    appended = []

    def step(number: int) -> None:
        if number == 5 and not appended:  # the move has begun
            appended.append(True)
            with open(path, "ab") as f:
                f.write(new)
        real_step(number)

    monkeypatch.setattr(update_module, "_step", step)
    logs: list[str] = []
    Maildrop.open(str(path), log=logs.append).commit(frozenset({1, 2}))
    assert appended and path.read_bytes() == expected(messages, {1, 2}) + new
    assert names(path.parent) == {"alice"}
    assert any("appended during the update" in line for line in logs)


@pytest.mark.parametrize("mda_locks", MODES)
@pytest.mark.parametrize("first_stop", [3, 5, 6])
def test_crash_during_recovery_then_recover(
    spool_dir: Path, crash_spool: list[bytes], first_stop: int, mda_locks: str
) -> None:
    messages = crash_spool
    path = spool_dir / "alice"
    deleted = {1, 40, 41, 60}
    updated = expected(messages, deleted)
    for second_stop in (4, 5, 6, 7, 8):
        write_spool(path, b"".join(messages))
        assert finish(*start_committer(path, deleted, stop_after=first_stop, mda_locks=mda_locks))[0] == 137
        code, _ = recover(path, stop_after=second_stop, mda_locks=mda_locks)  # the recovering open dies too
        assert code in (0, 137)
        recover(path, mda_locks=mda_locks)
        check_recovered(path, b"", updated, must_be_updated=True)


@pytest.mark.parametrize("mda_locks", MODES)
def test_sigkill_at_random_instants_loses_nothing(
    spool_dir: Path, crash_spool: list[bytes], mda_locks: str
) -> None:
    """At least 200 trials: SIGKILL a committing process at a random instant, recover, compare.

    In brief mode the instants include the commit taking the MDA locks again and its checks."""
    messages = crash_spool
    original = b"".join(messages)
    n = len(messages)
    path = spool_dir / "alice"
    # Calibrate: how long does the largest update (DELE 1) take here?
    write_spool(path, original)
    pid, r = start_committer(path, {0}, mda_locks=mda_locks)
    assert os.read(r, 1) == b"o"
    started = time.monotonic()
    code, report = finish(pid, r)
    longest = time.monotonic() - started
    assert code == 0 and report == b"c"
    rng = random.Random(20261126)
    outcomes = {"original": 0, "updated": 0, "recovered": 0, "finished": 0}
    budget = time.monotonic() + 45 / len(MODES)
    trials = 0
    while trials < 200 or (time.monotonic() < budget and trials < 400):
        trials += 1
        deleted = rng.choice([*deletion_patterns(rng, n), {i for i in range(n) if rng.random() < 0.5}])
        # The update's duration grows with the bytes after the first deleted message: aim there.
        moved = len(original) - sum(map(len, messages[: min(deleted)]))
        window = longest * 1.3 * moved / len(original) + 0.001
        write_spool(path, original)
        pid, r = start_committer(path, deleted, mda_locks=mda_locks)
        assert os.read(r, 1) == b"o"  # opened and scanned: the next instants are the update's
        time.sleep(rng.uniform(0, window))
        os.kill(pid, signal.SIGKILL)
        code, report = finish(pid, r)
        finished = report == b"c"
        outcomes["finished"] += finished
        _, logs = recover(path, mda_locks=mda_locks)
        outcomes["recovered"] += any("recovered" in line for line in logs)
        updated = expected(messages, deleted)
        data = check_recovered(path, original, updated, must_be_updated=True if finished else None)
        outcomes["original" if data == original else "updated"] += 1
    print(f"{trials} trials, calibrated update {longest * 1000:.1f} ms: {outcomes}")
    assert trials >= 200
    # The kills really landed inside updates: some rolled forward by recovery, some untouched.
    # (How many of each depends on the machine's load; the step-by-step test covers every step.)
    assert outcomes["recovered"] >= 1 and outcomes["original"] >= 1


def test_leftover_temporary_journal_is_discarded(small: tuple[Path, list[bytes]]) -> None:
    """An update killed before its commit point leaves its temporary journal: the next open
    deletes it (it proves to be pop3d's), and the spool is as it was."""
    path, messages = small
    assert finish(*start_committer(path, {1}, stop_after=2))[0] == 137
    tmp = Path(pop3d_names.journal_temp(str(path)))
    assert tmp.exists()
    logs: list[str] = []
    Maildrop.open(str(path), stale_lock=0, log=logs.append).close()
    assert not tmp.exists() and path.read_bytes() == b"".join(messages)
    assert any("uncommitted" in line for line in logs)


@pytest.mark.parametrize("content", [b"half a journal", b"From x Thu Nov 26 10:00:00 2026\n\nmail\n"])
def test_unproven_temporary_journal_is_left_alone(small: tuple[Path, list[bytes]], content: bytes) -> None:
    """A file at the temporary journal's name that pop3d cannot prove it wrote (no journal magic)
    is never deleted: the open logs it, and an update aborts rather than remove it."""
    path, messages = small
    tmp = Path(pop3d_names.journal_temp(str(path)))
    tmp.write_bytes(content)
    tmp.chmod(0o600)
    logs: list[str] = []
    md = Maildrop.open(str(path), log=logs.append)
    assert tmp.read_bytes() == content and any("left alone" in line for line in logs)
    with pytest.raises(MaildropTempError, match="nothing deleted"):
        md.commit(frozenset({1}))
    assert tmp.read_bytes() == content and path.read_bytes() == b"".join(messages)


@pytest.mark.parametrize("where", ["data", "header"])
def test_torn_journal_is_put_aside_and_spool_untouched(
    spool_dir: Path, crash_spool: list[bytes], where: str
) -> None:
    """A committed journal with a block that never reached the disk (it reads as zeros) is
    detected by its checksums; the spool, not yet touched at step 3, stays as it was."""
    original = b"".join(crash_spool)
    path = spool_dir / "alice"
    write_spool(path, original)
    assert finish(*start_committer(path, {0}, stop_after=3))[0] == 137
    journal = Path(pop3d_names.journal(str(path)))
    data = bytearray(journal.read_bytes())
    at = len(data) // 2 // 4096 * 4096 if where == "data" else 64
    data[at : at + 4096] = bytes(len(data[at : at + 4096]))
    journal.write_bytes(bytes(data))
    logs: list[str] = []
    Maildrop.open(str(path), stale_lock=0, log=logs.append).close()
    assert path.read_bytes() == original
    assert [name for name in names(spool_dir) if name.startswith(".pop3d-unusable-")]
    assert any("cannot be completed" in line for line in logs)


@pytest.mark.parametrize("kind", ["garbage", "other-inode"])
def test_unusable_journal_is_kept_aside_and_spool_untouched(spool_dir: Path, kind: str) -> None:
    messages = make_messages(random.Random(1), 10)
    path = spool_dir / "alice"
    write_spool(path, b"".join(messages))
    if kind == "garbage":
        Path(pop3d_names.journal(str(path))).write_bytes(b"not a journal at all" + os.urandom(5000))
        os.chmod(pop3d_names.journal(str(path)), 0o600)
    else:  # a complete journal, but for a spool that has since been replaced
        assert finish(*start_committer(path, {0}, stop_after=4))[0] == 137
        os.unlink(Path(str(path) + ".lock"))
        copy = spool_dir / "copy"  # created while the old inode lives: another inode number
        write_spool(copy, path.read_bytes())
        os.rename(copy, path)
    before = path.read_bytes()
    logs: list[str] = []
    with Maildrop.open(str(path), stale_lock=0, log=logs.append) as md:
        assert md.listing.count >= 1
    assert path.read_bytes() == before
    aside = [name for name in names(spool_dir) if name.startswith(".pop3d-unusable-")]
    assert len(aside) == 1 and any("cannot be completed" in line for line in logs)


@pytest.mark.parametrize("step", [3, 5])
def test_journal_left_by_an_earlier_version_is_completed(
    spool_dir: Path, crash_spool: list[bytes], step: int
) -> None:
    """A journal at `<spool>.pop3d-journal`, where pop3d kept it before its own namespace (same
    format), is proved a journal for this spool, moved to `.pop3d-journal.<spool>` and completed:
    an upgrade after a crash loses nothing."""
    original = b"".join(crash_spool)
    path = spool_dir / "alice"
    write_spool(path, original)
    assert finish(*start_committer(path, {0}, stop_after=step))[0] == 137
    os.rename(pop3d_names.journal(str(path)), pop3d_names.legacy_journal(str(path)))
    logs: list[str] = []
    Maildrop.open(str(path), stale_lock=0, log=logs.append).close()
    check_recovered(path, original, expected(crash_spool, {0}), must_be_updated=True)
    assert any("earlier pop3d" in line for line in logs)


def test_journal_of_an_older_version_refuses_the_maildrop(spool_dir: Path) -> None:
    """A v1 journal's update may be half done: the spool is not served (nor updated), and the
    journal stays where it is, for the pop3d that wrote it or an administrator."""
    messages = make_messages(random.Random(2), 6)
    path = spool_dir / "alice"
    write_spool(path, b"".join(messages))
    journal = Path(pop3d_names.journal(str(path)))
    journal.write_bytes(b"pop3d journal v1" + os.urandom(5000))
    os.chmod(journal, 0o600)
    old = journal.read_bytes()
    with pytest.raises(MaildropTempError, match="older pop3d"):
        Maildrop.open(str(path), stale_lock=0)
    assert journal.read_bytes() == old and path.read_bytes() == b"".join(messages)
    assert names(spool_dir) == {"alice", journal.name}  # no lock left behind


def test_crash_without_fallocate_and_nothing_journalled_is_recovered(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where posix_fallocate is not supported and the deleted message is larger than all the mail
    kept after it, the journal holds no tail byte (only its header): it must still have its full
    length, or recovery after a crash in the move would call it corrupt and serve a half-moved
    spool."""
    big = b"From big Thu Nov 26 10:00:00 2026\nSubject: big\n\n" + b"x" * 60 + b"\n" * 2000 + b"\n"
    small = [b"From s%d Thu Nov 26 10:00:00 2026\nSubject: small %d\n\nhello\n\n" % (i, i) for i in range(3)]
    path = spool_dir / "alice"
    write_spool(path, big + b"".join(small))

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    for step in (3, 5, 6):
        write_spool(path, big + b"".join(small))
        assert finish(*start_committer(path, {0}, stop_after=step))[0] == 137
        logs: list[str] = []
        with Maildrop.open(str(path), stale_lock=0, log=logs.append) as md:
            assert md.listing.count == 3, logs
        assert path.read_bytes() == b"".join(small), step
        assert any("recovered" in line for line in logs), logs
        assert names(spool_dir) == {"alice"}


@needs_root
def test_journal_of_a_foreign_owner_is_ignored(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    journal = Path(pop3d_names.journal(str(path)))
    journal.write_bytes(b"planted")
    os.chown(journal, pwd.getpwnam("nobody").pw_uid, -1)
    logs: list[str] = []
    Maildrop.open(str(path), log=logs.append).close()
    assert journal.read_bytes() == b"planted" and path.read_bytes() == b"".join(messages)
    assert any("ignoring" in line for line in logs)


# ------------------------------------------------------------------- procmail


@pytest.mark.skipif(PROCMAIL is None, reason="procmail not installed")
def test_procmail_waits_for_the_session_and_delivers_intact(small: tuple[Path, list[bytes]]) -> None:
    path, messages = small
    rcfile = path.parent.parent / "procmailrc"
    rcfile.write_text(f"LOCKSLEEP=1\n:0:\n{path}\n")
    new = b"From mta@example.org Thu Nov 26 13:00:00 2026\nSubject: via procmail\n\nhello\n.\nbye\n"
    md = Maildrop.open(str(path))
    procmail = subprocess.Popen(
        [PROCMAIL, "-m", str(rcfile)],  # type: ignore[list-item]
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert procmail.stdin is not None and procmail.stderr is not None
    procmail.stdin.write(new)
    procmail.stdin.close()
    # procmail must still be waiting for our lock after a while; the spool untouched.
    select.select([procmail.stderr], [], [], 2.5)
    assert procmail.poll() is None, procmail.stderr.read()
    assert path.read_bytes() == b"".join(messages)
    md.commit(frozenset({0, 3}))
    assert procmail.wait(timeout=30) == 0, procmail.stderr.read()
    procmail.stderr.close()
    assert path.read_bytes() == expected(messages, {0, 3}) + new + b"\n"
    with Maildrop.open(str(path)) as again:
        assert again.listing.count == len(messages) - 1
        assert b"Subject: via procmail" in b"".join(again.iter_message(again.listing.count - 1))
