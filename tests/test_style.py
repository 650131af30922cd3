"""The code base stays ruff-clean (lint and format), as the contributing rules ask."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install '.[test]')")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args: list[str]) -> None:
    out = subprocess.run([RUFF, *args], cwd=str(ROOT), capture_output=True, text=True, timeout=120)  # type: ignore[list-item]
    assert out.returncode == 0, out.stdout + out.stderr
