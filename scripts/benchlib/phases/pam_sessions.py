"""Short sessions of the system test account through PAM: pop3d (auth = system) beside popa3d.

Both check the same yescrypt hash in /etc/shadow, so this is the hash-neutral login figure.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchlib.context import Context
from benchlib.results import pct
from benchlib.servers.accounts import USER
from benchlib.servers.pop3d import pam_pop3d
from benchlib.sessions import short_session
from benchlib.spools import place_spool
from benchlib.verify import VerifyError

METRIC = "USER/PASS/STAT/QUIT p{}, system account (PAM)"


def run(ctx: Context) -> None:
    res, owner = ctx.res, ctx.owner
    if os.geteuid() != 0 or owner is None or owner.pw_name != USER or "popa3d" not in ctx.by_name:
        res.add(METRIC.format(50), "pop3d", None, "s", skipped="needs root and the system test account")
        return
    small = ctx.small_spool()
    sysd = pam_pop3d(ctx.pop3d, ctx.workdir, owner)
    try:
        place_spool(small, Path("/var/mail") / USER, owner)
        try:
            short_session(sysd, small.count)
        except VerifyError as e:
            why = f"auth = system does not work here yet ({e})"
            print(f"# {why}: skipped", flush=True)
            res.add(METRIC.format(50), "pop3d", None, "s", skipped=why)
            return
        got = ctx.interleaved(
            ctx.args.sessions,
            lambda s: short_session(s, small.count),
            "system session",
            [sysd, ctx.by_name["popa3d"]],
        )
        for name, values in got.items():
            if values:
                for q in (0.5, 0.95):
                    res.add(METRIC.format(int(q * 100)), name, pct(values, q), "s")
    finally:
        sysd.stop()
