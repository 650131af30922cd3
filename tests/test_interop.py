"""A real pop3d session beside real MDAs and lock tools: procmail, dotlockfile, fcntl holders.

These are the end-to-end halves of the locking tests in test_locking.py and test_maildrop.py:
here the lock holder is a pop3d process serving a client over a socketpair, as inetd runs it.
"""

from __future__ import annotations

import fcntl
import os
import poplib
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    PASSWORD,
    Pop3Env,
    dotlock_content,
    in_pid_namespace,
    mbox_bytes,
    needs_pid_namespaces,
    sample_messages,
    wait_for,
)

DOTLOCKFILE = shutil.which("dotlockfile")
PROCMAIL = shutil.which("procmail")
needs_dotlockfile = pytest.mark.skipif(DOTLOCKFILE is None, reason="no dotlockfile (liblockfile-bin)")
needs_procmail = pytest.mark.skipif(PROCMAIL is None, reason="procmail not installed")

NEW_MAIL = b"From mta@example.org Fri Nov 27 13:00:00 2026\nSubject: via procmail\n\nhello\n.\nbye\n"


def login(env: Pop3Env):
    client = env.client()
    client.user("alice")
    client.pass_(PASSWORD)
    return client


def dotlockfile(*args: str) -> int:
    return subprocess.run([DOTLOCKFILE, *args], capture_output=True, timeout=60).returncode  # type: ignore[list-item]


def leftovers(path: Path) -> list[str]:
    """Files beside the spool that a finished session must not leave (locks, journals, temps)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@needs_procmail
def test_procmail_delivery_waits_for_the_session_and_lands_intact(env: Pop3Env) -> None:
    messages = sample_messages()
    path = env.write_spool(mbox_bytes(messages))
    rcfile = env.base / "procmailrc"
    rcfile.write_text(f"LOCKSLEEP=1\n:0:\n{path}\n")
    client = login(env)
    client.dele(1)
    client.dele(3)
    procmail = subprocess.Popen(
        [PROCMAIL, "-m", str(rcfile)],  # type: ignore[list-item]
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert procmail.stdin is not None and procmail.stderr is not None
    procmail.stdin.write(NEW_MAIL)
    procmail.stdin.close()
    # While the session holds the maildrop, procmail waits and the spool is untouched.
    select.select([procmail.stderr], [], [], 2.5)
    assert procmail.poll() is None, procmail.stderr.read()
    assert path.read_bytes() == mbox_bytes(messages)
    assert client.quit().startswith(b"+OK")
    assert procmail.wait(timeout=60) == 0, procmail.stderr.read()
    procmail.stderr.close()
    kept = [messages[1], messages[3], messages[4]]
    assert path.read_bytes() == mbox_bytes(kept) + NEW_MAIL + b"\n"
    # And the next session sees the new message, byte for byte.
    client = login(env)
    assert client.stat()[0] == len(kept) + 1
    _, lines, _ = client.retr(len(kept) + 1)
    assert lines == [b"Subject: via procmail", b"", b"hello", b".", b"bye"]
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert leftovers(path) == []


@needs_dotlockfile
def test_dotlockfile_lock_makes_login_wait_then_in_use(env: Pop3Env) -> None:
    path = env.write_spool(mbox_bytes(sample_messages()))
    lock = f"{path}.lock"
    assert dotlockfile("-l", lock) == 0
    try:
        client = env.client()
        client.user("alice")
        started = time.monotonic()
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            client.pass_(PASSWORD)
        assert time.monotonic() - started >= 0.9  # it waited for lock_timeout (1 s) first
        assert client.file.read() == b""  # and ended the session
    finally:
        assert dotlockfile("-u", lock) == 0
    client = login(env)  # released: the next login works
    client.quit()


@needs_dotlockfile
def test_session_lock_makes_dotlockfile_fail(env: Pop3Env) -> None:
    path = env.write_spool(mbox_bytes(sample_messages()))
    lock = f"{path}.lock"
    client = login(env)
    assert Path(lock).read_bytes() == dotlock_content(client.proc.pid)
    assert dotlockfile("-r", "0", "-l", lock) != 0
    assert dotlockfile("-p", "-r", "0", "-l", lock) != 0  # the pid in it is alive
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert dotlockfile("-r", "0", "-l", lock) == 0
    assert dotlockfile("-u", lock) == 0


def test_fcntl_lock_of_another_process_means_in_use(env: Pop3Env) -> None:
    path = env.write_spool(mbox_bytes(sample_messages()))
    with open(path, "rb+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        client = env.client()
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            client.pass_(PASSWORD)
        assert client.file.read() == b""
        client.proc.wait(timeout=20)
    # Waiting for the fcntl lock released every lock it took meanwhile: no dotlock left behind.
    assert leftovers(path) == []


@needs_dotlockfile
def test_idle_session_keeps_its_dotlock_fresh(env: Pop3Env) -> None:
    """dotlockfile breaks a lock untouched for 5 minutes; an idle session must keep it younger.

    The refresh interval is a quarter of `stale_lock`; with stale_lock = 2 s the session touches
    its lock every 0.5 s. We age the lock by 10 minutes and watch the session renew it.
    """
    env.write_config(stale_lock=2)
    path = env.write_spool(mbox_bytes(sample_messages()))
    lock = Path(f"{path}.lock")
    client = login(env)
    old = time.time() - 600
    os.utime(lock, (old, old))
    assert wait_for(lambda: time.time() - lock.stat().st_mtime < 60, timeout=10)
    # dotlockfile (-r 2: it breaks locks older than 5 minutes between retries) cannot take it.
    assert dotlockfile("-r", "2", "-i", "0", "-l", str(lock)) != 0
    assert lock.read_text().split(":")[0] == str(client.proc.pid)
    client.dele(1)
    assert client.quit().startswith(b"+OK")  # the lock is still ours, so the update runs
    assert client.proc.wait(timeout=20) == 0
    assert leftovers(path) == []


@needs_dotlockfile
def test_broken_session_lock_aborts_the_update(env: Pop3Env) -> None:
    """If someone broke our dotlock and took the maildrop, QUIT must not rewrite the spool."""
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    lock = Path(f"{path}.lock")
    client = login(env)
    client.dele(2)
    lock.unlink()  # what a stale-lock breaker does
    assert dotlockfile("-r", "0", "-l", str(lock)) == 0
    try:
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
    finally:
        assert dotlockfile("-u", str(lock)) == 0
    client.proc.wait(timeout=20)
    assert path.read_bytes() == data
    assert "update failed" in env.log_text()


def test_session_killed_with_sigkill_does_not_lock_its_user_out(env: Pop3Env) -> None:
    """Review finding 4: a session killed with SIGKILL (or by a SIGBUS) leaves its dotlock; the
    next login waited for stale_lock (5 minutes). Its process is gone from this host: the next
    session breaks the lock at once. No update happened (DELE without QUIT)."""
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    lock = Path(f"{path}.lock")
    first = login(env)
    first.dele(1)
    holder = int(lock.read_text().split(":")[0])
    os.kill(holder, signal.SIGKILL)
    first.proc.wait(timeout=20)  # reaped, as inetd does
    assert lock.exists()
    second = login(env)  # lock_timeout is 1 s in these tests
    assert second.stat()[0] == len(sample_messages())
    assert second.quit().startswith(b"+OK")
    assert second.proc.wait(timeout=20) == 0
    assert path.read_bytes() == data and leftovers(path) == []
    assert f"its process {holder} is not running on this host" in env.log_text()


@needs_dotlockfile
@needs_pid_namespaces
@pytest.mark.parametrize("hostname", ["other-container", os.uname().nodename])
def test_live_lock_of_a_container_mda_is_not_broken(env: Pop3Env, hostname: str) -> None:
    """Review F2: `dotlockfile -p` (liblockfile, as procmail's and mutt's peers write it: a bare
    pid) run in another pid namespace holds the lock while it delivers. Its pid is no process
    here, which proves nothing: the login waits and gets [IN-USE], the lock stays. Before, pop3d
    broke it at once ("its process ... is not running on this host"), with or without a host
    name of the container's own."""
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    lock = Path(f"{path}.lock")
    holder = in_pid_namespace(
        f'{DOTLOCKFILE} -p -l "$1" && echo locked && read line; {DOTLOCKFILE} -u "$1"',
        str(lock),
        hostname=hostname,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        held = lock.read_bytes()
        assert not Path(f"/proc/{int(held)}").exists()  # the delivering shell is no process here
        client = env.client()
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            client.pass_(PASSWORD)
        assert client.proc.wait(timeout=20) == 0
        assert lock.read_bytes() == held and "broke stale" not in env.log_text()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        holder.stdout.close()
    assert not lock.exists()  # released by its holder
    client = login(env)
    assert client.stat()[0] == len(sample_messages())
    client.quit()
    assert path.read_bytes() == data


@pytest.mark.parametrize("content", [b"", b"12345:other-host.example.org\n"])
def test_dotlock_older_than_boot(env: Pop3Env, content: bytes) -> None:
    """An empty dotlock older than this host's boot (a power cut) is stale at once, however long
    stale_lock is; another host's lock is never judged by our boot time or our pids (NFS)."""
    stat = Path("/proc/stat").read_text().splitlines()
    booted = next(float(line.split()[1]) for line in stat if line.startswith("btime "))
    if time.time() - booted > 86400 - 600:
        pytest.skip("up for a day: stale_lock (at most 86400 s) would break the lock before boot does")
    env.write_config(stale_lock=86400)
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    lock = Path(f"{path}.lock")
    lock.write_bytes(content)
    os.utime(lock, (booted - 1, booted - 1))
    client = env.client()
    client.user("alice")
    if content:
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            client.pass_(PASSWORD)  # and the session ends
        assert lock.read_bytes() == content
    else:
        client.pass_(PASSWORD)
        assert "made before this host booted" in env.log_text()
        client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert path.read_bytes() == data


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_release_locks_without_update(env: Pop3Env, signum: int) -> None:
    data = mbox_bytes(sample_messages())
    path = env.write_spool(data)
    client = login(env)
    client.dele(1)
    client.proc.send_signal(signum)
    client.proc.wait(timeout=20)
    assert path.read_bytes() == data
    assert leftovers(path) == []


def test_client_vanishing_mid_retr_releases_locks_without_update(env: Pop3Env) -> None:
    big = b"Subject: big\n\n" + b"x" * 199 + b"\n"
    data = mbox_bytes([big * 20000, b"Subject: small\n\nhi\n"])
    path = env.write_spool(data)
    sock, proc = env.start()
    sock.recv(100)
    sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nDELE 2\r\nRETR 1\r\n")
    sock.recv(65536)  # start reading the 4 MB message, then hang up
    sock.close()
    assert proc.wait(timeout=30) == 0
    assert path.read_bytes() == data
    assert leftovers(path) == []
