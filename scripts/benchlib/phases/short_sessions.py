"""USER/PASS/STAT/QUIT on a small spool (its scan negligible): what a login costs each server."""

from __future__ import annotations

from benchlib.context import Context
from benchlib.results import pct
from benchlib.servers.pop3d import hash_prefix
from benchlib.sessions import short_session


def run(ctx: Context) -> None:
    small = ctx.small_spool()
    ctx.place(small)
    got = ctx.interleaved(ctx.args.sessions, lambda s: short_session(s, small.count), "short session")
    for name, values in got.items():
        if values:
            scheme = "yescrypt (PAM)" if name == "popa3d" else "bcrypt (htpasswd)"
            if name == "pop3d":
                scheme = f"{hash_prefix(ctx.pop3d.hashed)} (htpasswd)"
            for q in (0.5, 0.95):
                ctx.res.add(f"USER/PASS/STAT/QUIT p{int(q * 100)}", name, pct(values, q), "s", scheme=scheme)
