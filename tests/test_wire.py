"""Wire-level pieces: the bounded line reader, command parsing, and RETR's dot-stuffing across chunks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d import limits, mbox, wire

# Every test here runs with the C byte loops and with the Python ones (conftest.bulk_impl).
pytestmark = pytest.mark.usefixtures("bulk_impl")


def reference_stuff(message: bytes) -> bytes:
    """Dot-stuff a whole CRLF message line by line (the obviously correct, slow way)."""
    lines = message.split(b"\r\n")
    tail = lines.pop()
    out = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    if tail:
        out += (b"." + tail if tail.startswith(b".") else tail) + b"\r\n"
    return out + b".\r\n"


def retr_octets(message: bytes, chunk: int) -> bytes:
    """What the session sends for `message` stored in an mbox: mbox's dot-stuffed stream
    (iter_message(wire=True), in chunks of at most `chunk` octets), then the terminator line."""
    data = b"From x Thu Nov 26 10:00:00 2026\n" + message + (b"\n" if message.endswith(b"\n") else b"")
    listing = mbox.scan(data)
    saved = limits.RETR_CHUNK
    limits.RETR_CHUNK = chunk
    try:
        body = b"".join(mbox.iter_message(data, listing, 0, wire=True))
    finally:
        limits.RETR_CHUNK = saved
    assert body == b"" or body.endswith(b"\r\n")  # the session adds only ".\r\n"
    return body + wire.TERMINATOR


CHUNKS = (2, 3, 5, 8, 1000)


def test_dot_stuffing_simple() -> None:
    msg = b".hidden\r\nbody\r\n.\r\n..two\r\n"
    for chunk in CHUNKS:
        assert retr_octets(msg, chunk) == b"..hidden\r\nbody\r\n..\r\n...two\r\n.\r\n"


def test_dot_split_across_chunks() -> None:
    msg = b"line\r\n.dot\r\nx\r\n.y\r\n"
    for chunk in CHUNKS:
        assert retr_octets(msg, chunk) == b"line\r\n..dot\r\nx\r\n..y\r\n.\r\n"


def test_unterminated_last_line_gets_crlf() -> None:
    for chunk in CHUNKS:
        assert retr_octets(b"abc", chunk) == b"abc\r\n.\r\n"
        assert retr_octets(b"x\n.abc", chunk) == b"x\r\n..abc\r\n.\r\n"


def test_empty_message() -> None:
    assert retr_octets(b"", 1000) == b".\r\n"


@settings(max_examples=500, deadline=None)
@given(
    lines=st.lists(
        st.sampled_from([b"", b".", b"..", b".x", b"a", b"a.b", b"ab.c", b"abc.d", b"\r", b" ."]), max_size=20
    ),
    chunk=st.integers(min_value=2, max_value=40),
)
def test_stuffing_is_chunking_independent(lines: list[bytes], chunk: int) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    assert retr_octets(message, chunk) == reference_stuff(message)


def test_line_reader_crlf_and_lf() -> None:
    reader = wire.LineReader()
    reader.feed(b"A\r\nB\nC")
    assert reader.next_line() == b"A"
    assert reader.next_line() == b"B"
    assert reader.next_line() is None
    reader.feed(b"\r\n")
    assert reader.next_line() == b"C"


def test_line_reader_bounds_memory_without_newlines() -> None:
    reader = wire.LineReader()
    for _ in range(1000):
        reader.feed(b"x" * 65536)
        assert reader.next_line() in (wire.TOO_LONG, None)
        assert reader.pending() <= 65536 + 255
    reader.feed(b"tail\r\nNEXT\r\n")
    assert reader.next_line() == b"NEXT"


def test_parse_command() -> None:
    assert wire.parse_command(b"list 1") == (b"LIST", [b"1"], b"1")
    assert wire.parse_command(b"PASS a b  c") == (b"PASS", [b"a", b"b", b"", b"c"], b"a b  c")
    assert wire.parse_command(b"") is None
    assert wire.parse_command(b" STAT") is None
    assert wire.parse_command(b"DELE 1\x00x") is None
    assert wire.parse_command(b"DELE\t1") is None
    assert wire.parse_command(b"PASS p\xc3\xa4ss") == (b"PASS", [b"p\xc3\xa4ss"], b"p\xc3\xa4ss")
