"""Malformed and hostile spools, end to end through pop3d: a sane listing or -ERR [SYS/PERM].

Sane means: STAT, LIST, UIDL agree; every RETR delivers exactly the octets LIST announced, and
those are what the format's definition gives (the fuzz harness's independent reference); TOP
works; UIDs are unique. Never a hang, a traceback, a path on the wire, or a lock left behind.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
from pathlib import Path

import pytest
from conftest import IS_ROOT, RUN_AS, Pop3Env, mbox_bytes, sample_messages
from fuzz.fuzz_mbox import reference, sent_form, top_content
from hostile import RawClient, leftovers, lock_gone, no_traceback, peak_rss_kib, sparse_file, start

from pop3d import names
from pop3d.update import STOP_AFTER_ENV

GIB = 1 << 30
MIB = 1 << 20


def check_listing(client: RawClient, spool: bytes | None, rd: bool = False, retr_limit: int = 64 * MIB):
    """Assert a consistent listing (and, given the spool bytes, exactly the expected messages)."""
    count, total = (int(x) for x in client.cmd(b"STAT").split()[1:3])
    sizes = [int(size) for _, size in client.listing(b"LIST")]
    uids = [uid for _, uid in client.listing(b"UIDL")]
    assert len(sizes) == count and sum(sizes) == total
    assert len(set(uids)) == count
    assert all(1 <= len(u) <= 70 and all(0x21 <= c <= 0x7E for c in u) for u in uids)
    bounds = reference(spool) if spool is not None else None
    if bounds is not None:
        assert len(bounds) == count
    for number, size in enumerate(sizes, 1):
        if size > retr_limit:
            continue
        body = client.retr(number)
        assert len(body) == size
        top = client.retr(number, 0)
        if bounds is not None:
            s, e = bounds[number - 1]
            assert body == sent_form(spool[s:e], rd)
            assert top == sent_form(top_content(spool[s:e], 0), rd)
    return sizes


def refused(client: RawClient) -> None:
    reply = client.login()
    assert reply.startswith(b"-ERR [SYS/PERM]"), reply
    assert b"/" not in reply.replace(b"SYS/PERM", b"")
    assert client.closed()  # a login that cannot get its maildrop ends the session


def finish(env: Pop3Env, client: RawClient) -> None:
    assert client.proc is not None
    assert client.proc.wait(timeout=60) == 0
    assert lock_gone(env.spool_path())
    assert leftovers(env.spool_dir, {"alice"}) == set()
    no_traceback(env)


# name -> spool bytes; each is served (a listing), never refused.
SPOOLS: dict[str, bytes] = {
    "nul-bytes": mbox_bytes([b"Subject: \x00nul\x00\n\n\x00\x00\x00\nbody\x00\n", b"X: \x00\n\n\x00"]),
    "bare-cr-only": b"From a Thu Nov 26 10:00:00 2026\rSubject: old mac\r\rbody\r",
    "bare-cr-inside": mbox_bytes([b"Subject: a\rb\n\nline\rwith cr\r\rend\n"]),
    "mixed-crlf-lf": mbox_bytes([b"Subject: m\r\nX: lf\n\r\nbody\r\nlf\n\r\n\n", b"A: b\n\ncrlf\r\n"]),
    "crlf-separators": b"From a\r\nS: 1\r\n\r\nx\r\n\r\nFrom b\r\nS: 2\r\n\r\ny\r\n\r\n",
    "from-in-body-without-blank": mbox_bytes([b"Subject: f\n\nline\nFrom someone else\nFrom again\n"]),
    "quoted-from": mbox_bytes([b"Subject: q\n\n>From a\n>>From b\n>>>>>>>>>>From c\n> From d\n"]),
    "truncated-mid-message": mbox_bytes(sample_messages()[:3])[:-37],
    "truncated-mid-from-line": mbox_bytes(sample_messages()[:2]) + b"From trunc",
    "only-a-from-line": b"From x",
    "empty-messages": b"From a\n\nFrom b\n\nFrom c\n",
    "no-header-end": mbox_bytes([b"Subject: never ends\nX: y\nZ: z"]),
    "body-only-blank-lines": mbox_bytes([b"\n\n\n\n"]),
    "dots": mbox_bytes([b"Subject: d\n\n.\n..\n.\r\n. \n...x\n"]),
    "huge-from-line": b"From " + b"x" * (3 * MIB) + b"\nSubject: after\n\nbody\n",
    "long-header-line": mbox_bytes([b"Subject: " + b"h" * (2 * MIB) + b"\n\nbody\n"]),
    "identical-messages": mbox_bytes([b"Subject: same\n\nsame\n"] * 50),
    "many-tiny-messages": b"From a\n\n" * 20000,
    "binary-garbage": b"From x\n" + bytes(range(256)) * 64 + b"\n\nFrom y\n" + os.urandom(4096),
    "volatile-headers-only": mbox_bytes([b"Status: RO\nX-UID: 1\nLines: 3\n\nb\n", b"Status: O\n\nb\n"]),
}


@pytest.mark.parametrize("name", sorted(SPOOLS))
def test_malformed_spool_gets_a_sane_listing(env: Pop3Env, name: str) -> None:
    data = SPOOLS[name]
    env.write_spool(data)
    client = start(env)
    assert client.login().startswith(b"+OK")
    check_listing(client, data)
    assert client.cmd(b"QUIT").startswith(b"+OK")
    finish(env, client)
    assert env.spool_path().read_bytes() == data


def test_mboxrd_quoted_lines_are_unquoted(env: Pop3Env) -> None:
    data = SPOOLS["quoted-from"] + b"From b\n\n>From x\n" + b">" * 9000 + b"From y\n"
    env.write_config(mbox_format="mboxrd")
    env.write_spool(data)
    client = start(env)
    assert client.login().startswith(b"+OK")
    check_listing(client, data, rd=True)
    assert client.cmd(b"QUIT").startswith(b"+OK")
    finish(env, client)


def test_mboxrd_lines_made_of_quoted_from_lines(env: Pop3Env) -> None:
    """Issue 12's spool (three 256 KiB lines of ">From "; 786 KB): LIST says what RETR sends.
    (Its scan cost 5 s of CPU per login; tests/test_mbox.py checks that cost is linear now.)"""
    line = b">From " * (256 * 1024 // 6) + b"\n"
    data = mbox_bytes([b"Subject: q%d\n\n%s" % (k, line) for k in range(3)])
    env.write_config(mbox_format="mboxrd")
    env.write_spool(data)
    client = start(env)
    assert client.login().startswith(b"+OK")
    sizes = check_listing(client, data, rd=True)
    assert sizes == [len(b"Subject: q0\r\n\r\n") + len(line)] * 3  # the line: one ">" less, a CR more
    assert client.cmd(b"QUIT").startswith(b"+OK")
    finish(env, client)


def test_deleting_from_a_malformed_spool_keeps_the_rest_byte_identical(env: Pop3Env) -> None:
    data = SPOOLS["nul-bytes"] + SPOOLS["mixed-crlf-lf"] + SPOOLS["truncated-mid-message"]
    path = env.write_spool(data)
    bounds = reference(data)
    assert bounds is not None and len(bounds) >= 4
    client = start(env)
    assert client.login().startswith(b"+OK")
    assert client.cmd(b"DELE 2").startswith(b"+OK")
    assert client.cmd(b"QUIT").startswith(b"+OK")
    finish(env, client)
    froms = [data.rfind(b"From ", 0, s) for s, _ in bounds] + [len(data)]
    assert path.read_bytes() == data[: froms[1]] + data[froms[2] :]


def _not_a_regular_file(env: Pop3Env, kind: str) -> None:
    path = env.spool_path()
    other = env.spool_dir / "elsewhere"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "symlink":
        other.write_bytes(mbox_bytes(sample_messages()))
        path.symlink_to(other)
    elif kind == "hard-link":
        other.write_bytes(mbox_bytes(sample_messages()))
        os.link(other, path)
    elif kind == "unreadable":
        env.write_spool(mbox_bytes(sample_messages())).chmod(0)
    elif kind == "not-an-mbox":
        env.write_spool(b"Return-Path: <a@b>\nFrom: x\n\nbody\n")
    elif kind == "foreign-owner":
        env.write_spool(mbox_bytes(sample_messages()))
        os.chown(path, 0 if IS_ROOT else os.geteuid(), -1)
    if IS_ROOT:
        for p in (path, other):
            if p.exists() or p.is_symlink():
                os.lchown(p, pwd.getpwnam(RUN_AS).pw_uid, -1)
        if kind == "foreign-owner":
            os.chown(path, 0, -1)


@pytest.mark.parametrize(
    "kind",
    ["directory", "fifo", "socket", "symlink", "hard-link", "unreadable", "not-an-mbox", "foreign-owner"],
)
def test_unservable_spool_is_sys_perm(env: Pop3Env, kind: str) -> None:
    if kind == "foreign-owner" and not IS_ROOT:
        pytest.skip("needs root to create a file owned by another account")
    _not_a_regular_file(env, kind)
    client = start(env)
    refused(client)
    assert client.proc is not None and client.proc.wait(timeout=60) == 0
    assert lock_gone(env.spool_path())
    no_traceback(env)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(env.spool_path()).st_mode)  # never opened, so never blocked


def test_dotlock_that_is_a_directory_is_in_use_not_a_crash(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()))
    (env.spool_dir / "alice.lock").mkdir()
    client = start(env)
    assert client.login().startswith(b"-ERR [IN-USE]")
    assert client.closed()
    assert client.proc is not None and client.proc.wait(timeout=60) == 0
    no_traceback(env)


@pytest.mark.parametrize("magic", [b"pop3d journal v9", b"pop3d journal v1"])
def test_planted_journal_does_not_touch_the_spool(env: Pop3Env, magic: bytes) -> None:
    """Garbage is put aside and the spool served; what looks like an older version's journal
    refuses the maildrop ([SYS/TEMP]: its update might be half done). Neither writes a byte."""
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    journal = Path(names.journal(str(env.spool_path())))
    planted = magic + os.urandom(8192)
    journal.write_bytes(planted)
    journal.chmod(0o600)
    if IS_ROOT:
        os.chown(journal, pwd.getpwnam(RUN_AS).pw_uid, -1)
    client = start(env)
    if magic.endswith(b"v1"):
        assert client.login().startswith(b"-ERR [SYS/TEMP]")
        assert client.closed()
        assert journal.read_bytes() == planted
        assert "older pop3d" in env.log_text()
    else:
        assert client.login().startswith(b"+OK")
        check_listing(client, data)
        assert client.cmd(b"QUIT").startswith(b"+OK")
    assert client.proc is not None and client.proc.wait(timeout=60) == 0
    assert path.read_bytes() == data
    no_traceback(env)


@pytest.mark.skipif(not IS_ROOT, reason="needs root: a journal owned by root beside a session of another uid")
def test_journal_owned_by_root_is_not_pop3d_s(env: Pop3Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review item: the journal's accepted owners included uid 0, which pop3d never writes as
    (sessions run as the account). A committed journal whose owner is not the session's uid is
    not applied: logged, left alone, the spool served as it is (untouched before step 4)."""
    messages = sample_messages()
    data = mbox_bytes(messages)
    path = env.write_spool(data)
    monkeypatch.setenv(STOP_AFTER_ENV, "3")  # killed right after the commit point
    client = start(env)
    assert client.login().startswith(b"+OK")
    assert client.cmd(b"DELE 1").startswith(b"+OK")
    client.send(b"QUIT")
    assert client.proc is not None and client.proc.wait(timeout=60) == 137
    monkeypatch.delenv(STOP_AFTER_ENV)
    journal = Path(names.journal(str(path)))
    os.chown(journal, 0, 0)
    journal.chmod(0o644)  # readable by the session: nothing but its owner says it is not pop3d's
    os.unlink(f"{path}.lock")  # the killed session's (its pid is gone; not the point here)
    client = start(env)
    assert client.login().startswith(b"+OK")
    assert len(client.listing()) == len(messages)
    assert client.cmd(b"QUIT").startswith(b"+OK")
    assert client.proc.wait(timeout=60) == 0
    assert path.read_bytes() == data and journal.exists()
    assert "not a journal pop3d wrote" in env.log_text()


# ------------------------------------------------------------------ big spools


@pytest.mark.slow
def test_header_block_of_100_mb(env: Pop3Env) -> None:
    header = b"".join(b"X-Filler-%08d: %s\n" % (i, b"v" * 60) for i in range(100 * MIB // 80))
    message = b"Subject: huge header\n" + header + b"\nbody line\n"
    data = mbox_bytes([b"Subject: small\n\nfirst\n", message, b"Subject: last\n\nlast\n"])
    env.write_spool(data)
    client = start(env)
    assert client.login().startswith(b"+OK")
    sizes = check_listing(client, None, retr_limit=0)
    assert sizes[1] == len(message) + message.count(b"\n")
    assert len(client.retr(2)) == sizes[1]
    top = client.retr(2, 1)
    assert top.endswith(b"\r\n\r\nbody line\r\n") and len(top) == sizes[1]
    assert client.retr(3) == b"Subject: last\r\n\r\nlast\r\n"
    rss = peak_rss_kib(client.proc.pid)  # type: ignore[union-attr]
    assert client.cmd(b"QUIT").startswith(b"+OK")
    finish(env, client)
    print(f"peak RSS serving a 100 MB header block: {rss} KiB")
    assert rss < 96 * 1024


@pytest.mark.slow
def test_message_of_one_64_mb_line(env: Pop3Env) -> None:
    line = b"x" * (64 * MIB)
    data = b"From a\nSubject: one line\n\n" + line + b"\n\nFrom b\n" + line
    env.write_spool(data)
    client = start(env)
    assert client.login().startswith(b"+OK")
    sizes = check_listing(client, None, retr_limit=0)
    assert sizes == [len(b"Subject: one line\r\n\r\n") + len(line) + 2, len(line) + 2]
    assert client.retr(1) == b"Subject: one line\r\n\r\n" + line + b"\r\n"
    assert client.retr(2) == line + b"\r\n"
    assert client.retr(2, 0) == line + b"\r\n"  # no header end: TOP sends it all
    rss = peak_rss_kib(client.proc.pid)  # type: ignore[union-attr]
    assert client.cmd(b"QUIT").startswith(b"+OK")
    finish(env, client)
    print(f"peak RSS serving a 64 MB line: {rss} KiB")
    assert rss < 96 * 1024  # the line is streamed in windows, never held whole


@pytest.mark.slow
def test_sparse_spool_over_4_gib(env: Pop3Env) -> None:
    first = b"From a Thu Nov 26 10:00:00 2026\nSubject: spans 4 GiB\n\nstart\n"
    hole_end = 4 * GIB + 4096 + 17
    tail = b"\n\nFrom b Thu Nov 26 10:00:01 2026\nSubject: after the hole\n\nhello\n"
    path = env.spool_path()
    sparse_file(path, [(0, first), (hole_end, tail)])
    path.chmod(0o600)
    if IS_ROOT:
        os.chown(path, pwd.getpwnam(RUN_AS).pw_uid, -1)
    size = path.stat().st_size
    assert size > 4 * GIB and path.stat().st_blocks * 512 < 1 * MIB  # it costs no disk
    client = start(env)
    # Scanning 4 GiB (of zeros) takes seconds, many more on a loaded 2-core machine.
    client.sock.settimeout(300)
    assert client.login().startswith(b"+OK")
    sizes = check_listing(client, None, retr_limit=0)
    content1 = hole_end + 1 - len(b"From a Thu Nov 26 10:00:00 2026\n")  # up to the separator
    assert sizes[0] == content1 + 4  # four LFs in the content (one ends the hole) become CRLF
    assert sizes[0] > 2**32
    assert client.retr(1, 0) == b"Subject: spans 4 GiB\r\n\r\n"
    assert client.retr(2) == b"Subject: after the hole\r\n\r\nhello\r\n"
    assert client.cmd(b"DELE 1").startswith(b"+OK")
    assert client.cmd(b"QUIT").startswith(b"+OK")
    finish(env, client)
    assert path.read_bytes() == tail[2:]  # the message after the hole, moved down from > 4 GiB
