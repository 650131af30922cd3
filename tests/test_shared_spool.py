"""Two hosts serving one spool directory (docs/SCALING.md, shared storage), simulated on one
kernel: each pop3d runs in a UTS namespace with a host name of its own, and host B also in a PID
namespace of its own (the process ids it sees, and writes, mean nothing to host A and the other
way round). They share the spool directory and `locks = dotlock` only, the lock that works
across NFS clients whatever the server's lock manager.

What one kernel cannot show: NFS attribute caching and lockd themselves.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import IO_TIMEOUT, IS_ROOT, PASSWORD, ROOT, RUN_AS, Pop3Env, child_env, wait_for
from serving import free_port, greets

UNSHARE = shutil.which("unshare")
PROCMAIL = shutil.which("procmail")

pytestmark = [
    pytest.mark.skipif(
        not IS_ROOT, reason="needs root: namespaces for a host name and process ids of their own"
    ),
    pytest.mark.skipif(UNSHARE is None, reason="needs unshare (Debian package util-linux)"),
]


class Host:
    """`pop3d --listen` on its own loopback address, log file and host name (UTS namespace);
    with `own_pids`, in a PID namespace of its own as well."""

    def __init__(self, env: Pop3Env, name: str, address: str, own_pids: bool) -> None:
        self.name = name
        self.address = address
        self.own_pids = own_pids
        self.log = env.base / f"{name}.log"
        conf = env.base / f"{name}.conf"
        settings = dict(env.settings, log=str(self.log))
        conf.write_text("[pop3d]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items() if v is not None))
        self.port = free_port(address)
        namespaces = (
            ["--uts", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"] if own_pids else ["--uts"]
        )
        command = [sys.executable, "-m", "pop3d", "-c", str(conf), "--listen", f"{address}:{self.port}"]
        self.proc = subprocess.Popen(
            [UNSHARE, *namespaces, "sh", "-c", 'hostname "$0" && exec "$@"', name, *command],  # type: ignore[list-item]
            cwd=str(ROOT),
            env=child_env(),
            stderr=subprocess.PIPE,
        )
        assert wait_for(lambda: self.proc.poll() is not None or greets(self.port, address)), self.text()
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def server_pid(self) -> int:
        """pop3d's pid (as seen from outside): unshare's child when it forked into a PID namespace."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = f.read().split()
        except OSError:
            children = []
        return int(children[0]) if children else self.proc.pid

    def sees_process(self, pid: int) -> bool:
        """Whether a process `pid` exists as this host's processes see it (its PID namespace)."""
        probe = ["nsenter", "-t", str(self.server_pid()), "-p", "-m", "test", "-e", f"/proc/{pid}"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0

    def takes_dotlock(self, spool: object, seconds: float) -> str:
        """Whether this host, trying for `seconds` (stale_lock as configured here: 2 s), takes the
        spool's dotlock by itself ("taken", then released) or finds it held ("busy")."""
        script = (
            "import sys\n"
            "from pop3d.locking import LockTimeoutError, MailboxLock\n"
            "lock = MailboxLock(sys.argv[1], None, ('dotlock',), float(sys.argv[2]), 2.0)\n"
            "try:\n    lock.acquire()\nexcept LockTimeoutError:\n    print('busy')\n"
            "else:\n    lock.release()\n    print('taken')\n"
        )
        namespaces = ["-u", "-p", "-m"] if self.own_pids else ["-u"]
        done = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.server_pid()),
                *namespaces,
                sys.executable,
                "-c",
                script,
                str(spool),
                str(seconds),
            ],
            capture_output=True,
            cwd=str(ROOT),
            env=child_env(),
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.decode().strip()

    def client(self) -> poplib.POP3:
        return poplib.POP3(self.address, self.port, timeout=IO_TIMEOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.server_pid(), signal.SIGTERM)  # unshare itself does not pass it on
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def hosts(env: Pop3Env, request: pytest.FixtureRequest):
    """Hosts A and B on the test's spool directory; `mda_locks` as the test's parameter asks."""
    env.write_config(
        locks="dotlock", lock_timeout=3, stale_lock=2, mda_locks=getattr(request, "param", "session")
    )
    started: list[Host] = []
    try:
        started.append(Host(env, "hosta", "127.0.0.5", own_pids=False))
        started.append(Host(env, "hostb", "127.0.0.6", own_pids=True))
        yield started
    finally:
        for host in started:
            host.stop()


def message(number: int) -> bytes:
    return b"From: mda@example.org\nMessage-ID: <%d@shared>\nSubject: %d\n\nbody %d\n" % (
        number,
        number,
        number,
    )


def test_a_live_lock_of_one_host_holds_against_the_other(env: Pop3Env, hosts: list[Host]) -> None:
    """Host A's session holds the maildrop longer than stale_lock: it refreshes its dotlock, and
    host B, to which A's pid means nothing (no such process in B's PID namespace), neither
    breaks it as stale nor by its pid: [IN-USE], until A quits."""
    a, b = hosts
    env.write_spool(b"".join(b"From mda Thu Nov 26 10:00:00 2026\n" + message(n) + b"\n" for n in range(3)))
    holder = a.client()
    holder.user("alice")
    holder.pass_(PASSWORD)
    lock = env.spool_path().with_name("alice.lock")
    pid = int(re.match(rb"(\d+)", lock.read_bytes()).group(1))  # type: ignore[union-attr]
    assert pid > 1
    assert not b.sees_process(pid)  # in host B's PID namespace A's session is no process at all
    started = time.monotonic()
    waiting = b.client()
    waiting.user("alice")
    with pytest.raises(poplib.error_proto) as refused:
        waiting.pass_(PASSWORD)
    assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
    assert time.monotonic() - started > 2  # longer than stale_lock: the lock stayed live
    # B's login waited on pop3d's session lock first (an flock: on NFS, through lockd); the
    # dotlock alone holds against B too, judged as B judges it, past stale_lock.
    assert b.takes_dotlock(env.spool_path(), seconds=3) == "busy"
    assert holder.stat()[0] == 3
    holder.dele(1)
    assert holder.quit().startswith(b"+OK")
    waiting.close()
    second = b.client()
    second.user("alice")
    assert second.pass_(PASSWORD).startswith(b"+OK Logged in; 2 messages")
    assert second.quit().startswith(b"+OK")
    assert "broke stale dotlock" not in a.text() + b.text()


@pytest.mark.skipif(PROCMAIL is None, reason="needs procmail (Debian package procmail)")
@pytest.mark.parametrize("hosts", ["session", "brief"], indirect=True)
def test_both_hosts_polling_while_mail_arrives_lose_and_duplicate_nothing(
    env: Pop3Env, hosts: list[Host]
) -> None:
    """procmail (`:0:`: a dotlock, as on another host) delivers while a poller on each host logs
    in, retrieves everything, deletes it and quits, again and again: every message delivered is
    taken exactly once (by a session whose QUIT succeeded) or is still in the spool; in both
    mda_locks modes."""
    import pwd

    rc = env.base / "procmailrc"
    rc.write_text("LOCKSLEEP=1\n:0:\n$SPOOL\n")
    rc.chmod(0o644)
    account = pwd.getpwnam(RUN_AS)
    delivered: dict[bytes, bytes] = {}
    taken: list[bytes] = []
    damaged: list[bytes] = []
    done = threading.Event()
    total = 24
    expected = {b"<%d@shared>" % number: message(number) for number in range(total)}

    def deliver() -> None:
        try:
            for number in range(total):
                data = message(number)
                subprocess.run(
                    ["procmail", "-m", f"SPOOL={env.spool_path()}", str(rc)],
                    input=b"From mda@example.org Thu Nov 26 10:00:00 2026\n" + data,
                    check=True,
                    timeout=60,
                    user=account.pw_uid,
                    group=account.pw_gid,
                    extra_groups=[],
                )
                delivered[b"<%d@shared>" % number] = data
        finally:
            done.set()

    def poll(host: Host) -> None:
        while True:
            finished = done.is_set()
            try:
                client = host.client()
                client.user("alice")
                client.pass_(PASSWORD)
            except (poplib.error_proto, OSError):
                time.sleep(0.05)  # in use by the other host or the MDA: try again
                continue
            got = []
            for number in range(1, client.stat()[0] + 1):
                lines = client.retr(number)[1]
                text = b"".join(line + b"\n" for line in lines)
                ids = re.findall(rb"Message-ID: (<\d+@shared>)", text)
                got.append(ids[0] if ids else b"?")
                if not ids or text != expected.get(ids[0]):
                    damaged.append(text)
                client.dele(number)
            if client.quit().startswith(b"+OK"):
                taken.extend(got)
            if not got:
                if finished:
                    return
                time.sleep(0.1)

    env.write_spool(b"")
    threads = [threading.Thread(target=deliver)] + [threading.Thread(target=poll, args=(h,)) for h in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert damaged == []
    assert sorted(taken) == sorted(delivered), "lost or duplicated"
    assert len(delivered) == total
    assert env.spool_path().read_bytes() == b""
    # No dotlock, journal or session lock file left behind.
    assert [path.name for path in env.spool_dir.iterdir()] == ["alice"]
    for host in hosts:
        assert "login: user=alice" in host.text()
