"""The standalone server as an administrator runs it: `--daemon --pidfile`, SIGTERM and SIGHUP,
the session limits, several addresses (IPv4 and IPv6), 50 sessions at once; and the inetd path,
which must never touch python-daemon."""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from conftest import (
    IO_TIMEOUT,
    PASSWORD,
    ROOT,
    Pop3Env,
    child_env,
    mbox_bytes,
    recv_until,
    sample_messages,
    wait_for,
    wire_form,
)
from serving import Launched, free_port, greets, launch, no_sessions_running, pop3d_processes
from test_launchers import concurrent_sessions


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    """Running and not a zombie (a daemon's parent may be an init that reaps late)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def login(port: int, user: str = "alice", host: str = "127.0.0.1") -> poplib.POP3:
    client = poplib.POP3(host, port, timeout=IO_TIMEOUT)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def standalone(env: Pop3Env, *extra: str) -> Launched:
    return launch(
        lambda port: env.command("--listen", f"127.0.0.1:{port}", *extra),
        env.base / "server.out",
        cwd=str(ROOT),
        env=child_env(),
    )


# ------------------------------------------------------------------------------ --daemon


def start_daemon(env: Pop3Env, pidfile, *extra: str) -> tuple[int, int]:
    """`pop3d --daemon`: returns (port, daemon pid) once the command has returned."""
    for _ in range(5):
        port = free_port()
        done = subprocess.run(
            env.command("--listen", f"127.0.0.1:{port}", "--daemon", "--pidfile", str(pidfile), *extra),
            cwd=str(ROOT),
            env=child_env(),
            capture_output=True,
            timeout=60,
        )
        if done.returncode == 71 and b"cannot bind" in done.stderr:
            continue  # the port was taken meanwhile
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"" and done.stderr == b""
        # The command returns only once the daemon runs and its pid file is written.
        return port, int(pidfile.read_text())
    raise AssertionError("no port could be bound")


def test_daemon_pidfile_sigterm_no_orphans(env: Pop3Env) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    pidfile = env.base / "run" / "pop3d.pid"
    pidfile.parent.mkdir()
    port, pid = start_daemon(env, pidfile)
    try:
        assert pidfile.read_text() == f"{pid}\n"
        assert alive(pid)
        # Detached: its own session, no controlling terminal, not our child.
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        assert int(stat[3]) != os.getsid(0)  # session id
        assert int(stat[4]) == 0  # tty_nr
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert pid in pop3d_processes(str(env.conf))
        # A session in progress with a deletion not yet committed.
        client = login(port)
        assert client.stat()[0] == len(messages)
        client.dele(1)
        session = [p for p in pop3d_processes(str(env.conf)) if p != pid]
        assert len(session) == 1
        # A second daemon on the same pid file refuses to start.
        second = subprocess.run(
            env.command("--listen", f"127.0.0.1:{free_port()}", "--daemon", "--pidfile", str(pidfile)),
            cwd=str(ROOT),
            env=child_env(),
            capture_output=True,
            timeout=60,
        )
        assert second.returncode == 75
        assert f"already running as pid {pid}".encode() in second.stderr
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not alive(pid))
        # The running session ended without applying its deletion, the pid file is gone, and no
        # pop3d process is left behind.
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            client.stat()
        assert env.spool_path().read_bytes() == mbox_bytes(messages)
        assert not pidfile.exists()
        assert wait_for(lambda: pop3d_processes(str(env.conf)) == [])
        assert not greets(port)
        log = env.log_text()
        assert "stopping: ending 1 running session(s)" in log and "stopped" in log
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemon_overwrites_a_stale_pidfile(env: Pop3Env) -> None:
    pidfile = env.base / "pop3d.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")
    port, pid = start_daemon(env, pidfile)
    try:
        assert pid != dead.pid and alive(pid)
        assert greets(port)
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not alive(pid))
    assert not pidfile.exists()


def test_daemon_start_failure_is_reported(env: Pop3Env) -> None:
    """A pid file that cannot be written: the starting command says so and fails."""
    pidfile = env.base / "missing-dir" / "pop3d.pid"
    done = subprocess.run(
        env.command("--listen", f"127.0.0.1:{free_port()}", "--daemon", "--pidfile", str(pidfile)),
        cwd=str(ROOT),
        env=child_env(),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"pidfile" in done.stderr and b"No such file or directory" in done.stderr
    assert wait_for(lambda: pop3d_processes(str(env.conf)) == [])


# ------------------------------------------------------------------------------ signals


def test_sighup_rereads_the_configuration_for_new_sessions(env: Pop3Env) -> None:
    first = env.write_spool(mbox_bytes([b"Subject: old place\n\nold\n"]))
    served = standalone(env)
    try:
        # Connected before the reload: keeps the configuration it was started with.
        early = poplib.POP3("127.0.0.1", served.port, timeout=IO_TIMEOUT)
        other = env.base / "other"
        other.mkdir()
        os.chown(other, env.account.pw_uid, env.account.pw_gid)
        moved = other / "alice"
        moved.write_bytes(mbox_bytes([b"Subject: new place\n\nnew\n", b"Subject: 2\n\n2\n"]))
        os.chown(moved, env.account.pw_uid, env.account.pw_gid)
        env.write_config(mailbox=f"{other}/%u")
        served.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in env.log_text())
        early.user("alice")
        early.pass_(PASSWORD)
        assert early.stat()[0] == 1
        early.quit()
        late = login(served.port)
        assert late.stat()[0] == 2
        late.quit()
        # A broken file: logged, the previous configuration stays in force.
        env.conf.write_text(env.conf.read_text() + "no_such_key = 1\n")
        served.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "keeping the previous configuration" in env.log_text())
        assert "no_such_key" in env.log_text()
        again = login(served.port)
        assert again.stat()[0] == 2
        again.quit()
        assert first.exists()
    finally:
        assert served.stop() == 0


def test_sigterm_ends_sessions_without_update_and_waits(env: Pop3Env) -> None:
    messages = sample_messages()
    env.write_spool(mbox_bytes(messages))
    served = standalone(env)
    client = login(served.port)
    client.dele(1)
    client.dele(2)
    assert served.stop(signal.SIGTERM) == 0
    # The server waited for its session, which ended without applying the deletions.
    assert pop3d_processes(str(env.conf)) == []
    assert env.spool_path().read_bytes() == mbox_bytes(messages)
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.stat()


# ------------------------------------------------------------------------------ limits, addresses


def test_max_sessions_per_ip(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    env.write_config(max_sessions_per_ip=2)
    hosts = ["127.0.0.1"] + (["[::1]"] if has_ipv6_loopback() else [])
    served = launch(
        lambda port: env.command(*(f"--listen={h}:{port}" for h in hosts)),
        env.base / "server.out",
        cwd=str(ROOT),
        env=child_env(),
    )
    port = served.port
    try:
        assert no_sessions_running(served)
        held = [socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) for _ in range(2)]
        for sock in held:
            assert sock.recv(100).startswith(b"+OK")
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as third:
            assert recv_until(third, b"\r\n") == (
                b"-ERR [SYS/TEMP] Too many sessions from your address; try again later.\r\n"
            )
        if len(hosts) > 1:  # another address is not affected
            with socket.create_connection(("::1", port), timeout=IO_TIMEOUT) as other:
                assert other.recv(100).startswith(b"+OK")
        for sock in held:
            sock.close()
        # Once they are gone, the address may connect again.
        assert wait_for(lambda: greets(port))
        assert "max_sessions_per_ip reached" in env.log_text()
    finally:
        served.stop()


@pytest.mark.parametrize(
    ("address", "prefix", "client"),
    [
        (("2001:db8:1:2:aaaa::1", 110, 0, 0), 64, "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff:1:2:3", 110, 0, 0), 64, "2001:db8:1:2::/64"),
        (("2001:db8:1:3::1", 110, 0, 0), 64, "2001:db8:1:3::/64"),
        (("2001:db8:1:2:aaaa::1", 110, 0, 0), 48, "2001:db8:1::/48"),
        (("2001:db8:1:2:aaaa::1", 110, 0, 0), 128, "2001:db8:1:2:aaaa::1/128"),
        (("fe80::1%eth0", 110, 0, 2), 64, "fe80::/64"),
        (("::ffff:192.0.2.7", 110, 0, 0), 64, "192.0.2.7"),  # IPv4 on a dual-stack socket
        (("192.0.2.7", 110), 64, "192.0.2.7"),
        (("192.0.2.8", 110), 64, "192.0.2.8"),  # IPv4: per address
        ("", 64, "local"),  # a Unix socket
    ],
)
def test_which_client_a_connection_counts_against(address: object, prefix: int, client: str) -> None:
    from pop3d.server import client_of

    assert client_of(address, prefix) == client


def netns_unavailable() -> str:
    """Why this machine cannot give a test its own network namespace ("" if it can)."""
    if os.geteuid() != 0:
        return "a network namespace with its own addresses needs root"
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2")):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian package {package})"
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        return "unshare --net fails here (no CAP_SYS_ADMIN in this container?)"
    return ""


# Clients from fd00:12::a and fd00:12::b share a /64; fd00:13::c is another site.
NETNS_ADDRESSES = ("fd00:12::a", "fd00:12::b", "fd00:13::c")
NETNS_CLIENTS = """
import socket, sys
held = []
for source in sys.argv[2:]:
    sock = socket.socket(socket.AF_INET6)
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect(("::1", int(sys.argv[1])))
    line = b""
    while not line.endswith(b"\\n"):
        data = sock.recv(200)
        if not data:
            break
        line += data
    print(source, line.decode().strip(), flush=True)
    held.append(sock)  # each greeted session stays open until the last client has its answer
"""


@pytest.mark.skipif(bool(netns_unavailable()), reason=netns_unavailable() or "-")
@pytest.mark.parametrize(("prefix", "b_answer"), [(None, "-ERR"), (128, "+OK")])
def test_max_sessions_per_ip_counts_an_ipv6_slash_64_as_one_client(env: Pop3Env, prefix, b_answer) -> None:
    """--listen on ::1 in a network namespace whose loopback has addresses in two /64s: with
    max_sessions_per_ip = 1 a second address of the same /64 is refused (it was a new client when
    counted per address), another /64 is served; max_sessions_per_ip_v6_prefix = 128 counts
    each address."""
    env.write_config(max_sessions_per_ip=1, max_sessions_per_ip_v6_prefix=prefix)
    port = 1110
    setup = "ip link set lo up" + "".join(f" && ip -6 addr add {a}/64 dev lo nodad" for a in NETNS_ADDRESSES)
    in_netns = ["unshare", "--net", "--", "sh", "-c", f'{setup} && exec "$@"', "sh"]
    server = subprocess.Popen(
        [*in_netns, *env.command("--listen", f"[::1]:{port}")],
        cwd=str(ROOT),
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: f"listening on [::1]:{port}" in env.log_text() or server.poll() is not None)
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        enter = ["nsenter", f"--net=/proc/{server.pid}/ns/net"]
        clients = subprocess.run(
            [*enter, sys.executable, "-c", NETNS_CLIENTS, str(port), *NETNS_ADDRESSES],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert clients.returncode == 0, clients.stderr
        answers = dict(line.split(" ", 1) for line in clients.stdout.splitlines())
        assert answers["fd00:12::a"].startswith("+OK")
        if b_answer == "-ERR":
            assert (
                answers["fd00:12::b"]
                == "-ERR [SYS/TEMP] Too many sessions from your address; try again later."
            )
            assert "refusing fd00:12::/64: max_sessions_per_ip reached" in env.log_text()
        else:
            assert answers["fd00:12::b"].startswith("+OK")
        assert answers["fd00:13::c"].startswith("+OK")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        if server.stderr:
            server.stderr.close()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_listen_on_ipv4_and_ipv6(env: Pop3Env) -> None:
    messages = sample_messages()[:2]
    served = launch(
        lambda port: env.command("--listen", f"127.0.0.1:{port}", "--listen", f"[::1]:{port}"),
        env.base / "server.out",
        cwd=str(ROOT),
        env=child_env(),
    )
    try:
        for host in ("127.0.0.1", "::1"):
            env.write_spool(mbox_bytes(messages))
            client = login(served.port, host=host)
            lines = client.retr(2)[1]
            assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[1])
            client.quit()
        assert f"listening on 127.0.0.1:{served.port}, [::1]:{served.port}" in env.log_text()
        assert "rip=::1" in env.log_text()
    finally:
        served.stop()


def test_fifty_concurrent_sessions_standalone(env: Pop3Env) -> None:
    """50 users at once, the 51st connection refused by max_sessions = 50."""
    env.write_config(max_sessions=50, max_sessions_per_ip=50)
    served = standalone(env)
    try:
        assert no_sessions_running(served)
        concurrent_sessions(env, served.port, refused_extra=True)
    finally:
        served.stop()


# ------------------------------------------------------------------------------ the inetd path


def test_inetd_mode_never_imports_python_daemon(env: Pop3Env) -> None:
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    ours, proc = env.spawn([sys.executable, "-X", "importtime", "-m", "pop3d", "-c", str(env.conf)])
    assert ours.recv(100).startswith(b"+OK")
    ours.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nRETR 1\r\nQUIT\r\n")
    assert recv_until(ours, b"+OK Bye; 1 messages left.\r\n").startswith(b"+OK")
    _, errors = proc.communicate(timeout=60)
    ours.close()
    modules = {line.rsplit("|", 1)[-1].strip() for line in errors.decode().splitlines() if "|" in line}
    assert "pop3d.session" in modules  # importtime did report this process's imports
    assert not {m for m in modules if m == "daemon" or m.startswith("daemon.")}


def test_accept_yes_environment_is_inetd_mode(env: Pop3Env) -> None:
    """systemd Accept=yes passes the connection as fd 3 with LISTEN_FDS=1 (and as fd 0/1 with
    StandardInput=socket): that is one session, not an accept loop."""
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    ours, proc = env.spawn(
        ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&0', "sh", *env.command()]
    )
    assert ours.recv(100).startswith(b"+OK")
    ours.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nQUIT\r\n")
    assert b"+OK 1 " in recv_until(ours, b"+OK Bye; 1 messages left.\r\n")
    assert proc.wait(timeout=30) == 0
    proc.stderr.close()
    ours.close()


def test_listen_fds_that_are_not_listening_sockets(env: Pop3Env) -> None:
    done = subprocess.run(
        ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<"$0"', str(env.conf), *env.command()],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd=str(ROOT),
        env=child_env(),
        timeout=60,
    )
    assert done.returncode == 71
    assert b"systemd socket fd 3" in done.stderr


def test_sighup_reloads_a_renewed_certificate(env: Pop3Env) -> None:
    """Standalone implicit TLS: after the certificate files are replaced and SIGHUP, new
    connections get the new certificate; a broken replacement keeps the old one in force."""
    trustme = pytest.importorskip("trustme")
    import ssl

    from serving import greets_over_tls

    pem = env.base / "server.pem"

    def issue() -> ssl.SSLContext:
        ca = trustme.CA()
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        pem.chmod(0o600)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    old = issue()
    env.write_config(tls="implicit", tls_cert=pem, tls_key=pem)
    served = launch(
        lambda port: env.command("--listen", f"127.0.0.1:{port}"),
        env.base / "server.out",
        probe=greets_over_tls(old),
        cwd=str(ROOT),
        env=child_env(),
    )
    try:
        new = issue()
        assert greets_over_tls(old)(served.port)  # not re-read before the signal
        served.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in env.log_text())
        assert greets_over_tls(new)(served.port)
        assert not greets_over_tls(old)(served.port)
        pem.write_text("not a certificate\n")
        served.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "keeping the previous configuration" in env.log_text())
        assert greets_over_tls(new)(served.port)
    finally:
        assert served.stop() == 0
