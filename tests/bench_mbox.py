"""Throughput and peak RSS of the mbox scanner (prints figures; not collected by pytest).

    python tests/bench_mbox.py SPOOL [mboxo|mboxrd]      # scan an existing spool
    python tests/bench_mbox.py --generate SPOOL MIB      # write a realistic spool of MIB MiB

Each figure is measured in a fresh process on a read-only mapping, the file already in the page
cache (one warm-up read), as pop3d sees it right after login.
"""

from __future__ import annotations

import mmap
import os
import random
import resource
import sys
import time


def generate(path: str, mib: int) -> None:
    """~17 KiB messages (headers, quoted text, a few >From and body From lines), like a busy spool."""
    rnd = random.Random(1)
    words = (
        b"the quick brown fox jumps over lazy dog mail server protocol message body lorem "
        b"ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor From"
    ).split()

    def text(n: int) -> bytes:
        out, size = [b"and"], 4  # never "From " at a line start: MDAs quote those
        while size < n:
            w = rnd.choice(words)
            out.append(w)
            size += len(w) + 1
        return b" ".join(out)

    target, total, i = mib << 20, 0, 0
    with open(path, "wb") as f:
        while total < target:
            i += 1
            head = [
                b"From sender%d@example.org Mon Jan  1 00:00:%02d 2024" % (i % 97, i % 60),
                b"Received: from mx.example.org\n\tby mail.example.net with ESMTP id %d" % i,
                b"Message-ID: <%d.%d@example.org>" % (i, rnd.randrange(10**9)),
                b"From: Sender <s%d@example.org>" % i,
                b"To: user@example.net",
                b"Subject: " + text(40),
                b"Date: Mon, 1 Jan 2024 00:00:00 +0000",
            ]
            head += [b"X-Filler-%d: %s" % (k, text(60)) for k in range(rnd.randrange(5, 25))]
            if i % 3 == 0:
                head.append(b"Status: RO")
            body = []
            for _ in range(int(rnd.expovariate(1 / 330))):
                r = rnd.random()
                body.append(
                    b""
                    if r < 0.05
                    else b"> " + text(60)
                    if r < 0.15
                    else b">From " + text(40)
                    if r < 0.152
                    else text(rnd.randrange(20, 76))
                )
            msg = b"\n".join(head) + b"\n\n" + b"\n".join(body) + b"\n\n"
            f.write(msg)
            total += len(msg)
    print(f"{path}: {i} messages, {total / 2**20:.0f} MiB")


def bench(path: str, fmt: str) -> None:
    from pop3d import mbox

    with open(path, "rb") as f:
        while f.read(1 << 20):  # into the page cache
            pass
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        listing = mbox.scan(mm, fmt)
        dt = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        sent = sum(len(c) for i in range(listing.count) for c in mbox.iter_message(mm, listing, i, None, fmt))
        rt = time.perf_counter() - t0
        assert sent == listing.total_size
        end_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mm.close()
    n = len(listing.uid(0)) if listing.count else 0
    print(
        f"{path} ({fmt}): {listing.count} messages, {listing.scanned_length / 2**20:.0f} MiB; "
        f"scan {dt * 1000:.0f} ms = {listing.scanned_length / dt / 1e6:.0f} MB/s; "
        f"RETR all {listing.total_size / rt / 1e6:.0f} MB/s; "
        f"peak RSS {base / 1024:.1f} MiB before, {peak / 1024:.1f} after scan, "
        f"{end_peak / 1024:.1f} after RETR all (uid length {n})"
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    if sys.argv[1] == "--generate":
        generate(sys.argv[2], int(sys.argv[3]))
    else:
        bench(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mboxo")
