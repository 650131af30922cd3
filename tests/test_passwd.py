"""`pop3d-passwd` / `python -m pop3d.passwd`: users it adds or updates can log in to pop3d."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from conftest import IS_ROOT, ROOT, Pop3Env, child_env, mbox_bytes, sample_messages


def passwd(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3d.passwd", *args],
        input=None if password is None else password + "\n",
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env=child_env(),
        timeout=60,
    )


def can_log_in(env: Pop3Env, user: str, password: str) -> bool:
    client = env.client()
    client.user(user)
    try:
        client.pass_(password)
    except Exception:
        return False
    client.quit()
    return True


def test_add_update_delete_and_log_in(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]), user="carol")
    htpasswd = str(env.htpasswd)
    original = env.htpasswd.read_text()
    done = passwd("-i", htpasswd, "carol", password="first secret")
    assert done.returncode == 0, done.stderr
    assert "carol added" in done.stderr
    text = env.htpasswd.read_text()
    assert text.startswith(original)  # the other lines untouched
    assert text.splitlines()[-1].startswith("carol:$2b$10$")  # bcrypt by default
    assert can_log_in(env, "carol", "first secret")
    done = passwd("-i", "-s", "sha512_crypt", htpasswd, "carol", password="second secret")
    assert done.returncode == 0 and "carol updated" in done.stderr
    assert env.htpasswd.read_text().count("carol:") == 1
    assert "carol:$6$" in env.htpasswd.read_text()
    assert not can_log_in(env, "carol", "first secret")
    assert can_log_in(env, "carol", "second secret")
    done = passwd("-D", htpasswd, "carol")
    assert done.returncode == 0
    assert env.htpasswd.read_text() == original
    assert not can_log_in(env, "carol", "second secret")


def test_keeps_owner_and_mode_and_refuses_bad_input(env: Pop3Env, tmp_path) -> None:
    path = tmp_path / "users"
    assert passwd("-i", str(path), "dave", password="pw").returncode == 66  # no -c
    assert passwd("-c", "-i", str(path), "dave", password="pw").returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o600)
    if IS_ROOT:
        os.chown(path, 0, 12345)
    assert passwd("-i", str(path), "erin", password="pw2").returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if IS_ROOT:
        assert path.stat().st_gid == 12345
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == ["dave", "erin"]
    for bad in ("-x", "a/b", "..", "x y", "é"):
        done = passwd("-i", str(path), "--", bad, password="pw")
        assert done.returncode == 65, bad
    assert passwd("-i", str(path), "frank", password="").returncode == 65
    assert passwd("-i", str(path), "frank", password="x" * 73).returncode == 65
    assert passwd("-D", str(path), "nobody-here").returncode == 65
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary file left


def test_the_installed_script_runs() -> None:
    """scripts/pop3d-passwd is what pip installs as the `pop3d-passwd` command."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pop3d-passwd"), "--help"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: pop3d-passwd") and "bcrypt" in done.stdout
