"""End to end exactly as inetd runs it: `python -m pop3d -c test.conf` on a socketpair, poplib on ours."""

from __future__ import annotations

import base64
import os
import poplib
import subprocess
import time

import pytest
from conftest import (
    PASSWORD,
    Pop3Env,
    child_env,
    mbox_bytes,
    recv_until,
    sample_messages,
    wait_for,
    wire_form,
)


def login(env: Pop3Env, user: str = "alice", password: str = PASSWORD):
    client = env.client()
    client.user(user)
    client.pass_(password)
    return client


def finish(client) -> int:
    """Wait for the session process to exit; its status."""
    return client.proc.wait(timeout=20)


def test_login_stat_list_retr_every_message(env: Pop3Env) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    client = login(env)
    count, size = client.stat()
    assert count == len(messages)
    _, listing, _ = client.list()
    sizes = [int(line.split()[1]) for line in listing]
    assert size == sum(sizes)
    for number, message in enumerate(messages, 1):
        _, lines, _octets = client.retr(number)
        # poplib strips CRLF and un-stuffs dots; rebuild the bytes exactly as sent.
        received = b"".join(line + b"\r\n" for line in lines)
        assert received == wire_form(message)
        # LIST size is exactly the octets sent before dot-stuffing (poplib's octets count the wire).
        assert sizes[number - 1] == len(received)
    client.quit()
    assert finish(client) == 0


def test_list_size_matches_wire_octets_with_dots(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes([b"Subject: dots\n\n.\n..\n...x\nend"]))
    sock, proc = env.start()
    assert sock.recv(100).startswith(b"+OK")
    sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nLIST 1\r\nRETR 1\r\nQUIT\r\n")
    data = recv_until(sock, b"+OK Bye; 1 messages left.\r\n")
    assert b"+OK 1 35\r\n" in data
    body = data.split(b"+OK 35 octets\r\n", 1)[1].split(b".\r\n+OK Bye", 1)[0]
    assert body == b"Subject: dots\r\n\r\n..\r\n...\r\n....x\r\nend\r\n"
    assert proc.wait(timeout=20) == 0


def test_top(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes([b"Subject: t\nX: y\n\nb1\nb2\nb3\n"]))
    client = login(env)
    assert client.top(1, 0)[1] == [b"Subject: t", b"X: y", b""]
    assert client.top(1, 2)[1] == [b"Subject: t", b"X: y", b"", b"b1", b"b2"]
    assert client.top(1, 100)[1] == [b"Subject: t", b"X: y", b"", b"b1", b"b2", b"b3"]
    client.quit()


def test_uidl_stable_across_sessions_and_deletions(env: Pop3Env) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    client = login(env)
    first = dict(line.split() for line in client.uidl()[1])
    client.quit()
    client = login(env)
    assert dict(line.split() for line in client.uidl()[1]) == first
    client.dele(2)
    client.quit()
    client = login(env)
    after = [line.split()[1] for line in client.uidl()[1]]
    assert after == [first[b"1"], first[b"3"], first[b"4"], first[b"5"]]
    assert all(1 <= len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid) for uid in after)
    client.quit()


def test_dele_quit_keeps_others_byte_identical_same_inode(env: Pop3Env) -> None:
    messages = sample_messages()
    path = env.write_spool(mbox_bytes(messages))
    before = os.stat(path)
    client = login(env)
    client.dele(1)
    client.dele(4)
    assert client.quit().startswith(b"+OK")
    assert finish(client) == 0
    after = os.stat(path)
    assert (after.st_ino, after.st_uid, after.st_gid, after.st_mode) == (
        before.st_ino,
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert path.read_bytes() == mbox_bytes([messages[1], messages[2], messages[4]])
    assert not [p for p in path.parent.iterdir() if p.name != "alice"]  # no lock or journal left


def test_dele_all(env: Pop3Env) -> None:
    path = env.write_spool(mbox_bytes(sample_messages()[:3]))
    client = login(env)
    for number in (1, 2, 3):
        client.dele(number)
    client.quit()
    finish(client)
    assert path.read_bytes() == b""


def test_dele_then_disconnect_changes_nothing(env: Pop3Env) -> None:
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    client = login(env)
    client.dele(1)
    client.file.close()
    client.sock.close()
    assert finish(client) == 0
    assert path.read_bytes() == data
    assert not (path.parent / "alice.lock").exists()


def test_dele_rset_quit_changes_nothing(env: Pop3Env) -> None:
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    client = login(env)
    client.dele(1)
    client.rset()
    client.quit()
    finish(client)
    assert path.read_bytes() == data


def test_second_session_gets_in_use(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()))
    first = login(env)
    second = env.client()
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    assert second.file.read() == b""  # a login that cannot get its maildrop ends the session
    first.quit()
    assert finish(first) == 0


def test_no_failure_is_answered_before_the_floor(env: Pop3Env) -> None:
    """Issue 12, finding 9: auth_failure_delay = 0 is raised to the floor, so that an unknown
    user, a wrong password and an invalid name cannot be told apart by time."""
    from pop3d import limits

    env.write_config(auth_failure_delay=0, max_auth_failures=10)
    sock, proc = env.start()
    reader = sock.makefile("rb")
    reader.readline()
    for user in ("alice", "nobody-here", "../etc"):
        sock.sendall(f"USER {user}\r\n".encode())
        reader.readline()
        started = time.monotonic()
        sock.sendall(b"PASS wrong\r\n")
        assert reader.readline() == b"-ERR [AUTH] Authentication failed.\r\n"
        assert time.monotonic() - started >= limits.AUTH_FAILURE_FLOOR, user
    sock.sendall(b"QUIT\r\n")
    reader.readline()
    assert proc.wait(timeout=20) == 0


def test_wrong_password_and_unknown_user_look_the_same(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()))
    replies = []
    for user, password in (("alice", "wrong"), ("nobody-here", PASSWORD), ("../etc/passwd", "x")):
        client = env.client()
        client.user(user)
        with pytest.raises(poplib.error_proto) as info:
            client.pass_(password)
        replies.append(info.value.args[0])
        client.quit()
    assert replies == [b"-ERR [AUTH] Authentication failed."] * 3


def test_htpasswd_password_is_the_utf8_octets_sent(env: Pop3Env) -> None:
    """A client sending its password in latin-1 logged in against the hash of its UTF-8 form
    (a latin-1 fallback: two byte strings, one hash). Only the UTF-8 octets do now."""
    env.add_user("carol", "pässwörd")
    client = env.client()
    client.encoding = "latin-1"  # poplib sends PASS p\xe4ssw\xf6rd
    client.user("carol")
    with pytest.raises(poplib.error_proto) as info:
        client.pass_("pässwörd")
    assert info.value.args[0] == b"-ERR [AUTH] Authentication failed."
    client.quit()
    client = env.client()
    client.user("carol")
    assert client.pass_("pässwörd").startswith(b"+OK")
    client.quit()
    assert finish(client) == 0


def test_auth_plain_initial_response_longer_than_40_octets(env: Pop3Env) -> None:
    """poplib has no AUTH: its raw command, as a client library sends it (RFC 5034 section 4:
    bounded by the 255-octet line). pop3d refused it as a 41+ octet argument."""
    user, password = "a-rather-long-mailbox-name@example.org", "correct horse battery staple"
    env.add_user(user, password)
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    client = env.client()
    assert client._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
    assert client.stat() == (0, 0)
    client.quit()
    assert finish(client) == 0


def test_missing_mailbox_is_empty(env: Pop3Env) -> None:
    client = login(env)
    assert client.stat() == (0, 0)
    client.quit()
    assert finish(client) == 0
    assert not env.spool_path().exists()


def test_not_an_mbox_is_sys_perm(env: Pop3Env) -> None:
    env.write_spool(b"garbage first line\n\nFrom x\n")
    client = env.client()
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
        client.pass_(PASSWORD)
    assert client.file.read() == b""
    finish(client)
    log = env.log_text()
    assert "login failed" in log and "Traceback" not in log


def test_pipelining_many_commands_few_writes(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:2]))
    sock, proc = env.start()
    recv_until(sock, b"\r\n")
    sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    recv_until(sock, b"octets).\r\n")
    sock.sendall(b"NOOP\r\n" * 10000 + b"STAT\r\nQUIT\r\n")
    data = recv_until(sock, b"+OK Bye; 2 messages left.\r\n")
    assert data.count(b"+OK\r\n") == 10000
    assert proc.wait(timeout=20) == 0


def test_idle_timeout_closes_without_update(env: Pop3Env) -> None:
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    env.write_config(timeout=1)
    sock, proc = env.start()
    recv_until(sock, b"\r\n")
    sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nDELE 1\r\n")
    out = recv_until(sock, b"-ERR Autologout: idle for too long.\r\n")
    assert out.endswith(b"-ERR Autologout: idle for too long.\r\n")
    assert sock.recv(10) == b""
    assert proc.wait(timeout=20) == 0
    assert path.read_bytes() == data
    assert not (path.parent / "alice.lock").exists()


def test_sigterm_mid_session_releases_lock_without_update(env: Pop3Env) -> None:
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    client = login(env)
    client.dele(1)
    client.proc.terminate()
    assert finish(client) in (0, -15)
    assert path.read_bytes() == data
    assert wait_for(lambda: not (path.parent / "alice.lock").exists())


def test_config_error_is_exit_78_and_sys_perm_on_the_wire(env: Pop3Env) -> None:
    env.conf.write_text("[pop3d]\nno_such_key = 1\n")
    sock, proc = env.start()
    assert recv_until(sock, b"\r\n").startswith(b"-ERR [SYS/PERM]")
    assert proc.wait(timeout=20) == 78
    assert b"no_such_key" in proc.stderr.read()


@pytest.mark.parametrize(
    ("setting", "name"),
    [
        ("timeout = soon", "timeout"),
        ("locks = dotlock,lockf", "locks"),
        ("mbox_format = maildir", "mbox_format"),
        ("mailbox = relative/%u", "mailbox"),
        ("log = somewhere", "log"),
    ],
)
def test_bad_values_name_the_key(env: Pop3Env, setting: str, name: str) -> None:
    env.conf.write_text(f"[pop3d]\nauth = htpasswd\nhtpasswd = {env.htpasswd}\n{setting}\n")
    proc = subprocess.run(env.command("--listen", "127.0.0.1:1"), capture_output=True, timeout=20)
    assert proc.returncode == 78
    assert name in proc.stderr.decode() and b"Traceback" not in proc.stderr


def test_command_line_wins_over_file(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    env.write_config(timeout=600)
    sock, proc = env.start("--timeout", "1")
    recv_until(sock, b"\r\n")
    assert recv_until(sock, b"\r\n") == b"-ERR Autologout: idle for too long.\r\n"
    proc.wait(timeout=20)


def test_pipes_instead_of_a_socket(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:2]))
    script = f"USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode()
    proc = subprocess.run(env.command(), input=script, capture_output=True, timeout=30, env=child_env())
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"+OK POP3 server ready\r\n+OK Send PASS.\r\n+OK Logged in; 2 messages")
    assert proc.stdout.endswith(b"+OK Bye; 2 messages left.\r\n")


def test_no_traceback_ever_reaches_the_wire(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()))
    sock, proc = env.start()
    junk = (
        b"\x00\xff" * 200
        + b"\r\n"
        + b"RETR 999999999999\r\nUSER \r\nPASS\r\n"
        + b"A" * 5000
        + b"\r\nQUIT\r\n"
    )
    sock.sendall(junk)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    assert b"Traceback" not in data and b"/" not in data.replace(b"[SYS/", b"")
    proc.wait(timeout=20)
