"""A spool of many tiny messages (--tiny, 100,000 by default): per-message costs of the scan and listings."""

from __future__ import annotations

import statistics

from benchlib.context import Context
from benchlib.sessions import read_session

FIGURES = {"login_stat_s": "login+STAT", "list_s": "LIST all", "uidl_s": "UIDL all"}


def run(ctx: Context) -> None:
    if not ctx.args.tiny:
        return
    tiny = ctx.spool(0, tiny=ctx.args.tiny)
    ctx.place(tiny)
    got = ctx.interleaved(max(1, ctx.args.rounds - 1), lambda s: read_session(s, tiny, retr=False), "tiny")
    for name, rows in got.items():
        for key, metric in FIGURES.items():
            if rows:
                ctx.res.add(
                    f"{tiny.count} tiny messages: {metric}",
                    name,
                    statistics.median(r[key] for r in rows),
                    "s",
                )
