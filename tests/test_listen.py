"""Standalone mode (`--listen`): real TCP clients, a process per connection, clean shutdown."""

from __future__ import annotations

import poplib
import shutil
import signal
import socket
import subprocess

import pytest
from conftest import (
    PASSWORD,
    ROOT,
    Pop3Env,
    child_env,
    mbox_bytes,
    sample_messages,
    wait_for,
    wire_form,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"+OK")
    except OSError:
        return False


@pytest.fixture
def listening(env: Pop3Env):
    port = free_port()
    proc = subprocess.Popen(
        env.command("--listen", f"127.0.0.1:{port}"),
        cwd=str(ROOT),
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    assert wait_for(lambda: accepting(port) or proc.poll() is not None)
    assert proc.poll() is None, proc.stderr.read()
    yield port, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    proc.stderr.close()


def test_poplib_over_tcp(env: Pop3Env, listening) -> None:
    port, _ = listening
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.stat()[0] == len(messages)
    _, lines, _ = client.retr(1)
    assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[0])
    client.quit()


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (Debian package curl)")
def test_curl_lists_and_retrieves(env: Pop3Env, listening) -> None:
    port, _ = listening
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    url = f"pop3://alice:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{port}/"
    listed = subprocess.run(["curl", "-sS", "--max-time", "30", url], capture_output=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    sizes = [int(line.split()[1]) for line in listed.stdout.splitlines()]
    assert len(sizes) == len(messages)
    got = subprocess.run(["curl", "-sS", "--max-time", "30", url + "1"], capture_output=True, timeout=60)
    assert got.returncode == 0, got.stderr
    # curl un-stuffs dots and writes the message with the CRLF line ends it received.
    assert got.stdout == wire_form(messages[0])
    assert len(got.stdout) == sizes[0]


# An address as the user name and a pass phrase: their AUTH PLAIN initial response is far over
# RFC 2449's 40-octet argument limit, and within the 255-octet line RFC 5034 bounds AUTH by.
LONG_USER = "a-rather-long-mailbox-name@example.org"
LONG_PASSWORD = "correct horse battery staple, and more of it"


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (Debian package curl)")
def test_curl_auth_plain_with_a_long_initial_response(env: Pop3Env, listening) -> None:
    """curl --sasl-ir sends AUTH PLAIN with its credentials on the command line when they fit
    255 octets; pop3d cut them at 40 ("Syntax error in arguments.")."""
    port, _ = listening
    env.add_user(LONG_USER, LONG_PASSWORD)
    messages = sample_messages()[:2]
    env.write_spool(mbox_bytes(messages), user=LONG_USER)
    url = f"pop3://127.0.0.1:{port}/1"
    sasl_ir = ["--sasl-ir", "--login-options", "AUTH=PLAIN", "--user", f"{LONG_USER}:{LONG_PASSWORD}"]
    got = subprocess.run(
        ["curl", "-sS", "--max-time", "30", *sasl_ir, url],
        capture_output=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout == wire_form(messages[0])
    assert f"login: user={LONG_USER}" in env.log_text()


@pytest.mark.skipif(not shutil.which("nmap"), reason="nmap is not installed (Debian package nmap)")
def test_nmap_pop3_capabilities_lists_them(env: Pop3Env, listening) -> None:
    """nmap's pop3-capabilities reads the CAPA answer up to its first "." (nselib/pop3.lua):
    "+OK Capability list follows." gave it an empty list, and it printed nothing."""
    port, _ = listening
    scan = subprocess.run(
        ["nmap", "-n", "-Pn", "-sT", "-p", str(port), "--script", "+pop3-capabilities", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scan.returncode == 0, scan.stderr
    found = [line for line in scan.stdout.splitlines() if "pop3-capabilities:" in line]
    assert len(found) == 1, scan.stdout
    listed = found[0].split("pop3-capabilities:", 1)[1].split()
    assert {"USER", "TOP", "UIDL", "PIPELINING", "SASL(PLAIN", "IMPLEMENTATION(pop3d)"} <= set(listed)


def test_sigterm_stops_the_server(env: Pop3Env, listening) -> None:
    port, proc = listening
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not accepting(port)
