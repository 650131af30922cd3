"""Helpers for the tests of pop3d behind a proxy: PROXY protocol headers as proxies write them,
pop3d as inetd starts it on a real TCP connection, and private HAProxy and nginx instances
(their own configuration, pid and log files in the test's directory, loopback high ports, no
system service), the way docs/SCALING.md lays them out.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from conftest import IO_TIMEOUT, ROOT, Pop3Env, child_env, wait_for
from serving import free_port

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
)
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def v1(source: str, destination: str | None = None, sport: int = 40000, dport: int = 110) -> bytes:
    """A version 1 header (nginx `proxy_protocol on`, HAProxy `send-proxy`)."""
    family = "TCP6" if ":" in source else "TCP4"
    destination = destination or ("::1" if family == "TCP6" else "127.0.0.1")
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(command: int, family: int, body: bytes) -> bytes:
    """A version 2 header with this command (0 LOCAL, 1 PROXY), family/transport octet and block."""
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(source: str, sport: int = 40000, tlvs: bytes = b"") -> bytes:
    """A version 2 PROXY header for a TCP client (HAProxy `send-proxy-v2`)."""
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address("127.0.0.1" if src.version == 4 else "::1")
    family = 0x11 if src.version == 4 else 0x21
    return v2(1, family, src.packed + dst.packed + struct.pack("!HH", sport, 110) + tlvs)


V2_LOCAL = v2(0, 0x00, b"")  # what HAProxy's health checks send with send-proxy-v2


def connect(host: str, port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection from `source` (another loopback address stands for another client)."""
    sock = socket.create_connection((host, port), timeout=IO_TIMEOUT, source_address=(source, 0))
    sock.settimeout(IO_TIMEOUT)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset counts as the close)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def inetd_session(
    env: Pop3Env, proxy: str = "127.0.0.1", *extra: str
) -> tuple[socket.socket, subprocess.Popen]:
    """pop3d exactly as inetd starts it, with fd 0 and 1 a TCP connection whose peer is `proxy`
    (the address a proxy connects from): our end of it, and the process."""
    family = socket.AF_INET6 if ":" in proxy else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind((proxy, 0))
        listener.listen(1)
        ours = socket.create_connection(
            listener.getsockname()[:2], timeout=IO_TIMEOUT, source_address=(proxy, 0)
        )
        theirs, _ = listener.accept()
    return env.spawn(env.command(*extra), (ours, theirs))


class Daemon:
    """A foreground proxy process (HAProxy, nginx) and its output file; stopped at the end."""

    def __init__(self, argv: list[str], output: Path) -> None:
        self.output = output
        with open(output, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def haproxy_config(port: int, servers: list[tuple[str, int]], send_proxy: str = "send-proxy-v2") -> str:
    """The shipped proxy/haproxy.cfg, on 127.0.0.1:port, logging to its standard output, with these
    back ends (each `send_proxy`: "send-proxy" or "send-proxy-v2") and their health checks."""
    out = []
    for line in (ROOT / "proxy" / "haproxy.cfg").read_text().splitlines():
        if line.strip().startswith("server "):
            if not out[-1].strip().startswith("server "):
                out += [
                    f"    server pop{i} {host}:{p} {send_proxy} check inter 200ms"
                    for i, (host, p) in enumerate(servers, 1)
                ]
            continue
        out.append(
            line.replace("bind :110", f"bind 127.0.0.1:{port}").replace(
                "log /dev/log local0", "log stdout format raw local0 info"
            )
        )
    return "\n".join(out) + "\n"


def start_haproxy(
    directory: Path, servers: list[tuple[str, int]], send_proxy: str = "send-proxy-v2"
) -> tuple[Daemon, int]:
    """HAProxy (`haproxy -db`: foreground, no daemon) in TCP mode in front of `servers`, as
    docs/SCALING.md lays it out; returns it and its port once it accepts connections."""
    assert HAPROXY
    port = free_port()
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_config(port, servers, send_proxy))
    daemon = Daemon([HAPROXY, "-db", "-f", str(config)], directory / "haproxy.out")
    assert wait_for(lambda: daemon.proc.poll() is not None or listening("127.0.0.1", port)), daemon.text()
    assert daemon.proc.poll() is None, daemon.text()
    return daemon, port


def start_listener(env: Pop3Env, host: str, *extra: str) -> tuple[subprocess.Popen, int]:
    """`pop3d --listen host:port` with the test configuration; waits until it accepts."""
    port = free_port(host)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3d", "-c", str(env.conf), "--listen", f"{host}:{port}", *extra],
        cwd=str(ROOT),
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    env._procs.append(proc)
    assert wait_for(lambda: proc.poll() is not None or "listening on" in env.log_text()), env.log_text()
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc, port


def start_authhttp(directory: Path, routes: dict[str, tuple[str, int]]) -> tuple[subprocess.Popen, int, Path]:
    """pop3d's auth_http service with the shipped map file's layout (proxy/pop3d-backends): each
    user, and `*`, routed to the (host, port) given. As root it runs with --user nobody."""
    mapfile = directory / "backends"
    lines = [
        line for line in (ROOT / "proxy" / "pop3d-backends").read_text().splitlines() if line.startswith("#")
    ]
    lines += [f"{user} {host}:{port}" for user, (host, port) in routes.items()]
    mapfile.write_text("\n".join(lines) + "\n")
    mapfile.chmod(0o644)
    log = directory / "authhttp.log"
    port = free_port()
    argv = [sys.executable, "-m", "pop3d.authhttp", "--listen", f"127.0.0.1:{port}", "--map", str(mapfile)]
    argv += ["--log", str(log)] + (["--user", "nobody"] if os.geteuid() == 0 else [])
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=child_env(), stderr=subprocess.DEVNULL)
    assert wait_for(lambda: proc.poll() is not None or listening("127.0.0.1", port))
    assert proc.poll() is None, log.read_text() if log.exists() else ""
    return proc, port, log


def nginx_config(directory: Path, port: int, authhttp_port: int) -> str:
    """A private nginx: the shipped proxy/nginx-mail.conf on 127.0.0.1:port, asking the auth_http
    service on authhttp_port; its pid and logs in `directory`, the mail module loaded."""
    mail = (
        (ROOT / "proxy" / "nginx-mail.conf").read_text()
        .replace("auth_http 127.0.0.1:9110/auth;", f"auth_http 127.0.0.1:{authhttp_port}/auth;")
        .replace("listen 110;", f"listen 127.0.0.1:{port};")
    )  # fmt: skip
    return (
        f"load_module {NGINX_MAIL_MODULE};\n"
        f"pid {directory}/nginx.pid;\n"
        f"error_log {directory}/nginx-error.log info;\n"
        "events { worker_connections 64; }\n" + mail
    )


def start_nginx(directory: Path, authhttp_port: int) -> tuple[Daemon, int]:
    """nginx in the foreground (daemon off) with nginx_config; returns it once it greets."""
    assert NGINX
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(nginx_config(directory, port, authhttp_port))
    argv = [NGINX, "-p", str(directory), "-c", str(config), "-e", str(directory / "nginx-error.log")]
    daemon = Daemon([*argv, "-g", "daemon off;"], directory / "nginx.out")

    def greets() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                return s.recv(100).startswith(b"+OK")
        except OSError:
            return False

    assert wait_for(lambda: daemon.proc.poll() is not None or greets()), daemon.text()
    assert daemon.proc.poll() is None, daemon.text() + (directory / "nginx-error.log").read_text()
    return daemon, port
