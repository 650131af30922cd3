"""The maildrop: one user's mbox spool opened safely, locked, scanned, and updated in place.

Knows nothing of POP3. The update on QUIT (`commit`) proves the spool is still what was scanned,
works out which byte ranges stay, and hands them to `update`, the crash-safe in-place engine
(docs/UPDATE.md); every open first lets `update.recover` finish an update a crash interrupted.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
import time

from . import limits, names, update

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import NoReturn

    from .locking import MailboxLock, SessionLock
    from .mbox import Listing

_FINGERPRINT = 64  # bytes remembered from both ends of the scanned spool
# verify() reads this much at a message's From_ line at once: its header, usually all of it.
_VERIFY_READ = 16 * 1024
# The update check reads From_ lines through the mapping and releases them every 2 x this.
_RELEASE_BATCH = 1024 * 1024


class MaildropError(Exception):
    """Base of every maildrop failure; the text is for the log only (it may name paths)."""


class MaildropInUseError(MaildropError):
    """Another process held the maildrop's locks for the whole lock timeout."""


class MaildropFormatError(MaildropError):
    """The spool is not an mbox (or exceeds a limit): permanent until someone repairs it."""


class MaildropPermError(MaildropError):
    """The spool is not something we may serve: symlink, not regular, hard-linked, foreign owner."""


class MaildropTempError(MaildropError):
    """An I/O failure or an aborted update; nothing was lost and a retry may succeed."""


class MaildropChangedError(MaildropTempError):
    """With brief MDA locks: the spool no longer holds a listed message where the scan found it
    (a program taking the locks rewrote it); raised before any byte of the message is handed out,
    or after the last one was read."""


def _noop_log(message: str) -> None:
    pass


def _why(e: OSError) -> str:
    return e.strerror or str(e)


# --------------------------------------------------------------------------- opening


def _check_file(path: str, st: os.stat_result, expected_uid: int | None) -> None:
    """Refuse anything but a plain, singly linked regular file of the right owner."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise MaildropPermError(f"{path}: is a symbolic link")
    if stat.S_ISDIR(mode):
        raise MaildropPermError(f"{path}: is a directory")
    if not stat.S_ISREG(mode):
        raise MaildropPermError(f"{path}: is not a regular file (mode {mode:o})")
    if st.st_nlink > 1:
        raise MaildropPermError(f"{path}: has {st.st_nlink} hard links")
    if expected_uid is not None and st.st_uid != expected_uid:
        raise MaildropPermError(f"{path}: owned by uid {st.st_uid}, expected {expected_uid}")


def _open_error(path: str, e: OSError) -> MaildropError:
    if e.errno == errno.ELOOP:
        return MaildropPermError(f"{path}: is a symbolic link")
    if e.errno in (errno.EISDIR, errno.ENXIO, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENODEV):
        return MaildropPermError(f"{path}: cannot open: {_why(e)}")
    return MaildropTempError(f"{path}: cannot open: {_why(e)}")


def _safe_open(path: str, expected_uid: int | None) -> int | None:
    """The spool opened read-write without following links or blocking; None if it is missing.

    lstat() first, so a FIFO or device is refused without ever being opened; fstat() after, on
    what was really opened. O_NONBLOCK is cleared again once we know it is a regular file.
    """
    try:
        _check_file(path, os.lstat(path), expected_uid)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _open_error(path, e) from e
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _open_error(path, e) from e
    try:
        _check_file(path, os.fstat(fd), expected_uid)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _raise_lock_error(path: str, e: BaseException) -> NoReturn:
    """Raise the maildrop error a failure to lock means (`e` itself if it is none of those)."""
    from .locking import LockError, LockPermissionError, LockTimeoutError

    if isinstance(e, LockTimeoutError):
        raise MaildropInUseError(str(e)) from e
    if isinstance(e, LockPermissionError):
        raise MaildropPermError(str(e)) from e
    if isinstance(e, LockError):
        raise MaildropTempError(str(e)) from e
    if isinstance(e, OSError):
        raise MaildropTempError(f"{path}: {_why(e)}") from e
    raise e


def _session_lock(path: str, timeout: float, brief: bool) -> SessionLock | None:
    """pop3d's own session lock on the maildrop, taken (MaildropInUseError after `timeout`).

    In session mode a spool directory the session may not write (possible with `locks`
    without dotlock) is no error: no brief session can lock anything there either, and the
    MDA locks, held the whole session, exclude every other session. None then."""
    from .locking import LockPermissionError, SessionLock

    lock = SessionLock(path, timeout)
    try:
        lock.acquire()
    except BaseException as e:
        if isinstance(e, LockPermissionError) and not brief:
            return None
        _raise_lock_error(path, e)
    return lock


def _reopen(path: str, fd: int) -> int:
    """The spool opened again by path, under the locks: MaildropTempError unless it is the file
    open as `fd`.

    The spool was opened before the locks were taken (fcntl needs a descriptor). On NFS a
    descriptor's attributes and pages may be the client's cached ones; Linux revalidates them
    at an open (close-to-open consistency) or when an fcntl lock is taken, and with `locks =
    dotlock` alone nothing else does: the size read through the older descriptor could be from
    before an append that ended just before we got the dotlock, and an update would cut that
    append off. The caller keeps the new descriptor open as long as it holds the locks: closing
    it would drop our fcntl lock (a process's fcntl locks on a file go at the close of any
    descriptor of that file).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fresh = os.open(path, flags)
    except OSError as e:
        raise MaildropTempError(f"{path}: vanished or unreadable ({_why(e)})") from e
    try:
        st, own = os.fstat(fresh), os.fstat(fd)
    except OSError as e:
        os.close(fresh)
        raise MaildropTempError(f"{path}: unreadable ({_why(e)})") from e
    if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino):
        os.close(fresh)
        raise MaildropTempError(f"{path}: replaced by another program while locked")
    return fresh


def _names_file(path: str, fd: int | None) -> bool:
    """True if `path` still names what we opened (or is still missing): nobody renamed over it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return fd is None
    if fd is None:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino) and own.st_nlink > 0


class Maildrop:
    """An open, locked, scanned spool; `commit` or `close` ends it (both release the locks)."""

    __slots__ = (
        "_brief",
        "_buf",
        "_closed",
        "_content_proved",
        "_fd",
        "_fmt",
        "_fresh_fd",
        "_head",
        "_index",
        "_indexed",
        "_length",
        "_lock",
        "_lock_ok",
        "_log",
        "_quiet",
        "_reader",
        "_session_lock",
        "_tail",
        "listing",
        "path",
        "scanned",
    )

    def __init__(
        self,
        path: str,
        fd: int | None,
        buf: mmap.mmap | bytes,
        listing: Listing,
        lock: MailboxLock,
        fmt: str,
        log: Callable[[str], None],
        index: str | None = None,
        scanned: int | None = None,
        indexed: int = 0,
    ) -> None:
        self.path = path
        self.listing = listing
        # Octets the open scanned: all of them, fewer when the index held the rest (0: none).
        self.scanned = listing.scanned_length if scanned is None else scanned
        self._fd = fd
        self._buf = buf
        self._lock = lock
        self._fmt = fmt
        self._log = log
        self._index = index  # the index file (pop3d/index.py) the update refreshes, if any
        # Messages [0, indexed) came from the index: their content is proved before it is sent
        # or deleted (see "the index" below); those proved so far.
        self._indexed = indexed
        self._content_proved: set[int] = set()
        self._length = int(listing.scanned_length)
        self._head = bytes(buf[:_FINGERPRINT])
        self._tail = bytes(buf[max(0, self._length - _FINGERPRINT) : self._length])
        self._closed = False
        self._lock_ok = True
        self._reader: _PreadBuffer | None = None
        self._fresh_fd = -1  # the spool opened again by path under the locks (_reopen)
        self._session_lock: SessionLock | None = None  # pop3d's own, held until commit or close
        self._brief = False  # mda_locks = brief: the MDA locks are held only to scan and update
        self._quiet: tuple[int, ...] | None = None  # brief: the spool's state at the scan (_state)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        locks: Sequence[str] = ("dotlock", "fcntl"),
        lock_timeout: float = limits.DEFAULT_LOCK_TIMEOUT,
        stale_lock: float = limits.DEFAULT_STALE_LOCK,
        mbox_format: str = "mboxo",
        expected_uid: int | None = None,
        log: Callable[[str], None] | None = None,
        mda_locks: str = "session",
        index: str | None = None,
    ) -> Maildrop:
        """Open safely, lock, finish any interrupted update, map and scan the spool (from the
        file `index` when it proves right: see "the index" below).

        Both modes first take pop3d's own session lock (locking.SessionLock), held until commit
        or close: sessions exclude each other through it, whatever mode each runs in (a SIGHUP
        that changed mda_locks, two configurations on one spool). mda_locks="session": the
        `locks` stay held until commit or close too. "brief": they are held only while the spool
        is scanned here and while `commit` updates it; meanwhile an MDA may append.
        """
        if mda_locks not in ("session", "brief"):
            raise ValueError(f"unknown mda_locks {mda_locks!r}")
        log = log or _noop_log
        deadline = time.monotonic() + lock_timeout
        private = _session_lock(path, lock_timeout, mda_locks == "brief")
        try:
            md = cls._open(path, locks, deadline, stale_lock, mbox_format, expected_uid, log, index)
        except BaseException:
            if private is not None:
                private.release()
            raise
        md._session_lock = private
        if mda_locks == "brief" or index:
            # The state the update compares with: written since the scan, or not (a program that
            # takes the locks in brief mode; one that ignores them in session mode).
            md._quiet = md._scanned_state()
        if mda_locks == "brief":
            md._brief = True
            md._lock.release()  # an MDA may deliver from now on
            md._lock.timeout = float(lock_timeout)  # the update waits this long for them
            fresh, md._fresh_fd = md._fresh_fd, -1
            if fresh >= 0:
                os.close(fresh)  # no lock left to drop; the update opens the spool again
        return md

    @classmethod
    def _open(
        cls,
        path: str,
        locks: Sequence[str],
        deadline: float,
        stale_lock: float,
        mbox_format: str,
        expected_uid: int | None,
        log: Callable[[str], None],
        index: str | None,
    ) -> Maildrop:
        from .locking import MailboxLock

        for _attempt in range(3):
            fd = _safe_open(path, expected_uid)
            timeout = max(0.0, deadline - time.monotonic())
            lock = None
            try:
                lock = MailboxLock(path, fd, locks, timeout, stale_lock, log)
                lock.acquire()
                if _names_file(path, fd):
                    break
                lock.release()  # renamed or created while we waited: lock the new one
            except BaseException as e:
                if lock is not None:
                    lock.release()
                if fd is not None:
                    os.close(fd)
                _raise_lock_error(path, e)
            if fd is not None:
                os.close(fd)
        else:
            raise MaildropTempError(f"{path}: replaced repeatedly while being locked")
        assert lock is not None
        fresh = -1
        try:
            if fd is not None:
                fresh = _reopen(path, fd)  # before anything is read: see _reopen
            md = cls._load(path, fd, lock, mbox_format, log, index)
        except BaseException:
            lock.release()
            for descriptor in (fd, fresh):
                if descriptor is not None and descriptor >= 0:
                    os.close(descriptor)
            raise
        md._fresh_fd = fresh
        return md

    @classmethod
    def _load(
        cls,
        path: str,
        fd: int | None,
        lock: MailboxLock,
        fmt: str,
        log: Callable[[str], None],
        index: str | None,
    ) -> Maildrop:
        """Under the lock: recover, then map and scan (an empty file cannot be mapped)."""
        from . import mbox

        buf: mmap.mmap | bytes = b""
        try:
            update.recover(fd, path, log)
            now = _ctime_clock() if index else 0  # read before the stat (see _settled)
            st = os.fstat(fd) if fd is not None else None
            if st is not None and st.st_size:
                buf = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)  # type: ignore[arg-type]
            indexed = 0
            if index and st is not None:
                listing, scanned, indexed = _indexed_scan(index, path, st, now, buf, fmt, log)
            else:
                listing, scanned = mbox.scan(buf, fmt), None
            return cls(path, fd, buf, listing, lock, fmt, log, index, scanned, indexed)
        except BaseException as e:
            if isinstance(buf, mmap.mmap):
                buf.close()
            if isinstance(e, mbox.MboxFormatError):
                raise MaildropFormatError(f"{path}: {e}") from e
            if isinstance(e, update.UpdateError):
                raise MaildropTempError(str(e)) from e
            if isinstance(e, OSError):
                raise MaildropTempError(f"{path}: {_why(e)}") from e
            if isinstance(e, MemoryError):
                raise MaildropTempError(f"{path}: out of memory while scanning") from e
            raise

    # ----------------------------------------------------------------- session

    def iter_message(self, index: int, body_lines: int | None = None, wire: bool = False) -> Iterator[bytes]:
        """Chunks of message `index` (0-based) as RETR/TOP send them before dot-stuffing (with
        it if wire: see mbox.iter_message).

        Read with pread(2), not through the scan's mapping: should a program that ignores the
        locks truncate the spool meanwhile, a mapping would kill the session with SIGBUS (leaving
        the dotlock behind until it is stale); pread just comes up short, and that raises
        MaildropTempError (from the call, or from the iteration). Nothing read stays in our RSS
        (the page cache holds it), so there are no pages to release either.
        """
        from . import mbox

        if index < self._indexed and index not in self._content_proved:
            _prove_content(self, index)
        reader = self._message_reader()
        return mbox.iter_message(reader, self.listing, index, body_lines, fmt=self._fmt, wire=wire)  # type: ignore[arg-type]

    def message_bytes(self, index: int, wire: bool = False) -> bytes | None:
        """The whole small message at once (mbox.message_bytes: one pread), or None: use
        iter_message. MaildropTempError if the spool was truncated under us."""
        from . import mbox

        if index < self._indexed and index not in self._content_proved:
            _prove_content(self, index)
        reader = self._message_reader()
        return mbox.message_bytes(reader, self.listing, index, fmt=self._fmt, wire=wire)  # type: ignore[arg-type]

    def _scanned_state(self) -> tuple[int, ...] | None:
        """Under the locks, right after the scan: the spool's state if no later change can leave
        it as it is (its ctime settled, see _settled), else None. While the spool is still in
        that state, nothing was written since the scan: every message is where it was listed."""
        if self._fd is None:
            return None
        now = _ctime_clock()  # before the stat
        st = os.fstat(self._fd)
        return _state(st) if _settled(now, st.st_ctime_ns) else None

    def _message_reader(self) -> _PreadBuffer:
        """The pread reader; with brief MDA locks a new one per message, so that no bytes read
        before a rewrite are served from its cache."""
        reader = self._reader
        if reader is None or self._brief:
            reader = self._reader = _PreadBuffer(self._fd, self._length, self.path)
        return reader

    def verify(self, index: int) -> None:
        """MaildropChangedError unless message `index` is still where and what the scan found.

        With brief MDA locks a program that takes them may rewrite the spool between two reads
        (a mail reader moving or deleting messages): the session calls this after reading a
        message's bytes and before sending them. Nothing to prove while the open spool is in the
        state it had at the scan (_scanned_state: nothing written since); else the same file
        (device, inode), not shorter, mbox.same_message, and for the last message the scanned
        end: a few system calls and the header's digest, never a rescan. Session locks: a no-op.
        """
        if not self._brief:
            return
        path = self.path
        fd = self._fd
        why = ""
        try:
            own = os.fstat(fd)  # type: ignore[arg-type]
            if _state(own) == self._quiet:
                return  # not written since the scan: what it reads is what was listed
            from . import mbox

            named = os.lstat(path)
            if (named.st_dev, named.st_ino) != (own.st_dev, own.st_ino):
                why = "replaced by another file"
            elif own.st_size < self._length:
                why = f"shrank from {self._length} to {own.st_size} bytes"
            else:
                listing, length, tail = self.listing, self._length, self._tail
                # One read at the From_ line holds all it takes, usually (its header, the next
                # From_ line); for a longer message, a reader of the whole file.
                at = listing.from_offset(index)
                base = at - 1 if at else 0
                window = os.pread(fd, min(_VERIFY_READ, length - base), base)  # type: ignore[arg-type]
                same = mbox.same_message(window, listing, index, base)
                if same is None:
                    same = mbox.same_message(_PreadBuffer(fd, length, path), listing, index)
                if not same or (
                    index == listing.count - 1 and os.pread(fd, len(tail), length - len(tail)) != tail  # type: ignore[arg-type]
                ):
                    why = f"message {index + 1} is no longer where it was listed"
        except (OSError, MaildropTempError) as e:
            why = f"unreadable ({e})"
        if why:
            raise MaildropChangedError(
                f"{path}: rewritten since login ({why}); the session ends, nothing deleted"
            )

    def refresh_lock(self) -> bool:
        """Touch the dotlock so other programs never judge it stale; False if it is no longer ours.
        With brief MDA locks there is nothing to touch between the scan and the update."""
        if self._brief:
            return not self._closed
        ok = self._lock.refresh() if not self._closed else False
        if not ok and self._lock_ok and not self._closed:
            self._log(f"{self.path}: our dotlock was broken or replaced by another process")
        self._lock_ok = ok
        return ok

    def close(self) -> None:
        """Release the locks (reverse order) and the spool; idempotent, never updates."""
        if self._closed:
            return
        self._closed = True
        try:
            self._lock.release()
        finally:
            try:
                buf, self._buf = self._buf, b""
                if isinstance(buf, mmap.mmap):
                    try:
                        buf.close()
                    except BufferError:
                        pass  # a caller still holds a view of it; unmapped when that is collected
                fd, self._fd = self._fd, None
                if fd is not None:
                    os.close(fd)
                fresh, self._fresh_fd = self._fresh_fd, -1
                if fresh >= 0:
                    os.close(fresh)  # only now: its close would have dropped our fcntl lock
            finally:
                if self._session_lock is not None:
                    self._session_lock.release()  # last: no other session starts before we are done

    def __enter__(self) -> Maildrop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ update

    def commit(self, deleted: Iterable[int]) -> None:
        """The UPDATE state: remove the `deleted` messages (0-based) in place, then release.

        Raises MaildropTempError when the update was not done (nothing deleted) or, after the
        journal was committed, could not be finished now (the next open finishes it).
        """
        if self._closed:
            raise MaildropTempError(f"{self.path}: maildrop already closed")
        try:
            self._commit(frozenset(deleted))
        finally:
            self.close()

    def _commit(self, deleted: frozenset[int]) -> None:
        if not deleted:
            return  # nothing to do: not one byte is written
        listing = self.listing
        count = listing.count
        for index in deleted:
            if not 0 <= index < count:
                raise ValueError(f"message index {index} out of range 0..{count - 1}")
        fd = self._fd
        assert fd is not None  # count > 0, so the spool exists
        fresh = self._relock() if self._brief else None
        if not self._lock.verify():
            raise MaildropTempError(
                f"{self.path}: our dotlock was broken or replaced by another process; "
                "update aborted, nothing deleted"
            )
        order = sorted(deleted)
        first = order[0]
        P = listing.from_offset(first)
        # Kept raw byte ranges after the first deleted message: the runs between deleted ones
        # (never adjacent: a deleted message lies between two runs). O(deleted), not O(messages).
        # `boundaries`: the From_ line opening each run of deleted messages, checked now;
        # `kept`: the From_ lines of the kept messages after P, checked by the update while it
        # reads them anyway (journal pass), so they cost no page faults here.
        extents: list[list[int]] = []
        boundaries = [P]
        kept = None
        for index, after in zip(order, [*order[1:], count], strict=True):
            if after > index + 1:
                if kept is None:
                    offsets = listing.from_offsets(first)
                    kept = offsets[:0]
                start = listing.from_offset(index + 1)
                extents.append([start, listing.from_offset(after) - start])
                kept.extend(offsets[index + 1 - first : after - first])
                if after < count:
                    boundaries.append(listing.from_offset(after))
        size = self._check_unchanged(boundaries, fresh)
        # Another program wrote during the session: one that takes the locks (brief mode: they
        # were free) or one that ignores them. What it wrote is not taken on trust: the deleted
        # messages hold no message but the listed ones, and the index left behind proves the
        # kept ones' headers and leaves their content to prove.
        written = (self._brief or self._index is not None) and (
            self._quiet is None or _state(fresh if fresh is not None else os.fstat(fd)) != self._quiet
        )
        if fresh is not None:
            self._check_deleted(order, fresh)
        if self._indexed or written:
            _prove_deleted(self, order, written)
        length = self._length
        if size > length:  # appended after the scan: delivered (brief) or by a writer ignoring locks
            if not self._brief:
                self._log(f"{self.path}: {size - length} bytes appended since login; kept")
            if extents and extents[-1][0] + extents[-1][1] == length:
                extents[-1][1] += size - length
            else:
                extents.append([length, size - length])
        try:
            update.rewrite(fd, self.path, P, [(s, n) for s, n in extents], size, self._log, kept or ())
        except update.UpdateError as e:
            raise MaildropTempError(str(e)) from e
        except update.ChangedError as e:
            raise MaildropTempError(
                f"{self.path}: rewritten since login (a program ignoring the locks?): {e}; "
                "update aborted, nothing written"
            ) from None
        if self._index:
            indexed = min(self._indexed, count)
            unproved = indexed - sum(1 for i in order if i < indexed)  # kept: still unproved
            _index_after_update(
                self._index, self.path, fd, listing, order, self._fmt, self._log, written, unproved
            )

    def _relock(self) -> os.stat_result:
        """Brief MDA locks: take them again for the update (an MDA holding them a moment is
        normal: wait up to the lock timeout), refuse to update over another one's journal, and
        return the spool's status as a fresh open reads it under the locks (`_reopened`)."""
        try:
            self._lock.acquire()
        except BaseException as e:
            _raise_lock_error(self.path, e)
        if os.path.lexists(names.journal(self.path)):  # only a crashed update leaves it
            raise MaildropTempError(
                f"{self.path}: an interrupted update's journal appeared during the session; "
                "update aborted, nothing written (the next login completes it)"
            )
        return self._reopened()

    def _reopened(self) -> os.stat_result:
        """The spool's status through a new descriptor, opened by path under the locks taken
        again for the update (see `_reopen`): the size the update relies on, fresh on NFS."""
        assert self._fd is not None
        try:
            self._fresh_fd = _reopen(self.path, self._fd)
            return os.fstat(self._fresh_fd)
        except (OSError, MaildropTempError) as e:
            raise MaildropTempError(f"{e}; update aborted, nothing written") from e

    def _check_deleted(self, order: Sequence[int], now: os.stat_result) -> None:
        """Brief MDA locks, under them: every message about to go is still the listed one.

        The From_ lines `_check_unchanged` and the update check prove where messages begin;
        a rewrite that put other messages of the same sizes there (a permutation) keeps those,
        so the deleted ones' digests are checked too, through the mapping (its size was checked).
        """
        from . import mbox

        if self._quiet is not None and _state(now) == self._quiet:
            return  # not written since the scan (`now`: the spool as `_reopened` found it)
        buf, listing = self._buf, self.listing
        released = listing.from_offset(order[0])
        for index in order:
            if not mbox.same_message(buf, listing, index):
                raise MaildropChangedError(
                    f"{self.path}: rewritten since login (message {index + 1} is no longer where "
                    "it was listed); update aborted, nothing written"
                )
            at = listing.from_offset(index)
            if at - released >= _RELEASE_BATCH * 2:
                mbox.release_pages(buf, released, at)
                released = at
        mbox.release_pages(buf, released, listing.from_offset(order[-1] + 1))

    def _check_unchanged(self, boundaries: Sequence[int], fresh: os.stat_result | None = None) -> int:
        """The spool's current size, after proving (cheaply) nobody rewrote what we scanned.

        `boundaries` are From_ line offsets (ascending) checked here, through the mapping; the
        update checks the kept ones it reads. The From_ lines inside a run of deleted messages
        are not checked: those bytes go, whatever they are now. `fresh`: the status of the spool
        opened again by path (brief: `_reopened`), whose size is the one to use.
        """
        fd = self._fd
        assert fd is not None
        path = self.path
        try:
            own = os.fstat(fd)
            named = fresh or os.lstat(path)
        except OSError as e:
            raise MaildropTempError(f"{path}: vanished or unreadable ({_why(e)}); update aborted") from e
        if (named.st_dev, named.st_ino) != (own.st_dev, own.st_ino):
            raise MaildropTempError(f"{path}: replaced by another program since login; update aborted")
        if fresh is not None:
            own = fresh
        length = self._length
        if own.st_size < length:
            raise MaildropTempError(
                f"{path}: shrank from {length} to {own.st_size} bytes since login "
                "(a program ignoring the locks?); update aborted, nothing written"
            )
        buf = self._buf
        changed = bytes(buf[: len(self._head)]) != self._head or (
            bytes(buf[length - len(self._tail) : length]) != self._tail
        )
        # Through the mapping (a page fault maps 16 pages: cheaper than a pread per message),
        # released every 2 MiB so the spool does not come back into RSS just before the update.
        offsets = list(boundaries) if not changed else []
        if offsets and offsets[0] == 0:
            changed = buf[:5] != b"From "
            offsets = offsets[1:]
        released = offsets[0] if offsets else 0
        for offset in offsets:
            if buf[offset - 1 : offset + 5] != b"\nFrom ":  # a From_ line, after a LF
                changed = True
                break
            if offset - released >= _RELEASE_BATCH * 2:
                from . import mbox

                mbox.release_pages(buf, released, offset)
                released = offset
        if offsets:
            from . import mbox

            mbox.release_pages(buf, released, offsets[-1] + 6)
        if changed:
            raise MaildropTempError(
                f"{path}: rewritten since login (a program ignoring the locks?); "
                "update aborted, nothing written"
            )
        return own.st_size


# ------------------------------------------------------------------ reading messages


class _PreadBuffer:
    """The read-only buffer operations mbox's message stream needs, served with pread(2).

    A spool truncated under us gives a short read, and any read error MaildropTempError, instead
    of a SIGBUS. The last slice read is kept, so the stream's rfind-then-slice of one window costs
    one system call; single octets read around it do not evict it.
    """

    __slots__ = ("_cache", "_cache_at", "_fd", "_length", "_path")

    def __init__(self, fd: int | None, length: int, path: str) -> None:
        self._fd = -1 if fd is None else fd
        self._length = length if fd is not None else 0
        self._path = path
        self._cache = b""
        self._cache_at = 0

    def __len__(self) -> int:
        return self._length

    def _read(self, lo: int, hi: int, keep: bool = True) -> bytes:
        if lo < 0:
            lo = 0
        if hi > self._length:
            hi = self._length
        if hi <= lo:
            return b""
        at = self._cache_at
        cache = self._cache
        if at <= lo and hi <= at + len(cache):
            if lo == at and hi == at + len(cache):
                return cache
            return cache[lo - at : hi - at]
        try:
            data = os.pread(self._fd, hi - lo, lo)
            if len(data) < hi - lo:
                parts = [data]
                offset = lo + len(data)
                while offset < hi:
                    more = os.pread(self._fd, hi - offset, offset)
                    if not more:
                        raise OSError(errno.EIO, "shorter than when it was scanned")
                    parts.append(more)
                    offset += len(more)
                data = b"".join(parts)
        except OSError as e:
            raise MaildropTempError(
                f"{self._path}: reading a message failed ({_why(e)}); truncated by a program "
                "ignoring the locks?"
            ) from e
        if keep:
            self._cache, self._cache_at = data, lo
        return data

    def __getitem__(self, key: int | slice) -> int | bytes:
        if key.__class__ is int:
            k = key - self._cache_at  # type: ignore[operator]
            if 0 <= k < len(self._cache):
                return self._cache[k]
        elif isinstance(key, slice):
            lo, hi, step = key.indices(self._length)
            if step != 1:
                raise ValueError("no extended slices")
            return self._read(lo, hi)
        if key < 0:
            key += self._length
        if not 0 <= key < self._length:
            raise IndexError("offset out of range")
        return self._read(key, key + 1, keep=False)[0]

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        lo = max(start, 0)
        k = self._read(lo, self._length if end is None else end).find(sub)
        return k + lo if k >= 0 else -1

    def rfind(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        lo = max(start, 0)
        k = self._read(lo, self._length if end is None else end).rfind(sub)
        return k + lo if k >= 0 else -1


# ------------------------------------------------------------------------------ the index
#
# pop3d/index.py keeps each spool's listing between sessions; nothing it holds is believed
# before the spool proves it here (docs/DATA-SAFETY.md, "The index"). A record is used as it is
# only when the spool's device, inode, size, mtime and ctime are those it recorded (a writer can
# put the mtime back; only the kernel sets the ctime): no byte was written since. A spool that
# grew is scanned from the record's last From_ line on, once every message before it has proved
# to be where and what the record says: its From_ line after its separator, and its From_ line
# + header block (what its start and its UID come from) of the length and CRC-32 the scan stored
# (bulk.check_headers, ~0.5 us a message). Anything else is a full scan, and a new record.
#
# What that proof leaves out is the bodies: a same-length edit in place of an earlier message's
# body, by a program that took the locks, could change its line ends (its LIST size) or write a
# From_ line into it (a message a full scan would list). So before a message the record listed
# is sent (RETR, TOP) or deleted, its content is proved too (mbox.same_content,
# mbox.only_listed_boundaries); a failure refuses it and drops the index, so the next session
# scans. A record is written only with a stat the clock had already passed (_settled): a later
# change cannot then leave the ctime as it was.


def _state(st: os.stat_result) -> tuple[int, ...]:
    """What any change to a file's data changes (with its ctime settled: see _settled)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _ctime_clock() -> int:
    """Now, on the clock the kernel stamps ctimes with (Linux: CLOCK_REALTIME_COARSE, which
    lags the fine clock by up to a tick); elsewhere the fine clock less a generous tick."""
    try:
        return time.clock_gettime_ns(_COARSE_CLOCK)
    except (OSError, AttributeError, TypeError):
        return time.time_ns() - 50_000_000


_COARSE_CLOCK = getattr(time, "CLOCK_REALTIME_COARSE", 5 if sys.platform == "linux" else None)


def _settled(now_ns: int, ctime_ns: int) -> bool:
    """True if a change made after `now_ns` cannot leave the ctime at `ctime_ns`.

    The granularity of the file system's timestamps is guessed from the value (a ctime in whole
    seconds: a 1-second or 2-second file system); nanosecond ones need the clock to have moved on.
    """
    grain = 1
    while grain < 10**9 and ctime_ns % (grain * 10) == 0:
        grain *= 10
    if grain == 10**9:
        grain = 2 * 10**9
    return now_ns >= ctime_ns + grain


def _index_kind(fmt: str) -> bytes:
    """What must match for a record's arrays to be what this scanner makes of the spool."""
    from . import mbox

    return b"mbox listing v%d %s uid_header_cap=%d" % (
        mbox.LISTING_VERSION,
        fmt.encode(),
        limits.UID_HEADER_CAP,
    )


# Messages whose headers one bulk.check_headers call proves: the pages it maps are released
# after each batch (a page fault maps 64 KiB around it), so RSS stays flat.
_CHECK_BATCH = 64


def _headers_changed(buf: mmap.mmap | bytes, listing: Listing, first: int, stop: int) -> int:
    """The first message in [first, stop) whose From_ line or header block is no longer what
    `listing` recorded (bulk.check_headers), or stop if none."""
    from . import bulk, mbox

    _, ends, _, seplen, records = listing.parts()
    args = (ends.tobytes(), ends.itemsize, bytes(seplen), bytes(records))
    released = at = listing.from_offset(first)
    i = first
    while i < stop:
        j = min(stop, i + _CHECK_BATCH)
        bad = bulk.check_headers(buf, args[0], args[1], args[2], args[3], i, j)
        if bad < j:
            mbox.release_pages(buf, released, listing.from_offset(bad))
            return bad
        at = listing.from_offset(j)
        if at - released >= _RELEASE_BATCH * 2:
            mbox.release_pages(buf, released, at)
            released = at
        i = j
    mbox.release_pages(buf, released, at)
    return stop


def _from_line_holds(buf: mmap.mmap | bytes, listing: Listing, index: int) -> bool:
    """Message `index`'s From_ line is still at its offset, after the separator listed."""
    at = listing.from_offset(index)
    if not index:
        return buf[:5] == b"From "
    end = listing.end(index - 1)
    return buf[end - 1 : at + 5] == (b"\n\n" if at - end == 1 else b"\n\r\n") + b"From "


def _indexed_scan(
    index_file: str,
    path: str,
    st: os.stat_result,
    now: int,
    buf: mmap.mmap | bytes,
    fmt: str,
    log: Callable[[str], None],
) -> tuple[Listing, int, int]:
    """The listing of the spool mapped in `buf` (stat `st`, taken at `now`), how many of its
    octets were scanned, and how many of its first messages the record listed: from the record
    in `index_file` if the spool proves it right, else scanned (from the record's last message
    on, if the spool only grew and proved the rest); the record refreshed."""
    from . import index, mbox

    kind = _index_kind(fmt)
    record = index.load(index_file, log)
    proved = None
    if record is not None:
        try:
            proved = _proved(record, kind, path, st, buf, fmt, index_file, log)
        except Exception as e:  # a record that does not fit the spool (crafted, or a bug): scan
            log(f"index {index_file}: {e!r}; scanning the whole spool")
    if proved is None:
        listing, start, indexed = mbox.scan(buf, fmt), 0, 0
    else:
        listing, start, indexed = proved
        if start < 0:  # the record is current
            return listing, 0, indexed
    scanned = len(buf) - start
    if _settled(now, st.st_ctime_ns):
        _save_index(index_file, kind, path, index.state(st), listing, log, indexed)
    return listing, scanned, indexed


def _proved(
    record: object,
    kind: bytes,
    path: str,
    st: os.stat_result,
    buf: mmap.mmap | bytes,
    fmt: str,
    index_file: str,
    log: Callable[[str], None],
) -> tuple[Listing, int, int] | None:
    """The record's listing, -1 and its message count if the spool is still what it describes;
    if it only grew and every message but the last proves unchanged, the listing resumed from
    the record, the offset the scan resumed at and the number of messages taken as they were;
    else None."""
    from . import index, mbox

    assert isinstance(record, index.Record)
    state = index.state(st)
    if record.kind != kind or record.spool != path or record.state[:2] != state[:2]:
        return None  # another scanner, spool or file (same path, new inode)
    size = record.state[2]
    if state != record.state and st.st_size <= size:
        return None  # rewritten (a same-size rewrite changes the ctime), or truncated
    prior = mbox.Listing.from_parts(record.parts, size)
    if not prior.count:
        return (prior, -1, 0) if state == record.state else None  # empty then: nothing to resume
    last = prior.count - 1
    if state == record.state:
        # Not written since (the ctime says so); the last message's header, as a cheap belt.
        # What the record took on trust when it was made is still to be proved before use.
        if _headers_changed(buf, prior, last, last + 1) == last + 1:
            return prior, -1, min(record.unproved, prior.count)
        log(f"index {index_file}: the spool's bytes differ from what it recorded; scanning")
        return None
    changed = _headers_changed(buf, prior, 0, last)
    if changed < last or not _from_line_holds(buf, prior, last):
        log(f"index {index_file}: message {changed + 1} is not where or what it recorded; scanning")
        return None
    return mbox.resume(buf, prior, last, fmt), prior.from_offset(last), last


def _save_index(
    index_file: str,
    kind: bytes,
    path: str,
    state: tuple[int, int, int, int, int],
    listing: Listing,
    log: Callable[[str], None],
    unproved: int,
) -> None:
    """`unproved`: how many of the listing's first messages were taken from a record, their
    content not proved (Maildrop._indexed): the next session proves them before use too."""
    from . import index

    index.save(index_file, index.Record(kind, path, state, listing.parts(), unproved), log)


def _drop_index(md: Maildrop, why: str) -> None:
    """A proof failed: the index goes (the next session scans) and is not rewritten by us."""
    index_file, md._index = md._index, None  # its messages are still proved before use
    if index_file is None:
        return
    md._log(f"index {index_file}: {why}; dropped, the next session scans the whole spool")
    try:
        os.unlink(index_file)
    except FileNotFoundError:
        pass
    except OSError as e:
        md._log(f"index {index_file}: cannot remove it ({_why(e)})")


def _prove_content(md: Maildrop, index: int) -> None:
    """Before message `index` is sent: if the record listed it, its content is what a full scan
    finds (mbox.same_content), else MaildropChangedError (nothing of it is sent) and no index."""
    from . import mbox

    if mbox.same_content(md._message_reader(), md.listing, index, md._fmt):
        md._content_proved.add(index)
        return
    _drop_index(md, f"message {index + 1}'s content is not what it listed")
    raise MaildropChangedError(
        f"{md.path}: message {index + 1} was rewritten in place since it was indexed "
        "(its size or its From_ lines); not sent"
    )


def _prove_deleted(md: Maildrop, order: Sequence[int], written: bool = False) -> None:
    """Before the update, under the locks: no run of deleted messages that the record listed
    (all of them if another program `written` during the session: a proof made at RETR may be
    out of date) holds another message (a From_ line written into a body:
    mbox.only_listed_boundaries), else MaildropTempError (nothing deleted) and no index."""
    from . import mbox

    runs: list[list[int]] = []
    for index in order:
        if not written and (index >= md._indexed or index in md._content_proved):
            continue
        if runs and runs[-1][1] == index:
            runs[-1][1] += 1
        else:
            runs.append([index, index + 1])
    for first, after in runs:
        if not mbox.only_listed_boundaries(md._buf, md.listing, first, after):
            _drop_index(md, f"messages {first + 1}-{after} hold a message it did not list")
            raise MaildropTempError(
                f"{md.path}: a message was written into message {first + 1}..{after} in place since "
                "it was listed; update aborted, nothing deleted"
            )


def _index_after_update(
    index_file: str,
    path: str,
    fd: int,
    listing: Listing,
    deleted: list[int],
    fmt: str,
    log: Callable[[str], None],
    written: bool,
    unproved: int,
) -> None:
    """After our own update, under the locks: the record of the spool as it now is, from the
    old listing without the deleted messages (moved down), the last one rescanned. `written`:
    another program wrote to the spool during the session (brief MDA locks): the kept messages
    then prove their headers at their new offsets first, and their content is left to prove
    (`unproved`: how many of the kept messages came unproved from the record, kept so, at the
    start: deletion keeps the order). Waits up to INDEX_SETTLE_WAIT for the
    clock to pass the update's ctime; never fails the update."""
    from . import index, mbox

    try:
        kept = listing.without(deleted)
        deadline = time.monotonic() + limits.INDEX_SETTLE_WAIT
        while True:
            now = _ctime_clock()
            st = os.fstat(fd)
            if _settled(now, st.st_ctime_ns):
                break
            if time.monotonic() >= deadline:
                return  # the next session scans, and writes the record
            time.sleep(0.001)
        buf: mmap.mmap | bytes = b""
        if st.st_size:
            buf = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            last = max(kept.count - 1, 0)
            if (
                written
                and kept.count
                and (_headers_changed(buf, kept, 0, last) < last or not _from_line_holds(buf, kept, last))
            ):
                log(f"index {index_file}: rewritten during the session; dropped, the next session scans")
                try:
                    os.unlink(index_file)
                except FileNotFoundError:
                    pass
                return
            if written:
                unproved = max(unproved, last)
            fresh = mbox.resume(buf, kept, last, fmt)
            _save_index(index_file, _index_kind(fmt), path, index.state(st), fresh, log, unproved)
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()
    except (OSError, ValueError, MemoryError, mbox.MboxFormatError) as e:
        log(f"index {index_file}: not refreshed after the update ({e}); the next session scans")
