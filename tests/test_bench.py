"""scripts/bench keeps working and keeps checking what it measures (never how fast anything is).

A tiny run (--quick: a 2 MiB spool, a few connections, pop3d and the floor only) must verify every
session and produce the same figures as before; and a server whose answer differs from the spool
by one octet must be caught.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT, ROOT, RUN_AS

BENCH = ROOT / "scripts" / "bench"
sys.path.append(str(ROOT / "scripts"))  # benchlib, the benchmark's modules (not in the pop3d package)

from benchlib.context import Context  # noqa: E402
from benchlib.phases import spool_sizes  # noqa: E402
from benchlib.results import Results  # noqa: E402
from benchlib.servers.base import CLEAN_ENV, inetd_launcher  # noqa: E402
from benchlib.servers.pop3d import Pop3d, Pop3dCommand, bcrypt_hash  # noqa: E402
from benchlib.sessions import read_session  # noqa: E402
from benchlib.spools import generate_spool, place_spool  # noqa: E402
from benchlib.verify import VerifyError  # noqa: E402

# The rows of a --quick run, in the order of results.md: what the split of scripts/bench into
# modules had to keep (a change here is a change of the benchmark's output).
QUICK_ROWS = [
    "greeting p50",
    "greeting p95",
    "USER/PASS/STAT/QUIT p50",
    "USER/PASS/STAT/QUIT p95",
    "USER/PASS/STAT/QUIT p50, bcrypt ($2b$)",
    "USER/PASS/STAT/QUIT p50, system account (PAM)",
    *(
        f"2 MiB: {figure}"
        for figure in (
            "PASS→+OK",
            "login+STAT",
            "STAT",
            "LIST all",
            "UIDL all",
            "RETR all",
            "QUIT (nothing deleted)",
            "peak RSS",
            "CPU (read session)",
            "DELE last + QUIT",
            "DELE all + QUIT",
            "DELE 1 + QUIT",
            "DELE 1 + QUIT, disk floor",
            "poll, index off",
            "poll, first (no index yet)",
            "poll, unchanged spool",
            "poll after one delivery",
        )
    ),
    "2000 tiny messages: login+STAT",
    "2000 tiny messages: LIST all",
    "2000 tiny messages: UIDL all",
    "stock poplib RETR all (44 msgs, 0.5 MiB)",
]


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory the sessions can reach when they run as RUN_AS (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pop3d-bench-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_help() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=True)
    assert "--quick" in out.stdout and "popa3d" in out.stdout


def test_quick_run_verifies_every_session(work: Path) -> None:
    cmd = [sys.executable, str(BENCH), "--quick", "--workdir", str(work), "--mail-user", RUN_AS]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("verified") is False]
    figures = [r for r in records if r["metric"] != "setup"]
    assert [r["metric"] for r in figures if r["server"] == "pop3d"] == QUICK_ROWS
    skipped = [r["metric"] for r in figures if r["value"] is None]
    assert skipped == ["USER/PASS/STAT/QUIT p50, system account (PAM)"]  # it needs popa3d beside it
    floor = [r["metric"] for r in figures if r["server"] == "floor"]
    assert floor == (["greeting p50", "greeting p95"] if inetd_launcher() else []) + [
        "2 MiB: DELE 1 + QUIT, disk floor"
    ]
    assert {r["server"] for r in figures} <= {"pop3d", "floor"}
    table = (work / "results.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in table.splitlines()[2:] if line.startswith("| ")]
    assert rows == QUICK_ROWS
    assert "| 2 MiB: login+STAT |" in table and run.stdout.count(table) == 1  # printed as written


@pytest.fixture
def pop3d(work: Path) -> Iterator[Pop3d]:
    """pop3d of this checkout, as scripts/bench starts it, with the benchmark's user and password."""
    owner = pwd.getpwnam(RUN_AS) if IS_ROOT else None
    found = Pop3dCommand(
        [sys.executable, "-m", "pop3d"], dict(CLEAN_ENV, PYTHONPATH=str(ROOT)), sys.executable, ""
    )
    server = Pop3d(inetd_launcher(), found.command, found.env, work, owner)
    try:
        server.set_password(bcrypt_hash(found))
        yield server
    finally:
        server.stop()


needs_launcher = pytest.mark.skipif(
    not (shutil.which("tcpserver") or shutil.which("socat")), reason="needs tcpserver or socat"
)


@needs_launcher
def test_a_wrong_answer_is_caught(work: Path, pop3d: Pop3d) -> None:
    """One changed octet in a message body (same size), then one added octet: both are reported."""
    spool = generate_spool(work / "spool", 0.2, seed=3)
    owner = pwd.getpwnam(RUN_AS) if IS_ROOT else None
    place_spool(spool, pop3d.spool_path(), owner)
    assert read_session(pop3d, spool)["retr_mbps"] > 0  # the honest spool passes
    pop3d.settle()

    data = bytearray(pop3d.spool_path().read_bytes())
    body = spool.offsets[2] + (spool.offsets[3] - spool.offsets[2]) // 2
    data[body] = ord("#") if data[body] != ord("#") else ord("%")
    rewrite(pop3d.spool_path(), bytes(data))
    with pytest.raises(VerifyError, match="RETR 3: the bytes differ"):
        read_session(pop3d, spool)
    pop3d.settle()

    data.insert(body, ord("x"))
    rewrite(pop3d.spool_path(), bytes(data))
    with pytest.raises(VerifyError, match=r"STAT|LIST 3"):
        read_session(pop3d, spool)


@needs_launcher
def test_an_empty_spool_is_measured_without_a_false_failure(work: Path, pop3d: Pop3d) -> None:
    """--sizes 0 (reported: its DELE checks failed and the run exited 1): an empty spool's login,
    STAT, LIST and UIDL are measured and verified; RETR and the updates, which need a message, are
    rows marked skipped."""
    args = argparse.Namespace(sizes=[0.0], rounds=2, seed=7)
    res = Results(work, "test")
    owner = pwd.getpwnam(RUN_AS) if IS_ROOT else None
    ctx = Context(args, res, work, [pop3d], None, pop3d, owner, sys.executable, pop3d.env)
    spool_sizes.run(ctx)
    assert res.failures == []
    rows = {r["metric"]: r for r in res.records}
    for figure in ("login+STAT", "LIST all", "UIDL all", "QUIT (nothing deleted)"):
        assert rows[f"0 MiB: {figure}"]["value"] > 0 and rows[f"0 MiB: {figure}"]["messages"] == 0
    for figure in ("RETR all", "DELE last + QUIT", "DELE all + QUIT", "DELE 1 + QUIT"):
        assert rows[f"0 MiB: {figure}"]["value"] is None and "empty" in rows[f"0 MiB: {figure}"]["skipped"]
    assert pop3d.spool_path().stat().st_size > 0  # the small spool is back in place


def rewrite(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.chown(path, st.st_uid, st.st_gid)


@needs_launcher
def test_concurrency_mode_verifies_every_session(work: Path) -> None:
    """--concurrency: C clients at once, each with an account of its own, against pop3d from
    inetd's seat and against its own --listen; every session's answer checked, and the rows are
    the throughput, the latency percentiles, and the CPU and memory each session cost."""
    cmd = [sys.executable, str(BENCH), "--quick", "--concurrency", "1,2", "--workloads", "htpasswd"]
    run = subprocess.run(
        [*cmd, "--workdir", str(work), "--mail-user", RUN_AS], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("verified") is False]
    figures = [r for r in records if r["metric"] != "setup"]
    whats = ("sessions/s", "latency p50", "latency p95", "latency p99", "CPU per session")
    for server in ("pop3d", "pop3d --listen"):
        got = {r["metric"]: r for r in figures if r["server"] == server}
        for clients in ("1 client", "2 clients"):
            for what in whats:
                assert got[f"{clients}, htpasswd short session: {what}"]["value"] > 0, (server, clients, what)
    # Both clients logged in, each as its own user, through both servers.
    log = (work / "pop3d" / "pop3d.log").read_text()
    assert "login: user=pop3bench " in log and "login: user=pop3bench2 " in log
    table = (work / "results.md").read_text()
    assert "| figure | pop3d | pop3d --listen |" in table
