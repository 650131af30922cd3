"""mbox scanner and message streams, checked against a line-by-line model of the spec."""

from __future__ import annotations

import mmap
import re
import sys
import tracemalloc
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3d import limits, mbox

# Every test here runs with the C byte loops and with the Python ones (conftest.bulk_impl).
pytestmark = pytest.mark.usefixtures("bulk_impl")

# ---------------------------------------------------------------------------------------------
# The reference model: the product spec, one line at a time, obviously right and slow.


def _lines(data: bytes) -> list[bytes]:
    """Lines with their LF (the last one may lack it)."""
    parts = data.split(b"\n")
    return [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


BLANK = (b"\n", b"\r\n")


def ref_messages(data: bytes) -> list[list[bytes]]:
    """Content lines of each message: From_ line at 0 or after a blank line; one separator dropped."""
    lines = _lines(data)
    firsts = [
        k for k, line in enumerate(lines) if k == 0 or (line.startswith(b"From ") and lines[k - 1] in BLANK)
    ]
    out = []
    for n, k in enumerate(firsts):
        if n + 1 < len(firsts):
            body = lines[k + 1 : firsts[n + 1] - 1]  # the blank line before the next From_ goes
        else:
            body = lines[k + 1 :]
            if body and body[-1] in BLANK:  # ... and one trailing blank line at EOF
                body = body[:-1]
        out.append(body)
    return out


def ref_sent(lines: list[bytes], rd: bool) -> bytes:
    out = []
    for line in lines:
        if rd and re.match(rb">+From ", line):
            line = line[1:]
        if line.endswith(b"\r\n"):
            pass
        elif line.endswith(b"\n"):
            line = line[:-1] + b"\r\n"
        else:
            line += b"\r\n"  # the final line without LF
        out.append(line)
    return b"".join(out)


def ref_top(lines: list[bytes], body_lines: int) -> list[bytes]:
    for k, line in enumerate(lines):
        if line in BLANK:
            return lines[: k + 1 + body_lines]
    return lines


# ---------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def small_windows(scan_window: int, chunk: int) -> Iterator[None]:
    """Tiny scanner windows and chunks, so that every boundary case is crossed."""
    saved = limits.MBOX_SCAN_WINDOW, limits.RETR_CHUNK
    limits.MBOX_SCAN_WINDOW, limits.RETR_CHUNK = scan_window, chunk
    try:
        yield
    finally:
        limits.MBOX_SCAN_WINDOW, limits.RETR_CHUNK = saved


def mbox_of(*messages: bytes, sep: bytes = b"\n") -> bytes:
    """An mbox as an MDA writes it (messages are given with their final line end)."""
    return b"".join(
        b"From sender@example.org Thu Nov 26 10:%02d:00 2026%s%s%s" % (i, sep, m, sep)
        for i, m in enumerate(messages)
    )


def retr(buf, listing: mbox.Listing, i: int, fmt: str = "mboxo", body_lines: int | None = None) -> bytes:
    return b"".join(mbox.iter_message(buf, listing, i, body_lines, fmt))


def check_against_model(data: bytes, fmt: str, buf=None, tops: tuple[int, ...] = (0, 1, 3)) -> mbox.Listing:
    """Everything the scanner and the stream say about data agrees with the model."""
    buf = data if buf is None else buf
    rd = fmt == "mboxrd"
    listing = mbox.scan(buf, fmt)
    model = ref_messages(data)
    assert listing.count == len(model)
    assert listing.scanned_length == len(data)
    total = 0
    for i, lines in enumerate(model):
        sent = ref_sent(lines, rd)
        assert listing.size(i) == len(sent)
        chunks = list(mbox.iter_message(buf, listing, i, None, fmt))
        assert all(0 < len(c) <= max(limits.RETR_CHUNK, 2) for c in chunks)
        assert b"".join(chunks) == sent
        start, end = listing.start(i), listing.end(i)
        assert data[start:end] == b"".join(lines)
        assert listing.from_offset(i) <= start <= end <= listing.from_offset(i + 1)
        assert data[listing.from_offset(i) :].startswith(b"From ")
        for m in tops:
            assert retr(buf, listing, i, fmt, m) == ref_sent(ref_top(lines, m), rd)
        total += len(sent)
    assert listing.total_size == total
    assert listing.from_offset(listing.count) == len(data)
    uids = [listing.uid(i) for i in range(listing.count)]
    assert len(set(uids)) == len(uids)
    assert all(1 <= len(u) <= 70 and all(0x21 <= b <= 0x7E for b in u) for u in uids)
    return listing


@pytest.fixture
def mapped(tmp_path: Path):
    """Map bytes read-only from a real file, as the maildrop does (exercises page release)."""
    opened: list[tuple[object, mmap.mmap]] = []

    def make(data: bytes) -> mmap.mmap:
        path = tmp_path / f"spool{len(opened)}"
        path.write_bytes(data)
        f = path.open("rb")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        opened.append((f, mm))
        return mm

    yield make
    for f, mm in opened:
        mm.close()
        f.close()


# ---------------------------------------------------------------------------------------------
# Framing and sent form


def test_empty_file_is_empty_listing():
    listing = mbox.scan(b"")
    assert (listing.count, listing.total_size, listing.scanned_length) == (0, 0, 0)
    assert listing.from_offset(0) == 0


@pytest.mark.parametrize("data", [b"Hello\n", b"from x\n", b" From x\n", b"\nFrom x\n", b"From"])
def test_not_an_mbox(data):
    with pytest.raises(mbox.MboxFormatError):
        mbox.scan(data)


def test_unknown_format():
    with pytest.raises(ValueError):
        mbox.scan(b"From x\n", "maildir")


def test_simple_spool_and_leading_dots():
    data = mbox_of(b"Subject: a\n\n.leading dot\n..two\n.\n", b"Subject: b\n\nbody\n")
    listing = check_against_model(data, "mboxo")
    assert listing.count == 2
    # Dot-stuffing is the wire's job: lines starting with "." are sent as stored.
    assert retr(data, listing, 0) == b"Subject: a\r\n\r\n.leading dot\r\n..two\r\n.\r\n"
    assert listing.size(1) == len(b"Subject: b\r\n\r\nbody\r\n")


@pytest.mark.parametrize("fmt", ["mboxo", "mboxrd"])
def test_quoted_from_lines(fmt):
    body = b"S: q\n\n>From one\n>>From two\n>>>From three\n> From not\n>Fromage\nx >From y\n>\n>>\n"
    data = mbox_of(body)
    listing = check_against_model(data, fmt)
    got = retr(data, listing, 0, fmt)
    if fmt == "mboxo":
        assert got == body.replace(b"\n", b"\r\n")
    else:
        assert got == (
            b"S: q\r\n\r\nFrom one\r\n>From two\r\n>>From three\r\n> From not\r\n>Fromage\r\n"
            b"x >From y\r\n>\r\n>>\r\n"
        )
    assert listing.size(0) == len(got)


def test_mboxrd_quoted_from_as_first_content_line():
    data = b"From x\n>From header-ish\n\nbody\n"
    listing = check_against_model(data, "mboxrd")
    assert retr(data, listing, 0, "mboxrd") == b"From header-ish\r\n\r\nbody\r\n"


def test_crlf_stored_file():
    data = mbox_of(b"Subject: a\r\n\r\nline\r\n", b"Subject: b\r\n\r\n\r\nx\r\n", sep=b"\r\n")
    listing = check_against_model(data, "mboxo")
    assert listing.count == 2
    assert retr(data, listing, 0) == b"Subject: a\r\n\r\nline\r\n"  # CRLF not doubled
    assert retr(data, listing, 1) == b"Subject: b\r\n\r\n\r\nx\r\n"


def test_mixed_line_endings_and_bare_cr():
    data = b"From x\nA: 1\r\nB: 2\n\nbare\rcr\r\r\nlf\n\rstart\n"
    listing = check_against_model(data, "mboxo")
    assert retr(data, listing, 0) == b"A: 1\r\nB: 2\r\n\r\nbare\rcr\r\r\nlf\r\n\rstart\r\n"


def test_no_final_newline():
    data = b"From x\nSubject: a\n\nlast line"
    listing = check_against_model(data, "mboxo")
    assert retr(data, listing, 0) == b"Subject: a\r\n\r\nlast line\r\n"
    bare_cr = b"From x\nS: a\n\nends with cr\r"
    listing = check_against_model(bare_cr, "mboxo")
    assert retr(bare_cr, listing, 0) == b"S: a\r\n\r\nends with cr\r\r\n"


def test_from_line_without_lf_at_eof_is_empty_message():
    data = mbox_of(b"S: a\n\nx\n") + b"From last"
    listing = check_against_model(data, "mboxo")
    assert listing.count == 2
    assert listing.size(1) == 0
    assert retr(data, listing, 1) == b""
    assert check_against_model(b"From only", "mboxo").count == 1


def test_from_in_body_without_blank_line_is_body():
    data = b"From a\nS: 1\n\nbody\nFrom not a separator\n\nFrom b\nS: 2\n\nx\n"
    listing = check_against_model(data, "mboxo")
    assert listing.count == 2
    assert retr(data, listing, 0) == b"S: 1\r\n\r\nbody\r\nFrom not a separator\r\n"


def test_extra_blank_lines_belong_to_the_message():
    data = b"From a\nS: 1\n\nbody\n\n\n\nFrom b\nS: 2\n\nx\n\n\n"
    listing = check_against_model(data, "mboxo")
    assert retr(data, listing, 0) == b"S: 1\r\n\r\nbody\r\n\r\n\r\n"  # only one blank is the separator
    assert retr(data, listing, 1) == b"S: 2\r\n\r\nx\r\n\r\n"  # one trailing blank dropped at EOF


def test_separator_right_after_from_line_and_crlf_separators():
    data = b"From a\n\nFrom b\n\r\nFrom c\r\n\r\nFrom d\r\nS: d\r\n\r\n"
    listing = check_against_model(data, "mboxo")
    assert [listing.size(i) for i in range(listing.count)] == [0, 0, 0, len(b"S: d\r\n")]


def test_offsets_describe_the_file_layout():
    data = mbox_of(b"S: 1\n\nx\n", b"S: 2\n\ny\n", b"S: 3\n\nz\n")
    listing = mbox.scan(data)
    assert listing.from_offset(1) == data.index(b"From sender@example.org Thu Nov 26 10:01")
    assert data[listing.end(0) : listing.from_offset(1)] == b"\n"  # the separator
    assert data[listing.from_offset(1) : listing.start(1)].endswith(b"10:01:00 2026\n")
    with pytest.raises(IndexError):
        listing.size(3)
    with pytest.raises(IndexError):
        listing.uid(-1)  # no "last message" by accident


# ---------------------------------------------------------------------------------------------
# TOP


def test_top():
    msg = b"Subject: t\nX: y\n\nl1\nl2\n\nl4\n"
    data = mbox_of(msg)
    listing = check_against_model(data, "mboxo", tops=(0, 1, 2, 3, 4, 5, 100))
    assert retr(data, listing, 0, body_lines=0) == b"Subject: t\r\nX: y\r\n\r\n"
    assert retr(data, listing, 0, body_lines=1) == b"Subject: t\r\nX: y\r\n\r\nl1\r\n"
    assert retr(data, listing, 0, body_lines=1000) == retr(data, listing, 0)


def test_top_headers_only_and_empty_first_line():
    headers_only = (b"Subject: no body\nX: y\n", b"Subject: no newline at all", b"\nempty header\n", b"")
    for msg in headers_only:
        data = b"From x\n" + msg
        listing = check_against_model(data, "mboxo", tops=(0, 1, 2))
        assert retr(data, listing, 0, body_lines=0) == ref_sent(ref_top(ref_messages(data)[0], 0), False)


def test_top_many_lines_crosses_windows():
    body = b"".join(b"line %d\n" % i for i in range(5000))
    data = mbox_of(b"S: x\n\n" + body)
    listing = mbox.scan(data)
    with small_windows(64, 100):
        for m in (0, 1, 33, 34, 999, 4999, 5000, 5001):
            expected = (
                b"S: x\r\n\r\n"
                + body.replace(b"\n", b"\r\n")[
                    : len(b"".join(b"line %d\r\n" % i for i in range(min(m, 5000))))
                ]
            )
            assert retr(data, listing, 0, body_lines=m) == expected


def test_top_many_lines_in_one_window():
    body = b"".join(b"l%d\n" % i for i in range(3000))
    data = mbox_of(b"S: x\n\n" + body)
    listing = mbox.scan(data)
    for m in (33, 100, 1234, 2999, 3000):
        assert retr(data, listing, 0, body_lines=m) == b"S: x\r\n\r\n" + b"".join(
            b"l%d\r\n" % i for i in range(m)
        )


def test_top_rejects_negative():
    data = mbox_of(b"S: x\n\nb\n")
    with pytest.raises(ValueError):
        mbox.iter_message(data, mbox.scan(data), 0, -1)


# ---------------------------------------------------------------------------------------------
# Volume and memory


def test_many_tiny_messages():
    n = 20_000
    data = b"".join(b"From u Thu Nov 26 10:00:00 2026\nSubject: %d\n\nb\n\n" % i for i in range(n))
    listing = mbox.scan(data)
    assert listing.count == n
    one = len(b"Subject: 1\r\n\r\nb\r\n")
    assert listing.size(1) == one
    assert listing.total_size == sum(len(b"Subject: %d\r\n\r\nb\r\n" % i) for i in range(n))
    assert retr(data, listing, n - 1) == b"Subject: %d\r\n\r\nb\r\n" % (n - 1)
    assert len({listing.uid(i) for i in range(n)}) == n


def test_bulk_sizes_and_uids_are_the_single_ones():
    """LIST and UIDL of every message take ranges at once: the same values, duplicates numbered,
    across blocks of hex digits (4096 messages each), for any range."""
    n = 9_000
    twin = b"From u Thu Nov 26 10:00:00 2026\nSubject: twin\n\nb\n\n"
    data = b"".join(
        twin
        if i % 1500 == 7
        else b"From u Thu Nov 26 10:00:00 2026\nSubject: %d\n\n%s\n\n" % (i, b"x" * (i % 50))
        for i in range(n)
    )
    listing = mbox.scan(data)
    single_uids = [listing.uid(i) for i in range(n)]
    assert b"-6" in single_uids[-1000:][-1] or any(u.endswith(b"-6") for u in single_uids)
    assert listing.uids(0, n) == single_uids
    assert listing.sizes(0, n) == [listing.size(i) for i in range(n)]
    for lo, hi in [(0, 0), (4095, 4097), (7, 8), (4096, 8192), (8191, n), (1, n - 1)]:
        assert listing.uids(lo, hi) == single_uids[lo:hi]
        assert listing.sizes(lo, hi) == [listing.size(i) for i in range(lo, hi)]
    for lo, hi in [(-1, 3), (5, 4), (0, n + 1)]:
        with pytest.raises(IndexError):
            listing.uids(lo, hi)
        with pytest.raises(IndexError):
            listing.sizes(lo, hi)


def test_big_message_streams_flat(mapped):
    line = b"%08d abcdefghijklmnopqrstuvwxyz 0123456789 .\n"
    body = b"".join(line % i for i in range(20 * 1024 * 1024 // len(line % 0)))
    data = mbox_of(b"Subject: big\n\n" + body, b"Subject: small\n\nx\n")
    mm = mapped(data)
    del body
    tracemalloc.start()
    try:
        listing = mbox.scan(mm)
        _, scan_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        lf = 0
        for chunk in mbox.iter_message(mm, listing, 0):
            assert len(chunk) <= limits.RETR_CHUNK
            total += len(chunk)
            lf += chunk.count(b"\n")
        _, retr_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    content = data[listing.start(0) : listing.end(0)]
    assert listing.size(0) == total == len(content) + content.count(b"\n")
    assert lf == content.count(b"\n")
    assert listing.count == 2
    # Bounded by windows, not by the 20 MB message (allocation peaks, deterministic).
    assert scan_peak < 3 * limits.MBOX_SCAN_WINDOW
    assert retr_peak < 4 * limits.RETR_CHUNK


def test_mmap_and_bytes_agree(mapped):
    data = mbox_of(b"S: a\r\n\r\n>From x\r\n", b"S: b\n\nbody\n" * 3, sep=b"\n")
    for fmt in ("mboxo", "mboxrd"):
        mm = mapped(data)
        with small_windows(5, 7):
            check_against_model(data, fmt, buf=mm)
        a, b = mbox.scan(mm, fmt), mbox.scan(data, fmt)
        assert [a.uid(i) for i in range(a.count)] == [b.uid(i) for i in range(b.count)]


# ---------------------------------------------------------------------------------------------
# UIDs


def uids(data: bytes) -> list[bytes]:
    listing = mbox.scan(data)
    return [listing.uid(i) for i in range(listing.count)]


def delete(data: bytes, index: int) -> bytes:
    """Remove a message the way the maildrop update does: From_ line through separator."""
    listing = mbox.scan(data)
    return data[: listing.from_offset(index)] + data[listing.from_offset(index + 1) :]


SPOOL = b"".join(
    b"From u%d@example.org Thu Nov 26 10:%02d:00 2026\nMessage-ID: <%d@x>\nSubject: m%d\n\nbody %d\n\n"
    % (i, i, i, i, i)
    for i in range(5)
)


def test_uids_stable_across_scans():
    assert uids(SPOOL) == uids(SPOOL)
    assert all(len(u) == 24 for u in uids(SPOOL))


def test_uids_survive_deletion_and_new_mail():
    before = uids(SPOOL)
    for i in range(5):
        after = uids(delete(SPOOL, i))
        assert after == before[:i] + before[i + 1 :]
    appended = SPOOL + b"From new Fri Nov 27 00:00:00 2026\nSubject: new\n\nnew\n\n"
    assert uids(appended)[:5] == before
    # Deleting the last message leaves the new last one's separator at EOF: still the same message.
    shortened = delete(SPOOL, 4)
    assert [mbox.scan(shortened).size(i) for i in range(4)] == [mbox.scan(SPOOL).size(i) for i in range(4)]


def test_duplicate_deliveries_get_distinct_uids():
    msg = b"From u Thu Nov 26 10:00:00 2026\nSubject: same\n\nsame\n\n"
    other = b"From v Thu Nov 26 10:00:00 2026\nSubject: other\n\nx\n\n"
    got = uids(msg + other + msg + msg)
    base = got[0]
    assert got[2:] == [base + b"-2", base + b"-3"]
    assert len(set(got)) == 4
    assert uids(other + msg + msg) == [got[1], base, base + b"-2"]  # first copy deleted: renamed


@pytest.mark.parametrize(
    "added",
    [
        b"Status: RO\n",
        b"Status: RO\nX-Status: A\nX-Keywords: $Seen\n",
        b"status:O\n",
        b"X-UID: 7\nX-IMAPbase: 1 2\n",
        b"X-IMAP: 1 2\n",
        b"Content-Length: 12\nLines: 3\n",
        b"X-Keywords: one\n two\n\tthree\n",
        b"CONTENT-LENGTH : 12\n",
    ],
)
@pytest.mark.parametrize("where", ["top", "middle", "bottom"])
def test_uid_ignores_headers_muas_rewrite(added, where):
    headers = [b"Return-Path: <a@b>\n", b"Subject: s\n", b"Message-ID: <1@x>\n"]
    at = {"top": 0, "middle": 1, "bottom": 3}[where]
    plain = b"From a Thu Nov 26 10:00:00 2026\n" + b"".join(headers) + b"\nbody\n"
    marked = (
        b"From a Thu Nov 26 10:00:00 2026\n"
        + b"".join(headers[:at])
        + added
        + b"".join(headers[at:])
        + b"\nbody\n"
    )
    assert uids(plain) == uids(marked)
    assert uids(mbox_of(b"S: x\n\n") + plain) == uids(mbox_of(b"S: x\n\n") + marked)


def test_uid_scheme_is_fixed():
    """UIDs must never change between versions: pin the documented scheme and one literal value."""
    import hashlib

    def expected(hashed: bytes) -> bytes:
        return hashlib.sha256(hashed).hexdigest()[:24].encode()

    data = b"From a@b Thu Nov 26 10:00:00 2026\nSubject: s\nStatus: RO\nX-Keywords: a\n b\n\nbody\n"
    assert uids(data) == [expected(b"From a@b Thu Nov 26 10:00:00 2026\nSubject: s\n")]
    assert uids(data) == [b"fe54b1d44341fd6759f3bfe2"]
    # The header block ends at the first empty line, CRLF or LF; what follows is body.
    crlf = b"From a\r\nA: 1\r\n\r\nStatus: RO\n\nbody\n"
    assert uids(crlf) == [expected(b"From a\r\nA: 1\r\n")]
    assert uids(b"From a\n\nSubject: body\n") == [expected(b"From a\n")]
    assert uids(b"From a") == [expected(b"From a")]


@pytest.mark.parametrize("hashlib_importable", [True, False])
def test_uids_are_the_same_whichever_sha256_hashes_them(monkeypatch, hashlib_importable):
    """A small spool's UID digests come from CPython's built-in SHA-256 (no OpenSSL to load), a
    big one's from hashlib's, or from the built-in one when the account cannot import hashlib:
    the same UIDs in every case, pinned by the scheme."""
    import hashlib

    one = b"From a@b Thu Nov 26 10:00:00 2026\nSubject: s\nStatus: RO\n\nbody\n\n"
    want = hashlib.sha256(b"From a@b Thu Nov 26 10:00:00 2026\nSubject: s\n").hexdigest()[:24].encode()
    if not hashlib_importable:
        monkeypatch.setitem(sys.modules, "hashlib", None)  # `import hashlib` raises ImportError
    small = one * 3
    big = one * (limits.MBOX_OPENSSL_SHA_MIN // len(one) + 1)
    assert len(big) >= limits.MBOX_OPENSSL_SHA_MIN > len(small)
    for data in (small, big):
        got = mbox.scan(data).uids(0, 3)
        assert got == [want, want + b"-2", want + b"-3"]


def test_uid_changes_with_real_headers():
    a = b"From a Thu Nov 26 10:00:00 2026\nSubject: s\n\nbody\n"
    assert uids(a) != uids(a.replace(b"Subject: s", b"Subject: t"))
    assert uids(a) != uids(a.replace(b"From a", b"From b"))
    assert uids(a) != uids(a.replace(b"Subject: s", b"Statusx: RO\nSubject: s"))
    assert uids(a) == uids(a.replace(b"body", b"other body"))  # the body is not hashed


def test_uid_with_crlf_headers_and_huge_header(monkeypatch):
    a = b"From a\r\nSubject: s\r\n\r\nbody\r\n"
    assert uids(a) == uids(a.replace(b"Subject", b"Status: RO\r\nSubject"))
    monkeypatch.setattr(limits, "UID_HEADER_CAP", 64)
    big = b"From a\nX: " + b"y" * 500 + b"\n\nbody\n"
    assert len(uids(big)) == 1
    assert uids(big) == uids(big.replace(b"From a\n", b"From a\nStatus: RO\n"))


# ---------------------------------------------------------------------------------------------
# The property: for any content, the scanner's sizes, offsets and the streams agree with the model.

FRAGMENTS = [
    b"\n",
    b"\n",
    b"\r\n",
    b"\r",
    b"\n\n",
    b"\n\r\n",
    b"From ",
    b"From x\n",
    b"\nFrom ",
    b"\n\nFrom a\n",
    b"\n\r\nFrom b\r\n",
    b">",
    b">>>>>>>>",
    b">From ",
    b">>>From ",
    b"\n>From ",
    b"\n>>From x\r\n",
    b"x",
    b"abcdefghij",
    b" ",
    b".",
    b"Status: RO\n",
    b"Subject: s\n",
    b"\n\tfolded\n",
    b"From",
    b"\nF",
]
contents = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=6)), max_size=40).map(b"".join)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=contents,
    fmt=st.sampled_from(["mboxo", "mboxrd"]),
    scan_window=st.integers(1, 40),
    chunk=st.integers(1, 40),
)
def test_property_sizes_and_streams_match_model(content, fmt, scan_window, chunk):
    data = b"From " + content
    with small_windows(scan_window, chunk):
        check_against_model(data, fmt)


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=200), fmt=st.sampled_from(["mboxo", "mboxrd"]))
def test_property_arbitrary_bytes(content, fmt):
    data = b"From " + content
    listing = check_against_model(data, fmt, tops=(0, 2))
    assert sum(listing.size(i) for i in range(listing.count)) == listing.total_size


@settings(max_examples=100, deadline=None)
@given(content=contents, fmt=st.sampled_from(["mboxo", "mboxrd"]), scan_window=st.integers(1, 30))
def test_property_window_size_does_not_change_the_listing(content, fmt, scan_window):
    data = b"From " + content
    big = mbox.scan(data, fmt)
    with small_windows(scan_window, 8):
        small = mbox.scan(data, fmt)
    for i in range(big.count):
        assert (small.size(i), small.start(i), small.end(i), small.uid(i)) == (
            big.size(i),
            big.start(i),
            big.end(i),
            big.uid(i),
        )


CORPUS = [
    b"From ab\n\nFrom c\n\nFrom d\n",
    b"From a\nS: 1\n\n>From x\n>>From y\n\nFrom b\n>From z\n\n",
    b"From a\r\nS: 1\r\n\r\nx\r\n\r\nFrom b\r\n\r\n\r\nFrom c\r\n>>From d\r\n\r\n",
    b"From a\nH: 1\r\n\r\nb\r\rc\n\r\nFrom b\n\n\nFrom c",
    b"From a\n>>>>>>>>>>>>From x\n>>>>>>>>>>>>>\n\nFrom b\n" + b"y" * 30 + b"\r\n\n",
]


@pytest.mark.parametrize("data", CORPUS)
def test_every_window_size(data):
    """Each window size puts a boundary at another octet: no position may be special."""
    for fmt in ("mboxo", "mboxrd"):
        for window in range(1, len(data) + 2):
            with small_windows(window, window):
                check_against_model(data, fmt, tops=(0, 1, 2))


def test_long_lines_of_quotes_across_chunks():
    for fmt in ("mboxo", "mboxrd"):
        for line in (b">" * 100 + b"From x\n", b">" * 100 + b"\n", b">" * 99 + b"Fro", b"a\r" * 60 + b"\n"):
            data = b"From x\nS: 1\n\n" + line + line + b"\n"
            for window, chunk in ((4, 1), (5, 3), (7, 16), (64, 64)):
                with small_windows(window, chunk):
                    check_against_model(data, fmt)


# Hostile mboxrd bodies: quoted From lines packed as densely as they go (issue 12, finding 3).
DENSE_QUOTES = {
    "one line of >From": lambda n: b">From " * (n // 6) + b"\n",
    "lines of >From": lambda n: b">From x\n" * (n // 8),
    "lines of >>>From": lambda n: b">>>From x\n" * (n // 10),
    "a run of >": lambda n: b">" * n + b"From x\n",
}


def _cpu_per_octet(data: bytes, fmt: str) -> float:
    """CPU seconds per spool octet of login (scan) + LIST + RETR + TOP 0 of every message.

    Repeated until the work costs 30 ms, so a linear cost is measured at the same resolution
    at every size; the best of 3 rounds (another process's load only ever adds)."""
    import time

    def work() -> None:
        listing = mbox.scan(data, fmt)
        for i in range(listing.count):
            assert sum(map(len, mbox.iter_message(data, listing, i, None, fmt))) == listing.size(i)
            for _ in mbox.iter_message(data, listing, i, 0, fmt, wire=True):
                pass

    best = float("inf")
    for _ in range(3):
        rounds, start = 0, time.process_time()
        while True:
            work()
            rounds += 1
            spent = time.process_time() - start
            if spent >= 0.03:
                break
        best = min(best, spent / rounds / len(data))
    return best


@pytest.mark.parametrize("shape", sorted(DENSE_QUOTES))
def test_mboxrd_cost_grows_linearly_with_dense_quoted_from_lines(shape):
    """A message of nothing but quoted From lines costs, per octet, at 4n what it costs at n.

    Looking back to the line start for every ">From" made one 256 KiB line of them cost 1.6 s
    of CPU at each login, locks held: quadratic, so 4x the size cost 16x the time."""
    make = DENSE_QUOTES[shape]
    n = 64 * 1024

    def spool(size: int) -> bytes:
        return mbox_of(b"Subject: dense\n\n" + make(size), b"Subject: after\n\n>From x\n")

    check_against_model(spool(1000), "mboxrd")
    ratio = _cpu_per_octet(spool(4 * n), "mboxrd") / _cpu_per_octet(spool(n), "mboxrd")
    assert ratio < 2.0, f"4x the octets cost {4 * ratio:.1f}x the CPU (linear: 4x)"


def same_listing(a: mbox.Listing, b: mbox.Listing) -> None:
    assert (a.count, a.total_size, a.scanned_length) == (b.count, b.total_size, b.scanned_length)
    for i in range(a.count + 1):
        assert a.from_offset(i) == b.from_offset(i)
    for i in range(a.count):
        assert (a.size(i), a.start(i), a.end(i), a.uid(i)) == (b.size(i), b.start(i), b.end(i), b.uid(i))


PARALLEL_CORPUS = [
    *CORPUS,
    b"From a\n\nFrom b\nX: 1\n\nbody\n\nFrom c\r\nY: 2\r\n\r\nz\r\n\r\nFrom d\n\n",
    b"From a\n\n\n\nFrom b\n\n\nFrom c\nS: 1\n\n.\n>From e\n\n",
]


@pytest.mark.parametrize("data", PARALLEL_CORPUS)
def test_parallel_scan_equals_sequential_at_every_boundary(data):
    """The two halves, joined, are the listing of the whole, wherever the split falls."""
    for fmt in ("mboxo", "mboxrd"):
        whole = mbox.scan(data, fmt, parallel_min=0)
        k = data.find(b"\n\nFrom ")
        while k >= 0:
            parts = mbox._scan_parallel(data, 0, k + 2, len(data), fmt == "mboxrd")
            same_listing(mbox.Listing(*parts, None, len(data)), whole)
            k = data.find(b"\n\nFrom ", k + 1)


def test_parallel_scan_without_a_helper_process(monkeypatch):
    """fork refused (RLIMIT_NPROC): the parent scans both halves itself."""

    def refuse() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(mbox.os, "fork", refuse)
    data = PARALLEL_CORPUS[-2]
    same_listing(mbox.scan(data, "mboxo", parallel_min=1), mbox.scan(data, "mboxo", parallel_min=0))


@settings(max_examples=150, deadline=None)
@given(content=contents, fmt=st.sampled_from(["mboxo", "mboxrd"]))
def test_property_parallel_scan_is_the_same_listing(content, fmt):
    data = b"From " + content
    same_listing(mbox.scan(data, fmt, parallel_min=1), mbox.scan(data, fmt, parallel_min=0))


@settings(max_examples=150, deadline=None)
@given(content=contents, fmt=st.sampled_from(["mboxo", "mboxrd"]), more=contents)
def test_property_resumed_scan_is_the_full_scan(content, fmt, more):
    """The index's scan: from any message's From_ line on, after bytes were appended, the
    listing is a full scan's (the messages before it are taken from the old listing)."""
    data = b"From " + content
    old = mbox.scan(data, fmt)
    grown = data + b"From " + more
    for keep in range(old.count):
        same_listing(mbox.resume(grown, old, keep, fmt), mbox.scan(grown, fmt))
        same_listing(mbox.resume(grown, old, keep, fmt, parallel_min=1), mbox.scan(grown, fmt))


@settings(max_examples=150, deadline=None)
@given(content=contents, fmt=st.sampled_from(["mboxo", "mboxrd"]), data=st.data())
def test_property_listing_without_deleted_messages_then_resumed_is_the_full_scan(content, fmt, data):
    """After pop3d's update the index takes the old listing without the deleted messages and
    rescans the last kept one: the same listing as a full scan of what the update leaves."""
    spool = b"From " + content
    old = mbox.scan(spool, fmt)
    deleted = sorted(data.draw(st.sets(st.integers(0, old.count - 1))))
    kept = [i for i in range(old.count) if i not in deleted]
    after = b"".join(spool[old.from_offset(i) : old.from_offset(i + 1)] for i in kept)
    moved = old.without(deleted)
    assert moved.count == len(kept) and moved.scanned_length == len(after)
    same_listing(mbox.resume(after, moved, max(len(kept) - 1, 0), fmt), mbox.scan(after, fmt))


def test_a_listing_rebuilt_from_its_parts_is_the_same_and_bad_parts_are_refused():
    data = PARALLEL_CORPUS[-2]
    listing = mbox.scan(data)
    same_listing(mbox.Listing.from_parts(list(listing.parts()), len(data)), listing)
    starts, ends, sizes, seplen, digests = listing.parts()
    for bad in (
        [starts, ends, sizes, seplen],
        [starts, ends, sizes, seplen[:-1], digests],
        [starts, ends, sizes, seplen, digests + b"x"],
        [array("Q", starts), ends, sizes, seplen, digests],
    ):
        with pytest.raises(ValueError):
            mbox.Listing.from_parts(bad, len(data))
    with pytest.raises(ValueError):
        mbox.Listing.from_parts(list(listing.parts()), ends[-1] - 1)


def test_parallel_scan_of_a_mapped_spool(tmp_path):
    messages = [b"Subject: %d\n\n" % i + b"line .\n" * (i % 50) + b">From x\n" for i in range(3000)]
    path = tmp_path / "spool"
    path.write_bytes(b"".join(b"From a@b Mon Jan  1 00:00:00 2024\n" + m + b"\n" for m in messages))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        parallel = mbox.scan(mm, "mboxo", parallel_min=1)
        same_listing(parallel, mbox.scan(mm, "mboxo", parallel_min=0))
        assert parallel.count == 3000


@settings(max_examples=300, deadline=None)
@given(content=contents, fmt=st.sampled_from(["mboxo", "mboxrd"]), chunk=st.integers(1, 60))
def test_property_message_bytes_is_the_stream_joined(content, fmt, chunk):
    """RETR's one-call path for small messages sends exactly what the stream sends."""
    data = b"From " + content
    with small_windows(8, chunk):
        listing = mbox.scan(data, fmt)
        for i in range(listing.count):
            whole = mbox.message_bytes(data, listing, i, fmt)
            if whole is not None:
                assert whole == b"".join(mbox.iter_message(data, listing, i, None, fmt))
                assert len(whole) == listing.size(i)
    if fmt == "mboxo" and chunk >= 40:
        assert all(
            mbox.message_bytes(data, listing, i, fmt) is not None
            for i in range(listing.count)
            if listing.end(i) - listing.start(i) <= 2
        )


@pytest.mark.parametrize("count", [3, 20_000, 70_000])
def test_duplicate_numbering_in_ranges_of_prefixes(count):
    """_dedup's fast check runs in several ranges for big maildrops: twins are still found."""
    import random

    rnd = random.Random(count)
    k = mbox._DIGEST_STRIDE
    digests = bytearray(rnd.randbytes(k * count))
    twins = {(count - 1, 0), (count // 2, 1), (count // 3, 1)} if count > 3 else {(2, 0)}
    for dst, src in twins:  # a twin of an earlier message (same 12-octet UID digest)
        digests[k * dst : k * dst + 12] = digests[k * src : k * src + 12]
    seen: dict[bytes, int] = {}
    expected = {}
    for i in range(count):
        key = bytes(digests[k * i : k * i + 12])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            expected[i] = seen[key]
    assert mbox._dedup(digests, count) == expected
    assert expected  # the test made twins


# ------------------------------------------- same_message: proving a listed message unmoved


@settings(max_examples=300, deadline=None)
@given(
    content=contents,
    fmt=st.sampled_from(["mboxo", "mboxrd"]),
    scan_window=st.integers(1, 40),
    cap=st.integers(1, 30),
    parallel=st.booleans(),
)
def test_property_every_listed_message_proves_itself(content, fmt, scan_window, cap, parallel):
    """Whatever the windows, the UID cap or the split, each message's recomputed digest is the
    scan's: same_message never refuses an unchanged spool (it would end brief sessions)."""
    data = b"From " + content
    saved = limits.UID_HEADER_CAP
    limits.UID_HEADER_CAP = cap
    try:
        with small_windows(scan_window, 8):
            listing = mbox.scan(data, fmt, parallel_min=1 if parallel else 0)
            assert all(mbox.same_message(data, listing, i) for i in range(listing.count))
            # From a window read at the From_ line (maildrop's one pread): the same, or None.
            for i in range(listing.count):
                base = max(listing.from_offset(i) - 1, 0)
                for width in (6, 20, 200):
                    assert mbox.same_message(data[base : base + width], listing, i, base) in (True, None)
    finally:
        limits.UID_HEADER_CAP = saved


def test_same_message_sees_a_permutation_of_equal_sizes():
    messages = [b"Subject: %d\nMessage-ID: <%d@x>\n\nbody %d\n" % (i, i, i) for i in range(4)]
    data = mbox_of(*messages)
    listing = mbox.scan(data)
    swapped = mbox_of(messages[0], messages[2], messages[1], messages[3])
    assert len(swapped) == len(data)
    assert [mbox.same_message(swapped, listing, i) for i in range(4)] == [True, False, False, True]
    for i in range(4):  # a window that holds it all says the same
        base = max(listing.from_offset(i) - 1, 0)
        assert mbox.same_message(swapped[base : base + 4096], listing, i, base) == (i in (0, 3))
    # A message that grew moves the next From_ line: the one before it no longer ends where it did.
    longer = mbox_of(messages[0], messages[1] + b"more\n", messages[2], messages[3])
    assert [mbox.same_message(longer, listing, i) for i in range(4)] == [True, False, False, False]
    # Only headers a mail reader rewrites changed (Status): the same message, by its UID.
    listing = mbox.scan(mbox_of(b"Subject: a\nStatus: O\n\nx\n", b"Subject: b\n\ny\n"))
    assert mbox.same_message(mbox_of(b"Subject: a\nStatus: R\n\nx\n", b"Subject: b\n\ny\n"), listing, 0)


# ------------------------------ header checks and content proofs: what the maildrop index proves


def _headers_hold(data: bytes, listing: mbox.Listing) -> int:
    from pop3d import bulk

    _, ends, _, seplen, records = listing.parts()
    offsets = ends.tobytes()
    return bulk.check_headers(data, offsets, ends.itemsize, bytes(seplen), bytes(records), 0, listing.count)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=contents,
    fmt=st.sampled_from(["mboxo", "mboxrd"]),
    scan_window=st.integers(1, 40),
    cap=st.integers(1, 30),
    parallel=st.booleans(),
    edit=st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
    run=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
)
def test_property_content_proofs_say_what_a_full_scan_finds(
    content, fmt, scan_window, cap, parallel, edit, run
):
    """Every message of an unchanged spool proves its header check (whatever the windows, the
    cap or the split: the same records as a plain scan) and its content. After a same-length
    edit inside a message's content, same_content says whether a full scan still finds that
    content where and as long as listed, and only_listed_boundaries whether a full scan finds
    no other message boundary in a run of messages around it."""
    data = b"From " + content
    plain = mbox.scan(data, fmt)
    saved = limits.UID_HEADER_CAP
    limits.UID_HEADER_CAP = cap
    try:
        with small_windows(scan_window, 8):
            listing = mbox.scan(data, fmt, parallel_min=1 if parallel else 0)
            assert _headers_hold(data, listing) == listing.count
            assert all(mbox.same_content(data, listing, i, fmt) for i in range(listing.count))
            assert mbox.only_listed_boundaries(data, listing, 0, listing.count)
            if cap == saved:
                assert listing.parts()[4] == plain.parts()[4]
            i = edit[0] % listing.count
            s, e = listing.start(i), listing.end(i)
            if e == s:
                return
            at = s + edit[0] % (e - s)
            text = edit[1][: e - at]
            changed = data[:at] + text + data[at + len(text) :]
            full = mbox.scan(changed, fmt)
            kept = any(
                (full.start(j), full.end(j), full.size(j)) == (s, e, listing.size(i))
                for j in range(full.count)
            )
            assert mbox.same_content(changed, listing, i, fmt) == kept
            first = min(run[0] % (i + 1), i)
            after = i + 1 + run[1] % (listing.count - i)
            froms = {full.from_offset(j) for j in range(full.count)} | {len(changed)}
            inside = {x for x in froms if listing.from_offset(first) < x < listing.from_offset(after)}
            listed = {listing.from_offset(k) for k in range(first + 1, after)}
            ends = {full.end(j) for j in range(full.count)}
            alone = inside == listed and listing.end(after - 1) in ends
            assert mbox.only_listed_boundaries(changed, listing, first, after) == alone
    finally:
        limits.UID_HEADER_CAP = saved


def test_content_proofs_see_a_same_length_body_edit():
    """The index's residual: a body edited in place, same length: one more line (LIST size),
    or a From_ line after an empty line (a message a full scan would list). Its header still
    proves; its content does not."""
    messages = [b"Subject: %d\n\nline one\nline two\n" % i for i in range(3)]
    data = mbox_of(*messages)
    listing = mbox.scan(data)
    more_lines = data.replace(b"line one\nline two", b"line one\n\nine two", 1)
    hidden = data.replace(b"line one\nline two", b"\nFrom x \nline two", 1)
    for changed in (more_lines, hidden):
        assert len(changed) == len(data)
        assert _headers_hold(changed, listing) == 3
        assert [mbox.same_content(changed, listing, i) for i in range(3)] == [False, True, True]
    assert mbox.scan(hidden).count == 4
    # Deleting messages 1 and 2 would delete the hidden one too; the size alone does not matter.
    assert not mbox.only_listed_boundaries(hidden, listing, 0, 2)
    assert mbox.only_listed_boundaries(hidden, listing, 1, 3)
    assert mbox.only_listed_boundaries(more_lines, listing, 0, 3)


def test_an_unimportable_hashlib_is_tried_once(monkeypatch):
    """After the privilege drop the account may not read the interpreter's hashlib: same_message
    (once per RETR with brief MDA locks) must not search sys.path for it every time."""
    import builtins

    messages = [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(3)]
    data = mbox_of(*messages)
    listing = mbox.scan(data)
    real_import = builtins.__import__
    tries = []

    def no_hashlib(name, *args, **kwargs):
        if name == "hashlib":
            tries.append(name)
            raise ImportError("not readable by this account")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(limits, "MBOX_OPENSSL_SHA_MIN", 1)  # this small spool asks for hashlib
    monkeypatch.setattr(mbox, "_openssl_sha256", None, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_hashlib)
    assert all(mbox.same_message(data, listing, i) for i in range(3) for _ in range(5))
    assert tries == ["hashlib"]
