"""Standalone mode: listen, accept, fork one session process per connection, reap children.

The child runs exactly the inetd-mode session on the accepted socket, so both modes behave alike.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket

from pop3d import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config


class ListenError(Exception):
    """An address cannot be parsed or bound."""


def parse_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT`, `[v6addr]:PORT`; no host means every IPv4 address."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenError(f"listen: {text!r}: bad port")
    return host or "0.0.0.0", int(port)


def bind(text: str) -> socket.socket:
    host, port = parse_address(text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"listen: cannot bind {text}: {e.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Server:
    """The accept loop and the set of running session processes."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        self.config = config
        self.sockets = sockets
        self.children: dict[int, str] = {}
        self.stopping = False

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def reap(self) -> None:
        while self.children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.pop(pid, None)

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        # SIGCHLD only interrupts the wait below; children are reaped in the loop.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        log.info("listening on " + ", ".join(str(s.getsockname()[:2]) for s in self.sockets))
        while not self.stopping:
            self.reap()
            try:
                ready, _, _ = select.select(self.sockets, [], [], 1.0)
            except InterruptedError:
                continue
            for sock in ready:
                self.accept(sock)
        for sock in self.sockets:
            sock.close()
        self.finish()

    def accept(self, sock: socket.socket) -> None:
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error(f"accept: {e.strerror}")
                return
            raise
        peer = str(address[0]) if isinstance(address, tuple) else "local"
        if len(self.children) >= int(self.config.max_sessions):  # type: ignore[call-overload]
            log.warning(f"refusing {peer}: max_sessions reached")
            try:
                conn.setblocking(True)
                if self.config.tls != "implicit":  # a TLS client would take plaintext for a bad record
                    conn.sendall(b"-ERR [SYS/TEMP] Too many sessions; try again later.\r\n")
            except OSError:
                pass
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                for listening in self.sockets:
                    listening.close()
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                conn.setblocking(True)
                from pop3d import session

                fd = conn.detach()
                status = session.serve(self.config, fd, fd)
            except BaseException:
                log.exception("session process")
            finally:
                os._exit(status)
        self.children[pid] = peer
        conn.close()

    def finish(self) -> None:
        """Stop: let running sessions end on their own (they are bounded by their timeouts)."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            self.children.pop(pid, None)


def run(config: Config) -> int:
    """Run the standalone server until SIGTERM/SIGINT; the exit status."""
    try:
        sockets = [bind(text) for text in config.listen]  # type: ignore[attr-defined]
    except ListenError as e:
        import sys

        sys.stderr.write(f"pop3d: {e}\n")
        return 71  # EX_OSERR
    Server(config, sockets).serve_forever()
    return 0
