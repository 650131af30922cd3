"""Load and soak: many concurrent POP3 sessions while an MDA delivers into the same spools.

    python tests/soak.py [--sessions 500] [--clients 50] [--users 50] [--deliveries 1000]
                         [--mda procmail|python] [--via listen|inetd] [--keep]   # scripts/soak

A standalone pop3d (`--listen` on loopback), or openbsd-inetd with the shipped inetd.conf line
(`--via inetd`, as root), serves `users` htpasswd users (as root, sessions run
as the mail_user, like the test suite's). `clients` threads run `sessions` sessions in all, each
for a random user: LIST, UIDL, RETR/TOP of random messages (checked byte for byte against what was
delivered), DELE of some, then QUIT (or, sometimes, a dropped connection or RSET). Meanwhile the
MDA delivers `deliveries` messages with unique Message-IDs into random spools: real procmail (a
`:0:` recipe: dotlock plus fcntl, as Debian's procmail does) or, with --mda python, an appender
taking the same locks the way liblockfile and procmail take them.

The model: a message exists once its delivery exited 0, and is gone once a session that DELEted
it got "+OK" to QUIT. At the end every spool must hold exactly the model's messages, each once
and intact; no lock, journal or temporary file may remain; the server must have reaped every
session (no zombie) and, once stopped, no process of this run may remain.
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import hashlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import bcrypt  # noqa: E402
from fuzz.fuzz_mbox import reference, sent_form  # noqa: E402

IS_ROOT = os.geteuid() == 0
RUN_AS = "nobody" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
PASSWORD = "soak pass"


def message_for(user: str, seq: int) -> bytes:
    """A delivered message: unique Message-ID, body derived from it (so any damage shows)."""
    mid = b"<%s.%d@soak>" % (user.encode(), seq)
    rnd = random.Random(mid)
    digest = hashlib.sha256(mid).hexdigest().encode()
    body = b"".join(b"%s %d\n" % (digest[: rnd.randrange(8, 64)], i) for i in range(rnd.randrange(1, 400)))
    if rnd.random() < 0.2:
        body += b".leading dot\n..two\n>From quoted\n"
    return b"Message-ID: %s\nSubject: soak %d\nX-Size: %d\n\n%s" % (mid, seq, len(body), body)


def message_id(content: bytes) -> bytes:
    return content.split(b"\n", 1)[0].split(b" ", 1)[1].rstrip(b"\r")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="pop3d-soak-"))
        self.base.chmod(0o755)
        self.spool_dir = self.base / "spool"
        self.spool_dir.mkdir()
        self.account = pwd.getpwnam(RUN_AS)
        if IS_ROOT:
            os.chown(self.spool_dir, self.account.pw_uid, self.account.pw_gid)
        self.spool_dir.chmod(0o775)
        self.users = [f"user{i:03d}" for i in range(args.users)]
        self.conf = self.base / "pop3d.conf"
        self.log = self.base / "pop3d.log"
        self.stats = Stats()
        self.model_lock = threading.Lock()
        self.delivered: dict[str, set[bytes]] = {u: set() for u in self.users}
        self.deleted: dict[str, set[bytes]] = {u: set() for u in self.users}
        self.contents: dict[bytes, bytes] = {}
        self.delivering = True
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0

    # ------------------------------------------------------------ set-up

    def write_files(self) -> None:
        salt = bcrypt.gensalt(4)
        digest = bcrypt.hashpw(PASSWORD.encode(), salt).decode()
        htpasswd = self.base / "htpasswd"
        htpasswd.write_text("".join(f"{u}:{digest}\n" for u in self.users))
        settings = {
            "auth": "htpasswd",
            "htpasswd": str(htpasswd),
            "mailbox": f"{self.spool_dir}/%u",
            "log": str(self.log),
            "auth_failure_delay": 0,
            "lock_timeout": 2,  # short: some logins meet a busy maildrop ([IN-USE], retried)
            "timeout": 120,
            "max_sessions": 4 * self.args.clients,
            "max_sessions_per_ip": 4 * self.args.clients,
        }
        if IS_ROOT:
            settings["mail_user"] = RUN_AS
        self.conf.write_text("[pop3d]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        rc = self.base / "procmailrc"
        rc.write_text("LOCKSLEEP=1\n:0:\n$SPOOL\n")
        rc.chmod(0o644)

    def start_server(self) -> None:
        if self.args.via == "inetd":
            self.start_inetd()
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.server = subprocess.Popen(
            [sys.executable, "-m", "pop3d", "-c", str(self.conf), "--listen", f"127.0.0.1:{self.port}"],
            cwd=str(ROOT),
            env=env,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited: {self.server.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def start_inetd(self) -> None:
        """openbsd-inetd with the shipped pop3 line on a loopback port, no start-rate limit."""
        from serving import inetd_conf_line, launch, write_launcher

        inetd = shutil.which("inetd") or "/usr/sbin/inetd"
        launcher = write_launcher(self.base)
        conf = self.base / "inetd.conf"

        def command(port: int) -> list[str]:
            conf.write_text(inetd_conf_line("pop3", port, launcher, self.conf))
            return [inetd, "-d", "-R", "1000000", str(conf)]

        launched = launch(command, self.base / "inetd.out")
        self.server, self.port = launched.proc, launched.port

    # ------------------------------------------------------------ the MDA

    def deliver(self, user: str, seq: int) -> bool:
        message = message_for(user, seq)
        data = b"From soak@example.org Thu Nov 26 10:00:00 2026\n" + message
        # Known before it is delivered: a session may scan it before the MDA has even returned.
        with self.model_lock:
            self.contents[message_id(message)] = message
        spool = self.spool_dir / user
        if self.args.mda == "procmail":
            kwargs: dict[str, object] = {}
            if IS_ROOT:
                kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
            proc = subprocess.run(
                ["procmail", "-m", f"SPOOL={spool}", str(self.base / "procmailrc")],
                input=data,
                capture_output=True,
                timeout=300,
                **kwargs,  # type: ignore[arg-type]
            )
            ok = proc.returncode == 0
            if not ok:
                self.stats.error(f"procmail {user} {seq}: exit {proc.returncode} {proc.stderr[-200:]!r}")
        else:
            ok = python_append(spool, data + b"\n", self.account if IS_ROOT else None)
        if ok:
            with self.model_lock:
                self.delivered[user].add(message_id(message))
            self.stats.add("delivered")
        return ok

    def mda_loop(self, worker: int, count: int) -> None:
        rng = random.Random(1000 + worker)
        for i in range(count):
            if not self.delivering:
                break
            self.deliver(rng.choice(self.users), worker * 1_000_000 + i)

    # ------------------------------------------------------------ clients

    def client_loop(self, worker: int, sessions: int) -> None:
        rng = random.Random(worker)
        done = 0
        attempts = 0
        while done < sessions and attempts < sessions * 20:
            attempts += 1
            user = rng.choice(self.users)
            try:
                outcome = self.session(rng, user)
            except Exception as e:  # any failure is a finding: record it, go on
                self.stats.error(f"session {user}: {type(e).__name__}: {e}")
                self.stats.add("session_errors")
                done += 1
                continue
            if outcome == "in-use":
                self.stats.add("in_use")
                time.sleep(rng.uniform(0.01, 0.1))  # back off like a client would
                continue
            done += 1
            self.stats.add("sessions")
            self.stats.add(f"end_{outcome}")

    def session(self, rng: random.Random, user: str) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as sock:
            conn = Reader(sock)
            greeting = conn.line()
            if not greeting.startswith(b"+OK"):
                raise AssertionError(f"greeting {greeting!r}")
            conn.send(b"USER " + user.encode())
            conn.send(b"PASS " + PASSWORD.encode())
            assert conn.line().startswith(b"+OK")
            reply = conn.line()
            if reply.startswith(b"-ERR [IN-USE]"):
                return "in-use"  # and the server closes the connection
            if not reply.startswith(b"+OK"):
                raise AssertionError(f"login {reply!r}")
            conn.send(b"LIST")
            assert conn.line().startswith(b"+OK")
            sizes = [int(line.split()[1]) for line in conn.multiline().split(b"\r\n") if line]
            conn.send(b"UIDL")
            assert conn.line().startswith(b"+OK")
            uids = [line.split()[1] for line in conn.multiline().split(b"\r\n") if line]
            assert len(uids) == len(sizes) == len(set(uids))
            pending: set[bytes] = set()
            for number in rng.sample(range(1, len(sizes) + 1), min(len(sizes), rng.randrange(0, 9))):
                top = rng.random() < 0.2
                conn.send(b"TOP %d 3" % number if top else b"RETR %d" % number)
                assert conn.line().startswith(b"+OK")
                body = conn.multiline()
                mid = message_id(body)
                with self.model_lock:
                    expected = self.contents.get(mid)
                    deleted = mid in self.deleted[user]
                if expected is None:
                    raise AssertionError(f"{user}: served {mid!r}, which no MDA delivered")
                if deleted:
                    raise AssertionError(f"{user}: served {mid!r}, deleted by an earlier QUIT")
                if not top:
                    if body != sent_form(expected, False) or len(body) != sizes[number - 1]:
                        raise AssertionError(f"{user}: message {mid!r} damaged")
                    self.stats.add("retrieved")
                else:
                    self.stats.add("top")
                if rng.random() < 0.6:
                    conn.send(b"DELE %d" % number)
                    assert conn.line().startswith(b"+OK")
                    pending.add(mid)
            roll = rng.random()
            if roll < 0.05:
                conn.send(b"RSET")
                assert conn.line().startswith(b"+OK")
                pending.clear()
            if roll > 0.92:
                return "drop"  # the connection closes without QUIT: nothing is deleted
            conn.send(b"QUIT")
            reply = conn.line()
            if not reply.startswith(b"+OK"):
                raise AssertionError(f"QUIT: {reply!r}")
            with self.model_lock:
                self.deleted[user] |= pending
            self.stats.add("deleted", len(pending))
            return "quit"

    # ------------------------------------------------------------ the run

    def run(self) -> dict[str, object]:
        args = self.args
        started = time.monotonic()
        self.write_files()
        self.start_server()
        per_client = [
            args.sessions // args.clients + (i < args.sessions % args.clients) for i in range(args.clients)
        ]
        mda_workers = 2
        per_mda = [
            args.deliveries // mda_workers + (i < args.deliveries % mda_workers) for i in range(mda_workers)
        ]
        # Some mail first, so the first sessions have something to do.
        for k in range(args.initial):
            for i, user in enumerate(self.users):
                self.deliver(user, 900_000_000 + k * 1000 + i)
        mdas = [threading.Thread(target=self.mda_loop, args=(i, n)) for i, n in enumerate(per_mda)]
        clients = [threading.Thread(target=self.client_loop, args=(i, n)) for i, n in enumerate(per_client)]
        for t in mdas + clients:
            t.start()
        deadline = time.monotonic() + args.max_seconds
        for t in clients + mdas:  # every delivery is made, also after the last session
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        self.delivering = False
        for t in mdas:
            t.join(timeout=300)
        hung = [t for t in clients + mdas if t.is_alive()]
        if hung:
            self.stats.error(f"{len(hung)} threads still running after the time bound")
        report = self.check()
        report["seconds"] = round(time.monotonic() - started, 1)
        return report

    def session_children(self) -> list[tuple[int, str]]:
        """(pid, state) of the server's children."""
        assert self.server is not None
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.server.pid:
                out.append((int(entry.name), fields[0]))
        return out

    def check(self) -> dict[str, object]:
        assert self.server is not None
        # Every session process must be gone and reaped while the server still runs.
        deadline = time.monotonic() + 60
        while self.session_children() and time.monotonic() < deadline:
            time.sleep(0.1)
        children = self.session_children()
        zombies = [pid for pid, state in children if state == "Z"]
        if children:
            self.stats.error(f"server children left: {children}")
        self.server.send_signal(signal.SIGTERM)
        status = self.server.wait(timeout=60)
        if status not in ((0, -signal.SIGTERM) if self.args.via == "inetd" else (0,)):
            self.stats.error(f"server exit status {status}")
        stray = [pid for pid in processes_mentioning(str(self.conf))]
        if stray:
            self.stats.error(f"processes of this run left: {stray}")
        lost = duplicated = unexpected = damaged = 0
        left = 0
        for user in self.users:
            path = self.spool_dir / user
            data = path.read_bytes() if path.exists() else b""
            bounds = reference(data)
            if bounds is None:
                self.stats.error(f"{user}: spool is not an mbox any more")
                continue
            ids = collections.Counter()
            for s, e in bounds:
                content = data[s:e]
                mid = message_id(content)
                ids[mid] += 1
                if self.contents.get(mid) != content:
                    damaged += 1
            expected = self.delivered[user] - self.deleted[user]
            lost += len(expected - set(ids))
            unexpected += len(set(ids) - expected)
            duplicated += sum(n - 1 for n in ids.values())
            left += sum(ids.values())
        extra_files = sorted(p.name for p in self.spool_dir.iterdir() if p.name not in self.users)
        log = self.log.read_text() if self.log.exists() else ""
        counts = self.stats.counts
        return {
            "sessions": counts["sessions"],
            "ended_by_quit": counts["end_quit"],
            "ended_by_drop": counts["end_drop"],
            "in_use_retries": counts["in_use"],
            "session_errors": counts["session_errors"],
            "delivered": counts["delivered"],
            "retrieved": counts["retrieved"],
            "top": counts["top"],
            "deleted": counts["deleted"],
            "left_in_spools": left,
            "lost": lost,
            "duplicated": duplicated,
            "unexpected": unexpected,
            "damaged": damaged,
            "leftover_files": extra_files,
            "zombies": zombies,
            "tracebacks_in_log": log.count("Traceback"),
            "errors": self.stats.errors[:20],
            "mda": self.args.mda,
            "via": self.args.via,
        }

    def cleanup(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        if self.server is not None and self.server.stderr:
            self.server.stderr.close()
        if not self.args.keep:
            shutil.rmtree(self.base, ignore_errors=True)


class Reader:
    """Line and multi-line replies from a socket (dot-stuffing undone)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def line(self) -> bytes:
        while (k := self.buf.find(b"\r\n")) < 0:
            self._fill()
        out = bytes(self.buf[:k])
        del self.buf[: k + 2]
        return out

    def multiline(self) -> bytes:
        start = 0
        while True:
            if self.buf.startswith(b".\r\n"):
                end, skip = 0, 3
                break
            k = self.buf.find(b"\r\n.\r\n", start)
            if k >= 0:
                end, skip = k + 2, k + 5
                break
            start = max(0, len(self.buf) - 4)
            self._fill()
        body = bytes(self.buf[:end]).replace(b"\r\n.", b"\r\n")
        del self.buf[:skip]
        return body[1:] if body.startswith(b".") else body


def python_append(spool: Path, data: bytes, account: pwd.struct_passwd | None) -> bool:
    """Deliver like an MDA: dotlock (link, liblockfile style) then fcntl, append, fsync, unlock."""
    lock = Path(str(spool) + ".lock")
    tmp = spool.parent / f".{spool.name}.lock.{os.getpid()}.{threading.get_ident()}"
    while True:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"%d\n" % os.getpid())
        os.close(fd)
        try:
            os.link(tmp, lock)
        except FileExistsError:
            pass
        linked = os.stat(tmp).st_nlink == 2
        os.unlink(tmp)
        if linked:
            break
        time.sleep(0.02)
    try:
        fd = os.open(spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if account is not None:
                os.fchown(fd, account.pw_uid, account.pw_gid)
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX)
                    break
                except OSError as e:
                    if e.errno != errno.EINTR:
                        raise
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        os.unlink(lock)
    return True


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=500)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--deliveries", type=int, default=1000)
    p.add_argument("--initial", type=int, default=4, help="messages per user before the clients start")
    p.add_argument(
        "--mda", choices=("procmail", "python"), default="procmail" if shutil.which("procmail") else "python"
    )
    p.add_argument("--via", choices=("listen", "inetd"), default="listen", help="the launcher")
    p.add_argument("--max-seconds", type=float, default=1800, help="time bound for the clients")
    p.add_argument("--keep", action="store_true", help="keep the spool directory for inspection")
    return p.parse_args(argv)


def soak(argv: list[str] | None = None) -> dict[str, object]:
    runner = Soak(parse(argv))
    try:
        return runner.run()
    finally:
        runner.cleanup()


def main() -> int:
    report = soak()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    bad = any(report[k] for k in ("lost", "duplicated", "unexpected", "damaged", "leftover_files", "zombies",
                                  "tracebacks_in_log", "errors", "session_errors"))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
