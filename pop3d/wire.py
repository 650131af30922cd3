"""POP3 wire format: bounded line reading, command parsing, replies (dot-stuffing: bulk.to_wire).

Pure byte handling, no I/O: everything here is driven by `protocol` and tested with byte strings.
"""

from __future__ import annotations

from pop3d import limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


class TooLong:
    """Marker returned by `LineReader.next_line` for a line over the length bound (already discarded)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = TooLong()


class LineReader:
    """Split a byte stream into command lines (CRLF or bare LF), bounding every line.

    A line longer than `max_line` octets (terminator included) is discarded up to its LF and
    reported once as TOO_LONG, so a flood without newlines never grows memory.
    """

    __slots__ = ("_buf", "_discarding", "_pos", "max_line")

    def __init__(self, max_line: int = limits.MAX_COMMAND_LINE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._discarding = False
        self.max_line = max_line

    def feed(self, data: bytes) -> None:
        if self._discarding:
            lf = data.find(b"\n")
            if lf < 0:
                return
            self._discarding = False
            data = data[lf + 1 :]
        self._buf += data

    def pending(self) -> int:
        """Octets received but not yet returned as lines."""
        return len(self._buf) - self._pos

    def pending_bytes(self) -> bytes:
        """The octets received but not yet returned as lines."""
        return bytes(self._buf[self._pos :])

    def discard(self) -> None:
        """Drop everything buffered (bytes pipelined behind STLS must never be executed)."""
        self._buf.clear()
        self._pos = 0
        self._discarding = False

    def next_line(self) -> bytes | TooLong | None:
        buf, pos = self._buf, self._pos
        lf = buf.find(b"\n", pos, pos + self.max_line)
        if lf < 0:
            if len(buf) - pos >= self.max_line:
                # Over the bound without a terminator: drop it and everything up to its LF.
                lf = buf.find(b"\n", pos)
                if lf < 0:
                    self._discarding = True
                    buf.clear()
                    self._pos = 0
                else:
                    self._pos = lf + 1
                    self._compact()
                return TOO_LONG
            self._compact()
            return None
        self._pos = lf + 1
        if lf > pos and buf[lf - 1] == 13:  # CRLF: one copy of the line without its CR
            lf -= 1
        return bytes(buf[pos:lf])

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0


def has_control(data: bytes) -> bool:
    """True if `data` holds a NUL, another C0 control byte or DEL (a line with one is invalid)."""
    return 0 in data.translate(_CONTROL_TO_NUL)


# Maps each control byte (C0 and DEL) to 0 and every byte that may appear in a command line
# (space, printable ASCII, 8-bit bytes: passwords may be UTF-8) to 1. A fixed table: translate
# with a deletion set would build one on every call.
_CONTROL_TO_NUL = b"\0" * 0x20 + b"\1" * (0x7F - 0x20) + b"\0" + b"\1" * 0x80


def parse_command(line: bytes) -> tuple[bytes, list[bytes], bytes] | None:
    """Split a command line into (KEYWORD, arguments, text after the keyword).

    Returns None for a line that cannot be a command: empty, or holding a control byte (a NUL
    must not cut `DELE 1\\0junk` into `DELE 1`). The keyword is upper-cased; arguments are split
    on single spaces as RFC 1939 says, and the raw rest is kept for PASS, whose argument may hold
    spaces.
    """
    if not line or has_control(line):
        return None
    keyword, _, rest = line.partition(b" ")
    if not keyword:
        return None
    args = rest.split(b" ") if rest else []
    return keyword.upper(), args, rest


def ok(text: bytes = b"") -> bytes:
    return b"+OK " + text + CRLF if text else b"+OK" + CRLF


def err(text: bytes, code: bytes = b"") -> bytes:
    """An error reply, with an RFC 2449 extended response code such as b"IN-USE" if given."""
    if code:
        return b"-ERR [" + code + b"] " + text + CRLF
    return b"-ERR " + text + CRLF


def multiline(first: bytes, lines: Iterable[bytes]) -> bytes:
    """A complete multi-line reply whose lines are known to need no dot-stuffing (listings)."""
    return first + b"".join(line + CRLF for line in lines) + TERMINATOR
