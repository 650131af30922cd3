"""Coverage-guided fuzzing of the mbox scanner and message streams (atheris).

    python tests/fuzz/fuzz_mbox.py [libFuzzer options] [CORPUS_DIR ...]      # see scripts/fuzz

Input layout: 2 control octets (mbox format, scan window, chunk size, TOP line count, UID cap,
whether to go through a real file mapping), then the spool. `check(data)` fails (raises) unless:

* `mbox.scan` returns a listing, or raises MboxFormatError exactly when the spool is not empty and
  does not start with ``From `` (nothing else, ever);
* every message streamed by `iter_message` is exactly what an independent, line-by-line reading of
  the format (docs/INTERNALS.md) gives, whole (RETR) and cut (TOP), and its length is the listed
  size; no chunk exceeds limits.RETR_CHUNK;
* the listing (bounds, sizes, UIDs) does not depend on the scan window, nor on bytes vs a
  read-only file mapping, nor on scanning in two halves (the forked helper big spools get);
  UIDs are unique, 1..70 printable octets;
* streaming through a file mapping and through maildrop's pread(2) reader (what RETR and TOP use)
  gives the same octets as streaming from bytes, and the wire form (dot-stuffed, what the session
  sends) is the sent form with a dot doubled at every line start;
* with the C accelerator built, its byte loops and the Python ones give the same listing.
"""

from __future__ import annotations

import mmap
import os
import re
import sys
import tempfile

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from pop3d import bulk, limits, maildrop, mbox
else:
    from pop3d import bulk, limits, maildrop, mbox

_WINDOWS = (4, 5, 6, 7, 8, 9, 13, 16, 31, 64, 100, 4096)
_CHUNKS = (2, 3, 4, 7, 8, 64, 1000, 5)  # >= 2: the final CRLF of a message is one chunk
_CAPS = (1, 7, 64, limits.UID_HEADER_CAP)
_RD_QUOTED = re.compile(rb">+From ")


# ------------------------------------------------------------------ the reference reading


def reference(data: bytes) -> list[tuple[int, int]] | None:
    """Content bounds [s, e) of each message, straight from the format's definition."""
    n = len(data)
    if not n:
        return []
    if not data.startswith(b"From "):
        return None
    froms = [0]
    i = data.find(b"From ", 1)
    while i >= 0:
        if data[i - 2 : i] == b"\n\n" or (i >= 3 and data[i - 3 : i] == b"\n\r\n"):
            froms.append(i)
        i = data.find(b"From ", i + 1)
    bounds = []
    for k, f in enumerate(froms):
        last = k == len(froms) - 1
        g = n if last else froms[k + 1]
        lf = data.find(b"\n", f, g)
        if lf < 0:  # a From_ line without LF at EOF: an empty message
            bounds.append((g, g))
            continue
        s = lf + 1
        if not last:
            e = g - 1 if data[g - 2 : g] == b"\n\n" else g - 2  # one blank separator line
        else:
            e = n
            if s < n and data[n - 1 : n] == b"\n":  # one trailing blank line is dropped
                if data[n - 2 : n - 1] == b"\n":
                    e = n - 1
                elif n - s >= 2 and data[n - 3 : n - 1] == b"\n\r":
                    e = n - 2
        bounds.append((s, max(s, e)))
    return bounds


def _lines(content: bytes) -> list[bytes]:
    """Lines with their LF; a final unterminated line as it is."""
    out = content.split(b"\n")
    tail = out.pop()
    lines = [line + b"\n" for line in out]
    if tail:
        lines.append(tail)
    return lines


def sent_form(content: bytes, rd: bool) -> bytes:
    """RETR's octets: CRLF line ends (a stored CRLF not doubled), mboxrd unquoted, last line ended."""
    out = []
    for line in _lines(content):
        if rd and _RD_QUOTED.match(line):
            line = line[1:]
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        out.append(line + b"\r\n")
    return b"".join(out)


def top_content(content: bytes, body_lines: int) -> bytes:
    """The header block (through the first empty line; all if none), then body_lines lines."""
    lines = _lines(content)
    for h, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            h += 1
            break
    else:
        h = len(lines)
    return b"".join(lines[: h + body_lines])


# ------------------------------------------------------------------ the target


def _scan(buf: object, fmt: str, window: int, cap: int, parallel: bool = False) -> mbox.Listing:
    saved = limits.MBOX_SCAN_WINDOW, limits.UID_HEADER_CAP
    limits.MBOX_SCAN_WINDOW, limits.UID_HEADER_CAP = window, cap
    try:
        if parallel:  # the two-halves scan (a forked helper) that big spools get
            return mbox.scan(buf, fmt, parallel_min=1)  # type: ignore[arg-type]
        return mbox.scan(buf, fmt, parallel_min=0)  # type: ignore[arg-type]
    finally:
        limits.MBOX_SCAN_WINDOW, limits.UID_HEADER_CAP = saved


def _summary(listing: mbox.Listing) -> list[tuple[int, int, int, bytes, int]]:
    return [
        (listing.start(i), listing.end(i), listing.size(i), listing.uid(i), listing.from_offset(i))
        for i in range(listing.count)
    ]


def _python_summary(spool: bytes, fmt: str, window: int, cap: int) -> list[tuple[int, int, int, bytes, int]]:
    """The listing computed with bulk's Python loops instead of the C accelerator's."""
    names = [name for name in bulk.__all__ if name != "ACCELERATED"]
    saved = {name: getattr(bulk, name) for name in names}
    for name in names:
        setattr(bulk, name, getattr(bulk, "py_" + name))
    try:
        return _summary(_scan(spool, fmt, window, cap))
    finally:
        for name, function in saved.items():
            setattr(bulk, name, function)


_LINE_START_DOT = re.compile(rb"(^|\n)\.")


def _stuffed(sent: bytes) -> bytes:
    """RFC 1939 byte-stuffing of a sent form: a dot starting a line is doubled."""
    return _LINE_START_DOT.sub(rb"\1..", sent)


def _stream(
    buf: object,
    listing: mbox.Listing,
    i: int,
    lines: int | None,
    fmt: str,
    chunk: int,
    window: int,
    wire: bool = False,
) -> bytes:
    saved = limits.RETR_CHUNK, limits.MBOX_SCAN_WINDOW
    limits.RETR_CHUNK, limits.MBOX_SCAN_WINDOW = chunk, window
    try:
        parts = list(mbox.iter_message(buf, listing, i, lines, fmt, wire=wire))  # type: ignore[arg-type]
    finally:
        limits.RETR_CHUNK, limits.MBOX_SCAN_WINDOW = saved
    if any(len(p) > max(chunk, 1) or not p for p in parts):
        raise AssertionError(f"chunk sizes {[len(p) for p in parts]} for RETR_CHUNK {chunk}")
    return b"".join(parts)


def check(data: bytes) -> None:
    """The fuzz target: raises on a finding."""
    if len(data) < 2:
        return
    c0, c1 = data[0], data[1]
    spool = data[2:]
    fmt = "mboxrd" if c0 & 1 else "mboxo"
    rd = fmt == "mboxrd"
    window = _WINDOWS[(c0 >> 1) % len(_WINDOWS)]
    chunk = _CHUNKS[(c0 >> 5) % len(_CHUNKS)]
    top = c1 % 6
    cap = _CAPS[(c1 >> 3) % len(_CAPS)]
    use_file = bool(c1 & 0x40)
    bounds = reference(spool)
    try:
        listing = _scan(spool, fmt, limits.MBOX_SCAN_WINDOW, cap)
    except mbox.MboxFormatError:
        if bounds is not None:
            raise
        return
    if bounds is None:
        raise AssertionError("a spool not starting with 'From ' was accepted")
    got = [(listing.start(i), listing.end(i)) for i in range(listing.count)]
    if got != bounds:
        raise AssertionError(f"message bounds {got} != reference {bounds}")
    summary = _summary(listing)
    if _summary(_scan(spool, fmt, window, cap)) != summary:
        raise AssertionError(f"the listing depends on the scan window ({window})")
    if c1 & 0x80 and _summary(_scan(spool, fmt, window, cap, parallel=True)) != summary:
        raise AssertionError("the two-halves scan gives another listing")
    if bulk.ACCELERATED and _python_summary(spool, fmt, window, cap) != summary:
        raise AssertionError("the C accelerator and the Python loops give other listings")
    uids = [u for *_, u, _ in summary]
    if len(set(uids)) != len(uids):
        raise AssertionError(f"duplicate UIDs {uids}")
    for uid in uids:
        if not 1 <= len(uid) <= 70 or any(not 0x21 <= c <= 0x7E for c in uid):
            raise AssertionError(f"bad UID {uid!r}")
    if listing.total_size != sum(listing.size(i) for i in range(listing.count)):
        raise AssertionError("total_size is not the sum of the sizes")
    buffers: list[object] = [spool]
    tmp = None
    if use_file and spool:
        tmp = tempfile.TemporaryFile(dir=os.environ.get("FUZZ_TMPDIR"))  # noqa: SIM115 - closed below
        tmp.write(spool)
        tmp.flush()
        mapped = mmap.mmap(tmp.fileno(), len(spool), mmap.MAP_SHARED, mmap.PROT_READ)
        if _summary(_scan(mapped, fmt, window, cap)) != summary:
            raise AssertionError("the listing differs between bytes and a file mapping")
        buffers.append(mapped)
        buffers.append(maildrop._PreadBuffer(tmp.fileno(), len(spool), "fuzz"))  # what RETR reads
    try:
        for buf in buffers:
            for i, (s, e) in enumerate(bounds):
                content = spool[s:e]
                whole = _stream(buf, listing, i, None, fmt, chunk, window)
                if whole != sent_form(content, rd):
                    raise AssertionError(f"RETR {i}: {whole!r} != {sent_form(content, rd)!r}")
                if len(whole) != listing.size(i):
                    raise AssertionError(f"RETR {i}: {len(whole)} octets, listed {listing.size(i)}")
                on_wire = _stream(buf, listing, i, None, fmt, chunk, window, wire=True)
                if on_wire != _stuffed(whole):
                    raise AssertionError(f"RETR {i} on the wire: {on_wire!r} != {_stuffed(whole)!r}")
                cut = _stream(buf, listing, i, top, fmt, chunk, window)
                expected = sent_form(top_content(content, top), rd)
                if cut != expected:
                    raise AssertionError(f"TOP {i} {top}: {cut!r} != {expected!r}")
    finally:
        if tmp is not None:
            mapped.close()  # type: ignore[possibly-undefined]
            tmp.close()


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
