"""RETR of every message with stock poplib (no socket tuning), a small spool (--poplib-mib).

What a naive client sees: a server that sends a reply's final "." in a small write of its own
makes such a client wait for its delayed ACK on every message.
"""

from __future__ import annotations

import poplib
import time
import zlib

from benchlib.client import IO_TIMEOUT
from benchlib.context import Context
from benchlib.servers.base import Server
from benchlib.spools import Spool
from benchlib.verify import VerifyError


def poplib_retr_all(server: Server, spool: Spool) -> float:
    """Stock poplib, no socket tuning: RETR every message; MB/s of payload (verified)."""
    client = poplib.POP3("127.0.0.1", server.port, timeout=IO_TIMEOUT)
    client.user(server.user)
    client.pass_(server.password)
    total = 0
    t0 = time.perf_counter()
    for n in range(1, spool.count + 1):
        _, lines, _ = client.retr(n)
        data = b"\r\n".join(lines) + b"\r\n"
        if len(data) != spool.sizes[n - 1] or zlib.crc32(data) != spool.crcs[n - 1]:
            raise VerifyError(f"poplib RETR {n}: the bytes differ from the spool's message")
        total += len(data)
    dt = time.perf_counter() - t0
    client.quit()
    return total / dt / 1e6


def run(ctx: Context) -> None:
    mib = ctx.args.poplib_mib
    if not mib:
        return
    sp = ctx.spool(mib, seed_offset=1)
    ctx.place(sp)
    got = ctx.interleaved(1, lambda s: poplib_retr_all(s, sp), "poplib")
    for name, values in got.items():
        if values:
            ctx.res.add(f"stock poplib RETR all ({sp.count} msgs, {mib:g} MiB)", name, values[0], "MB/s")
