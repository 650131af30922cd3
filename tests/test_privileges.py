"""The privilege model's parts: the irrevocable switch, the confined pre-authentication process,
the root monitor that a subverted child cannot talk into more guesses, spool ownership checks
end to end, the client address in the log, and passwords that never reach a log."""

from __future__ import annotations

import os
import poplib
import pwd
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import IS_ROOT, PASSWORD, Pop3Env, child_env, mbox_bytes, sample_messages, wait_for

from pop3d import auth, log, login, privs, privsep, protocol, transport
from pop3d import config as cfg

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (changes uids, chroot)")


def in_child(body: Callable[[], object]) -> object:
    """Run `body` in a forked child (privilege changes must not touch the test process)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            result = repr(body())
        except BaseException as e:
            result = repr(("raised", type(e).__name__, str(e)))
        os.write(wfd, result.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return eval(data.decode())  # our own child's repr of plain values


def test_an_account_name_outside_pop3ds_names_is_a_clean_refusal(env: Pop3Env) -> None:
    """Review, smaller (a): with `auth = system` the account database may name the account
    otherwise than the client did, outside pop3d's names (winbind's `DOMAIN\\user`). That name
    reached names.user_file (the index) as root, before the privilege drop: a ValueError, the
    session gone without a reply. Now it is `-ERR [SYS/PERM]` and a log line; nothing is
    created for it (no index file, no spool, no lock)."""
    uid, gid = (env.account.pw_uid, env.account.pw_gid) if IS_ROOT else (os.getuid(), os.getgid())

    def open_it() -> object:
        log.setup(str(env.log))
        config = cfg.load(["-c", str(env.conf)])
        return login.open_maildrop(config, auth.Account("EXAMPLE\\alice", uid, gid, None), "192.0.2.7")

    assert in_child(open_it) == protocol.SYS_PERM
    assert "login refused: user=EXAMPLE\\alice rip=192.0.2.7: the account database" in env.log.read_text()
    assert os.listdir(env.spool_dir) == []
    index_dir = env.base / "index"
    assert not index_dir.exists() or not any(index_dir.rglob("*alice*"))


# ---------------------------------------------------------------------------- privs


def test_become_refuses_root() -> None:
    with pytest.raises(privs.PrivilegeError, match="as root"):
        privs.become(0, 0, [0])


@needs_root
def test_become_is_irrevocable() -> None:
    nobody = pwd.getpwnam("nobody")

    def body() -> object:
        privs.become(nobody.pw_uid, nobody.pw_gid, [nobody.pw_gid])
        refused = []
        for name, attempt in (
            ("setuid", lambda: os.setuid(0)),
            ("seteuid", lambda: os.seteuid(0)),
            ("setresuid", lambda: os.setresuid(0, 0, 0)),
            ("setgid", lambda: os.setgid(0)),
            ("setgroups", lambda: os.setgroups([0])),
        ):
            try:
                attempt()
            except PermissionError:
                refused.append(name)
        return os.getresuid(), os.getresgid(), os.getgroups(), refused

    uids, gids, groups, refused = in_child(body)  # type: ignore[misc]
    assert uids == (nobody.pw_uid,) * 3 and gids == (nobody.pw_gid,) * 3
    assert groups == [nobody.pw_gid]
    assert refused == ["setuid", "seteuid", "setresuid", "setgid", "setgroups"]


@needs_root
def test_confine_leaves_no_file_no_process_no_socket(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    root = privs.empty_directory(str(tmp_path / "empty"))

    def body() -> object:
        privs.confine(nobody.pw_uid, nobody.pw_gid, root)
        st = os.stat("/")  # /proc is out of reach: compare the root directory itself
        outcomes = {"root": (st.st_dev, st.st_ino)}
        for name, attempt in (
            ("open", lambda: os.open("/etc/passwd", os.O_RDONLY)),
            ("fork", os.fork),
            ("socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            ("mkdir", lambda: os.mkdir("/x")),
        ):
            try:
                attempt()
                outcomes[name] = "allowed"
            except OSError as e:
                outcomes[name] = type(e).__name__
        outcomes["ids"] = (os.getresuid(), os.getgroups())
        return outcomes

    outcomes = in_child(body)
    os.close(root)
    st = os.stat(tmp_path / "empty")
    assert outcomes["root"] == (st.st_dev, st.st_ino)  # type: ignore[index]
    assert "allowed" not in outcomes.values()  # type: ignore[union-attr]
    assert outcomes["ids"] == ((nobody.pw_uid,) * 3, [])  # type: ignore[index]


@needs_root
def test_confined_process_still_logs_an_unexpected_error(tmp_path: Path) -> None:
    """Its lines go to root as frames (log.redirect): formatting one needs no import or file."""
    from pop3d import log

    nobody = pwd.getpwnam("nobody")
    root = privs.empty_directory(str(tmp_path / "empty"))
    rfd, wfd = os.pipe()

    def body() -> object:
        log.redirect(lambda level, line: privsep.send(wfd, b"L", bytes((level,)) + line.encode()))
        privs.confine(nobody.pw_uid, nobody.pw_gid, root)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("unexpected error")
        return "done"

    assert in_child(body) == "done"
    os.close(wfd)
    os.close(root)
    kind, payload = privsep.recv(rfd)
    os.close(rfd)
    text = payload[1:].decode()
    assert kind == b"L" and payload[0] == log.ERR
    assert "unexpected error: " in text and "in body" in text and "ValueError: boom" in text


@needs_root
@pytest.mark.parametrize("problem", ["not empty", "group-writable", "not root's", "a symbolic link"])
def test_an_unusable_preauth_chroot_is_a_configuration_error(env: Pop3Env, problem: str) -> None:
    """Issue 12, finding 7: the directory is checked (root's, writable by no one else, empty)."""
    directory = env.base / "empty"
    directory.mkdir(mode=0o755)
    if problem == "not empty":
        (directory / "planted").write_text("x")
    elif problem == "group-writable":
        directory.chmod(0o775)
    elif problem == "not root's":
        os.chown(directory, env.account.pw_uid, -1)
    else:
        (env.base / "link").symlink_to(directory)
        directory = env.base / "link"
    env.write_config(preauth_chroot=str(directory))
    sock, proc = env.start()
    assert sock.recv(200).startswith(b"-ERR [SYS/PERM]")
    assert proc.wait(timeout=20) == 78
    message = proc.stderr.read().decode()
    assert f"preauth_chroot {directory}" in message and "Traceback" not in message


@needs_root
def test_a_missing_preauth_chroot_is_made(env: Pop3Env) -> None:
    directory = env.base / "run" / "pop3d" / "empty"
    env.write_config(preauth_chroot=str(directory))
    client = env.client()
    assert client.capa()
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    for path in (directory, directory.parent):
        st = path.lstat()
        assert st.st_uid == 0 and oct(st.st_mode & 0o7777) == oct(0o755)
    assert list(directory.iterdir()) == []


# ---------------------------------------------------------------------------- the monitor


def test_root_enforces_max_auth_failures_and_the_delay(env: Pop3Env) -> None:
    """A subverted pre-authentication child asking again and again gets no extra guess."""
    delay = 0.05
    config = cfg.load(["-c", str(env.conf), "--auth-failure-delay", str(delay)])
    to_root_r, to_root_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(["sleep", "60"])  # stands in for the child process
    conn = transport.Connection(theirs.fileno(), theirs.fileno())
    for _ in range(5):
        privsep.send(to_root_w, b"A", privsep.encode_request(b"alice", b"wrong", b"", (2, 30, 40)))
    os.close(to_root_w)
    monitor = privsep._Monitor(config, conn, "test", child.pid, to_root_r, to_child_w)
    started = time.monotonic()
    assert monitor.run() == 0
    elapsed = time.monotonic() - started
    answers = []
    while (frame := privsep.recv(to_child_r)) is not None:
        answers.append(frame)
    assert answers == [(b"F", b"AUTH")] * 3  # max_auth_failures, then nothing: the pipe closed
    assert elapsed >= 3 * delay
    assert not Path(f"/proc/{child.pid}").exists()  # killed and reaped
    os.close(to_child_r)
    ours.close()
    theirs.close()


@needs_root
def test_sigterm_before_login_ends_both_processes(env: Pop3Env) -> None:
    from test_system import children

    client = env.client()
    pid = client.proc.pid
    assert wait_for(lambda: len(children(pid)) == 1)
    (child,) = children(pid)
    client.user("alice")
    client.proc.terminate()
    assert client.proc.wait(timeout=20) == 0
    assert wait_for(lambda: not Path(f"/proc/{child}").exists())
    assert "disconnected before login: rip=local reason=signal" in env.log_text()


def _descriptors(pid: int) -> dict[int, str]:
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return fds


@needs_root
@pytest.mark.parametrize("target", ["file", "syslog"])
def test_the_confined_child_holds_no_log_descriptor(env: Pop3Env, target: str) -> None:
    """Issue 12, finding 6: with log = FILE the child kept a writable descriptor on the
    root-owned log (it could truncate it or forge `login: user=root`); with syslog, the /dev/log
    socket. Now it holds neither (stderr is /dev/null), and root writes its lines, attributed."""
    from test_system import children

    if target == "syslog":
        if not Path("/dev/log").exists():
            pytest.skip("no /dev/log on this host (no syslog daemon)")
        env.write_config(log="syslog")
    client = env.client()
    pid = client.proc.pid
    assert wait_for(lambda: len(children(pid)) == 1)
    (child,) = children(pid)
    client.capa()  # the child is past its set-up: confined, serving
    fds = _descriptors(child)
    assert fds[2] == "/dev/null"
    assert str(env.log) not in fds.values()
    sockets = {target for target in fds.values() if target.startswith("socket:")}
    # The client's socket pair end (one inode) is its only socket: no syslog socket.
    assert len(sockets) == 1, fds
    client.quit()
    assert client.proc.wait(timeout=20) == 0
    if target == "file":
        assert f"pre-auth[{child}]: disconnected before login: rip=local reason=quit" in env.log_text()


def test_root_writes_the_childs_lines_escaped_and_attributed(env: Pop3Env) -> None:
    """A subverted child cannot forge a line: root escapes what it sends and names it."""
    config = cfg.load(["-c", str(env.conf)])
    from pop3d import log

    log.setup(str(env.log))
    to_root_r, to_root_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(["true"])  # stands in for the child process, which logs and exits
    conn = transport.Connection(theirs.fileno(), theirs.fileno())
    privsep.send(to_root_w, b"L", bytes((6,)) + b"hello\n2026-12-06 pop3d[1]: login: user=root\x1b[2J")
    os.close(to_root_w)
    monitor = privsep._Monitor(config, conn, "test", child.pid, to_root_r, to_child_w)
    assert monitor.run() == 0
    log.close()
    lines = env.log_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        f"pre-auth[{child.pid}]: hello\\x0a2026-12-06 pop3d[1]: login: user=root\\x1b[2J"
    )
    os.close(to_child_r)
    ours.close()
    theirs.close()


def test_frames_are_bounded() -> None:
    rfd, wfd = os.pipe()
    os.write(wfd, b"A" + (10**9).to_bytes(4, "big"))
    with pytest.raises(privsep.FrameError):
        privsep.recv(rfd)
    os.write(wfd, b"A" + (10).to_bytes(4, "big") + b"short")
    os.close(wfd)
    with pytest.raises(privsep.FrameError):
        privsep.recv(rfd)
    os.close(rfd)


def test_a_login_whose_maildrop_cannot_be_opened_ends_the_session(env: Pop3Env) -> None:
    """Issue 12, finding 1: two wrong passwords, then the right one for a maildrop that is in
    use: -ERR [IN-USE] and the connection closes. Before, the session went on in AUTHORIZATION
    in the process that took over (root, under privilege separation, when the failure came
    before its drop) with a fresh failure budget: 5 guesses with max_auth_failures = 3."""
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    holder = env.client()
    holder.user("alice")
    holder.pass_(PASSWORD)  # holds the maildrop's locks
    sock, proc = env.start()
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    for _ in range(2):
        sock.sendall(b"USER alice\r\nPASS wrong\r\n")
        assert (
            reader.readline() + reader.readline()
            == b"+OK Send PASS.\r\n-ERR [AUTH] Authentication failed.\r\n"
        )
    sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nUSER alice\r\n")
    assert reader.readline() == b"+OK Send PASS.\r\n"
    assert reader.readline().startswith(b"-ERR [IN-USE]")
    assert reader.readline() == b""  # closed: nothing after PASS was read, no guess is left
    assert proc.wait(timeout=20) == 0
    assert "reason=maildrop-failed" in env.log_text()
    holder.quit()
    assert holder.proc.wait(timeout=20) == 0


# ---------------------------------------------------------------------------- spool safety, end to end


def _refused(env: Pop3Env) -> bytes:
    client = env.client()
    client.user("alice")
    with pytest.raises(poplib.error_proto) as info:
        client.pass_(PASSWORD)
    assert client.file.read() == b""  # the session ends after a maildrop it cannot serve
    assert client.proc.wait(timeout=20) == 0
    return info.value.args[0]


def test_symlinked_mbox_is_refused(env: Pop3Env, tmp_path: Path) -> None:
    data = mbox_bytes(sample_messages()[:2])
    target = env.write_spool(data, user="elsewhere")
    env.spool_path().symlink_to(target)
    assert _refused(env).startswith(b"-ERR [SYS/PERM]")
    assert target.read_bytes() == data
    assert "alice: is a symbolic link" in env.log_text()
    assert not (env.spool_dir / "alice.lock").exists()


def test_hard_linked_mbox_is_refused(env: Pop3Env) -> None:
    data = mbox_bytes(sample_messages()[:2])
    path = env.write_spool(data)
    os.link(path, env.spool_dir / "other")
    assert _refused(env).startswith(b"-ERR [SYS/PERM]")
    assert path.read_bytes() == data
    assert "alice: has 2 hard links" in env.log_text()


@needs_root
def test_mbox_owned_by_another_account_is_refused(env: Pop3Env) -> None:
    data = mbox_bytes(sample_messages()[:2])
    path = env.write_spool(data)
    daemon = pwd.getpwnam("daemon").pw_uid
    os.chown(path, daemon, -1)
    path.chmod(0o666)  # readable and writable by the session: only the owner check refuses it
    assert _refused(env).startswith(b"-ERR [SYS/PERM]")
    assert path.read_bytes() == data
    assert f"owned by uid {daemon}, expected {env.account.pw_uid}" in env.log_text()


# ---------------------------------------------------------------------------- logging


def test_peer_name_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in transport.LAUNCHER_ADDRESS:
        monkeypatch.delenv(var, raising=False)
    rfd, wfd = os.pipe()
    assert transport.peer_name(rfd) == "unknown"
    monkeypatch.setenv("TCPREMOTEIP", "192.0.2.7")
    assert transport.peer_name(rfd) == "192.0.2.7"  # tcpserver's variable, for a pipe
    monkeypatch.delenv("TCPREMOTEIP")
    monkeypatch.setenv("REMOTE_HOST", "198.51.100.1\n\x1b[2J")
    assert transport.peer_name(rfd) == "198.51.100.1\\x0a\\x1b[2J"  # escaped, never raw
    os.close(rfd)
    os.close(wfd)
    a, b = socket.socketpair()
    assert transport.peer_name(a.fileno()) == "198.51.100.1\\x0a\\x1b[2J"  # a Unix socket has no address
    monkeypatch.delenv("REMOTE_HOST")
    assert transport.peer_name(a.fileno()) == "local"
    a.close()
    b.close()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    monkeypatch.setenv("TCPREMOTEIP", "203.0.113.9")
    assert transport.peer_name(accepted.fileno()) == "127.0.0.1"  # the socket wins over the environment
    for sock in (listener, client, accepted):
        sock.close()


def test_a_socket_pair_from_a_network_launcher_is_where_the_launcher_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12, finding 10 (socat's EXEC: a Unix socket pair, the client in SOCAT_PEERADDR)."""
    for var in transport.LAUNCHER_ADDRESS:
        monkeypatch.delenv(var, raising=False)
    a, b = socket.socketpair()
    assert transport.peer_name(a.fileno()) == "local" and transport.peer_is_local(a.fileno())
    for value, shown, local in (
        ("198.51.100.4", "198.51.100.4", False),
        ("[0000:0000:0000:0000:0000:0000:0000:0001]", "::1", True),  # socat's IPv6 form
        ("[2001:0db8:0000:0000:0000:0000:0000:0007]", "2001:db8::7", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.example.org", "127.example.org", False),  # a name is never loopback
    ):
        monkeypatch.setenv("SOCAT_PEERADDR", value)
        assert (transport.peer_name(a.fileno()), transport.peer_is_local(a.fileno())) == (shown, local)
    a.close()
    b.close()


def test_peer_name_ipv4_mapped() -> None:
    try:
        listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    except (OSError, ValueError):
        pytest.skip("no dual-stack IPv6 socket here")
    client = socket.create_connection(("127.0.0.1", listener.getsockname()[1]))
    accepted, _ = listener.accept()
    assert transport.peer_name(accepted.fileno()) == "127.0.0.1"
    for sock in (listener, client, accepted):
        sock.close()


@pytest.mark.parametrize("target", ["file", "stderr"])
def test_passwords_never_reach_the_log(env: Pop3Env, target: str) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    if target == "stderr":
        env.write_config(log="stderr")
    wrong = "Wr0ng-P4ss"
    script = (
        f"USER alice\r\nPASS {wrong}\r\nUSER ../alice\r\nPASS {wrong}\r\n"
        f"USER alice\r\nPASS {PASSWORD}\r\nQUIT\r\n"
    ).encode()
    proc = subprocess.run(env.command(), input=script, capture_output=True, timeout=30, env=child_env())
    assert b"+OK Logged in" in proc.stdout
    log = env.log_text() if target == "file" else proc.stderr.decode()
    assert "login failed: user=alice rip=unknown" in log
    assert "login: user=alice rip=unknown" in log
    assert "logout: reason=quit" in log
    assert "login failed: user=../alice rip=unknown: invalid user name" in log
    assert wrong not in log and PASSWORD not in log


@pytest.mark.parametrize("name", [b"a\0b", b"w" * 300, b"\xff\xfe", b"../root", b"-x"])
def test_names_no_command_line_can_carry_are_refused_like_a_wrong_password(env: Pop3Env, name: bytes) -> None:
    """A NUL or 300 octets cannot be in a USER line (the line itself is refused, whatever the
    name); through AUTH LOGIN, base64-encoded, they reach authentication and are answered
    exactly like a wrong password, without touching the spool directory."""
    import base64

    env.write_spool(mbox_bytes(sample_messages()[:1]))
    before = (sorted(os.listdir(env.spool_dir)), os.stat(env.spool_dir).st_mtime_ns)
    replies = []
    for user, password in ((b"alice", b"wrong"), (name, PASSWORD.encode())):
        client = env.client()
        client._putcmd("AUTH LOGIN")
        assert client._getresp().startswith(b"+ ")
        client._putline(base64.b64encode(user))
        assert client._getresp().startswith(b"+ ")
        client._putline(base64.b64encode(password))
        with pytest.raises(poplib.error_proto) as info:
            client._getresp()
        replies.append(info.value.args[0])
        client.quit()
        assert client.proc.wait(timeout=20) == 0
    assert replies[0] == replies[1] == b"-ERR [AUTH] Authentication failed."
    assert (sorted(os.listdir(env.spool_dir)), os.stat(env.spool_dir).st_mtime_ns) == before
    assert "invalid user name" in env.log_text()
