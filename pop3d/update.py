"""The crash-safe in-place update of an mbox spool, and the recovery of an interrupted one.

Knows nothing of POP3 or of mbox syntax: given the spool's descriptor, the offset P of the first
byte that goes and the kept byte ranges after it, `rewrite` makes the spool spool[0:P] + those
bytes in place (same inode, owner, group, mode: an MDA that already opened the spool and waits
for the fcntl lock must append to the live file, not to a replaced one), through a redo journal
beside the spool. `recover`, called under the maildrop's locks before every scan, finishes an
update a crash interrupted. docs/UPDATE.md states the invariants; the step numbers used by the
test hook `POP3D_TEST_UPDATE_STOP_AFTER=N` are listed there and marked `_step(N)` below.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from . import limits, names

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

STOP_AFTER_ENV = "POP3D_TEST_UPDATE_STOP_AFTER"

_JOURNAL_MAGIC = b"pop3d journal v2"  # 16 bytes
# Written by pop3d before the v2 format: not replayed here, and never put aside (see recover).
_OLD_JOURNAL_MAGIC = b"pop3d journal v1"
# magic, spool inode, P, N, S, J, m, nonce, CRC-32 of the new tail, number of extents
_JOURNAL_HEADER = "<16sQQQQQQ16sQQ"
_NONCE_LEN = 16
_ALIGN = 4096
# The update starts the writeback of what it wrote every this many bytes (see _start_writeback).
_WRITEBACK_BATCH = 8 * 1024 * 1024


class UpdateError(Exception):
    """The update was not done (nothing deleted), or could not be finished now (its journal is
    kept and the next `recover` finishes it), or a leftover journal blocks the spool. The text
    is for the log only (it names paths)."""


class ChangedError(Exception):
    """A kept From_ line is no longer where the scan found it (nothing was written yet)."""


class _OldJournalError(Exception):
    """A committed journal in a format this version cannot replay: the spool may be half moved."""


class _UnusableJournalError(Exception):
    """A leftover journal that cannot be applied to this spool (kept aside for the admin)."""


class _ShortReadError(OSError):
    """The spool ended before bytes the update must read (someone truncated it)."""


def _why(e: OSError) -> str:
    return e.strerror or str(e)


# A run, (fd, offset, length), is a stretch of bytes of the spool or of the journal.


def _step(number: int) -> None:
    """Test hook: stop dead (like SIGKILL) right after step `number` of the update."""
    if os.environ.get(STOP_AFTER_ENV) == str(number):
        os._exit(137)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _chunks(
    runs: Iterable[tuple[int, int, int]],
    bufs: Sequence[bytearray],
    tap: Callable[[bytearray, int, int, int], None] | None = None,
    slots: _CrcBehind | None = None,
) -> Iterator[memoryview]:
    """The runs' bytes in order, gathered into `bufs` and yielded one buffer-full at a time.

    Reused buffers: preadv(2) fills them in place, so no bytes object is allocated per chunk,
    and small runs (many short kept extents) still leave in large writes. A view is valid
    until the step that comes back to its buffer; with `slots`, the buffer to fill next is the
    one `slots.claim()` hands back (it waits until the helper has finished with it).
    `tap(buf, offset, at, length)` sees each piece as it lands in `buf[at:]`. EIO
    (_ShortReadError) if a file is shorter than a run.
    """
    views = [memoryview(buf) for buf in bufs]
    size = len(bufs[0])
    i = slots.claim() if slots is not None else 0
    fill = 0
    for fd, offset, length in runs:
        while length:
            k = min(size - fill, length)
            got = 0
            while got < k:
                n = os.preadv(fd, [views[i][fill + got : fill + k]], offset + got)
                if n <= 0:
                    raise _ShortReadError(errno.EIO, "file shorter than the update expects")
                got += n
            if tap is not None:
                tap(bufs[i], offset, fill, k)
            fill += k
            offset += k
            length -= k
            if fill == size:
                yield views[i]
                i = slots.claim() if slots is not None else (i + 1) % len(views)
                fill = 0
    if fill:
        yield views[i][:fill]


class _CrcBehind:
    """CRC-32 of the views handed over, in order, computed by a helper thread meanwhile.

    binascii.crc32 releases the GIL: with a free core, the journal pass costs its copy alone
    (the CRC runs at about 2.5-5 GB/s here, as slow as the copy). Two slots, used in turn: the
    caller claims one before refilling its buffer and submits the view; the buffer is not
    refilled before the helper is done with it. `_thread` is built into the interpreter:
    nothing to import after the privilege drop. Without a thread, the CRC is computed inline.
    """

    __slots__ = ("_claimed", "_error", "_free", "_next", "_ready", "_running", "_views", "crc")

    def __init__(self) -> None:
        import _thread

        self.crc = 0
        self._error: BaseException | None = None
        self._views: list[memoryview | None] = [None, None]
        self._ready = [_thread.allocate_lock(), _thread.allocate_lock()]
        self._free = [_thread.allocate_lock(), _thread.allocate_lock()]
        for lock in self._ready:
            lock.acquire()
        self._next = 0
        self._claimed = False
        try:
            _thread.start_new_thread(self._work, ())
            self._running = True
        except RuntimeError:
            self._running = False

    def _work(self) -> None:
        import binascii

        i = 0
        while True:
            self._ready[i].acquire()
            view, self._views[i] = self._views[i], None
            if view is None:
                self._free[i].release()
                return
            try:
                if self._error is None:
                    self.crc = binascii.crc32(view, self.crc)
            except BaseException as e:
                self._error = e
            self._free[i].release()
            i ^= 1

    def claim(self) -> int:
        """The slot (buffer index) to fill next, once the helper is done with it."""
        i = self._next
        if self._running:
            self._free[i].acquire()
        self._claimed = True
        return i

    def submit(self, view: memoryview | None) -> None:
        """Hand over the claimed slot's bytes (None: stop the helper)."""
        i = self._next
        self._next = i ^ 1
        self._claimed = False
        if not self._running:
            if view is not None:
                import binascii

                self.crc = binascii.crc32(view, self.crc)
            return
        self._views[i] = view
        self._ready[i].release()

    def close(self) -> int:
        """Wait for everything submitted, end the helper, and return the CRC."""
        if self._running:
            if not self._claimed:
                self.claim()
            stop = self._next
            self.submit(None)
            self._free[stop].acquire()  # released by the helper as it leaves
            self._running = False
        if self._error is not None:
            raise self._error
        return self.crc


def _from_checker(
    fd: int, offsets: Sequence[int]
) -> tuple[Callable[[bytearray, int, int, int], None], Callable[[], None]]:
    """A `_chunks` tap, and its final call: each of `offsets` (ascending, all inside the runs
    read) must still hold a From_ line after a LF, else ChangedError. The bytes are already
    in the buffer; a window cut by a piece's edge (an extent's first message: its LF belongs
    to the deleted message before it) is read apart."""
    state = [0]
    count = len(offsets)

    def tap(buf: bytearray, offset: int, at: int, length: int) -> None:
        i = state[0]
        end = offset + length
        while i < count and offsets[i] < end:
            k = offsets[i]
            if k < offset:
                raise ChangedError(f"From_ line at {k} outside the moved bytes")
            if k > offset and k + 5 <= end:
                ok = buf.startswith(b"\nFrom ", at + k - offset - 1)
            else:
                ok = os.pread(fd, 6, k - 1) == b"\nFrom "
            if not ok:
                raise ChangedError(f"no From_ line at offset {k} any more")
            i += 1
        state[0] = i

    def finish() -> None:
        if state[0] != count:
            raise ChangedError(f"From_ line at {offsets[state[0]]} outside the moved bytes")

    return tap, finish


def _crc(runs: Iterable[tuple[int, int, int]]) -> int:
    """CRC-32 of the runs' bytes (binascii: zlib's CRC, already imported before the privilege drop)."""
    import binascii

    crc = 0
    for chunk in _chunks(runs, [bytearray(limits.UPDATE_CHUNK)]):
        crc = binascii.crc32(chunk, crc)
    return crc


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing dirty pages to disk now, without waiting: the next fsync finds less to do.

    POSIX_FADV_DONTNEED starts the writeback of the range's dirty pages on Linux (and drops
    only pages that are already clean: none of those just written). Only a hint: durability
    still comes from fsync/fdatasync alone.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _skip_runs(extents: Sequence[tuple[int, int]], skip: int) -> Iterator[tuple[int, int]]:
    """The extents' runs from tail offset `skip` on."""
    for source, length in extents:
        if skip >= length:
            skip -= length
            continue
        yield source + skip, length - skip
        skip = 0


def _fsync_dir(path: str) -> None:
    """Make a create/rename/unlink in the spool's directory durable."""
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some file systems cannot sync a directory
            raise
    finally:
        os.close(dfd)


def _unlink_quiet(path: str) -> None:
    """Best-effort clean-up (a failure here is reported by whatever fails next)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _close_behind(fd: int) -> None:
    """Close an unlinked journal in a helper thread: its last close frees its page cache
    (about 40 ms per 256 MiB here), and nothing needs to wait for that, not even QUIT's reply.
    `_thread` is built into the interpreter: nothing to import after the privilege drop."""
    import _thread

    try:
        _thread.start_new_thread(_close_quiet, (fd,))
    except RuntimeError:
        os.close(fd)


class _Journal:
    """What the update will make of the spool: spool[0:P] + the tail built from `extents`.

    The first J bytes of the tail are stored in the journal at `data_off` (their sources lie
    where the new tail or the mark will be written); the rest is read from the spool at sources
    >= N + m, which nothing touches until the truncate. `crc` is the CRC-32 of the whole tail.
    """

    __slots__ = ("J", "N", "P", "S", "crc", "data_off", "extents", "ino", "m", "nonce")

    def __init__(self, ino: int, P: int, N: int, S: int, J: int, m: int, nonce: bytes,
                 crc: int, extents: Sequence[tuple[int, int]], data_off: int) -> None:  # fmt: skip
        self.ino, self.P, self.N, self.S, self.J, self.m = ino, P, N, S, J, m
        self.nonce, self.crc, self.extents, self.data_off = nonce, crc, extents, data_off

    def mark(self) -> bytes:
        return self.nonce[: self.m]

    def pack_header(self) -> bytes:
        import array
        import struct
        import sys

        from pop3d.bulk import builtin_sha256

        head = struct.pack(
            _JOURNAL_HEADER, _JOURNAL_MAGIC, self.ino, self.P, self.N, self.S, self.J, self.m,
            self.nonce, self.crc, len(self.extents),
        )  # fmt: skip
        flat = array.array("Q", [v for extent in self.extents for v in extent])
        if sys.byteorder != "little":
            flat.byteswap()
        body = head + flat.tobytes()
        return body + builtin_sha256()(body).digest()

    @staticmethod
    def header_length(extents: int) -> int:
        import struct

        return struct.calcsize(_JOURNAL_HEADER) + 16 * extents + 32

    @classmethod
    def read(cls, jfd: int) -> _Journal:
        """Parse and check a journal; _UnusableJournalError if it is not a whole, sane one."""
        import array
        import struct
        import sys

        from pop3d.bulk import builtin_sha256

        size = os.fstat(jfd).st_size
        fixed = struct.calcsize(_JOURNAL_HEADER)
        head = os.pread(jfd, fixed, 0)
        if os.pread(jfd, 16, 0) == _OLD_JOURNAL_MAGIC:
            raise _OldJournalError("a journal of an older pop3d (format v1)")
        if len(head) != fixed or head[:16] != _JOURNAL_MAGIC:
            raise _UnusableJournalError("not a pop3d journal (bad magic or too short)")
        _, ino, P, N, S, J, m, nonce, crc, count = struct.unpack(_JOURNAL_HEADER, head)
        if count > size // 16:
            raise _UnusableJournalError("corrupt header (extent count)")
        raw = os.pread(jfd, 16 * count + 32, fixed)
        if len(raw) != 16 * count + 32 or builtin_sha256()(head + raw[:-32]).digest() != raw[-32:]:
            raise _UnusableJournalError("corrupt header (checksum)")
        flat = array.array("Q")
        flat.frombytes(raw[:-32])
        if sys.byteorder != "little":
            flat.byteswap()
        extents = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        data_off = -(-(fixed + 16 * count + 32) // _ALIGN) * _ALIGN
        total, previous = 0, P
        for source, length in extents:
            if source < previous or length == 0:
                raise _UnusableJournalError("corrupt header (extents)")
            total += length
            previous = source + length
        if not (P + total == N < S and 1 <= m <= min(_NONCE_LEN, S - N) and total >= J
                and previous <= S and data_off + J <= size):  # fmt: skip
            raise _UnusableJournalError("corrupt header (layout)")
        return cls(ino, P, N, S, J, m, nonce, crc, extents, data_off)

    def stored(self, fd: int, jfd: int) -> list[tuple[int, int, int]]:
        """The new tail's sources after a crash: the stored bytes, then the spool from N + m on."""
        return [(jfd, self.data_off, self.J), *((fd, s, n) for s, n in _skip_runs(self.extents, self.J))]

    def live(self, fd: int, jfd: int) -> Iterator[tuple[int, int, int]]:
        """The new tail's sources while the update that wrote the journal still runs.

        A forward copy is a memmove: the source of each tail byte lies above its target, so
        every byte is read before the move overwrites it, and the spool serves it straight from
        the page cache. Only the sources under the mark, [N, N + m), come from the journal.
        """
        lo, hi = self.N, self.N + self.m
        t = 0
        for source, length in self.extents:
            end = source + length
            for a, b in ((source, min(end, lo)), (max(source, lo), min(end, hi)), (max(source, hi), end)):
                if a < b and a >= lo and b <= hi:  # under the mark: from the journal
                    yield jfd, self.data_off + t + a - source, b - a
                elif a < b:
                    yield fd, a, b - a
            t += length


def rewrite(
    fd: int,
    path: str,
    P: int,
    extents: list[tuple[int, int]],
    S: int,
    log: Callable[[str], None],
    checks: Sequence[int] = (),
    replaces: tuple[int, int] | None = None,
) -> None:
    """Make the spool spool[0:P] + the extents' bytes, in place and crash-safe.

    `S` is the spool's current size; every extent lies in [P, S), in ascending order.
    `checks`: From_ line offsets inside the extents to verify while reading them (before the
    commit point): ChangedError, and nothing happened, if one moved. `replaces`: (st_dev,
    st_ino) of the journal this update's own replaces at its commit (a chained update); any
    other file at the journal's name aborts the update, untouched.
    """
    T = sum(length for _, length in extents)
    N = P + T
    if T == 0:  # only a final run of messages deleted: a truncate is atomic, no journal needed
        try:
            if os.fstat(fd).st_size != S:  # appended since S was taken: it must not be cut off
                raise ChangedError(f"the size changed from {S} during the update")
            os.ftruncate(fd, P)
            os.fsync(fd)
        except OSError as e:
            raise UpdateError(f"{path}: truncate failed ({_why(e)}); update aborted") from e
        _step(7)
        return
    m = min(_NONCE_LEN, S - N)
    # The journal stores every tail byte whose source lies below N + m (it is overwritten by the
    # move or by the mark); the rest is referenced in place.
    J = 0
    for source, length in extents:
        if source >= N + m:
            break
        J += min(length, N + m - source)
    journal = _Journal(os.fstat(fd).st_ino, P, N, S, J, m, b"\0" + os.urandom(_NONCE_LEN - 1), 0, extents, 0)
    journal.data_off = -(-_Journal.header_length(len(extents)) // _ALIGN) * _ALIGN
    need = journal.data_off + J
    jpath = names.journal(path)
    tpath = names.journal_temp(path)
    try:
        vfs = os.fstatvfs(fd)
        if vfs.f_bavail * vfs.f_frsize < need:
            raise OSError(errno.ENOSPC, f"the journal needs {need} bytes, the file system has less")
        jfd = _create_temp(path, tpath, log)
    except OSError as e:
        raise UpdateError(f"{path}: update aborted, nothing deleted: {_why(e)}") from e
    committed = done = False
    try:
        try:
            _pwrite_all(jfd, _JOURNAL_MAGIC, 0)  # from now on `_drop_temp` can tell it is ours
            try:
                os.posix_fallocate(jfd, 0, need)  # reserve: no ENOSPC/EDQUOT once we are writing
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                # No reservation on this file system: a write failing below still aborts cleanly.
                # The journal must still have its full length (J may be 0: only the header is
                # written), or recovery would judge its layout corrupt.
                os.ftruncate(jfd, need)
            journal.crc = _journal_pass(fd, jfd, journal, checks)
            _pwrite_all(jfd, journal.pack_header(), 0)
            _step(1)
            os.fsync(jfd)
            _step(2)
            _check_free(jpath, replaces)
            os.rename(tpath, jpath)  # the commit point: from here on the update is redone, never lost
            committed = True
            _fsync_dir(path)
            _step(3)
        except (OSError, ChangedError) as e:
            # The spool has not been touched: drop the journal; nothing happened. (Should that
            # unlink fail too, the next open rolls the untouched spool forward: also consistent.)
            _unlink_quiet(jpath if committed else tpath)
            if isinstance(e, ChangedError):
                raise
            raise UpdateError(f"{path}: update aborted, nothing deleted: {_why(e)}") from e
        try:
            _apply(fd, jfd, journal, path, log, recovering=False)
            done = True
        except OSError as e:
            raise UpdateError(
                f"{path}: update interrupted ({_why(e)}); journal {jpath} kept, "
                "the next open of the maildrop completes it"
            ) from e
    finally:
        if done:
            _close_behind(jfd)
        else:
            os.close(jfd)


def _journal_pass(fd: int, jfd: int, journal: _Journal, checks: Sequence[int]) -> int:
    """Step 1's one read of the tail: CRC-32 of all of it (by a helper thread, see
    _CrcBehind), the first J bytes copied into the journal (writeback started as it goes, so
    the fsync at the commit point finds little left), the kept From_ lines checked. The CRC."""
    J = journal.J
    base = journal.data_off
    done = flushed = 0
    bufs = [bytearray(limits.UPDATE_CHUNK), bytearray(limits.UPDATE_CHUNK)]
    tap, finish = _from_checker(fd, checks)
    crc = _CrcBehind()
    try:
        for chunk in _chunks([(fd, s, n) for s, n in journal.extents], bufs, tap, crc):
            crc.submit(chunk)
            if done < J:
                part = chunk[: J - done]
                _pwrite_all(jfd, part, base + done)
                if done + len(part) - flushed >= _WRITEBACK_BATCH:
                    _start_writeback(jfd, base + flushed, done + len(part) - flushed)
                    flushed = done + len(part)
            done += len(chunk)
        finish()
    except BaseException:
        crc.close()
        raise
    return crc.close()


def _apply(fd: int, jfd: int, j: _Journal, path: str, log: Callable[[str], None], recovering: bool) -> str:
    """Redo a committed journal: mark, move the tail, truncate, drop the journal (idempotent).

    The mark (a random nonce, first byte NUL) at offset N tells "not yet truncated" from
    "truncated, and maybe appended to since": only a truncate removes it.
    """
    size = os.fstat(fd).st_size
    marked = size >= j.N + j.m and os.pread(fd, j.m, j.N) == j.mark()
    if recovering:
        if not marked and size >= j.N and _crc([(fd, j.P, j.N - j.P)]) == j.crc:
            # Truncated already (whatever follows N was appended afterwards), or never needed.
            os.fsync(fd)
            os.unlink(names.journal(path))
            _fsync_dir(path)
            return "it had already been completed"
        try:
            whole = _crc(j.stored(fd, jfd)) == j.crc
        except _ShortReadError:
            whole = False
        if not whole:
            raise _UnusableJournalError("the messages it would move no longer match the spool")
    if recovering or not marked:
        # A mark read back during recovery may exist only in the page cache (the crashed
        # session died before its fdatasync, or that fdatasync failed): make it durable again
        # before the first tail byte is written.
        _pwrite_all(fd, j.mark(), j.N)
        os.fdatasync(fd)
    _step(4)
    offset = flushed = j.P
    sources = j.stored(fd, jfd) if recovering else j.live(fd, jfd)
    for chunk in _chunks(sources, [bytearray(limits.UPDATE_CHUNK)]):
        _pwrite_all(fd, chunk, offset)
        if offset == j.P:
            _step(5)
        offset += len(chunk)
        if offset - flushed >= _WRITEBACK_BATCH:
            _start_writeback(fd, flushed, offset - flushed)
            flushed = offset
    os.fdatasync(fd)
    _step(6)
    size = os.fstat(fd).st_size
    if size > j.S:
        # Appended (by a writer ignoring the locks) during the update or after a crash: keep it.
        log(f"{path}: {size - j.S} bytes appended during the update; kept")
        rewrite(fd, path, j.N, [(j.S, size - j.S)], size, log, replaces=_identity(os.fstat(jfd)))
        return "completed; mail appended meanwhile kept"
    os.ftruncate(fd, j.N)
    os.fsync(fd)
    _step(7)
    os.unlink(names.journal(path))
    _fsync_dir(path)
    _step(8)
    return "completed"


def recover(fd: int | None, path: str, log: Callable[[str], None]) -> None:
    """Under the lock, before scanning: finish an update a crash interrupted.

    Touches only files it has proved are pop3d's (see `_ours`): the temporary journal of an
    update that never committed is deleted, a journal is completed or put aside; a file of any
    other kind at those names is logged and left alone.
    """
    _drop_temp(path, names.journal_temp(path), log)
    _adopt_legacy(path, log)
    jpath = names.journal(path)
    try:
        jfd = os.open(jpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            log(f"{path}: ignoring {jpath}: a symbolic link, not our journal")
            return
        raise UpdateError(f"{path}: cannot open update journal {jpath}: {_why(e)}") from e
    try:
        if not _ours(os.fstat(jfd)):
            log(f"{path}: ignoring {jpath}: not a journal pop3d wrote (type, links, owner or mode)")
            return
        try:
            journal = _Journal.read(jfd)
            if fd is None:
                raise _UnusableJournalError("the spool no longer exists")
            if journal.ino != os.fstat(fd).st_ino:
                raise _UnusableJournalError("the spool was replaced (another inode)")
            outcome = _apply(fd, jfd, journal, path, log, recovering=True)
        except _OldJournalError as e:
            raise _old_journal_error(path, jpath, e) from None
        except _UnusableJournalError as e:
            # At a name only pop3d uses, owned and written as pop3d writes: ours, kept for the admin.
            aside = _put_aside(path, jpath, jfd)
            log(f"{path}: an interrupted update cannot be completed: {e}; journal kept as {aside}")
            return
        except OSError as e:
            raise UpdateError(
                f"{path}: completing an interrupted update failed ({_why(e)}); retried at next open"
            ) from e
        log(f"{path}: interrupted update recovered from its journal: {outcome}")
    finally:
        os.close(jfd)


def _old_journal_error(path: str, jpath: str, e: _OldJournalError) -> UpdateError:
    # Its update may be half done: serving or updating the spool now could lose mail.
    return UpdateError(
        f"{path}: {jpath} is {e}, which this version cannot complete: the spool may be "
        "half updated and is not served; complete it with the pop3d that wrote it, or "
        "check the spool by hand and remove the journal"
    )


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _ours(st: os.stat_result) -> bool:
    """A file as pop3d leaves its journals: regular, one link, owned by the uid it writes as for
    this maildrop (the session's: the spool's owner, never root), no group or other write
    permission (not a file planted by another member of group mail)."""
    mode = st.st_mode
    return stat.S_ISREG(mode) and st.st_nlink == 1 and st.st_uid == os.geteuid() and not mode & 0o022


def _drop_temp(path: str, tpath: str, log: Callable[[str], None]) -> bool:
    """Delete the temporary journal of an update that never committed, once proved ours.

    Proof: `_ours`, and either empty (created, nothing written yet) or opening with the journal
    magic, written right after its creation. True if the name is free now.
    """
    try:
        tfd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return True
    except OSError as e:
        log(f"{path}: {tpath} is not a temporary journal pop3d wrote ({_why(e)}); left alone")
        return False
    try:
        st = os.fstat(tfd)
        proved = _ours(st) and (st.st_size == 0 or os.pread(tfd, len(_JOURNAL_MAGIC), 0) == _JOURNAL_MAGIC)
        if not proved:
            log(f"{path}: {tpath} is not a temporary journal pop3d wrote; left alone")
            return False
        try:
            if _identity(os.lstat(tpath)) != _identity(st):
                log(f"{path}: {tpath} was replaced while being checked; left alone")
                return False
            os.unlink(tpath)
        except FileNotFoundError:
            return True
        log(f"{path}: removed an uncommitted update journal (the spool was never touched)")
        return True
    except OSError as e:
        log(f"{path}: cannot remove {tpath}: {_why(e)}")
        return False
    finally:
        os.close(tfd)


def _create_temp(path: str, tpath: str, log: Callable[[str], None]) -> int:
    """The temporary journal, created exclusively (a leftover is removed only if proved ours)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(tpath, flags, 0o600)
    except FileExistsError:
        if not _drop_temp(path, tpath, log):
            raise OSError(errno.EEXIST, f"{tpath} exists and is not pop3d's") from None
    return os.open(tpath, flags, 0o600)


def _check_free(jpath: str, replaces: tuple[int, int] | None) -> None:
    """Before the commit's rename: nothing but the journal it replaces may sit at its name
    (rename would delete it). A file planted there meanwhile aborts the update instead."""
    try:
        st = os.lstat(jpath)
    except FileNotFoundError:
        return
    if replaces is None or _identity(st) != replaces:
        raise OSError(errno.EEXIST, f"{jpath} exists and is not this update's journal")


def _put_aside(path: str, jpath: str, jfd: int) -> str:
    """Rename our journal to a new name in pop3d's namespace (never over a file); its new name,
    or `jpath` if it stays (a failure here loses nothing: it is retried at the next open)."""
    aside = names.unusable_journal(path, f"{int(time.time())}-{os.getpid()}")
    try:
        os.lstat(aside)
        return jpath
    except FileNotFoundError:
        pass
    try:
        if _identity(os.lstat(jpath)) != _identity(os.fstat(jfd)):
            return jpath
        os.rename(jpath, aside)
    except OSError:
        return jpath
    return aside


def _adopt_legacy(path: str, log: Callable[[str], None]) -> None:
    """Move the journal an earlier pop3d left at `<spool>.pop3d-journal` to pop3d's namespace.

    That name is reachable by a user name (`alice.pop3d-journal` was a valid user), so the file
    is moved only once proved a pop3d journal: `_ours`, a whole header (magic and SHA-256) for
    this spool's inode. Anything else there (another user's spool) is not touched; an earlier
    format still refuses the maildrop (see `recover`). Its temporary (`.tmp`) was never
    committed and cannot be proved ours: it is left alone.
    """
    legacy = names.legacy_journal(path)
    try:
        lfd = os.open(legacy, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return  # missing, a symbolic link, unreadable: not ours to judge
    try:
        st = os.fstat(lfd)
        if not _ours(st):
            return
        try:
            journal = _Journal.read(lfd)
        except _OldJournalError as e:
            raise _old_journal_error(path, legacy, e) from None
        except _UnusableJournalError:
            return  # not proved a journal: someone's file
        try:
            spool = os.stat(path)
        except FileNotFoundError:
            return
        if journal.ino != spool.st_ino:
            return
        jpath = names.journal(path)
        try:
            os.lstat(jpath)
            log(f"{path}: {legacy} left alone: {jpath} exists")
            return
        except FileNotFoundError:
            pass
        os.rename(legacy, jpath)
        _fsync_dir(path)
        log(f"{path}: journal of an earlier pop3d moved from {legacy} to {jpath}")
    except OSError as e:
        raise UpdateError(f"{path}: cannot move the journal {legacy}: {_why(e)}") from e
    finally:
        os.close(lfd)
