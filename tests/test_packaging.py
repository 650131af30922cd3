"""What `pip install .` ships beside the code: manual pages that render cleanly and document
every configuration key, the launcher examples, and the pop3d-passwd command."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

from pop3d import config

PAGES = ["man/man8/pop3d.8", "man/man8/pop3d-passwd.8", "man/man5/pop3d.conf.5"]


@pytest.mark.skipif(not shutil.which("groff"), reason="groff is not installed (Debian groff-base)")
@pytest.mark.parametrize("page", PAGES)
def test_man_page_renders_without_warnings(page: str) -> None:
    done = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / page)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, LC_ALL="C.UTF-8"),
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_every_configuration_key_is_documented() -> None:
    """A key added to config.KEYS must get an entry in pop3d.conf(5), the one reference."""
    page = (ROOT / "man/man5/pop3d.conf.5").read_text()
    documented = set(re.findall(r"^\.B[IR]? (\w+) ", page, flags=re.MULTILINE))
    for key in config.KEYS:
        assert key in documented, f"pop3d.conf.5 has no .TP entry for {key}"


def test_every_command_option_is_in_pop3d_8() -> None:
    page = (ROOT / "man/man8/pop3d.8").read_text().replace("\\-", "-")
    for option in ("--listen", "--daemon", "--pidfile", "-c", "--help", "--version"):
        assert option in page


def test_data_files_exist_and_include_the_pages() -> None:
    setupcfg = pytest.importorskip("setuptools.config.setupcfg")
    data_files = setupcfg.read_configuration(str(ROOT / "setup.cfg"))["options"]["data_files"]
    shipped = [path for _, paths in data_files for path in paths]
    for path in shipped:
        assert (ROOT / path).is_file(), path
    assert set(PAGES) <= set(shipped)
    for launcher_file in ("inetd/pop3d.conf", "xinetd/pop3d", "xinetd/pop3s", "systemd/pop3d.socket"):
        assert launcher_file in shipped


def test_an_installed_pop3d_has_its_pages_and_commands() -> None:
    """Checked where pop3d is installed (scripts/test installs the checkout into .venv)."""
    # An installed wheel has a RECORD; the pop3d.egg-info that pip's build leaves in the
    # checkout (found first from here) has none.
    installed = [
        d for d in importlib.metadata.distributions(name="pop3d") if d.read_text("RECORD") is not None
    ]
    if not installed:
        pytest.skip("pop3d is not installed in this interpreter (scripts/test installs it)")
    dist = installed[0]
    names = {str(f).replace(os.sep, "/") for f in dist.files or []}
    for page in PAGES:
        assert any(name.endswith("share/" + page) for name in names), page
    assert any(name.endswith("bin/pop3d-passwd") for name in names)


def test_shipped_launcher_lines_agree() -> None:
    inetd = [
        line.split()
        for line in (ROOT / "inetd/pop3d.conf").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert [fields[0] for fields in inetd] == ["pop3", "pop3s"]
    for fields in inetd:
        assert fields[1:6] == ["stream", "tcp", "nowait", "root", "/usr/local/bin/pop3d"]
        assert fields[6:9] == ["pop3d", "-c", "/etc/pop3d.conf"]
    assert inetd[1][9:] == ["--tls", "implicit"]
    assert "server_args\t= -c /etc/pop3d.conf --tls implicit" in (ROOT / "xinetd/pop3s").read_text()
