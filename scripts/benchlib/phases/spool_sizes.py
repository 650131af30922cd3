"""Big spools (--sizes, MiB): a read session (login+STAT, LIST, UIDL, RETR all, QUIT, peak RSS, CPU)
and the three updates (DELE last, all, 1, each + QUIT), per size, every server interleaved."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from benchlib.context import Context
from benchlib.results import spread
from benchlib.sessions import read_session, update_session
from benchlib.spools import Spool
from benchlib.verify import VerifyError

# read_session's key -> (figure, unit)
READ_FIGURES = {
    "pass_s": ("PASS→+OK", "s"),
    "login_stat_s": ("login+STAT", "s"),
    "stat_s": ("STAT", "s"),
    "list_s": ("LIST all", "s"),
    "uidl_s": ("UIDL all", "s"),
    "retr_mbps": ("RETR all", "MB/s"),
    "quit_s": ("QUIT (nothing deleted)", "s"),
    "rss_mb": ("peak RSS", "MB"),
    "cpu_s": ("CPU (read session)", "s"),
}
# update_session's `which` -> figure, in the order they run
UPDATE_FIGURES = {"last": "DELE last + QUIT", "all": "DELE all + QUIT", "first": "DELE 1 + QUIT"}
# --sizes 0: the most common poll finds an empty spool, but there is nothing to retrieve or delete
EMPTY = "an empty spool: no message to retrieve or delete"


def run(ctx: Context) -> None:
    small = ctx.small_spool()
    for mib in ctx.args.sizes:
        spool = ctx.spool(mib)
        label = f"{mib:g} MiB"
        for s in ctx.servers:
            ctx.place(spool, [s])
            s.forget()
        first_logins(ctx, spool, label)
        reads(ctx, spool, label)
        updates(ctx, spool, label)
        ctx.place(small)  # free the big copies' page cache share


def first_logins(ctx: Context, spool: Spool, label: str) -> None:
    """A server that builds an index on its first login (Dovecot): that login reported apart."""
    for s in ctx.servers:
        if s.indexes:
            try:
                value = read_session(s, spool, retr=False)["login_stat_s"]
                ctx.res.add(f"{label}: first login+STAT (index build)", s.name, value, "s")
            except VerifyError as e:
                ctx.res.fail(f"{label} first login [{s.name}]", e)


def reads(ctx: Context, spool: Spool, label: str) -> None:
    got = ctx.interleaved(ctx.args.rounds, lambda s: read_session(s, spool), f"{label} read")
    for name, rows in got.items():
        if not rows:
            continue
        for key, (metric, unit) in READ_FIGURES.items():
            values = [r[key] for r in rows if key in r]
            if values:
                ctx.res.add(
                    f"{label}: {metric}",
                    name,
                    statistics.median(values),
                    unit,
                    **spread(values),
                    messages=spool.count,
                )
            elif key == "retr_mbps" and not spool.count:
                ctx.res.add(f"{label}: {metric}", name, None, unit, skipped=EMPTY)


def updates(ctx: Context, spool: Spool, label: str) -> None:
    for which, metric in UPDATE_FIGURES.items():
        if not spool.count:
            for s in ctx.servers:
                ctx.res.add(f"{label}: {metric}", s.name, None, "s", skipped=EMPTY)
            continue
        targets: list = list(ctx.servers)
        disk = None
        if which == "first":  # the disk's floor for a crash-safe DELE 1, in the same rounds
            disk = DiskFloor(ctx.pop3d.spool_path().parent, 2 * (spool.file_size - spool.offsets[1]))
            targets.append(disk)
        got = ctx.interleaved(
            max(1, ctx.args.rounds - 1),
            lambda s, w=which: (
                s.write() if isinstance(s, DiskFloor) else update_session(s, spool, ctx.owner, w)
            ),
            f"{label} {metric}",
            targets,
        )
        for name, values in got.items():
            if values and name != DiskFloor.name:
                ctx.res.add(f"{label}: {metric}", name, statistics.median(values), "s", **spread(values))
        if disk is not None and got[disk.name] and got["pop3d"]:
            floor, mine = got[disk.name], got["pop3d"]
            what = f"{label}: {metric}, disk floor"
            ctx.res.add(what, "pop3d", statistics.median(mine), "s", **spread(mine))
            ctx.res.add(what, "floor", statistics.median(floor), "s", **spread(floor), octets=disk.octets)


class DiskFloor:
    """What any crash-safe DELE 1 costs on this disk: writing twice the tail it moves (a journal
    of the tail, then the tail in place: docs/UPDATE.md), durably. Timed as dd reports it:
    `dd if=/dev/zero of=FILE bs=1M count=OCTETS iflag=count_bytes conv=fdatasync` in the spool's
    directory (one barrier: the update needs two)."""

    name = "disk floor"

    def __init__(self, directory: Path, octets: int) -> None:
        self.path = directory / ".bench-dd-floor"
        self.octets = octets

    def write(self) -> float:
        argv = ["dd", "if=/dev/zero", f"of={self.path}", "bs=1M", f"count={self.octets}"]
        try:
            run = subprocess.run(
                [*argv, "iflag=count_bytes", "conv=fdatasync"], capture_output=True, text=True, check=True
            )
        finally:
            self.path.unlink(missing_ok=True)
        # "... bytes (...) copied, 0.21 s, 1.2 GB/s": the time includes the fdatasync
        return float(run.stderr.rsplit(" copied, ", 1)[1].split(" s", 1)[0].replace(",", "."))

    def settle(self) -> None:
        pass
