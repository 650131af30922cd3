"""Connect → greeting: the start-up cost, every server and the interpreter floor interleaved."""

from __future__ import annotations

import time

from benchlib.client import Pop3Client, quit_session
from benchlib.context import Context
from benchlib.results import pct
from benchlib.servers.base import Server
from benchlib.servers.floor import Floor
from benchlib.verify import VerifyError


def greeting_time(server: Server) -> float:
    t0 = time.perf_counter()
    c = Pop3Client(server.port)
    line = c.line()
    dt = time.perf_counter() - t0
    if not line.startswith(b"+OK"):
        raise VerifyError(f"{server.name}: greeting {line[:60]!r}")
    if isinstance(server, Floor):
        c.send(b"QUIT\r\n")
        c.drain_eof()
        c.close()
    else:
        quit_session(c)
    return dt


def run(ctx: Context) -> None:
    targets = ([ctx.floor] if ctx.floor else []) + ctx.servers
    got = ctx.interleaved(ctx.args.connections, greeting_time, "greeting", targets)
    for name, values in got.items():
        if values:
            for q in (0.5, 0.95):
                ctx.res.add(f"greeting p{int(q * 100)}", name, pct(values, q), "s", n=len(values))
