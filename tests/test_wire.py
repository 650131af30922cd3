"""Wire-level pieces: the bounded line reader, command parsing, and dot-stuffing across chunks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d import wire

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


def test_dot_stuffing_simple() -> None:
    msg = b".hidden\r\nbody\r\n.\r\n..two\r\n"
    assert b"".join(wire.stuff_message([msg])) == b"..hidden\r\nbody\r\n..\r\n...two\r\n.\r\n"


def test_dot_split_across_chunks() -> None:
    chunks = [b"line\r\n", b".dot\r\n", b"x\r", b"\n.", b"y\r\n"]
    assert b"".join(wire.stuff_message(chunks)) == b"line\r\n..dot\r\nx\r\n..y\r\n.\r\n"


def test_unterminated_last_line_gets_crlf() -> None:
    assert b"".join(wire.stuff_message([b"abc"])) == b"abc\r\n.\r\n"


def test_empty_message() -> None:
    assert b"".join(wire.stuff_message([])) == b".\r\n"


@settings(max_examples=500, deadline=None)
@given(
    lines=st.lists(st.sampled_from([b"", b".", b"..", b".x", b"a", b"a.b", b"\r", b" ."]), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10),
)
def test_stuffing_is_chunking_independent(lines: list[bytes], cuts: list[int]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    points = sorted({c % (len(message) + 1) for c in cuts} | {0, len(message)})
    chunks = [message[a:b] for a, b in itertools.pairwise(points)]
    assert b"".join(wire.stuff_message(chunks)) == reference_stuff(message)


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
