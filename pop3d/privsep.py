"""Privilege separation for a session started as root (popa3d's design; Dovecot's login process).

    root process (this one)                     pre-authentication child
    greeting, fork  --------------------------> confine: chroot into an empty directory, become
                                                `preauth_user`, no new processes or descriptors
    waits on a pipe; reads no client byte       the AUTHORIZATION dialogue with the client
                    <-- A(user, password) ----- on PASS (or AUTH): flush, ask
    login.authenticate (PAM / htpasswd, padded
    to auth_failure_delay, counted)  --------> F(code): the child answers -ERR, goes on
                                      --------> S: the child sends what it has not processed
                    <-- H(pending input, counters)
    kills the child, becomes the account for
    good, opens the maildrop, serves TRANSACTION

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
    to_root_r, to_root_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        log.error(f"cannot fork the pre-authentication process: {e.strerror}")
        _reply(conn, protocol.REPLIES["sys_temp"])
        return 0
    if pid == 0:
        status = 70
        try:
            os.close(to_root_r)
            os.close(to_child_w)
            status = _child(config, conn, peer, entry.pw_uid, entry.pw_gid, to_root_w, to_child_r)
        except BaseException:
            log.exception("pre-authentication process")
        finally:
            os._exit(status)
    os.close(to_root_w)
    os.close(to_child_r)
    return _Monitor(config, conn, peer, pid, to_root_r, to_child_w).run()


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

    def run(self) -> int:
        from pop3d import auth, login

        # The client is still typing: load the credential backend now, not after PASS.
        if self.config.auth == "system":
            try:
                auth.preload_pam()
            except auth.AuthUnavailableError:
                pass  # said again, and answered [SYS/TEMP], at the check
        failures = 0
        allowed = int(self.config.max_auth_failures)  # type: ignore[call-overload]
        try:
            while True:
                frame = recv(self.rfd)
                if frame is None:
                    break  # the session ended before a login: QUIT, EOF, timeout, ...
                kind, payload = frame
                if kind != b"A" or failures >= allowed:
                    raise FrameError(f"unexpected frame {kind!r} after {failures} failures")
                user, password = _parse_credentials(payload)
                outcome = login.authenticate(self.config, user, password, self.peer)
                if isinstance(outcome, bytes):
                    failures += outcome == protocol.AUTH
                    send(self.wfd, b"F", outcome)
                    continue
                send(self.wfd, b"S", b"")
                frame = recv(self.rfd)
                if frame is None or frame[0] != b"H":
                    raise FrameError("no handover after a successful login")
                state = _parse_handover(frame[1])
                self._stop(signal.SIGKILL)
                return self._transaction(user, outcome, state)
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
        """End the child (or just wait for it), reap it, close the pipes."""
        if self.pid:
            if signum is not None:
                try:
                    os.kill(self.pid, signum)
                except ProcessLookupError:
                    pass
            while True:
                try:
                    os.waitpid(self.pid, 0)
                except InterruptedError:
                    continue
                except ChildProcessError:
                    pass
                break
            self.pid = 0
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.rfd = self.wfd = -1

    def _transaction(self, user: bytes, account: object, state: tuple[int, int, int, bytes]) -> int:
        """The child is gone: become the account, open the maildrop, serve the session."""
        from pop3d import login

        commands, bytes_in, bytes_out, pending = state
        self.conn.bytes_in += bytes_in
        self.conn.bytes_out += bytes_out
        session = Session(self.config, self.conn, self.peer)
        session.core.resume(user, pending, commands)
        session.enter_transaction(login.open_maildrop(self.config, account, self.peer))  # type: ignore[arg-type]
        session.run()
        return 0


def _parse_credentials(payload: bytes) -> tuple[bytes, bytes]:
    if len(payload) < 2:
        raise FrameError("short credentials frame")
    length = int.from_bytes(payload[:2], "big")
    if len(payload) < 2 + length:
        raise FrameError("malformed credentials frame")
    return payload[2 : 2 + length], payload[2 + length :]


def _parse_handover(payload: bytes) -> tuple[int, int, int, bytes]:
    if len(payload) < 24:
        raise FrameError("short handover frame")
    numbers = [int.from_bytes(payload[i : i + 8], "big") for i in (0, 8, 16)]
    return numbers[0], numbers[1], numbers[2], payload[24:]


# ------------------------------------------------------------------------------ child side


class PreauthSession(Session):
    """The AUTHORIZATION dialogue, unprivileged: credentials go to the root process to check."""

    def __init__(self, config: Config, conn: Connection, peer: str, wfd: int, rfd: int) -> None:
        super().__init__(config, conn, peer)
        self.wfd = wfd
        self.rfd = rfd

    def _authenticate(self, request: protocol.Authenticate) -> None:
        self._flush()  # earlier replies (USER's +OK) go out first; after S, root writes
        user, password = request.user, request.password
        send(self.wfd, b"A", len(user).to_bytes(2, "big") + user + password)
        frame = recv(self.rfd)
        if frame is None:
            raise SessionEnd("error")
        kind, payload = frame
        if kind == b"S":
            raise SessionEnd("handover")
        if kind != b"F":
            raise SessionEnd("error")
        self.core.auth_failed(payload if payload in _CODES else protocol.SYS_TEMP)

    def handover(self) -> None:
        """Tell root what the client sent after PASS and what was counted; then say nothing more."""
        stats = self.core.stats["commands"]
        numbers = b"".join(n.to_bytes(8, "big") for n in (stats, self.conn.bytes_in, self.conn.bytes_out))
        send(self.wfd, b"H", numbers + self.core.pending_bytes())

    def _log_logout(self) -> None:
        if self.end_reason != "handover":
            super()._log_logout()


def _child(config: Config, conn: Connection, peer: str, uid: int, gid: int, wfd: int, rfd: int) -> int:
    from pop3d import privs

    missing = privs.confine(uid, gid)
    if missing:
        log.warning(f"pre-authentication process: {missing}")
    session = PreauthSession(config, conn, peer, wfd, rfd)
    session.run()
    if session.end_reason == "handover":
        session.handover()
    return 0


def _preload_child() -> None:
    """What the confined child may need: it can open no file (no import) once confined."""
    import binascii  # noqa: F401  (SASL)
    import resource  # noqa: F401
    import time
    import traceback  # noqa: F401  (log.exception)

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
