"""Privilege separation for a session started as root (popa3d's design; Dovecot's login process).

    root process (this one)                     pre-authentication child
    greeting, fork  --------------------------> confine: chroot into an empty directory, become
                                                `preauth_user`, no new processes or descriptors
    waits on a pipe; reads no client byte       the AUTHORIZATION dialogue with the client
                    <-- A(user, password, ------ on PASS (or AUTH): flush, then ask, with what
                          input not processed      the client sent after PASS and the counters
                          yet, counters)
    login.authenticate (PAM / htpasswd, padded
    to auth_failure_delay, counted)  --------> F(code): the child answers -ERR, goes on
    or success: kills the child, becomes the
    account for good, opens the maildrop,
    serves TRANSACTION from where the child was

Client bytes are parsed by the unprivileged child only. Root parses nothing but the frames of
this module (a kind byte, a 4-octet length, a bounded payload) and runs only the credential
check. The child cannot outlive the handover with the connection (it is killed and cannot
fork), and root enforces the failure delay and max_auth_failures itself, so even a subverted
child gets no more guesses than a client.
"""

from __future__ import annotations

import os
import signal

from pop3d import log, protocol
from pop3d.session import Session, SessionEnd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config
    from pop3d.session import Connection

# Frames larger than this are a protocol violation: credentials are at most a SASL line each,
# the pending input at most what the session buffers (limits.MAX_PENDING_INPUT + a read).
_MAX_FRAME = 256 * 1024
_CODES = (protocol.AUTH, protocol.IN_USE, protocol.SYS_TEMP, protocol.SYS_PERM)
# Seconds a child asked to stop (SIGTERM) has before it is killed.
_TERM_GRACE = 2.0
_CONFIG_ERROR = b"-ERR [SYS/PERM] Server configuration error; contact the administrator.\r\n"


class FrameError(Exception):
    """The other process broke the framing: end the session."""


def serve(config: Config, conn: Connection, peer: str) -> int:
    """Serve one session (greeting already sent) with the dialogue in a confined child."""
    import pwd

    name = str(config.preauth_user)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = None
    if entry is None or entry.pw_uid == 0:
        log.error(f"preauth_user {name!r} does not exist or is root: cannot serve")
        _reply(conn, _CONFIG_ERROR)
        return 0
    _preload_child()
    import gc

    gc.freeze()  # a collection in either process would touch, and so copy, every shared page
    to_root_r, to_root_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    # Until each side is inside its handler, a SIGTERM must wait: no child may be left behind.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP, signal.SIGINT})
    try:
        pid = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.error(f"cannot fork the pre-authentication process: {e.strerror}")
        _reply(conn, protocol.REPLIES["sys_temp"])
        return 0
    if pid == 0:
        status = 70
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(to_root_r)
            os.close(to_child_w)
            status = _child(config, conn, peer, entry.pw_uid, entry.pw_gid, to_root_w, to_child_r)
        except BaseException:
            log.exception("pre-authentication process")
        finally:
            os._exit(status)
    monitor = _Monitor(config, conn, peer, pid, to_root_r, to_child_w)
    os.close(to_root_w)
    os.close(to_child_r)
    return monitor.run(mask)


# ------------------------------------------------------------------------------ root side


class _Monitor:
    """The root process while the child talks to the client: one credential check per request."""

    def __init__(self, config: Config, conn: Connection, peer: str, pid: int, rfd: int, wfd: int) -> None:
        self.config = config
        self.conn = conn
        self.peer = peer
        self.pid = pid
        self.rfd = rfd
        self.wfd = wfd

    def run(self, mask: set[signal.Signals] | None = None) -> int:
        """Answer the child's credential checks; then serve the session, or end with the child."""
        failures = 0
        allowed = int(self.config.max_auth_failures)  # type: ignore[call-overload]
        try:  # from the first instruction: a SIGTERM anywhere must also end the child
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            from pop3d import auth, login

            # The client is still typing: load what the check and the session need now.
            login.preload()
            if self.config.auth == "system":
                try:
                    auth.preload_pam()
                except auth.AuthUnavailableError:
                    pass  # said again, and answered [SYS/TEMP], at the check
            while True:
                frame = recv(self.rfd)
                if frame is None:
                    break  # the session ended before a login: QUIT, EOF, timeout, ...
                kind, payload = frame
                if kind != b"A" or failures >= allowed:
                    raise FrameError(f"unexpected frame {kind!r} after {failures} failures")
                request = _parse_request(payload)
                outcome = login.authenticate(self.config, request.user, request.password, self.peer)
                if isinstance(outcome, bytes):
                    failures += outcome == protocol.AUTH
                    send(self.wfd, b"F", outcome)
                    continue
                # The child is waiting for the answer and reads nothing meanwhile: whatever the
                # client sent after the request is in `pending` or still in the socket.
                self._stop(signal.SIGKILL)
                return self._transaction(request, outcome)
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

    def _stop(self, signum: int | None) -> None:
        """End the child (or just wait for it), reap it, close the pipes.

        A child asked to stop with SIGTERM gets a moment to log how the session ended; one
        that does not stop then is killed.
        """
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
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.rfd = self.wfd = -1

    def _transaction(self, request: _Request, account: object) -> int:
        """The child is gone: become the account, open the maildrop, serve the session."""
        from pop3d import login

        self.conn.bytes_in += request.bytes_in
        self.conn.bytes_out += request.bytes_out
        session = Session(self.config, self.conn, self.peer)
        session.core.resume(request.user, request.pending, request.commands)
        session.enter_transaction(login.open_maildrop(self.config, account, self.peer))  # type: ignore[arg-type]
        session.run()
        return 0


class _Request:
    """A credential check asked by the child, with the state root needs to take the session over."""

    __slots__ = ("bytes_in", "bytes_out", "commands", "password", "pending", "user")

    def __init__(self, user: bytes, password: bytes, pending: bytes, numbers: list[int]) -> None:
        self.user = user
        self.password = password
        self.pending = pending
        self.commands, self.bytes_in, self.bytes_out = numbers

    def __repr__(self) -> str:  # never the password
        return f"_Request(user={self.user!r})"


def encode_request(user: bytes, password: bytes, pending: bytes, numbers: tuple[int, int, int]) -> bytes:
    """Counters (3 x 8 octets), user (2-octet length), password (4-octet length), pending input."""
    return (
        b"".join(n.to_bytes(8, "big") for n in numbers)
        + len(user).to_bytes(2, "big")
        + user
        + len(password).to_bytes(4, "big")
        + password
        + pending
    )


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


def _parse_request(payload: bytes) -> _Request:
    if len(payload) < 26:
        raise FrameError("short request frame")
    numbers = [int.from_bytes(payload[i : i + 8], "big") for i in (0, 8, 16)]
    user_end = 26 + int.from_bytes(payload[24:26], "big")
    if len(payload) < user_end + 4:
        raise FrameError("malformed request frame")
    password_end = user_end + 4 + int.from_bytes(payload[user_end : user_end + 4], "big")
    if len(payload) < password_end:
        raise FrameError("malformed request frame")
    return _Request(
        payload[26:user_end], payload[user_end + 4 : password_end], payload[password_end:], numbers
    )


# ------------------------------------------------------------------------------ child side


class PreauthSession(Session):
    """The AUTHORIZATION dialogue, unprivileged: credentials go to the root process to check."""

    def __init__(self, config: Config, conn: Connection, peer: str, wfd: int, rfd: int) -> None:
        super().__init__(config, conn, peer)
        self.wfd = wfd
        self.rfd = rfd

    def _authenticate(self, request: protocol.Authenticate) -> None:
        """Ask root; a success is answered by root itself, after it has killed this process."""
        self._flush()  # earlier replies (USER's +OK) go out first
        numbers = (self.core.stats["commands"], self.conn.bytes_in, self.conn.bytes_out)
        payload = encode_request(request.user, request.password, self.core.pending_bytes(), numbers)
        send(self.wfd, b"A", payload)
        frame = recv(self.rfd)
        if frame is None or frame[0] != b"F":
            raise SessionEnd("error")  # root is gone, or broke the framing
        code = frame[1]
        self.core.auth_failed(code if code in _CODES else protocol.SYS_TEMP)


def _child(config: Config, conn: Connection, peer: str, uid: int, gid: int, wfd: int, rfd: int) -> int:
    from pop3d import privs

    missing = privs.confine(uid, gid)
    if missing:
        log.warning(f"pre-authentication process: {missing}")
    PreauthSession(config, conn, peer, wfd, rfd).run()
    return 0


def _preload_child() -> None:
    """What the confined child may need: it can open no file (no import) once confined.

    Kept small: it is CPU spent on every connection (log.exception needs no `traceback`).
    """
    import binascii  # noqa: F401  (SASL)
    import resource  # noqa: F401
    import time

    time.localtime()  # reads the time zone now: /etc/localtime is out of reach later

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
