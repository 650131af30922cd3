"""The byte loops a session spends its CPU in: counting lines, finding From_ separators, the
LF -> CRLF conversion and dot-stuffing of RETR (to_wire: both in one pass).

Each is a bulk CPython bytes method below. When the optional C extension ``pop3d._speedups`` is
built (``pip install`` builds it if a C compiler is there; without one, pop3d runs the same on
these), its versions replace them: same results, at memchr/memcpy speed instead of ~0.5-2.5 GB/s.
``ACCELERATED`` says which are in use; the tests check the two agree on random data.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap

    Buffer = bytes | bytearray | memoryview | mmap.mmap

__all__ = ["ACCELERATED", "count_lf", "separators", "to_crlf", "to_wire"]


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


count_lf = py_count_lf
separators = py_separators
to_crlf = py_to_crlf
to_wire = py_to_wire
ACCELERATED = False
try:
    from pop3d._speedups import count_lf, separators, to_crlf, to_wire  # type: ignore[no-redef]

    ACCELERATED = True
except ImportError:  # not built (no C compiler at install time): the Python versions serve
    pass
