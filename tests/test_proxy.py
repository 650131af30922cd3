"""pop3d behind a proxy (`proxy_from`): the PROXY header read before the greeting and the client
it names used everywhere; headers from anyone else are bad commands; real HAProxy in front.

The connections are real TCP connections on loopback: the "proxy" connects from 127.0.0.1 and
the clients it stands for are other addresses (192.0.2.x in a hand-written header, 127.0.0.2 and
127.0.0.3 through a real HAProxy), so the address a session uses shows which one it took.
"""

from __future__ import annotations

import grp
import os
import poplib
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    PASSWORD,
    ROOT,
    Pop3Env,
    SocketPOP3,
    mbox_bytes,
    sample_messages,
    wait_for,
    wire_form,
)
from proxying import (
    HAPROXY,
    NGINX,
    NGINX_MAIL_MODULE,
    V2_LOCAL,
    Daemon,
    connect,
    inetd_session,
    read_all,
    start_authhttp,
    start_haproxy,
    start_listener,
    start_nginx,
    v1,
    v2,
    v2_inet,
)
from serving import inetd_conf_line, launch, unit_command, write_launcher
from test_launchers import INETD, SSA, XINETD, start_xinetd
from test_system import Account, account  # noqa: F401  (the fixture: a real account)

from pop3d import config as cfg

GREETING = b"+OK POP3 server ready\r\n"
BUSY = b"-ERR [SYS/TEMP] Too many sessions from your address; try again later.\r\n"
PAM_EXEC = Path("/usr/lib/x86_64-linux-gnu/security/pam_exec.so")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)"
)


@pytest.fixture
def proxied(env: Pop3Env) -> Pop3Env:
    """A configuration that trusts 127.0.0.1 (and a network around it) to send PROXY headers."""
    env.write_config(proxy_from="10.9.0.0/16, 127.0.0.1 ::1", proxy_timeout=2)
    env.write_spool(mbox_bytes(sample_messages()[:2]))
    return env


def login_lines(env: Pop3Env) -> list[str]:
    return re.findall(r"login: user=alice rip=(\S+) ", env.log_text())


# ------------------------------------------------------------------------------ configuration


def test_proxy_from_takes_addresses_and_networks() -> None:
    conf = cfg.load(
        ["--proxy-from", "192.0.2.1, 10.0.0.0/8 2001:db8::/32,::1", "--htpasswd", "/x", "--auth", "htpasswd"]
    )
    assert conf.proxy_from == (
        (bytes([192, 0, 2, 1]), 32),
        (bytes([10, 0, 0, 0]), 8),
        (bytes.fromhex("20010db8") + bytes(12), 32),
        (bytes(15) + b"\1", 128),
    )
    assert cfg.load([]).proxy_from == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.1/8", "host bits set"),
        ("192.0.2.1/33", "prefix length must be 0..32"),
        ("2001:db8::/129", "prefix length must be 0..128"),
        ("192.0.2.1/x", "prefix length"),
        ("proxy.example.org", "not an IP address"),
        ("192.0.2.256", "not an IP address"),
    ],
)
def test_proxy_from_refuses_what_would_trust_the_wrong_hosts(value: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(["--proxy-from", value])


# ------------------------------------------------------------------------------ inetd mode


def test_the_client_named_by_the_header_is_the_sessions_client(proxied: Pop3Env) -> None:
    sock, proc = inetd_session(proxied)
    # The header and the client's first commands in one segment, as a proxy relays them: pop3d
    # reads exactly the header, and the commands stay the session's.
    sock.sendall(v1("192.0.2.7") + b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nQUIT\r\n")
    reply = read_all(sock)
    assert reply.startswith(GREETING), reply
    assert b"+OK 2 " in reply and reply.endswith(b"+OK Bye; 2 messages left.\r\n"), reply
    assert proc.wait(timeout=20) == 0
    assert login_lines(proxied) == ["192.0.2.7"]
    assert "rip=192.0.2.7: logout: reason=quit" in proxied.log_text()
    assert "127.0.0.1" not in proxied.log_text()


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (v2_inet("192.0.2.8"), "192.0.2.8"),
        (v2_inet("2001:db8::8", tlvs=b"\x05\x00\x04abcd"), "2001:db8::8"),
        (v1("2001:DB8:0:0:0:0:0:9", "::1"), "2001:db8::9"),
        (v2_inet("::ffff:192.0.2.10"), "192.0.2.10"),
    ],
)
def test_version_2_and_ipv6_clients(proxied: Pop3Env, header: bytes, client: str) -> None:
    sock, proc = inetd_session(proxied)
    sock.sendall(header + b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nQUIT\r\n")
    assert read_all(sock).startswith(GREETING)
    assert proc.wait(timeout=20) == 0
    assert login_lines(proxied) == [client]


def test_a_proxy_on_ipv6(proxied: Pop3Env) -> None:
    """A proxy connecting over IPv6 (::1 in proxy_from), relaying an IPv4 client, then a loopback
    one (local for plaintext_on_loopback: the proxy is on this host too)."""
    proxied.write_config(plaintext_auth="tls", plaintext_on_loopback="yes")
    for client, reply in (("192.0.2.13", b"-ERR [AUTH]"), ("::1", b"+OK")):
        sock, proc = inetd_session(proxied, "::1")
        sock.sendall(v1(client) + b"USER alice\r\nQUIT\r\n")
        assert read_all(sock).split(b"\r\n")[1].startswith(reply)
        assert proc.wait(timeout=20) == 0
    assert "rip=192.0.2.13 " in proxied.log_text() and "rip=::1 " in proxied.log_text()


def test_a_header_arriving_in_pieces_is_waited_for(proxied: Pop3Env) -> None:
    sock, proc = inetd_session(proxied)
    header = v2_inet("192.0.2.11")
    for piece in (header[:5], header[5:16], header[16:20], header[20:]):
        sock.sendall(piece)
        time.sleep(0.05)  # separate segments on purpose (nothing is synchronised on this pause)
    assert sock.recv(100) == GREETING
    sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nQUIT\r\n")
    read_all(sock)
    assert proc.wait(timeout=20) == 0
    assert login_lines(proxied) == ["192.0.2.11"]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"PROXY TCP4 192.0.2.07 127.0.0.1 1 110\r\nUSER alice\r\n", "malformed address"),
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 1 110\nUSER alice\r\n", "control or 8-bit octet"),
        (b"USER alice\r\n", "not a PROXY protocol header"),
        (b"PROXY " + b"9" * 120, "without CRLF in 107 octets"),
        (v2(1, 0x11, bytes(5000)), "header of 5016 octets"),
        (V2_LOCAL[:12] + b"\x22\x00\x00\x00", "unknown version 2 command"),
        (v1("192.0.2.7")[:20], "closed before a complete header"),
    ],
    ids=["leading-zero", "bare-lf", "no-header", "oversized-v1", "oversized-v2", "bad-command", "truncated"],
)
def test_a_bad_header_ends_the_connection_with_nothing_sent(proxied: Pop3Env, data: bytes, why: str) -> None:
    sock, proc = inetd_session(proxied)
    sock.sendall(data)
    if why.startswith("closed"):
        sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == b""
    assert proc.wait(timeout=20) == 0
    log = proxied.log_text()
    assert "PROXY header from 127.0.0.1: " in log and why in log, log
    assert "login" not in log


def test_a_slow_header_ends_the_connection_at_proxy_timeout(proxied: Pop3Env) -> None:
    proxied.write_config(proxy_timeout=0.5)
    sock, proc = inetd_session(proxied)
    sock.sendall(v1("192.0.2.7")[:10])  # and nothing more
    assert read_all(sock) == b""
    assert proc.wait(timeout=20) == 0
    assert "PROXY header from 127.0.0.1: no complete header within 0.5 s" in proxied.log_text()


def test_a_local_header_is_the_proxy_itself_checking_health(proxied: Pop3Env) -> None:
    sock, proc = inetd_session(proxied)
    sock.sendall(V2_LOCAL + b"QUIT\r\n")
    assert read_all(sock) == GREETING + b"+OK Bye.\r\n"
    assert proc.wait(timeout=20) == 0
    assert "disconnected before login: rip=127.0.0.1 reason=quit" in proxied.log_text()


def test_a_header_from_a_peer_not_in_proxy_from_changes_nothing(proxied: Pop3Env) -> None:
    proxied.write_config(proxy_from="10.9.0.0/16")  # 127.0.0.1 is not a proxy now
    sock, proc = inetd_session(proxied)
    assert sock.recv(100) == GREETING  # no header awaited: the greeting comes at once
    sock.sendall(v1("192.0.2.66") + b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nQUIT\r\n")
    reply = read_all(sock)
    assert reply.startswith(b"-ERR Unknown command.\r\n+OK"), reply
    assert proc.wait(timeout=20) == 0
    assert login_lines(proxied) == ["127.0.0.1"]
    assert "192.0.2.66" not in proxied.log_text()


def test_a_version_2_header_from_anyone_else_is_bad_commands_then_its_quit(proxied: Pop3Env) -> None:
    proxied.write_config(proxy_from="")
    sock, proc = inetd_session(proxied)
    sock.sendall(v2_inet("192.0.2.66") + b"USER alice\r\n")
    reply = read_all(sock)
    # The signature's own lines: two empty lines and a NUL are bad commands, "QUIT" ends it.
    assert reply.startswith(GREETING + b"-ERR Unknown command.\r\n" * 3 + b"+OK Bye.\r\n"), reply
    assert proc.wait(timeout=20) == 0
    assert "192.0.2.66" not in proxied.log_text()


@pytest.mark.parametrize(
    ("client", "allowed"), [("192.0.2.7", False), ("127.0.0.5", True), ("10.9.0.1", False)]
)
def test_plaintext_on_loopback_judges_the_proxied_client(
    proxied: Pop3Env, client: str, allowed: bool
) -> None:
    proxied.write_config(plaintext_auth="tls", plaintext_on_loopback="yes")
    sock, proc = inetd_session(proxied)
    sock.sendall(v1(client) + b"USER alice\r\nQUIT\r\n")
    reply = read_all(sock)
    expected = b"+OK" if allowed else b"-ERR [AUTH] Plaintext authentication is disallowed"
    assert reply.split(b"\r\n")[1].startswith(expected), reply
    assert proc.wait(timeout=20) == 0


def test_implicit_tls_starts_right_after_the_header(proxied: Pop3Env, tmp_path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    proxied.write_config(tls="implicit", tls_cert=str(tmp_path / "cert.pem"))
    sock, proc = inetd_session(proxied)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    # The header and the ClientHello in one segment: the ClientHello must reach the handshake.
    sock.sendall(v2_inet("192.0.2.12") + outgoing.read())
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    if outgoing.pending:
        sock.sendall(outgoing.read())

    def exchange(command: bytes) -> bytes:
        if command:
            tls.write(command)
            sock.sendall(outgoing.read())
        while True:
            try:
                return tls.read(65536)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))

    assert exchange(b"") == GREETING
    assert exchange(b"USER alice\r\n").startswith(b"+OK")
    assert exchange(b"PASS " + PASSWORD.encode() + b"\r\n").startswith(b"+OK Logged in")
    assert exchange(b"QUIT\r\n").startswith(b"+OK Bye")
    sock.close()
    assert proc.wait(timeout=20) == 0
    log = proxied.log_text()
    assert "TLS: rip=192.0.2.12 TLSv1.3" in log
    assert login_lines(proxied) == ["192.0.2.12"]


# ------------------------------------------------------------------------------ standalone


def open_session(port: int, header: bytes) -> socket.socket:
    sock = connect("127.0.0.1", port)
    sock.sendall(header)
    return sock


def test_max_sessions_per_ip_counts_the_clients_behind_the_proxy(proxied: Pop3Env) -> None:
    proxied.write_config(max_sessions_per_ip=2)
    _, port = start_listener(proxied, "127.0.0.1")
    held = [open_session(port, v1("192.0.2.1")) for _ in range(2)]
    held += [open_session(port, v2_inet("192.0.2.2")) for _ in range(2)]
    for sock in held:
        assert sock.recv(100) == GREETING  # four sessions from one proxy: two clients, two each
    third = open_session(port, v1("192.0.2.1"))
    assert read_all(third) == BUSY
    assert "refusing 192.0.2.1: max_sessions_per_ip reached" in proxied.log_text()
    # IPv6 clients behind the proxy count per /64, as direct ones do.
    ipv6 = [open_session(port, v2_inet(f"2001:db8:0:7::{n}")) for n in (1, 2)]
    for sock in ipv6:
        assert sock.recv(100) == GREETING
    assert read_all(open_session(port, v1("2001:db8:0:7::3"))) == BUSY
    assert "refusing 2001:db8:0:7::/64: max_sessions_per_ip reached" in proxied.log_text()
    assert open_session(port, v1("2001:db8:0:8::1")).recv(100) == GREETING
    held[0].close()  # one of 192.0.2.1's sessions ends: the next one is admitted
    assert wait_for(lambda: open_session(port, v1("192.0.2.1")).recv(100) == GREETING)
    for sock in held[1:]:
        sock.close()


# ------------------------------------------------------------------------------ real HAProxy


def pop3_round(sock: socket.socket) -> None:
    """poplib, on a connection made through the proxy, logs in, lists and quits."""
    client = SocketPOP3(sock)
    client.user("alice")
    assert client.pass_(PASSWORD).startswith(b"+OK Logged in")
    assert client.stat()[0] == 2
    assert client.quit().startswith(b"+OK")


CHECKED = "disconnected before login: rip=127.0.0.1 reason=quit"


def health_checks_pass(env: Pop3Env, haproxy: Daemon, before: int) -> None:
    """HAProxy's health checks (a LOCAL header with send-proxy-v2, a header naming HAProxy itself
    with send-proxy) got the greeting and QUIT's answer, twice since `before` such lines: sessions
    of the proxy itself; and HAProxy never marked the back end down."""
    assert wait_for(lambda: env.log_text().count(CHECKED) >= before + 2), env.log_text()
    assert "DOWN" not in haproxy.text(), haproxy.text()


@needs_haproxy
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_listen(proxied: Pop3Env, tmp_path, send_proxy: str) -> None:
    """The issue's measurement, reversed: behind HAProxy the third session from a *different*
    client is admitted, and one too many from the same client is refused, by its address."""
    proxied.write_config(max_sessions_per_ip=2)
    _, backend = start_listener(proxied, "127.0.0.1")
    before = proxied.log_text().count(CHECKED)
    haproxy, port = start_haproxy(tmp_path, [("127.0.0.1", backend)], send_proxy)
    try:
        first = [connect("127.0.0.1", port, source="127.0.0.2") for _ in range(2)]
        for sock in first:
            assert sock.recv(100) == GREETING
        other = connect("127.0.0.1", port, source="127.0.0.3")
        pop3_round(other)
        assert read_all(connect("127.0.0.1", port, source="127.0.0.2")) == BUSY
        health_checks_pass(proxied, haproxy, before)
        for sock in first:
            sock.close()
    finally:
        haproxy.stop()
    log = proxied.log_text()
    assert login_lines(proxied) == ["127.0.0.3"]
    assert "refusing 127.0.0.2: max_sessions_per_ip reached" in log
    assert "refusing 127.0.0.3" not in log


def start_launcher(env: Pop3Env, kind: str):
    """pop3d behind a real launcher, as the shipped files configure it, on a loopback port that
    serves proxies only (the probe sends a LOCAL header first)."""
    launcher = write_launcher(env.base)
    probe = greets_after(V2_LOCAL)
    if kind == "inetd":
        conf = env.base / "inetd.conf"

        def command(port: int) -> list[str]:
            conf.write_text(inetd_conf_line("pop3", port, launcher, env.conf))
            return [INETD, "-d", str(conf)]

        return launch(command, env.base / "inetd.out", probe=probe)
    if kind == "xinetd":
        return start_xinetd(env, probe=probe)
    unit = "pop3d@.service" if kind == "systemd-accept-yes" else "pop3d-listen.service"
    mode = ["--inetd", "-a"] if kind == "systemd-accept-yes" else []
    command = unit_command(unit, launcher, env.conf)
    return launch(
        lambda port: [SSA, *mode, "-l", f"127.0.0.1:{port}", *command], env.base / "ssa.out", probe=probe
    )


LAUNCHERS = {"inetd": INETD, "xinetd": XINETD, "systemd-accept-yes": SSA, "systemd-accept-no": SSA}


@needs_haproxy
@pytest.mark.skipif(
    not IS_ROOT, reason="needs root: the launchers run pop3d as the shipped files' user (root)"
)
@pytest.mark.parametrize(
    ("kind", "send_proxy"),
    [("inetd", "send-proxy"), *((kind, "send-proxy-v2") for kind in LAUNCHERS)],
)
def test_haproxy_in_front_of_each_launcher(proxied: Pop3Env, tmp_path, kind: str, send_proxy: str) -> None:
    """openbsd-inetd, xinetd and the systemd units (Accept=yes: the connection on fd 0 whose peer
    is HAProxy; Accept=no: the listener) with the shipped files, HAProxy in front."""
    if LAUNCHERS[kind] is None:
        pytest.skip(f"{kind}: its launcher is not installed")
    served = start_launcher(proxied, kind)
    before = proxied.log_text().count(CHECKED)  # the launcher's probes end the same way
    haproxy, port = start_haproxy(tmp_path, [("127.0.0.1", served.port)], send_proxy)
    try:
        pop3_round(connect("127.0.0.1", port, source="127.0.0.2"))
        health_checks_pass(proxied, haproxy, before)
    finally:
        haproxy.stop()
        served.stop()
    assert login_lines(proxied) == ["127.0.0.2"]


def greets_after(header: bytes):
    """A launcher probe for a port that serves proxies only: the header, then the greeting."""

    def probe(port: int, host: str = "127.0.0.1") -> bool:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(header + b"QUIT\r\n")
                return s.recv(100).startswith(b"+OK")
        except OSError:
            return False

    return probe


# ------------------------------------------------------------------------------ PAM_RHOST


@pytest.mark.skipif(not IS_ROOT, reason="needs root: a real account and a PAM service file")
@pytest.mark.skipif(not shutil.which("useradd"), reason="needs useradd (Debian package passwd)")
@pytest.mark.skipif(not PAM_EXEC.exists(), reason="needs pam_exec (Debian package libpam-modules)")
def test_pam_sees_the_proxied_client_as_rhost(proxied: Pop3Env, account: Account) -> None:  # noqa: F811
    """PAM's PAM_RHOST is the client the header names: a pam_exec rule records what PAM saw."""
    seen = proxied.base / "pam-saw"
    script = proxied.base / "rhost.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE user=$PAM_USER rhost=$PAM_RHOST" >> {seen}\n')
    script.chmod(0o755)
    service = f"p3t_{secrets.token_hex(4)}"
    path = Path("/etc/pam.d") / service
    path.write_text(
        f"auth optional pam_exec.so quiet {script}\naccount optional pam_exec.so quiet {script}\n"
        + (ROOT / "pam.d" / "pop3d").read_text()
    )
    try:
        os.chown(proxied.spool_dir, 0, grp.getgrnam("mail").gr_gid)
        proxied.spool_dir.chmod(0o2775)
        proxied.write_config(auth="system", htpasswd=None, mail_user=None, pam_service=service)
        sock, proc = inetd_session(proxied)
        sock.sendall(v2_inet("192.0.2.44"))
        assert sock.recv(100) == GREETING
        sock.sendall(f"USER {account.name}\r\nPASS {account.password}\r\nQUIT\r\n".encode())
        reply = read_all(sock)
        assert b"+OK Logged in" in reply, reply
        assert proc.wait(timeout=20) == 0
    finally:
        path.unlink(missing_ok=True)
    assert seen.read_text().splitlines() == [
        f"auth user={account.name} rhost=192.0.2.44",
        f"account user={account.name} rhost=192.0.2.44",
    ]
    assert f"login: user={account.name} rip=192.0.2.44 " in proxied.log_text()


# ------------------------------------------------------------------------------ nginx, per user

needs_nginx = pytest.mark.skipif(
    NGINX is None or not Path(NGINX_MAIL_MODULE).exists(),
    reason="nginx with its mail module is not installed (Debian packages nginx, libnginx-mod-mail)",
)


@needs_nginx
def test_nginx_sends_each_user_to_the_back_end_holding_their_maildrop(env: Pop3Env) -> None:
    """Two back ends (separate pop3d instances, separate spool directories, 127.0.0.3 and
    127.0.0.4) behind nginx's mail proxy and pop3d's auth_http service; clients on 127.0.0.2."""
    other = Pop3Env(Path(tempfile.mkdtemp(prefix="pop3d-test-")))
    other.base.chmod(0o755)
    try:
        other.add_user("bob", PASSWORD)
        alice_mail, bob_mail = sample_messages()[:2], sample_messages()[2:3]
        env.write_spool(mbox_bytes(alice_mail))
        other.write_spool(mbox_bytes(bob_mail), user="bob")
        other.write_spool(mbox_bytes(sample_messages()[3:4]))  # an alice on B too: never reached
        for backend in (env, other):
            # nginx has the password checked by the back end: plaintext from nginx (its clients
            # may still use TLS with nginx itself).
            backend.write_config(proxy_from="127.0.0.1", plaintext_auth="yes")
        _, port_a = start_listener(env, "127.0.0.3")
        _, port_b = start_listener(other, "127.0.0.4")
        authhttp, authhttp_port, authhttp_log = start_authhttp(
            env.base,
            {"alice": ("127.0.0.3", port_a), "bob": ("127.0.0.4", port_b), "*": ("127.0.0.3", port_a)},
        )
        nginx, port = start_nginx(env.base, authhttp_port)
        try:
            for user, mail in (("alice", alice_mail), ("bob", bob_mail)):
                client = SocketPOP3(connect("127.0.0.1", port, source="127.0.0.2"))
                client.user(user)
                assert client.pass_(PASSWORD).startswith(b"+OK Logged in")
                assert client.stat()[0] == len(mail)
                lines = client.retr(1)[1]
                assert b"".join(line + b"\r\n" for line in lines) == wire_form(mail[0])
                client.dele(1)
                assert client.quit().startswith(b"+OK")
            for user, password in (("alice", "wrong"), ("carol", PASSWORD)):
                client = SocketPOP3(connect("127.0.0.1", port, source="127.0.0.2"))
                client.user(user)
                with pytest.raises(poplib.error_proto) as failed:
                    client.pass_(password)
                assert failed.value.args[0] == b"-ERR [AUTH] Authentication failed."
                client.close()
        finally:
            nginx.stop()
            authhttp.kill()
            authhttp.wait(timeout=10)
        assert wait_for(lambda: env.spool_path().read_bytes() == mbox_bytes(alice_mail[1:]))
        assert wait_for(lambda: other.spool_path("bob").read_bytes() == b"")
        assert other.spool_path().read_bytes() == mbox_bytes(sample_messages()[3:4])
        assert "login: user=alice rip=127.0.0.2 " in env.log_text()
        assert "login failed: user=alice rip=127.0.0.2" in env.log_text()
        assert "login failed: user=carol rip=127.0.0.2" in env.log_text()
        assert "login: user=bob rip=127.0.0.2 " in other.log_text()
        assert "rip=127.0.0.1" not in env.log_text() + other.log_text()
        routed = authhttp_log.read_text()
        assert f"user=bob rip=127.0.0.2: to 127.0.0.4:{port_b}" in routed
        assert PASSWORD not in routed and "wrong" not in routed
    finally:
        shutil.rmtree(other.base, ignore_errors=True)
