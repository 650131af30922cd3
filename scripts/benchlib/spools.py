"""Spools: a deterministic mbox per (size, seed), what RETR must send for each message, cached.

A generated spool is written once per work directory (with a .json sidecar of its sizes, CRCs and
offsets) and reused by later runs; `place_spool` gives a server a fresh copy of it before a session.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import random
import shutil
import time
import zlib
from pathlib import Path


class Spool:
    """A generated mbox and, per message, what RETR must send: size and CRC-32 of the CRLF form."""

    def __init__(self, path: Path, sizes: list[int], crcs: list[int], offsets: list[int]) -> None:
        self.path = path
        self.sizes = sizes
        self.crcs = crcs
        self.offsets = offsets  # From_ line offsets; offsets[count] = file size

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def file_size(self) -> int:
        return self.offsets[-1]


_WORDS = (  # noqa: SIM905
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "mail server message spool protocol delivery mailbox retrieve update journal attachment"
).split()


def _text_lines(rnd: random.Random, n: int) -> list[bytes]:
    """A pool of body lines: prose, quotes, '>From ' (as MDAs quote it), dots, 'From' mid-line."""
    pool = []
    for i in range(n):
        words = " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 13)))
        r = i % 40
        if r == 0:
            line = ">From " + words  # an MDA-quoted body From line
        elif r == 1:
            line = "." + words  # dot-stuffed on the wire
        elif r == 2:
            line = "."  # a lone dot: must not end the message
        elif r == 3:
            line = "> " + words
        elif r == 4:
            line = ""
        elif r == 5:
            line = "see From here " + words  # 'From ' not at a line start
        else:
            line = words[0].upper() + words[1:] + "."
        if line.startswith("From "):
            line = ">" + line  # as an MDA stores it (mboxo)
        pool.append(line.encode())
    return pool


def generate_spool(path: Path, mib: float, seed: int, tiny: int = 0) -> Spool:
    """Write a deterministic mbox of about `mib` MiB (or `tiny` messages of ~300 octets).

    Text messages of 2-50 KB (log-normal, median ~9 KB), about one in 700 with a 1-5 MB base64
    attachment, MIME headers, body lines that need dot-stuffing, '>From ' lines.
    """
    rnd = random.Random(seed)
    pool = _text_lines(rnd, 4096)
    target = int(mib * 2**20)
    sizes, crcs, offsets = [], [], []
    pos = 0
    i = 0
    with open(path, "wb") as f:
        while (tiny and i < tiny) or (not tiny and pos < target):
            i += 1
            stamp = 1_700_000_000 + i * 37
            day = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(stamp))
            from_line = b"From sender%d@example.org %s\n" % (i % 113, day.encode())
            head = [
                b"Return-Path: <sender%d@example.org>" % (i % 113),
                b"Received: from mx%d.example.org (mx%d.example.org [192.0.2.%d])\n\tby mail.example.net "
                b"(Postfix) with ESMTPS id %08X\n\tfor <user@example.net>; %s"
                % (i % 7, i % 7, i % 250, rnd.getrandbits(32), day.encode()),
                b"Message-ID: <%d.%x@example.org>" % (i, rnd.getrandbits(48)),
                b"From: Sender %d <sender%d@example.org>" % (i % 113, i % 113),
                b"To: User <user@example.net>",
                b"Subject: " + b" ".join(rnd.choices(pool, k=1)[0].split()[:8]),
                b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(stamp)).encode(),
                b"MIME-Version: 1.0",
            ]
            if tiny:
                body = b"%s\n.\n>From tiny %d\n" % (rnd.choice(pool), i)
                head.append(b"Content-Type: text/plain; charset=us-ascii")
            else:
                size = int(min(50_000, max(2_000, rnd.lognormvariate(9.1, 0.7))))
                lines, n = [], 0
                while n < size:
                    line = rnd.choice(pool)
                    lines.append(line)
                    n += len(line) + 1
                text = b"\n".join(lines) + b"\n"
                if rnd.random() < 1 / 700:
                    raw = rnd.randbytes(rnd.randint(1_000_000, 5_000_000))
                    head.append(b'Content-Type: multipart/mixed; boundary="b%d"' % i)
                    body = (
                        b"This is a multi-part message in MIME format.\n\n--b%d\n"
                        b"Content-Type: text/plain; charset=us-ascii\n\n%s\n--b%d\n"
                        b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
                        b'Content-Disposition: attachment; filename="data%d.bin"\n\n%s\n--b%d--\n'
                        % (i, text, i, i, base64.encodebytes(raw), i)
                    )
                else:
                    head.append(b"Content-Type: text/plain; charset=us-ascii")
                    body = text
            content = b"\n".join(head) + b"\n\n" + body
            wire = content.replace(b"\n", b"\r\n")
            offsets.append(pos)
            sizes.append(len(wire))
            crcs.append(zlib.crc32(wire))
            record = from_line + content + b"\n"
            f.write(record)
            pos += len(record)
    offsets.append(pos)
    spool = Spool(path, sizes, crcs, offsets)
    Path(str(path) + ".json").write_text(json.dumps({"sizes": sizes, "crcs": crcs, "offsets": offsets}))
    return spool


def load_or_generate(workdir: Path, mib: float, seed: int, tiny: int = 0) -> Spool:
    name = f"spool-tiny{tiny}-s{seed}" if tiny else f"spool-{mib:g}M-s{seed}"
    path = workdir / name
    meta = Path(str(path) + ".json")
    if path.exists() and meta.exists():
        data = json.loads(meta.read_text())
        if data["offsets"][-1] == path.stat().st_size:
            return Spool(path, data["sizes"], data["crcs"], data["offsets"])
    t0 = time.monotonic()
    spool = generate_spool(path, mib, seed, tiny)
    print(
        f"# generated {path.name}: {spool.count} messages, {spool.file_size / 2**20:.1f} MiB "
        f"in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    return spool


def deliver(spool: Spool, dest: Path, number: int) -> Spool:
    """An MDA delivers one message to the copy at `dest`, as procmail does: the dotlock (made with
    link(2)), then the fcntl lock, append, release. Returns the spool the server must now show.

    The mtime is then put 5 s back, as `place_spool` does: a poll comes a while after a delivery
    (popa3d sleeps a second when the spool changed in the current second). Servers that trust
    the mtime alone miss nothing: the size changed, and so did the ctime.
    """
    import fcntl

    content = (
        b"Return-Path: <mda@example.org>\nMessage-ID: <delivery-%d.%d@example.org>\n"
        b"From: MDA <mda@example.org>\nSubject: delivery %d\n\nA new message.\n"
        % (number, time.time_ns(), number)
    )
    record = b"From mda@example.org Thu Nov 26 10:00:00 2026\n" + content + b"\n"
    lock = Path(str(dest) + ".lock")
    unique = dest.with_name(f".{dest.name}.lk{os.getpid()}")
    unique.write_text(f"{os.getpid()}\n")
    try:
        while True:
            try:
                os.link(unique, lock)
                break
            except FileExistsError:
                time.sleep(0.01)
    finally:
        unique.unlink()
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            os.write(fd, record)
        finally:
            os.close(fd)
    finally:
        lock.unlink()
    past = time.time() - 5
    os.utime(dest, (past, past))
    wire = content.replace(b"\n", b"\r\n")
    return Spool(
        dest,
        [*spool.sizes, len(wire)],
        [*spool.crcs, zlib.crc32(wire)],
        [*spool.offsets[:-1], size, size + len(record)],
    )


def place_spool(spool: Spool, dest: Path, owner: pwd.struct_passwd | None) -> None:
    """A fresh copy of the spool (page cache warm: it was just written), owned by the account."""
    tmp = dest.with_name(dest.name + ".bench-tmp")
    shutil.copyfile(spool.path, tmp)
    os.chmod(tmp, 0o600)
    # Delivered a while ago: popa3d sleeps a second when the spool changed in the current second.
    past = time.time() - 5
    os.utime(tmp, (past, past))
    if owner is not None and os.geteuid() == 0:
        os.chown(tmp, owner.pw_uid, owner.pw_gid)
    # On disk before the session: an update's fsync must not pay for writing our copy.
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
