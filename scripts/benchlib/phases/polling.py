"""Polls, per --sizes: what a client that leaves mail on the server does every few minutes (log in,
UIDL, QUIT; timed from connect to QUIT's reply), beside popa3d and Dovecot.

- "poll, index off": a fresh copy of the spool, polled by pop3d without its index (`index_dir`
  empty), which scans it as every poll did before: the cost a first poll must not exceed.
- "poll, first (no index yet)": the same with the index: pop3d scans and writes its index;
  Dovecot builds its own (its "first" figure).
- "poll, unchanged spool": the same spool again: pop3d and Dovecot answer from their indexes.
- "poll after one delivery": an MDA appended one message (dotlock + fcntl, `spools.deliver`)
  just before the poll.

Two pop3d of this phase's own serve these rows, one with an index (`index_dir` in its work
directory), one without. Hash-neutral: their htpasswd user and a second Dovecot's passwd-file
carry the system account's own yescrypt hash, the very hash popa3d checks through PAM (Debian's
pam_unix computes it twice per login, pop3d and Dovecot once). Every poll is verified: UIDL
numbers every message once with unique UIDs, a server's UIDs do not change from one poll to the
next (a delivery adds one at the end), and pop3d's UIDs with its index are those of its scan.
"""

from __future__ import annotations

import statistics

from benchlib.context import Context
from benchlib.results import spread
from benchlib.servers.accounts import system_password_hash
from benchlib.servers.base import Server
from benchlib.servers.pop3d import Pop3d
from benchlib.sessions import poll_uids
from benchlib.spools import Spool, deliver
from benchlib.verify import VerifyError

INDEX_OFF = "poll, index off"
FIRST = "poll, first (no index yet)"
UNCHANGED = "poll, unchanged spool"
DELIVERED = "poll after one delivery"


def run(ctx: Context) -> None:
    sizes = [mib for mib in ctx.args.sizes if mib > 0]
    if not sizes:
        return
    started = _servers(ctx)
    try:
        plain, indexed = started[0], started[1]
        peers = [*ctx.servers_named("popa3d"), *started[2:]]
        for mib in sizes:
            _one_size(ctx, ctx.spool(mib), f"{mib:g} MiB", plain, indexed, peers)
            ctx.place(ctx.small_spool(), [*started, *peers])  # free the big copies' page cache share
    finally:
        for s in started:
            s.stop()


def _servers(ctx: Context) -> list[Server]:
    """pop3d without and with an index, and (as root, when Dovecot runs) a Dovecot, all with the
    hash popa3d checks (without popa3d: pop3d's usual one)."""
    main = ctx.pop3d
    hashed = system_password_hash() if ctx.servers_named("popa3d") else None
    started: list[Server] = []
    index_dir = str(ctx.workdir / "poll" / "index")
    for where, extra in (("poll-plain", {}), ("poll", {"index_dir": index_dir})):
        s = Pop3d(main.tool, main.command[:-2], main.env, ctx.workdir / where, ctx.owner, extra)
        s.set_password(hashed or main.hashed)
        started.append(s)
    if ctx.servers_named("dovecot") and hashed and ctx.owner is not None:
        from benchlib.servers.dovecot import Dovecot

        try:
            started.append(Dovecot(ctx.args.dovecot, ctx.workdir, ctx.owner, hashed, subdir="dovecot-poll"))
        except (RuntimeError, OSError) as e:
            print(f"# polling: a second Dovecot did not start ({e}): no Dovecot poll rows", flush=True)
    return started


def _poll(s: Server, spool: Spool) -> tuple[float, list[bytes]]:
    """One timed poll; then wait for the session to be gone (Dovecot's writes its index after
    QUIT's reply), so that it does not run into the next server's poll."""
    got = poll_uids(s, spool)
    s.settle()
    return got


class _Uids:
    """What each server listed at its last poll: the next poll must list the same (plus, after a
    delivery, one more at the end)."""

    def __init__(self) -> None:
        self.by_server: dict[str, list[bytes]] = {}

    def check(self, server: Server, uids: list[bytes], added: int = 0) -> None:
        before = self.by_server.get(server.name)
        if before is not None and (uids[: len(before)] != before or len(uids) != len(before) + added):
            raise VerifyError(f"UIDL: {server.name}'s unique-ids changed between two polls")
        self.by_server[server.name] = uids


def _one_size(
    ctx: Context, spool: Spool, label: str, plain: Pop3d, indexed: Pop3d, peers: list[Server]
) -> None:
    polled = [indexed, *peers]
    scanned = _Uids()  # pop3d's without the index (a full scan every time): the reference
    seen = _Uids()  # every polled server's, from one poll to the next

    def fresh(s: Server) -> float:
        """A fresh copy, nothing remembered: the same for the index off and a first poll."""
        ctx.place(spool, [s])
        s.forget()
        dt, uids = _poll(s, spool)
        if s is plain:
            scanned.check(s, uids)
        else:
            seen.by_server.pop(s.name, None)  # Dovecot numbers a fresh copy afresh
            seen.check(s, uids)
        if s is indexed:
            scanned.check(plain, uids)  # the index gives what the scan gave
        return dt

    def unchanged(s: Server) -> float:
        dt, uids = _poll(s, spool)
        seen.check(s, uids)
        return dt

    current = {s.name: spool for s in polled}

    def delivered(s: Server) -> float:
        current[s.name] = deliver(current[s.name], s.spool_path(), current[s.name].count + 1)
        dt, uids = _poll(s, current[s.name])
        seen.check(s, uids, added=1)
        return dt

    for figure, fn, servers in (
        (INDEX_OFF, fresh, [plain, *ctx.servers_named("popa3d")]),
        (FIRST, fresh, polled),
        (UNCHANGED, unchanged, polled),
        (DELIVERED, delivered, polled),
    ):
        got = ctx.interleaved(ctx.args.rounds, fn, f"{label} {figure}", servers)
        for name, values in got.items():
            if values:
                ctx.res.add(f"{label}: {figure}", name, statistics.median(values), "s", **spread(values))
