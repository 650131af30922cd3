"""System accounts through PAM, the privilege model, and authentication that gives nothing away.

Real accounts (useradd + chpasswd, yescrypt), the shipped PAM file installed under a unique
service name in /etc/pam.d (removed afterwards; the system's own files are never touched), the
server exactly as inetd runs it, and the kernel's view of the session's ids (/proc/PID/status).
These tests need root, as in CI; they skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import grp
import os
import poplib
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import (
    IS_ROOT,
    ROOT,
    Pop3Env,
    SocketPOP3,
    account_tool,
    child_env,
    mbox_bytes,
    recv_until,
    sample_messages,
    wait_for,
    wire_form,
)

TOOLS = ("useradd", "chpasswd", "usermod", "userdel", "chage")

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root: creates system accounts and drops privileges"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in TOOLS),
        reason="needs useradd, chpasswd, usermod, userdel, chage (Debian package passwd)",
    ),
    pytest.mark.skipif(not Path("/etc/pam.d").is_dir(), reason="needs Linux-PAM (/etc/pam.d)"),
]

AUTH_FAILED = b"-ERR [AUTH] Authentication failed."


class Account:
    def __init__(self, name: str, password: str, home: Path) -> None:
        entry = pwd.getpwnam(name)
        self.name = name
        self.password = password
        self.home = home
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid


@pytest.fixture(scope="module")
def pam_service() -> Iterator[str]:
    """The shipped pam.d/pop3d, installed under a unique service name for this module only."""
    name = f"p3t_{secrets.token_hex(4)}"
    path = Path("/etc/pam.d") / name
    shutil.copyfile(ROOT / "pam.d" / "pop3d", path)
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def probe_service() -> Iterator[tuple[str, Path]]:
    """The shipped file behind two more modules: pam_faildelay (3 s after a failure, which pop3d
    must take over) and pam_faillock's preauth, which opens <tally dir>/<user name>: a name that
    reaches PAM shows up as a path."""
    name = f"p3t_{secrets.token_hex(4)}"
    path = Path("/etc/pam.d") / name
    tally = Path(tempfile.mkdtemp(prefix="pop3d-faillock-"))
    path.write_text(
        "auth required pam_faildelay.so delay=3000000\n"
        f"auth requisite pam_faillock.so preauth dir={tally}\n" + (ROOT / "pam.d" / "pop3d").read_text()
    )
    try:
        yield name, tally
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(tally, ignore_errors=True)


@pytest.fixture
def account() -> Iterator[Account]:
    """A throwaway account (uid >= 1000, own group, a home) with a yescrypt password."""
    name = f"p3t_{secrets.token_hex(4)}"
    base = Path(tempfile.mkdtemp(prefix="pop3d-home-"))
    base.chmod(0o755)  # pytest's own temporary directories are mode 700: no way in for the account
    home = base / name
    account_tool("useradd", "-m", "-d", str(home), "-s", "/usr/sbin/nologin", "-c", "pop3d test", name)
    try:
        password = f"Pw {secrets.token_hex(6)}!"
        account_tool("chpasswd", "-c", "YESCRYPT", stdin=f"{name}:{password}\n")
        with open("/etc/shadow") as f:
            assert any(line.startswith(f"{name}:$y$") for line in f), "not a yescrypt hash"
        yield Account(name, password, home)
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sysenv(env: Pop3Env, pam_service: str) -> Pop3Env:
    """The spool directory as Debian has /var/mail (root:mail 2775), auth = system."""
    os.chown(env.spool_dir, 0, grp.getgrnam("mail").gr_gid)
    env.spool_dir.chmod(0o2775)
    env.write_config(auth="system", htpasswd=None, mail_user=None, pam_service=pam_service)
    return env


def write_spool(env: Pop3Env, account: Account, data: bytes, owner: int | None = None) -> Path:
    path = env.spool_dir / account.name
    path.write_bytes(data)
    path.chmod(0o600)
    os.chown(path, account.uid if owner is None else owner, account.gid)
    return path


def proc_status(pid: int) -> dict[str, list[str]]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return fields


def ids(pid: int) -> tuple[list[int], list[int], set[int]]:
    """(real, effective, saved, fs uids), (the same gids), supplementary groups."""
    status = proc_status(pid)
    return (
        [int(x) for x in status["Uid"]],
        [int(x) for x in status["Gid"]],
        {int(x) for x in status["Groups"]},
    )


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def try_login(env: Pop3Env, user: str, password: str) -> tuple[bytes, poplib.POP3]:
    client = env.client()
    client.user(user)
    try:
        return client.pass_(password), client
    except poplib.error_proto as e:
        return e.args[0], client


# ---------------------------------------------------------------------------- PAM logins


def test_pam_login_runs_as_the_account_and_logs(sysenv: Pop3Env, account: Account) -> None:
    messages = sample_messages()[:3]
    write_spool(sysenv, account, mbox_bytes(messages))
    mail_gid = grp.getgrnam("mail").gr_gid
    client = sysenv.client()
    pid = client.proc.pid
    client.user(account.name)
    assert client.pass_(account.password).startswith(b"+OK Logged in; 3 messages")
    # TRANSACTION: every uid and gid of the session process is the account's; no capability;
    # group mail kept because the spool directory is root:mail 2775 (dotlocks, journal).
    uids, gids, groups = ids(pid)
    assert uids == [account.uid] * 4
    assert gids == [account.gid] * 4
    assert groups == {account.gid, mail_gid}
    status = proc_status(pid)
    assert int(status["CapEff"][0], 16) == 0 and int(status["CapPrm"][0], 16) == 0
    assert children(pid) == []  # the pre-authentication process is gone
    _, lines, _ = client.retr(2)
    assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[1])
    client.dele(1)
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    log = sysenv.log_text()
    assert f"login: user={account.name} rip=local uid={account.uid} messages=3" in log
    size = len(wire_form(messages[1]))
    total = sum(len(wire_form(m)) for m in messages)
    assert re.search(
        rf"user={account.name} rip=local: logout: reason=quit top=0/0, retr=1/{size}, "
        rf"del=1/3, size={total}, in=\d+, out=\d+\n",
        log,
    ), log
    assert account.password not in log


@pytest.mark.parametrize(
    ("mbox_format", "big", "allowed"),
    [
        ("mboxo", False, set()),
        ("mboxrd", False, set()),
        # A spool of 1 MiB or more imports hashlib (OpenSSL) for its UID digests after the drop,
        # or hashes with the built-in SHA-256 if it cannot (test_mbox checks that path).
        ("mboxo", True, {"hashlib", "_hashlib", "_blake2"}),
    ],
)
def test_nothing_is_imported_after_the_privilege_drop(
    sysenv: Pop3Env, account: Account, tmp_path: Path, mbox_format: str, big: bool, allowed: set[str]
) -> None:
    """The account may not be allowed to read the interpreter's or pop3d's files (a Python under
    /root, a mode-700 checkout): whatever a session uses after the drop (scan, UIDL, RETR, TOP,
    the update at QUIT) is imported before it (login.preload), in the confined child too."""
    sysenv.write_config(mbox_format=mbox_format)
    messages = sample_messages()
    if big:
        messages = messages * (1 + (1 << 20) // len(mbox_bytes(messages)))
    write_spool(sysenv, account, mbox_bytes(messages))
    imports = tmp_path / "imports"
    wrapper = (
        "import os, sys\n"
        f"fd = os.open({str(imports)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)\n"
        "def hook(event, args):\n"
        "    if event == 'import' and os.geteuid() != 0:\n"
        "        os.write(fd, args[0].encode() + b'\\n')\n"
        "sys.addaudithook(hook)\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pop3d.cli import main\n"
        "sys.exit(main())\n"
    )
    sock, proc = sysenv.spawn([sys.executable, "-c", wrapper, "-c", str(sysenv.conf)])
    client = SocketPOP3(sock)
    client.user(account.name)
    assert client.pass_(account.password).startswith(b"+OK")
    assert len(client.uidl()[1]) == len(messages)
    _, lines, _ = client.retr(2)
    if mbox_format == "mboxo":  # (mboxrd unquotes its >From lines)
        assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[1])
    client.top(1, 0)
    client.dele(1)
    assert client.quit().startswith(b"+OK")
    assert proc.wait(timeout=60) == 0
    loaded = set(imports.read_text().split()) if imports.exists() else set()
    assert loaded <= allowed, loaded
    assert f"del=1/{len(messages)}" in sysenv.log_text()


def test_home_directory_template_and_no_extra_group(sysenv: Pop3Env, account: Account) -> None:
    sysenv.write_config(mailbox="%h/mbox")
    spool = account.home / "mbox"
    spool.write_bytes(mbox_bytes(sample_messages()[:1]))
    os.chown(spool, account.uid, account.gid)
    spool.chmod(0o600)
    reply, client = try_login(sysenv, account.name, account.password)
    assert reply.startswith(b"+OK Logged in; 1 messages")
    uids, gids, groups = ids(client.proc.pid)
    assert (uids, gids) == ([account.uid] * 4, [account.gid] * 4)
    assert groups == {account.gid}  # its own home is writable: group mail is not kept
    client.quit()
    assert not (account.home / "mbox.lock").exists()


def test_group_mail_is_not_granted_through_a_symlink_the_user_owns(sysenv: Pop3Env, account: Account) -> None:
    """Review finding 8: with `mailbox = %h/mail/inbox` and `~/mail -> /var/mail` (here the
    root:mail 2775 spool directory), the session got group mail and created files there. The
    decision now follows the path itself: the user's home is the user's, so no group mail, and
    nothing is created in the mail directory (the dotlock cannot be: [SYS/PERM], logged)."""
    sysenv.write_config(mailbox="%h/mail/inbox")
    (account.home / "mail").symlink_to(sysenv.spool_dir)
    os.lchown(account.home / "mail", account.uid, account.gid)
    spool = sysenv.spool_dir / "inbox"
    spool.write_bytes(mbox_bytes(sample_messages()[:1]))
    os.chown(spool, account.uid, account.gid)
    spool.chmod(0o600)
    before = sorted(os.listdir(sysenv.spool_dir))
    reply, client = try_login(sysenv, account.name, account.password)
    assert reply.startswith(b"-ERR [SYS/PERM]"), reply  # and the session ends
    assert client.proc.wait(timeout=20) == 0
    assert sorted(os.listdir(sysenv.spool_dir)) == before
    assert "no write access" in sysenv.log_text()


def test_group_mail_through_root_owned_links_is_granted(sysenv: Pop3Env, account: Account) -> None:
    """A link that only root controls (Debian's /var/spool/mail -> ../mail) is as good as the
    directory: group mail is kept and the session works."""
    link = sysenv.base / "spool-link"
    link.symlink_to("spool")
    sysenv.write_config(mailbox=f"{link}/%u")
    write_spool(sysenv, account, mbox_bytes(sample_messages()[:2]))
    reply, client = try_login(sysenv, account.name, account.password)
    assert reply.startswith(b"+OK Logged in; 2 messages"), reply
    assert grp.getgrnam("mail").gr_gid in ids(client.proc.pid)[2]
    client.dele(1)
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert (sysenv.spool_dir / account.name).read_bytes() == mbox_bytes(sample_messages()[1:2])


def test_wrong_password_locked_expired_and_low_uid_look_the_same(sysenv: Pop3Env, account: Account) -> None:
    write_spool(sysenv, account, mbox_bytes(sample_messages()[:1]))
    replies = {}
    replies["wrong password"], client = try_login(sysenv, account.name, account.password + "x")
    client.quit()
    account_tool("usermod", "-L", account.name)
    replies["locked"], client = try_login(sysenv, account.name, account.password)
    client.quit()
    account_tool("usermod", "-U", account.name)
    account_tool("usermod", "-e", "1", account.name)  # the account expired on 1970-01-02
    replies["expired"], client = try_login(sysenv, account.name, account.password)
    client.quit()
    account_tool("usermod", "-e", "", account.name)
    account_tool("chage", "-d", "0", account.name)  # right password, but the account phase says no
    replies["must change password"], client = try_login(sysenv, account.name, account.password)
    client.quit()
    account_tool("chage", "-d", str(int(time.time() // 86400)), account.name)
    sysenv.write_config(first_uid=account.uid + 1)
    replies["below first_uid"], client = try_login(sysenv, account.name, account.password)
    client.quit()
    replies["unknown user"], client = try_login(sysenv, f"p3t_none{secrets.token_hex(3)}", "x")
    client.quit()
    assert set(replies.values()) == {AUTH_FAILED}, replies
    log = sysenv.log_text()
    assert log.count("PAM: Authentication failure") == 3  # wrong, locked, expired
    assert "PAM: Authentication token is no longer valid; new one required" in log
    assert f"uid {account.uid} is below first_uid" in log
    assert "unknown user" in log
    assert account.password not in log
    # The same account logs in once nothing stands in the way any more.
    sysenv.write_config(first_uid=1000)
    reply, client = try_login(sysenv, account.name, account.password)
    assert reply.startswith(b"+OK Logged in")
    client.quit()


def test_root_and_system_accounts_never_reach_pam(sysenv: Pop3Env) -> None:
    for name in ("root", "daemon"):
        reply, client = try_login(sysenv, name, "anything")
        assert reply == AUTH_FAILED
        client.quit()
    log = sysenv.log_text()
    assert "user=root rip=local: uid 0 may not log in" in log
    assert "PAM" not in log


def test_max_auth_failures_ends_the_session(sysenv: Pop3Env, account: Account) -> None:
    client = sysenv.client()
    for attempt in range(3):
        client.user(account.name)
        with pytest.raises(poplib.error_proto) as info:
            client.pass_("wrong")
        last = attempt == 2
        assert info.value.args[0] == (
            b"-ERR [AUTH] Too many authentication failures; closing." if last else AUTH_FAILED
        )
    assert client.file.read() == b""
    assert client.proc.wait(timeout=20) == 0


@contextlib.contextmanager
def traced(
    env: Pop3Env, trace: Path, calls: str
) -> Iterator[tuple[socket.socket, BinaryIO, subprocess.Popen]]:
    """pop3d as inetd runs it, under `strace -f` (these calls, into `trace`): our socket end, a
    reader on it, the process; it is killed at the end if still running."""
    ours, theirs = socket.socketpair()
    command = ["strace", "-f", "-qq", "-s", "400", "-e", f"trace={calls}", "-o", str(trace)]
    proc = subprocess.Popen(command + env.command(), stdin=theirs, stdout=theirs, cwd=str(ROOT))
    theirs.close()
    ours.settimeout(60)
    try:
        yield ours, ours.makefile("rb"), proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ours.close()


def assert_root_never_read_the_client(trace: str) -> None:
    """The first process traced (the session process, root until a login) never read fd 0;
    the confined child did."""
    pids = [int(line.split()[0]) for line in trace.splitlines() if line[:1].isdigit()]
    reads_from_client = {int(m.group(1)) for m in re.finditer(r"^(\d+) +read\(0,", trace, re.M)}
    assert reads_from_client and pids[0] not in reads_from_client


def _clear_home(name: str, tmp_path: Path) -> None:
    """Empty the home directory field of `name` (usermod refuses to), through vipw's locking."""
    editor = tmp_path / "edit-passwd"
    editor.write_text(
        "#!/bin/sh\n"
        f'content=$(sed -e "s#^\\({name}:[^:]*:[^:]*:[^:]*:[^:]*:\\)[^:]*:#\\1:#" "$1")\n'
        'printf \'%s\\n\' "$content" > "$1"\n'
        # vipw compares modification times to the second: make the edit visible to it.
        'touch -d "@$(( $(date +%s) + 2 ))" "$1"\n'
    )
    editor.chmod(0o755)
    subprocess.run(
        ["vipw"],
        env={**os.environ, "EDITOR": str(editor)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert pwd.getpwnam(name).pw_dir == ""


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace (Debian package strace)")
@pytest.mark.skipif(not shutil.which("vipw"), reason="needs vipw (Debian package passwd)")
def test_root_never_reads_the_client_after_a_login_it_cannot_complete(
    sysenv: Pop3Env, account: Account, tmp_path: Path
) -> None:
    """Issue 12, finding 1: `mailbox = %h/...` and an account with no home directory: the
    check passes, the session process (still root) cannot expand the mailbox. It answers
    [SYS/PERM] and closes; it never reads the client. Before, it went on reading as root."""
    _clear_home(account.name, tmp_path)
    sysenv.write_config(mailbox="%h/mbox")
    trace = tmp_path / "trace"
    with traced(sysenv, trace, "read") as (ours, reader, proc):
        assert reader.readline().startswith(b"+OK")
        ours.sendall(f"USER {account.name}\r\nPASS {account.password}\r\nUSER {account.name}\r\n".encode())
        assert reader.readline() == b"+OK Send PASS.\r\n"
        assert reader.readline().startswith(b"-ERR [SYS/PERM]")
        assert reader.readline() == b""  # closed: the USER behind PASS was never answered
        assert proc.wait(timeout=60) == 0
    assert_root_never_read_the_client(trace.read_text(errors="replace"))
    assert "mailbox template uses %h but the account has no home directory" in sysenv.log_text()


# ---------------------------------------------------------------------------- privileges


def test_listener_reads_the_pam_service_afresh_for_every_session(
    sysenv: Pop3Env, account: Account, pam_service: str
) -> None:
    """--listen holds a PAM transaction of its own so that its modules stay loaded for the
    sessions it forks (auth.hold_pam_modules), but each session starts its own: an edited
    /etc/pam.d file takes effect at the next login, without a restart or a SIGHUP."""
    write_spool(sysenv, account, mbox_bytes(sample_messages()[:1]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        sysenv.command("--listen", f"127.0.0.1:{port}"),
        cwd=str(ROOT),
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    service = Path("/etc/pam.d") / pam_service
    shipped = service.read_text()

    def login() -> bytes:
        client = poplib.POP3("127.0.0.1", port, timeout=20)
        client.user(account.name)
        try:
            return client.pass_(account.password)
        except poplib.error_proto as e:
            return e.args[0]
        finally:
            client.close()

    def greets() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                return c.recv(100).startswith(b"+OK")
        except OSError:
            return False

    try:
        assert wait_for(lambda: greets() or proc.poll() is not None) and proc.poll() is None
        assert login().startswith(b"+OK")
        service.write_text("auth required pam_deny.so\naccount required pam_deny.so\n")
        assert login() == AUTH_FAILED
        service.write_text(shipped)
        assert login().startswith(b"+OK")
    finally:
        service.write_text(shipped)
        proc.terminate()
        proc.wait(timeout=20)
        proc.stderr.close()


def test_pre_authentication_process_is_confined(sysenv: Pop3Env) -> None:
    nobody = pwd.getpwnam("nobody")
    client = sysenv.client()
    pid = client.proc.pid
    assert wait_for(lambda: len(children(pid)) == 1)
    (child,) = children(pid)
    uids, gids, groups = ids(child)
    assert uids == [nobody.pw_uid] * 4 and gids == [nobody.pw_gid] * 4 and groups == set()
    root = os.readlink(f"/proc/{child}/root")
    assert root == "/run/pop3d/empty"  # preauth_chroot's default: root's, empty
    with open(f"/proc/{child}/limits") as f:
        limits = f.read()
    assert re.search(r"Max processes\s+0\s+0", limits)
    files = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
    assert files and files.group(1) == files.group(2)
    # Every descriptor number below the limit is taken: not one more can be made.
    open_fds = {int(fd) for fd in os.listdir(f"/proc/{child}/fd")}
    assert set(range(int(files.group(1)))) <= open_fds
    assert ids(pid)[0] == [0, 0, 0, 0]  # the monitor stays root until a login succeeds
    client.capa()  # the child answers
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    assert not children(pid)


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (Debian package util-linux)")
def test_the_child_is_chrooted_even_when_tmp_is_not_writable(env: Pop3Env) -> None:
    """Issue 12, finding 7: the pre-authentication child chrooted into a directory made in /tmp,
    and ran without a chroot ("no chroot" in the log) when it could not: a local user who fills
    a tmpfs /tmp removed a layer. Here /tmp is read-only (a private mount namespace)."""
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount --bind /tmp /tmp"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.decode().strip()}")
    env.write_config(log="stderr")  # the test's log file would be in the read-only /tmp
    readonly_tmp = 'mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && exec "$@"'
    client = None
    sock, proc = env.spawn(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", readonly_tmp, "sh", *env.command()]
    )
    client = SocketPOP3(sock)
    client.proc = proc
    pid = proc.pid
    assert wait_for(lambda: len(children(pid)) == 1)
    (child,) = children(pid)
    assert client.capa()  # served, by the child
    assert os.readlink(f"/proc/{child}/root") == "/run/pop3d/empty"
    client.quit()
    assert proc.wait(timeout=20) == 0
    assert b"no chroot" not in proc.stderr.read()


def test_session_becomes_mail_user_for_htpasswd(env: Pop3Env) -> None:
    nobody = pwd.getpwnam("nobody")
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    reply, client = try_login(env, "alice", "s3cret pass")
    assert reply.startswith(b"+OK Logged in")
    uids, gids, groups = ids(client.proc.pid)
    assert uids == [nobody.pw_uid] * 4 and gids == [nobody.pw_gid] * 4 and groups == {nobody.pw_gid}
    client.quit()


def test_system_spool_owned_by_someone_else_is_refused(sysenv: Pop3Env, account: Account) -> None:
    data = mbox_bytes(sample_messages()[:1])
    other = pwd.getpwnam("nobody").pw_uid
    path = write_spool(sysenv, account, data, owner=other)
    path.chmod(0o666)  # readable by the account: only the owner check stands in the way
    reply, client = try_login(sysenv, account.name, account.password)
    assert reply.startswith(b"-ERR [SYS/PERM]")
    assert client.file.read() == b""  # and the session ends
    assert client.proc.wait(timeout=20) == 0
    assert path.read_bytes() == data
    assert f"owned by uid {other}, expected {account.uid}" in sysenv.log_text()


# ---------------------------------------------------------------------------- nothing given away


def _exchange(sock: socket.socket, reader: BinaryIO, user: bytes, password: bytes = b"x") -> bytes:
    """USER then PASS; the two reply lines."""
    sock.sendall(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
    return reader.readline() + reader.readline()


HOSTILE = [b"../root", b"a/b", b"-x", b"\xff\xfe", b"u" * 65, b"v" * 200]


def _paths(trace: str) -> list[str]:
    """The string arguments of every traced call but read() (whose strings are file contents)."""
    strings = []
    for line in trace.splitlines():
        call = re.match(r"\d+ +(\w+)\(", line)
        if call and call.group(1) != "read":
            strings += re.findall(r'"((?:[^"\\]|\\.)*)"', line)
    return strings


def _touches(paths: list[str], name: bytes) -> bool:
    """True if `name` is used as a path or a path component (as strace writes it)."""
    forms = {
        name.decode("latin-1"),
        "".join(chr(b) if 0x20 <= b < 0x7F else f"\\{b:03o}" for b in name),
        "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in name),
    }
    return any(p.startswith(form) or "/" + form in p for form in forms for p in paths)


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace (Debian package strace)")
def test_hostile_names_never_touch_the_filesystem(
    sysenv: Pop3Env, account: Account, probe_service: tuple[str, Path], tmp_path: Path
) -> None:
    service, tally = probe_service
    spool = write_spool(sysenv, account, mbox_bytes(sample_messages()[:1]))
    sysenv.write_config(max_auth_failures=20, pam_service=service)
    before = (sorted(os.listdir(sysenv.spool_dir)), os.stat(sysenv.spool_dir).st_mtime_ns)
    trace = tmp_path / "trace"
    with traced(sysenv, trace, "file,read") as (ours, reader, proc):
        reader.readline()
        reference = _exchange(ours, reader, account.name.encode(), b"wrong")
        assert reference == b"+OK Send PASS.\r\n" + AUTH_FAILED + b"\r\n"
        for name in HOSTILE:
            assert _exchange(ours, reader, name) == reference, name
        # Not names at all for the wire (a NUL makes a line invalid; 300 octets exceed a line):
        # refused by the command parser, whatever the name, before any authentication.
        assert _exchange(ours, reader, b"a\0b") == b"-ERR Unknown command.\r\n-ERR Send USER first.\r\n"
        assert _exchange(ours, reader, b"w" * 300) == b"-ERR Line too long.\r\n-ERR Send USER first.\r\n"
        ours.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"+OK")
        assert proc.wait(timeout=60) == 0
    after = (sorted(os.listdir(sysenv.spool_dir)), os.stat(sysenv.spool_dir).st_mtime_ns)
    assert after == before
    text = trace.read_text(errors="replace")
    paths = _paths(text)
    for name in [*HOSTILE, b"a\0b", b"w" * 300]:
        assert not _touches(paths, name), name
    assert_root_never_read_the_client(text)
    # Control: the one name that reached PAM (the real account's) shows up as a path ...
    assert f"{tally}/{account.name}" in paths
    # ... and nothing of the maildrop is touched before a login succeeds.
    assert not any(p.startswith(str(spool)) for p in paths)


def test_unknown_user_and_wrong_password_take_the_same_time(
    sysenv: Pop3Env, account: Account, probe_service: tuple[str, Path]
) -> None:
    # PAM's own delay (pam_unix 2 s, pam_faildelay 3 s here) would set wrong passwords apart.
    delay = 0.4
    sysenv.write_config(auth_failure_delay=delay, max_auth_failures=20, pam_service=probe_service[0])
    sock, proc = sysenv.start()
    recv_until(sock, b"\r\n")
    timings: dict[str, list[float]] = {"unknown": [], "wrong": []}
    for _ in range(4):
        for kind in ("unknown", "wrong"):
            user = f"p3t_none{secrets.token_hex(3)}" if kind == "unknown" else account.name
            sock.sendall(f"USER {user}\r\n".encode())
            recv_until(sock, b"\r\n")
            started = time.monotonic()
            sock.sendall(b"PASS not-the-password\r\n")
            assert recv_until(sock, b"\r\n") == AUTH_FAILED + b"\r\n"
            timings[kind].append(time.monotonic() - started)
    sock.sendall(b"QUIT\r\n")
    recv_until(sock, b"\r\n")
    proc.wait(timeout=20)
    unknown, wrong = timings["unknown"], timings["wrong"]
    assert min(unknown + wrong) >= delay  # every failure waits the delay out
    # The ranges overlap, within the delay's granularity (scheduling noise on a busy machine).
    slack = delay / 4
    assert max(min(unknown), min(wrong)) <= min(max(unknown), max(wrong)) + slack, timings


def test_no_failure_is_answered_before_the_floor(sysenv: Pop3Env, account: Account) -> None:
    """Issue 12, finding 9: with auth_failure_delay = 0 the failure paths took 2 ms (locked),
    14 ms (unknown user, uid below first_uid) and 44 ms (wrong password): timing told which
    accounts exist. Every failure now waits for the floor, whatever the setting."""
    from pop3d import limits

    sysenv.write_config(auth_failure_delay=0, max_auth_failures=20)
    locked = f"p3t_{secrets.token_hex(4)}"
    account_tool("useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", locked)
    try:
        account_tool("chpasswd", "-c", "YESCRYPT", stdin=f"{locked}:{account.password}\n")
        account_tool("usermod", "-L", locked)
        sock, proc = sysenv.start()
        reader = sock.makefile("rb")
        reader.readline()
        for user, password in (
            (account.name, "wrong"),
            ("p3t_no_such_user", account.password),
            ("daemon", "x"),  # uid below first_uid
            ("root", "x"),
            ("../etc", "x"),  # an invalid name
            (locked, account.password),  # the right password of a locked account
        ):
            sock.sendall(f"USER {user}\r\n".encode())
            reader.readline()
            started = time.monotonic()
            sock.sendall(f"PASS {password}\r\n".encode())
            assert reader.readline() == AUTH_FAILED + b"\r\n"
            assert time.monotonic() - started >= limits.AUTH_FAILURE_FLOOR, user
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        assert proc.wait(timeout=20) == 0
    finally:
        subprocess.run(["userdel", "-f", locked], capture_output=True, timeout=30)


def test_tls_session_keeps_tls_in_the_confined_child(sysenv: Pop3Env, account: Account) -> None:
    """With STLS the TLS state lives in the pre-authentication child: after the login it stays,
    still confined, as a relay; the session process is the account and holds no TLS state."""
    from test_tls import Certs

    certs = Certs(sysenv.base)
    sysenv.write_config(**certs.settings())
    messages = sample_messages()
    write_spool(sysenv, account, mbox_bytes(messages))
    client = sysenv.client()
    pid = client.proc.pid
    client.stls(context=certs.client_context())
    # Pipelined in one TLS record: what follows PASS reaches the session process intact.
    client.sock.sendall(f"USER {account.name}\r\nPASS {account.password}\r\nSTAT\r\nLIST 2\r\n".encode())
    assert client._getline()[0] == b"+OK Send PASS."
    assert client._getline()[0].startswith(b"+OK Logged in; 5 messages")
    assert client._getline()[0].startswith(b"+OK 5 ")
    assert client._getline()[0] == b"+OK 2 %d" % len(wire_form(messages[1]))
    (relay,) = children(pid)
    nobody = pwd.getpwnam("nobody")
    assert ids(relay)[0] == [nobody.pw_uid] * 4 and os.readlink(f"/proc/{relay}/root") != "/"
    assert ids(pid)[0] == [account.uid] * 4
    for number, message in enumerate(messages, 1):
        _, lines, _ = client.retr(number)
        assert b"".join(line + b"\r\n" for line in lines) == wire_form(message)
    client.dele(1)
    assert client.quit() == b"+OK Bye; 4 messages left."
    assert client.proc.wait(timeout=20) == 0
    assert not Path(f"/proc/{relay}").exists()
    assert (sysenv.spool_dir / account.name).read_bytes() == mbox_bytes(messages[1:])
    log = sysenv.log_text()
    assert f"user={account.name} rip=local: logout: reason=quit top=0/0, retr=5/" in log
    assert "Traceback" not in log
