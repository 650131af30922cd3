"""The driver of one POP3 session: owns the connection's file descriptors, the timers and the loop.

It feeds client bytes to the protocol core, performs what the core requests through the adapters
(auth, privileges, maildrop), turns adapter exceptions into response codes in one table, and
logs. It knows no POP3 syntax itself.
"""

from __future__ import annotations

import errno
import os
import select
import time

from pop3d import limits, log, protocol, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from pop3d.config import Config
    from pop3d.maildrop import Maildrop


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


# SASL mechanisms offered (RFC 5034); the core shows them only where plaintext passwords may go.
SASL_MECHANISMS = (b"PLAIN", b"LOGIN")


class Session:
    """One POP3 session from greeting to close."""

    def __init__(self, config: Config, conn: Connection | TlsConnection, peer: str = "unknown") -> None:
        self.config = config
        self.conn = conn
        self.peer = peer
        self.core = protocol.Pop3Core(self._options(), greet=False)
        if conn.secure:
            self.core.tls_active = True  # implicit TLS: the session is secure from its first byte
        self.maildrop = None
        self._md = None  # the pop3d.maildrop module, once a retrieval needs its errors
        self.user: str | None = None
        self._out = bytearray()
        self._last_refresh = time.monotonic()
        # Refresh the dotlock well inside the age at which others (and we) call it stale.
        self._refresh_every = min(limits.LOCK_REFRESH_INTERVAL, float(config.stale_lock) / 4)  # type: ignore[arg-type]
        self.end_reason = "error"
        self.deleted_count = 0
        self.top_bytes = 0
        self.messages_at_login = 0
        self.size_at_login = 0
        conn.write_timeout = float(config.write_timeout)  # type: ignore[arg-type]

    def _options(self) -> protocol.Options:
        config = self.config
        secure = self.conn.secure
        plaintext = config.plaintext_auth == "yes" or (
            bool(config.plaintext_on_loopback) and not secure and peer_is_local(self.conn.rfd)
        )
        return protocol.Options(
            max_auth_failures=int(config.max_auth_failures),  # type: ignore[call-overload]
            plaintext_allowed=plaintext,
            stls_available=config.tls == "starttls" and not secure and self.conn.is_socket(),
            sasl_mechanisms=SASL_MECHANISMS,
        )

    # ---------------------------------------------------------------- the loop

    def run(self, before: Callable[[], None] | None = None) -> None:
        """Serve until the core closes, the client vanishes, or a timer or a signal ends it.

        `before` runs first, under the same ending: a signal during it releases the maildrop.
        """
        core = self.core
        try:
            if before is not None:
                before()
            self._loop()
        except SessionEnd as e:
            self.end_reason = e.reason
        except Exception:
            log.exception("unexpected error")
            core.fail()
            self.end_reason = "error"
            try:
                self._take(core.data_to_send())
                self._flush()
            except Exception:
                pass
        finally:
            self._close_maildrop()
            self.conn.close()
            self._log_logout()

    def _loop(self) -> None:
        core = self.core
        config = self.config
        idle_timeout = float(config.timeout)  # type: ignore[arg-type]
        line_timeout = float(config.line_timeout)  # type: ignore[arg-type]
        last_command = time.monotonic()
        # When the first octet of the command line still incomplete arrived: a line must be
        # complete within line_timeout, so a trickle cannot hold the session (and its lock) for
        # ever; partial input never resets the idle timer.
        partial_since: float | None = None
        consumed_before = 0
        while True:
            commands_before = core.stats["commands"]
            while True:
                request = core.next_request()
                self._take(core.data_to_send())
                if request is None:
                    if len(self._out) >= limits.OUTPUT_FLUSH:
                        self._flush()
                        continue
                    break
                if isinstance(request, protocol.Close):
                    self.end_reason = request.reason
                    self._flush()
                    return
                self._perform(request)
                self._take(core.data_to_send())
                if len(self._out) >= limits.OUTPUT_FLUSH:
                    self._flush()
            # Input drained: send every answer of the pipeline in one write.
            self._flush()
            now = time.monotonic()
            if core.stats["commands"] != commands_before:
                last_command = now
            pending = core.pending_input()
            consumed = self.conn.bytes_in - pending
            if not pending:
                partial_since = None
            elif partial_since is None or consumed != consumed_before:
                partial_since = now  # a new line began in the last read
            consumed_before = consumed
            deadline = last_command + idle_timeout
            if partial_since is not None:
                deadline = min(deadline, partial_since + line_timeout)
            data = None
            while data is None:
                now = time.monotonic()
                if now >= deadline:
                    core.timed_out()
                    break
                self._refresh_lock(now)
                wait = min(deadline - now, self._refresh_every)
                if self.conn.wait_readable(wait):
                    data = self.conn.read()
            if data is not None:
                core.receive_data(data)

    def _take(self, data: bytes | bytearray) -> None:
        """Queue the core's output; taken over, not copied, when nothing else is waiting (a
        UIDL of 100,000 messages is megabytes)."""
        if self._out:
            self._out += data
        elif data:
            self._out = data if isinstance(data, bytearray) else bytearray(data)

    def _flush(self) -> None:
        if self._out:
            # Hand the buffer over (no copy) and start a new one. Clearing it after the write
            # raised BufferError when a signal's SessionEnd left write_all's memoryview alive in
            # the traceback: the reply stayed buffered and was sent a second time.
            data, self._out = self._out, bytearray()
            self.conn.write_all(data)

    def _refresh_lock(self, now: float) -> None:
        if self.maildrop is not None and now - self._last_refresh >= self._refresh_every:
            self._last_refresh = now
            self.maildrop.refresh_lock()

    # ---------------------------------------------------------------- requests

    def _perform(self, request: object) -> None:
        if isinstance(request, protocol.Retrieve):
            self._retrieve(request)
        elif isinstance(request, protocol.Authenticate):
            self._authenticate(request)
        elif isinstance(request, protocol.Commit):
            self._commit(request)
        elif isinstance(request, protocol.StartTLS):
            self._start_tls()
        else:
            raise RuntimeError(f"unknown request {request!r}")

    def _retrieve(self, request: protocol.Retrieve) -> None:
        """Send the message: pieces leave by writev without being copied together, and the final
        ".\r\n" always leaves in the same write as the message's end (a client delaying its ACKs
        would otherwise stall ~40 ms per message on our small last write)."""
        assert self.maildrop is not None
        md = self._md
        if md is None:  # imported once, after login (not on the greeting's path)
            from pop3d import maildrop as md

            self._md = md
        if request.body_lines is None:
            try:
                data = self.maildrop.message_bytes(request.index, wire=True)
            except md.MaildropTempError as e:  # as below: nothing of this reply may leave now
                log.error(f"retrieval aborted: {e}")
                self._out = bytearray()
                raise SessionEnd("spool-changed") from None
            if data is not None:  # a small message: one read, one copy, no generators (same bytes)
                out = self._out
                out += data  # dot-stuffed, ending with CRLF (or empty)
                out += wire.TERMINATOR
                self.core.retrieve_done()
                return
        parts: list[bytes | bytearray] = [self._out] if self._out else []  # the "+OK" line
        last = b"\n"
        held = len(self._out)
        try:
            chunks = self.maildrop.iter_message(request.index, request.body_lines, wire=True)
            for chunk in chunks:
                if held >= limits.OUTPUT_FLUSH:  # never the last piece: it goes with the terminator
                    self.conn.write_parts(parts)
                    parts, held = [], 0
                    self._refresh_lock(time.monotonic())
                if chunk:  # dot-stuffed already
                    parts.append(chunk)
                    held += len(chunk)
                    last = chunk
                    if request.body_lines is not None:
                        self.top_bytes += len(chunk)
            # The stream ends with CRLF unless it is empty (a message's last line gets one).
            parts.append(wire.TERMINATOR if last[-1:] == b"\n" else wire.CRLF + wire.TERMINATOR)
            if held >= limits.OUTPUT_FLUSH:
                self.conn.write_parts(parts)
                parts = []
        except md.MaildropTempError as e:
            # The +OK and maybe part of the message are out: no -ERR may follow; close, no update.
            log.error(f"retrieval aborted: {e}")
            parts = []
            raise SessionEnd("spool-changed") from None
        finally:
            # A small message waits in the buffer to share a write with the replies after it.
            self._out = bytearray().join(parts)
        self.core.retrieve_done()

    def _authenticate(self, request: protocol.Authenticate) -> None:
        from pop3d import login

        # Failures come back after auth_failure_delay, whatever failed (login.authenticate).
        account = login.authenticate(self.config, request.user, request.password, self.peer)
        if isinstance(account, bytes):
            self.core.auth_failed(account)
            return
        self.open_maildrop(account)

    def open_maildrop(self, account: object) -> None:
        """Become the account, lock and scan its maildrop, and enter TRANSACTION (or fail).

        SIGTERM/SIGHUP/SIGINT wait until the maildrop is ours (at most the lock timeout plus the
        scan): raised between the dotlock's link() and its bookkeeping, or before the maildrop
        is stored here, a signal would leave the dotlock behind until it is stale.
        """
        from pop3d import login

        signal = _signal_module()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signals())
        try:
            self.enter_transaction(login.open_maildrop(self.config, account, self.peer))  # type: ignore[arg-type]
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal raises here
            except BaseException:
                self._close_maildrop()
                raise

    def enter_transaction(self, opened: bytes | tuple[str, Maildrop]) -> None:
        """Complete an accepted login: TRANSACTION with the maildrop, or the error ([IN-USE],
        [SYS/*]). After such an error the process is the account: only it can log in again."""
        if isinstance(opened, bytes):
            self.core.auth_failed(opened)
            return
        self.user, self.maildrop = opened
        listing = self.maildrop.listing
        self.messages_at_login = listing.count
        self.size_at_login = listing.total_size
        log.set_prefix(f"user={self.user} rip={self.peer}: ")
        self.core.auth_succeeded(listing)

    def _commit(self, request: protocol.Commit) -> None:
        assert self.maildrop is not None
        from pop3d import maildrop as md

        signal = _signal_module()
        # QUIT was received in full: a SIGTERM now must not cut the update short.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signals())
        try:
            self.maildrop.commit(request.deleted)
        except md.MaildropError as e:
            log.error(f"update failed: {e}")
            self.core.commit_done(protocol.SYS_TEMP)
        else:
            self.deleted_count = len(request.deleted)
            self.core.commit_done(None)
        finally:
            self._close_maildrop()
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _start_tls(self) -> None:
        # The +OK goes out in plaintext first. The core already dropped whatever was pipelined
        # behind STLS, and this driver keeps no read-ahead of its own: the handshake reads the
        # socket itself, so no plaintext byte can be taken for part of the TLS stream.
        self._flush()
        self.conn = start_tls(self.config, self.conn, self.peer)  # type: ignore[arg-type]
        self.core.tls_started()

    def _close_maildrop(self) -> None:
        maildrop, self.maildrop = self.maildrop, None
        if maildrop is not None:
            # A second signal must not interrupt the release (it would leave the dotlock).
            signal = _signal_module()
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signals())
            try:
                maildrop.close()
            except Exception:
                log.exception("releasing the maildrop")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _log_logout(self) -> None:
        """One summary line, in the manner of Dovecot's pop3 logout format."""
        reason = self.end_reason
        traffic = f"in={self.conn.bytes_in}, out={self.conn.bytes_out}"
        if self.user is None:
            log.info(f"disconnected before login: rip={self.peer} reason={reason} {traffic}")
            return
        stats = self.core.stats
        log.info(
            f"logout: reason={reason} top={stats['top']}/{self.top_bytes}, "
            f"retr={stats['retr']}/{stats['retr_bytes']}, "
            f"del={self.deleted_count}/{self.messages_at_login}, size={self.size_at_login}, {traffic}"
        )


def _signal_module() -> ModuleType:
    """`_signal`, the C module `signal` wraps: the same functions without importing `enum` (~2 ms
    of every connection's start-up). Integers work wherever `signal` takes its enums."""
    try:
        import _signal as signal
    except ImportError:  # pragma: no cover - other interpreters
        import signal
    return signal


def _stop_signals() -> set[int]:
    """The signals that end a session (install_signal_handlers)."""
    signal = _signal_module()
    return {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


def install_signal_handlers() -> None:
    """SIGTERM, SIGHUP, SIGINT end the session without update; locks are released on the way out.

    Installed after the greeting (and through `_signal`: `signal` imports `enum`).
    """
    signal = _signal_module()

    def stop(signum: int, frame: object) -> None:
        raise SessionEnd("signal")

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)


def peer_name(fd: int = 0) -> str:
    """The client's address for the log.

    The socket's peer first (inetd, xinetd, tcpserver and systemd all hand over the connected
    socket, and it cannot be spoofed by the environment), an IPv4-mapped IPv6 address shown as
    IPv4; otherwise what a launcher put in the environment (TCPREMOTEIP from tcpserver,
    REMOTE_HOST from xinetd, REMOTE_ADDR from systemd); otherwise "local" for a Unix socket and
    "unknown" for pipes.
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
        host = str(address[0])
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return log.escape(host, 64)
    for var in ("TCPREMOTEIP", "REMOTE_HOST", "REMOTE_ADDR"):
        value = os.environ.get(var)
        if value:
            return log.escape(value, 64)
    return "local" if is_socket else "unknown"


def peer_is_local(fd: int) -> bool:
    """True if the client is on this host: a loopback address or a Unix socket (plaintext_on_loopback).

    Decided from the socket itself, never from the launcher's environment.
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
        return True
    host = str(address[0]).removeprefix("::ffff:")
    return host.startswith("127.") or host == "::1"


def serve(config: Config, rfd: int = 0, wfd: int = 1, greeting_sent: bool = False) -> int:
    """Serve one session on these descriptors (inetd mode); the process exit status."""
    conn = Connection(rfd, wfd)
    transport: Connection | TlsConnection = conn
    try:
        if os.geteuid() == 0 and config.preauth_user:
            # Privilege separation: the dialogue before login (and any TLS) runs unprivileged,
            # in a child; see privsep. With implicit TLS the child greets, after its handshake.
            if config.tls != "implicit" and not greeting_sent:
                conn.write_all(protocol.GREETING)
                greeting_sent = True
            install_signal_handlers()
            from pop3d import privsep

            return privsep.serve(config, conn, peer_name(rfd), greeting_sent)
        peer = None
        if config.tls == "implicit":
            # RFC 8314 implicit TLS: the handshake comes before the greeting.
            install_signal_handlers()
            peer = peer_name(rfd)
            if not conn.is_socket():
                log.error("tls = implicit needs a socket on standard input and output")
                return 78
            transport = start_tls(config, conn, peer)
        if not greeting_sent:
            transport.write_all(protocol.GREETING)
        install_signal_handlers()
        session = Session(config, transport, peer or peer_name(rfd))
        session.run()
    except SessionEnd:
        pass
    finally:
        conn.restore()
    return 0
