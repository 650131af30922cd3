"""Helpers for the hostile-input, abusive-client and soak tests: raw POP3 over a socket.

poplib refuses lines over 2048 octets and keeps whole messages as lists of lines; these helpers
read a multi-line reply into one buffer and undo the dot-stuffing, so a 64 MB line is fine.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from conftest import PASSWORD, Pop3Env, wait_for


class RawClient:
    """POP3 on a raw socket, one command at a time, replies read with a timeout."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.sock = sock
        self.proc = proc
        self._buf = bytearray()
        self.greeting = self.line()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("server closed the connection")
        self._buf += chunk

    def line(self) -> bytes:
        """One reply line, without its CRLF."""
        while True:
            k = self._buf.find(b"\r\n")
            if k >= 0:
                out = bytes(self._buf[:k])
                del self._buf[: k + 2]
                return out
            self._fill()

    def multiline(self) -> bytes:
        """The body of a multi-line reply, dot-stuffing undone, CRLFs kept, terminator removed."""
        start = 0
        while True:
            if self._buf.startswith(b".\r\n"):
                end, skip = 0, 3
                break
            k = self._buf.find(b"\r\n.\r\n", start)
            if k >= 0:
                end, skip = k + 2, k + 5
                break
            start = max(0, len(self._buf) - 4)
            self._fill()
        body = bytes(self._buf[:end])
        del self._buf[:skip]
        body = body.replace(b"\r\n.", b"\r\n")
        return body[1:] if body.startswith(b".") else body

    def closed(self) -> bool:
        """True if the server closed the connection with nothing more to read."""
        return not self._buf and self.sock.recv(1) == b""

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def cmd(self, line: bytes) -> bytes:
        self.send(line)
        return self.line()

    def login(self, user: bytes = b"alice", password: str = PASSWORD) -> bytes:
        assert self.cmd(b"USER " + user).startswith(b"+OK")
        return self.cmd(b"PASS " + password.encode())

    def listing(self, command: bytes = b"LIST") -> list[list[bytes]]:
        reply = self.cmd(command)
        assert reply.startswith(b"+OK"), reply
        return [line.split() for line in self.multiline().split(b"\r\n") if line]

    def retr(self, number: int, lines: int | None = None) -> bytes:
        command = b"RETR %d" % number if lines is None else b"TOP %d %d" % (number, lines)
        reply = self.cmd(command)
        assert reply.startswith(b"+OK"), reply
        return self.multiline()

    def close(self) -> None:
        self.sock.close()


def start(env: Pop3Env, *extra: str) -> RawClient:
    sock, proc = env.start(*extra)
    return RawClient(sock, proc)


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def leftovers(directory: Path, keep: set[str]) -> set[str]:
    """Files beside the spools that must not outlive a session: locks, journals, temp files."""
    return {p.name for p in directory.iterdir()} - keep


def no_traceback(env: Pop3Env) -> None:
    text = env.log_text()
    assert "Traceback" not in text and "unexpected error" not in text, text[-3000:]


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    return proc.wait(timeout=timeout)


def lock_gone(path: Path) -> bool:
    return wait_for(lambda: not Path(str(path) + ".lock").exists())


def sparse_file(path: Path, parts: list[tuple[int, bytes]]) -> None:
    """A file holding `data` at each offset and holes (no disk blocks) in between."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset, data in parts:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
