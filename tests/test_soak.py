"""A reduced load/soak run (scripts/soak runs the full one: 500 sessions, 50 clients, 50 users).

Concurrent sessions through the standalone server while an MDA (real procmail when installed)
delivers into the same spools; afterwards nothing is lost, duplicated or damaged, no lock or
journal is left, and no session process outlives the server.
"""

from __future__ import annotations

import shutil

import pytest
import soak


@pytest.mark.slow
@pytest.mark.parametrize(
    "mda",
    [
        pytest.param(
            "procmail",
            marks=pytest.mark.skipif(
                not shutil.which("procmail"), reason="procmail is not installed (Debian package procmail)"
            ),
        ),
        "python",
    ],
)
def test_reduced_soak(mda: str) -> None:
    report = soak.soak(
        ["--sessions", "60", "--clients", "10", "--users", "8", "--deliveries", "60", "--mda", mda,
         "--max-seconds", "300"]
    )  # fmt: skip
    print(report)
    assert report["errors"] == [] and report["session_errors"] == 0
    assert report["sessions"] == 60
    assert report["lost"] == report["duplicated"] == report["unexpected"] == report["damaged"] == 0
    assert report["leftover_files"] == [] and report["zombies"] == []
    assert report["tracebacks_in_log"] == 0
    assert report["delivered"] > 0 and report["retrieved"] > 0 and report["deleted"] > 0
