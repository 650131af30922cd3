"""Helpers for tests that run pop3d behind a real launcher (inetd, xinetd, systemd-socket-activate,
the standalone server) on a loopback TCP port, and check what clients get.

The launchers are driven with the files the project ships (inetd/, xinetd/, systemd/), adapted
only where a test must: a free high port on 127.0.0.1, the test configuration, and a launcher
script that runs this checkout's pop3d the way the installed `pop3d` command does.
"""

from __future__ import annotations

import os
import poplib
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import IO_TIMEOUT, PASSWORD, ROOT, Pop3Env, mbox_bytes, wait_for, wire_form

SHIPPED_BINARY = "/usr/local/bin/pop3d"
SHIPPED_CONFIG = "/etc/pop3d.conf"

# xinetd conflicts with openbsd-inetd in Debian: CI unpacks its .deb here (see .ci/run).
XINETD_CANDIDATES = (
    os.environ.get("POP3D_XINETD", ""),
    "/opt/pop3d-ci/xinetd/usr/sbin/xinetd",
    shutil.which("xinetd") or "",
)


def xinetd_binary() -> str | None:
    for path in XINETD_CANDIDATES:
        if path and os.access(path, os.X_OK):
            return path
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, below Linux's ephemeral range (32768-60999), so that no
    outgoing connection of a parallel job takes it between our check and the launcher's bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


def greets(port: int, host: str = "127.0.0.1") -> bool:
    """A POP3 greeting comes from this port (each probe is one short session)."""
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            return s.recv(100).startswith(b"+OK")
    except OSError:
        return False


def greets_over_tls(context: ssl.SSLContext) -> Callable[[int, str], bool]:
    """A probe for implicit TLS: the handshake, then the greeting."""

    def probe(port: int, host: str = "127.0.0.1") -> bool:
        try:
            raw = socket.create_connection((host, port), timeout=5)
            with raw, context.wrap_socket(raw, server_hostname=host) as s:
                return s.recv(100).startswith(b"+OK")
        except OSError:  # ssl.SSLError included
            return False

    return probe


def write_launcher(directory: Path) -> Path:
    """An executable like the installed `pop3d` command (scripts/pop3d: `python -I`), importing
    pop3d from this checkout. inetd launders the environment, so nothing may come from there."""
    path = directory / "pop3d"
    path.write_text(
        f"#!{sys.executable} -I\n"
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pop3d.cli import main\n\n"
        "sys.exit(main())\n"
    )
    path.chmod(0o755)
    return path


class Launched:
    """A launcher process serving pop3d on `port`; stopped (and its output kept) at the end."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, output: Path) -> None:
        self.proc = proc
        self.port = port
        self.output = output

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=30)


def launch(
    command_for_port: Callable[[int], list[str]],
    output: Path,
    host: str = "127.0.0.1",
    attempts: int = 5,
    probe: Callable[[int, str], bool] = greets,
    **popen: object,
) -> Launched:
    """Start a launcher on a free port and wait for pop3d's greeting through it (`probe`); another
    port if the launcher dies or never answers (a parallel job may have taken the port meanwhile)."""
    last = ""
    for _ in range(attempts):
        port = free_port(host)
        with open(output, "ab") as out:
            proc = subprocess.Popen(command_for_port(port), stdout=out, stderr=subprocess.STDOUT, **popen)
        started = wait_for(
            lambda proc=proc, port=port: proc.poll() is not None or probe(port, host), timeout=20
        )
        if started and proc.poll() is None:
            return Launched(proc, port, output)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        last = output.read_text(errors="replace")[-2000:]
    raise AssertionError(f"the launcher never served pop3d: {command_for_port(0)}\n{last}")


# ------------------------------------------------------------------------------ shipped files


def shipped_inetd_line(service: str, commented: bool = False) -> list[str]:
    """The seven fields of the shipped inetd.conf line for `pop3` or `pop3s` (`commented`: of the
    line shipped commented out, the `wait` variant)."""
    for line in (ROOT / "inetd" / "pop3d.conf").read_text().splitlines():
        if commented:
            if not line.startswith("#" + service + "\t"):
                continue
            line = line[1:]
        fields = line.split(None, 6)
        if fields and fields[0] == service:
            return fields
    raise AssertionError(f"inetd/pop3d.conf has no {service} line")


def inetd_conf_line(service: str, port: int, launcher: Path, conf: Path, commented: bool = False) -> str:
    """The shipped line with a loopback port, the test launcher and the test configuration."""
    _, socktype, proto, wait, user, program, args = shipped_inetd_line(service, commented)
    assert program == SHIPPED_BINARY and SHIPPED_CONFIG in args, args
    args = args.replace(SHIPPED_CONFIG, str(conf))
    return f"127.0.0.1:{port}\t{socktype}\t{proto}\t{wait}\t{user}\t{launcher}\t{args}\n"


def xinetd_service(
    name: str, port: int, launcher: Path, conf: Path, log: Path, changed: dict[str, str] | None = None
) -> str:
    """The shipped xinetd service file, bound to 127.0.0.1:port (IPv4 only: no flags = IPv6),
    logging to a file; every limit and log_on_* setting as shipped, but those `changed` (the
    alternatives its comments describe)."""
    text = (ROOT / "xinetd" / name).read_text()
    out = []
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        key = key.strip()
        if not sep or line.lstrip().startswith("#"):
            out.append(line)
            if line.strip() == "{":
                out.append(f"\ttype = UNLISTED\n\tport = {port}\n\tbind = 127.0.0.1")
            continue
        if key == "server":
            assert value.strip() == SHIPPED_BINARY
            value = str(launcher)
        elif key == "server_args":
            assert SHIPPED_CONFIG in value
            value = value.replace(SHIPPED_CONFIG, str(conf))
        elif key == "log_type":
            value = f"FILE {log}"
        elif key == "flags":
            continue
        elif changed and key in changed:
            value = changed[key]
        out.append(f"\t{key} = {value.strip()}")
    return "defaults\n{\n}\n\n" + "\n".join(out) + "\n"


def unit_settings(name: str) -> dict[str, str]:
    """`Key=value` settings of a shipped unit file (the last one wins, as in systemd)."""
    settings = {}
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def unit_command(name: str, launcher: Path, conf: Path) -> list[str]:
    """What systemd would run for this unit: the ExecStart line with the test launcher and
    configuration, under the unit's NoNewPrivileges= and CapabilityBoundingSet= (through
    setpriv(1), as systemd applies them: for the exec'ed pop3d, as root)."""
    settings = unit_settings(name)
    argv = shlex.split(settings["ExecStart"].lstrip("-@:+!"))
    assert argv[0] == SHIPPED_BINARY
    argv = [str(launcher)] + [str(conf) if a == SHIPPED_CONFIG else a for a in argv[1:]]
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise AssertionError("setpriv (util-linux) is needed to apply the unit's hardening")
    caps = settings.get("CapabilityBoundingSet", "").split()
    bounding = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    wrapper = [setpriv, f"--bounding-set={bounding}", "--inh-caps=-all"]
    if settings.get("NoNewPrivileges") == "yes":
        wrapper.append("--no-new-privs")
    return [*wrapper, *argv]


def capability_mask(name: str) -> int:
    """The CapBnd value /proc shows for a process under the unit's CapabilityBoundingSet."""
    numbers = {
        "CAP_DAC_OVERRIDE": 1,
        "CAP_DAC_READ_SEARCH": 2,
        "CAP_KILL": 5,
        "CAP_SETGID": 6,
        "CAP_SETUID": 7,
        "CAP_SYS_CHROOT": 18,
        "CAP_AUDIT_WRITE": 29,
    }
    mask = 0
    for cap in unit_settings(name).get("CapabilityBoundingSet", "").split():
        mask |= 1 << numbers[cap]
    return mask


# ------------------------------------------------------------------------------ checks


def proc_status(pid: int) -> dict[str, str]:
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return status


def session_pid(env: Pop3Env, user: str) -> int:
    """The pid of the latest session logged in as `user`, from its log line."""
    pids = re.findall(rf"pop3d\[(\d+)\]: login: user={re.escape(user)} ", env.log_text())
    assert pids, env.log_text()
    return int(pids[-1])


def poplib_round(
    env: Pop3Env,
    port: int,
    messages: list[bytes],
    host: str = "127.0.0.1",
    check_process: Callable[[int], None] | None = None,
) -> None:
    """poplib logs in, lists, retrieves every message byte-identical, deletes the first, quits:
    the spool then holds exactly the other messages, byte for byte."""
    env.write_spool(mbox_bytes(messages))
    client = poplib.POP3(host, port, timeout=IO_TIMEOUT)
    assert client.getwelcome().startswith(b"+OK")
    client.user("alice")
    client.pass_(PASSWORD)
    if check_process is not None:
        check_process(session_pid(env, "alice"))
    count, total = client.stat()
    assert count == len(messages)
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    assert sum(sizes) == total
    for number, message in enumerate(messages, 1):
        lines = client.retr(number)[1]
        received = b"".join(line + b"\r\n" for line in lines)
        assert received == wire_form(message)
        assert len(received) == sizes[number - 1]
    assert client.dele(1).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    assert wait_for(lambda: env.spool_path().read_bytes() == mbox_bytes(messages[1:]))


def curl_round(env: Pop3Env, port: int, messages: list[bytes], host: str = "127.0.0.1") -> None:
    """curl lists, retrieves a message (CRLF as on the wire, dots un-stuffed) and deletes one."""
    env.write_spool(mbox_bytes(messages))
    netloc = f"[{host}]" if ":" in host else host
    url = f"pop3://alice:{PASSWORD.replace(' ', '%20')}@{netloc}:{port}/"

    def curl(*args: str) -> bytes:
        done = subprocess.run(["curl", "-sS", "--max-time", "60", *args], capture_output=True, timeout=90)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = curl(url)
    assert [int(line.split()[0]) for line in listed.splitlines()] == list(range(1, len(messages) + 1))
    sizes = [int(line.split()[1]) for line in listed.splitlines()]
    for number in (1, len(messages)):
        got = curl(url + str(number))
        assert got == wire_form(messages[number - 1])
        assert len(got) == sizes[number - 1]
    curl("-X", "DELE", "-I", url + "1")
    assert wait_for(lambda: env.spool_path().read_bytes() == mbox_bytes(messages[1:]))


def children(pid: int) -> list[int]:
    """The child processes of `pid`, zombies included (not yet reaped: still counted)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except FileNotFoundError:
        return []


def no_sessions_running(launched: Launched) -> bool:
    """The standalone server has reaped every session (the start-up probe's included): what its
    max_sessions counters see."""
    return wait_for(lambda: children(launched.proc.pid) == [])


def pop3d_processes(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def listening_inode(port: int) -> str:
    """The inode of the IPv4 socket listening on 127.0.0.1:port (/proc/net/tcp, state 0A)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def holds_no_listening_socket(port: int) -> Callable[[int], None]:
    """A check for a session process: its fds 0, 1 and 2 are /dev/null and none of its
    descriptors is the service's listening socket (the session runs as a user)."""
    inode = listening_inode(port)

    def check(pid: int) -> None:
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert f"socket:[{inode}]" not in held, held

    return check
