"""The command itself: installation, options, start-up imports, log targets, mboxrd, root rules."""

from __future__ import annotations

import poplib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IS_ROOT, PASSWORD, ROOT, Pop3Env, child_env, mbox_bytes, recv_until

from pop3d.cli import CONFIG_ERROR_REPLY

# Modules that cost start-up time and must not be loaded before the greeting is written.
HEAVY = (
    "re",
    "ssl",
    "socket",
    "passlib",
    "bcrypt",
    "hashlib",
    "typing",
    "enum",
    "dataclasses",
    "logging",
    "configparser",
    "argparse",
    "daemon",
    "pam",
    "mmap",
)


def test_greeting_path_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from pop3d import cli, config, dispatch, log, privsep, protocol, session, transport, wire\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env=child_env(),
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == ""


def test_installed_command_runs() -> None:
    """`pip install .` puts a `pop3d` command beside the interpreter (scripts/test installs it)."""
    command = Path(sys.executable).parent / "pop3d"
    if not command.exists():
        pytest.skip("pop3d is not installed in this interpreter's environment (run scripts/test)")
    out = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("pop3d ")


def test_help_and_version_via_module() -> None:
    for flag, expected in (("--help", "usage: pop3d"), ("--version", "pop3d ")):
        out = subprocess.run(
            [sys.executable, "-m", "pop3d", flag],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            env=child_env(),
            timeout=30,
        )
        assert out.returncode == 0 and out.stdout.startswith(expected)


def test_unknown_option_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pop3d", "--listen", "127.0.0.1:1", "--bogus-key", "1"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env=child_env(),
        timeout=30,
    )
    assert out.returncode == 64 and "--bogus-key" in out.stderr and "Traceback" not in out.stderr


def test_log_to_stderr_names_the_login(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes([b"Subject: x\n\nbody\n"]))
    env.write_config(log="stderr")
    client = env.client()
    client.user("alice")
    client.pass_(PASSWORD)
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    err = client.proc.stderr.read().decode()
    assert "login: user=alice" in err and "logout: reason=quit" in err
    assert PASSWORD not in err


def test_passwords_never_reach_the_log(env: Pop3Env) -> None:
    client = env.client()
    client.user("alice")
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong-Secret-123")
    client.quit()
    client.proc.wait(timeout=20)
    log = env.log_text()
    assert "login failed: user=alice" in log and "wrong-Secret-123" not in log


def test_mboxrd_unquotes_one_level(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes([b"Subject: q\n\n>From one\n>>From two\n>Fromage\n"]))
    for fmt, expected in (
        ("mboxo", [b">From one", b">>From two", b">Fromage"]),
        ("mboxrd", [b"From one", b">From two", b">Fromage"]),
    ):
        env.write_config(mbox_format=fmt)
        client = env.client()
        client.user("alice")
        client.pass_(PASSWORD)
        _, listing, _ = client.list()
        _, lines, _ = client.retr(1)
        assert lines[2:] == expected
        assert int(listing[0].split()[1]) == sum(len(line) + 2 for line in lines)
        client.quit()
        client.proc.wait(timeout=20)


@pytest.mark.skipif(not IS_ROOT, reason="needs root: the rule is about sessions started as root")
@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"mail_user": None}, "mail_user is empty"),
        ({"mail_user": "root"}, "mail_user: 'root' has uid 0"),
        ({"mail_user": "p3t-no-such-account"}, "mail_user: no account"),
        ({"preauth_user": ""}, "preauth_user is empty"),
        ({"preauth_user": "root"}, "preauth_user: 'root' has uid 0"),
        ({"preauth_user": "p3t-no-such-account"}, "preauth_user: no account"),
    ],
)
def test_accounts_pop3d_runs_as_are_checked_at_start(env: Pop3Env, settings: dict, named: str) -> None:
    """Issue 12, finding 1: found at start (exit 78, the configuration-error reply), never at a
    login that passed the check while the process was still root."""
    path = env.write_spool(mbox_bytes([b"Subject: x\n\nbody\n"]))
    for key, value in settings.items():
        env.settings.pop(key, None)
        if value is not None:
            env.settings[key] = value
    env.write_config()
    sock, proc = env.start()
    assert recv_until(sock, b"\r\n") == CONFIG_ERROR_REPLY
    assert proc.wait(timeout=20) == 78
    message = proc.stderr.read().decode()
    assert named in message and "Traceback" not in message
    assert not Path(f"{path}.lock").exists()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to watch a session drop to mail_user")
def test_htpasswd_session_runs_as_mail_user(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes([b"Subject: x\n\nbody\n"]))
    client = env.client()
    client.user("alice")
    client.pass_(PASSWORD)
    status = Path(f"/proc/{client.proc.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    assert set(uids) == {str(env.account.pw_uid)} and set(gids) == {str(env.account.pw_gid)}
    client.quit()
    assert client.proc.wait(timeout=20) == 0


def test_the_early_greeting_is_the_protocol_greeting() -> None:
    """cli sends the greeting before importing the protocol: the two copies must agree."""
    from pop3d import cli, protocol

    assert cli.GREETING == protocol.GREETING
