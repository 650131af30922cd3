"""The byte loops a session spends its CPU in: counting lines, finding From_ separators, the
LF -> CRLF conversion and dot-stuffing of RETR (to_wire: both in one pass), taking the
headers MUAs rewrite out of a header block before its UID digest (strip_volatile), and proving
that the messages an index lists are still where and what it says (check_headers).

Each is a bulk CPython bytes method (or zlib.crc32) below. When the optional C extension
``pop3d._speedups`` is built (``pip install`` builds it if a C compiler is there; without one,
pop3d runs the same on these), its versions replace them: same results, at memchr/memcpy speed
instead of ~0.5-2.5 GB/s.
``ACCELERATED`` says which are in use; the tests check the two agree on random data.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable
    from re import Pattern
    from typing import Any

    Buffer = bytes | bytearray | memoryview | mmap.mmap

# The byte loops with a C and a Python version (py_NAME), and the flag saying which are in use.
__all__ = ["ACCELERATED", "check_headers", "count_lf", "separators", "strip_volatile", "to_crlf", "to_wire"]

# A message's record in mbox's listing (its _DIGEST_STRIDE): the UID digest first, then at
# CHECK_AT a little-endian 32-bit word, the length of its From_ line + header block with the
# empty line that ends it in the top two bits (CHECK_NO_BLANK, CHECK_LF, CHECK_CRLF), and the
# CRC-32 of that block. _speedups.c has the same numbers.
RECORD = 24
CHECK_AT = 16
CHECK_LENGTH = (1 << 30) - 1  # longer blocks are stored as CHECK_UNKNOWN: never proved
CHECK_NO_BLANK, CHECK_LF, CHECK_CRLF, CHECK_UNKNOWN = 0, 1, 2, 3


def py_count_lf(buf: bytes, start: int, end: int) -> int:
    """buf.count(b"\\n", start, end) (start and end >= 0)."""
    return buf.count(b"\n", start, end)


def py_separators(buf: bytes, start: int, end: int) -> list[int]:
    """Ascending offsets r, start <= r < end, of LFs that end an empty line and precede "From ".

    buf[r:r + 6] == b"\\nFrom " and buf[r - 1] is a LF or buf[r - 2:r] is CR LF; "From " may lie
    past end, never past buf. Searched backwards: CPython's rfind keys on the needle's first
    octet (a LF, rare) and beats find here; without a CR, "\\n\\nF" has far fewer candidates.
    """
    found = []
    if buf.find(b"\r", start - 2 if start >= 2 else 0, end + 5) >= 0:  # with the look-behind
        r = buf.rfind(b"\nF", start, end + 1)
        while r >= 0:
            if buf[r + 1 : r + 6] == b"From " and r:
                before = buf[r - 1]
                if before == 10 or (before == 13 and r >= 2 and buf[r - 2] == 10):
                    found.append(r)
            r = buf.rfind(b"\nF", start, r + 1)
    else:
        first = start - 1 if start else 0
        r = buf.rfind(b"\n\nF", first, end + 1)
        while r >= 0:
            if buf[r + 2 : r + 7] == b"From ":
                found.append(r + 1)
            r = buf.rfind(b"\n\nF", first, r + 2)
    found.reverse()
    return found


def py_to_crlf(chunk: bytes) -> bytes:
    """Every bare LF becomes CR LF; a CR LF, and a bare CR, stay as they are.

    chunk is bytes (the C version refuses anything else: a buffer that changes while copied)."""
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    return chunk.replace(b"\n", b"\r\n")


def py_to_wire(chunk: bytes, at_line_start: bool) -> bytes:
    """to_crlf(chunk) with every dot that starts a line doubled (the first octet's only if chunk
    starts a line): the octets RETR sends."""
    out = py_to_crlf(chunk).replace(b"\n.", b"\n..")
    if at_line_start and out[:1] == b".":
        out = b"." + out
    return out


def py_strip_volatile(block: bytes) -> bytes:
    """`block` (a From_ line and header block) without the headers local MUAs add or rewrite:
    each LF followed by Status, X-Status, X-Keywords, X-UID, X-IMAP, X-IMAPbase, Content-Length
    or Lines (ASCII case ignored), blanks and a colon, up to the end of that line and of its
    continuation lines (LF then a blank), is taken out; the LF that ends them stays."""
    return _volatile_pattern().sub(b"", block)


_volatile: list[Pattern[bytes]] = []  # compiled at the first call: `re` only when it is needed


def _volatile_pattern() -> Pattern[bytes]:
    if not _volatile:
        import re

        _volatile.append(
            re.compile(
                rb"\n(?=[SsXxCcLl])(?:status|x-status|x-keywords|x-uid|x-imap(?:base)?|content-length|lines)"
                rb"[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*",
                re.IGNORECASE,
            )
        )
    return _volatile[0]


def py_check_headers(
    buf: Buffer, ends: Buffer, width: int, seplen: Buffer, records: Buffer, first: int, stop: int
) -> int:
    """The first message i, first <= i < stop, that is no longer where and what a listing says,
    or stop if none (the maildrop index proves a spool that grew with it, docs/INTERNALS.md).

    Message i's From_ line is at ends[i - 1] + seplen[i - 1] (0 for the first), after the
    separator listed (a LF, then LF or CR LF), and its From_ line + header block is as long as
    its record says, is followed by the empty line it says, and has its CRC-32. `ends`: offsets
    of `width` (4 or 8) octets in the host's order; `seplen`: an octet each; `records`: RECORD
    octets a message. All read-only (the C version refuses others); ValueError if too short."""
    import struct
    import zlib

    if width not in (4, 8):
        raise ValueError("width must be 4 or 8")
    offsets = memoryview(ends).cast("B").cast("I" if width == 4 else "Q")
    too_short = stop and (stop - 1 > len(offsets) or stop - 1 > len(seplen))
    if not 0 <= first <= stop <= len(records) // RECORD or too_short:
        raise ValueError("first and stop must be 0 <= first <= stop <= messages")
    n = len(buf)
    for i in range(first, stop):
        at = 0
        if i:
            end, sep = offsets[i - 1], seplen[i - 1]
            if not 1 <= end <= n - sep or sep not in (1, 2):
                return i
            if buf[end - 1 : end + sep] != (b"\n\n" if sep == 1 else b"\n\r\n"):
                return i
            at = end + sep
        if buf[at : at + 5] != b"From ":
            return i
        word, crc = struct.unpack_from("<II", records, i * RECORD + CHECK_AT)
        length, blank = word & CHECK_LENGTH, word >> 30
        if blank == CHECK_UNKNOWN or at + length + blank > n:
            return i
        if buf[at + length : at + length + blank] != (b"", b"\n", b"\r\n")[blank]:
            return i
        if zlib.crc32(buf[at : at + length]) != crc:
            return i
    return stop


def builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 constructor: built into the interpreter, so importing it loads no
    OpenSSL and reads no file (~0.05 ms; hashlib: ~2 ms of every session that imports it, and a
    file the account may not be allowed to read after the privilege drop). Same digests;
    OpenSSL's is ~5x faster per octet (SHA extensions), which only a big input repays."""
    if not _sha256:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found]  # CPython 3.12+
        except ImportError:
            try:
                from _sha256 import sha256  # type: ignore[import-not-found]  # CPython 3.11
            except ImportError:  # pragma: no cover - an interpreter built without them
                from hashlib import sha256
        _sha256.append(sha256)
    return _sha256[0]


_sha256: list[Callable[[bytes], Any]] = []  # found once: a failed import is tried again each time


count_lf = py_count_lf
separators = py_separators
to_crlf = py_to_crlf
to_wire = py_to_wire
strip_volatile = py_strip_volatile
check_headers = py_check_headers
ACCELERATED = False
try:
    from pop3d._speedups import (  # type: ignore[no-redef]
        check_headers,
        count_lf,
        separators,
        strip_volatile,
        to_crlf,
        to_wire,
    )

    ACCELERATED = True
except ImportError:  # not built (no C compiler at install time): the Python versions serve
    pass
