"""Concurrency mode (`--concurrency C,...`): C clients at once against one server, for capacity.

Each client has an account (and a spool) of its own, as a host's users do: concurrent sessions
of one account would wait for each other's maildrop lock. Workloads (`--workloads`):

- `pam`: USER/PASS/STAT/QUIT on a small spool, system accounts (PAM, yescrypt): pop3d
  (inetd-style, auth = system), pop3d --listen (the same code as a systemd `Accept=no` unit),
  popa3d, Dovecot (passdb pam).
- `htpasswd`: the same with pop3d's htpasswd users (bcrypt, what pop3d-passwd writes): pop3d,
  pop3d --listen, Dovecot (passwd-file, the same hash; the ratio is to Dovecot).
- `poll`: login, UIDL, QUIT on a `--poll-mib` spool per client, system accounts: the servers of
  `pam`, pop3d without its index (every poll scans). Dovecot answers from its index (built by
  the warm-up, which every server gets).
- `poll-index`: the same with pop3d's index (`index_dir`, built by the warm-up): the poll of an
  unchanged spool, what most polls are.

Per workload, C and server (interleaved, `--rounds` rounds of `--duration` seconds): sessions
per second (median of the rounds); session latency p50/p95/p99 (connect to QUIT's reply, every
session of every round); CPU per session (the server's whole process tree, launcher included,
from /proc: other load on the machine is not counted); memory per concurrent session (the tree's
anonymous memory, proportional set size, while C sessions run, less the idle tree's, divided by
C; file pages, code and the spools' page cache, are left out).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchlib.context import Context
from benchlib.results import pct, spread
from benchlib.servers.accounts import client_users, ensure_client_accounts
from benchlib.servers.base import Server, tree_cpu, tree_pss
from benchlib.servers.dovecot import Dovecot
from benchlib.servers.pop3d import Pop3d, pam_pop3d
from benchlib.sessions import poll_session, short_session
from benchlib.spools import Spool, place_spool

WORKLOADS = ("pam", "htpasswd", "poll", "poll-index")
LISTEN = "pop3d --listen"
SAMPLE_EVERY = 0.05  # seconds between two memory samples


class Workload:
    """The servers one workload runs against, the spool each client's account holds, the dialogue."""

    def __init__(self, title: str, spool: Spool, dialogue: Callable[[Server, str], float]) -> None:
        self.title = title
        self.spool = spool
        self.dialogue = dialogue
        self.servers: list[Server] = []
        self.started: list[Server] = []  # stopped after the workload
        self.baseline = "popa3d"


def run(ctx: Context) -> None:
    most = max(ctx.args.concurrency)
    for name in ctx.args.workloads:
        work = _set_up(ctx, name, most)
        if work is None:
            continue
        try:
            _measure(ctx, work, client_users(most))
        finally:
            for s in work.started:
                s.stop()
            if name.startswith("poll"):  # the big copies go: each account gets a small spool back
                _place_all(ctx, work.servers, ctx.small_spool(), most)


def _set_up(ctx: Context, name: str, most: int) -> Workload | None:
    """Start the workload's servers and give every client's account its spool; None to skip."""
    res, is_root = ctx.res, os.geteuid() == 0
    small = ctx.small_spool()
    if name == "htpasswd":
        work = Workload("htpasswd short session", small, lambda s, u: short_session(s, small.count, u))
        users = client_users(most)
        ctx.pop3d.set_password(ctx.pop3d.hashed, users)
        work.servers.append(ctx.pop3d)
        if ctx.pop3d.tool:
            listen = _listen_twin(ctx.pop3d, ctx.workdir / "listen", ctx.owner)
            listen.set_password(ctx.pop3d.hashed, users)
            work.started.append(listen)
            work.servers.append(listen)
        if "dovecot" in ctx.by_name and ctx.owner is not None:
            dove = Dovecot(
                ctx.args.dovecot, ctx.workdir, ctx.owner, ctx.pop3d.hashed, users, subdir="dovecot-c"
            )
            work.started.append(dove)
            work.servers.append(dove)
            work.baseline = "dovecot"
        _place_all(ctx, work.servers, small, most)
        return work
    if not is_root or ctx.owner is None:
        res.add(f"{name}: sessions/s", "pop3d", None, "/s", skipped="needs root (system accounts, PAM)")
        return None
    accounts = ensure_client_accounts(most)
    lowest = min(accounts, key=lambda e: e.pw_uid)
    extra: dict[str, str] = {}
    if name == "pam":
        work = Workload("PAM short session", small, lambda s, u: short_session(s, small.count, u))
    else:
        big = ctx.spool(ctx.args.poll_mib)
        title = f"{ctx.args.poll_mib:g} MiB poll (PAM)"
        if name == "poll-index":
            title = f"{ctx.args.poll_mib:g} MiB poll, pop3d's index (PAM)"
            extra = {"index_dir": str(ctx.workdir / "concurrency-index")}
        work = Workload(title, big, lambda s, u: poll_session(s, big, u))
    where = name.replace("-", "_")
    inetd = pam_pop3d(ctx.pop3d, ctx.workdir, lowest, extra=extra, name=where)
    work.started.append(inetd)
    work.servers.append(inetd)
    if ctx.pop3d.tool:
        listen = pam_pop3d(ctx.pop3d, ctx.workdir, lowest, tool="", extra=extra, name=where)
        listen.name = LISTEN
        work.started.append(listen)
        work.servers.append(listen)
    if "popa3d" in ctx.by_name:
        work.servers.append(ctx.by_name["popa3d"])
    if "dovecot" in ctx.by_name:
        users = [e.pw_name for e in accounts]
        dove = Dovecot(
            ctx.args.dovecot, ctx.workdir, ctx.owner, ctx.pop3d.hashed, users, pam=True, subdir="dovecot-pam"
        )
        work.started.append(dove)
        work.servers.append(dove)
    _place_all(ctx, work.servers, work.spool, most)
    return work


def _listen_twin(pop3d: Pop3d, workdir: Path, owner: object) -> Pop3d:
    """pop3d's own --listen with the same users, spools and log as `pop3d`."""
    extra = {
        "mailbox": pop3d.mailbox,
        "htpasswd": str(pop3d.dir / "htpasswd"),
        "log": str(pop3d.dir / "pop3d.log"),
    }
    twin = Pop3d("", pop3d.command[:-2], pop3d.env, workdir, owner, extra)  # type: ignore[arg-type]
    twin.name = LISTEN
    twin.hashed = pop3d.hashed
    return twin


def _place_all(ctx: Context, servers: list[Server], spool: Spool, most: int) -> None:
    """Each client's account gets a copy of `spool` at each server (servers sharing a path, one)."""
    import pwd

    done: set[Path] = set()
    for s in servers:
        for user in client_users(most):
            path = s.spool_for(user)
            if path in done:
                continue
            done.add(path)
            owner = ctx.owner
            if os.geteuid() == 0 and path.parent == Path("/var/mail"):
                owner = pwd.getpwnam(user)  # a system account's spool is its own
            place_spool(spool, path, owner)
        s.forget()


def _measure(ctx: Context, work: Workload, users: list[str]) -> None:
    print(f"# concurrency: {work.title}: {', '.join(s.name for s in work.servers)}", flush=True)
    for s in work.servers:  # the page cache, and Dovecot's index of every spool
        for user in users:
            try:
                work.dialogue(s, user)
            except Exception as e:
                ctx.res.fail(f"{work.title} warm-up [{s.name}]", e)
            s.settle()
    for clients in ctx.args.concurrency:
        label = f"{clients} client{'s' if clients > 1 else ''}, {work.title}"
        got = ctx.interleaved(
            ctx.args.rounds,
            lambda s, c=clients: _load(s, work, users[:c], ctx.args.duration),
            label,
            work.servers,
        )
        for name, rounds in got.items():
            if rounds:
                _record(ctx, label, name, rounds, work.baseline)


def _record(ctx: Context, label: str, name: str, rounds: list[dict], baseline: str) -> None:
    add = ctx.res.add
    rates = [r["rate"] for r in rounds]
    sessions = sum(r["sessions"] for r in rounds)
    add(f"{label}: sessions/s", name, statistics.median(rates), "/s", **spread(rates), baseline=baseline)
    latencies = [t for r in rounds for t in r["latencies"]]
    for q in (50, 95, 99):
        add(f"{label}: latency p{q}", name, pct(latencies, q / 100), "s", n=len(latencies), baseline=baseline)
    cpu = sum(r["cpu_s"] for r in rounds) / sessions
    add(f"{label}: CPU per session", name, cpu, "s", sessions=sessions, baseline=baseline)
    memory = [m for r in rounds for m in r["memory"]]
    if memory:
        add(
            f"{label}: memory per session",
            name,
            statistics.median(memory),
            "MB",
            n=len(memory),
            baseline=baseline,
        )


def _load(server: Server, work: Workload, users: list[str], duration: float) -> dict:
    """One client per user, each running sessions back to back for `duration` seconds."""
    assert server.proc is not None
    root = server.proc.pid
    server.settle()
    idle_pss = tree_pss(root)
    cpu0 = tree_cpu(root)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[Exception] = []
    in_flight = [0]
    deadline = time.perf_counter() + duration

    def client(user: str) -> None:
        while time.perf_counter() < deadline and not errors:
            with lock:
                in_flight[0] += 1
            try:
                dt = work.dialogue(server, user)
            except Exception as e:
                errors.append(e)
                return
            finally:
                with lock:
                    in_flight[0] -= 1
            latencies.append(dt)

    memory: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY):
            with lock:
                running = in_flight[0]
            if running == len(users):
                memory.append(max(0.0, tree_pss(root) - idle_pss) / running)

    threads = [threading.Thread(target=client, args=(u,)) for u in users]
    sampler = threading.Thread(target=sample)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    sampler.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if errors:
        raise errors[0]
    server.settle()
    return {
        "rate": len(latencies) / wall,
        "sessions": len(latencies),
        "latencies": latencies,
        "cpu_s": tree_cpu(root) - cpu0,
        "memory": memory,
    }
