"""pop3d.names: no valid user name reaches a file pop3d (or an MDA) derives for another user.

The rule by construction, tested as such (every derived name is reserved; no spool name is;
`own` names split back into one kind and one spool), then the reproductions of the review end
to end: real sessions of two htpasswd users sharing one uid, as a virtual-hosting site runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, Pop3Env, child_env, mbox_bytes, sample_messages
from hostile import RawClient, leftovers, no_traceback, start
from hypothesis import given
from hypothesis import strategies as st

from pop3d import config, names

TEMPLATES = [
    "/var/mail/%u",
    "%h/Mail/inbox",
    "/var/mail/%u.mbox",
    "/var/mail/virtual/%u",
    "/var/mail/%u/inbox",
    "/var/mail/x%u",
    "/srv/mail/%u/%u",
]
# Names close to the derived ones, so the search does not depend on luck.
TRICKY = [
    "alice",
    "alice.lock",
    "alice.LOCK",
    "alice.lock.mail.5f3a.1a2b",
    "alice.pop3d-journal",
    "alice.pop3d-journal.tmp",
    "alice.pop3d-journal.unusable-1700000000",
    "alice.mbox",
    "alice.mbox.lock",
    "pop3d-journal.alice",
    "inbox.lock",
    "a.",
    "lk12345.vm",
    "alice.vm.4242",
    "alice.4242.1700000000.vm",
    "alice.2024",
    "a.b.3",
]
NAME = st.one_of(
    st.sampled_from(TRICKY),
    st.text("abclok.-_@+pdj3", min_size=1, max_size=24),
)


def derived(spool: str) -> list[str]:
    """Every file pop3d or an MDA makes beside `spool`."""
    return [
        names.dotlock(spool),
        names.journal(spool),
        names.journal_temp(spool),
        names.unusable_journal(spool, "1700000000-4242"),
        names.session_lock(spool),
        names.own(spool, f"{names.DOTLOCK_TEMP}-vm-4242-0badcafe"),
        names.dotlock(spool) + ".vm.5f3a1b2c.1a2b",  # Exim's hitching post
        *mua_temporaries(spool, "vm", 4242),
    ]


def mua_temporaries(spool: str, host: str, pid: int) -> list[str]:
    """The link temporaries mail readers unlink before creating them: mutt_dotlock's
    `<spool>.<short host>.<pid>`, GNU Mailutils' `<spool>.<pid>.<time>.<host>`."""
    return [f"{spool}.{host.partition('.')[0]}.{pid}", f"{spool}.{pid}.1700000000.{host}"]


def mda_temporary(spool: str) -> str:
    """liblockfile's temporary, named after its process, not after the spool. (procmail's,
    `_da.MuLFrB.vm`, is not reserved: procmail creates it with O_EXCL and retries another name.)"""
    return os.path.join(os.path.dirname(spool), ".lk042420vm")


def spool_or_none(template: str, user: str, home: str = "/home/x") -> str | None:
    if names.valid_username(user.encode("ascii", "replace")) != user:
        return None
    try:
        return names.spool_path(template, user, home)
    except names.ReservedNameError:
        return None


@given(st.sampled_from(TEMPLATES), NAME, NAME)
def test_no_valid_name_reaches_a_derived_file(template: str, user: str, other: str) -> None:
    victim = spool_or_none(template, user)
    attacker = spool_or_none(template, other)
    if victim is None or attacker is None:
        return
    assert attacker not in derived(victim)
    assert attacker != mda_temporary(victim)
    if attacker != victim:  # two spools never share a derived file
        assert not set(derived(attacker)) & set(derived(victim))


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("user", ["alice", "bob.smith", "x@example.org"])
def test_every_derived_name_is_reserved(template: str, user: str) -> None:
    spool = names.spool_path(template, user, "/home/x")
    assert names.reserved(os.path.basename(spool)) is None
    for path in [*derived(spool), mda_temporary(spool)]:
        assert os.path.dirname(path) == os.path.dirname(spool)
        assert names.reserved(os.path.basename(path)), path


HOST = st.text("abcvm0123456789-.", min_size=1, max_size=20).filter(lambda h: h[0] not in ".-")


@given(st.sampled_from(TEMPLATES), NAME, HOST, st.integers(1, 4194304))
def test_mail_readers_temporaries_are_reserved_for_any_host(
    template: str, user: str, host: str, pid: int
) -> None:
    """Review F4: whatever the host (on a shared spool directory, any host's short name) and the
    pid, the names mutt and Mailutils unlink before they create them are no valid user's spool."""
    spool = spool_or_none(template, user)
    if spool is None:
        return
    for temporary in mua_temporaries(spool, host, pid):
        assert names.reserved(os.path.basename(temporary)), temporary
        assert names.valid_username(os.path.basename(temporary).encode()) is None


@given(st.text("abc.-", min_size=1, max_size=8), st.text("abc.-_", min_size=1, max_size=12))
def test_own_names_split_back_into_kind_and_spool(kind: str, spool: str) -> None:
    if "." in kind:
        with pytest.raises(ValueError):
            names.own("/d/" + spool, kind)
        return
    name = os.path.basename(names.own("/d/" + spool, kind))
    assert name.startswith(names.OWN_PREFIX)
    assert name[len(names.OWN_PREFIX) :].split(".", 1) == [kind, spool]


@pytest.mark.parametrize(
    "raw",
    [
        b"alice.lock",
        b"ALICE.Lock",
        b"alice.lock.x",
        b".alice",
        b"-alice",
        b"a..b",
        b"x.lock",
        b"pop3dev.vm.27795",
        b"bob.smith.mail.1",
        b"alice.4242.1700000000.mail.example.org",
    ],
)
def test_reserved_or_malformed_names_are_refused(raw: bytes) -> None:
    assert names.valid_username(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"alice.pop3d-journal",
        b"alice.pop3d-journal.tmp",
        b"lock",
        b"a.locks",
        b"a_b",
        b"alice.2024",
        b"bob.smith",
        b"v1.2.x3",
        b"a.1.2b",
        b"x.1.b.2.c",
    ],
)
def test_names_outside_the_reserved_namespace_stay_valid(raw: bytes) -> None:
    """These were pop3d's journal names: pop3d no longer writes there, so they are fine names."""
    assert names.valid_username(raw) == raw.decode()


@pytest.mark.parametrize(
    "template", ["/var/mail/.%u", "%h/.mbox", "/var/mail/%u.lock", "/var/mail/%u.lock.d", "/var/mail/%u/"]
)
def test_template_that_cannot_follow_the_rule_is_refused_at_start(template: str, tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="mailbox"):
        config.load(["--mailbox", template])
    conf = tmp_path / "pop3d.conf"
    conf.write_text(f"[pop3d]\nmailbox = {template}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pop3d", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd=str(ROOT),
        env=child_env(),
        timeout=60,
    )
    assert proc.returncode == 78 and b"mailbox" in proc.stderr and b"file name" in proc.stderr


@pytest.mark.parametrize("template", TEMPLATES)
def test_usual_templates_are_accepted(template: str) -> None:
    names.check_template(template)


def test_a_template_that_makes_one_name_reserved_refuses_that_login_only() -> None:
    assert names.spool_path("/var/mail/x%u", "alice", None) == "/var/mail/xalice"
    with pytest.raises(names.ReservedNameError):
        names.spool_path("/var/mail/%ulock", "a.", None)  # "a.lock": a dotlock's name


@pytest.mark.parametrize(("name", "why"), [("alice.lock", b".lock"), ("pop3dev.vm.27795", b"mutt")])
def test_pop3d_passwd_refuses_a_lock_name(tmp_path: Path, name: str, why: bytes) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pop3d.passwd", "-c", "-i", str(tmp_path / "users"), name],
        input=b"secret\n",
        capture_output=True,
        cwd=str(ROOT),
        env=child_env(),
        timeout=60,
    )
    assert proc.returncode == 65 and why in proc.stderr
    assert not (tmp_path / "users").exists()


MUTT_DOTLOCK = next(
    (
        path
        for path in (
            os.environ.get("POP3D_MUTT_DOTLOCK", ""),
            "/opt/pop3d-ci/mutt/usr/bin/mutt_dotlock",  # where .ci/run unpacks it
            shutil.which("mutt_dotlock") or "",
        )
        if path and os.access(path, os.X_OK)
    ),
    None,
)
STRACE = shutil.which("strace")


@pytest.mark.skipif(
    MUTT_DOTLOCK is None or STRACE is None,
    reason="needs mutt_dotlock (Debian package mutt; .ci/run unpacks it) and strace",
)
def test_every_file_mutt_dotlock_touches_is_reserved(tmp_path: Path) -> None:
    """Review F4, with the real binary: mutt_dotlock (mutt 2.2, setgid mail) unlinks, creates and
    links names beside the spool, relative to its directory. Besides the spool, each is reserved:
    no valid user's spool can be it. Before, `alice.<host>.<pid>` was a valid user name, whose
    spool mutt_dotlock deleted when alice locked hers."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = spool_dir / "alice"
    spool.write_bytes(b"From a@b Mon Jan  1 00:00:00 2024\nSubject: x\n\nx\n\n")
    trace = tmp_path / "trace"
    calls = "trace=open,openat,unlink,unlinkat,link,linkat,rename,renameat,renameat2"
    for unlock in ([], ["-u"]):
        done = subprocess.run(
            [STRACE, "-f", "-qq", "-o", str(trace), "-e", calls, MUTT_DOTLOCK, *unlock, str(spool)],  # type: ignore[list-item]
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', trace.read_text())
        touched = {name for name in strings if "/" not in name} - {"alice"}  # relative: beside it
        assert "alice.lock" in touched
        if not unlock:
            assert len(touched) >= 2  # the lock and its link temporary
        for name in touched:
            assert names.reserved(name), name
            assert names.valid_username(name.encode()) is None, name
    assert sorted(os.listdir(spool_dir)) == ["alice"]


# ------------------------------------------------------------------ end to end, two users


def session(env: Pop3Env, user: str) -> RawClient:
    client = start(env)
    reply = client.login(user.encode())
    assert reply.startswith(b"+OK"), reply
    return client


def quit_cleanly(client: RawClient) -> None:
    assert client.cmd(b"QUIT").startswith(b"+OK")
    assert client.proc is not None and client.proc.wait(timeout=60) == 0


def two_users(env: Pop3Env, other: str) -> tuple[list[bytes], bytes]:
    """alice's messages (her spool written) and the other user's spool bytes."""
    env.add_user(other, "other pass")
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    theirs = mbox_bytes([b"From: x@example.org\nSubject: theirs %d\n\nkeep me\n" % i for i in range(3)])
    env.write_spool(theirs, user=other)
    return messages, theirs


def their_listing_is_whole(env: Pop3Env, other: str, theirs: bytes) -> None:
    assert env.spool_path(other).read_bytes() == theirs
    client = start(env)
    assert client.login(other.encode(), "other pass").startswith(b"+OK")
    assert len(client.listing()) == 3
    assert b"theirs 2" in client.retr(3)
    quit_cleanly(client)


@pytest.mark.parametrize("other", ["alice.pop3d-journal.tmp", "alice.pop3d-journal"])
def test_user_named_after_an_old_journal_name_keeps_its_spool(env: Pop3Env, other: str) -> None:
    """Review finding 2: alice's login deleted the spool of `alice.pop3d-journal.tmp` (recovery
    unlinked the temporary journal's name unchecked) and renamed the spool of
    `alice.pop3d-journal` aside (an unusable journal). Now her update journals in pop3d's own
    namespace and neither name is touched, before, during or after it."""
    messages, theirs = two_users(env, other)
    alice = session(env, "alice")
    assert env.spool_path(other).read_bytes() == theirs
    assert alice.cmd(b"DELE 1").startswith(b"+OK")  # a journalled update (not the last message)
    quit_cleanly(alice)
    assert env.spool_path().read_bytes() == mbox_bytes(messages[1:])
    their_listing_is_whole(env, other, theirs)
    assert leftovers(env.spool_dir, {"alice", other}) == set()
    no_traceback(env)


@pytest.mark.parametrize("name", ["alice.lock", "alice.vm.4242"])
def test_user_named_after_a_dotlock_cannot_log_in(env: Pop3Env, name: str) -> None:
    """`alice.lock` is alice's dotlock, `alice.vm.4242` mutt's temporary for it: no such user can
    log in (it answers like a bad password), and alice's sessions neither see nor touch them."""
    env.add_user(name, "other pass")
    client = start(env)
    assert client.login(name.encode(), "other pass").startswith(b"-ERR [AUTH]")
    client.cmd(b"QUIT")
    assert "invalid user name" in env.log_text()


@pytest.mark.parametrize("size", ["small", "large"])
def test_mail_at_a_dotlock_name_is_never_broken_as_stale(env: Pop3Env, size: str) -> None:
    """A file holding mail at `alice.lock` (the spool of a user of an older version) locks alice
    out, and stays: before, once older than stale_lock it was deleted as a stale lock."""
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    held = b"From x Thu Nov 26 10:00:00 2026\nSubject: s\n\nmail\n\n"
    if size == "large":
        held = mbox_bytes(messages)
    planted = env.write_spool(held, user="alice.lock")
    old = time.time() - 3600
    os.utime(planted, (old, old))
    client = start(env)
    assert client.login().startswith(b"-ERR [IN-USE]")
    assert client.closed()  # a login that cannot get its maildrop ends the session
    assert client.proc is not None and client.proc.wait(timeout=60) == 0
    assert planted.read_bytes() == held
    assert "not a lock file" in env.log_text()
    no_traceback(env)
