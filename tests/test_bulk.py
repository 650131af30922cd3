"""The C accelerator's byte loops give exactly what their Python versions give (pop3d.bulk)."""

from __future__ import annotations

import mmap
import os
import sys
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d import bulk

try:
    from pop3d import _speedups
except ImportError:  # pragma: no cover - depends on the install
    _speedups = None

needs_c = pytest.mark.skipif(
    _speedups is None and os.environ.get("POP3D_REQUIRE_SPEEDUPS") != "1",
    reason="the C accelerator pop3d._speedups is not built (no C compiler at install)",
)

# Spools are made of these: separators with LF and CRLF, dots at line starts, quoted From lines.
pieces = st.sampled_from(
    [
        b"\n",
        b"\r",
        b"\r\n",
        b".",
        b"..",
        b"F",
        b"From ",
        b"\n\nFrom ",
        b"\r\n\r\nFrom ",
        b">From ",
        b"x",
        b"\x00",
    ]
)
data = st.one_of(st.lists(pieces, max_size=60).map(b"".join), st.binary(max_size=300))


def test_accelerator_is_built_where_required():
    """CI builds the extension (scripts/test) and says so: a silent fallback there would hide it."""
    if os.environ.get("POP3D_REQUIRE_SPEEDUPS") != "1":
        pytest.skip("POP3D_REQUIRE_SPEEDUPS is not set (CI sets it)")
    assert bulk.ACCELERATED
    assert bulk.count_lf is _speedups.count_lf


@needs_c
@settings(max_examples=1500, deadline=None)
@given(buf=data, a=st.integers(0, 320), b=st.integers(0, 320))
def test_count_and_separators_agree(buf, a, b):
    assert _speedups.count_lf(buf, a, b) == bulk.py_count_lf(buf, a, b)
    start, end = min(a, b, len(buf)), min(max(a, b), len(buf))
    assert _speedups.separators(buf, start, end) == bulk.py_separators(buf, start, end)


@needs_c
@settings(max_examples=1500, deadline=None)
@given(buf=data)
def test_transforms_agree(buf):
    assert _speedups.to_crlf(buf) == bulk.py_to_crlf(buf)
    for at_line_start in (True, False):
        assert _speedups.to_wire(buf, at_line_start) == bulk.py_to_wire(buf, at_line_start)


@needs_c
def test_long_buffers_and_every_word_offset():
    """The counter works eight octets at a time in runs of 255 words: cross those edges."""
    for n in (0, 7, 8, 9, 2039, 2040, 2041, 2048 * 3 + 5):
        for lf_every in (1, 3, 8, 255):
            buf = bytes(10 if i % lf_every == 0 else 65 + i % 7 for i in range(n))
            for start in range(0, min(n, 9)):
                assert _speedups.count_lf(buf, start, n) == buf.count(b"\n", start, n)
    # High octets never count as LF (a carry or sign bug would).
    assert _speedups.count_lf(bytes(range(256)) * 40, 0, 10240) == 40
    # SSE2 counts 16 octets a step in runs of 255 steps (4080 octets): cross those edges too.
    for n in (15, 16, 17, 4079, 4080, 4081, 4096, 8160, 8161, 3 * 4080 + 17):
        buf = bytes(10 if i % 3 == 0 else 255 for i in range(n))
        for start in (0, 1, 15, 16, 17):
            assert _speedups.count_lf(buf, start, n) == buf.count(b"\n", start, n), (n, start)


@needs_c
def test_separators_at_every_offset_of_a_step():
    """SSE2 looks for LF then "F" 16 octets a step, reading one octet ahead: a separator (LF or
    CRLF form) at every offset around the steps' edges, near the end and past `end`, and
    near misses ("\nFrom" without the space, "\nF" alone, a From line not after an empty line)."""
    for sep in (b"\n\nFrom x", b"\r\n\r\nFrom x", b"\n\nFrom", b"\nFrom x", b"\n\nF"):
        for at in range(0, 40):
            buf = b"y" * at + sep + b"z" * (40 - at)
            for start, end in ((0, len(buf)), (1, len(buf) - 3), (at, at + 2), (0, at + 1)):
                end = max(start, end)
                assert _speedups.separators(buf, start, end) == bulk.py_separators(buf, start, end), (
                    sep,
                    at,
                    start,
                    end,
                )
    assert _speedups.count_lf(b"\x8a" * 4096, 0, 4096) == 0


@needs_c
def test_bounds_beyond_the_buffer_are_clamped_and_read_only_buffers_accepted(tmp_path):
    buf = b"x\n\nFrom a\n\nFrom b\n"
    for huge in (10**9, sys.maxsize):
        assert _speedups.count_lf(buf, 0, huge) == buf.count(b"\n")
        assert _speedups.count_lf(buf, huge, huge) == 0
        assert _speedups.separators(buf, 0, huge) == [2, 10]
        assert _speedups.separators(buf, huge - 1, huge) == []
    assert _speedups.separators(buf, 5, 2) == []
    path = tmp_path / "m"
    path.write_bytes(buf)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert _speedups.separators(m, 0, len(m)) == [2, 10]
        assert _speedups.count_lf(m, 0, len(m)) == 5


@needs_c
@pytest.mark.parametrize("bounds", [(-1, 5), (0, -1), (-5, -3), (-sys.maxsize - 1, sys.maxsize)])
def test_negative_bounds_are_refused(bounds):
    """A negative bound is an error, not a read before the buffer (UBSan: pointer overflow) nor,
    as in a slice, a count from the end."""
    for function in (_speedups.count_lf, _speedups.separators):
        with pytest.raises(ValueError, match="must be >= 0"):
            function(b"x\n\nFrom a\n", *bounds)


@needs_c
def test_transforms_take_only_bytes(tmp_path):
    """to_crlf/to_wire count the LFs, allocate, then copy: a buffer that changed in between (a
    MAP_SHARED mapping another process writes to) overflowed the heap (ASan). Only bytes, which
    cannot change, are taken."""
    path = tmp_path / "m"
    path.write_bytes(b"a\n.b\n" * 100)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED) as shared:
        changing = (bytearray(b"a\nb"), memoryview(b".\n.\n"), memoryview(bytearray(b"\n")), shared, "text")
        for buf in changing:
            with pytest.raises(TypeError, match="must be bytes"):
                _speedups.to_crlf(buf)
            with pytest.raises(TypeError, match="must be bytes"):
                _speedups.to_wire(buf, True)
        chunk = shared[:]
    assert _speedups.to_crlf(chunk) == bulk.py_to_crlf(chunk) == b"a\r\n.b\r\n" * 100
    assert _speedups.to_wire(chunk, True) == b"a\r\n..b\r\n" * 100


# Header blocks: the names the UID digest leaves out, in any case, near misses, blanks, colons,
# continuation lines, and LFs/CRs anywhere.
header_pieces = st.sampled_from(
    [
        b"\n",
        b"\r\n",
        b" ",
        b"\t",
        b":",
        b"x",
        b"From a@b Mon\n",
        b"Subject: s",
        *(
            name
            for word in (b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imap", b"x-imapbase")
            for name in (word, word.upper(), word.title(), word[:-1], word + b"l")
        ),
        b"Content-Length",
        b"content-LENGTH",
        b"Lines",
        b"LINE",
        b"\nStatus: RO\n",
        b"\nX-UID: 1\n\tmore\n x\n",
    ]
)
header_blocks = st.one_of(st.lists(header_pieces, max_size=40).map(b"".join), st.binary(max_size=200))


@needs_c
@settings(max_examples=3000, deadline=None)
@given(block=header_blocks)
def test_strip_volatile_agrees(block):
    assert _speedups.strip_volatile(block) == bulk.py_strip_volatile(block)


def test_strip_volatile_takes_out_exactly_the_rewritten_headers():
    """Each name, any case, blanks before the colon, continuation lines; the LF that ends them
    stays; a longer name (X-UIDL), a name without its colon, and the first line stay."""
    block = (
        b"From a@b Mon Jan  1 00:00:00 2024\nstatus: RO\nSubject: s\nX-UID  :\t7\n  folded\n\tagain\n"
        b"X-UIDL: k\nLINES: 3\nx-imapbase: 1 2\nX-IMAP: 9\nContent-Length: 12\nX-Keywords:\n"
        b"X-Status: A\nLines 3\nTo: t\n"
    )
    kept = b"From a@b Mon Jan  1 00:00:00 2024\nSubject: s\nX-UIDL: k\nLines 3\nTo: t\n"
    assert bulk.py_strip_volatile(block) == kept
    if _speedups is not None:
        assert _speedups.strip_volatile(block) == kept
        assert _speedups.strip_volatile(kept) is kept  # nothing to take out: no copy


# check_headers: spools of messages made of these pieces (LF and CRLF, headers or none, empty
# lines, From_ lines in bodies), then edited in place the ways a mail reader could.
message_pieces = st.sampled_from(
    [b"Subject: s\n", b"X: y\r\n", b"\n", b"\r\n", b"body\n", b"From x\n", b">From q\n", b"z", b"\r"]
)
spools = st.lists(st.lists(message_pieces, max_size=8).map(b"".join), min_size=1, max_size=6).map(
    lambda messages: b"".join(b"From a@b Mon Jan  1 00:00:00 2024\n" + m + b"\n" for m in messages)
)


def _headers_args(data: bytes) -> tuple:
    from pop3d import mbox

    listing = mbox.scan(data)
    _, ends, _, seplen, records = listing.parts()
    return listing, (ends.tobytes(), ends.itemsize, bytes(seplen), bytes(records))


@needs_c
@settings(max_examples=1500, deadline=None)
@given(
    data=spools,
    edit=st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=3)),
    span=st.integers(0, 3),
)
def test_check_headers_agrees_and_proves_a_scan(data, edit, span):
    """On the spool a listing was scanned from, every message holds; after an edit in place
    (any length), both versions find the same first message that no longer holds."""
    listing, args = _headers_args(data)
    assert _speedups.check_headers(data, *args, 0, listing.count) == listing.count
    assert bulk.py_check_headers(data, *args, 0, listing.count) == listing.count
    at, text = edit[0] % len(data), edit[1]
    changed = data[:at] + text + data[at + span :]
    for first in range(listing.count + 1):
        for stop in (first, listing.count):
            got = _speedups.check_headers(changed, *args, first, stop)
            assert got == bulk.py_check_headers(changed, *args, first, stop)
            assert first <= got <= stop


def test_check_headers_finds_a_permutation_and_a_moved_boundary():
    """The review's two cases: two messages of one size swapped (every From_ line where it was),
    and octets moved from one message to the next (a From_ line moved)."""
    from pop3d import mbox

    def message(subject: bytes, body: bytes) -> bytes:
        return b"From x@example.org Mon Jan  1 00:00:00 2024\nSubject: %s\n\n%s\n\n" % (subject, body)

    a, b, c = message(b"AAAA", b"a" * 100), message(b"BBBB", b"b" * 100), message(b"CCCC", b"c" * 50)
    listing, args = _headers_args(a + b + c)
    permuted = b + a + c
    moved = a[:-2] + b"XXXXX" + a[-2:] + b[:-7] + b[-2:] + c
    assert len(permuted) == len(moved) == len(a + b + c)
    assert mbox.scan(moved).from_offset(1) != listing.from_offset(1)
    for check in (bulk.py_check_headers, *([_speedups.check_headers] if _speedups else [])):
        assert check(permuted, *args, 0, 3) == 0
        assert check(permuted, *args, 2, 3) == 3  # the third is untouched
        assert check(moved, *args, 0, 3) == 1  # the first still starts and reads the same


@needs_c
def test_check_headers_takes_only_read_only_buffers_and_bounds_its_inputs(tmp_path):
    data = b"From a\nS: 1\n\nx\n\nFrom b\nS: 2\n\ny\n"
    _, (ends, width, seplen, records) = _headers_args(data)
    path = tmp_path / "m"
    path.write_bytes(data)
    with (
        open(path, "r+b") as f,
        mmap.mmap(f.fileno(), 0) as writable,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as readable,
    ):
        assert _speedups.check_headers(readable, ends, width, seplen, records, 0, 2) == 2
        for bad in (bytearray(data), writable, memoryview(bytearray(data))):
            with pytest.raises(TypeError, match="read-only"):
                _speedups.check_headers(bad, ends, width, seplen, records, 0, 2)
        with pytest.raises(TypeError, match="read-only"):
            _speedups.check_headers(data, bytearray(ends), width, seplen, records, 0, 2)
    for check in (_speedups.check_headers, bulk.py_check_headers):
        for first, stop in ((0, 3), (-1, 1), (2, 1)):
            with pytest.raises(ValueError, match="first and stop"):
                check(data, ends, width, seplen, records, first, stop)
        with pytest.raises(ValueError, match="first and stop"):
            check(data, ends[:0], width, seplen, records, 0, 2)  # offsets too short for stop
        with pytest.raises(ValueError, match="width"):
            check(data, ends, 2, seplen, records, 0, 2)
        # A record claiming a block longer than the buffer, or offsets past it: not held, no read beyond.
        long = bytearray(records)
        word = bulk.RECORD + bulk.CHECK_AT
        long[word : word + 4] = bulk.CHECK_LENGTH.to_bytes(4, "little")
        assert check(data, ends, width, seplen, bytes(long), 0, 2) == 1
        far = array("I" if width == 4 else "Q", [2**31]).tobytes()
        assert check(data, far, width, seplen, records, 0, 2) == 1
        assert check(data[:-3], ends, width, seplen, records, 0, 2) == 1  # truncated spool
        assert check(b"", ends, width, seplen, records, 0, 2) == 0
