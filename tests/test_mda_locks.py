"""mda_locks = brief end to end (issue 17): real pop3d sessions, real dotlockfile and procmail.

With brief MDA locks a session holds the dotlock and the fcntl lock only to scan at login and to
update at QUIT; in between MDAs deliver, and a program that takes the locks may even rewrite the
spool. Every test here checks what a user would see: the bytes of the spool, the replies.
"""

from __future__ import annotations

import fcntl
import os
import poplib
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PASSWORD, Pop3Env, mbox_bytes, recv_until, sample_messages, wire_form

from pop3d import mbox

DOTLOCKFILE = shutil.which("dotlockfile")
PROCMAIL = shutil.which("procmail")
needs_dotlockfile = pytest.mark.skipif(
    DOTLOCKFILE is None, reason="dotlockfile not installed (liblockfile-bin)"
)


DELETED = b"deleted.\r\n"  # the end of DELE's +OK


@pytest.fixture
def brief(env: Pop3Env) -> Pop3Env:
    env.write_config(mda_locks="brief")
    return env


def login(env: Pop3Env) -> poplib.POP3:
    client = env.client()
    client.user("alice")
    client.pass_(PASSWORD)
    return client


def retr(client: poplib.POP3, number: int) -> bytes:
    """The message as sent (poplib strips CRLF and un-stuffs dots: put the CRLFs back)."""
    return b"".join(line + b"\r\n" for line in client.retr(number)[1])


def dotlockfile(*args: str) -> int:
    assert DOTLOCKFILE is not None
    return subprocess.run([DOTLOCKFILE, *args], capture_output=True, timeout=30).returncode


def under_the_locks(spool: Path, change) -> None:
    """Do `change(fd)` as a mail reader does: dotlock (dotlockfile, no retry: it must be free at
    once) and fcntl lock on the spool, both released after."""
    lock = f"{spool}.lock"
    assert dotlockfile("-r", "0", "-l", lock) == 0, "the session holds the dotlock"
    try:
        fd = os.open(spool, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the session held it
            change(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        assert dotlockfile("-u", lock) == 0


def rewrite(spool: Path, data: bytes) -> None:
    """Rewrite the spool in place (same inode) under the locks."""

    def write(fd: int) -> None:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    under_the_locks(spool, write)


def deliver(spool: Path, raw: bytes) -> None:
    """Append one message under the locks, as liblockfile-using MDAs do."""
    under_the_locks(spool, lambda fd: os.pwrite(fd, raw, os.fstat(fd).st_size))


def equal_messages(count: int, body_lines: int = 40) -> list[bytes]:
    """Messages of one length (so a permutation keeps every From_ line offset), all different."""
    out = []
    for i in range(count):
        body = b"".join(b"message %03d line %05d\n" % (i, k) for k in range(body_lines))
        out.append(
            b"From: sender%03d@example.org\nSubject: equal %03d\nMessage-ID: <%03d@x>\n\n" % (i, i, i) + body
        )
    assert len({len(m) for m in out}) == 1
    return out


def test_mdas_deliver_while_a_brief_session_is_idle(brief: Pop3Env) -> None:
    if DOTLOCKFILE is None or PROCMAIL is None:
        pytest.skip("needs dotlockfile (liblockfile-bin) and procmail")
    messages = sample_messages()
    spool = brief.write_spool(mbox_bytes(messages))
    client = login(brief)
    count, size = client.stat()
    assert count == len(messages)
    assert not Path(f"{spool}.lock").exists()  # held only while scanning

    # dotlockfile gets the dotlock at once (no retry) and the message is appended.
    by_dotlockfile = b"From lockfile@example.org Thu Nov 26 12:00:00 2026\nSubject: via dotlockfile\n\nhi\n\n"
    deliver(spool, by_dotlockfile)
    # procmail (a ":0:" recipe: dotlock plus fcntl) delivers and exits while the session is open.
    rcfile = brief.base / "procmailrc"
    rcfile.write_text(f":0:\n{spool}\n")
    by_procmail = b"From mta@example.org Thu Nov 26 13:00:00 2026\nSubject: via procmail\n\nhello\n.\nbye\n"
    done = subprocess.run([PROCMAIL, "-m", str(rcfile)], input=by_procmail, capture_output=True, timeout=60)  # type: ignore[list-item]
    assert done.returncode == 0, done.stderr
    delivered = by_dotlockfile + by_procmail + b"\n"  # procmail ends a message with a blank line
    assert spool.read_bytes() == mbox_bytes(messages) + delivered

    # The listing is the one fixed at login (RFC 1939): the new mail is not in it.
    assert client.stat() == (count, size)
    assert len(client.list()[1]) == count
    with pytest.raises(poplib.error_proto, match="No such message"):
        client.retr(count + 1)
    assert retr(client, count) == wire_form(messages[-1])
    client.dele(1)
    client.dele(3)
    assert client.quit().startswith(b"+OK")
    assert client.proc.wait(timeout=20) == 0

    kept = [m for i, m in enumerate(messages) if i not in (0, 2)]
    assert spool.read_bytes() == mbox_bytes(kept) + delivered  # after the kept ones, intact
    assert sorted(os.listdir(spool.parent)) == ["alice"]  # no lock of any kind left
    # The next session lists it.
    again = login(brief)
    assert again.stat()[0] == len(kept) + 2
    assert retr(again, len(kept) + 1) == wire_form(by_dotlockfile.split(b"\n", 1)[1][:-1])
    assert retr(again, len(kept) + 2) == wire_form(by_procmail.split(b"\n", 1)[1])
    again.quit()


def test_second_session_is_in_use_and_leaves_the_first_alone(brief: Pop3Env) -> None:
    messages = sample_messages()
    spool = brief.write_spool(mbox_bytes(messages))
    first = login(brief)
    assert (spool.parent / ".pop3d-session.alice").exists()  # pop3d's own lock, no MDA's
    second = brief.client()
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    assert second.file.read() == b""  # a login that cannot get its maildrop ends the session
    assert second.proc.wait(timeout=20) == 0
    # The first goes on as if nothing happened.
    assert retr(first, 2) == wire_form(messages[1])
    first.dele(2)
    assert first.quit().startswith(b"+OK")
    assert first.proc.wait(timeout=20) == 0
    assert spool.read_bytes() == mbox_bytes(messages[:1] + messages[2:])
    assert sorted(os.listdir(spool.parent)) == ["alice"]


@pytest.mark.parametrize(("first", "then"), [("brief", "session"), ("session", "brief")])
def test_sessions_in_different_modes_exclude_each_other(env: Pop3Env, first: str, then: str) -> None:
    """Review F3: mda_locks changed by a SIGHUP of --listen, or two configurations on one spool.
    An idle brief session holds no MDA lock; a session-mode login used to take those and log in
    beside it (RFC 1939's exclusive access broken; only the update's checks saved the mail).
    Both modes take pop3d's own session lock first: the second login is [IN-USE], and the first
    session's update is applied as if it had been alone."""
    messages = sample_messages()
    spool = env.write_spool(mbox_bytes(messages))
    env.write_config(mda_locks=first)
    holder = login(env)
    env.write_config(mda_locks=then)
    second = env.client()
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    assert second.proc.wait(timeout=20) == 0
    holder.dele(1)
    assert holder.quit().startswith(b"+OK")
    assert holder.proc.wait(timeout=20) == 0
    assert spool.read_bytes() == mbox_bytes(messages[1:])
    assert sorted(os.listdir(spool.parent)) == ["alice"]


@needs_dotlockfile
@pytest.mark.parametrize("command", [b"RETR 2", b"TOP 2 3", b"RETR 4"])
def test_retrieval_after_a_permuting_rewrite_is_refused(brief: Pop3Env, command: bytes) -> None:
    """Same size, messages 2 and 3 swapped (every From_ line where it was), or 4 and 1: the
    message is refused with [SYS/TEMP], the session ends, its DELE is not applied."""
    messages = equal_messages(4)
    spool = brief.write_spool(mbox_bytes(messages))
    sock, proc = brief.start()
    assert sock.recv(100).startswith(b"+OK")
    sock.sendall(b"USER alice\r\nPASS %s\r\nDELE 1\r\n" % PASSWORD.encode())
    assert recv_until(sock, DELETED).count(b"+OK") == 3
    order = [0, 2, 1, 3] if command.endswith(b" 2") or command.endswith(b" 3") else [3, 1, 2, 0]
    permuted = mbox_bytes([messages[i] for i in order])
    assert len(permuted) == spool.stat().st_size
    rewrite(spool, permuted)
    sock.sendall(command + b"\r\nLIST\r\n")
    reply = recv_until(sock, b"\r\n")
    assert reply.startswith(b"-ERR [SYS/TEMP]")
    assert recv_until(sock, b"\r\n") == b""  # closed: LIST is not answered, nothing follows
    assert proc.wait(timeout=20) == 0
    assert spool.read_bytes() == permuted  # DELE 1 not applied
    assert "rewritten since login" in brief.log_text()
    assert sorted(os.listdir(spool.parent)) == ["alice"]


@needs_dotlockfile
def test_quit_after_a_permuting_rewrite_deletes_nothing(brief: Pop3Env) -> None:
    """DELE 2, then messages 2 and 3 swap places (same offsets): QUIT must not delete the
    message now at 2's place, which it never listed as 2."""
    messages = equal_messages(4)
    spool = brief.write_spool(mbox_bytes(messages))
    client = login(brief)
    client.dele(2)
    permuted = mbox_bytes([messages[i] for i in (0, 2, 1, 3)])
    rewrite(spool, permuted)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert spool.read_bytes() == permuted
    assert sorted(os.listdir(spool.parent)) == ["alice"]


@needs_dotlockfile
@pytest.mark.parametrize("retrieved", [False, True])
def test_quit_never_deletes_a_message_written_into_a_deleted_body(brief: Pop3Env, retrieved: bool) -> None:
    """A program that takes the locks writes an empty line and a From_ line into message 2's
    body (same length) during the session: a full scan now lists a message there that the
    client never saw. DELE 2 + QUIT must not delete it with message 2 (review 2, finding 4),
    whether or not message 2 was retrieved before the write."""
    messages = equal_messages(3)
    spool = brief.write_spool(mbox_bytes(messages))
    client = login(brief)
    if retrieved:
        retr(client, 2)
    client.dele(2)
    data = spool.read_bytes()
    at = data.index(b"message 001 line 00020")
    hidden = b"\n\nFrom z@example.org Mon Jan  1 00:00:00 2024\n\n"
    under_the_locks(spool, lambda fd: os.pwrite(fd, hidden, at - 1))
    written = spool.read_bytes()
    assert len(written) == len(data) and mbox.scan(written).count == 4
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert spool.read_bytes() == written  # nothing deleted
    assert "a message was written into message 2" in brief.log_text()
    assert sorted(os.listdir(spool.parent)) == ["alice"]


@needs_dotlockfile
def test_rewrite_during_a_stream_never_completes_it_with_other_bytes(brief: Pop3Env) -> None:
    """RETR of a message far larger than the socket buffers; the client reads nothing until the
    spool was rewritten (messages 1 and 2 swapped). What arrives is a prefix of message 1, and
    the connection closes before the final "." line: the client never takes it for the whole."""
    messages = equal_messages(3, body_lines=100_000)  # 2.5 MB each
    spool = brief.write_spool(mbox_bytes(messages))
    sock, proc = brief.start()
    assert sock.recv(100).startswith(b"+OK")
    sock.sendall(b"USER alice\r\nPASS %s\r\nDELE 3\r\n" % PASSWORD.encode())
    recv_until(sock, DELETED)
    sock.sendall(b"RETR 1\r\n")
    first = sock.recv(65536)  # the +OK leaves with the first piece of the message
    rewrite(spool, mbox_bytes([messages[1], messages[0], messages[2]]))
    reply, _, sent = (first + recv_until(sock, b"\r\n.\r\n")).partition(b"\r\n")  # to the end
    assert proc.wait(timeout=20) == 0
    expected = wire_form(messages[0])
    assert reply == b"+OK %d octets" % len(expected)
    assert not sent.endswith(b"\r\n.\r\n")
    assert 0 < len(sent) < len(expected) and expected.startswith(sent)
    assert "rewritten since login" in brief.log_text()
    assert spool.read_bytes() == mbox_bytes([messages[1], messages[0], messages[2]])  # DELE 3 not applied
