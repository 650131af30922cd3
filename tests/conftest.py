"""Shared fixtures: a private spool directory, htpasswd users, and pop3d run exactly as inetd runs it.

When the tests run as root (as in CI), sessions drop to `nobody` (the htpasswd `mail_user`), so
every file the server must touch is created owned by that account.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
RUN_AS = "nobody" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
PASSWORD = "s3cret pass"
IO_TIMEOUT = 20.0


def dotlock_content(pid: int) -> bytes:
    """What a dotlock pop3d takes on this host holds: `pid:host:boot id:pid namespace` and a
    newline (liblockfile reads the pid; to Dovecot the rest is not its host name)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()
    pidns = os.stat("/proc/self/ns/pid").st_ino
    return b"%d:%s:%s:%d\n" % (pid, os.uname().nodename.encode(), boot, pidns)


UNSHARE = shutil.which("unshare")
needs_pid_namespaces = pytest.mark.skipif(
    not IS_ROOT or UNSHARE is None, reason="needs root and unshare (util-linux): a pid namespace of its own"
)


def in_pid_namespace(script: str, *args: str, hostname: str | None = None) -> subprocess.Popen[bytes]:
    """`sh -c script sh args...` in a pid namespace of its own (and with `hostname`, in a UTS
    namespace with that host name), like an MDA in a container sharing the spool directory.
    Its pids there start after a number whose next pids run no process here, so that a pid it
    writes is certainly not a live process of this namespace. stdin and stdout are pipes."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    base = pid_max // 2
    while any(Path(f"/proc/{pid}").exists() for pid in range(base + 1, base + 17)):
        base += 17
    rename = f"hostname {hostname} && " if hostname else ""
    outer = f'{rename}echo {base} >/proc/sys/kernel/ns_last_pid && sh -c "$0" sh "$@"'
    namespaces = ["--pid", "--fork", "--mount-proc", *(["--uts"] if hostname else [])]
    return subprocess.Popen(
        [UNSHARE, *namespaces, "sh", "-c", outer, script, *args],  # type: ignore[list-item]
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
        env=child_env(),
    )


def mbox_bytes(messages: list[bytes], sender: bytes = b"MAILER-DAEMON") -> bytes:
    """An mbox as an MDA writes it: From_ line, the message, one blank separator line."""
    out = bytearray()
    for message in messages:
        # The From_ line depends only on the message, so a subset's mbox is a subset of the bytes.
        out += b"From %s Thu Nov 26 10:%02d:00 2026\n" % (sender, zlib.crc32(message) % 60)
        out += message
        if not message.endswith(b"\n"):
            out += b"\n"
        out += b"\n"
    return bytes(out)


def sample_messages() -> list[bytes]:
    return [
        b"From: a@example.org\nSubject: one\nMessage-ID: <1@x>\n\nHello.\n.leading dot\n..two\n",
        b"From: b@example.org\nSubject: two\n\n>From quoted\nFrom unquoted but not after blank\n",
        b"From: c@example.org\r\nSubject: crlf\r\n\r\nstored with CRLF\r\n.\r\n",
        b"From: d@example.org\nSubject: blank lines\n\nbody\n\n\n",
        b"From: e@example.org\nSubject: big\n\n" + b"".join(b"line %06d .\n" % i for i in range(20000)),
    ]


def wire_form(message: bytes) -> bytes:
    """What RETR must deliver for a stored message (before dot-stuffing): CRLF line ends."""
    out = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


class Pop3Env:
    """A spool directory, a password file and a configuration, owned as the server will need."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.spool_dir = base / "spool"
        self.spool_dir.mkdir()
        self.htpasswd = base / "htpasswd"
        self.log = base / "pop3d.log"
        self.conf = base / "pop3d.conf"
        self.users: dict[str, str] = {}
        self.settings: dict[str, object] = {
            "auth": "htpasswd",
            "htpasswd": str(self.htpasswd),
            "mailbox": f"{self.spool_dir}/%u",
            "index_dir": str(base / "index"),
            "log": str(self.log),
            "auth_failure_delay": 0,
            "lock_timeout": 1,
            "timeout": 30,
        }
        if IS_ROOT:
            self.settings["mail_user"] = RUN_AS
        self.account = pwd.getpwnam(RUN_AS)
        self._own(self.spool_dir)
        self.spool_dir.chmod(0o775)
        self.add_user("alice", PASSWORD)
        self.write_config()

    def _own(self, path: Path) -> None:
        if IS_ROOT:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def add_user(self, name: str, password: str) -> None:
        self.users[name] = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
        self.htpasswd.write_text("".join(f"{u}:{h}\n" for u, h in self.users.items()))

    def write_config(self, **overrides: object) -> Path:
        self.settings.update(overrides)
        lines = ["[pop3d]"] + [f"{k} = {v}" for k, v in self.settings.items() if v is not None]
        self.conf.write_text("\n".join(lines) + "\n")
        return self.conf

    def spool_path(self, user: str = "alice") -> Path:
        return self.spool_dir / user

    def write_spool(self, data: bytes, user: str = "alice") -> Path:
        path = self.spool_path(user)
        path.write_bytes(data)
        path.chmod(0o600)
        self._own(path)
        return path

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pop3d", "-c", str(self.conf), *extra]

    def start(self, *extra: str) -> tuple[socket.socket, subprocess.Popen[bytes]]:
        """pop3d on one end of a socketpair, as inetd starts it; our end is returned."""
        return self.spawn(self.command(*extra))

    def spawn(
        self, argv: list[str], pair: tuple[socket.socket, socket.socket] | None = None
    ) -> tuple[socket.socket, subprocess.Popen[bytes]]:
        """`argv` (pop3d, or something that execs it) on one end of a socketpair, as inetd does
        (or of `pair`, our end and its: a TCP connection, say); our end is returned."""
        ours, theirs = pair or socket.socketpair()
        proc = subprocess.Popen(
            argv,
            stdin=theirs,
            stdout=theirs,
            stderr=subprocess.PIPE,
            cwd=str(ROOT),
            env=child_env(),
        )
        theirs.close()
        ours.settimeout(IO_TIMEOUT)
        self._procs.append(proc)
        return ours, proc

    def client(self, *extra: str) -> SocketPOP3:
        sock, proc = self.start(*extra)
        client = SocketPOP3(sock)
        client.proc = proc
        return client

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    _procs: list[subprocess.Popen[bytes]]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


class SocketPOP3(poplib.POP3):
    """poplib on an already connected socket (the stdlib client, unmodified otherwise)."""

    proc: subprocess.Popen[bytes]

    def __init__(self, sock: socket.socket) -> None:
        self.host = "socketpair"
        self.port = 0
        self._tls_established = False
        self._debugging = 0
        self.sock = sock
        self.file = sock.makefile("rb")
        self.welcome = self._getresp()


@pytest.fixture
def env() -> Iterator[Pop3Env]:
    base = Path(tempfile.mkdtemp(prefix="pop3d-test-"))
    base.chmod(0o755)  # the session, running as RUN_AS, must reach the spool directory
    Pop3Env._procs = []
    environment = Pop3Env(base)
    yield environment
    for proc in Pop3Env._procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    if not os.environ.get("POP3D_KEEP_TEST_DIRS"):
        shutil.rmtree(base, ignore_errors=True)


def account_tool(*argv: str, stdin: str | None = None) -> None:
    """Run an account tool (useradd...); retry while another process holds the passwd/shadow lock."""
    for _ in range(50):
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            return
        if "lock" not in proc.stderr.lower():
            break
        time.sleep(0.1)
    raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def wait_for(predicate, timeout: float = IO_TIMEOUT, interval: float = 0.02) -> bool:
    """Poll for a condition the test cannot be told about (a process exit, a file appearing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def recv_until(sock: socket.socket, terminator: bytes, limit: int = 1 << 26) -> bytes:
    """Read from a raw socket until `terminator` ends the data (each read bounded by its timeout)."""
    data = b""
    while not data.endswith(terminator):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        assert len(data) < limit
    return data


BULK_NAMES = ("check_headers", "count_lf", "separators", "strip_volatile", "to_crlf", "to_wire")


@pytest.fixture(scope="module", params=["C", "Python"])
def bulk_impl(request) -> Iterator[str]:
    """Run a module's tests once with the C accelerator's byte loops and once with the Python ones.

    Without the built extension the C round skips (CI sets POP3D_REQUIRE_SPEEDUPS=1: it fails).
    """
    from pop3d import bulk

    if request.param == "C":
        try:
            from pop3d import _speedups
        except ImportError:
            if os.environ.get("POP3D_REQUIRE_SPEEDUPS") == "1":
                pytest.fail("pop3d._speedups is not built (POP3D_REQUIRE_SPEEDUPS=1)")
            pytest.skip("the C accelerator pop3d._speedups is not built (no C compiler at install)")
        chosen = {name: getattr(_speedups, name) for name in BULK_NAMES}
    else:
        chosen = {name: getattr(bulk, "py_" + name) for name in BULK_NAMES}
    saved = {name: getattr(bulk, name) for name in BULK_NAMES}
    for name, function in chosen.items():
        setattr(bulk, name, function)
    try:
        yield request.param
    finally:
        for name, function in saved.items():
            setattr(bulk, name, function)
