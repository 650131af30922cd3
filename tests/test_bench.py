"""scripts/bench keeps working and keeps checking what it measures (never how fast anything is).

A tiny run (--quick: a 2 MiB spool, a few connections, pop3d and the floor only) must verify every
session; and a server whose answer differs from the spool by one octet must be caught.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT, ROOT, RUN_AS

BENCH = ROOT / "scripts" / "bench"


def load_bench():
    loader = importlib.machinery.SourceFileLoader("pop3d_bench", str(BENCH))
    spec = importlib.util.spec_from_loader("pop3d_bench", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


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
    measured = {r["metric"] for r in records if r["server"] == "pop3d" and r["value"] is not None}
    for metric in ("greeting p50", "2 MiB: RETR all", "2 MiB: DELE 1 + QUIT", "2 MiB: DELE all + QUIT"):
        assert metric in measured, sorted(measured)
    assert "| 2 MiB: login+STAT |" in (work / "results.md").read_text()


@pytest.mark.skipif(
    not (shutil.which("tcpserver") or shutil.which("socat")), reason="needs tcpserver or socat"
)
def test_a_wrong_answer_is_caught(work: Path) -> None:
    """One changed octet in a message body (same size), then one added octet: both are reported."""
    bench = load_bench()
    spool = bench.generate_spool(work / "spool", 0.2, seed=3)
    owner = bench.pwd.getpwnam(RUN_AS) if IS_ROOT else None
    env = dict(bench.CLEAN_ENV, PYTHONPATH=str(ROOT))
    server = bench.Pop3d(bench.inetd_launcher(), [sys.executable, "-m", "pop3d"], env, work, owner)
    try:
        hashed = subprocess.run(
            [sys.executable, "-c", "from pop3d import auth; print(auth.hash_password('bench pass 1'))"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        server.set_password(hashed)
        bench.place_spool(spool, server.spool_path(), owner)
        assert bench.read_session(server, spool)["retr_mbps"] > 0  # the honest spool passes
        bench.settle(server)

        data = bytearray(server.spool_path().read_bytes())
        body = spool.offsets[2] + (spool.offsets[3] - spool.offsets[2]) // 2
        data[body] = ord("#") if data[body] != ord("#") else ord("%")
        rewrite(server.spool_path(), bytes(data))
        with pytest.raises(bench.VerifyError, match="RETR 3: the bytes differ"):
            bench.read_session(server, spool)
        bench.settle(server)

        data.insert(body, ord("x"))
        rewrite(server.spool_path(), bytes(data))
        with pytest.raises(bench.VerifyError, match=r"STAT|LIST 3"):
            bench.read_session(server, spool)
    finally:
        server.stop()


def rewrite(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.chown(path, st.st_uid, st.st_gid)
