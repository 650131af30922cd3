"""The documentation a newcomer reads says only what is true: every link resolves, every command
shown names options and files that exist, and the README stays a short map.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import ROOT

from pop3d import config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
# Repository paths a command may name (anything else is a path on the administrator's host).
REPO_DIRS = ("scripts/", "pam.d/", "systemd/", "inetd/", "xinetd/", "man/", "docs/", "tests/", "debian/")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_link_resolves(doc: Path) -> None:
    text = FENCE.sub("", doc.read_text())
    bad = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            bad.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not bad, bad


@cache
def options_of(command: str) -> set[str]:
    """The options `command --help` names (what it really accepts)."""
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text(command)))


def help_text(command: str) -> str:
    """What `command --help` prints."""
    if command == "pop3d":
        return config.HELP.format(keys=", ".join(config.KEYS)) + " ".join(
            f"--{key.replace('_', '-')}" for key in config.KEYS
        )
    if command == "pop3d-passwd":
        from pop3d import passwd

        return passwd.parser().format_help()
    done = subprocess.run(
        [sys.executable, str(ROOT / command), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{command} --help: {done.stderr}"
    return done.stdout


def _check_command(words: list[str], where: str) -> list[str]:
    """Problems with one shell command line: repository files missing, options unknown."""
    problems = []
    command = None
    for word in words:
        literal = "*" not in word and "$" not in word
        if word.startswith(REPO_DIRS) and literal and not (ROOT / word.rstrip("/")).exists():
            problems.append(f"{where}: {word} does not exist")
        name = word.rsplit("/", 1)[-1]
        if name in ("pop3d", "pop3d-passwd") or (word.startswith("scripts/") and (ROOT / word).is_file()):
            command = word if word.startswith("scripts/") else name
            if command == "scripts/pop3d":
                command = "pop3d"
            continue
        if command and word.startswith("-") and len(word) > 1:
            option = word.split("=", 1)[0].strip("[]")
            if option not in options_of(command):
                problems.append(f"{where}: {command} has no option {option}")
        if word in ("|", "&&", ";", "||"):
            command = None
    return problems


def _shell_lines(block: str) -> list[str]:
    lines = []
    for line in block.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_command_shown_exists(doc: Path) -> None:
    text = doc.read_text()
    name = doc.relative_to(ROOT)
    problems: list[str] = []
    for lang, block in FENCE.findall(text):
        if lang == "ini":
            for line in _shell_lines(block):
                if line.startswith("["):
                    assert line == "[pop3d]", f"{name}: section {line}"
                    continue
                key = line.split("=", 1)[0].strip()
                if key not in config.KEYS:
                    problems.append(f"{name}: ini example uses unknown key {key!r}")
            continue
        if lang not in ("sh", ""):
            continue
        for line in _shell_lines(block):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            problems += _check_command(words, f"{name}: {line}")
    for span in INLINE.findall(FENCE.sub("", text)):
        if span.startswith(("pop3d ", "pop3d-passwd ", "scripts/")):
            try:
                words = shlex.split(span)
            except ValueError:
                continue
            problems += _check_command(words, f"{name}: `{span}`")
    assert not problems, "\n".join(problems)


def test_readme_is_a_short_map() -> None:
    """At most 250 lines, and the inetd line for system accounts on the first screen."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:50])
    assert "pop3 stream tcp nowait root /usr/local/bin/pop3d pop3d -c /etc/pop3d.conf" in first_screen
    assert "pam.d/pop3d" in first_screen


def test_every_doc_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    for doc in DOCS[1:]:
        assert f"](docs/{doc.name})" in readme, f"README's documentation table lacks {doc.name}"
