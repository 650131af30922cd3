"""The maildrop index (pop3d/index.py, maildrop's "the index" section): a cache of each spool's
listing that is never trusted.

Every test compares what a session answers (STAT, LIST, UIDL, RETR) with a full scan of the
spool's bytes, and checks how much the open scanned (`Maildrop.scanned`, or `scanned=` in the
login line): 0 when the index answered, the tail when the spool only grew, all of it otherwise.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import stat
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import IS_ROOT, PASSWORD, Pop3Env, mbox_bytes, sample_messages
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pop3d import index, limits, maildrop, mbox
from pop3d.locking import MailboxLock

DOTLOCKFILE = shutil.which("dotlockfile")
PROCMAIL = shutil.which("procmail")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, directories made for an account)")

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nHello.\n.leading dot\n",
    b"From: b@example.org\nSubject: two\n\n>From quoted\nFrom unquoted but not after blank\n",
    b"From: c@example.org\r\nSubject: crlf\r\n\r\nstored with CRLF\r\n",
    b"From: d@example.org\nSubject: blank lines\n\nbody\n\n\n",
    b"From: e@example.org\nSubject: twin\n\nsame\n",
    b"From: e@example.org\nSubject: twin\n\nsame\n",  # a duplicate: UIDs -2
]


# ------------------------------------------------------------------------------ helpers


def expected(path: Path, fmt: str = "mboxo") -> object:
    """What a full scan of the spool's bytes answers: STAT, LIST, UIDL, every RETR."""
    data = path.read_bytes() if path.exists() else b""
    try:
        listing = mbox.scan(data, fmt)
    except mbox.MboxFormatError:
        return "not an mbox"
    return answers(listing, lambda i: b"".join(mbox.iter_message(data, listing, i, fmt=fmt)))


def answers(listing: mbox.Listing, retr: object) -> object:
    n = listing.count
    return (n, listing.total_size), listing.sizes(0, n), listing.uids(0, n), [retr(i) for i in range(n)]  # type: ignore[operator]


def served(md: maildrop.Maildrop) -> object:
    return answers(md.listing, lambda i: b"".join(md.iter_message(i)))


class Spool:
    """A spool and its index file, opened as a session opens them (with a log kept)."""

    def __init__(self, base: Path, name: str = "alice", fmt: str = "mboxo") -> None:
        self.path = base / name
        directory = index.prepare(str(base / "index"), os.geteuid(), os.getegid(), print)
        assert directory is not None
        self.index = Path(index.file_for(directory, name))
        self.fmt = fmt
        self.log: list[str] = []

    def open(self, mda_locks: str = "session") -> maildrop.Maildrop:
        return maildrop.Maildrop.open(
            str(self.path),
            locks=("dotlock", "fcntl"),
            lock_timeout=5,
            mbox_format=self.fmt,
            log=self.log.append,
            mda_locks=mda_locks,
            index=str(self.index),
        )

    def session(self, deleted: tuple[int, ...] = (), mda_locks: str = "session") -> int:
        """One session: its answers must be a full scan's; returns how much it scanned."""
        with self.open(mda_locks) as md:
            assert served(md) == expected(self.path, self.fmt)
            scanned = md.scanned
            md.commit(deleted)
        return scanned

    def write(self, data: bytes) -> None:
        self.path.write_bytes(data)
        settle(self.path)

    def deliver(self, data: bytes) -> None:
        """An MDA's append, under the dotlock and the fcntl lock."""
        locked_write(self.path, lambda fd: (os.lseek(fd, 0, os.SEEK_END), os.write(fd, data)))


def locked_write(path: Path, write: object, mtime_back: bool = False) -> None:
    """A program that takes the locks (an MDA, a mail reader) writes to the spool; `mtime_back`:
    then puts the mtime back, as a mail reader hiding its rewrite may."""
    st = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    lock = MailboxLock(str(path), fd, ("dotlock", "fcntl"), 5.0)
    try:
        lock.acquire()
        write(fd)  # type: ignore[operator]
    finally:
        lock.release()
        os.close(fd)
    if mtime_back:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def subjects(path: Path) -> list[bytes]:
    return re.findall(rb"^Subject: (.*)$", path.read_bytes(), re.MULTILINE)


def message(subject: bytes, body: bytes) -> bytes:
    return b"From x@example.org Mon Jan  1 00:00:00 2024\nSubject: %s\n\n%s\n\n" % (subject, body)


# The review's spool: A and B of one size, then a message longer than any window the index could
# once check (64 KiB), then one more.
A, B = message(b"AAAA", b"a" * 100), message(b"BBBB", b"b" * 100)
C = message(b"CCCC", b"c" * 99 + (b"\n" + b"c" * 99) * 700)
REST = C + message(b"EEEE", b"e" * 300)
NEW = message(b"DDDD", b"d" * 50)


def settle(path: Path) -> None:
    """Wait (a tick at most) until the kernel's clock has passed the spool's ctime, so that the
    next open may write an index: a spool changed in the clock tick of its stat gets none."""
    while not maildrop._settled(maildrop._ctime_clock(), os.stat(path).st_ctime_ns):
        pass


def rewrite_same_size(path: Path, moved: int = 3) -> None:
    """A mail reader's rewrite in place: `moved` octets more in the first message, as many fewer
    in the second, so the From_ line between them moves; same size, and the mtime put back."""
    st = os.stat(path)
    data = path.read_bytes()
    listing = mbox.scan(data)
    first_end, second_end = listing.end(0) - 1, listing.end(1) - 1  # before their last LF
    new = data[:first_end] + b"X" * moved + data[first_end : second_end - moved] + data[second_end:]
    assert len(new) == len(data) and new != data
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path)
    s.write(mbox_bytes(MESSAGES))
    return s


# ------------------------------------------------------------------------------ what is used when


def test_an_unchanged_spool_is_answered_from_the_index(spool: Spool) -> None:
    size = spool.path.stat().st_size
    assert spool.session() == size
    assert any("none yet" in line for line in spool.log)
    assert spool.index.exists()
    assert spool.session() == 0
    assert spool.session() == 0


def test_a_spool_that_only_grew_is_scanned_from_its_last_indexed_message(spool: Spool) -> None:
    spool.session()
    before = mbox.scan(spool.path.read_bytes())
    spool.deliver(mbox_bytes([b"Subject: new\n\nnew mail\n"]))
    settle(spool.path)
    assert spool.session() == spool.path.stat().st_size - before.from_offset(before.count - 1)
    assert spool.session() == 0


def test_a_poll_after_a_delivery_to_a_big_spool_loads_no_openssl(tmp_path: Path) -> None:
    """The tail a resumed scan reads is small: its UID digests come from CPython's built-in
    SHA-256, not hashlib's (OpenSSL: ~2 ms to load, the size of the whole spool deciding),
    and they are the full scan's."""
    import sys

    spool = Spool(tmp_path)
    big = b"Subject: big\n\n" + b"x" * 999 + b"\n"
    spool.write(mbox_bytes([*MESSAGES, *[big] * (limits.MBOX_OPENSSL_SHA_MIN // 1000)]))
    assert spool.path.stat().st_size > limits.MBOX_OPENSSL_SHA_MIN
    spool.session()
    spool.deliver(mbox_bytes([b"Subject: new\n\nnew mail\n"]))
    settle(spool.path)
    code = (
        "import sys\nfrom pop3d import maildrop\n"
        "md = maildrop.Maildrop.open(sys.argv[1], locks=('fcntl',), index=sys.argv[2])\n"
        "uids = md.listing.uids(0, md.listing.count)\n"
        "print(md.scanned, 'hashlib' in sys.modules, *[u.decode() for u in uids])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(spool.path), str(spool.index)],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(Path(__file__).parent.parent),
    ).stdout.split()
    full = mbox.scan(spool.path.read_bytes())
    assert 0 < int(out[0]) < 2000
    assert out[1] == "False"
    assert [u.encode() for u in out[2:]] == full.uids(0, full.count)


def test_an_append_that_continues_the_last_message_is_seen(tmp_path: Path) -> None:
    """A spool without the final blank line: a From_ line appended is body text of the last
    message (not a new one), so the last indexed message must be rescanned, not trusted."""
    spool = Spool(tmp_path)
    spool.write(mbox_bytes(MESSAGES)[:-1])
    spool.session()
    spool.deliver(b"From x Thu Nov 26 10:00:00 2026\nSubject: glued\n\nbody\n")
    settle(spool.path)
    assert spool.session() > 0
    assert mbox.scan(spool.path.read_bytes()).count == len(MESSAGES)


@pytest.mark.parametrize("deleted", [(0,), (5,), (2, 3), (0, 2, 4), tuple(range(6))], ids=str)
def test_pop3ds_own_update_leaves_a_fresh_index(spool: Spool, deleted: tuple[int, ...]) -> None:
    spool.session()
    spool.session(deleted)
    assert spool.session() == 0


def test_the_update_keeps_what_was_appended_meanwhile_and_indexes_it(spool: Spool) -> None:
    spool.session()
    with spool.open() as md:
        with open(spool.path, "ab") as f:  # a writer that ignores our locks
            f.write(mbox_bytes([b"Subject: late\n\nlate\n"]))
        md.commit([1])
    assert mbox.scan(spool.path.read_bytes()).count == len(MESSAGES)
    assert spool.session() == 0


def test_a_same_size_rewrite_with_the_mtime_put_back_is_rescanned(tmp_path: Path) -> None:
    """Far from the end (the bytes the index checks are intact): only the ctime shows it."""
    spool = Spool(tmp_path)
    big = b"Subject: big\n\n" + b"x" * 99 + b"\n"
    spool.write(mbox_bytes([*MESSAGES, *[big] * 1500, MESSAGES[0]]))
    spool.session()
    rewrite_same_size(spool.path)
    assert spool.session() == spool.path.stat().st_size


@pytest.mark.parametrize("mda_locks", ["session", "brief"])
def test_equal_size_messages_swapped_then_new_mail_are_rescanned(tmp_path: Path, mda_locks: str) -> None:
    """Review F1: a mail reader that takes the locks swaps two messages of the same size (every
    From_ line stays where it was), an MDA delivers, and only then does a session come: it must
    not answer from the old listing (A's UID at 1, RETR 1 giving B, DELE 1 deleting B)."""
    spool = Spool(tmp_path)
    spool.write(A + B + REST)
    spool.session(mda_locks=mda_locks)
    locked_write(spool.path, lambda fd: os.pwrite(fd, B + A, 0))
    spool.deliver(NEW)
    settle(spool.path)
    size = spool.path.stat().st_size
    assert spool.session((0,), mda_locks) == size  # a full scan; its answers checked in session()
    assert any("message 1 is not where or what it recorded" in line for line in spool.log), spool.log
    assert subjects(spool.path) == [b"AAAA", b"CCCC", b"EEEE", b"DDDD"]  # B was message 1: B went
    assert spool.session(mda_locks=mda_locks) == 0


@pytest.mark.parametrize("mda_locks", ["session", "brief"])
def test_a_boundary_moved_then_new_mail_is_rescanned(tmp_path: Path, mda_locks: str) -> None:
    """Review F1: octets moved from the second message into the first, same size, the mtime put
    back, then a delivery: RETR 2 served bytes from the middle of a From_ line."""
    spool = Spool(tmp_path)
    spool.write(message(b"one", b"1" * 100) + message(b"two", b"2" * 100) + REST)
    spool.session(mda_locks=mda_locks)
    listing = mbox.scan(spool.path.read_bytes())
    first_end, second_end = listing.end(0) - 1, listing.end(1) - 1
    data = spool.path.read_bytes()
    moved = data[:first_end] + b"XXXXX" + data[first_end : second_end - 5] + data[second_end:]
    locked_write(spool.path, lambda fd: os.pwrite(fd, moved, 0), mtime_back=True)
    spool.deliver(NEW)
    settle(spool.path)
    assert spool.session(mda_locks=mda_locks) == spool.path.stat().st_size
    assert spool.session((1,), mda_locks) == 0
    assert subjects(spool.path) == [b"one", b"CCCC", b"EEEE", b"DDDD"]


def test_a_brief_sessions_update_indexes_no_rewrite_made_during_it(tmp_path: Path) -> None:
    """With brief MDA locks a mail reader may rewrite the spool while a session is open: the
    index the update leaves behind must describe the spool as it is, not as it was scanned."""
    spool = Spool(tmp_path)
    spool.write(message(b"head", b"h") + A + B + REST)
    spool.session(mda_locks="brief")
    with spool.open("brief") as md:
        at = md.listing.from_offset(1)
        locked_write(spool.path, lambda fd: os.pwrite(fd, B + A, at))  # kept messages swapped
        md.commit({3})
    settle(spool.path)
    spool.session(mda_locks="brief")  # answers a full scan's (checked in session())
    assert any("rewritten during the session" in line for line in spool.log), spool.log


def test_a_same_length_body_edit_is_never_sent_and_drops_the_index(tmp_path: Path) -> None:
    """What the index does not prove (docs/DATA-SAFETY.md): a body edited in place, same length,
    here one line more, then a delivery. LIST still says the indexed size; the message is not
    sent under it (RETR, TOP), the index is dropped, and the next session scans and is right."""
    spool = Spool(tmp_path)
    spool.write(A + B + REST)
    spool.session()
    edited = A.replace(b"aaaa", b"a\naa", 1)
    locked_write(spool.path, lambda fd: os.pwrite(fd, edited, 0))
    spool.deliver(NEW)
    settle(spool.path)
    full = mbox.scan(spool.path.read_bytes())
    with spool.open() as md:
        assert 0 < md.scanned < 1000
        assert md.listing.size(0) == full.size(0) - 1  # the residual: an old size, listed
        assert md.listing.uids(0, 5) == full.uids(0, 5)
        for read in (lambda: md.message_bytes(0), lambda: md.iter_message(0), lambda: md.iter_message(0, 1)):
            with pytest.raises(maildrop.MaildropChangedError, match="rewritten in place"):
                read()
            assert not spool.index.exists()
        assert b"".join(md.iter_message(1)) == b"".join(mbox.iter_message(spool.path.read_bytes(), full, 1))
        md.commit({1})
    assert any("content is not what it listed; dropped" in line for line in spool.log), spool.log
    assert not spool.index.exists()  # not rewritten by the update either
    assert subjects(spool.path) == [b"AAAA", b"CCCC", b"EEEE", b"DDDD"]
    assert spool.session() == spool.path.stat().st_size


def test_what_the_index_took_on_trust_is_still_proved_sessions_later(tmp_path: Path) -> None:
    """The record a grown spool's session leaves behind carries which messages it took on
    trust: a session that finds the spool unchanged still proves them before sending one, while
    a record made by a full scan (or after it) is used without proofs."""
    spool = Spool(tmp_path)
    spool.write(A + B + REST)
    spool.session()
    locked_write(spool.path, lambda fd: os.pwrite(fd, A.replace(b"aaaa", b"a\naa", 1), 0))
    spool.deliver(NEW)
    settle(spool.path)
    with spool.open() as md:  # takes A, B, C on trust; asks for none of them
        assert md.scanned and md.scanned < 1000
        assert md.message_bytes(4) == mbox.message_bytes(
            spool.path.read_bytes(), mbox.scan(spool.path.read_bytes()), 4
        )
    assert index.load(str(spool.index), print).unproved == 3
    with spool.open() as md:  # unchanged since: scanned nothing, A is still proved, and fails
        assert md.scanned == 0
        with pytest.raises(maildrop.MaildropChangedError, match="rewritten in place"):
            md.message_bytes(0)
    assert spool.session() == spool.path.stat().st_size  # the index went: a full scan
    assert index.load(str(spool.index), print).unproved == 0


def test_a_lock_ignoring_write_during_a_session_is_not_indexed_as_proved(tmp_path: Path) -> None:
    """A program ignoring the locks writes a message into message 2's body (same length) during
    a session that deletes message 4: the index that session leaves must not vouch for message
    2's content, so a later DELE 2 does not take the hidden message with it (review 2,
    finding 1)."""
    spool = Spool(tmp_path)
    spool.write(A + B + REST)
    spool.session()
    with spool.open() as md:
        hidden = B.replace(b"b" * 30, b"\nFrom y Mon Jan 1\nSubject: Z\n\n", 1)
        fd = os.open(spool.path, os.O_WRONLY)
        os.pwrite(fd, hidden, len(A))  # no locks taken
        os.close(fd)
        md.commit({3})
    settle(spool.path)
    assert index.load(str(spool.index), print).unproved >= 1
    before = spool.path.read_bytes()
    assert before == A + hidden + C
    with spool.open() as md, pytest.raises(maildrop.MaildropTempError, match="nothing deleted"):
        md.commit({1})
    assert spool.path.read_bytes() == before
    assert spool.session() == len(before)  # the index went: a full scan, which lists 4 messages
    assert mbox.scan(before).count == 4


def test_an_empty_spools_record_is_used(tmp_path: Path) -> None:
    """Every message deleted: the record pop3d's update leaves for the empty spool loads, and
    the next session neither scans nor logs a broken record (review 2, finding 5)."""
    spool = Spool(tmp_path)
    spool.write(A + B)
    spool.session((0, 1))
    assert spool.path.stat().st_size == 0
    settle(spool.path)
    spool.log.clear()
    assert spool.session() == 0
    assert not any("ValueError" in line or "ignored" in line for line in spool.log), spool.log


def test_a_message_written_into_a_body_is_never_deleted_with_it(tmp_path: Path) -> None:
    """The same, with an empty line and a From_ line written into A's body: a full scan lists
    one more message there. Deleting A must not delete it: the update is refused, nothing is
    deleted, the index is dropped, and the next session lists it."""
    spool = Spool(tmp_path)
    spool.write(A + B + REST)
    spool.session()
    hidden = A.replace(b"a" * 30, b"\nFrom y Mon Jan 1\nSubject: Z\n\n", 1)
    assert len(hidden) == len(A)
    locked_write(spool.path, lambda fd: os.pwrite(fd, hidden, 0))
    spool.deliver(NEW)
    settle(spool.path)
    before = spool.path.read_bytes()
    assert mbox.scan(before).count == 6
    with spool.open() as md:
        assert md.listing.count == 5  # the residual: the hidden message is not listed
        with pytest.raises(maildrop.MaildropTempError, match="nothing deleted"):
            md.commit({0})
    assert spool.path.read_bytes() == before
    assert not spool.index.exists()
    assert spool.session() == len(before)


def test_a_lock_ignoring_truncation_is_rescanned(spool: Spool) -> None:
    spool.session()
    os.truncate(spool.path, spool.path.stat().st_size // 2)
    assert spool.session() == spool.path.stat().st_size


def test_a_truncation_then_more_mail_than_before_is_rescanned(spool: Spool) -> None:
    spool.session()
    size = spool.path.stat().st_size
    os.truncate(spool.path, size // 2)
    spool.deliver(b"\n" + mbox_bytes([b"Subject: %d\n\n%s\n" % (i, b"x" * 40) for i in range(8)]))
    assert spool.path.stat().st_size > size
    assert spool.session() == spool.path.stat().st_size


def test_an_edit_just_before_the_last_indexed_message_then_new_mail_is_rescanned(spool: Spool) -> None:
    """The spool grew, but the octets the index relies on changed (a header edited in place by
    a program ignoring the locks, same length): their checksum sends the session to a full scan."""
    spool.session()
    data = spool.path.read_bytes()
    at = data.index(b"Subject: twin")  # the message before the last
    with open(spool.path, "r+b") as f:
        f.seek(at)
        f.write(b"Subject: TWIN")
    spool.deliver(mbox_bytes([b"Subject: new\n\nnew mail\n"]))
    assert spool.session() == spool.path.stat().st_size


def test_a_replaced_spool_is_rescanned(spool: Spool) -> None:
    spool.session()
    data = spool.path.read_bytes()
    new = spool.path.with_name("new")
    new.write_bytes(data.replace(b"Subject: one", b"Subject: 1ne"))  # same size, other UID
    os.rename(new, spool.path)
    assert spool.session() == len(data)


def test_another_mbox_format_is_rescanned(tmp_path: Path) -> None:  # same user, same index
    spool = Spool(tmp_path)
    spool.write(mbox_bytes(MESSAGES))
    spool.session()
    rd = Spool(tmp_path, fmt="mboxrd")
    assert rd.index == spool.index
    assert rd.session() == spool.path.stat().st_size  # the sizes differ: >From lines


def test_an_index_written_for_another_spool_is_not_used(tmp_path: Path) -> None:
    alice, bob = Spool(tmp_path, "alice"), Spool(tmp_path, "bob")
    alice.write(mbox_bytes(MESSAGES))
    bob.write(mbox_bytes(MESSAGES[:2]))
    alice.session()
    bob.session()
    shutil.copy(bob.index, alice.index)
    assert alice.session() == alice.path.stat().st_size


def test_a_spool_changed_in_the_clock_tick_of_its_stat_gets_no_index() -> None:
    """A later change could keep the ctime a record holds: such a stat is never recorded."""
    ctime = 1_796_520_908_304_759_271
    assert not maildrop._settled(ctime, ctime)
    assert not maildrop._settled(ctime - 1, ctime)
    assert maildrop._settled(ctime + 1, ctime)
    whole = 1_796_520_908_000_000_000  # a file system with 1 s or 2 s timestamps
    assert not maildrop._settled(whole + 1_999_999_999, whole)
    assert maildrop._settled(whole + 2_000_000_000, whole)


# ------------------------------------------------------------------------------ a damaged index


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x40  # in the last array, before the file's own checksum
    path.write_bytes(bytes(data))


def _other_version(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _oversized(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(limits.INDEX_MAX_BYTES + 1)  # sparse: no disk used


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_bytes(b"")


DAMAGE = {
    "deleted": (Path.unlink, "none yet"),
    "truncated": (lambda p: os.truncate(p, p.stat().st_size // 3), "truncated"),
    "empty": (lambda p: os.truncate(p, 0), "truncated"),
    "flipped byte": (_flip, "checksum mismatch"),
    "garbage": (lambda p: p.write_bytes(os.urandom(5000)), "not a pop3d index"),
    "other version": (_other_version, "not this version's"),
    "oversized": (_oversized, "over"),
    "hard-linked": (lambda p: os.link(p, p.with_name("link")), "has 2 links"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_index_is_ignored_logged_and_rebuilt(spool: Spool, damage: str) -> None:
    spool.session()
    harm, logged = DAMAGE[damage]
    harm(spool.index)
    assert spool.session() == spool.path.stat().st_size  # a full scan, right answers
    assert any(logged in line for line in spool.log), spool.log
    assert spool.session() == 0  # rebuilt
    assert stat.S_ISREG(os.lstat(spool.index).st_mode)


def test_a_directory_in_place_of_the_index_never_ends_the_session(spool: Spool) -> None:
    spool.session()
    _directory(spool.index)
    assert spool.session() == spool.path.stat().st_size
    assert spool.session() == spool.path.stat().st_size  # cannot be replaced: scans, answers
    assert any("cannot write" in line for line in spool.log), spool.log


def test_a_symlinked_index_is_neither_read_nor_written_through(spool: Spool, tmp_path: Path) -> None:
    spool.session()
    target = tmp_path / "elsewhere.idx"
    shutil.copy(spool.index, target)  # a valid index of this very spool
    kept = target.read_bytes()
    spool.index.unlink()
    spool.index.symlink_to(target)
    assert spool.session() == spool.path.stat().st_size
    assert any("cannot open" in line for line in spool.log), spool.log
    assert target.read_bytes() == kept
    assert not spool.index.is_symlink()
    assert spool.session() == 0


@needs_root
def test_a_foreign_owned_index_is_ignored(spool: Spool) -> None:
    spool.session()
    os.chown(spool.index, 65534, 65534)
    assert spool.session() == spool.path.stat().st_size
    assert any("owned by uid 65534" in line for line in spool.log), spool.log
    assert spool.index.stat().st_uid == os.geteuid()
    assert spool.session() == 0


# ------------------------------------------------------------------------------ where it lives


@needs_root
def test_root_makes_each_accounts_directory_private(tmp_path: Path) -> None:
    top = tmp_path / "index"
    nobody = 65534
    made = index.prepare(str(top), nobody, nobody, print)
    assert made == f"{top}/{nobody}"
    st_top, st_sub = os.stat(top), os.stat(made)
    assert (st_top.st_uid, stat.S_IMODE(st_top.st_mode)) == (0, 0o711)
    assert (st_sub.st_uid, st_sub.st_gid, stat.S_IMODE(st_sub.st_mode)) == (nobody, nobody, 0o700)
    os.chmod(made, 0o755)
    assert index.prepare(str(top), nobody, nobody, print) == made
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    os.chown(made, 1, 1)  # another account's directory under this uid's name: not taken over
    lines: list[str] = []
    assert index.prepare(str(top), nobody, nobody, lines.append) is None
    assert "owned by uid 1" in lines[0]
    assert os.stat(made).st_uid == 1


def test_an_index_dir_others_may_write_or_a_symlink_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "index"
    top.mkdir()
    top.chmod(0o777)
    lines: list[str] = []
    assert index.prepare(str(top), os.geteuid(), os.getegid(), lines.append) is None
    assert "writable by others" in lines[0]
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert index.prepare(str(link), os.geteuid(), os.getegid(), lines.append) is None
    assert list(real.iterdir()) == []


# ------------------------------------------------------------------------------ end to end


def login_scanned(env: Pop3Env) -> list[int]:
    return [int(n) for n in re.findall(r"login: user=\S+ .* scanned=(\d+)", env.log_text())]


def pop3_session(env: Pop3Env, user: str = "alice", dele: tuple[int, ...] = ()) -> None:
    """A real session: STAT, LIST, UIDL and every RETR must be a full scan's; then DELE, QUIT."""
    path = env.spool_path(user)
    want = expected(path)
    client = env.client()
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, total = client.stat()
        sizes = [int(line.split()[1]) for line in client.list()[1]]
        uids = [line.split()[1] for line in client.uidl()[1]]
        bodies = [b"".join(line + b"\r\n" for line in client.retr(i + 1)[1]) for i in range(count)]
        assert ((count, total), sizes, uids, bodies) == want
        for number in dele:
            client.dele(number + 1)
        client.quit()
    finally:
        client.close()
    assert client.proc.wait(timeout=30) == 0


def test_polls_between_real_procmail_and_dotlockfile_deliveries(env: Pop3Env) -> None:
    if PROCMAIL is None or DOTLOCKFILE is None:
        pytest.skip("procmail and dotlockfile (liblockfile-bin) not installed")
    path = env.write_spool(mbox_bytes(sample_messages()))
    pop3_session(env)
    pop3_session(env)
    rc = env.base / "procmailrc"
    rc.write_text("LOCKSLEEP=1\n:0:\n$SPOOL\n")
    rc.chmod(0o644)
    kwargs: dict[str, object] = {}
    if IS_ROOT:
        account = env.account
        kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    mail = b"From procmail@example.org Thu Nov 26 10:00:00 2026\nSubject: via procmail\n\nhello\n"
    subprocess.run(["procmail", "-m", f"SPOOL={path}", str(rc)], input=mail, check=True, timeout=60, **kwargs)  # type: ignore[call-overload]
    size_before = path.stat().st_size
    pop3_session(env)
    lock = f"{path}.lock"
    subprocess.run([DOTLOCKFILE, "-l", "-r", "1", lock], check=True, timeout=60)
    try:
        with open(path, "ab") as f:
            f.write(mbox_bytes([b"Subject: under dotlockfile\n\nhi\n"]))
    finally:
        subprocess.run([DOTLOCKFILE, "-u", lock], check=True, timeout=60)
    pop3_session(env, dele=(0, 2))
    pop3_session(env)
    scanned = login_scanned(env)
    full = len(mbox_bytes(sample_messages()))
    assert scanned[:2] == [full, 0]
    assert 0 < scanned[2] < size_before  # from the last indexed message on
    assert 0 < scanned[3] < path.stat().st_size
    assert scanned[4] == 0  # after pop3d's own update
    assert mbox.scan(path.read_bytes()).count == len(sample_messages()) + 2 - 2


def test_a_reader_rewrite_then_a_delivery_then_a_poll(env: Pop3Env) -> None:
    """Review F1 end to end (pop3d as inetd starts it): a mail reader swaps two messages of one
    size under the locks, an MDA delivers, then a client polls and deletes message 1. The poll
    lists what a full scan lists (B first now), and DELE 1 deletes B, not A."""
    path = env.write_spool(A + B + REST)
    settle(path)
    pop3_session(env)
    locked_write(path, lambda fd: os.pwrite(fd, B + A, 0))
    locked_write(path, lambda fd: (os.lseek(fd, 0, os.SEEK_END), os.write(fd, NEW)))
    settle(path)
    pop3_session(env, dele=(0,))  # every answer a full scan's
    assert subjects(path) == [b"AAAA", b"CCCC", b"EEEE", b"DDDD"]
    assert login_scanned(env)[1] == len(A + B + REST + NEW)


def test_a_same_length_body_edit_end_to_end(env: Pop3Env) -> None:
    """The residual, seen by a client: LIST gives the indexed size of the edited message, RETR
    of it is refused (-ERR [SYS/TEMP], the session closes without update, as for any spool that
    changed under a session), and the next poll scans and is right."""
    path = env.write_spool(A + B + REST)
    settle(path)
    pop3_session(env)
    locked_write(path, lambda fd: os.pwrite(fd, A.replace(b"aaaa", b"a\naa", 1), 0))
    locked_write(path, lambda fd: (os.lseek(fd, 0, os.SEEK_END), os.write(fd, NEW)))
    settle(path)
    data = path.read_bytes()
    full = mbox.scan(data)
    client = env.client()
    try:
        client.user("alice")
        client.pass_(PASSWORD)
        assert client.list(1).split()[2] == b"%d" % (full.size(0) - 1)
        client.dele(2)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.retr(1)
        assert client.file.read() == b""  # closed, DELE 2 not done
    finally:
        client.close()
    client.proc.wait(timeout=30)
    assert path.read_bytes() == data
    pop3_session(env)
    assert login_scanned(env) == [len(A + B + REST), len(data) - len(A + B + C), len(data)]


def test_index_files_stay_out_of_the_spool_directory_and_private(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(MESSAGES))
    pop3_session(env)
    pop3_session(env, dele=(1,))
    assert sorted(p.name for p in env.spool_dir.iterdir()) == ["alice"]
    top = env.base / "index"
    uid = env.account.pw_uid
    sub = top / str(uid)
    files = list(sub.iterdir())
    assert [p.name for p in files] == ["alice"]
    st_sub, st_file = sub.stat(), files[0].stat()
    assert (st_sub.st_uid, stat.S_IMODE(st_sub.st_mode)) == (uid, 0o700)
    assert (st_file.st_uid, stat.S_IMODE(st_file.st_mode)) == (uid, 0o600)
    if IS_ROOT:
        assert (top.stat().st_uid, stat.S_IMODE(top.stat().st_mode)) == (0, 0o711)
    assert login_scanned(env)[1:] == [0]


def test_htpasswd_user_names_never_reach_each_others_index(env: Pop3Env) -> None:
    """htpasswd users share one uid, so one directory: each index file is named after its user
    (names.user_file: one path component, never reserved), its temporary is in the reserved
    namespace, and names that would climb out or land on a temporary cannot log in."""
    users = ["alice", "Alice", "alice.new", "pop3d-index-tmp.alice", "0", str(env.account.pw_uid), "index"]
    for k, name in enumerate(users):
        if name != "alice":
            env.add_user(name, PASSWORD)
        env.write_spool(mbox_bytes(MESSAGES[: k % 5 + 1]), name)
    for name in users:
        pop3_session(env, name)
    for name in users:
        pop3_session(env, name)
    assert login_scanned(env)[len(users) :] == [0] * len(users)
    directory = env.base / "index" / str(env.account.pw_uid)
    assert sorted(f.name for f in directory.iterdir()) == sorted(users)
    for f in directory.iterdir():
        assert index._parse(bytearray(f.read_bytes())).spool == str(env.spool_path(f.name))
    alice = directory / "alice"
    before = alice.stat().st_ino, alice.read_bytes()
    for hostile in ["../alice", ".pop3d-index-tmp.alice", f"../{env.account.pw_uid}/alice", "alice/"]:
        env.add_user(hostile, PASSWORD)
        client = env.client()
        client.user(hostile)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.pass_(PASSWORD)
        client.quit()
    assert (alice.stat().st_ino, alice.read_bytes()) == before
    assert sorted(f.name for f in directory.iterdir()) == sorted(users)


def test_an_empty_index_dir_turns_the_index_off(env: Pop3Env) -> None:
    env.write_config(index_dir="")
    env.write_spool(mbox_bytes(MESSAGES))
    pop3_session(env)
    pop3_session(env)
    size = env.spool_path().stat().st_size
    assert login_scanned(env) == [size, size]
    assert not (env.base / "index").exists()


def test_an_unusable_index_dir_costs_a_scan_and_a_log_line(env: Pop3Env) -> None:
    top = env.base / "index"
    top.mkdir()
    top.chmod(0o777)
    env.write_spool(mbox_bytes(MESSAGES))
    pop3_session(env)
    pop3_session(env)
    size = env.spool_path().stat().st_size
    assert login_scanned(env) == [size, size]
    assert "writable by others; no index" in env.log_text()
    assert list(top.iterdir()) == []


# ------------------------------------------------------------------------------ the property test

_LINES = [
    b"hello",
    b"From inside a body",
    b">From quoted",
    b".",
    b"..x",
    b"",
    b"cr\r",
    b"Status: RO",
    b"z" * 90,
]


# Longer than the one stretch (64 KiB before the last indexed message) the index once checked.
_BIG = b"\n".join([b"y" * 99] * 700)


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    subject = b"Subject: %d\n" % draw(st.integers(0, 6))  # small: twins (UID -2) happen
    body = draw(st.lists(st.sampled_from(_LINES), max_size=6))
    if draw(st.integers(0, 5)) == 0:
        body.append(_BIG)
    return subject + b"\n" + b"".join(line + b"\n" for line in body)


@contextmanager
def as_account(env: Pop3Env):
    """Act as the account the sessions run as (root: seteuid to it), so that the index the
    in-process sessions use is the real sessions' own."""
    if not IS_ROOT:
        yield
        return
    os.setegid(env.account.pw_gid)
    os.seteuid(env.account.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _give(path: Path, env: Pop3Env) -> None:
    """A file the test (root) made or changed goes back to the account the sessions run as."""
    if IS_ROOT and os.path.lexists(path):
        os.lchown(path, env.account.pw_uid, env.account.pw_gid)


class IndexMachine(RuleBasedStateMachine):
    """Random MDA appends, pop3d updates (in-process and real sessions, both mda_locks modes),
    a mail reader's rewrites under the locks (octets moved between messages, messages
    reordered, a header edited: same size, the mtime put back), a truncation and a new inode
    behind the locks' back, and damage to the index file, in any order and with no session in
    between (a rewrite, then a delivery, then a poll): every session answers what a full scan
    of the spool answers (`poll`, every update's session, and a last poll at the end)."""

    env: Pop3Env

    def __init__(self) -> None:
        super().__init__()
        self.path = self.env.spool_path()
        self.real_sessions = 0
        self.stale: bytes | None = None

    @property
    def index_file(self) -> Path:
        directory = self.env.base / "index" / str(self.env.account.pw_uid)
        return Path(index.file_for(str(directory), "alice"))

    def open(self, mda_locks: str = "session") -> maildrop.Maildrop:
        return maildrop.Maildrop.open(
            str(self.path),
            locks=("dotlock", "fcntl"),
            lock_timeout=5,
            log=lambda line: None,
            mda_locks=mda_locks,
            index=str(self.index_file),
        )

    @initialize(mail=st.lists(_message(), min_size=1, max_size=6), big=st.booleans())
    def begin(self, mail: list[bytes], big: bool) -> None:
        """A spool and its index; `big`: a message longer than 64 KiB (more than the index once
        checked) after the first one."""
        directory = index.prepare(
            str(self.env.base / "index"), self.env.account.pw_uid, self.env.account.pw_gid, print
        )
        assert directory is not None
        if big:
            mail[1:] = [b"Subject: big\n\n" + _BIG + b"\n", *(mail[1:] or [b"Subject: 0\n\nlast\n"])]
        with as_account(self.env):
            self.index_file.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
            self.path.write_bytes(mbox_bytes(mail))
            settle(self.path)
        self.poll(False)

    def listing(self) -> mbox.Listing | None:
        try:
            return mbox.scan(self.path.read_bytes())
        except mbox.MboxFormatError:
            return None

    @rule(mail=st.lists(_message(), min_size=1, max_size=3), sloppy=st.booleans())
    def mda_appends(self, mail: list[bytes], sloppy: bool) -> None:
        with as_account(self.env):
            self.deliver(mail, sloppy)

    def deliver(self, mail: list[bytes], sloppy: bool = False) -> None:
        """An MDA's append under its locks (as the account: the caller's business)."""
        data = mbox_bytes(mail)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        lock = MailboxLock(str(self.path), fd, ("dotlock", "fcntl"), 5.0)
        try:
            lock.acquire()
            os.write(fd, data[:-1] if sloppy else data)  # sloppy: no final blank line
        finally:
            lock.release()
            os.close(fd)

    @rule(data=st.data(), brief=st.booleans(), mail=st.lists(_message(), max_size=2))
    def pop3d_update(self, data: st.DataObject, brief: bool, mail: list[bytes]) -> None:
        """A session that deletes some messages; with mda_locks = brief, an MDA may deliver
        `mail` between its scan and its update (which keeps it, and indexes it)."""
        with as_account(self.env):
            md = self.checked_session(brief)
            if md is None:
                return
            with md:
                deleted = data.draw(st.sets(st.integers(0, max(md.listing.count - 1, 0))))
                if brief and mail:
                    self.deliver(mail)
                md.commit(deleted & set(range(md.listing.count)))

    @precondition(lambda self: self.real_sessions < 1)
    @rule(data=st.data())
    def real_session(self, data: st.DataObject) -> None:
        listing = self.listing()
        if listing is None or not self.path.exists():
            return
        self.real_sessions += 1
        deleted = data.draw(st.sets(st.integers(0, max(listing.count - 1, 0))))
        pop3_session(self.env, dele=tuple(sorted(deleted & set(range(listing.count)))))

    @rule(data=st.data())
    def reader_rewrites_in_place(self, data: st.DataObject) -> None:
        self.move_octets(data)

    @rule(data=st.data(), how=st.sampled_from(["moves octets", "reorders", "edits a header"]))
    def reader_rewrites_then_mda_delivers(self, data: st.DataObject, how: str) -> None:
        """A mail reader's rewrite, then a delivery, with no session in between (review F1)."""
        rewrites = {
            "moves octets": self.move_octets,
            "reorders": self.reorder,
            "edits a header": self.edit_header,
        }
        rewrites[how](data)
        if self.path.exists():
            with as_account(self.env):
                self.deliver(data.draw(st.lists(_message(), min_size=1, max_size=2)))

    @rule(data=st.data())
    def reader_reorders(self, data: st.DataObject) -> None:
        self.reorder(data)

    def move_octets(self, data: st.DataObject) -> None:
        """Octets move from one message to another: the From_ lines between them move, the
        size stays, and the mtime is put back (a mail reader hiding its rewrite)."""
        listing = self.listing()
        if listing is None or listing.count < 2:
            return
        i, j = data.draw(st.permutations(range(listing.count)))[:2]
        buf = self.path.read_bytes()

        def before_last_lf(m: int) -> int:
            end = listing.end(m)
            return end - 1 if end > listing.start(m) and buf[end - 1] == 10 else end

        grow, shrink = before_last_lf(i), before_last_lf(j)
        k = min(data.draw(st.integers(1, 8)), shrink - listing.start(j))
        if k <= 0:
            return
        edits = sorted([(grow, grow, b"X" * k), (shrink - k, shrink, b"")])
        new, at = bytearray(), 0
        for lo, hi, text in edits:
            new += buf[at:lo] + text
            at = hi
        new += buf[at:]
        self.rewrite(bytes(new))

    def reorder(self, data: st.DataObject) -> None:
        """Whole messages (with their separators) reordered: two of the same size swapped when
        there are such (every From_ line stays where it was), else any order; same size."""
        listing = self.listing()
        if listing is None or listing.count < 2:
            return
        buf = self.path.read_bytes()
        pieces = [buf[listing.from_offset(i) : listing.from_offset(i + 1)] for i in range(listing.count)]
        twins = [(i, j) for i in range(len(pieces)) for j in range(i) if len(pieces[i]) == len(pieces[j])]
        if twins and data.draw(st.booleans()):
            i, j = data.draw(st.sampled_from(twins))
            order = list(range(len(pieces)))
            order[i], order[j] = j, i
        else:
            order = data.draw(st.permutations(range(len(pieces))))
        self.rewrite(b"".join(pieces[k] for k in order) + buf[listing.scanned_length :])

    def edit_header(self, data: st.DataObject) -> None:
        """A Subject changed in place, same length: another UID at the same offsets."""
        buf = self.path.read_bytes() if self.path.exists() else b""
        starts = [m.start() + 9 for m in re.finditer(rb"\nSubject: \d", buf)]
        if starts:
            at = data.draw(st.sampled_from(starts))
            self.rewrite(buf[:at] + b"%d" % ((buf[at] - 48 + 1) % 10) + buf[at + 1 :])

    def rewrite(self, new: bytes) -> None:
        """A mail reader's rewrite in place under the locks, the mtime put back."""
        with as_account(self.env):
            locked_write(self.path, lambda fd: os.pwrite(fd, new, 0), mtime_back=True)

    @rule(data=st.data())
    def truncation_ignoring_the_locks(self, data: st.DataObject) -> None:
        if self.path.exists():
            os.truncate(self.path, data.draw(st.integers(0, self.path.stat().st_size)))

    @rule(same=st.sampled_from(["bytes", "size", "other"]), mail=st.lists(_message(), min_size=1, max_size=3))
    def spool_replaced(self, same: str, mail: list[bytes]) -> None:
        """A new inode at the spool's path: the same bytes, other bytes of the same size, or others."""
        old = self.path.read_bytes() if self.path.exists() else b""
        new = {"bytes": old, "size": old.replace(b"Subject: ", b"Subject; "), "other": mbox_bytes(mail)}[same]
        with as_account(self.env):
            temporary = self.path.with_name("replacement")
            temporary.write_bytes(new)
            os.rename(temporary, self.path)

    @rule()
    def index_kept_aside(self) -> None:
        if self.index_file.exists():
            self.stale = self.index_file.read_bytes()

    @rule(
        how=st.sampled_from(
            ["stale", "deleted", "truncated", "flipped", "garbage", "symlink", "oversized", "foreign"]
        )
    )
    def index_damaged(self, how: str) -> None:
        target = self.index_file
        if not target.exists() and how != "stale":
            return
        if how == "stale":
            if self.stale is None:
                return
            target.unlink(missing_ok=True)
            target.write_bytes(self.stale)
        elif how == "deleted":
            target.unlink()
        elif how == "truncated":
            os.truncate(target, target.stat().st_size // 2)
        elif how == "flipped":
            _flip(target)
        elif how == "garbage":
            target.write_bytes(os.urandom(300))
        elif how == "symlink":
            aside = target.with_name("aside")
            os.rename(target, aside)
            target.symlink_to(aside)
            _give(aside, self.env)
        elif how == "oversized":
            _oversized(target)
        if how != "foreign":
            _give(target, self.env)
        elif IS_ROOT:
            os.chown(target, 0, 0)

    def checked_session(self, brief: bool) -> maildrop.Maildrop | None:
        """A session's open (as the account), its answers checked against a full scan of the
        spool; None if the spool is not an mbox (and a full scan says so too)."""
        want = expected(self.path)
        try:
            md = self.open("brief" if brief else "session")
        except maildrop.MaildropFormatError:
            assert want == "not an mbox"
            return None
        try:
            assert served(md) == want
        except BaseException:
            md.close()
            raise
        return md

    @rule(brief=st.booleans())
    def poll(self, brief: bool) -> None:
        """A session answers what a full scan of the spool answers."""
        with as_account(self.env):
            md = self.checked_session(brief)
            if md is not None:
                md.close()

    def teardown(self) -> None:
        self.poll(False)


IndexMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("POP3D_INDEX_EXAMPLES", "40")),
    stateful_step_count=16,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_every_answer_is_a_full_scans_whatever_happens_to_the_spool_and_the_index(env: Pop3Env) -> None:
    IndexMachine.env = env
    run_state_machine_as_test(IndexMachine, settings=IndexMachine.TestCase.settings)
