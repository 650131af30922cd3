"""The command line and the run: options, set-up, the phases in turn, then the table and the chart."""

from __future__ import annotations

import argparse
import os
import pwd
import tempfile
import time
from pathlib import Path

from benchlib import chart, phases, servers, table
from benchlib.context import Context
from benchlib.phases.concurrency import WORKLOADS
from benchlib.results import Results
from benchlib.servers.accounts import USER, ensure_account
from benchlib.servers.base import Server, inetd_launcher
from benchlib.servers.floor import Floor
from benchlib.servers.pop3d import Pop3d, bcrypt_hash, pop3d_command


def parse_args(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--venv", help="create/use this venv with pop3d pip-installed (as a user would)")
    p.add_argument(
        "--pop3d",
        help="the pop3d launcher to run (default: this checkout, started as the installed command "
        "starts it; 'python -m pop3d' for that)",
    )
    for peer in servers.PEERS:
        peer.add_argument(p)
    p.add_argument("--no-peers", action="store_true", help="measure pop3d and the floor only")
    p.add_argument(
        "--phases",
        default="",
        help=f"run only these measurements, comma-separated (of {', '.join(phases.NAMES)}; default all)",
    )
    p.add_argument("--sizes", default="256", help="spool sizes in MiB, comma-separated (default 256)")
    p.add_argument("--tiny", type=int, default=100_000, help="messages in the tiny-message spool (0: skip)")
    p.add_argument(
        "--poplib-mib", type=float, default=4, help="spool MiB fetched with stock poplib (0: skip)"
    )
    p.add_argument("--connections", type=int, default=200, help="connections for greeting p50/p95")
    p.add_argument("--sessions", type=int, default=40, help="short USER/PASS/STAT/QUIT sessions per server")
    p.add_argument("--rounds", type=int, default=3, help="big-spool sessions per server (interleaved)")
    p.add_argument(
        "--schemes",
        default="bcrypt,sha512_crypt,sha256_crypt,md5_crypt,yescrypt,apr1,sha1",
        help="password schemes timed in short sessions (pop3d, htpasswd)",
    )
    p.add_argument(
        "--concurrency",
        help="concurrency mode: C clients at once, for each C of this comma-separated list "
        "(throughput, latency percentiles, CPU and memory per session) instead of the default run",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"concurrency mode: which sessions (default {','.join(WORKLOADS)})",
    )
    p.add_argument(
        "--duration", type=float, default=10, help="concurrency mode: seconds per round and server"
    )
    p.add_argument(
        "--poll-mib", type=float, default=256, help="concurrency mode: each client's spool for a poll"
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", help="spools and configs (default: a temporary directory, kept)")
    p.add_argument("--out", help="directory for results.jsonl and results.md (default: workdir)")
    p.add_argument("--chart", help="draw a PNG chart (latency and throughput vs spool size) here")
    p.add_argument("--mail-user", default=USER, help="account htpasswd sessions run as (root only)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for tests: 2 MiB spool, few connections, one round, no peers",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.tiny, args.poplib_mib = "2", 2000, 0.5
        args.connections, args.sessions, args.rounds, args.no_peers = 6, 3, 1, True
        args.schemes = "bcrypt"
    if args.concurrency is not None:
        try:
            args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
        except ValueError:
            p.error(f"--concurrency {args.concurrency}: numbers of clients, comma-separated")
        if not args.concurrency or min(args.concurrency) < 1:
            p.error("--concurrency: at least one client")
        args.workloads = [w for w in args.workloads.split(",") if w]
        unknown = set(args.workloads) - set(WORKLOADS)
        if unknown:
            p.error(f"--workloads: unknown {', '.join(sorted(unknown))} (known: {', '.join(WORKLOADS)})")
        if args.quick:
            args.duration, args.poll_mib = 1.0, 2
    args.phases = [name for name in args.phases.split(",") if name]
    unknown_phases = set(args.phases) - set(phases.NAMES)
    if unknown_phases:
        p.error(f"--phases: unknown {', '.join(sorted(unknown_phases))} (known: {', '.join(phases.NAMES)})")
    sizes = args.sizes
    try:  # checked before anything starts; a list of MiB from here on
        args.sizes = [float(x) for x in sizes.split(",") if x]
    except ValueError:
        p.error(f"--sizes {sizes}: spool sizes are numbers of MiB, comma-separated")
    if [mib for mib in args.sizes if not mib >= 0]:  # also NaN
        p.error(f"--sizes {sizes}: a spool size cannot be negative")
    return args


def take_turn() -> None:
    """Runs share the system account, its /var/mail spool and the machine: one at a time."""
    import fcntl

    lock_dir = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"
    lock = os.open(f"{lock_dir}/pop3d-bench.lock", os.O_WRONLY | os.O_CREAT, 0o644)  # held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("# another scripts/bench run holds the machine: waiting for it", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)


def main(doc: str) -> int:
    args = parse_args(doc)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pop3d-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    out = Path(args.out or workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)
    res = Results(out, time.strftime("%Y-%m-%dT%H:%M:%S"))
    tool = inetd_launcher()
    is_root = os.geteuid() == 0
    if is_root and not args.quick:
        take_turn()
    owner = None
    if is_root:
        owner = ensure_account(create=True) if args.mail_user == USER else pwd.getpwnam(args.mail_user)
    found = pop3d_command(args)
    print(f"# {found.note}; launcher: {tool or 'pop3d --listen'}; workdir {workdir}", flush=True)
    res.add(
        "setup",
        "pop3d",
        None,
        "",
        note=found.note,
        launcher=tool or "pop3d --listen",
        nproc=os.cpu_count(),
        load=os.getloadavg()[0],
    )
    # pop3d's own user has a bcrypt hash, what pop3d-passwd writes. Not the system account's
    # yescrypt: its 16 MiB of scratch memory would add itself to the session's peak RSS (the
    # same cost shows in popa3d's, whose PAM check runs in its session process). bcrypt costs at
    # least what popa3d's PAM check does (pam_unix runs yescrypt twice): login times do not
    # favour pop3d.
    hashed = bcrypt_hash(found)

    started: list[Server] = []
    try:
        floor = Floor(tool, found.python) if tool else None
        if floor:
            started.append(floor)
        pop3d = Pop3d(tool, found.command, found.env, workdir, owner if is_root else None)
        started.append(pop3d)
        pop3d.set_password(hashed)
        peers, peers_why, owner = servers.start_peers(args, tool, workdir, owner, hashed)
        started.extend(peers)
        for why in peers_why:
            print(f"# {why}", flush=True)
        ctx = Context(args, res, workdir, [pop3d, *peers], floor, pop3d, owner, found.python, found.env)
        names = [s.name for s in ctx.servers]
        print(
            f"# servers: {', '.join(names)}; floor: {'yes' if floor else 'no (no tcpserver/socat)'}",
            flush=True,
        )
        for phase in phases.plan(args):
            phase(ctx)
    finally:
        for s in started:
            s.stop()
    res.add("setup", "pop3d", None, "", load=os.getloadavg()[0])
    table.write_table(res, out)
    if args.chart:
        chart.draw_chart(res, Path(args.chart))
    print(f"# results: {out / 'results.jsonl'}, {out / 'results.md'}", flush=True)
    if res.failures:
        print(f"# {len(res.failures)} verification failure(s)", flush=True)
        return 1
    return 0
