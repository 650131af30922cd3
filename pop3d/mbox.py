"""The mbox spool scanner: message bounds, octet sizes as sent, UIDs, and message streams.

Format (mboxo / mboxrd, as MDAs write them):

* A message starts at a ``From `` line at offset 0 or right after a blank line (``\\n\\n`` or
  ``\\n\\r\\n`` before ``From ``); a ``From `` line anywhere else is body text. Content-Length is ignored.
* Content is the bytes after the From_ line's LF up to, not including, the one blank line the MDA
  wrote before the next From_ line; further blank lines belong to the message. The last message
  likewise loses one trailing blank line at EOF (``\\n`` after a LF, or ``\\r\\n`` after a LF).
  A From_ line without LF at EOF is an empty message.
* Sent form (what ``size()`` counts and ``iter_message`` yields, before dot-stuffing): every bare LF
  becomes CRLF, a stored CRLF stays, a bare CR stays, a final line without LF gets CRLF. mboxrd only:
  a line matching ``>+From `` loses one ``>``. No other byte is changed.

UIDs (UIDL) are computed without writing to the spool: the first 12 bytes (24 hex digits) of the
SHA-256 of the From_ line plus the header block (up to the first blank line, capped at
``limits.UID_HEADER_CAP`` octets) from which the headers local MUAs rewrite are removed (Status,
X-Status, X-Keywords, X-UID, X-IMAP, X-IMAPbase, Content-Length, Lines, with their continuation
lines; names case-insensitive). So a UID survives other messages being deleted, new mail being
appended and a MUA marking the message read. The From_ line (sender, delivery time to the second)
and Received/Message-ID headers make digests distinct in practice; when two messages still share a
digest (byte-identical duplicate deliveries, or a hash collision) the 2nd, 3rd... in file order get
``-2``, ``-3``... appended, so UIDs are always unique inside the maildrop. The one limit: deleting
the first of two such twins renames the second (it becomes the first). SHA-256 is used because it
is the fastest hashlib digest on CPUs with SHA extensions; its strength is not relied on. Changing
the digest, its length or the cap renames every UID, so they are fixed for good.

Memory: the listing is a few arrays (29 octets per message in a spool under 2 GiB: offsets and
sizes are 4-octet integers while they fit; 41 beyond), never an object per message. The
scanner and the streams read ``mmap`` buffers window by window and release the pages behind them
(``MADV_DONTNEED``), so RSS stays flat however large the spool or message: pass a read-only
(``ACCESS_READ``) mapping, never a private copy-on-write one with modifications.

Speed: one pass, one Python iteration per message and per ``MBOX_SCAN_WINDOW``, never per line.
Each window is cut right after its last LF (so no CRLF pair or quoted From line straddles two),
copied once, and searched and counted in place: separators with backward ``rfind`` (CPython keys
it on the needle's first octet, a rare LF, and it beats ``find`` here), sizes with bulk
``bytes.count``. The floor is ``bytes.count(b"\\n")``, a scalar loop in CPython 3.11.
"""

from __future__ import annotations

import mmap
import os
from array import array

from pop3d import bulk, limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from re import Pattern
    from typing import Any

    Buffer = bytes | bytearray | mmap.mmap

__all__ = [
    "Listing",
    "MboxFormatError",
    "iter_message",
    "message_bytes",
    "only_listed_boundaries",
    "release_pages",
    "resume",
    "same_content",
    "same_message",
    "scan",
]

# The maildrop index stores listings (pop3d/index.py): bump this whenever scan() would give other
# arrays for the same bytes, so that no index written by an older scanner is used.
LISTING_VERSION = 2
_DIGEST_SIZE = 12  # octets of the header digest kept in a UID: 24 hex digits
_SHA_KEPT = 16  # octets of the SHA-256 stored per message: the UID's 12, then 4 more
# Octets stored per message (8-octet aligned records): the SHA-256's, then the header check the
# maildrop index proves a grown spool with (bulk.check_headers: the block's length and CRC-32).
_DIGEST_STRIDE = bulk.RECORD
_CHECK = bulk.CHECK_AT
_HEX_BLOCK_BITS = 12  # uid() converts the digests of 4096 messages to hex at once (128 KiB)
_PAGE_MASK = ~(mmap.PAGESIZE - 1)
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
# Pages just read stay mapped this far behind the reader, and a finished stream releases this far
# around itself: a page fault maps its neighbours too (fault-around, 64 KiB; or a whole large folio,
# up to 2 MiB, on ext4/xfs with large folios), which must not re-map pages already released.
_MAP_MARGIN = 2 * 1024 * 1024


class MboxFormatError(Exception):
    """The data is not an mbox spool (it does not start with a From_ line)."""


class Listing:
    """Bounds, sent sizes and UIDs of the messages of one scanned spool (0-based indexes).

    Offsets are into the scanned buffer: ``from_offset(i)`` is the From_ line, content is
    ``[start(i), end(i))``; ``from_offset(count)`` is ``scanned_length``, so a message with its
    separator is ``[from_offset(i), from_offset(i + 1))``.
    """

    __slots__ = (
        "_digests",
        "_dups",
        "_end",
        "_hex",
        "_hex_block",
        "_seplen",
        "_size",
        "_start",
        "count",
        "scanned_length",
        "total_size",
    )

    def __init__(
        self,
        start: array,
        end: array,
        size: array,
        seplen: bytearray,
        digests: bytearray,
        dups: dict[int, int] | None,
        scanned_length: int,
    ) -> None:
        self._start = start
        self._end = end
        self._size = size
        self._seplen = seplen  # octets of the blank separator line after end(i): 0 for the last
        self._digests = digests  # _DIGEST_STRIDE octets per message: digest, then header check
        self._dups = dups  # index -> occurrence number (2, 3...) of a repeated digest; None: not yet
        self._hex = b""  # hex digits of the digests of one block of messages (see uid)
        self._hex_block = -1
        self.count = len(size)
        self.total_size = sum(size)
        self.scanned_length = scanned_length

    def _check(self, index: int) -> None:
        # A negative index would silently address the last messages ("DELE 0" bugs): refuse it.
        if not 0 <= index < self.count:
            raise IndexError("message index out of range")

    def size(self, index: int) -> int:
        """Octets RETR sends for the message, before dot-stuffing and the final ".\\r\\n"."""
        self._check(index)
        return self._size[index]

    def uid(self, index: int) -> bytes:
        """The message's unique-id: 24 hex digits, maybe "-N" (see the module docstring)."""
        if not 0 <= index < self.count:  # _check, inlined: UIDL calls this per message
            raise IndexError("message index out of range")
        dups = self._dups
        if dups is None:  # numbered on first use: login and STAT do not wait for it
            dups = self._dups = _dedup(self._digests, self.count)
        block = index >> _HEX_BLOCK_BITS
        if block != self._hex_block:  # UIDL asks in order: hex a block of digests at a time
            from binascii import hexlify

            size = _DIGEST_STRIDE << _HEX_BLOCK_BITS
            self._hex = hexlify(memoryview(self._digests)[block * size : (block + 1) * size])
            self._hex_block = block
        at = (index & ((1 << _HEX_BLOCK_BITS) - 1)) * 2 * _DIGEST_STRIDE
        uid = self._hex[at : at + 2 * _DIGEST_SIZE]
        nth = dups.get(index)
        return uid if nth is None else b"%s-%d" % (uid, nth)

    def sizes(self, lo: int, hi: int) -> list[int]:
        """size(i) for lo <= i < hi, at once (LIST of every message)."""
        if not 0 <= lo <= hi <= self.count:
            raise IndexError("message range out of range")
        return self._size[lo:hi].tolist()

    def uids(self, lo: int, hi: int) -> list[bytes]:
        """uid(i) for lo <= i < hi, at once (UIDL of every message): slices of hex blocks."""
        if not 0 <= lo <= hi <= self.count:
            raise IndexError("message range out of range")
        dups = self._dups
        if dups is None:
            dups = self._dups = _dedup(self._digests, self.count)
        out: list[bytes] = []
        step, width = 2 * _DIGEST_STRIDE, 2 * _DIGEST_SIZE
        while lo < hi:
            self.uid(lo)  # makes lo's block of hex digits current
            block_end = min(hi, (self._hex_block + 1) << _HEX_BLOCK_BITS)
            hexs = self._hex
            first = (lo & ((1 << _HEX_BLOCK_BITS) - 1)) * step
            last = first + (block_end - lo) * step
            out += [hexs[k : k + width] for k in range(first, last, step)]
            lo = block_end
        if dups:
            start = hi - len(out)
            for index, nth in dups.items():
                if start <= index < hi:
                    out[index - start] = b"%s-%d" % (out[index - start], nth)
        return out

    def start(self, index: int) -> int:
        """Offset of the first content octet (just after the From_ line's LF)."""
        self._check(index)
        return self._start[index]

    def end(self, index: int) -> int:
        """Offset just past the content (the separator blank line, if any, starts here)."""
        self._check(index)
        return self._end[index]

    def from_offsets(self, first: int = 0) -> array:
        """From_ line offsets of messages first..count-1, in one array (bulk checks)."""
        ends, seps = self._end, self._seplen
        out = array("Q", [0] if first <= 0 < self.count else [])
        out.extend([ends[i] + seps[i] for i in range(max(first, 1) - 1, self.count - 1)])
        return out

    def digest(self, index: int) -> bytes:
        """The SHA-256 octets the scan stored for the message (its UID's digest first)."""
        self._check(index)
        return bytes(self._digests[index * _DIGEST_STRIDE : index * _DIGEST_STRIDE + _SHA_KEPT])

    def from_offset(self, index: int) -> int:
        """Offset of the message's From_ line; ``from_offset(count)`` is ``scanned_length``."""
        if index == self.count:
            return self.scanned_length
        self._check(index)
        if index == 0:
            return 0
        return self._end[index - 1] + self._seplen[index - 1]

    # The maildrop index stores these arrays and hands them back (pop3d/index.py).

    @classmethod
    def from_parts(cls, parts: list[array | bytearray], length: int) -> Listing:
        """The listing whose `parts()` these are, for a spool of `length` octets (the index's
        record); ValueError if they do not fit together."""
        if len(parts) != 5:
            raise ValueError("not a listing")
        starts, ends, sizes, seplen, digests = parts
        count = len(seplen)
        offset_code, size_code = _typecodes(length)
        if not (
            isinstance(starts, array)
            and isinstance(ends, array)
            and isinstance(sizes, array)
            and isinstance(seplen, bytearray)
            and isinstance(digests, bytearray)
            and starts.typecode == ends.typecode == offset_code
            and sizes.typecode == size_code
            and len(starts) == len(ends) == len(sizes) == count
            and len(digests) == count * _DIGEST_STRIDE
            and (not count or (ends[-1] <= length and seplen[-1] == 0))
        ):
            raise ValueError("the listing's arrays do not fit together")
        return cls(starts, ends, sizes, seplen, digests, None, length)

    def parts(self) -> _Parts:
        """The listing's arrays, not copies: offsets of content start and end, sent sizes,
        separator lengths, digests (what `Listing(*parts, None, scanned_length)` takes)."""
        return self._start, self._end, self._size, self._seplen, self._digests

    def _head(self, keep: int, length: int) -> _Parts:
        """Copies of the arrays of messages [0, keep), typed for a spool of `length` octets."""
        offset_code, size_code = _typecodes(length)
        starts, ends, sizes = self._start[:keep], self._end[:keep], self._size[:keep]
        if starts.typecode != offset_code:
            starts, ends = array(offset_code, starts), array(offset_code, ends)
        if sizes.typecode != size_code:
            sizes = array(size_code, sizes)
        return starts, ends, sizes, self._seplen[:keep], self._digests[: keep * _DIGEST_STRIDE]

    def without(self, deleted: list[int]) -> Listing:
        """The listing of the spool after the update removed messages `deleted` (sorted): each
        kept message with its separator moved down over the removed ones. For the index only:
        its last message's separator may now end the file, so `resume` rescans that one."""
        offset_code, size_code = self._start.typecode, self._size.typecode
        starts, ends, sizes = array(offset_code), array(offset_code), array(size_code)
        seplen, digests = bytearray(), bytearray()
        stride = _DIGEST_STRIDE
        runs = []  # [first, last + 1) of each run of consecutive deleted messages
        for index in deleted:
            if runs and runs[-1][1] == index:
                runs[-1][1] += 1
            else:
                runs.append([index, index + 1])
        lo = 0  # first message of the current kept run
        moved = 0  # octets removed before it
        for first, after in [*runs, [self.count, self.count]]:
            if first > lo:  # kept: [lo, first)
                if moved:
                    starts.extend([x - moved for x in self._start[lo:first]])
                    ends.extend([x - moved for x in self._end[lo:first]])
                else:
                    starts.extend(self._start[lo:first])
                    ends.extend(self._end[lo:first])
                sizes.extend(self._size[lo:first])
                seplen += self._seplen[lo:first]
                digests += self._digests[lo * stride : first * stride]
            if first < self.count:
                moved += self.from_offset(after) - self.from_offset(first)
            lo = after
        return Listing(starts, ends, sizes, seplen, digests, None, self.scanned_length - moved)


def _is_rd(fmt: str) -> bool:
    if fmt == "mboxo":
        return False
    if fmt == "mboxrd":
        return True
    raise ValueError(f"unknown mbox format {fmt!r}")


_regex_cache: tuple[Pattern[bytes], ...] = ()


def _regexes() -> tuple[Pattern[bytes], ...]:
    """Compiled lazily: `re` costs start-up time and is only needed after login."""
    global _regex_cache
    if not _regex_cache:
        import re

        _regex_cache = (
            re.compile(rb">+From "),  # mboxrd quoted From_ line at a known line start
            # ... inside a window: its LF and first ">" (sub(b"\n") unquotes). A lookahead, so
            # each LF and its run of ">" is tried once (linear), and a literal replacement.
            re.compile(rb"\n>(?=>*From )"),
        )
    return _regex_cache


def _sha256_for(length: int) -> Callable[[bytes], Any]:
    """The SHA-256 constructor for the UID digests of a spool of `length` octets.

    CPython's built-in one below limits.MBOX_OPENSSL_SHA_MIN: importing hashlib (OpenSSL) costs
    ~2 ms, more than hashing a small spool's headers takes either way. Above it, hashlib's, ~5x
    faster per octet with SHA extensions; the built-in one if hashlib cannot be imported (an
    interpreter the account may not read, after the privilege drop). The same digests.
    """
    global _openssl_sha256
    if length >= limits.MBOX_OPENSSL_SHA_MIN:
        if _openssl_sha256 is None:  # tried once: a failed import costs a search of sys.path
            try:
                import hashlib

                _openssl_sha256 = hashlib.sha256
            except ImportError:
                _openssl_sha256 = False
        if _openssl_sha256:
            return _openssl_sha256
    return bulk.builtin_sha256()


_openssl_sha256: Callable[[bytes], Any] | bool | None = None  # hashlib's, or False: not importable


def _check_struct() -> Any:
    import struct

    return struct.Struct("<II")


def _crc32() -> Callable[[bytes], int]:
    import zlib

    return zlib.crc32


def _releaser(buf: Buffer) -> Callable[[int, int], None] | None:
    """A function dropping [lo, hi) of a mapping from our RSS (the pages stay in the page cache)."""
    if _MADV_DONTNEED is None or not isinstance(buf, mmap.mmap):
        return None
    madvise = buf.madvise
    size = len(buf)

    def release(lo: int, hi: int) -> None:
        lo = (lo if lo > 0 else 0) & _PAGE_MASK
        if hi > size:
            hi = size
        if hi > lo:
            madvise(_MADV_DONTNEED, lo, hi - lo)

    return release


def release_pages(buf: Buffer, lo: int, hi: int) -> None:
    """Drop [lo, hi) (widened by the fault-around margin) of a mapping from our RSS."""
    release = _releaser(buf)
    if release is not None:
        release(lo - _MAP_MARGIN, hi + _MAP_MARGIN)


def _find_lf(buf: Buffer, start: int, end: int, w: int, release: Callable[[int, int], None] | None) -> int:
    """buf.find(b"\\n", start, end), a window at a time: a huge From_ line is not mapped at once."""
    while start < end:
        stop = start + w if start + w < end else end
        k = buf.find(b"\n", start, stop)
        if k >= 0:
            return k
        if release is not None:
            release(start - _MAP_MARGIN, stop - _MAP_MARGIN)
        start = stop
    return -1


def _blank_line(
    buf: Buffer, start: int, end: int, w: int, release: Callable[[int, int], None] | None = None
) -> int:
    """Offset of the first empty line (LF or CRLF after a LF) within [start, end), or -1.

    start is the offset of a LF (the From_ line's). Searched in growing steps so that neither form
    is looked for far beyond where the other is found (a CRLF header has no "\\n\\n" at all).
    """
    step = 4096 if w > 4096 else w
    lo = start
    while lo < end:
        hi = lo + step if lo + step < end else end
        x = buf.find(b"\n\n", lo, hi)
        y = buf.find(b"\n\r\n", lo, x + 2 if x >= 0 else hi)
        if y >= 0:
            return y + 1
        if x >= 0:
            return x + 1
        if hi == end:
            return -1
        if release is not None:
            release(lo - _MAP_MARGIN, hi - _MAP_MARGIN)
        lo = hi - 2  # overlap: an empty line may straddle the steps
        if step < w:
            step <<= 2
    return -1


def _quoted_lines(chunk: bytes, a: int, b: int) -> list[int]:
    """Starts of the lines matching ">+From " that begin in chunk[a:b] (whole lines, a line start).

    One regex pass at C speed, linear for any content: each LF is tried once, and its run of ">"
    once. (Looking back from every ">From" to its line's LF rescanned a line of ">From >From ..."
    once per ">From": 256 KiB of them cost 1.6 s.)
    """
    return [m.start() + 1 for m in _regexes()[1].finditer(chunk, a - 1 if a else 0, b)]


def same_message(buf: Buffer, listing: Listing, index: int, base: int = 0) -> bool | None:
    """True if `buf` still holds message `index` where the scan found it, False if not.

    A cheap proof, not a rescan: its From_ line is still at its offset (after a LF), the From_
    line and header block still have the digest its UID came from (what `_scan_range`'s `begin`
    stores, found here without its window shortcuts), and the next message's From_ line (if
    any) is still where it was. The last message's end is the caller's to check.

    `buf` holds the spool from offset `base` on: all of it up to the scanned length, or a window
    (a single read at the From_ line); None when a window is too short to tell.
    """
    q = listing.from_offset(index) - base
    n = listing.scanned_length - base
    end = len(buf) if len(buf) < n else n
    after = listing.from_offset(index + 1) - base if index + 1 < listing.count else 0
    if q + 5 > end or after + 5 > end or (q + base and q < 1):
        return None
    if buf[q : q + 5] != b"From " or (q + base and buf[q - 1 : q] != b"\n"):
        return False
    if after and buf[after - 1 : after + 5] != b"\nFrom ":
        return False
    cap = max(limits.UID_HEADER_CAP, 1)
    s = listing.start(index) - base
    hl = s + 2 * cap if s + 2 * cap < n else n
    blank = _blank_line(buf, s - 1, hl if hl < end else end, max(limits.MBOX_SCAN_WINDOW, 4))
    if blank < 0:
        if hl > end:
            return None  # the header block may go on past the window
        blank = hl
    digest = _sha256_for(listing.scanned_length)(bulk.strip_volatile(buf[q:blank])[:cap]).digest()
    return digest[:_SHA_KEPT] == listing.digest(index)


def same_content(buf: Buffer, listing: Listing, index: int, fmt: str = "mboxo") -> bool:
    """True if a full scan would find message `index`'s content as listed, its From_ line being
    where it was: no From_ separator inside it (a full scan would cut it there), its end where
    listed (the next From_ line after its separator, or the spool's end), and the sent size
    listed (its line ends, and in mboxrd its quoted From lines, counted again).

    What the maildrop index does not prove of a spool that grew (its From_ lines and header
    blocks only, bulk.check_headers): a same-length edit of a body in place. The session proves
    this before it sends or deletes a message the index listed. Reads the content once, a
    window at a time (`buf` may be maildrop's pread reader: slices and find only).
    """
    s, e = listing.start(index), listing.end(index)
    if listing.scanned_length > len(buf) or not _end_holds(buf, listing, index):
        return False
    size, found = _recount(buf, s, e, _is_rd(fmt), None)
    return not found and size == listing.size(index)


def only_listed_boundaries(buf: Buffer, listing: Listing, first: int, after: int) -> bool:
    """True if a full scan would find no message boundary in messages [first, after) (a run
    about to be deleted) but the listed From_ lines between them: no other message is in those
    bytes. Through a mapping, released behind the reader."""
    s, e = listing.start(first), listing.end(after - 1)
    if listing.scanned_length > len(buf) or not _end_holds(buf, listing, after - 1):
        return False
    _, found = _recount(buf, s, e, False, _releaser(buf))
    return found == [listing.from_offset(k) - 1 for k in range(first + 1, after)]


def _end_holds(buf: Buffer, listing: Listing, index: int) -> bool:
    """Message `index`'s content still ends where listed: at the separator before the next
    From_ line, or (the last) where the scanner ends it, before one trailing blank line."""
    e = listing.end(index)
    if index + 1 < listing.count:
        at = listing.from_offset(index + 1)
        return buf[e - 1 : at + 5] == (b"\n\n" if at - e == 1 else b"\n\r\n") + b"From "
    s, n = listing.start(index), listing.scanned_length
    if s < n and buf[n - 1] == 10:
        if buf[n - 2] == 10:
            return e == n - 1
        if n - s >= 2 and buf[n - 2] == 13 and buf[n - 3] == 10:
            return e == n - 2
    return e == n


def _window(buf: Buffer, lo: int, end: int, w: int) -> tuple[int, bool]:
    """The end of the scan window from `lo` (at most `w` octets, not past `end`), and whether
    it ends a line: cut right after its last LF, so that no CR LF pair and no quoted From line
    straddles two windows; a line longer than the window is cut (never after a CR)."""
    hi = lo + w
    if hi >= end:
        return end, True
    k = buf.rfind(b"\n", lo, hi)
    if k >= 0:
        return k + 1, True
    return (hi - 1 if buf[hi - 1] == 13 else hi), False


def _recount(
    buf: Buffer, s: int, e: int, rd: bool, release: Callable[[int, int], None] | None
) -> tuple[int, list[int]]:
    """Over [s, e), s just after a From_ line's LF: the sent size it has as one message's
    content, and the separators (bulk.separators' LF offsets) a full scan finds in it. Windows
    cut as the scanner cuts them, so that no CR LF pair, quoted line or separator straddles two."""
    w = max(limits.MBOX_SCAN_WINDOW, 4)
    count_lf, separators = bulk.count_lf, bulk.separators
    lf = crlf = quoted = 0
    found: list[int] = []
    lo = released = s
    while lo < e:
        hi, lined = _window(buf, lo, e, w)
        base = lo - 2 if lo - 2 > s - 1 else s - 1  # look-behind, from the From_ line's LF on
        chunk = buf[base : hi + 5 if hi + 5 < e else e]  # look-ahead for "From " after a LF
        a, b = lo - base, hi - base
        lf += count_lf(chunk, a, b)
        if b"\r" in chunk:
            crlf += chunk.count(b"\r\n", a, b)
        if rd:
            if lined:
                quoted += len(_quoted_lines(chunk, a, b))
            elif chunk[a - 1] == 10 and chunk[a] == 62 and _quoted_from(buf, lo, e):
                quoted += 1  # a line longer than the window: ask buf, the window may hold only ">"
        found += [base + r for r in separators(chunk, a, b)]
        lo = hi
        del chunk
        if release is not None and lo - _MAP_MARGIN - released >= w:
            cut = (lo - _MAP_MARGIN) & _PAGE_MASK
            release(released, cut)
            released = cut
    if release is not None:
        release(released, e)
    size = (e - s) + lf - crlf - quoted + (2 if e > s and buf[e - 1] != 10 else 0)
    return size, found


def _dedup(digests: bytearray, count: int) -> dict[int, int]:
    """Occurrence numbers (2, 3...) of repeated digests by index; first occurrences are absent.

    Open addressing over digest indexes (4 octets a slot, load <= 1/2) rather than a set of bytes
    objects (~80 octets each): peak RSS must not grow with the number of messages.
    """
    dups: dict[int, int] = {}
    # Usually no two digests share even their first 8 octets: C-speed sets prove it, one per
    # range of prefix values (filters of C methods), so that no more than ~16,000 ints live at
    # once: peak RSS must not grow with the number of messages.
    prefixes = memoryview(digests).cast("Q")[:: _DIGEST_STRIDE // 8]
    passes = max(1, count >> 14)
    step = (1 << 64) // passes + 1
    distinct = True
    for k in range(passes):
        if passes == 1:
            distinct = len(set(prefixes)) == count
        else:
            part = list(filter((k * step).__le__, filter(((k + 1) * step).__gt__, prefixes)))
            distinct = len(set(part)) == len(part)
            del part
        if not distinct:
            break
    del prefixes
    if distinct:
        return dups
    table = array("I", [0]) * (1 << (2 * count).bit_length())
    mask = len(table) - 1
    seen: dict[int, int] = {}  # first index of a repeated digest -> occurrences so far
    size, stride = _DIGEST_SIZE, _DIGEST_STRIDE
    for i in range(count):
        at = i * stride
        digest = digests[at : at + size]
        slot = int.from_bytes(digest, "little") & mask
        while True:
            j = table[slot]
            if not j:
                table[slot] = i + 1
                break
            j -= 1
            if digests[j * stride : j * stride + size] == digest:
                nth = seen.get(j, 1) + 1
                seen[j] = nth
                dups[i] = nth
                break
            slot = (slot + 1) & mask
    return dups


def scan(buf: Buffer, fmt: str = "mboxo", parallel_min: int = limits.MBOX_PARALLEL_SCAN) -> Listing:
    """Scan a whole spool (a read-only mmap, or bytes) into a Listing.

    A spool of parallel_min octets or more is scanned in two halves at once, the second by a
    forked process (see _scan_parallel); the listing is the same either way.
    Raises MboxFormatError when non-empty data does not start with a From_ line, ValueError for an
    unknown fmt ("mboxo" or "mboxrd").
    """
    return resume(buf, None, 0, fmt, parallel_min)


def resume(
    buf: Buffer,
    prior: Listing | None,
    keep: int,
    fmt: str = "mboxo",
    parallel_min: int = limits.MBOX_PARALLEL_SCAN,
) -> Listing:
    """The listing of `buf` whose first `keep` messages are `prior`'s, scanned from the From_
    line of prior's message `keep` on (the maildrop index: a spool that grew, or was updated).

    The caller has proved that buf holds prior's messages [0, keep] where prior says (the
    From_ line of message `keep` is rescanned, so whatever follows it may have changed). The
    result is what `scan(buf)` gives: a message is scanned the same wherever the scan starts,
    as long as it starts at a message's From_ line (as the parallel scan's second half does).
    """
    rd = _is_rd(fmt)
    n = len(buf)
    start = prior.from_offset(keep) if prior is not None and keep > 0 else 0
    if not n:  # the typecodes from_parts expects of an empty spool: its record then loads
        offsets, sizes = _typecodes(0)
        return Listing(array(offsets), array(offsets), array(sizes), bytearray(), bytearray(), {}, 0)
    if start >= n or buf[start : start + 5] != b"From ":
        raise MboxFormatError("not an mbox spool: no From_ line at the start")
    _sha256_for(n - start)  # hashlib, if it is to be, imported once: before the fork below
    split = 0
    if n - start >= parallel_min > 0:
        # The second half starts at a From_ line after a blank line: a message boundary for sure.
        # (Looked for in a bounded stretch: a giant message in the middle means no split.)
        half = start + (n - start) // 2
        k = buf.find(b"\n\nFrom ", half, half + limits.MBOX_SCAN_WINDOW * 16)
        split = k + 2 if k >= 0 else 0
        # The search may have walked through a big attachment: its pages must not stay mapped
        # (peak RSS) while both halves are scanned.
        release_pages(buf, half, k if k >= 0 else half + limits.MBOX_SCAN_WINDOW * 16)
    parts = _scan_parallel(buf, start, split, n, rd) if split else _scan_range(buf, start, n, rd)
    if start:
        assert prior is not None
        parts = _join(prior._head(keep, n), parts, start)
    return Listing(*parts, None, n)


_Parts = tuple[array, array, array, bytearray, bytearray]


def _scan_parallel(buf: Buffer, start: int, split: int, n: int, rd: bool) -> _Parts:
    """[start, split) here and [split, n) in a forked child at the same time, then joined.

    Two cores halve the wall time of the scan (bytes.count and rfind run at ~1.5 GB/s each in
    CPython: one process cannot go faster). The child shares the read-only mapping, sends its
    arrays through a pipe and leaves with os._exit: no cleanup, no lock of ours is touched
    (fcntl locks are not inherited; the dotlock is a file). Any failure of the child (fork
    refused, killed, short answer) and the parent scans the second half itself.
    """
    import struct

    try:
        rfd, wfd = os.pipe()
    except OSError:
        return _join(_scan_range(buf, start, split, rd), _scan_range(buf, split, n, rd), split)
    try:
        pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:  # the child: scan, answer, vanish
        status = 1
        try:
            os.close(rfd)
            parts = _scan_range(buf, split, n, rd)
            blobs = [bytes(part) if isinstance(part, bytearray) else part.tobytes() for part in parts]
            data = b"".join([struct.pack("<5Q", *map(len, blobs)), *blobs])
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view) :]
            status = 0
        finally:
            os._exit(status)
    os.close(wfd)
    try:
        first = _scan_range(buf, start, split, rd)
        data = bytearray()  # one copy of the answer in memory, not two
        while True:
            try:
                chunk = os.read(rfd, 1 << 20)
            except InterruptedError:  # pragma: no cover - PEP 475 retries reads
                continue
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
        if pid > 0:
            _reap(pid)
    views = _unpack(data, len(buf)) if pid > 0 else None
    if views is None:
        return _join(first, _scan_range(buf, split, n, rd), split)
    return _join(first, views, split)


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover
            continue


def _unpack(data: bytes | bytearray, length: int) -> list[memoryview] | None:
    """Views of the child's five arrays in `data` (no copies), or None if it is not whole."""
    import struct

    if len(data) < 40:
        return None
    lengths = struct.unpack_from("<5Q", data)
    count = lengths[3]
    offset_size, size_size = (array(code).itemsize for code in _typecodes(length))
    expected = (offset_size * count, offset_size * count, size_size * count, count, lengths[4])
    if 40 + sum(lengths) != len(data) or lengths != expected:
        return None
    if lengths[4] != _DIGEST_STRIDE * count:
        return None
    view = memoryview(data)
    out = []
    at = 40
    for length in lengths:
        out.append(view[at : at + length])
        at += length
    return out


def _join(first: _Parts, second: _Parts | list[memoryview], split: int) -> _Parts:
    """The listing of [0, split) followed by that of [split, n) (arrays, or the child's views)."""
    starts, ends, sizes, seplen, digests = first
    # The first half's last message ended at the blank line before the split: its separator.
    seplen[-1] = split - ends[-1]
    for mine, theirs in zip((starts, ends, sizes), second[:3], strict=True):
        if isinstance(theirs, memoryview):
            mine.frombytes(theirs)  # type: ignore[union-attr]
        else:
            mine.extend(theirs)  # type: ignore[arg-type]
    seplen += second[3]
    digests += second[4]
    return starts, ends, sizes, seplen, digests


def _typecodes(length: int) -> tuple[str, str]:
    """Array typecodes of offsets and of sizes in a spool of `length` octets: 4-octet unsigned
    ints while they fit (a sent size is at most twice its octets, plus a final CRLF)."""
    return ("I" if length < 1 << 32 else "Q"), ("I" if 2 * length + 2 < 1 << 32 else "Q")


def _scan_range(buf: Buffer, start: int, n: int, rd: bool) -> _Parts:
    """Scan [start, n): start is a From_ line, n the end of the data or of a message's separator."""
    w = max(limits.MBOX_SCAN_WINDOW, 4)
    cap = max(limits.UID_HEADER_CAP, 1)
    rx_start = _regexes()[0] if rd else None
    strip_volatile = bulk.strip_volatile
    sha256 = _sha256_for(n - start)  # what is hashed here: a resumed scan's tail is small
    pack = _check_struct().pack
    crc32 = _crc32()
    check_length, unknown = bulk.CHECK_LENGTH, bulk.CHECK_UNKNOWN << 30
    count_lf, separators = bulk.count_lf, bulk.separators
    release = _releaser(buf)
    offset_code, size_code = _typecodes(len(buf))
    starts = array(offset_code)
    ends = array(offset_code)
    sizes = array(size_code)
    seplen = bytearray()
    digests = bytearray()

    def begin(q: int, s: int, chunk: bytes, base: int, cr: bool = True) -> None:
        """Digest and check of a new message's From_ line + header block, read while its pages
        are hot.

        Searched in the window when it holds the header (chunk offsets from base), else in buf.
        Not bounded by the content end (unknown yet): the first empty line after the From_ line
        is in the header, or it is the separator (or trailing) blank line: the same block. The
        check: the block's length, the empty line after it, and its CRC-32 (bulk.check_headers).
        """
        hl = s + 2 * cap if s + 2 * cap < n else n
        top = hl - base
        end = top if top < len(chunk) else len(chunk)
        if cr:
            blank = _blank_line(chunk, s - 1 - base, end, w)
        else:  # no CR in the window: the first LF LF is the first empty line
            blank = chunk.find(b"\n\n", s - 1 - base, end)
            if blank >= 0:
                blank += 1
        if blank >= 0:
            block = chunk[q - base : blank]
            form = 1 if chunk[blank] == 10 else 2  # CHECK_LF, CHECK_CRLF
        elif top <= len(chunk):
            block = chunk[q - base : top]
            form = 0  # CHECK_NO_BLANK
        else:  # the header runs past the window
            blank = _blank_line(buf, s - 1, hl, w)
            block = buf[q : blank if blank >= 0 else hl]
            form = 0 if blank < 0 else 1 if buf[blank] == 10 else 2
        digests.extend(sha256(strip_volatile(block)[:cap]).digest()[:_SHA_KEPT])
        length = len(block)
        digests.extend(pack(length | form << 30 if length <= check_length else unknown, crc32(block)))

    # The message being scanned: From_ line at q, content from s; counts over [q, here).
    s = _find_lf(buf, start, n, w, release) + 1 or n  # no LF at all: a lone empty message
    begin(start, s, b"", 0)
    from_crlf = buf[s - 2] == 13
    lf = crlf = quoted = 0
    released = start
    lo = start
    while lo < n:
        hi, lined = _window(buf, lo, n, w)
        base = lo - 2 if lo >= 2 else 0  # two octets of look-behind for "\n\r\nFrom "
        chunk = buf[base : hi + 5 if hi + 5 < n else n]  # look-ahead for "From " after a LF at hi - 1
        a = lo - base
        b = hi - base
        cr = b"\r" in chunk
        quotes = ()  # mboxrd: chunk offsets of the lines matching ">+From " that start in the window
        if rd:
            if lined:
                quotes = _quoted_lines(chunk, a, b)
            elif lo and chunk[a - 1] == 10 and buf[lo] == 62 and rx_start.match(buf, lo):  # type: ignore[union-attr]
                quoted += 1  # a line longer than the window: ask buf, the window may hold only ">"
        qi = 0

        cur = a
        for j in separators(chunk, a, b):  # chunk offsets of the LF before "From ", ascending
            lf += count_lf(chunk, cur, j + 1)
            if cr:
                crlf += chunk.count(b"\r\n", cur, j + 1)
            while qi < len(quotes) and quotes[qi] < j:
                quoted += 1
                qi += 1
            p = base + j
            e = p if chunk[j - 1] == 10 else p - 1
            # Sent size: content, plus a CR per bare LF, minus one ">" per quoted From line. The
            # counts cover From_ line + content + separator: take out the From_ line's LF (and CR)
            # and the separator's LF (and CR).
            sizes.append((e - s) + (lf - 2) - (crlf - from_crlf - (p - e)) - quoted)
            starts.append(s)
            ends.append(e)
            seplen.append(p + 1 - e)
            q = p + 1
            k = chunk.find(b"\n", j + 1)
            s = (base + k if k >= 0 else _find_lf(buf, base + len(chunk), n, w, release)) + 1 or n
            begin(q, s, chunk, base, cr)
            from_crlf = buf[s - 2] == 13
            lf = crlf = quoted = 0
            cur = j + 1
        lf += count_lf(chunk, cur, b)
        if cr:
            crlf += chunk.count(b"\r\n", cur, b)
        quoted += len(quotes) - qi
        lo = hi
        del chunk  # before the next window is copied: one window of memory, not two
        # Release what is behind us, keeping a margin: the kernel maps a fault's neighbours too.
        if release is not None and lo - _MAP_MARGIN - released >= w:
            cut = (lo - _MAP_MARGIN) & _PAGE_MASK
            release(released, cut)
            released = cut

    # The last message: no separator; one trailing blank line is dropped.
    e = n
    if s >= n:
        size = 0
        s = e = n
    else:
        trail_lf = trail_crlf = 0
        if buf[n - 1] == 10:
            if buf[n - 2] == 10:
                e, trail_lf = n - 1, 1
            elif n - s >= 2 and buf[n - 2] == 13 and buf[n - 3] == 10:
                e, trail_lf, trail_crlf = n - 2, 1, 1
        size = (e - s) + (lf - 1 - trail_lf) - (crlf - from_crlf - trail_crlf) - quoted
        if buf[e - 1] != 10 and e > s:
            size += 2  # a final line without LF is sent with CRLF
    sizes.append(size)
    starts.append(s)
    ends.append(e)
    seplen.append(0)
    if release is not None:
        release(released, n)
    return starts, ends, sizes, seplen, digests


def _header_end(buf: Buffer, s: int, e: int, w: int, release: Callable[[int, int], None] | None) -> int:
    """Offset just past the first empty line of the content [s, e), or e if there is none."""
    if s >= e:
        return e
    blank = _blank_line(buf, s - 1, e, w, release)  # from the From_ line's LF: "\\n" first line too
    if blank < 0:
        return e
    return blank + 1 if buf[blank] == 10 else blank + 2


def _nth_lf(chunk: bytes, nth: int) -> int:
    """Index of the nth (1-based) LF of chunk, which has at least nth: bisect with bulk counts."""
    lo, hi = 0, len(chunk)
    while nth > 32:
        mid = (lo + hi) >> 1
        k = chunk.count(b"\n", lo, mid)
        if k >= nth:
            hi = mid
        else:
            nth -= k
            lo = mid
    j = lo - 1
    for _ in range(nth):
        j = chunk.find(b"\n", j + 1)
    return j


def _skip_lines(
    buf: Buffer, h: int, e: int, lines: int, w: int, release: Callable[[int, int], None] | None
) -> int:
    """Offset just past `lines` more lines from h (a line start), at most e."""
    if not lines:
        return h
    pos = h
    while pos < e:
        lim = pos + w if pos + w < e else e
        chunk = buf[pos:lim]
        k = chunk.count(b"\n")
        if k >= lines:
            return pos + _nth_lf(chunk, lines) + 1
        lines -= k
        if release is not None:
            release(pos - _MAP_MARGIN, lim - _MAP_MARGIN)
        pos = lim
    return e


def iter_message(
    buf: Buffer,
    listing: Listing,
    index: int,
    body_lines: int | None = None,
    fmt: str = "mboxo",
    release: bool = True,
    wire: bool = False,
) -> Iterator[bytes]:
    """Stream message `index` in sent form, in chunks of at most limits.RETR_CHUNK octets.

    With body_lines (TOP): the header block up to and including the first empty line (the whole
    message if it has none), then at most body_lines more lines. The whole message yields exactly
    listing.size(index) octets. wire=True: dot-stuffed too (as RETR sends it, without the final
    ".\\r\\n"). Arguments are checked
    now, not at the first next(). release=False leaves the pages read mapped (the caller releases
    many small messages at once: one madvise per message costs more than sending it).
    """
    rd = _is_rd(fmt)
    s = listing.start(index)
    e = listing.end(index)
    if listing.scanned_length > len(buf):
        raise ValueError("the listing does not belong to this buffer")
    chunk_size = max(limits.RETR_CHUNK, 1)
    releaser = _releaser(buf) if release else None
    t = e
    if body_lines is not None:
        if body_lines < 0:
            raise ValueError("body_lines must be >= 0")
        w = max(limits.MBOX_SCAN_WINDOW, 4)
        t = _skip_lines(buf, _header_end(buf, s, e, w, releaser), e, body_lines, w, releaser)
    return _stream(buf, s, t, e, rd, chunk_size, releaser, wire)


def _quoted_from(buf: Buffer, pos: int, t: int) -> bool:
    """True if [pos, t) starts with ">+From " (its run of ">" may be longer than any window).

    Only slices and indexes `buf` (no regex on it): the stream also runs on buffers that are not
    bytes-like, such as maildrop's pread(2) reader.
    """
    k = pos
    while k < t:
        hi = k + 4096 if k + 4096 < t else t
        piece = buf[k:hi]
        run = len(piece) - len(piece.lstrip(b">"))
        if run < len(piece):
            k += run
            end = k + 5 if k + 5 < t else t
            return k > pos and buf[k:end] == b"From "
        k = hi
    return False


def message_bytes(
    buf: Buffer, listing: Listing, index: int, fmt: str = "mboxo", wire: bool = False
) -> bytes | None:
    """The whole message `index` in sent form (b"".join(iter_message(...))) when it fits in one
    stream window and needs no regular expression (mboxo); else None: use iter_message.
    wire=True: dot-stuffed too, like iter_message(wire=True).

    RETR of a small message in one call: the generators cost more than the copy.
    """
    if _is_rd(fmt):
        return None
    s = listing.start(index)
    e = listing.end(index)
    window = max(limits.RETR_CHUNK, 1)
    if e - s > max(window - (window >> 3), 2) or listing.scanned_length > len(buf):
        return None
    chunk = bulk.to_wire(buf[s:e], True) if wire else bulk.to_crlf(buf[s:e])
    if e > s and buf[e - 1] != 10:
        chunk += b"\r\n"  # a final line without LF
    return chunk


def _stream(
    buf: Buffer,
    s: int,
    t: int,
    e: int,
    rd: bool,
    chunk_size: int,
    release: Callable[[int, int], None] | None,
    wire: bool = False,
) -> Iterator[bytes]:
    """Sent form (wire: dot-stuffed too) of content [s, t) of a message whose content ends at e."""
    rx_sub = None
    to_crlf, to_wire = bulk.to_crlf, bulk.to_wire
    at_line_start = True
    if rd:
        _, rx_sub = _regexes()
    # Read windows leave room for LF -> CRLF growth, so one window is usually one chunk.
    r = chunk_size - (chunk_size >> 3)
    if r < 2:
        r = 2
    pos = s
    try:
        while pos < t:
            lim = pos + r
            if lim >= t:
                lim = t
            else:
                k = buf.rfind(b"\n", pos, lim)
                if k >= 0:
                    lim = k + 1  # whole lines: no CRLF pair or ">From" prefix is cut
                elif buf[lim - 1] == 13:
                    lim -= 1  # a line longer than the window: never split CR from its LF
            if rd and buf[pos] == 62 and (pos == s or buf[pos - 1] == 10) and _quoted_from(buf, pos, t):
                pos += 1  # mboxrd: unquote a line at the window start (may be all ">": ask buf)
            chunk = buf[pos:lim]
            if rx_sub is not None and b">From " in chunk:
                chunk = rx_sub.sub(b"\n", chunk)
            if wire:
                line_end = chunk[-1:] == b"\n"
                chunk = to_wire(chunk, at_line_start)
                at_line_start = line_end
            else:
                chunk = to_crlf(chunk)
            if release is not None:
                release(pos - _MAP_MARGIN, lim - _MAP_MARGIN)
            pos = lim
            if len(chunk) <= chunk_size:
                if chunk:
                    yield chunk
            else:
                for k in range(0, len(chunk), chunk_size):
                    yield chunk[k : k + chunk_size]
        if t == e and e > s and buf[e - 1] != 10:
            yield b"\r\n"  # a final line without LF
    finally:
        # Also when abandoned (client gone): leave nothing of this message mapped.
        if release is not None:
            release(s - _MAP_MARGIN, e + _MAP_MARGIN)
