"""TLS (issue 5): STLS on the inetd socket, implicit TLS, the plaintext policy, SASL, start-up checks.

Certificates come from trustme, made in each test: a root CA, an intermediate CA and a leaf for
"socketpair", "localhost" and 127.0.0.1. Clients trust only the root, so every successful
verification also proves the server sent the chain from its certificate file.
"""

from __future__ import annotations

import base64
import datetime
import os
import poplib
import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from conftest import (
    IS_ROOT,
    PASSWORD,
    ROOT,
    Pop3Env,
    SocketPOP3,
    child_env,
    mbox_bytes,
    recv_until,
    sample_messages,
    wait_for,
    wire_form,
)

GREETING = b"+OK POP3 server ready\r\n"
BEGIN_TLS = b"+OK Begin TLS negotiation.\r\n"
NO_PLAINTEXT = b"-ERR [AUTH] Plaintext authentication is disallowed; use STLS first.\r\n"


class Certs:
    """A test PKI in `base`: ca.pem (the root clients trust), cert.pem (leaf + intermediate), key.pem."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ca = trustme.CA()
        self.intermediate = self.ca.create_child_ca()
        leaf = self.intermediate.issue_cert("socketpair", "localhost", "127.0.0.1")
        self.ca_file = base / "ca.pem"
        self.cert_file = base / "cert.pem"
        self.key_file = base / "key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key_file))
        self.key_file.chmod(0o600)

    def settings(self, **extra: object) -> dict[str, object]:
        return {"tls_cert": str(self.cert_file), "tls_key": str(self.key_file), **extra}

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def certs(env: Pop3Env) -> Certs:
    return Certs(env.base)


def tls_env(env: Pop3Env, certs: Certs, **extra: object) -> Pop3Env:
    env.write_config(**certs.settings(**extra))
    return env


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def no_traceback(env: Pop3Env, proc: subprocess.Popen[bytes] | None = None) -> None:
    assert "Traceback" not in env.log_text()
    if proc is not None and proc.stderr is not None:
        assert b"Traceback" not in proc.stderr.read()


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset counts: it closed with our bytes unread)."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def command(client: poplib.POP3, line: str) -> bytes:
    """A raw command through poplib (AUTH has no poplib method); the reply line, -ERR included."""
    try:
        return client._shortcmd(line)
    except poplib.error_proto as e:
        return e.args[0]


# ---------------------------------------------------------------- STLS on the inetd socket


def test_stls_with_poplib_then_login_and_retrieve(env: Pop3Env, certs: Certs) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    tls_env(env, certs)
    client = env.client()
    before = client.capa()
    assert "STLS" in before and "USER" not in before and "SASL" not in before
    client.stls(context=certs.client_context())
    after = client.capa()
    assert "STLS" not in after and "USER" in after and after["SASL"] == ["PLAIN", "LOGIN"]
    assert command(client, "STLS") == b"-ERR TLS is already active."
    client.user("alice")
    client.pass_(PASSWORD)
    for number, message in enumerate(messages, 1):
        _, lines, _ = client.retr(number)
        assert b"".join(line + b"\r\n" for line in lines) == wire_form(message)
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    log = env.log_text()
    assert "TLS: rip=local TLSv1.3" in log and "logout: reason=quit" in log
    no_traceback(env, client.proc)


def test_injection_bytes_pipelined_behind_stls_are_never_executed(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs)
    sock, proc = env.start()
    assert recv_until(sock, b"\r\n") == GREETING
    sock.sendall(b"STLS\r\nCAPA\r\n")
    assert recv_until(sock, b"\r\n") == BEGIN_TLS  # and nothing else in plaintext
    tls = certs.client_context().wrap_socket(sock, server_hostname="socketpair")
    # The first reply after the handshake answers our NOOP: the injected CAPA is gone.
    tls.sendall(b"NOOP\r\n")
    assert recv_until(tls, b"\r\n") == b"-ERR Command not valid in this state.\r\n"
    tls.sendall(b"QUIT\r\n")
    assert recv_until(tls, b"\r\n") == b"+OK Bye.\r\n"
    assert proc.wait(timeout=20) == 0


def test_plaintext_sent_after_the_stls_reply_is_not_executed(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, plaintext_auth="yes")
    sock, proc = env.start()
    recv_until(sock, b"\r\n")
    sock.sendall(b"STLS\r\n")
    assert recv_until(sock, b"\r\n") == BEGIN_TLS
    # Not a ClientHello: the handshake fails on it, nothing is answered in plaintext.
    sock.sendall(b"CAPA\r\nUSER alice\r\n")
    received = recv_all(sock)
    assert b"+OK" not in received and b"-ERR" not in received
    assert proc.wait(timeout=20) == 0
    assert "TLS handshake failed: rip=local: TLS error" in env.log_text()
    no_traceback(env, proc)


def test_plaintext_auth_tls_refuses_user_pass_and_auth_plain_before_stls(env: Pop3Env, certs: Certs) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:2]))
    tls_env(env, certs)  # plaintext_auth defaults to tls once TLS is configured
    client = env.client()
    assert command(client, "USER alice") == NO_PLAINTEXT[:-2]
    assert command(client, "PASS " + PASSWORD) == NO_PLAINTEXT[:-2]
    plain = b64(b"\0alice\0" + PASSWORD.encode()).decode()
    assert command(client, "AUTH PLAIN " + plain) == NO_PLAINTEXT[:-2]
    assert command(client, "AUTH LOGIN") == NO_PLAINTEXT[:-2]
    client.stls(context=certs.client_context())
    assert command(client, "AUTH PLAIN " + plain).startswith(b"+OK Logged in; 2 messages")
    assert client.stat()[0] == 2
    client.quit()
    assert client.proc.wait(timeout=20) == 0


def test_user_pass_after_stls(env: Pop3Env, certs: Certs) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    tls_env(env, certs)
    client = env.client()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.user("alice")
    client.stls(context=certs.client_context())
    client.user("alice")
    assert client.pass_(PASSWORD).startswith(b"+OK Logged in; 1 messages")
    client.quit()


def test_sasl_plain_continuation_and_login_over_tls(env: Pop3Env, certs: Certs) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    tls_env(env, certs)
    client = env.client()
    client.stls(context=certs.client_context())
    # AUTH with no mechanism lists them (RFC 5034 leaves it open; most servers do this).
    client._putcmd("AUTH")
    assert client._getlongresp()[1] == [b"PLAIN", b"LOGIN"]
    assert command(client, "AUTH PLAIN") == b"+ "
    assert command(client, "*") == b"-ERR Authentication cancelled."
    assert command(client, "AUTH PLAIN") == b"+ "
    other = b64(b"bob\0alice\0" + PASSWORD.encode()).decode()
    assert command(client, other) == b"-ERR Invalid SASL response."  # acting as another identity
    assert command(client, "AUTH PLAIN =") == b"-ERR Invalid SASL response."
    assert command(client, "AUTH PLAIN") == b"+ "
    assert command(client, "not base64!") == b"-ERR Invalid SASL response."
    assert command(client, "AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert command(client, b64(b"alice").decode()) == b"+ UGFzc3dvcmQ6"
    assert command(client, b64(PASSWORD.encode()).decode()).startswith(b"+OK Logged in; 1 messages")
    client.quit()
    assert client.proc.wait(timeout=20) == 0


def test_plaintext_auth_yes_allows_user_before_stls(env: Pop3Env, certs: Certs) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    tls_env(env, certs, plaintext_auth="yes")
    client = env.client()
    caps = client.capa()
    assert "USER" in caps and "STLS" in caps and caps["SASL"] == ["PLAIN", "LOGIN"]
    client.user("alice")
    client.pass_(PASSWORD)
    client.quit()


def test_plaintext_on_loopback_counts_a_unix_socket_as_local(env: Pop3Env, certs: Certs) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    tls_env(env, certs, plaintext_on_loopback="yes")
    client = env.client()  # the socketpair is a Unix socket: the peer is on this host
    assert "USER" in client.capa()
    client.user("alice")
    client.pass_(PASSWORD)
    client.quit()


def test_no_tls_configured_offers_sasl_but_no_stls(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    client = env.client()
    caps = client.capa()
    assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN", "LOGIN"]
    assert command(client, "STLS") == b"-ERR STLS is not available."
    plain = b64(b"alice\0alice\0" + PASSWORD.encode()).decode()
    assert command(client, "AUTH PLAIN " + plain).startswith(b"+OK Logged in")
    client.quit()
    assert client.proc.wait(timeout=20) == 0


def test_stls_on_pipes_is_refused_and_the_session_goes_on(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, plaintext_auth="yes")
    script = f"CAPA\r\nSTLS\r\nUSER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode()
    proc = subprocess.run(env.command(), input=script, capture_output=True, timeout=30, env=child_env())
    assert proc.returncode == 0
    out = proc.stdout
    assert b"\r\nSTLS\r\n" not in out  # not advertised on a pipe
    assert b"-ERR STLS is not available.\r\n+OK Send PASS.\r\n+OK Logged in; 0 messages" in out
    assert out.endswith(b"+OK Bye; 0 messages left.\r\n")


# ---------------------------------------------------------------- implicit TLS


def implicit_client(env: Pop3Env, certs: Certs) -> SocketPOP3:
    """POP3_SSL over the socketpair: our end wrapped before anything is read."""
    sock, proc = env.start()
    client = SocketPOP3(certs.client_context().wrap_socket(sock, server_hostname="socketpair"))
    client.proc = proc
    return client


def test_implicit_tls_on_the_inetd_socket(env: Pop3Env, certs: Certs) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    tls_env(env, certs, tls="implicit")
    client = implicit_client(env, certs)
    assert client.welcome == GREETING[:-2]
    caps = client.capa()
    assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN", "LOGIN"]
    assert command(client, "STLS") == b"-ERR TLS is already active."
    client.user("alice")
    client.pass_(PASSWORD)
    _, lines, _ = client.retr(5)
    assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[4])
    client.dele(1)
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert env.spool_path().read_bytes() == mbox_bytes(messages[1:])
    no_traceback(env, client.proc)


def test_implicit_tls_on_pipes_is_refused_with_a_log_line(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, tls="implicit")
    proc = subprocess.run(env.command(), input=b"CAPA\r\n", capture_output=True, timeout=30, env=child_env())
    assert proc.returncode == 78
    assert proc.stdout == b""
    assert "tls = implicit needs a socket" in env.log_text()


def test_connection_dropped_mid_session_releases_the_lock_without_update(env: Pop3Env, certs: Certs) -> None:
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    tls_env(env, certs, tls="implicit")
    client = implicit_client(env, certs)
    client.user("alice")
    client.pass_(PASSWORD)
    client.dele(1)
    os.close(client.sock.detach())  # no close_notify: the TCP-level equivalent of pulling the cable
    client.file.close()
    assert client.proc.wait(timeout=20) == 0
    assert path.read_bytes() == data
    assert not [p for p in path.parent.iterdir() if p.name != "alice"]
    no_traceback(env, client.proc)


# ---------------------------------------------------------------- handshakes that do not complete


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_client_closing_mid_handshake(env: Pop3Env, certs: Certs, mode: str) -> None:
    tls_env(env, certs, tls=mode)
    sock, proc = env.start()
    if mode == "starttls":
        recv_until(sock, b"\r\n")
        sock.sendall(b"STLS\r\n")
        assert recv_until(sock, b"\r\n") == BEGIN_TLS
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00")  # the start of a ClientHello, then nothing
    sock.close()
    assert proc.wait(timeout=20) == 0
    assert "TLS handshake failed: rip=local: the client closed the connection" in env.log_text()
    no_traceback(env, proc)


@pytest.mark.parametrize(
    "error",
    [
        ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF) (_ssl.c:992)"),  # Debian's 3.11.2
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:992)"),  # later 3.11s
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
    ],
)
def test_a_client_leaving_mid_handshake_is_worded_the_same_by_every_interpreter(error: OSError) -> None:
    """Issue 16: the same event read 'TLS error: TLS/SSL connection has been closed (EOF)' under
    Debian's Python 3.11.2 (the non-root run) and 'the client closed the connection' under later
    ones. The administrator's wording, whichever process (the confined child as root, or the
    session as a user) and whichever interpreter does the handshake."""
    from pop3d import tls

    assert tls._describe(error) == "the client closed the connection"


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_client_that_never_completes_the_handshake_is_timed_out(
    env: Pop3Env, certs: Certs, mode: str
) -> None:
    tls_env(env, certs, tls=mode, timeout=1)
    sock, proc = env.start()
    if mode == "starttls":
        recv_until(sock, b"\r\n")
        sock.sendall(b"STLS\r\n")
        assert recv_until(sock, b"\r\n") == BEGIN_TLS
    assert recv_all(sock) == b""  # the server gives up and closes
    assert proc.wait(timeout=20) == 0
    assert "TLS handshake failed: rip=local: not completed within 1 seconds" in env.log_text()
    no_traceback(env, proc)


def test_handshake_failure_is_logged(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, tls_min_version="TLSv1.3")
    client = env.client()
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        client.stls(context=context)
    assert client.proc.wait(timeout=20) == 0
    assert "TLS handshake failed: rip=local: TLS error: UNSUPPORTED_PROTOCOL" in env.log_text()
    no_traceback(env, client.proc)


# ---------------------------------------------------------------- configuration checked at start


def expect_config_error(env: Pop3Env, *names: str) -> None:
    """inetd mode: -ERR [SYS/PERM] to the client, exit 78, a message naming the key, no traceback."""
    sock, proc = env.start()
    assert recv_until(sock, b"\r\n").startswith(b"-ERR [SYS/PERM]")
    assert proc.wait(timeout=20) == 78
    message = proc.stderr.read().decode()
    assert "Traceback" not in message
    for name in names:
        assert name in message, message


def test_expired_certificate_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    leaf = certs.ca.issue_cert(
        "localhost",
        not_before=datetime.datetime(2020, 1, 1),
        not_after=datetime.datetime(2021, 1, 1),
    )
    leaf.cert_chain_pems[0].write_to_path(str(certs.cert_file))
    leaf.private_key_pem.write_to_path(str(certs.key_file))
    tls_env(env, certs)
    expect_config_error(env, "tls_cert", str(certs.cert_file), "expired on 2021-01-01 00:00:00 UTC")


def test_expired_chain_certificate_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    leaf = certs.ca.issue_cert("localhost")
    old = trustme.CA().issue_cert("old", not_after=datetime.datetime(2021, 1, 1))
    certs.cert_file.write_bytes(leaf.cert_chain_pems[0].bytes() + old.cert_chain_pems[0].bytes())
    leaf.private_key_pem.write_to_path(str(certs.key_file))
    tls_env(env, certs)
    expect_config_error(env, "tls_cert", "chain certificate 2 expired")


def test_not_yet_valid_certificate_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    soon = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(days=2)
    leaf = certs.ca.issue_cert("localhost", not_before=soon, not_after=soon + datetime.timedelta(days=90))
    leaf.cert_chain_pems[0].write_to_path(str(certs.cert_file))
    leaf.private_key_pem.write_to_path(str(certs.key_file))
    tls_env(env, certs)
    expect_config_error(env, "tls_cert", "is not valid before")


def test_key_of_another_certificate_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    certs.ca.issue_cert("other").private_key_pem.write_to_path(str(certs.key_file))
    tls_env(env, certs)
    expect_config_error(env, "tls_key", str(certs.key_file), "does not match the certificate")


def test_missing_certificate_file_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, tls_cert=str(env.base / "missing.pem"))
    expect_config_error(env, "tls_cert", "missing.pem", "No such file or directory")


def test_missing_key_file_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, tls_key=str(env.base / "missing.key"))
    expect_config_error(env, "tls_key", "missing.key", "No such file or directory")


def test_directory_as_key_file_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, tls_key=str(env.base))
    expect_config_error(env, "tls_key", "Is a directory")


@pytest.mark.skipif(IS_ROOT, reason="root reads mode-000 files")
def test_unreadable_key_file_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    certs.key_file.chmod(0)
    tls_env(env, certs)
    expect_config_error(env, "tls_key", "Permission denied")


def test_encrypted_key_is_a_config_error_not_a_prompt(env: Pop3Env, certs: Certs) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.key_file.read_bytes(), password=None)
    certs.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    tls_env(env, certs)
    expect_config_error(env, "tls_key", "encrypted")


def test_certificate_file_without_a_certificate_is_a_config_error(env: Pop3Env, certs: Certs) -> None:
    tls_env(env, certs, tls_cert=str(certs.key_file))
    expect_config_error(env, "tls_cert", "no PEM certificate")


def test_key_in_the_certificate_file(env: Pop3Env, certs: Certs) -> None:
    combined = env.base / "combined.pem"
    combined.write_bytes(certs.key_file.read_bytes() + certs.cert_file.read_bytes())
    tls_env(env, certs, tls_cert=str(combined), tls_key=None)
    env.settings.pop("tls_key")
    env.write_config()
    client = env.client()
    client.stls(context=certs.client_context())
    assert "USER" in client.capa()
    client.quit()


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"tls_ciphers": "NO-SUCH-CIPHER"}, ("tls_ciphers",)),
        ({"tls_min_version": "SSLv3"}, ("tls_min_version",)),
        ({"tls": "sometimes"}, ("tls",)),
        ({"plaintext_auth": "never"}, ("plaintext_auth",)),
    ],
)
def test_bad_tls_settings_name_the_key(env: Pop3Env, certs: Certs, settings: dict, names: tuple) -> None:
    tls_env(env, certs, **settings)
    expect_config_error(env, *names)


def test_tls_without_a_certificate_is_a_config_error(env: Pop3Env) -> None:
    env.write_config(tls="implicit")
    expect_config_error(env, "tls_cert")


def test_plaintext_auth_tls_without_tls_is_a_config_error(env: Pop3Env) -> None:
    env.write_config(plaintext_auth="tls")
    expect_config_error(env, "plaintext_auth")


def test_bad_certificate_stops_listen_mode_before_binding(env: Pop3Env, certs: Certs) -> None:
    certs.ca.issue_cert("other").private_key_pem.write_to_path(str(certs.key_file))
    tls_env(env, certs)
    proc = subprocess.run(env.command("--listen", "127.0.0.1:1"), capture_output=True, timeout=30)
    assert proc.returncode == 78
    assert b"tls_key" in proc.stderr and b"Traceback" not in proc.stderr


# ---------------------------------------------------------------- --listen and real clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listen(env: Pop3Env, certs: Certs) -> Iterator[Callable[..., int]]:
    """Start `pop3d --listen 127.0.0.1:PORT` with TLS settings; the port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**settings: object) -> int:
        tls_env(env, certs, **settings)
        port = free_port()
        proc = subprocess.Popen(
            env.command("--listen", f"127.0.0.1:{port}"),
            cwd=str(ROOT),
            env=child_env(),
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        assert wait_for(lambda: f"listening on 127.0.0.1:{port}" in env.log_text() or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return port

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        if proc.stderr:
            proc.stderr.close()
    no_traceback(env)


def test_poplib_stls_through_listen(env: Pop3Env, certs: Certs, listen) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    port = listen()
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.stls(context=certs.client_context())
    client.user("alice")
    client.pass_(PASSWORD)
    _, lines, _ = client.retr(1)
    assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[0])
    client.quit()
    assert wait_for(lambda: "logout: reason=quit" in env.log_text())
    assert "TLS: rip=127.0.0.1 TLSv1.3" in env.log_text()


def test_poplib_pop3_ssl_through_listen(env: Pop3Env, certs: Certs, listen) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    port = listen(tls="implicit")
    client = poplib.POP3_SSL("127.0.0.1", port, timeout=20, context=certs.client_context())
    assert "STLS" not in client.capa()
    client.user("alice")
    client.pass_(PASSWORD)
    _, lines, _ = client.retr(2)
    assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[1])
    client.quit()


def test_plaintext_on_loopback_through_listen(env: Pop3Env, certs: Certs, listen) -> None:
    port = listen(plaintext_on_loopback="yes")
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user("alice")
    client.pass_(PASSWORD)
    client.quit()


needs_curl = pytest.mark.skipif(
    not shutil.which("curl"), reason="curl is not installed (Debian package curl)"
)
needs_openssl = pytest.mark.skipif(
    not shutil.which("openssl"), reason="openssl is not installed (Debian package openssl)"
)
needs_mpop = pytest.mark.skipif(
    not shutil.which("mpop"), reason="mpop is not installed (Debian package mpop)"
)


def curl(certs: Certs, url: str, *extra: str) -> bytes:
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--cacert", str(certs.ca_file), *extra, url],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_curl
@pytest.mark.parametrize(
    ("mode", "scheme", "extra"), [("starttls", "pop3", "--ssl-reqd"), ("implicit", "pop3s", "")]
)
def test_curl(env: Pop3Env, certs: Certs, listen, mode: str, scheme: str, extra: str) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    port = listen(tls=mode)
    url = f"{scheme}://alice:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{port}/"
    options = [extra] if extra else []
    sizes = [int(line.split()[1]) for line in curl(certs, url, *options).splitlines()]
    assert len(sizes) == len(messages)
    got = curl(certs, url + "5", *options)
    assert got == wire_form(messages[4]) and len(got) == sizes[4]


@needs_openssl
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_openssl_s_client_reads_capa(env: Pop3Env, certs: Certs, listen, mode: str) -> None:
    port = listen(tls=mode)
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(certs.ca_file)]
    args += ["-verify_return_error", "-verify_ip", "127.0.0.1", "-crlf", "-ign_eof", "-nocommands"]
    if mode == "starttls":
        args += ["-starttls", "pop3"]
    proc = subprocess.run(args, input=b"CAPA\nQUIT\n", capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert b"Verify return code: 0 (ok)" in out
    capa = out.split(b"+OK Capability list follows\r\n", 1)[1].split(b"\r\n.\r\n", 1)[0].split(b"\r\n")
    assert b"USER" in capa and b"SASL PLAIN LOGIN" in capa and b"STLS" not in capa
    assert b"IMPLEMENTATION pop3d\r\n.\r\n+OK Bye.\r\n" in out


# Every CBC suite OpenSSL 3 has for TLS 1.2 with ECDHE, DHE or RSA key exchange (LUCKY13 and kin).
CBC_SUITES = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256:"
    "ECDHE-RSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES128-SHA:"
    "ECDHE-RSA-AES256-SHA:DHE-RSA-AES128-SHA256:DHE-RSA-AES256-SHA256:AES128-SHA256:AES256-SHA256:"
    "AES128-SHA:AES256-SHA"
)


AEAD_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
)


def s_client(certs: Certs, port: int, *options: str) -> tuple[bool, str]:
    """One implicit-TLS handshake by `openssl s_client` offering only what `options` say:
    (whether it completed and pop3d greeted, s_client's summary of the session)."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(certs.ca_file)]
    args += ["-verify_return_error", "-crlf", "-ign_eof", "-brief", *options]
    proc = subprocess.run(args, input=b"QUIT\n", capture_output=True, timeout=60)
    greeted = proc.returncode == 0 and b"+OK" in proc.stdout
    return greeted, proc.stderr.decode(errors="replace")


@needs_openssl
def test_tls12_offers_only_aead_forward_secret_suites_by_default(env: Pop3Env, certs: Certs, listen) -> None:
    """sslscan/testssl found CBC suites offered (issue 12): a client offering only those is refused,
    AEAD suites are accepted, TLS 1.3 is unaffected; tls_ciphers still chooses."""
    port = listen(tls="implicit")
    greeted, summary = s_client(certs, port, "-tls1_2", "-cipher", CBC_SUITES)
    assert not greeted and "handshake failure" in summary, summary
    refusal = "TLS handshake failed: rip=127.0.0.1: TLS error: NO_SHARED_CIPHER"
    assert wait_for(lambda: refusal in env.log_text())
    for suite in AEAD_SUITES:
        greeted, summary = s_client(certs, port, "-tls1_2", "-cipher", suite)
        assert greeted and "Protocol version: TLSv1.2" in summary, summary
        assert f"Ciphersuite: {suite}" in summary, summary
    greeted, summary = s_client(certs, port, "-tls1_3")
    assert greeted and "Protocol version: TLSv1.3" in summary, summary

    port = listen(tls="implicit", tls_ciphers="ECDHE-ECDSA-AES128-SHA256")  # the administrator's choice
    greeted, summary = s_client(certs, port, "-tls1_2", "-cipher", CBC_SUITES)
    assert greeted and "Ciphersuite: ECDHE-ECDSA-AES128-SHA256" in summary, summary


@needs_mpop
@pytest.mark.parametrize("starttls", ["on", "off"])
def test_mpop_retrieves_messages_intact(env: Pop3Env, certs: Certs, listen, starttls: str) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    port = listen(tls="starttls" if starttls == "on" else "implicit")
    delivered = env.base / "delivered.mbox"
    delivered.touch()
    rc = env.base / "mpoprc"
    rc.write_text(
        "defaults\n"
        "tls on\n"
        f"tls_starttls {starttls}\n"
        f"tls_trust_file {certs.ca_file}\n"
        f"uidls_file {env.base}/uidls\n"
        "received_header off\n"
        "keep on\n"
        f"delivery mbox {delivered}\n"
        "account test\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        "user alice\n"
        f'password "{PASSWORD}"\n'
    )
    rc.chmod(0o600)
    proc = subprocess.run(
        ["mpop", f"--file={rc}", "--quiet", "test"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "HOME": str(env.base), "TMPDIR": str(env.base)},
    )
    assert proc.returncode == 0, proc.stderr
    # Every unquoted "From " line starts a message (mboxrd); only its date is not ours to predict.
    got = re.sub(rb"(?m)^From MAILER-DAEMON .*$", b"From MAILER-DAEMON DATE", delivered.read_bytes())
    assert got == mpop_mbox(messages)
    assert wait_for(lambda: "logout: reason=quit" in env.log_text())


def mpop_mbox(messages: list[bytes]) -> bytes:
    """What mpop's mbox delivery writes for these messages, as our RETR sends them."""
    out = bytearray()
    for message in messages:
        text = wire_form(message).replace(b"\r\n", b"\n")
        lines = text.split(b"\n")[:-1]
        # mboxrd quoting: one more ">" before any ">*From " line.
        quoted = [b">" + line if line.lstrip(b">").startswith(b"From ") else line for line in lines]
        out += b"From MAILER-DAEMON DATE\n" + b"\n".join(quoted) + b"\n\n"
    return bytes(out)


# ---------------------------------------------------------------- start-up cost


@pytest.mark.parametrize("configured", [False, True])
def test_ssl_is_imported_only_when_tls_is_configured(env: Pop3Env, certs: Certs, configured: bool) -> None:
    if configured:
        tls_env(env, certs, plaintext_auth="yes")
    command_line = [env.command()[0], "-X", "importtime", *env.command()[1:]]
    proc = subprocess.run(
        command_line, input=b"CAPA\r\nQUIT\r\n", capture_output=True, timeout=30, env=child_env()
    )
    assert proc.returncode == 0 and proc.stdout.endswith(b"+OK Bye.\r\n")
    imported = {line.rsplit(b"|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert (b"ssl" in imported) is configured
    assert (b"pop3d.tls" in imported) is configured
