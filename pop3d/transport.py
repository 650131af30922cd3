"""The client's connection: its transports (plain descriptors, TLS), who is at the other end, and
what ends a session (SessionEnd, the stop signals).

Shared by both drivers of a session: `privsep` (started as root) and `dispatch`'s (started as
an ordinary user). Knows no POP3. On the path to the greeting: standard-library C modules only
(`_signal`, `_socket`), see docs/INTERNALS.md.
"""

from __future__ import annotations

import errno
import os
import select
import time

from pop3d import limits, log

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from pop3d.config import Config


# errno values that mean the client is gone: a read sees the end of input, a write ends the session.
READ_GONE = (errno.ECONNRESET, errno.ETIMEDOUT, errno.ENOTCONN, errno.EPIPE)
WRITE_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


class SessionEnd(Exception):
    """The session must end now, without update: the client vanished, a timeout, a signal."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Connection:
    """Non-blocking reads and writes on the session's descriptors, with timeouts.

    In inetd mode fd 0 and fd 1 are usually the same socket; they may also be two pipes.
    """

    secure = False  # the transport contract, shared with TlsConnection

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self._saved_flags: list[tuple[int, int]] = []
        for fd in {rfd, wfd}:
            import fcntl

            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            self._saved_flags.append((fd, flags))
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()  # login_timeout counts from here
        # A client that stops reading (a full socket buffer) must not hold the maildrop for ever.
        self.write_timeout = limits.WRITE_TIMEOUT

    def restore(self) -> None:
        """Give the descriptors back as they came (a terminal must not stay non-blocking)."""
        import fcntl

        for fd, flags in self._saved_flags:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            except OSError:
                pass

    def wait_readable(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(max(0.0, timeout) * 1000.0))

    def read(self) -> bytes | None:
        """Some bytes, b"" at end of input (a reset counts as the end), None if none yet."""
        try:
            data = os.read(self.rfd, limits.READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in READ_GONE:
                return b""
            raise
        self.bytes_in += len(data)
        return data

    def _write_once(self, write: Callable[[int, Any], int], data: Any) -> int:
        """One write(2) or writev(2): octets written, 0 when the socket is full; a gone client ends."""
        try:
            written = write(self.wfd, data)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in WRITE_GONE:
                raise SessionEnd("disconnected") from None
            raise
        self.bytes_out += written
        return written

    def write_parts(self, parts: list[bytes | bytearray], timeout: float | None = None) -> None:
        """Write the parts in order, as one writev(2) when the client keeps up."""
        total = sum(len(part) for part in parts)
        written = self._write_once(os.writev, parts) if total else 0
        if written < total:  # the socket buffer is full: the rest the slow way
            self.write_all(memoryview(b"".join(parts))[written:], timeout)

    def write_all(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Write everything, waiting at most `timeout` (default write_timeout) for the client."""
        view = memoryview(data)
        deadline = time.monotonic() + (self.write_timeout if timeout is None else timeout)
        poller = None
        while view:
            written = self._write_once(os.write, view)
            view = view[written:]
            if view:
                if poller is None:
                    poller = select.poll()
                    poller.register(self.wfd, select.POLLOUT)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(remaining * 1000.0):
                    raise SessionEnd("write-timeout")

    def is_socket(self) -> bool:
        """True when both directions are one stream socket, which TLS can wrap (not pipes)."""
        import stat

        try:
            rstat, wstat = os.fstat(self.rfd), os.fstat(self.wfd)
        except OSError:
            return False
        return stat.S_ISSOCK(rstat.st_mode) and (rstat.st_dev, rstat.st_ino) == (wstat.st_dev, wstat.st_ino)

    def close(self) -> None:
        """Nothing to say before a plain connection closes (TLS sends its close_notify here)."""


class TlsConnection:
    """Connection's contract (read, write_all, wait_readable, counters) through a server-side SSLSocket.

    Made after the handshake, from the socket `tls.accept` wrapped; from then on every byte goes
    through it, both directions. The socket is non-blocking, so OpenSSL may report that it must
    read before it can write or the reverse (SSLWant*Error), and decrypted bytes can wait inside
    the SSL object (`pending()`), where poll() cannot see them.
    """

    secure = True

    def __init__(self, sock: ssl.SSLSocket, plain: Connection) -> None:
        self.sock = sock
        self.rfd = plain.rfd
        self._fd = sock.fileno()
        self._read_events = select.POLLIN | select.POLLPRI
        self.bytes_in = plain.bytes_in
        self.bytes_out = plain.bytes_out
        self.started = plain.started
        self.write_timeout = plain.write_timeout

    def wait_readable(self, timeout: float) -> bool:
        if self.sock.pending():
            return True
        poller = select.poll()
        poller.register(self._fd, self._read_events)
        return bool(poller.poll(max(0.0, timeout) * 1000.0))

    def read(self) -> bytes | None:
        """Some plaintext, b"" at the end (close_notify, EOF or reset), None if no whole record yet."""
        import ssl

        self._read_events = select.POLLIN | select.POLLPRI
        try:
            data = self.sock.recv(limits.READ_SIZE)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            self._read_events = select.POLLOUT
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        except ssl.SSLError as e:
            log.warning(f"TLS error: {e.reason or e}")
            raise SessionEnd("tls-error") from None
        except OSError as e:
            if e.errno in READ_GONE:
                return b""
            raise
        self.bytes_in += len(data)
        return data

    def write_all(self, data: bytes | memoryview, timeout: float | None = None) -> None:
        """Write everything, waiting at most `timeout` (default write_timeout) for the client."""
        import ssl

        view = memoryview(data)
        deadline = time.monotonic() + (self.write_timeout if timeout is None else timeout)
        while view:
            # After a want-read/want-write, OpenSSL needs the same bytes again: `view` is unchanged.
            try:
                written = self.sock.send(view)
                events = select.POLLOUT
            except ssl.SSLWantWriteError:
                written, events = 0, select.POLLOUT
            except ssl.SSLWantReadError:
                written, events = 0, select.POLLIN
            except ssl.SSLError as e:
                log.warning(f"TLS error: {e.reason or e}")
                raise SessionEnd("tls-error") from None
            except OSError as e:
                if e.errno in WRITE_GONE:
                    raise SessionEnd("disconnected") from None
                raise
            self.bytes_out += written
            view = view[written:]
            if view:
                poller = select.poll()
                poller.register(self._fd, events)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(remaining * 1000.0):
                    raise SessionEnd("write-timeout")

    def write_parts(self, parts: list[bytes | bytearray], timeout: float | None = None) -> None:
        """TLS has no writev: the parts joined, as one stream of records."""
        self.write_all(b"".join(parts), timeout)

    def is_socket(self) -> bool:
        return True

    def close(self) -> None:
        """Send close_notify, without waiting for the client's: some clients report a truncation otherwise."""
        try:
            self.sock.unwrap()
        except (OSError, ValueError):  # ssl.SSLWantReadError: ours is sent, theirs not awaited
            pass


def start_tls(config: Config, conn: Connection, peer: str) -> TlsConnection:
    """Handshake on the connection's socket (STLS or implicit TLS); its transport, or SessionEnd (logged)."""
    from pop3d import tls

    timeout = min(float(config.timeout), limits.TLS_HANDSHAKE_TIMEOUT)  # type: ignore[arg-type]
    try:
        sock = tls.accept(tls.server_context(config), conn.rfd, timeout)
    except tls.HandshakeError as e:
        log.warning(f"TLS handshake failed: rip={peer}: {e}")
        raise SessionEnd("tls-handshake-failed") from None
    log.info(f"TLS: rip={peer} {sock.version()} {(sock.cipher() or ('?',))[0]}")
    return TlsConnection(sock, conn)


def signal_module() -> ModuleType:
    """`_signal`, the C module `signal` wraps: the same functions without importing `enum` (~2 ms
    of every connection's start-up). Integers work wherever `signal` takes its enums."""
    try:
        import _signal as signal
    except ImportError:  # pragma: no cover - other interpreters
        import signal
    return signal


def stop_signals() -> set[int]:
    """The signals that end a session (install_signal_handlers)."""
    signal = signal_module()
    return {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


_stopping = False  # a stop signal has raised SessionEnd in this process: later ones do nothing


def install_signal_handlers() -> None:
    """SIGTERM, SIGHUP, SIGINT end the session without update; locks are released on the way out.

    Installed after the greeting (and through `_signal`: `signal` imports `enum`). The first
    one raises; the rest are ignored (ignore_stop_signals): `systemctl stop` signals every
    process of the unit and the listener passes it on too, and a second SessionEnd raised
    inside the clean-up would skip the release of the locks.

    A signal that comes while the handler runs must not run it again: signal.signal() first
    runs the handlers of the signals already pending, so under a steady stream of signals the
    handler re-entered itself from its own ignore_stop_signals, one level per signal, until a
    RecursionError, and a sender that kept on kept the session alive for ever (seen in CI).
    """
    signal = signal_module()

    def stop(signum: int, frame: object) -> None:
        global _stopping
        if _stopping:
            return  # re-entered from ignore_stop_signals below, or a late one: already ending
        _stopping = True
        ignore_stop_signals()
        raise SessionEnd("signal")

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)


def ignore_stop_signals() -> None:
    """The session is ending: from now on the stop signals are ignored, so that nothing cuts its
    clean-up short. Called first in each clean-up, where a signal that arrived just before may
    still raise (once) on the call: callers catch that SessionEnd."""
    signal = signal_module()
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)


# Where a launcher that hands pop3d something other than the client's own socket names the
# client: tcpserver (pipes), xinetd, systemd, socat (EXEC and SYSTEM: a Unix socket pair).
LAUNCHER_ADDRESS = ("TCPREMOTEIP", "REMOTE_HOST", "REMOTE_ADDR", "SOCAT_PEERADDR")


def peer_name(fd: int = 0) -> str:
    """The client's address for the log.

    The socket's peer first (inetd, xinetd, tcpserver and systemd all hand over the connected
    socket, and it cannot be spoofed by the environment), an IPv4-mapped IPv6 address shown as
    IPv4; otherwise what a launcher put in the environment (LAUNCHER_ADDRESS); otherwise
    "local" for a Unix socket and "unknown" for pipes.
    """
    import stat

    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return "unknown"
    address: object = None
    if is_socket:
        try:  # the C module under `socket`: the same object without `socket`'s ~4 ms of imports
            from _socket import socket
        except ImportError:  # pragma: no cover - other interpreters
            from socket import socket
        try:
            copy = os.dup(fd)
        except OSError:
            return "unknown"
        try:
            sock = socket(fileno=copy)
        except OSError:
            os.close(copy)
            sock = None
        if sock is not None:
            try:
                address = sock.getpeername()
            except OSError:
                address = None
            finally:
                sock.close()
    if isinstance(address, tuple):
        return log.escape(_ip_text(str(address[0])) or str(address[0]), 64)
    value = launcher_address()
    if value is not None:
        return log.escape(_ip_text(value) or value, 64)
    return "local" if is_socket else "unknown"


def launcher_address() -> str | None:
    """The client's address as the launcher put it in the environment, or None."""
    for var in LAUNCHER_ADDRESS:
        value = os.environ.get(var)
        if value:
            return value
    return None


def peer_is_local(fd: int) -> bool:
    """True if the client is on this host: a loopback address or a Unix socket (plaintext_on_loopback).

    Decided from the socket itself. A Unix socket is local unless a launcher says where its
    client is (socat's EXEC hands a TCP client over on a socket pair): then that address decides.
    """
    try:  # the C module under `socket` (see peer_name)
        from _socket import AF_UNIX, socket
    except ImportError:  # pragma: no cover - other interpreters
        from socket import AF_UNIX, socket

    duplicate = os.dup(fd)
    try:
        sock = socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return False
    try:
        family, address = sock.family, sock.getpeername()
    except OSError:
        return False
    finally:
        sock.close()
    if family == AF_UNIX:
        launcher = launcher_address()
        return launcher is None or _is_loopback(launcher)
    return _is_loopback(str(address[0]))


def _ip_text(text: str) -> str | None:
    """An IP address in its usual form (IPv4-mapped IPv6 as IPv4; socat's "[0000:...:0001]" as
    "::1"), or None if `text` is not one."""
    try:
        from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton
    except ImportError:  # pragma: no cover - other interpreters
        from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    for family in (AF_INET, AF_INET6):
        try:
            packed = inet_pton(family, text)
        except (OSError, ValueError):
            continue
        if family == AF_INET6 and packed[:12] == bytes(10) + b"\xff\xff":
            return inet_ntop(AF_INET, packed[12:])
        return inet_ntop(family, packed)
    return None


def _is_loopback(text: str) -> bool:
    """127.0.0.0/8 or ::1 (also IPv4-mapped); a name or anything else is not."""
    address = _ip_text(text)
    return address is not None and (
        address == "::1" or (address.count(".") == 3 and address.startswith("127."))
    )
