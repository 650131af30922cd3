"""What every server has in common: a loopback port, a launcher, its session processes.

A `Server` is one POP3 implementation (or the floor) listening on loopback with a process per
connection. The run knows a server only through this class: its port, the spool path it serves,
`forget()` before a replaced spool, `settle()` after a session, and `session_pid()` for the
session's peak RSS and CPU time (`proc_usage`).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.servers.accounts import PASSWORD, USER

CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def inetd_launcher() -> str:
    for tool in ("tcpserver", "socat"):
        if shutil.which(tool):
            return tool
    return ""


def inetd_command(tool: str, port: int, argv: list[str]) -> list[str]:
    """Listen on loopback and exec `argv` per connection with the socket as fd 0 and 1."""
    if tool == "tcpserver":
        return ["tcpserver", "-R", "-H", "-l", "localhost", "-c", "64", "127.0.0.1", str(port), *argv]
    return [
        "socat",
        f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=128",
        "EXEC:" + " ".join(shlex.quote(a) for a in argv) + ",nofork",
    ]


class Server:
    """One POP3 implementation (or the floor) listening on loopback, a process per connection."""

    name = ""
    port = 0
    proc: subprocess.Popen[bytes] | None = None
    user = USER
    password = PASSWORD
    exact_spool = True  # the update leaves exactly the kept messages' bytes (Dovecot adds headers)
    indexes = False  # its first login to a new spool builds an index: the run reports that apart

    def spool_path(self) -> Path:
        raise NotImplementedError

    def spool_for(self, user: str) -> Path:
        """The spool of another account of the server (concurrent clients have one each)."""
        return self.spool_path().with_name(user)

    def forget(self) -> None:
        """Drop whatever the server remembers of the previous spool (Dovecot: its index)."""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env or CLEAN_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_port(self.port)
        except RuntimeError:
            self.stop()  # not left running behind a peer that is reported as not started
            raise

    def busy(self) -> bool:
        """A session process is still running."""
        return self.proc is not None and bool(children(self.proc.pid))

    def settle(self) -> None:
        """Wait until the session process has exited (it may still hold locks after closing)."""
        deadline = time.monotonic() + 20
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.001)

    def session_pid(self) -> int | None:
        """The process serving the current connection (for its peak RSS and CPU time)."""
        if self.proc is None:
            return None
        kids = children(self.proc.pid)
        return kids[-1] if kids else None


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def proc_usage(pid: int | None) -> dict[str, float] | None:
    """Peak RSS (VmHWM, MB) and CPU seconds so far of a live process, from /proc."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    try:  # nanoseconds on the CPU: finer than ticks
        cpu = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    cpu += (int(fields[13]) + int(fields[14])) / ticks  # children it reaped (popa3d's helpers)
    return {"rss_mb": hwm / 1024, "cpu_s": cpu}


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a launcher, its sessions and their helpers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:  # every thread's children: Dovecot's and tcpserver's are the main thread's anyway
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
            except OSError:
                pass
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process tree, the processes that ended included.

    Every live process's own time plus the time of the children it reaped (which include what
    they reaped): each ended process is counted once, in the live process that reaped it or
    reaped its reaper. Exact only while no child is between its exit and its reaping: take it
    when the server is idle, before and after a run. Ticks (10 ms) per process, so take it over
    many sessions.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / ticks


def tree_pss(pid: int) -> float:
    """The memory of a process tree, MB: its anonymous and shared-memory pages, each divided
    among the processes sharing it (proportional set size), so forked processes' shared pages
    count once. File pages are left out: shared code, and the page cache of the spools (which a
    session maps, and the kernel reclaims), are not a session's memory."""
    total = 0
    for p in descendants(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                total += int(line.split()[1])
    return total / 1024


class PeerUnavailable(Exception):
    """A peer cannot take part in this run; the message says why (it is printed)."""


@dataclass
class PeerSetup:
    """What a peer's `start()` may use: the options, the launcher, the work directory, the account."""

    args: argparse.Namespace
    tool: str  # tcpserver or socat (peers are started only when there is one)
    workdir: Path
    owner: pwd.struct_passwd  # the system test account
    hashed: str  # its password, bcrypt-hashed (for a peer with its own password file)
