"""The POP3 state machine (RFC 1939, RFC 2449, RFC 3206), without I/O.

The driver feeds received bytes in and takes replies out; whatever needs the world (checking a
password, opening the maildrop, streaming a message, applying deletions, TLS) comes out as a
request object, and the driver reports its outcome back. Every error text on the wire lives here.
"""

from __future__ import annotations

from pop3d import limits, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    class Listing:  # the shape of mbox.Listing, as far as the core cares
        count: int
        total_size: int

        def size(self, index: int) -> int: ...
        def uid(self, index: int) -> bytes: ...
        def sizes(self, lo: int, hi: int) -> list[int]: ...
        def uids(self, lo: int, hi: int) -> list[bytes]: ...


AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"
CLOSED = "CLOSED"

# Outcome codes a driver reports for a failed login (RFC 2449 / RFC 3206 response codes).
AUTH = b"AUTH"
IN_USE = b"IN-USE"
SYS_TEMP = b"SYS/TEMP"
SYS_PERM = b"SYS/PERM"

GREETING = wire.ok(b"POP3 server ready")

# Every -ERR text the server sends, with its response code. Nothing else reaches the wire.
REPLIES: dict[str, bytes] = {
    "auth_failed": wire.err(b"Authentication failed.", AUTH),
    "in_use": wire.err(b"Maildrop is locked by another session; try again later.", IN_USE),
    "sys_temp": wire.err(b"Temporary server failure; try again later.", SYS_TEMP),
    "sys_perm": wire.err(b"The maildrop cannot be served; contact the administrator.", SYS_PERM),
    "unknown": wire.err(b"Unknown command."),
    "wrong_state": wire.err(b"Command not valid in this state."),
    "too_long": wire.err(b"Line too long."),
    "syntax": wire.err(b"Syntax error in arguments."),
    "no_such_message": wire.err(b"No such message."),
    "deleted": wire.err(b"Message is deleted."),
    "user_first": wire.err(b"Send USER first."),
    "no_plaintext": wire.err(b"Plaintext authentication is disallowed; use STLS first.", AUTH),
    "too_many_bad": wire.err(b"Too many bad commands; closing."),
    "too_many_auth": wire.err(b"Too many authentication failures; closing.", AUTH),
    # Standalone limits (server, proxied): the connection is turned away before the greeting.
    "busy": wire.err(b"Too many sessions; try again later.", SYS_TEMP),
    "busy_address": wire.err(b"Too many sessions from your address; try again later.", SYS_TEMP),
    "autologout": wire.err(b"Autologout: idle for too long."),
    "login_timeout": wire.err(b"Autologout: no login in time."),
    "update_failed": wire.err(b"Deletions not applied (server failure); try again later.", SYS_TEMP),
    "no_tls": wire.err(b"STLS is not available."),
    "tls_active": wire.err(b"TLS is already active."),
    "sasl_cancelled": wire.err(b"Authentication cancelled."),
    "sasl_bad": wire.err(b"Invalid SASL response."),
    "sasl_mech": wire.err(b"Unsupported authentication mechanism."),
}

FAILURE_REPLY = {AUTH: "auth_failed", IN_USE: "in_use", SYS_TEMP: "sys_temp", SYS_PERM: "sys_perm"}


class Authenticate:
    """Check these credentials and, on success, lock and scan the maildrop."""

    __slots__ = ("password", "user")

    def __init__(self, user: bytes, password: bytes) -> None:
        self.user = user
        self.password = password

    def __repr__(self) -> str:  # never show the password, not even in a traceback
        return f"Authenticate(user={self.user!r})"


class Retrieve:
    """Write message `index` (all of it, or its header and `body_lines` lines), dot-stuffed."""

    __slots__ = ("body_lines", "index")

    def __init__(self, index: int, body_lines: int | None) -> None:
        self.index = index
        self.body_lines = body_lines

    def __repr__(self) -> str:
        return f"Retrieve({self.index}, {self.body_lines})"


class Commit:
    """Apply the deletions (QUIT from TRANSACTION): the UPDATE state."""

    __slots__ = ("deleted",)

    def __init__(self, deleted: frozenset[int]) -> None:
        self.deleted = deleted

    def __repr__(self) -> str:
        return f"Commit({sorted(self.deleted)})"


class StartTLS:
    """Wrap the connection in TLS now; the `+OK` is already queued and must be sent first."""

    __slots__ = ()


class Close:
    """The session is over: flush the output and close. `reason` is for the logout log line."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Close({self.reason!r})"


class Options:
    """What the core may offer; the driver decides from configuration and connection state."""

    __slots__ = (
        "implementation",
        "max_auth_failures",
        "max_bad_commands",
        "plaintext_allowed",
        "sasl_mechanisms",
        "stls_available",
    )

    def __init__(
        self,
        *,
        implementation: bytes = b"pop3d",
        plaintext_allowed: bool = True,
        stls_available: bool = False,
        sasl_mechanisms: tuple[bytes, ...] = (),
        max_bad_commands: int = limits.MAX_BAD_COMMANDS,
        max_auth_failures: int = limits.DEFAULT_MAX_AUTH_FAILURES,
    ) -> None:
        self.implementation = implementation
        self.plaintext_allowed = plaintext_allowed
        self.stls_available = stls_available
        self.sasl_mechanisms = sasl_mechanisms
        self.max_bad_commands = max_bad_commands
        self.max_auth_failures = max_auth_failures


class Pop3Core:
    """One POP3 session's protocol state. Feed bytes in, take replies and requests out."""

    def __init__(self, options: Options | None = None, *, greet: bool = True) -> None:
        self.options = options or Options()
        self.state = AUTHORIZATION
        self.tls_active = False
        self._reader = wire.LineReader()
        self._out = bytearray(GREETING if greet else b"")
        self._eof = False
        self._awaiting: object | None = None  # the request whose outcome we wait for
        self._ok_at = 0  # where the +OK of the Retrieve awaited starts in _out
        self._closing: Close | None = None
        self._close_returned = False
        self._user: bytes | None = None
        self._sasl: _SaslExchange | None = None
        self._bad_commands = 0
        self._auth_failures = 0
        self._listing: Listing | None = None
        self._deleted: set[int] = set()
        # A LIST/UIDL of all messages still being written: (line format, values of a range of
        # messages, next index).
        self._listing_rest: tuple[bytes, Callable[[int, int], list], int] | None = None
        self.stats = {"retr": 0, "retr_bytes": 0, "top": 0, "commands": 0}
        self._tables: dict[str, dict[bytes, Callable[[list[bytes], bytes], object]]] = {
            AUTHORIZATION: {
                b"USER": self._cmd_user,
                b"PASS": self._cmd_pass,
                b"AUTH": self._cmd_auth,
                b"STLS": self._cmd_stls,
                b"CAPA": self._cmd_capa,
                b"QUIT": self._cmd_quit,
            },
            TRANSACTION: {
                b"STAT": self._cmd_stat,
                b"LIST": self._cmd_list,
                b"UIDL": self._cmd_uidl,
                b"RETR": self._cmd_retr,
                b"TOP": self._cmd_top,
                b"DELE": self._cmd_dele,
                b"RSET": self._cmd_rset,
                b"NOOP": self._cmd_noop,
                b"CAPA": self._cmd_capa,
                b"QUIT": self._cmd_quit,
            },
        }
        # Commands that exist in POP3 but not in the current state: "wrong state", not "unknown".
        self._known = set(self._tables[AUTHORIZATION]) | set(self._tables[TRANSACTION]) | {b"APOP"}

    # ----------------------------------------------------------------- driver interface

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means the client closed its side."""
        if self._closing is not None:
            return
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def pending_input(self) -> int:
        return self._reader.pending()

    def data_to_send(self) -> bytes | bytearray:
        out, self._out = self._out, bytearray()  # handed over, not copied (a listing can be MBs)
        return out

    def next_request(self) -> Authenticate | Retrieve | Commit | StartTLS | Close | None:
        """Process buffered lines until one needs the driver; None when input is exhausted."""
        while True:
            if self._closing is not None:
                if self._close_returned:
                    return None
                self._close_returned = True
                return self._closing
            if self._awaiting is not None:
                return None
            if self._listing_rest is not None:
                self._continue_listing()
            if len(self._out) >= limits.OUTPUT_FLUSH:
                return None  # let the driver send this first: a pipeline must not grow memory
            line = self._reader.next_line()
            if line is None:
                if self._eof:
                    self._close("eof")
                    continue
                return None
            request = self._handle_line(line)
            if request is not None:
                if not isinstance(request, Close):
                    self._awaiting = request
                return request

    def timed_out(self) -> None:
        """The idle or command-line timer expired: autologout, without update (RFC 1939)."""
        if self._closing is None:
            self._out += REPLIES["autologout"]
            self._close("timeout")

    def login_timed_out(self) -> None:
        """login_timeout expired in AUTHORIZATION, however busy the client kept it: close."""
        if self._closing is None:
            self._out += REPLIES["login_timeout"]
            self._close("login-timeout")

    def fail(self) -> None:
        """An unexpected error in the driver: answer [SYS/TEMP] if a reply is owed, close, no update."""
        if self._closing is None:
            if self._awaiting is not None:
                self._out += REPLIES["sys_temp"]
            self._awaiting = None
            self._close("error")

    def auth_succeeded(self, listing: Listing) -> None:
        self._expect(Authenticate)
        self._listing = listing
        self.state = TRANSACTION
        self._out += wire.ok(b"Logged in; %d messages (%d octets)." % (listing.count, listing.total_size))

    def auth_failed(self, code: bytes = AUTH) -> None:
        """Login refused. `code` says why: AUTH, IN_USE, SYS_TEMP or SYS_PERM."""
        self._expect(Authenticate)
        self._user = None
        if code == AUTH:
            self._auth_failures += 1
            if self._auth_failures >= self.options.max_auth_failures:
                self._out += REPLIES["too_many_auth"]
                self._close("auth-failures")
                return
        self._out += REPLIES[FAILURE_REPLY.get(code, "sys_temp")]

    def maildrop_failed(self, code: bytes) -> None:
        """The credentials were right, but the maildrop cannot be served (IN_USE, SYS_TEMP,
        SYS_PERM): say why, then close.

        RFC 1939 lets a server close after a failed PASS (Dovecot does, here). The process that
        holds the session now is root (a failure before its privilege drop) or the account: in
        neither may an AUTHORIZATION dialogue go on.
        """
        self._expect(Authenticate)
        self._user = None
        self._out += REPLIES[FAILURE_REPLY.get(code, "sys_temp")]
        self._close("maildrop-failed")

    def resume(self, user: bytes, commands: int = 0, failures: int = 0) -> Authenticate:
        """Take over a session whose AUTHORIZATION dialogue ran in another process.

        Privilege separation: an unprivileged process read USER/PASS, a privileged one accepted
        them. This core continues as if PASS for `user` had just been received, after `commands`
        commands and `failures` failed logins (the budget is the connection's, not a process's);
        the driver answers the returned request with `auth_succeeded` or `maildrop_failed`, and
        feeds what the client sent after PASS with `receive_data` once it may be read.
        """
        request = Authenticate(user, b"")
        self._user = user
        self._awaiting = request
        self.stats["commands"] = commands
        self._auth_failures = failures
        return request

    def pending_bytes(self) -> bytes:
        """Input received but not processed yet (handed over with `resume` in another process)."""
        return self._reader.pending_bytes()

    def retrieve_done(self) -> None:
        self._expect(Retrieve)

    def retrieve_failed(self) -> None:
        """The maildrop no longer holds the message listed: take back the "+OK" (the driver
        calls this before data_to_send(), so nothing of it has left), answer [SYS/TEMP] and
        close without update."""
        request = self._awaiting
        self._expect(Retrieve)
        assert isinstance(request, Retrieve) and self._out[self._ok_at : self._ok_at + 3] == b"+OK"
        del self._out[self._ok_at :]
        if request.body_lines is None:
            self.stats["retr"] -= 1
            self.stats["retr_bytes"] -= self._size_of(request.index)
        else:
            self.stats["top"] -= 1
        self._out += REPLIES["sys_temp"]
        self._close("spool-changed")

    def commit_done(self, error_code: bytes | None = None) -> None:
        """The update finished (None) or failed (SYS_TEMP/SYS_PERM: nothing was deleted)."""
        self._expect(Commit)
        if error_code is None:
            assert self._listing is not None
            left = self._listing.count - len(self._deleted)
            self._out += wire.ok(b"Bye; %d messages left." % left)
            self._close("quit")
        else:
            self._out += REPLIES["update_failed"]
            self._close("update-failed")

    def tls_started(self) -> None:
        """The handshake completed: nothing received before it counts; capabilities change."""
        self._expect(StartTLS)
        self.tls_active = True
        self._reader.discard()

    @property
    def deleted(self) -> frozenset[int]:
        return frozenset(self._deleted)

    # ----------------------------------------------------------------- internals

    def _expect(self, kind: type) -> None:
        if not isinstance(self._awaiting, kind):
            raise RuntimeError(f"no {kind.__name__} request is outstanding")
        self._awaiting = None

    def _close(self, reason: str) -> None:
        if self._closing is None:
            self._closing = Close(reason)
            self._reader.discard()

    def _bad(self, reply: str) -> None:
        self._bad_commands += 1
        if self._bad_commands >= self.options.max_bad_commands:
            self._out += REPLIES["too_many_bad"]
            self._close("bad-commands")
        else:
            self._out += REPLIES[reply]

    def _handle_line(self, line: bytes | wire.TooLong) -> object | None:
        if line is wire.TOO_LONG:
            if self._sasl is not None:
                self._end_sasl()
                self._out += REPLIES["sasl_bad"]
                return None
            self._bad("too_long")
            return None
        assert isinstance(line, bytes)
        if self._sasl is not None:
            return self._sasl_response(line)
        parsed = wire.parse_command(line)
        if parsed is None:
            self._bad("unknown")
            return None
        keyword, args, rest = parsed
        table = self._tables.get(self.state)
        handler = table.get(keyword) if table is not None else None
        if handler is None:
            self._bad("wrong_state" if keyword in self._known else "unknown")
            return None
        # PASS takes the rest of the line; a USER name is judged by authentication, so that an
        # over-long or malformed name is refused exactly like a wrong password (and addresses
        # longer than 40 octets can log in). AUTH's initial response is bounded by the command
        # line alone (RFC 5034 section 4: 255 octets); the name and password it carries get
        # USER's and PASS's bounds once decoded.
        if (
            len(rest) > limits.MAX_ARGUMENT  # else no argument can be longer (one check, not a loop)
            and keyword not in (b"PASS", b"USER")
            and any(len(arg) > limits.MAX_ARGUMENT for arg in (args[:1] if keyword == b"AUTH" else args))
        ):
            self._bad("syntax")
            return None
        self.stats["commands"] += 1
        return handler(args, rest)

    # --- AUTHORIZATION

    def _plaintext_ok(self) -> bool:
        return self.options.plaintext_allowed or self.tls_active

    def _cmd_user(self, args: list[bytes], rest: bytes) -> None:
        if len(args) != 1 or not args[0]:
            self._bad("syntax")
            return
        if not self._plaintext_ok():
            self._out += REPLIES["no_plaintext"]
            return
        # Always +OK: whether the name exists is told by nothing before the password.
        self._user = args[0]
        self._out += wire.ok(b"Send PASS.")

    def _cmd_pass(self, args: list[bytes], rest: bytes) -> Authenticate | None:
        if not self._plaintext_ok():
            self._out += REPLIES["no_plaintext"]
            return None
        if self._user is None:
            self._out += REPLIES["user_first"]
            return None
        if not rest:
            self._bad("syntax")
            return None
        return Authenticate(self._user, rest)

    def _cmd_auth(self, args: list[bytes], rest: bytes) -> Authenticate | None:
        mechanisms = self._sasl_mechanisms()
        if not args:
            # RFC 5034 section 4 leaves a bare AUTH undefined; like most servers, list them.
            self._out += wire.multiline(wire.ok(b"Mechanisms follow."), mechanisms)
            return None
        if len(args) > 2:
            self._bad("syntax")
            return None
        mechanism = args[0].upper()
        if mechanism not in mechanisms:
            if mechanism in self.options.sasl_mechanisms and not self._plaintext_ok():
                self._out += REPLIES["no_plaintext"]
            else:
                self._out += REPLIES["sasl_mech"]
            return None
        self._user = None
        self._sasl = _SaslExchange(mechanism)
        # SASL responses carry base64 credentials: allow longer lines than commands while it lasts.
        self._reader.max_line = limits.MAX_SASL_LINE
        if len(args) == 2:
            return self._sasl_response(args[1])
        self._out += self._sasl.challenge()
        return None

    def _sasl_mechanisms(self) -> list[bytes]:
        return list(self.options.sasl_mechanisms) if self._plaintext_ok() else []

    def _end_sasl(self) -> None:
        self._sasl = None
        self._reader.max_line = limits.MAX_COMMAND_LINE

    def _sasl_response(self, line: bytes) -> Authenticate | None:
        exchange = self._sasl
        assert exchange is not None
        if line == b"*":
            self._end_sasl()
            self._out += REPLIES["sasl_cancelled"]
            return None
        outcome = exchange.respond(line)
        if outcome is None:
            self._end_sasl()
            self._out += REPLIES["sasl_bad"]
            return None
        if isinstance(outcome, bytes):
            self._out += outcome
            return None
        self._end_sasl()
        return outcome

    def _cmd_stls(self, args: list[bytes], rest: bytes) -> StartTLS | None:
        if args:
            self._bad("syntax")
            return None
        if self.tls_active:
            self._out += REPLIES["tls_active"]
            return None
        if not self.options.stls_available:
            self._out += REPLIES["no_tls"]
            return None
        self._out += wire.ok(b"Begin TLS negotiation.")
        # Anything pipelined behind STLS arrived in plaintext: it must never run after the handshake.
        self._reader.discard()
        return StartTLS()

    def _cmd_capa(self, args: list[bytes], rest: bytes) -> None:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"EXPIRE NEVER"]
        if self.state == AUTHORIZATION:
            if self._plaintext_ok():
                caps.append(b"USER")
            mechanisms = self._sasl_mechanisms()
            if mechanisms:
                caps.append(b"SASL " + b" ".join(mechanisms))
            if self.options.stls_available and not self.tls_active:
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION " + self.options.implementation)
        self._out += wire.multiline(wire.ok(b"Capability list follows"), caps)

    def _cmd_quit(self, args: list[bytes], rest: bytes) -> Commit | None:
        if self.state == TRANSACTION:
            self.state = UPDATE
            return Commit(frozenset(self._deleted))
        self._out += wire.ok(b"Bye.")
        self._close("quit")
        return None

    # --- TRANSACTION

    def _message(self, arg: bytes, *, allow_deleted: bool = False) -> int | None:
        """The one message-number validator: wire msgno (1-based) to index, or queue the -ERR."""
        assert self._listing is not None
        if not arg.isdigit() or not arg.isascii() or len(arg) > limits.MAX_MSGNO_DIGITS:
            self._out += REPLIES["no_such_message" if arg.isdigit() else "syntax"]
            return None
        msgno = int(arg)
        if not 1 <= msgno <= self._listing.count:
            self._out += REPLIES["no_such_message"]
            return None
        index = msgno - 1
        if index in self._deleted and not allow_deleted:
            self._out += REPLIES["deleted"]
            return None
        return index

    def _cmd_stat(self, args: list[bytes], rest: bytes) -> None:
        if args:
            self._bad("syntax")
            return
        listing = self._listing
        assert listing is not None
        size = listing.total_size - sum(listing.size(i) for i in self._deleted)
        self._out += wire.ok(b"%d %d" % (listing.count - len(self._deleted), size))

    def _cmd_list(self, args: list[bytes], rest: bytes) -> None:
        assert self._listing is not None
        self._scan_listing(args, b"%d %d", self._listing.size, self._listing.sizes)

    def _cmd_uidl(self, args: list[bytes], rest: bytes) -> None:
        assert self._listing is not None
        self._scan_listing(args, b"%d %s", self._listing.uid, self._listing.uids)

    def _size_of(self, index: int) -> int:
        assert self._listing is not None
        return self._listing.size(index)

    def _uid_of(self, index: int) -> bytes:
        assert self._listing is not None
        return self._listing.uid(index)

    def _scan_listing(
        self,
        args: list[bytes],
        fmt: bytes,
        value: Callable[[int], object],
        values: Callable[[int, int], list],
    ) -> None:
        if len(args) > 1:
            self._bad("syntax")
            return
        if args:
            index = self._message(args[0])
            if index is not None:
                self._out += wire.ok(fmt % (index + 1, value(index)))
            return
        self._out += wire.ok()
        self._listing_rest = (fmt + wire.CRLF, values, 0)
        self._continue_listing()

    def _continue_listing(self) -> None:
        """Write the pending listing a block of lines at a time until the output buffer is full
        (next_request resumes it once the driver has sent that): memory stays flat whatever the
        number of messages, and no list of 100,000 line objects is built."""
        assert self._listing_rest is not None and self._listing is not None
        fmt, values, lo = self._listing_rest
        out = self._out
        deleted = self._deleted
        count = self._listing.count
        while lo < count:
            if len(out) >= limits.OUTPUT_FLUSH:
                self._listing_rest = (fmt, values, lo)
                return
            hi = min(lo + 1024, count)
            lines = zip(range(lo + 1, hi + 1), values(lo, hi), strict=True)  # (number, value)
            if deleted:
                out += b"".join([fmt % line for line in lines if line[0] - 1 not in deleted])
            else:
                out += b"".join([fmt % line for line in lines])
            lo = hi
        out += wire.TERMINATOR
        self._listing_rest = None

    def _cmd_retr(self, args: list[bytes], rest: bytes) -> Retrieve | None:
        if len(args) != 1:
            self._bad("syntax")
            return None
        index = self._message(args[0])
        if index is None:
            return None
        size = self._size_of(index)
        self.stats["retr"] += 1
        self.stats["retr_bytes"] += size
        self._ok_at = len(self._out)
        self._out += wire.ok(b"%d octets" % size)
        return Retrieve(index, None)

    def _cmd_top(self, args: list[bytes], rest: bytes) -> Retrieve | None:
        if len(args) != 2 or not args[1].isdigit() or not args[1].isascii():
            self._bad("syntax")
            return None
        index = self._message(args[0])
        if index is None:
            return None
        self.stats["top"] += 1
        # Beyond a billion lines is "all of them"; never build a huge int from client digits.
        lines = int(args[1]) if len(args[1]) < 10 else 10**9
        self._ok_at = len(self._out)
        self._out += wire.ok(b"Top of message follows.")
        return Retrieve(index, lines)

    def _cmd_dele(self, args: list[bytes], rest: bytes) -> None:
        if len(args) != 1:
            self._bad("syntax")
            return
        index = self._message(args[0])
        if index is not None:
            self._deleted.add(index)
            self._out += b"+OK Message %d deleted.\r\n" % (index + 1)  # wire.ok, inlined: pipelined

    def _cmd_rset(self, args: list[bytes], rest: bytes) -> None:
        if args:
            self._bad("syntax")
            return
        self._deleted.clear()
        assert self._listing is not None
        self._out += wire.ok(b"%d messages." % self._listing.count)

    def _cmd_noop(self, args: list[bytes], rest: bytes) -> None:
        if args:
            self._bad("syntax")
            return
        self._out += wire.ok()


class _SaslExchange:
    """SASL PLAIN (RFC 4616) and LOGIN over POP3 AUTH (RFC 5034): base64 in, credentials out."""

    __slots__ = ("_user", "mechanism")

    def __init__(self, mechanism: bytes) -> None:
        self.mechanism = mechanism
        self._user: bytes | None = None

    def challenge(self) -> bytes:
        if self.mechanism == b"LOGIN":
            return b"+ VXNlcm5hbWU6\r\n"  # "Username:"
        return b"+ \r\n"

    def respond(self, line: bytes) -> Authenticate | bytes | None:
        """The next step: credentials, another challenge line, or None for a malformed response."""
        decoded = _b64decode(line)
        if decoded is None:
            return None
        if self.mechanism == b"PLAIN":
            parts = decoded.split(b"\0")
            if len(parts) != 3:
                return None
            authzid, authcid, password = parts
            # Acting as another identity is refused: authzid, if given, must be the login itself.
            if not authcid or not password or (authzid and authzid != authcid):
                return None
            return Authenticate(authcid, password)
        if self._user is None:
            if not decoded:
                return None
            self._user = decoded
            return b"+ UGFzc3dvcmQ6\r\n"  # "Password:"
        if not decoded:
            return None
        return Authenticate(self._user, decoded)


def _b64decode(line: bytes) -> bytes | None:
    """Strict base64 (RFC 5034: "=" alone is an empty initial response)."""
    import binascii

    if line == b"=":
        return b""
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
