"""The protocol core, driven with byte strings only: every command, every error, any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d import limits, protocol
from pop3d.protocol import Authenticate, Close, Commit, Pop3Core, Retrieve, StartTLS

GREETING = b"+OK POP3 server ready\r\n"


class FakeListing:
    def __init__(self, sizes: list[int]) -> None:
        self._sizes = sizes
        self.count = len(sizes)
        self.total_size = sum(sizes)

    def size(self, index: int) -> int:
        return self._sizes[index]

    def uid(self, index: int) -> bytes:
        return b"uid-%d" % (index * 7)

    def sizes(self, lo: int, hi: int) -> list[int]:
        return self._sizes[lo:hi]

    def uids(self, lo: int, hi: int) -> list[bytes]:
        return [self.uid(i) for i in range(lo, hi)]


def drive(core: Pop3Core, data: bytes) -> tuple[bytes, list[object]]:
    """Feed bytes, complete every request the way a driver would, return (wire bytes, requests)."""
    core.receive_data(data)
    out = bytearray()
    requests: list[object] = []
    while True:
        request = core.next_request()
        chunk = core.data_to_send()
        out += chunk
        if request is None:
            if chunk:
                continue  # the core paused to hand over a full output buffer
            return bytes(out), requests
        requests.append(request)
        if isinstance(request, Retrieve):
            out += b"<msg %d %s>\r\n.\r\n" % (request.index, str(request.body_lines).encode())
            core.retrieve_done()
        elif isinstance(request, Commit):
            core.commit_done(None)
        elif isinstance(request, Authenticate):
            if request.password == b"secret":
                core.auth_succeeded(FakeListing([100, 200, 300]))
            else:
                core.auth_failed(protocol.AUTH)
        elif isinstance(request, StartTLS):
            core.tls_started()
        elif isinstance(request, Close):
            return bytes(out), requests


def exchange(core: Pop3Core, data: bytes) -> bytes:
    return drive(core, data)[0]


@pytest.fixture
def core() -> Pop3Core:
    c = Pop3Core()
    assert c.data_to_send() == GREETING
    return c


@pytest.fixture
def logged_in(core: Pop3Core) -> Pop3Core:
    out = exchange(core, b"USER alice\r\nPASS secret\r\n")
    assert out == b"+OK Send PASS.\r\n+OK Logged in; 3 messages (600 octets).\r\n"
    assert core.state == protocol.TRANSACTION
    return core


def test_greeting_has_no_apop_timestamp() -> None:
    greeting = Pop3Core().data_to_send()
    assert greeting.startswith(b"+OK ") and b"<" not in greeting


def test_capa_before_login(core: Pop3Core) -> None:
    assert exchange(core, b"CAPA\r\n") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nEXPIRE NEVER\r\nUSER\r\nIMPLEMENTATION pop3d\r\n.\r\n"
    )


def test_capa_after_login(logged_in: Pop3Core) -> None:
    out = exchange(logged_in, b"CAPA\r\n")
    assert out.startswith(b"+OK") and out.endswith(b"IMPLEMENTATION pop3d\r\n.\r\n")
    assert b"\r\nUSER\r\n" not in out and b"TOP\r\n" in out and b"RESP-CODES" in out


def test_user_pass_requests_authentication(core: Pop3Core) -> None:
    out, requests = drive(core, b"USER bob\r\nPASS pass with spaces\r\n")
    assert out == b"+OK Send PASS.\r\n-ERR [AUTH] Authentication failed.\r\n"
    (request,) = requests
    assert isinstance(request, Authenticate)
    assert request.user == b"bob" and request.password == b"pass with spaces"
    assert b"pass with" not in repr(request).encode()


def test_pass_without_user(core: Pop3Core) -> None:
    assert exchange(core, b"PASS secret\r\n") == b"-ERR Send USER first.\r\n"


def test_failed_pass_needs_user_again(core: Pop3Core) -> None:
    exchange(core, b"USER bob\r\nPASS wrong\r\n")
    assert exchange(core, b"PASS secret\r\n") == b"-ERR Send USER first.\r\n"


def test_auth_failures_end_session(core: Pop3Core) -> None:
    out, requests = drive(core, b"USER a\r\nPASS x\r\nUSER a\r\nPASS x\r\nUSER a\r\nPASS x\r\nNOOP\r\n")
    assert out.count(b"-ERR [AUTH] Authentication failed.") == 2
    assert out.endswith(b"-ERR [AUTH] Too many authentication failures; closing.\r\n")
    assert isinstance(requests[-1], Close) and requests[-1].reason == "auth-failures"


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (protocol.IN_USE, b"-ERR [IN-USE] "),
        (protocol.SYS_TEMP, b"-ERR [SYS/TEMP] "),
        (protocol.SYS_PERM, b"-ERR [SYS/PERM] "),
        (protocol.AUTH, b"-ERR [AUTH] "),
    ],
)
def test_login_failure_codes(core: Pop3Core, code: bytes, reply: bytes) -> None:
    core.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(core.next_request(), Authenticate)
    core.auth_failed(code)
    assert core.data_to_send().split(b"\r\n")[1].startswith(reply)
    assert core.state == protocol.AUTHORIZATION


def test_transaction_commands_refused_before_login(core: Pop3Core) -> None:
    for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"UIDL", b"TOP 1 1", b"RSET"):
        assert exchange(core, command + b"\r\n") == b"-ERR Command not valid in this state.\r\n"


def test_apop_is_not_offered(core: Pop3Core) -> None:
    assert exchange(core, b"APOP a b\r\n") == b"-ERR Command not valid in this state.\r\n"


def test_stat_list_uidl(logged_in: Pop3Core) -> None:
    assert exchange(logged_in, b"STAT\r\n") == b"+OK 3 600\r\n"
    assert exchange(logged_in, b"LIST\r\n") == b"+OK\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n"
    assert exchange(logged_in, b"LIST 2\r\n") == b"+OK 2 200\r\n"
    assert exchange(logged_in, b"UIDL\r\n") == b"+OK\r\n1 uid-0\r\n2 uid-7\r\n3 uid-14\r\n.\r\n"
    assert exchange(logged_in, b"UIDL 3\r\n") == b"+OK 3 uid-14\r\n"


def test_lowercase_commands(logged_in: Pop3Core) -> None:
    assert exchange(logged_in, b"stat\r\n") == b"+OK 3 600\r\n"


def test_dele_hides_message_until_rset(logged_in: Pop3Core) -> None:
    assert exchange(logged_in, b"DELE 2\r\n") == b"+OK Message 2 deleted.\r\n"
    assert exchange(logged_in, b"STAT\r\n") == b"+OK 2 400\r\n"
    assert exchange(logged_in, b"LIST\r\n") == b"+OK\r\n1 100\r\n3 300\r\n.\r\n"
    assert exchange(logged_in, b"UIDL\r\n") == b"+OK\r\n1 uid-0\r\n3 uid-14\r\n.\r\n"
    for command in (b"LIST 2", b"UIDL 2", b"RETR 2", b"TOP 2 0", b"DELE 2"):
        assert exchange(logged_in, command + b"\r\n") == b"-ERR Message is deleted.\r\n"
    assert exchange(logged_in, b"RSET\r\n") == b"+OK 3 messages.\r\n"
    assert exchange(logged_in, b"STAT\r\n") == b"+OK 3 600\r\n"


@pytest.mark.parametrize(
    "arg",
    [
        b"0",
        b"4",
        b"-1",
        b"+1",
        b"1.0",
        b"x",
        b"4294967297",
        b"18446744073709551617",
        b"99999999999",
        b"\xd9\xa1",
    ],
)
def test_bad_message_numbers(logged_in: Pop3Core, arg: bytes) -> None:
    for command in (b"LIST ", b"UIDL ", b"RETR ", b"DELE "):
        out, requests = drive(logged_in, command + arg + b"\r\n")
        assert out.startswith(b"-ERR "), (command, arg, out)
        assert not requests
    assert logged_in.deleted == frozenset()
    assert exchange(logged_in, b"STAT\r\n") == b"+OK 3 600\r\n"


def test_dele_zero_never_deletes_the_last_message(logged_in: Pop3Core) -> None:
    exchange(logged_in, b"DELE 0\r\nDELE -1\r\n")
    assert logged_in.deleted == frozenset()


def test_nul_inside_command_invalidates_the_line(logged_in: Pop3Core) -> None:
    assert exchange(logged_in, b"DELE 1\x00junk\r\n") == b"-ERR Unknown command.\r\n"
    assert exchange(logged_in, b"DELE\x001\r\n").startswith(b"-ERR")
    assert logged_in.deleted == frozenset()


def test_retr_and_top_request_streams(logged_in: Pop3Core) -> None:
    out, requests = drive(logged_in, b"RETR 3\r\n")
    assert out == b"+OK 300 octets\r\n<msg 2 None>\r\n.\r\n"
    assert isinstance(requests[0], Retrieve) and requests[0].index == 2
    out, requests = drive(logged_in, b"TOP 1 5\r\n")
    assert out == b"+OK Top of message follows.\r\n<msg 0 5>\r\n.\r\n"
    out, _ = drive(logged_in, b"TOP 1 99999999999999999999\r\n")
    assert b"<msg 0 1000000000>" in out


@pytest.mark.parametrize("command", [b"RETR 2", b"TOP 2 1"])
def test_a_retrieval_the_maildrop_refuses_is_taken_back(logged_in: Pop3Core, command: bytes) -> None:
    """The driver found the message moved before sending any of it: the +OK becomes [SYS/TEMP],
    earlier replies of the pipeline stay, nothing after it is processed, no update."""
    logged_in.receive_data(b"DELE 1\r\n" + command + b"\r\nDELE 3\r\nQUIT\r\n")
    request = logged_in.next_request()
    assert isinstance(request, Retrieve) and request.index == 1
    logged_in.retrieve_failed()
    assert logged_in.data_to_send() == b"+OK Message 1 deleted.\r\n" + protocol.REPLIES["sys_temp"]
    closing = logged_in.next_request()
    assert isinstance(closing, Close) and closing.reason == "spool-changed"
    assert logged_in.next_request() is None and logged_in.data_to_send() == b""
    assert logged_in.stats["retr"] == 0 and logged_in.stats["top"] == 0


@pytest.mark.parametrize(
    "command",
    [
        b"TOP 1",
        b"TOP 1 -1",
        b"TOP 1 x",
        b"TOP",
        b"RETR",
        b"RETR 1 2",
        b"DELE",
        b"STAT 1",
        b"RSET 1",
        b"LIST 1 2",
        b"NOOP x",
    ],
)
def test_syntax_errors(logged_in: Pop3Core, command: bytes) -> None:
    out, requests = drive(logged_in, command + b"\r\n")
    assert out == b"-ERR Syntax error in arguments.\r\n"
    assert not requests


def test_argument_over_40_octets(logged_in: Pop3Core) -> None:
    assert exchange(logged_in, b"LIST " + b"1" * 41 + b"\r\n") == b"-ERR Syntax error in arguments.\r\n"


def test_long_password_is_allowed(core: Pop3Core) -> None:
    _, requests = drive(core, b"USER a\r\nPASS " + b"p" * 200 + b"\r\n")
    assert isinstance(requests[0], Authenticate) and requests[0].password == b"p" * 200


def test_line_too_long_is_discarded_up_to_lf(logged_in: Pop3Core) -> None:
    out = exchange(logged_in, b"DELE 1" + b"1" * 300 + b"\r\nSTAT\r\n")
    assert out == b"-ERR Line too long.\r\n+OK 3 600\r\n"
    assert logged_in.deleted == frozenset()


def test_line_too_long_across_chunks(logged_in: Pop3Core) -> None:
    out = b""
    out += exchange(logged_in, b"X" * 200)
    out += exchange(logged_in, b"Y" * 200)
    out += exchange(logged_in, b"Z" * 10000)
    out += exchange(logged_in, b"DELE 1\r\nSTAT\r\n")
    assert out == b"-ERR Line too long.\r\n+OK 3 600\r\n"


def test_line_of_255_octets_is_accepted(core: Pop3Core) -> None:
    line = b"USER " + b"u" * (limits.MAX_COMMAND_LINE - 7)
    assert len(line + b"\r\n") == 255
    assert exchange(core, line + b"\r\n") == b"+OK Send PASS.\r\n"  # parsed, not cut


def test_user_name_over_40_octets_reaches_authentication(core: Pop3Core) -> None:
    # Judged by authentication (refused like a wrong password), not by a syntax error that
    # would tell a long name from a wrong password; long addresses must be able to log in.
    name = b"firstname.lastname@departement.example.org"
    assert len(name) > limits.MAX_ARGUMENT
    _, requests = drive(core, b"USER " + name + b"\r\nPASS x\r\n")
    assert isinstance(requests[0], Authenticate) and requests[0].user == name


def test_resume_continues_a_session_authorized_elsewhere() -> None:
    first = Pop3Core()
    first.data_to_send()
    first.receive_data(b"USER a\r\nPASS secret\r\nSTAT\r\nDELE 1\r\nQU")
    assert isinstance(first.next_request(), Authenticate)
    pending = first.pending_bytes()
    assert pending == b"STAT\r\nDELE 1\r\nQU"
    second = Pop3Core(greet=False)
    request = second.resume(b"a", commands=2)
    assert request.user == b"a"
    second.auth_succeeded(FakeListing([100, 200]))
    second.receive_data(pending)
    second.receive_data(b"IT\r\n")
    out, requests = b"", []
    while (req := second.next_request()) is not None:
        requests.append(req)
        if isinstance(req, Commit):
            second.commit_done()
    out = second.data_to_send()
    assert out.startswith(b"+OK Logged in; 2 messages (300 octets).\r\n+OK 2 300\r\n+OK")
    assert isinstance(requests[0], Commit) and requests[0].deleted == frozenset({0})


def test_bare_lf_terminators(logged_in: Pop3Core) -> None:
    assert exchange(logged_in, b"STAT\nNOOP\n") == b"+OK 3 600\r\n+OK\r\n"


def test_bad_command_budget(core: Pop3Core) -> None:
    out, requests = drive(core, b"BOGUS\r\n" * 20)
    assert out.count(b"-ERR Unknown command.") == limits.MAX_BAD_COMMANDS - 1
    assert out.endswith(b"-ERR Too many bad commands; closing.\r\n")
    assert isinstance(requests[-1], Close)


def test_quit_in_authorization_closes_without_commit(core: Pop3Core) -> None:
    out, requests = drive(core, b"QUIT\r\n")
    assert out == b"+OK Bye.\r\n"
    assert [type(r) for r in requests] == [Close]


def test_quit_commits_deletions(logged_in: Pop3Core) -> None:
    out, requests = drive(logged_in, b"DELE 1\r\nDELE 3\r\nQUIT\r\nSTAT\r\n")
    assert out == b"+OK Message 1 deleted.\r\n+OK Message 3 deleted.\r\n+OK Bye; 1 messages left.\r\n"
    assert isinstance(requests[0], Commit) and requests[0].deleted == frozenset({0, 2})
    assert isinstance(requests[1], Close) and requests[1].reason == "quit"


def test_failed_update_is_reported(logged_in: Pop3Core) -> None:
    logged_in.receive_data(b"DELE 1\r\nQUIT\r\n")
    assert isinstance(logged_in.next_request(), Commit)
    logged_in.commit_done(protocol.SYS_TEMP)
    assert logged_in.data_to_send().endswith(
        b"-ERR [SYS/TEMP] Deletions not applied (server failure); try again later.\r\n"
    )
    request = logged_in.next_request()
    assert isinstance(request, Close) and request.reason == "update-failed"


def test_eof_closes_without_commit(logged_in: Pop3Core) -> None:
    _out, _requests = drive(logged_in, b"DELE 1\r\n")
    logged_in.receive_data(b"")
    request = logged_in.next_request()
    assert isinstance(request, Close) and request.reason == "eof"
    assert logged_in.next_request() is None


def test_partial_line_at_eof_is_not_executed(logged_in: Pop3Core) -> None:
    drive(logged_in, b"DELE 1\r\nQUIT")
    logged_in.receive_data(b"")
    request = logged_in.next_request()
    assert isinstance(request, Close) and request.reason == "eof"


def test_timeout_autologout(logged_in: Pop3Core) -> None:
    logged_in.timed_out()
    assert logged_in.data_to_send() == b"-ERR Autologout: idle for too long.\r\n"
    assert isinstance(logged_in.next_request(), Close)


def test_byte_at_a_time_equals_whole(logged_in: Pop3Core) -> None:
    script = b"STAT\r\nLIST\r\nUIDL 2\r\nDELE 2\r\nRETR 1\r\nTOP 3 0\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    whole = Pop3Core()
    exchange(whole, b"USER a\r\nPASS secret\r\n")
    expected = exchange(whole, script)
    got = b"".join(exchange(logged_in, script[i : i + 1]) for i in range(len(script)))
    assert got == expected


def test_pipeline_in_one_chunk(core: Pop3Core) -> None:
    commands = b"USER a\r\nPASS secret\r\n" + b"NOOP\r\n" * 10000 + b"STAT\r\n"
    out = exchange(core, commands)
    assert out.count(b"+OK\r\n") == 10000 and out.endswith(b"+OK 3 600\r\n")


def test_pipeline_output_is_handed_over_in_bounded_pieces(logged_in: Pop3Core) -> None:
    logged_in.receive_data(b"LIST\r\n" * 100000)
    assert logged_in.next_request() is None
    assert len(logged_in.data_to_send()) < 2 * limits.OUTPUT_FLUSH


def test_stls_unavailable(core: Pop3Core) -> None:
    assert exchange(core, b"STLS\r\n") == b"-ERR STLS is not available.\r\n"


def test_stls_discards_pipelined_plaintext() -> None:
    core = Pop3Core(protocol.Options(stls_available=True))
    core.data_to_send()
    core.receive_data(b"STLS\r\nCAPA\r\n")
    request = core.next_request()
    assert isinstance(request, StartTLS)
    assert core.data_to_send() == b"+OK Begin TLS negotiation.\r\n"
    core.tls_started()
    assert core.next_request() is None
    assert core.data_to_send() == b""
    out = exchange(core, b"CAPA\r\n")
    assert b"STLS" not in out


def test_plaintext_policy() -> None:
    core = Pop3Core(
        protocol.Options(plaintext_allowed=False, stls_available=True, sasl_mechanisms=(b"PLAIN",))
    )
    core.data_to_send()
    capa = exchange(core, b"CAPA\r\n")
    assert b"\r\nUSER\r\n" not in capa and b"SASL" not in capa and b"STLS" in capa
    assert exchange(core, b"USER a\r\n").startswith(b"-ERR [AUTH] Plaintext")
    assert exchange(core, b"AUTH PLAIN\r\n").startswith(b"-ERR [AUTH] Plaintext")


def test_sasl_plain_with_initial_response() -> None:
    import base64

    core = Pop3Core(protocol.Options(sasl_mechanisms=(b"PLAIN", b"LOGIN")))
    core.data_to_send()
    assert b"SASL PLAIN LOGIN" in exchange(core, b"CAPA\r\n")
    token = base64.b64encode(b"\0alice\0secret")
    out, requests = drive(core, b"AUTH PLAIN " + token + b"\r\n")
    assert out.startswith(b"+OK Logged in")
    assert requests[0].user == b"alice"


def test_sasl_plain_initial_response_is_bounded_by_the_line_not_the_argument_limit() -> None:
    """RFC 5034 section 4: AUTH with an initial response is bounded by the 255-octet command line
    (CRLF included), not by RFC 2449's 40-octet argument limit, which cut every real one."""
    import base64

    user, password = b"u" * limits.MAX_USERNAME, b"p" * 110
    token = base64.b64encode(b"\0" + user + b"\0" + password)
    line = b"AUTH PLAIN " + token + b"\r\n"
    assert len(token) > limits.MAX_ARGUMENT and len(line) <= limits.MAX_COMMAND_LINE
    core = Pop3Core(protocol.Options(sasl_mechanisms=(b"PLAIN",)))
    core.data_to_send()
    _, requests = drive(core, line)
    assert len(requests) == 1 and isinstance(requests[0], Authenticate)
    assert (requests[0].user, requests[0].password) == (user, password)
    # The mechanism name is still an argument of at most 40 octets; the line at most 255.
    core = Pop3Core(protocol.Options(sasl_mechanisms=(b"PLAIN",)))
    core.data_to_send()
    assert exchange(core, b"AUTH " + b"P" * 41 + b" =\r\n") == b"-ERR Syntax error in arguments.\r\n"
    assert exchange(core, b"AUTH PLAIN " + b"A" * 244 + b"\r\n") == b"-ERR Line too long.\r\n"


def test_sasl_plain_continuation_and_refusals() -> None:
    import base64

    core = Pop3Core(protocol.Options(sasl_mechanisms=(b"PLAIN", b"LOGIN")))
    core.data_to_send()
    assert exchange(core, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert exchange(core, b"*\r\n") == b"-ERR Authentication cancelled.\r\n"
    assert exchange(core, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert exchange(core, b"!!notbase64\r\n") == b"-ERR Invalid SASL response.\r\n"
    other = base64.b64encode(b"bob\0alice\0secret")
    assert exchange(core, b"AUTH PLAIN " + other + b"\r\n") == b"-ERR Invalid SASL response.\r\n"
    assert exchange(core, b"AUTH PLAIN =\r\n") == b"-ERR Invalid SASL response.\r\n"
    assert exchange(core, b"AUTH CRAM-MD5\r\n") == b"-ERR Unsupported authentication mechanism.\r\n"
    assert exchange(core, b"AUTH PLAIN\r\n") == b"+ \r\n"
    out = exchange(core, base64.b64encode(b"alice\0alice\0secret") + b"\r\n")
    assert out.startswith(b"+OK Logged in")


def test_sasl_login() -> None:
    import base64

    core = Pop3Core(protocol.Options(sasl_mechanisms=(b"PLAIN", b"LOGIN")))
    core.data_to_send()
    assert exchange(core, b"AUTH LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"
    assert exchange(core, base64.b64encode(b"alice") + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    out, requests = drive(core, base64.b64encode(b"secret") + b"\r\n")
    assert out.startswith(b"+OK Logged in") and requests[0].user == b"alice"


def test_sasl_listing() -> None:
    core = Pop3Core(protocol.Options(sasl_mechanisms=(b"PLAIN", b"LOGIN")))
    core.data_to_send()
    assert exchange(core, b"AUTH\r\n") == b"+OK Mechanisms follow.\r\nPLAIN\r\nLOGIN\r\n.\r\n"


def test_fail_answers_owed_request(logged_in: Pop3Core) -> None:
    logged_in.receive_data(b"RETR 1\r\n")
    assert isinstance(logged_in.next_request(), Retrieve)
    logged_in.data_to_send()
    logged_in.fail()
    assert logged_in.data_to_send() == b"-ERR [SYS/TEMP] Temporary server failure; try again later.\r\n"
    assert isinstance(logged_in.next_request(), Close)


def test_every_error_reply_is_well_formed() -> None:
    for reply in protocol.REPLIES.values():
        assert reply.startswith(b"-ERR ") and reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1
        assert len(reply) <= 512


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=30),
    login=st.booleans(),
    stls=st.booleans(),
)
def test_arbitrary_bytes_only_produce_replies_or_close(chunks: list[bytes], login: bool, stls: bool) -> None:
    core = Pop3Core(protocol.Options(stls_available=stls, sasl_mechanisms=(b"PLAIN", b"LOGIN")))
    out = core.data_to_send()
    if login:
        out += exchange(core, b"USER a\r\nPASS secret\r\n")
    for chunk in chunks:
        out += exchange(core, chunk)
    core.receive_data(b"")
    out += exchange(core, b"")
    assert out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert b"Traceback" not in line


@settings(max_examples=200, deadline=None)
@given(
    script=st.lists(
        st.sampled_from(
            [
                b"STAT",
                b"LIST",
                b"LIST 1",
                b"UIDL",
                b"UIDL 2",
                b"RETR 1",
                b"TOP 2 3",
                b"DELE 1",
                b"DELE 3",
                b"RSET",
                b"NOOP",
                b"CAPA",
                b"BOGUS",
                b"LIST 9",
                b"QUIT",
            ]
        ),
        max_size=20,
    ),
    cut=st.integers(min_value=1, max_value=50),
)
def test_any_chunking_gives_the_same_transcript(script: list[bytes], cut: int) -> None:
    data = b"USER a\r\nPASS secret\r\n" + b"".join(line + b"\r\n" for line in script)
    whole = Pop3Core()
    expected = whole.data_to_send() + exchange(whole, data)
    pieces = Pop3Core()
    got = pieces.data_to_send() + b"".join(
        exchange(pieces, data[i : i + cut]) for i in range(0, len(data), cut)
    )
    assert got == expected


def test_a_huge_listing_leaves_in_bounded_pieces():
    """LIST/UIDL of 100,000 messages: the core hands the lines over a buffer at a time (flat
    memory), the bytes are exactly the whole listing, and a command pipelined behind it waits."""
    sizes = [1000 + i % 977 for i in range(100_000)]
    core = Pop3Core()
    core.receive_data(b"USER u\r\nPASS secret\r\n")
    assert isinstance(core.next_request(), Authenticate)
    core.auth_succeeded(FakeListing(sizes))
    core.data_to_send()
    deleted = {5, 99_999}
    core.receive_data(b"".join(b"DELE %d\r\n" % (i + 1) for i in sorted(deleted)))
    assert core.next_request() is None
    core.data_to_send()
    core.receive_data(b"LIST\r\nUIDL\r\nNOOP\r\n")
    pieces = []
    while True:
        request = core.next_request()
        assert request is None
        piece = core.data_to_send()
        if not piece:
            break
        pieces.append(bytes(piece))
    longest_line = max(len(b"%d uid-%d\r\n" % (i + 1, i * 7)) for i in range(len(sizes)))
    assert max(map(len, pieces)) < limits.OUTPUT_FLUSH + 1024 * longest_line + 100
    assert len(pieces) > 4
    out = b"".join(pieces)
    kept = [i for i in range(len(sizes)) if i not in deleted]
    expected_list = b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i + 1, sizes[i]) for i in kept) + b".\r\n"
    expected_uidl = b"+OK\r\n" + b"".join(b"%d uid-%d\r\n" % (i + 1, i * 7) for i in kept) + b".\r\n"
    assert out == expected_list + expected_uidl + b"+OK\r\n"


@pytest.mark.parametrize("code", [protocol.IN_USE, protocol.SYS_TEMP, protocol.SYS_PERM])
def test_a_maildrop_that_fails_after_the_check_ends_the_session(code: bytes) -> None:
    """Issue 12, finding 1: no AUTHORIZATION dialogue goes on in the process that took over."""
    core = Pop3Core(greet=False)
    core.resume(b"a", commands=2)
    core.maildrop_failed(code)
    core.receive_data(b"USER a\r\nPASS b\r\n")
    request = core.next_request()
    assert isinstance(request, Close) and request.reason == "maildrop-failed"
    assert core.data_to_send() == protocol.REPLIES[protocol.FAILURE_REPLY[code]]
    assert core.next_request() is None and core.data_to_send() == b""


def test_the_failure_budget_is_the_connections() -> None:
    """Issue 12, finding 1: failures counted before the handover count after it."""
    core = Pop3Core(options=protocol.Options(max_auth_failures=3), greet=False)
    core.resume(b"a", commands=4, failures=2)
    core.auth_failed(protocol.AUTH)
    assert core.data_to_send() == protocol.REPLIES["too_many_auth"]
    request = core.next_request()
    assert isinstance(request, Close) and request.reason == "auth-failures"


def test_noop_before_login_is_a_wrong_state_command(core: Pop3Core) -> None:
    """Issue 12, finding 5: NOOP is a TRANSACTION command (RFC 1939); popa3d, Dovecot and
    Mailutils refuse it before login. It counts as a bad command, like any wrong-state command."""
    assert exchange(core, b"NOOP\r\n") == b"-ERR Command not valid in this state.\r\n"
    out = exchange(core, b"NOOP\r\n" * (limits.MAX_BAD_COMMANDS - 1))
    assert out.endswith(b"-ERR Too many bad commands; closing.\r\n")


def test_login_timeout_closes_authorization(core: Pop3Core) -> None:
    exchange(core, b"USER a\r\n")
    core.login_timed_out()
    assert core.data_to_send() == b"-ERR Autologout: no login in time.\r\n"
    request = core.next_request()
    assert isinstance(request, Close) and request.reason == "login-timeout"
