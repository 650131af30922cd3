"""pop3d's auth_http service for nginx's mail proxy (pop3d.authhttp): the answers nginx reads,
the map file, and the running service (bounded, unprivileged, never logging a password)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import IO_TIMEOUT, IS_ROOT, ROOT, child_env, wait_for
from serving import free_port, proc_status

from pop3d import authhttp

MAP = """\
# user  back end
alice   192.0.2.21:110
bob     [2001:db8::22]:1110   # IPv6
*       192.0.2.21:110
"""


def request(
    user: bytes, password: bytes = b"s3cret", protocol: bytes = b"pop3", method: bytes = b"plain"
) -> bytes:
    """A request as nginx (ngx_mail_auth_http_module) writes it."""
    return (
        b"GET /auth HTTP/1.0\r\nHost: localhost\r\nAuth-Method: " + method + b"\r\nAuth-User: " + user
        + b"\r\nAuth-Pass: " + password + b"\r\nAuth-Protocol: " + protocol
        + b"\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.99\r\nClient-Host: [UNAVAILABLE]\r\n\r\n"
    )  # fmt: skip


def answer(head: bytes, text: str = MAP, secret: bytes | None = None) -> tuple[bytes, str]:
    return authhttp.answer(authhttp.parse_map(text), authhttp.parse_head(head.split(b"\r\n\r\n")[0]), secret)


def test_a_known_user_goes_to_its_back_end() -> None:
    response, line = answer(request(b"alice"))
    assert response == (
        b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 192.0.2.21\r\nAuth-Port: 110\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert line == "user=alice rip=192.0.2.99: to 192.0.2.21:110"
    response, _ = answer(request(b"bob"))
    assert b"Auth-Server: 2001:db8::22\r\nAuth-Port: 1110\r\n" in response


def test_every_other_name_goes_to_the_default_back_end_which_answers_it() -> None:
    for name in (b"nobody-here", b"../etc", b"a%20b", b"x" * 200):
        response, _ = answer(request(name))
        assert b"Auth-Status: OK\r\nAuth-Server: 192.0.2.21\r\n" in response


def test_without_a_default_an_unknown_name_is_refused() -> None:
    response, line = answer(request(b"carol"), "alice 192.0.2.21:110\n")
    assert (
        response == b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\nContent-Length: 0\r\n\r\n"
    )
    assert line == "user=carol rip=192.0.2.99: no back end for this name"


def test_nginx_escapes_are_undone() -> None:
    assert authhttp.unescape(b"al%69ce") == b"alice"
    assert authhttp.unescape(b"a%20b%zz%4") == b"a b%zz%4"
    _, line = answer(request(b"%61lice"))
    assert line.startswith("user=alice ")


def test_only_pop3_with_a_password_is_served() -> None:
    for protocol, method in (
        (b"imap", b"plain"),
        (b"smtp", b"none"),
        (b"pop3", b"apop"),
        (b"pop3", b"cram-md5"),
    ):
        response, line = answer(request(b"alice", protocol=protocol, method=method))
        assert b"Auth-Status: Invalid login or password" in response
        assert "not served" in line


def test_a_malformed_request_is_a_temporary_failure() -> None:
    for head in (
        b"POST /auth HTTP/1.0\r\n\r\n",
        b"GET /auth\r\n\r\n",
        b"GET /auth HTTP/1.0\r\nno colon\r\n\r\n",
    ):
        response, line = answer(head)
        assert b"Auth-Status: Temporary server problem" in response
        assert line == "malformed request"


def test_the_shared_secret_is_required_when_configured() -> None:
    response, line = answer(request(b"alice"), secret=b"k3y")
    assert b"Auth-Status: Temporary server problem" in response and "shared secret" in line
    head = request(b"alice").replace(b"\r\n\r\n", b"\r\nX-Auth-Key: k3y\r\n\r\n")
    assert b"Auth-Status: OK" in answer(head, secret=b"k3y")[0]


def test_the_password_is_never_in_the_log_line() -> None:
    for name in (b"alice", b"carol", b"a\x00b"):
        for protocol in (b"pop3", b"imap"):
            _, line = answer(request(name, password=b"Sup3rSecret", protocol=protocol))
            assert "Sup3rSecret" not in line
    _, line = answer(request(b"alice\r\nX: \x1b[31m"))
    assert "\x1b" not in line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice\n", "expected `user address:port`"),
        ("alice 192.0.2.1\n", "not address:port"),
        ("alice mail.example.org:110\n", "not address:port"),
        ("alice 192.0.2.1:0\n", "not address:port"),
        ("alice [2001:db8::1]110\n", "not address:port"),
        ("alice 192.0.2.1:110\nalice 192.0.2.2:110\n", "listed twice"),
        ("* 192.0.2.1:110\n* 192.0.2.2:110\n", "a second `*` line"),
        ("../x 192.0.2.1:110\n", "not a name pop3d accepts"),
    ],
)
def test_a_bad_map_is_refused_with_its_line(text: str, message: str) -> None:
    with pytest.raises(authhttp.MapError, match=re.escape(message)) as raised:
        authhttp.parse_map(text, "backends")
    assert re.match(r"backends:\d+: ", str(raised.value))


# ------------------------------------------------------------------------------ the service


def ask(port: int, data: bytes) -> bytes:
    """Send a request, read the answer until the service closes (a reset counts as the close)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # a request cut short ends here, not at the service's timeout
            while chunk := sock.recv(4096):
                out += chunk
        except ConnectionResetError:
            pass
    return out


@pytest.fixture
def service():
    """The service on a loopback port; as root, started with --user nobody (the map and its
    directory readable by that account, as the docs ask)."""
    base = Path(tempfile.mkdtemp(prefix="pop3d-authhttp-"))
    base.chmod(0o755)
    mapfile = base / "backends"
    mapfile.write_text(MAP)
    mapfile.chmod(0o644)
    log = base / "authhttp.log"
    port = free_port()
    argv = [sys.executable, "-m", "pop3d.authhttp", "--listen", f"127.0.0.1:{port}", "--map", str(mapfile)]
    argv += ["--log", str(log)] + (["--user", "nobody"] if IS_ROOT else [])
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=child_env(), stderr=subprocess.PIPE)
    assert wait_for(lambda: proc.poll() is not None or (log.exists() and "listening" in log.read_text()))
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    yield port, mapfile, log, proc
    proc.kill()
    proc.wait(timeout=10)
    proc.stderr.close()
    shutil.rmtree(base, ignore_errors=True)


def test_the_service_answers_nginx_and_logs_no_password(service) -> None:
    port, _, log, proc = service
    assert b"Auth-Server: 192.0.2.21\r\nAuth-Port: 110" in ask(
        port, request(b"alice", password=b"Sup3rSecret")
    )
    text = log.read_text()
    assert "auth_http: user=alice rip=192.0.2.99: to 192.0.2.21:110" in text
    assert "Sup3rSecret" not in text
    if IS_ROOT:  # started as root with --user: it runs as that account, for good
        uid = str(pwd.getpwnam("nobody").pw_uid)
        assert proc_status(proc.pid)["Uid"].split() == [uid] * 4


def test_the_service_follows_the_map_file(service) -> None:
    port, mapfile, log, _ = service
    mapfile.write_text(MAP.replace("192.0.2.21:110\nbob", "192.0.2.31:110\nbob"))
    os.utime(mapfile, (time.time() + 5, time.time() + 5))  # a new mtime even within the same tick
    assert b"Auth-Server: 192.0.2.31\r\n" in ask(port, request(b"alice"))
    mapfile.write_text("broken line\n")
    os.utime(mapfile, (time.time() + 10, time.time() + 10))
    assert b"Auth-Server: 192.0.2.31\r\n" in ask(port, request(b"alice"))  # the last good map stays
    assert "keeping the previous map" in log.read_text()


def test_the_service_bounds_what_it_reads(service) -> None:
    port, _, log, _ = service
    assert ask(port, b"GET /auth HTTP/1.0\r\nX: " + b"a" * 10000 + b"\r\n\r\n") == b""
    assert ask(port, request(b"alice")[:40]) == b""  # cut short: closed, nothing answered
    assert "request too large, too slow or cut short" in log.read_text()
    assert b"Auth-Status: OK" in ask(port, request(b"alice"))  # and it still serves


def test_root_without_user_is_refused() -> None:
    if not IS_ROOT:
        pytest.skip("needs root: checks that the service refuses to keep root")
    proc = subprocess.run(
        [sys.executable, "-m", "pop3d.authhttp", "--listen", "127.0.0.1:1", "--map", "/nonexistent"],
        cwd=str(ROOT), env=child_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode != 0 and "refusing to run as root" in proc.stderr


def unit_command() -> list[str]:
    for line in (ROOT / "systemd" / "pop3d-authhttp.service").read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=").split()
    raise AssertionError("no ExecStart")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_shipped_unit_verifies(tmp_path) -> None:
    unit = tmp_path / "pop3d-authhttp.service"
    unit.write_text((ROOT / "systemd" / "pop3d-authhttp.service").read_text())
    env = dict(os.environ, MANPATH=str(ROOT / "man"), SYSTEMD_LOG_LEVEL="notice")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0 and not (done.stderr.strip() or done.stdout.strip()), (
        done.stderr + done.stdout
    )


def test_the_units_command_line_serves(tmp_path) -> None:
    """ExecStart as shipped, with only its interpreter, port, map and log pointed at the test's
    (under the unit it runs as a DynamicUser, never root: as root here, --user nobody)."""
    argv = unit_command()
    assert argv[:4] == ["/usr/bin/python3", "-I", "-m", "pop3d.authhttp"]
    port = free_port()
    (tmp_path / "backends").write_text(MAP)
    replace = {"127.0.0.1:9110": f"127.0.0.1:{port}", "/etc/pop3d/backends": str(tmp_path / "backends")}
    argv = [sys.executable, "-m", "pop3d.authhttp"] + [replace.get(a, a) for a in argv[4:]]
    argv[argv.index("syslog")] = str(tmp_path / "log")
    proc = subprocess.Popen(argv + (["--user", "nobody"] if IS_ROOT else []), cwd=str(ROOT), env=child_env())
    try:
        log = tmp_path / "log"
        assert wait_for(lambda: proc.poll() is not None or (log.exists() and "listening" in log.read_text()))
        assert b"Auth-Status: OK" in ask(port, request(b"alice"))
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=10)
