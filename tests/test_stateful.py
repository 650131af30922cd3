"""A hypothesis state machine driving a real pop3d session (python -m pop3d on a socketpair).

Random STAT/LIST/UIDL/RETR/TOP/DELE/RSET/NOOP, QUIT or a dropped connection, and mail appended
meanwhile by a writer that ignores the locks, against a model of the maildrop: a list of stored
messages and the session's deleted set. Every reply is checked against the model; after QUIT or
a drop the spool must hold exactly the model's messages, byte for byte, with no lock or journal
left; then a new session starts on it (UIDs must not have changed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from conftest import Pop3Env, mbox_bytes
from fuzz.fuzz_mbox import sent_form, top_content
from hostile import RawClient, leftovers, lock_gone, start
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

# Lines of any octets but LF, never starting with "From " (that would begin a new message).
_line = (
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")).filter(lambda b: not b.startswith(b"From "))
)
_body = st.lists(_line, max_size=8)
# Message numbers: mostly valid ones, sometimes 0 or beyond the end.
_number = st.integers(1, 4) | st.integers(0, 11)
_headers = st.lists(st.sampled_from([b"Subject: x", b"X-A: 1\r", b"Status: RO", b"To: a@b"]), max_size=3)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    headers = draw(_headers)
    lines = [b"Message-ID: <%d@test>" % draw(st.integers(0, 10**9)), *headers]
    body = draw(_body)
    if body or draw(st.booleans()):
        lines.append(b"")  # the header/body separator (absent: all header)
        lines += body
    return b"".join(line + b"\n" for line in lines)


class Pop3Session(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="pop3d-stateful-"))
        self.base.chmod(0o755)
        Pop3Env._procs = []
        self.env = Pop3Env(self.base)
        self.stored: list[bytes] = []  # messages in the spool, in order
        self.seen: list[bytes] = []  # what the current session scanned at login
        self.appended: list[bytes] = []  # delivered during the session (invisible to it)
        self.deleted: set[int] = set()
        self.uids: dict[bytes, bytes] = {}
        self.client: RawClient | None = None

    # ------------------------------------------------------------ sessions

    @initialize(mail=st.lists(messages(), min_size=1, max_size=6, unique_by=lambda m: m.split(b"\n", 1)[0]))
    def begin(self, mail: list[bytes]) -> None:
        self.stored = list(mail)
        self.env.write_spool(mbox_bytes(self.stored))
        self.connect()

    def connect(self) -> None:
        self.client = start(self.env)
        reply = self.client.login()
        total = sum(len(sent_form(m, False)) for m in self.stored)
        assert reply == b"+OK Logged in; %d messages (%d octets)." % (len(self.stored), total), reply
        self.seen = list(self.stored)
        self.appended = []
        self.deleted = set()

    def ended(self, updated: bool) -> None:
        client = self.client
        assert client is not None and client.proc is not None
        assert client.proc.wait(timeout=30) == 0
        self.client = None
        kept = [m for i, m in enumerate(self.seen) if not updated or i not in self.deleted]
        self.stored = kept + self.appended
        path = self.env.spool_path()
        on_disk = path.read_bytes() if path.exists() else b""
        assert on_disk == mbox_bytes(self.stored)
        assert lock_gone(path)
        assert leftovers(self.env.spool_dir, {"alice"}) == set()
        self.connect()

    @rule()
    def quit(self) -> None:
        assert self.client is not None
        left = len(self.seen) - len(self.deleted)
        assert self.client.cmd(b"QUIT") == b"+OK Bye; %d messages left." % left
        self.ended(updated=True)

    @rule()
    def drop(self) -> None:
        assert self.client is not None
        self.client.close()
        self.ended(updated=False)

    @precondition(lambda self: len(self.seen) + len(self.appended) < 10)
    @rule(message=messages())
    def deliver_ignoring_the_locks(self, message: bytes) -> None:
        if any(m.split(b"\n", 1)[0] == message.split(b"\n", 1)[0] for m in self.seen + self.appended):
            return
        path = self.env.spool_path()
        if not path.exists():
            return  # a missing spool is not created by a non-locking writer here
        with open(path, "ab") as f:
            f.write(mbox_bytes([message]))
        self.appended.append(message)

    # ------------------------------------------------------------ transaction

    def live(self) -> list[int]:
        return [i for i in range(len(self.seen)) if i not in self.deleted]

    def size(self, index: int) -> int:
        return len(sent_form(self.seen[index], False))

    def expect_number(self, number: int) -> bytes | None:
        """The -ERR the server must give for this message number, or None if it is valid."""
        if not 1 <= number <= len(self.seen):
            return b"-ERR No such message."
        if number - 1 in self.deleted:
            return b"-ERR Message is deleted."
        return None

    @rule()
    def stat(self) -> None:
        assert self.client is not None
        live = self.live()
        total = sum(self.size(i) for i in live)
        assert self.client.cmd(b"STAT") == b"+OK %d %d" % (len(live), total)

    @rule()
    def list_all(self) -> None:
        assert self.client is not None
        assert self.client.listing(b"LIST") == [[b"%d" % (i + 1), b"%d" % self.size(i)] for i in self.live()]

    @rule()
    def uidl_all(self) -> None:
        assert self.client is not None
        got = self.client.listing(b"UIDL")
        assert [n for n, _ in got] == [b"%d" % (i + 1) for i in self.live()]
        for (_, uid), i in zip(got, self.live(), strict=True):
            assert self.uids.setdefault(self.seen[i], uid) == uid  # stable across sessions
        assert len({u for _, u in got}) == len(got)

    @rule(number=_number)
    def list_one(self, number: int) -> None:
        assert self.client is not None
        reply = self.client.cmd(b"LIST %d" % number)
        error = self.expect_number(number)
        assert reply == (error or b"+OK %d %d" % (number, self.size(number - 1)))

    @rule(number=_number)
    def retr(self, number: int) -> None:
        assert self.client is not None
        error = self.expect_number(number)
        if error:
            assert self.client.cmd(b"RETR %d" % number) == error
            return
        assert self.client.retr(number) == sent_form(self.seen[number - 1], False)

    @rule(number=_number, lines=st.integers(0, 10))
    def top(self, number: int, lines: int) -> None:
        assert self.client is not None
        error = self.expect_number(number)
        if error:
            assert self.client.cmd(b"TOP %d %d" % (number, lines)) == error
            return
        expected = sent_form(top_content(self.seen[number - 1], lines), False)
        assert self.client.retr(number, lines) == expected

    @rule(number=_number)
    def dele(self, number: int) -> None:
        assert self.client is not None
        error = self.expect_number(number)
        reply = self.client.cmd(b"DELE %d" % number)
        if error:
            assert reply == error
        else:
            assert reply == b"+OK Message %d deleted." % number
            self.deleted.add(number - 1)

    @rule()
    def rset(self) -> None:
        assert self.client is not None
        assert self.client.cmd(b"RSET") == b"+OK %d messages." % len(self.seen)
        self.deleted.clear()

    @rule()
    def noop(self) -> None:
        assert self.client is not None
        assert self.client.cmd(b"NOOP") == b"+OK"

    @invariant()
    def session_alive(self) -> None:
        if self.client is not None and self.client.proc is not None:
            assert self.client.proc.poll() is None

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close()
            if self.client.proc is not None:
                self.client.proc.wait(timeout=30)
        for proc in Pop3Env._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()
        if not os.environ.get("POP3D_KEEP_TEST_DIRS"):
            shutil.rmtree(self.base, ignore_errors=True)


Pop3Session.TestCase.settings = settings(
    max_examples=int(os.environ.get("POP3D_STATEFUL_EXAMPLES", "30")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)
test_pop3_session_against_a_model = Pop3Session.TestCase
