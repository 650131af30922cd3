"""The Debian package's view of pop3d (issue 15).

The suite on Debian's own python3 and libraries: `POP3D_DEBIAN_LIBS=1 scripts/test`.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest

# ------------------------------------------------------------- Debian's own Python libraries


@pytest.mark.skipif(
    os.environ.get("POP3D_DEBIAN_LIBS") != "1",
    reason="runs in the venv over Debian's packages (POP3D_DEBIAN_LIBS=1 scripts/test; .ci/run does)",
)
def test_the_suite_runs_on_debians_python_and_libraries() -> None:
    """What the .deb depends on: Debian 12's python3, python3-passlib 1.7.4, python3-bcrypt
    3.2 and python3-daemon 2.3, not PyPI's libpass, bcrypt 4 and python-daemon 3."""
    import bcrypt
    import daemon
    import passlib

    assert os.path.realpath(sys.executable).startswith("/usr/bin/python3")
    for module in (passlib, bcrypt, daemon):
        assert module.__file__.startswith("/usr/lib/python3/dist-packages/"), module.__file__
    assert passlib.__version__ == "1.7.4"
    assert bcrypt.__version__.startswith("3.2.")
    assert importlib.metadata.version("python-daemon").startswith("2.3.")
