"""Privilege separation for a session started as root (popa3d's design; Dovecot's login process).

    root process (this one)                     pre-authentication child
    greeting, fork  --------------------------> confine: chroot into preauth_chroot (empty), become
                                                `preauth_user`, no new processes, no spare
                                                descriptor (but what a TLS handshake needs)
    waits on a pipe; reads no client byte       implicit TLS handshake, if configured; the
                                                AUTHORIZATION dialogue, STLS included
                    <-- A(user, password, ------ on PASS (or AUTH): flush, then ask, with what
                          input not processed      the client sent after PASS, the counters and
                          yet, counters, TLS?)     whether TLS is active
    login.authenticate (PAM / htpasswd, padded
    to auth_failure_delay, counted)  --------> F(code): the child answers -ERR, goes on
    success, plain connection: kills the child
    success, TLS: -------------------------->  R: the child stays, as a relay between the TLS
                                                connection and a socket pair to root
    then: becomes the account for good, opens
    the maildrop, serves TRANSACTION from where
    the child was (on the client's socket, or on
    the relay's socket pair)

Client bytes are parsed, and TLS records decrypted, by the unprivileged child only. Root parses
nothing but the frames of this module (a kind octet, a 4-octet length, a bounded payload) and
runs only the credential check. After a plain login the child cannot outlive the handover with
the connection (it is killed and cannot fork); after a TLS login it keeps only the TLS stream,
confined as before. Root enforces the failure delay and max_auth_failures itself, so even a
subverted child gets no more guesses than a client.
"""

from __future__ import annotations

import os

from pop3d import limits, log, protocol
from pop3d.session import Session
from pop3d.transport import (
    Connection,
    SessionEnd,
    install_signal_handlers,
    peer_name,
    signal_module,
    start_tls,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config
    from pop3d.proxied import Client
    from pop3d.transport import TlsConnection

# Frames larger than this are a protocol violation: credentials are at most a SASL line each,
# the pending input at most what the session buffers (limits.MAX_PENDING_INPUT + a read).
_MAX_FRAME = 256 * 1024
_CODES = (protocol.AUTH, protocol.IN_USE, protocol.SYS_TEMP, protocol.SYS_PERM)
# Seconds a child asked to stop (SIGTERM) has before it is killed.
_TERM_GRACE = 2.0
# Relay: client bytes buffered towards root before the TLS side stops being read.
_RELAY_BUFFER = 256 * 1024
_SECURE = 1  # request flag: TLS is active in the child
_CONFIG_ERROR = b"-ERR [SYS/PERM] Server configuration error; contact the administrator.\r\n"


class FrameError(Exception):
    """The other process broke the framing: end the session."""


def serve(config: Config, conn: Connection, greeting_sent: bool = False, report: int = -1) -> int:
    """Serve one session with the dialogue (and any TLS) in a confined child.

    The greeting goes out first, unless it has been sent (cli), TLS is implicit or a proxy is
    at the other end: then the child sends it, after the handshake or the PROXY header (which it
    reads: root parses no client byte, see proxied). `report`: the standalone listener's end,
    for a connection from a proxy (proxied.admit).
    """
    import pwd

    proxy = None
    if config.proxy_from:
        from pop3d import proxied

        proxy = proxied.proxy_peer(config, conn.rfd)
    if config.tls != "implicit" and not greeting_sent and proxy is None:
        conn.write_all(protocol.GREETING)
        greeting_sent = True
    install_signal_handlers()
    peer = proxy.address if proxy is not None else peer_name(conn.rfd)
    signal = signal_module()
    name = str(config.preauth_user)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = None
    if entry is None or entry.pw_uid == 0:
        log.error(f"preauth_user {name!r} does not exist or is root: cannot serve")
        if greeting_sent:
            _reply(conn, _CONFIG_ERROR)
        return 0
    if config.tls == "implicit" and not conn.is_socket():
        log.error("tls = implicit needs a socket on standard input and output")
        return 78
    from pop3d import privs

    try:  # the child's root directory, proved empty and root's (made at start if missing)
        root = privs.empty_directory(str(config.preauth_chroot))
    except privs.PrivilegeError as e:
        log.error(f"{e}: cannot serve")
        if greeting_sent:
            _reply(conn, _CONFIG_ERROR)
        return 78
    import gc

    gc.freeze()  # a collection in either process would touch, and so copy, every shared page
    to_root_r, to_root_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    relay = _relay_pair() if config.tls != "none" else None
    # Until each side is inside its handler, a SIGTERM must wait: no child may be left behind.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP, signal.SIGINT})
    try:
        pid = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(root)
        log.error(f"cannot fork the pre-authentication process: {e.strerror}")
        if greeting_sent:
            _reply(conn, protocol.REPLIES["sys_temp"])
        return 0
    if pid == 0:
        status = 70
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (
                to_root_r,
                to_child_w,
                *(relay[:1] if relay else ()),
                *((report,) if report >= 0 else ()),
            ):
                os.close(fd)
            _hand_logging_to_root(to_root_w)
            _preload_child()  # here, not before the fork: root does not wait for it
            child = _Child(config, conn, peer, to_root_w, to_child_r, relay[1] if relay else -1, root, proxy)
            status = child.run(entry.pw_uid, entry.pw_gid, greeting_sent)
        except SessionEnd:
            status = 0  # root stopped us (SIGTERM) before our own handling began: not an error
        except BaseException:
            log.exception("pre-authentication process")
        finally:
            os._exit(status)
    os.close(root)
    if relay:
        os.close(relay[1])
    monitor = _Monitor(config, conn, peer, pid, to_root_r, to_child_w, relay[0] if relay else -1)
    monitor.proxied, monitor.report = proxy is not None, report
    os.close(to_root_w)
    os.close(to_child_r)
    try:
        return monitor.run(mask)
    finally:
        from pop3d import login

        login.wait_preload()  # a session that ended before a login: let the imports finish


def _relay_pair() -> tuple[int, int]:
    """A connected stream socket pair (root's end, the child's end), made before the child is
    confined: afterwards it could not make one."""
    try:
        from _socket import socketpair
    except ImportError:  # pragma: no cover - other interpreters
        from socket import socketpair
    ours, theirs = socketpair()
    return ours.detach(), theirs.detach()


# ------------------------------------------------------------------------------ root side


class _Monitor:
    """The root process while the child talks to the client: one credential check per request."""

    def __init__(
        self, config: Config, conn: Connection, peer: str, pid: int, rfd: int, wfd: int, relay: int = -1
    ) -> None:
        self.config = config
        self.conn = conn
        self.peer = peer
        self.pid = pid
        self.child_pid = pid  # for the log, after the child is reaped
        self.rfd = rfd
        self.wfd = wfd
        self.relay = relay
        self.proxied = False  # a proxy is at the other end: the child reports the client first
        self.report = -1  # the standalone listener's end (proxied.admit), for a proxied client

    def run(self, mask: object = None) -> int:
        """Answer the child's credential checks; then serve the session, or end with the child."""
        signal = signal_module()
        failures = 0
        allowed = int(self.config.max_auth_failures)  # type: ignore[call-overload]
        try:  # from the first instruction: a SIGTERM anywhere must also end the child
            from pop3d import auth

            # The client is still typing. What the check needs comes first: libpam and a PAM
            # transaction with its modules loaded (not its user: no client byte is known yet).
            if self.config.auth == "system":
                try:
                    auth.preload_pam(str(self.config.pam_service))
                except auth.AuthUnavailableError:
                    pass  # said again, and answered [SYS/TEMP], at the check
            auth.preload_crypt()  # crypt(3) without the interpreter lock: the thread below goes on
            from pop3d import login

            # What the session needs after the privilege drop loads in a thread, during the wait
            # and the hash; open_maildrop waits for it before the drop. Started while the stop
            # signals are blocked, so that they go to this (the main) thread.
            login.preload_behind(self.config)
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if self.proxied and not self._admit():
                return 0
            while True:
                frame = recv(self.rfd)
                if frame is None:
                    break  # the session ended before a login: QUIT, EOF, timeout, ...
                kind, payload = frame
                if kind == b"L":
                    self._log(payload)
                    continue
                if kind != b"A" or failures >= allowed:
                    raise FrameError(f"unexpected frame {kind!r} after {failures} failures")
                request = _parse_request(payload)
                if request.secure and self.relay < 0:
                    raise FrameError("TLS reported, but TLS is not configured")
                outcome = login.authenticate(self.config, request.user, request.password, self.peer)
                if isinstance(outcome, bytes):
                    failures += outcome == protocol.AUTH
                    send(self.wfd, b"F", outcome)
                    continue
                if request.secure:
                    # The TLS state is the child's: it stays, as a relay, and is reaped at the end.
                    send(self.wfd, b"R", b"")
                    conn = Connection(self.relay, self.relay)
                    conn.secure = True
                    self.relay = -1
                    try:
                        return self._transaction(conn, request, outcome, failures)
                    finally:
                        os.close(conn.rfd)  # the relay sees the end, says it to the client, exits
                        self._stop(None)
                # The child is waiting for the answer and reads nothing meanwhile: whatever the
                # client sent after the request is in `pending` or still in the socket. Killed
                # now; reaped (its exit takes ~1 ms) once the maildrop is open, before the session
                # reads or writes the connection.
                _signal(self.pid, signal.SIGKILL)
                return self._transaction(self.conn, request, outcome, failures, reap=True)
        except FrameError as e:
            log.error(f"pre-authentication process: {e}; ending the session")
            self._stop(signal.SIGKILL)
            return 0
        except SessionEnd:
            self._stop(signal.SIGTERM)  # let it log how the session ended
            return 0
        except BaseException:
            self._stop(signal.SIGKILL)
            raise
        self._stop(None)
        return 0

    def _admit(self) -> bool:
        """A connection from a proxy: the child has read the PROXY header and reports the client
        (`P`: a flag octet, 1 if on this host, then the address). Root checks the frame, lets a
        standalone listener count the client (max_sessions_per_ip), then tells the child to go
        on (`G`) or turns the client away itself. False: the session is over."""
        from pop3d import proxied

        while (frame := recv(self.rfd)) is not None and frame[0] == b"L":
            self._log(frame[1])
        if frame is None:
            self._stop(None)  # no valid header: the child logged why (written above)
            return False
        kind, payload = frame
        address = (
            proxied.checked_address(payload[1:]) if kind == b"P" and payload[:1] in (b"\0", b"\1") else None
        )
        if address is None:
            raise FrameError(f"malformed client report {kind!r}")
        client = proxied.Client(address, payload[:1] == b"\1")
        if self.report >= 0 and not proxied.admit(self.report, client):
            self._stop(signal_module().SIGKILL)
            proxied.refuse(self.config, self.conn)
            return False
        self.peer = address
        send(self.wfd, b"G", b"")
        return True

    def _stop(self, signum: int | None) -> None:
        """End the child (or just wait for it), reap it, close the pipes.

        A child asked to stop with SIGTERM gets a moment to log how the session ended; one
        that does not stop then is killed.
        """
        signal = signal_module()
        if self.pid:
            if signum is not None:
                _signal(self.pid, signum)
            if signum == signal.SIGTERM:
                import time

                deadline = time.monotonic() + _TERM_GRACE
                while not _reaped(self.pid, os.WNOHANG) and time.monotonic() < deadline:
                    time.sleep(0.01)
                _signal(self.pid, signal.SIGKILL)
            _reaped(self.pid, 0)
            self.pid = 0
            self._drain()
        for fd in (self.rfd, self.wfd, self.relay):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.rfd = self.wfd = self.relay = -1

    def _log(self, payload: bytes) -> None:
        """A line the child logged: written here, escaped, attributed to the child."""
        if payload:
            log.forwarded(payload[0], f"pre-auth[{self.child_pid}]", payload[1:])

    def _drain(self) -> None:
        """The child is gone: write the lines it logged since root last read (as a TLS relay)."""
        try:
            while (frame := recv(self.rfd)) is not None:
                if frame[0] == b"L":
                    self._log(frame[1])
        except (FrameError, OSError):
            pass

    def _transaction(
        self, conn: Connection, request: _Request, account: object, failures: int, reap: bool = False
    ) -> int:
        """The child is out of the way (killed; with `reap`, reaped here before the connection is
        touched): become the account, open the maildrop, serve the session.

        What the client sent after PASS reaches the core only once this process is the account.
        If the maildrop cannot be opened (before the drop, e.g. `%h` with no home directory, or
        after it, e.g. [IN-USE]), the core answers the error and closes: root writes that one
        reply and reads nothing.
        """
        conn.bytes_in += request.bytes_in
        conn.bytes_out += request.bytes_out
        session = Session(self.config, conn, self.peer)
        session.core.resume(request.user, request.commands, failures)
        session.open_maildrop(account)  # signals held off until the maildrop is the session's
        if session.maildrop is not None and request.pending:
            session.core.receive_data(request.pending)
        # From here a stop signal must go through the session's own ending (no update, every
        # lock released): the reap runs inside it.
        session.run(before=(lambda: self._stop(None)) if reap else None)
        return 0


class _Request:
    """A credential check asked by the child, with the state root needs to take the session over."""

    __slots__ = ("bytes_in", "bytes_out", "commands", "password", "pending", "secure", "user")

    def __init__(self, user: bytes, password: bytes, pending: bytes, numbers: list[int]) -> None:
        self.user = user
        self.password = password
        self.pending = pending
        self.commands, self.bytes_in, self.bytes_out, flags = numbers
        self.secure = bool(flags & _SECURE)

    def __repr__(self) -> str:  # never the password
        return f"_Request(user={self.user!r})"


_NUMBERS = 4  # commands, bytes in, bytes out, flags: 8 octets each
_HEADER = 8 * _NUMBERS


def encode_request(
    user: bytes, password: bytes, pending: bytes, numbers: tuple[int, int, int], secure: bool = False
) -> bytes:
    """Counters and flags (4 x 8 octets), user (2-octet length), password (4-octet length), pending."""
    return (
        b"".join(n.to_bytes(8, "big") for n in (*numbers, _SECURE if secure else 0))
        + len(user).to_bytes(2, "big")
        + user
        + len(password).to_bytes(4, "big")
        + password
        + pending
    )


def _parse_request(payload: bytes) -> _Request:
    if len(payload) < _HEADER + 2:
        raise FrameError("short request frame")
    numbers = [int.from_bytes(payload[i : i + 8], "big") for i in range(0, _HEADER, 8)]
    user_end = _HEADER + 2 + int.from_bytes(payload[_HEADER : _HEADER + 2], "big")
    if len(payload) < user_end + 4:
        raise FrameError("malformed request frame")
    password_end = user_end + 4 + int.from_bytes(payload[user_end : user_end + 4], "big")
    if len(payload) < password_end:
        raise FrameError("malformed request frame")
    user, password = payload[_HEADER + 2 : user_end], payload[user_end + 4 : password_end]
    return _Request(user, password, payload[password_end:], numbers)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reaped(pid: int, flags: int) -> bool:
    """waitpid: True once the child is gone (reaped now or before)."""
    while True:
        try:
            return os.waitpid(pid, flags)[0] == pid
        except InterruptedError:
            continue
        except ChildProcessError:
            return True


# ------------------------------------------------------------------------------ child side


class _Child:
    """The pre-authentication process: confined, then the dialogue; perhaps a TLS relay after."""

    def __init__(
        self,
        config: Config,
        conn: Connection,
        peer: str,
        wfd: int,
        rfd: int,
        relay: int,
        root: int,
        proxy: Client | None = None,
    ) -> None:
        self.config = config
        self.conn = conn
        self.peer = peer
        self.wfd = wfd
        self.rfd = rfd
        self.relay = relay
        self.root = root  # a descriptor of the empty directory to chroot into
        self.proxy = proxy  # a proxy at the other end: its PROXY header comes first

    def run(self, uid: int, gid: int, greeting_sent: bool) -> int:
        from pop3d import privs

        config = self.config
        # Descriptors it may still make: one for the TLS socket object, one for the moment
        # plaintext_on_loopback looks at the peer (transport.peer_is_local).
        spare = (config.tls != "none") + bool(config.plaintext_on_loopback)
        privs.confine(uid, gid, self.root, spare)  # or raise: never serve unconfined
        local = None
        if self.proxy is not None:
            from pop3d import proxied

            try:
                client = proxied.read_header(config, self.conn.rfd, self.proxy)
            except SessionEnd:
                return 0  # logged: no valid header in time
            send(self.wfd, b"P", (b"\1" if client.local else b"\0") + client.address.encode())
            frame = recv(self.rfd)
            if frame is None or frame[0] != b"G":
                return 0  # root turned the client away (max_sessions_per_ip), or is gone
            self.peer, local = client.address, client.local
        transport: Connection | TlsConnection = self.conn
        if config.tls == "implicit":
            try:
                transport = start_tls(config, self.conn, self.peer)
            except SessionEnd:
                return 0  # logged: the handshake failed, timed out, or the client left
        if not greeting_sent:
            transport.write_all(protocol.GREETING)
        PreauthSession(config, transport, self.peer, self, local).run()
        return 0


class PreauthSession(Session):
    """The AUTHORIZATION dialogue, unprivileged: credentials go to the root process to check."""

    def __init__(
        self,
        config: Config,
        conn: Connection | TlsConnection,
        peer: str,
        child: _Child,
        local: bool | None = None,
    ) -> None:
        super().__init__(config, conn, peer, local)
        self.child = child

    def _authenticate(self, request: protocol.Authenticate) -> None:
        """Ask root. A success is answered by root itself: after it has killed this process, or,
        with TLS, through this process become a relay (which never returns)."""
        self._flush()  # earlier replies (USER's +OK) go out first
        numbers = (self.core.stats["commands"], self.conn.bytes_in, self.conn.bytes_out)
        pending = self.core.pending_bytes()
        payload = encode_request(request.user, request.password, pending, numbers, self.conn.secure)
        send(self.child.wfd, b"A", payload)
        frame = recv(self.child.rfd)
        if frame is not None and frame[0] == b"R" and self.conn.secure and self.child.relay >= 0:
            # Root reads this pipe again only at the end: a line that does not fit is dropped.
            os.set_blocking(self.child.wfd, False)
            status = 0
            try:
                relay(self.conn, self.child.relay)  # type: ignore[arg-type]
            except BaseException:
                status = 1
            os._exit(status)
        if frame is None or frame[0] != b"F":
            raise SessionEnd("error")  # root is gone, or broke the framing
        code = frame[1]
        self.core.auth_failed(code if code in _CODES else protocol.SYS_TEMP)


def relay(tls: TlsConnection, fd: int) -> None:
    """Copy plaintext between the client's TLS connection and root's session on `fd`, until root
    closes its end; then close TLS properly.

    Never blocks on `fd` (root may be busy writing to it): client bytes wait in a bounded buffer,
    and the client is not read while it is full. Writes to the client block (with the write
    timeout), as they would in the session itself.
    """
    import select

    try:
        from _socket import SHUT_WR, socket
    except ImportError:  # pragma: no cover - other interpreters
        from socket import SHUT_WR, socket

    os.set_blocking(fd, False)
    # A client that stops reading is the session's to judge (it logs "write-timeout" and ends
    # without an update): the relay, blocked first, must not time out first and make it look
    # like a disconnect. It still ends on its own, later, if the session is gone.
    tls.write_timeout = 2 * tls.write_timeout + 1.0
    tls_fd = tls.sock.fileno()
    to_root = bytearray()
    client_open = True
    shut = False
    while True:
        readers = [fd]
        if client_open and len(to_root) < _RELAY_BUFFER:
            readers.append(tls_fd)
        writers = [fd] if to_root else []
        # Decrypted bytes may wait inside the TLS object, where select() cannot see them; the
        # timeout also retries a read that needed the socket writable (rare: renegotiation is off).
        waiting = client_open and len(to_root) < _RELAY_BUFFER and tls.wait_readable(0)
        readable, writable, _ = select.select(readers, writers, [], 0 if waiting else 1.0)
        if waiting or tls_fd in readable:
            data = tls.read()
            if data == b"":
                client_open = False
            elif data:
                to_root += data
        if to_root and (fd in writable or not writers):
            try:
                written = os.write(fd, to_root)
            except BlockingIOError:
                written = 0
            del to_root[:written]
        if not client_open and not to_root and not shut:
            sock = socket(fileno=fd)
            try:
                sock.shutdown(SHUT_WR)  # root's session sees the client's end of input
            except OSError:
                pass
            finally:
                sock.detach()
            shut = True
        if fd in readable:
            try:
                data = os.read(fd, 256 * 1024)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                break
            tls.write_all(data)
    tls.close()


def _hand_logging_to_root(fd: int) -> None:
    """The child keeps no descriptor of a log (the log file, syslog's socket, stderr): it
    could truncate the log or forge lines (`login: user=root`). Its lines go to root on `fd`
    as frames (`L`, the level, the text), each small enough for one atomic pipe write."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)

    def sink(level: int, line: str) -> None:
        text = line.encode("utf-8", "backslashreplace")[: limits.MAX_FORWARDED_LOG_LINE]
        try:
            send(fd, b"L", bytes((level,)) + text)
        except (BlockingIOError, SessionEnd):
            pass  # root is not reading (a full pipe) or gone: the line is lost, not the session

    log.redirect(sink)


def _preload_child() -> None:
    """What the confined child may need: it can open no file (no import) once confined.

    Kept small: it is CPU spent on every connection (log.exception needs no `traceback`).
    """
    import binascii  # noqa: F401  (SASL)
    import resource  # noqa: F401

    from pop3d import privs  # noqa: F401


# ------------------------------------------------------------------------------ frames


def send(fd: int, kind: bytes, payload: bytes) -> None:
    """One frame: kind (1 octet), payload length (4 octets, big-endian), payload."""
    view = memoryview(kind + len(payload).to_bytes(4, "big") + payload)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            raise SessionEnd("error") from None
        view = view[written:]


def recv(fd: int) -> tuple[bytes, bytes] | None:
    """The next frame, or None if the other side closed the pipe between frames."""
    header = _read_exact(fd, 5)
    if header is None:
        return None
    length = int.from_bytes(header[1:], "big")
    if length > _MAX_FRAME:
        raise FrameError(f"frame of {length} octets")
    payload = _read_exact(fd, length) if length else b""
    if payload is None:
        raise FrameError("truncated frame")
    return header[:1], payload


def _read_exact(fd: int, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = os.read(fd, count - len(data))
        if not chunk:
            if data:
                raise FrameError("truncated frame")
            return None
        data += chunk
    return data


def _reply(conn: Connection, data: bytes) -> None:
    try:
        conn.write_all(data)
    except (SessionEnd, OSError):
        pass
