"""The benchmark's POP3 client: the same few lines of socket code for every server."""

from __future__ import annotations

import socket

from benchlib.verify import VerifyError

IO_TIMEOUT = 120.0


class Pop3Client:
    """A minimal POP3 client reading in large chunks (the same for every server).

    It acknowledges every read at once (TCP_QUICKACK): a server that sends a reply's final
    ".\r\n" in a small write of its own would otherwise wait for our delayed ACK (~40 ms per
    reply, Nagle). Stock poplib, which does not, is measured separately.
    """

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._quickack = getattr(socket, "TCP_QUICKACK", None)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise VerifyError("connection closed by the server")
        if self._quickack is not None:  # the kernel clears it again: set it after every read
            self.sock.setsockopt(socket.IPPROTO_TCP, self._quickack, 1)
        self.buf += data

    def line(self) -> bytes:
        scanned = 0
        while True:
            i = self.buf.find(b"\r\n", scanned)
            if i >= 0:
                break
            scanned = max(0, len(self.buf) - 1)
            self._fill()
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ok(self, command: bytes) -> bytes:
        self.send(command + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise VerifyError(f"{command.split()[0].decode()}: {reply[:80]!r}")
        return reply

    def body(self) -> bytes:
        """The rest of a multi-line reply, dot-unstuffed, CRLF line ends kept."""
        scanned = 0
        while True:
            if self.buf[:3] == b".\r\n":  # an empty body
                del self.buf[:3]
                return b""
            i = self.buf.find(b"\r\n.\r\n", scanned)
            if i >= 0:
                break
            scanned = max(0, len(self.buf) - 4)
            self._fill()
        data = bytes(self.buf[: i + 2])
        del self.buf[: i + 5]
        data = data.replace(b"\r\n..", b"\r\n.")
        if data[:2] == b"..":
            data = data[1:]
        return data

    def login(self, user: str, password: str) -> None:
        """Read the greeting, then USER and PASS."""
        self.line()
        self.ok(b"USER " + user.encode())
        self.ok(b"PASS " + password.encode())

    def multi(self, command: bytes) -> bytes:
        self.ok(command)
        return self.body()

    def drain_eof(self) -> None:
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass


def quit_session(c: Pop3Client) -> bytes:
    reply = c.ok(b"QUIT")
    c.drain_eof()  # wait for the server process to be done with the connection
    c.close()
    return reply
