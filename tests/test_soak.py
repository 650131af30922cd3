"""A reduced load/soak run (scripts/soak runs the full one: 500 sessions, 50 clients, 50 users).

Concurrent sessions through the standalone server (and openbsd-inetd) while an MDA (real
procmail when installed) delivers into the same spools; afterwards nothing is lost, duplicated
or damaged, no lock or journal is left, and no session process outlives its launcher.
"""

from __future__ import annotations

import os
import shutil

import pytest
import soak

needs_procmail = pytest.mark.skipif(
    not shutil.which("procmail"), reason="procmail is not installed (Debian package procmail)"
)
needs_inetd = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("inetd") or os.access("/usr/sbin/inetd", os.X_OK)),
    reason="needs root and openbsd-inetd (Debian package openbsd-inetd)",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mda", "via"),
    [
        pytest.param("procmail", "listen", marks=needs_procmail),
        ("python", "listen"),
        pytest.param("procmail", "inetd", marks=[needs_procmail, needs_inetd]),
    ],
)
def test_reduced_soak(mda: str, via: str) -> None:
    report = soak.soak(
        ["--sessions", "60", "--clients", "10", "--users", "8", "--deliveries", "60", "--mda", mda,
         "--via", via, "--max-seconds", "300"]
    )  # fmt: skip
    print(report)
    assert report["errors"] == [] and report["session_errors"] == 0
    assert report["sessions"] == 60
    assert report["lost"] == report["duplicated"] == report["unexpected"] == report["damaged"] == 0
    assert report["leftover_files"] == [] and report["zombies"] == []
    assert report["tracebacks_in_log"] == 0
    assert report["delivered"] > 0 and report["retrieved"] > 0 and report["deleted"] > 0
