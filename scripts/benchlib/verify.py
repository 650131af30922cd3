"""Verification: what a server's answers must be, given the spool it was handed.

A fast wrong answer must not pass as a figure: every dialogue in `sessions` checks what it reads
with these functions, and a mismatch raises VerifyError, which the run records as
`verified: false` (and the exit status becomes 1).
"""

from __future__ import annotations

import zlib
from pathlib import Path

from benchlib.spools import Spool


class VerifyError(Exception):
    """A server answered something other than what the spool holds."""


def check_stat(stat: list[bytes], spool: Spool) -> None:
    """STAT's count and total octets are the spool's."""
    if int(stat[1]) != spool.count or int(stat[2]) != spool.total:
        raise VerifyError(f"STAT {stat[1:]!r}, expected {spool.count} {spool.total}")


def check_listing(kind: str, body: bytes, spool: Spool) -> list[bytes]:
    """A LIST or UIDL body numbers every message once, in order; returns the values."""
    lines = body.split(b"\r\n")[:-1]
    if len(lines) != spool.count:
        raise VerifyError(f"{kind} has {len(lines)} lines, the spool {spool.count} messages")
    values = []
    for n, line in enumerate(lines, 1):
        num, _, value = line.partition(b" ")
        if int(num) != n:
            raise VerifyError(f"{kind} line {n} numbers message {num!r}")
        values.append(value)
    return values


def check_sizes(sizes: list[int], spool: Spool) -> None:
    """LIST's sizes are the octets RETR must send."""
    if sizes != spool.sizes:
        bad = next(i for i, (a, b) in enumerate(zip(sizes, spool.sizes, strict=True)) if a != b)
        raise VerifyError(f"LIST {bad + 1} says {sizes[bad]}, the message has {spool.sizes[bad]} octets")


def check_uids(uids: list[bytes]) -> None:
    if len(set(uids)) != len(uids):
        raise VerifyError("UIDL: duplicate unique-ids")


def check_message(n: int, data: bytes, listed: int, spool: Spool) -> None:
    """RETR n sent as many octets as LIST said, and exactly the spool's message."""
    if len(data) != listed:
        raise VerifyError(f"RETR {n}: {len(data)} octets, LIST said {listed}")
    if zlib.crc32(data) != spool.crcs[n - 1]:
        raise VerifyError(f"RETR {n}: the bytes differ from the spool's message")


def kept_range(spool: Spool, which: str) -> tuple[int, int]:
    """The part of the spool file an update deleting message 1, the last or all must leave."""
    return {
        "first": (spool.offsets[1], spool.file_size),
        "last": (0, spool.offsets[spool.count - 1]),
        "all": (0, 0),
    }[which]


def same_bytes(path: Path, source: Path, start: int, end: int) -> bool:
    """True if the file at `path` is exactly source[start:end] (compared in 1 MiB pieces)."""
    if path.stat().st_size != end - start:
        return False
    with open(path, "rb") as a, open(source, "rb") as b:
        b.seek(start)
        while True:
            x = a.read(1 << 20)
            if x != b.read(len(x)):
                return False
            if not x:
                return True
