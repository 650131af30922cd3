"""The loop of one POP3 session, whichever process runs it: owns the connection's transport,
the timers and the maildrop once opened.

It feeds client bytes to the protocol core, performs what the core requests through the adapters
(auth, privileges, maildrop), turns adapter exceptions into response codes in one table, and
logs. It knows no POP3 syntax itself. Who runs it, and how it starts (privilege separation or
not, implicit TLS), is the drivers' (`dispatch`, `privsep`).
"""

from __future__ import annotations

import os
import time

from pop3d import limits, log, protocol, wire
from pop3d.transport import (
    SessionEnd,
    ignore_stop_signals,
    peer_is_local,
    signal_module,
    start_tls,
    stop_signals,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from pop3d.config import Config
    from pop3d.maildrop import Maildrop
    from pop3d.transport import Connection, TlsConnection


# SASL mechanisms offered (RFC 5034); the core shows them only where plaintext passwords may go.
SASL_MECHANISMS = (b"PLAIN", b"LOGIN")


class Session:
    """One POP3 session from greeting to close."""

    def __init__(
        self,
        config: Config,
        conn: Connection | TlsConnection,
        peer: str = "unknown",
        local: bool | None = None,
    ) -> None:
        """`peer`: the client's address; `local`: whether it is on this host (None: ask the socket;
        a client behind a proxy is what its PROXY header says, see proxied)."""
        self.config = config
        self.conn = conn
        self.peer = peer
        self.local = local
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
            bool(config.plaintext_on_loopback)
            and not secure
            and (peer_is_local(self.conn.rfd) if self.local is None else self.local)
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
            try:
                ignore_stop_signals()
            except SessionEnd:
                self.end_reason = "signal"  # one that arrived just before: the only one
            self._close_maildrop()
            self.conn.close()
            self._log_logout()

    def _loop(self) -> None:
        core = self.core
        config = self.config
        idle_timeout = float(config.timeout)  # type: ignore[arg-type]
        line_timeout = float(config.line_timeout)  # type: ignore[arg-type]
        # The whole AUTHORIZATION phase, from the connection's start: commands do not extend it.
        login_deadline = self.conn.started + float(config.login_timeout)  # type: ignore[arg-type]
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
                if not isinstance(request, protocol.Retrieve):  # see _retrieve
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
            logging_in = core.state == protocol.AUTHORIZATION
            if logging_in:
                deadline = min(deadline, login_deadline)
            data = None
            while data is None:
                now = time.monotonic()
                if now >= deadline:
                    if logging_in and now >= login_deadline:
                        core.login_timed_out()
                    else:
                        core.timed_out()
                    break
                self._refresh_lock(now)
                wait = min(deadline - now, self._refresh_every)
                if self.conn.wait_readable(wait):
                    if os.geteuid() == 0:  # privsep: root answers, but never reads the client
                        raise RuntimeError("refusing to read the client as root")
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
        would otherwise stall ~40 ms per message on our small last write).

        Bytes read are proven to be still the listed message's (`maildrop.verify`: with brief MDA
        locks a mail reader may rewrite the spool meanwhile) before they are sent, and after the
        last read. The "+OK" is still the core's when this starts (_loop leaves it there): if the
        first proof fails, the core takes it back and answers -ERR; a later one ends the session
        without the final "." line, so the client never takes a part for the whole."""
        assert self.maildrop is not None
        md = self._md
        if md is None:  # imported once, after login (not on the greeting's path)
            from pop3d import maildrop as md

            self._md = md
        core = self.core
        chunks = None
        maildrop = self.maildrop
        index = request.index
        try:
            data = maildrop.message_bytes(index, wire=True) if request.body_lines is None else None
            if data is None:
                chunks = maildrop.iter_message(index, request.body_lines, wire=True)
            maildrop.verify(index)
        except md.MaildropChangedError as e:
            log.error(f"retrieval refused: {e}")
            core.retrieve_failed()
            return
        except md.MaildropTempError as e:  # as below: nothing of this reply may leave now
            log.error(f"retrieval aborted: {e}")
            self._out = bytearray()
            raise SessionEnd("spool-changed") from None
        self._take(core.data_to_send())
        if data is not None:  # a small message: one read, one copy, no generators (same bytes)
            out = self._out
            out += data  # dot-stuffed, ending with CRLF (or empty)
            out += wire.TERMINATOR
            core.retrieve_done()
            return
        assert chunks is not None
        parts: list[bytes | bytearray] = [self._out] if self._out else []  # the "+OK" line
        last = b"\n"
        held = len(self._out)
        try:
            for chunk in chunks:
                if held >= limits.OUTPUT_FLUSH:  # never the last piece: it goes with the terminator
                    maildrop.verify(index)
                    self.conn.write_parts(parts)
                    parts, held = [], 0
                    self._refresh_lock(time.monotonic())
                if chunk:  # dot-stuffed already
                    parts.append(chunk)
                    held += len(chunk)
                    last = chunk
                    if request.body_lines is not None:
                        self.top_bytes += len(chunk)
            maildrop.verify(index)
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
        core.retrieve_done()

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

        signal = signal_module()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
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
        [SYS/*]) and the end of the session: the process is root (a failure before the drop)
        or the account by then, and neither may go on with the dialogue (issue 12)."""
        if isinstance(opened, bytes):
            self.core.maildrop_failed(opened)
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

        signal = signal_module()
        # QUIT was received in full: a SIGTERM now must not cut the update short.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
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
            signal = signal_module()
            old = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
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
