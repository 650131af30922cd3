"""The shipped launcher configurations, run by the real launchers: openbsd-inetd, xinetd,
systemd-socket-activate (both socket styles, under the units' hardening), and
`systemd-analyze verify` on the units. poplib and curl log in, list, retrieve and delete through
each; the session processes run as the mail account."""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import (
    IO_TIMEOUT,
    IS_ROOT,
    PASSWORD,
    ROOT,
    RUN_AS,
    Pop3Env,
    mbox_bytes,
    sample_messages,
    wait_for,
    wire_form,
)
from serving import (
    Launched,
    capability_mask,
    curl_round,
    greets,
    greets_over_tls,
    holds_no_listening_socket,
    inetd_conf_line,
    launch,
    poplib_round,
    proc_status,
    session_pid,
    unit_command,
    write_launcher,
    xinetd_binary,
    xinetd_service,
)

needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="launchers run pop3d as root (the shipped lines say so); run as root"
)
needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (Debian curl)")
INETD = shutil.which("inetd") or ("/usr/sbin/inetd" if os.access("/usr/sbin/inetd", os.X_OK) else None)
needs_inetd = pytest.mark.skipif(
    INETD is None, reason="openbsd-inetd is not installed (Debian package openbsd-inetd)"
)
XINETD = xinetd_binary()
needs_xinetd = pytest.mark.skipif(
    XINETD is None,
    reason="xinetd not found (it conflicts with openbsd-inetd: .ci/run unpacks its .deb into "
    "/opt/pop3d-ci/xinetd; or set POP3D_XINETD)",
)
SSA = shutil.which("systemd-socket-activate")
needs_ssa = pytest.mark.skipif(SSA is None, reason="systemd-socket-activate is not installed (systemd)")


def non_loopback_address() -> str | None:
    """An IPv4 address of this host that is not loopback (the source of the default route)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.skipif(not shutil.which("socat"), reason="needs socat (Debian package socat)")
def test_socat_exec_names_the_client_and_a_remote_one_is_not_loopback(env: Pop3Env) -> None:
    """Issue 12, finding 10: socat's default EXEC mode hands pop3d a Unix socket pair. pop3d
    logged rip=local and, with plaintext_on_loopback, took USER/PASS in the clear from a remote
    client. It reads SOCAT_PEERADDR, and that address decides what is loopback."""
    import socket

    remote = non_loopback_address()
    if remote is None:
        pytest.skip("no non-loopback IPv4 address on this host to connect from")
    env.write_spool(mbox_bytes(sample_messages()[:1]))
    env.write_config(plaintext_auth="tls", plaintext_on_loopback="yes")
    launcher = write_launcher(env.base)
    launched = launch(
        # As socat's manual shows it: TCP-LISTEN, fork, EXEC of the command (a socket pair).
        lambda port: ["socat", f"TCP-LISTEN:{port},reuseaddr,fork", f"EXEC:{launcher} -c {env.conf}"],
        env.base / "socat.out",
    )
    try:
        with socket.create_connection(
            (remote, launched.port), timeout=IO_TIMEOUT, source_address=(remote, 0)
        ) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"+OK")
            sock.sendall(b"CAPA\r\nUSER alice\r\n")
            capabilities = []
            while (line := reader.readline()) != b".\r\n":
                capabilities.append(line)
            assert b"USER\r\n" not in capabilities
            assert (
                reader.readline()
                == b"-ERR [AUTH] Plaintext authentication is disallowed; use STLS first.\r\n"
            )
            sock.sendall(b"QUIT\r\n")
            assert reader.readline().startswith(b"+OK")
        client = poplib.POP3("127.0.0.1", launched.port, timeout=IO_TIMEOUT)  # on loopback: allowed
        client.user("alice")
        assert client.pass_(PASSWORD).startswith(b"+OK Logged in")
        client.quit()
        lines = (f"disconnected before login: rip={remote} reason=quit", "login: user=alice rip=127.0.0.1")
        assert wait_for(lambda: all(line in env.log_text() for line in lines)), env.log_text()
        assert "rip=local" not in env.log_text()
    finally:
        launched.stop()


def runs_as_mail_account(pid: int) -> None:
    status = proc_status(pid)
    uid = str(pwd.getpwnam(RUN_AS).pw_uid)
    assert status["Uid"].split() == [uid] * 4


def start_inetd(
    env: Pop3Env,
    service: str = "pop3",
    program_prefix: list[str] | None = None,
    probe=greets,
    commented: bool = False,
):
    launcher = write_launcher(env.base)
    conf = env.base / "inetd.conf"

    def command(port: int) -> list[str]:
        line = inetd_conf_line(service, port, launcher, env.conf, commented)
        if program_prefix:
            # The tcp-wrappers form: tcpd in the program field, pop3d's path as its argv[0].
            fields = line.split("\t")
            fields[5:7] = [program_prefix[0], f"{launcher} {fields[6].split(' ', 1)[1]}"]
            line = "\t".join(fields)
        conf.write_text(line)
        return [INETD, "-d", str(conf)]

    return launch(command, env.base / "inetd.out", probe=probe)


@needs_root
@needs_inetd
@needs_curl
def test_openbsd_inetd_with_the_shipped_line(env: Pop3Env) -> None:
    served = start_inetd(env)
    try:
        messages = sample_messages()
        poplib_round(env, served.port, messages, check_process=runs_as_mail_account)
        curl_round(env, served.port, messages)
    finally:
        served.stop()
    assert "execv" in served.text()  # inetd -d logged that it started the program


@needs_root
@needs_inetd
@pytest.mark.skipif(not os.access("/usr/sbin/tcpd", os.X_OK), reason="tcpd is not installed (Debian tcpd)")
def test_openbsd_inetd_through_tcpd(env: Pop3Env) -> None:
    """The tcp-wrappers form docs/DEPLOYING.md documents: tcpd execs pop3d (hosts.allow/deny permit it:
    the test machine's files are left alone, so this shows the chain works, not a denial)."""
    deny = Path("/etc/hosts.deny")
    if deny.exists() and any(line.split("#")[0].strip() for line in deny.read_text().splitlines()):
        pytest.skip("/etc/hosts.deny has rules; not touching the machine's access control")
    served = start_inetd(env, program_prefix=["/usr/sbin/tcpd"])
    try:
        poplib_round(env, served.port, sample_messages()[:2])
    finally:
        served.stop()


def start_xinetd(env: Pop3Env, service: str = "pop3d", probe=greets, changed: dict[str, str] | None = None):
    launcher = write_launcher(env.base)
    conf = env.base / "xinetd.conf"

    def command(port: int) -> list[str]:
        log = env.base / "xinetd-service.log"
        conf.write_text(xinetd_service(service, port, launcher, env.conf, log, changed))
        return [
            XINETD, "-dontfork", "-f", str(conf),
            "-pidfile", str(env.base / "xinetd.pid"),
            "-filelog", str(env.base / "xinetd-main.log"),
        ]  # fmt: skip

    return launch(command, env.base / "xinetd.out", probe=probe)


@needs_root
@needs_xinetd
@needs_curl
def test_xinetd_with_the_shipped_service(env: Pop3Env) -> None:
    served = start_xinetd(env)
    try:
        messages = sample_messages()
        poplib_round(env, served.port, messages, check_process=runs_as_mail_account)
        curl_round(env, served.port, messages)
    finally:
        served.stop()
    # log_on_success as shipped: xinetd logged the sessions it started, with the client's address.
    service_log = (env.base / "xinetd-service.log").read_text()
    assert "START: pop3 pid=" in service_log
    assert "from=127.0.0.1" in service_log


def listeners(env: Pop3Env) -> list[int]:
    """The pids of the pop3d listeners that logged, in order."""
    return [int(pid) for pid in re.findall(r"pop3d\[(\d+)\]: listening on ", env.log_text())]


def one_listener_serves_every_connection(env: Pop3Env, served: Launched) -> None:
    """`wait` mode: the pop3d the launcher started accepts every connection and forks each
    session, which holds neither the listening socket nor anything but /dev/null on 0, 1 and 2;
    after idle_exit seconds without a session it exits, and the launcher starts another at the
    next connection; when the launcher exits, so does its pop3d (the port is free again)."""
    messages = sample_messages()
    check = holds_no_listening_socket(served.port)
    for _ in range(2):
        poplib_round(
            env, served.port, messages, check_process=lambda pid: (runs_as_mail_account(pid), check(pid))
        )
    first = listeners(env)
    assert len(first) == 1, env.log_text()  # the probe and both rounds: one listener
    assert wait_for(lambda: "no session for 2 s: exiting" in env.log_text(), timeout=30), env.log_text()
    assert wait_for(lambda: not Path(f"/proc/{first[0]}").exists(), timeout=30)
    env.write_spool(mbox_bytes(messages))
    client = poplib.POP3("127.0.0.1", served.port, timeout=IO_TIMEOUT)  # the launcher started another
    client.user("alice")
    client.pass_(PASSWORD)
    second = listeners(env)
    assert len(second) == 2 and second[1] != first[0]
    served.stop()  # with a session running: it goes on, nothing new is accepted, then pop3d exits
    assert wait_for(lambda: "inetd has exited" in env.log_text(), timeout=30), env.log_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.port), timeout=5).close()
    assert client.stat()[0] == len(messages)
    client.dele(1)
    client.quit()
    assert wait_for(lambda: not Path(f"/proc/{second[1]}").exists(), timeout=30), env.log_text()
    assert env.spool_path().read_bytes() == mbox_bytes(messages[1:])


@needs_root
@needs_inetd
def test_openbsd_inetd_wait_hands_pop3d_its_socket(env: Pop3Env) -> None:
    """The shipped `wait` line (commented out beside the `nowait` one): inetd passes its
    listening socket as fd 0, and one pop3d serves every connection, as --listen does."""
    env.write_config(idle_exit=2)
    served = start_inetd(env, commented=True)
    try:
        one_listener_serves_every_connection(env, served)
    finally:
        served.stop()
    assert "wait" in served.text()


@needs_root
@needs_xinetd
def test_xinetd_wait_yes_hands_pop3d_its_socket(env: Pop3Env) -> None:
    """The shipped service with `wait = yes`, as its comment describes."""
    env.write_config(idle_exit=2)
    served = start_xinetd(env, changed={"wait": "yes"})
    try:
        one_listener_serves_every_connection(env, served)
    finally:
        served.stop()


def hardened_session(unit: str, env: Pop3Env):
    """The session process runs as the mail account, inside the unit's bounding set, with
    no_new_privs: exactly what the unit gives it; and that set sufficed to confine the
    pre-authentication child (chroot, kill)."""

    def check(pid: int) -> None:
        runs_as_mail_account(pid)
        if IS_ROOT and shutil.which("setpriv"):
            status = proc_status(pid)
            assert int(status["CapBnd"], 16) == capability_mask(unit)
            assert status["CapEff"] == "0000000000000000"
            assert status["NoNewPrivs"] == "1"
        # The bounding set was enough to confine the pre-authentication child completely.
        assert "pre-authentication process:" not in env.log_text()

    return check


@needs_root
@needs_ssa
@needs_curl
def test_systemd_accept_yes_as_the_units_run_it(env: Pop3Env) -> None:
    """pop3d.socket (Accept=yes) + pop3d@.service: the connection on stdin/stdout, per connection."""
    launcher = write_launcher(env.base)
    command = unit_command("pop3d@.service", launcher, env.conf)
    served = launch(
        lambda port: [SSA, "--inetd", "-a", "-l", f"127.0.0.1:{port}", *command],
        env.base / "ssa.out",
    )
    try:
        messages = sample_messages()
        poplib_round(env, served.port, messages, check_process=hardened_session("pop3d@.service", env))
        curl_round(env, served.port, messages)
    finally:
        served.stop()


@needs_root
@needs_ssa
@needs_curl
def test_systemd_accept_no_listen_fds(env: Pop3Env) -> None:
    """pop3d-listen.socket (Accept=no) + pop3d-listen.service: pop3d gets the listening socket
    (LISTEN_FDS/LISTEN_PID), forks per connection, and on SIGTERM (systemctl stop) ends a running
    session without update (the unit's bounding set lets it signal the session's account) and
    exits 0."""
    launcher = write_launcher(env.base)
    command = unit_command("pop3d-listen.service", launcher, env.conf)
    served = launch(lambda port: [SSA, "-l", f"127.0.0.1:{port}", *command], env.base / "ssa.out")
    try:
        # systemd-socket-activate exec'ed pop3d: one long-running process, the launcher's pid.
        assert "listening on 127.0.0.1:" in env.log_text()
        messages = sample_messages()
        poplib_round(env, served.port, messages, check_process=hardened_session("pop3d-listen.service", env))
        curl_round(env, served.port, messages)
        env.write_spool(mbox_bytes(messages))
        client = poplib.POP3("127.0.0.1", served.port, timeout=IO_TIMEOUT)
        client.user("alice")
        client.pass_(PASSWORD)
        runs_as_mail_account(session_pid(env, "alice"))
        client.dele(1)
    finally:
        status = served.stop(signal.SIGTERM)
    assert status == 0, served.text()
    assert "stopping: ending 1 running session(s)" in env.log_text()
    assert env.spool_path().read_bytes() == mbox_bytes(messages)
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.stat()


@needs_root
@needs_ssa
def test_systemd_accept_no_reload_with_sighup(env: Pop3Env) -> None:
    """ExecReload= sends SIGHUP: new connections see the re-read configuration."""
    launcher = write_launcher(env.base)
    command = unit_command("pop3d-listen.service", launcher, env.conf)
    served = launch(lambda port: [SSA, "-l", f"127.0.0.1:{port}", *command], env.base / "ssa.out")
    try:
        other = env.base / "other"
        other.mkdir()
        os.chown(other, env.account.pw_uid, env.account.pw_gid)
        env.write_config(mailbox=f"{other}/%u")
        served.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in env.log_text())
        (other / "alice").write_bytes(mbox_bytes([b"Subject: moved\n\nnew place\n"]))
        os.chown(other / "alice", env.account.pw_uid, env.account.pw_gid)
        client = poplib.POP3("127.0.0.1", served.port, timeout=IO_TIMEOUT)
        client.user("alice")
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        assert client.retr(1)[1] == [b"Subject: moved", b"", b"new place"]
        client.quit()
    finally:
        served.stop()


def implicit_tls_round(env: Pop3Env, start) -> None:
    """The shipped pop3s entry (`--tls implicit`): POP3 over TLS from the first byte, poplib's
    POP3_SSL trusting the test CA retrieves a message byte-identical and deletes one."""
    trustme = pytest.importorskip("trustme")
    import ssl

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(env.base / "server.pem"))
    (env.base / "server.pem").chmod(0o600)
    env.write_config(tls_cert=env.base / "server.pem", tls_key=env.base / "server.pem")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    served = start(greets_over_tls(context))
    try:
        messages = sample_messages()[:3]
        env.write_spool(mbox_bytes(messages))
        client = poplib.POP3_SSL("127.0.0.1", served.port, context=context, timeout=IO_TIMEOUT)
        client.user("alice")
        client.pass_(PASSWORD)
        runs_as_mail_account(session_pid(env, "alice"))
        lines = client.retr(2)[1]
        assert b"".join(line + b"\r\n" for line in lines) == wire_form(messages[1])
        client.dele(1)
        client.quit()
        assert wait_for(lambda: env.spool_path().read_bytes() == mbox_bytes(messages[1:]))
    finally:
        served.stop()


@needs_root
@needs_inetd
def test_inetd_pop3s_line_with_implicit_tls(env: Pop3Env) -> None:
    implicit_tls_round(env, lambda probe: start_inetd(env, service="pop3s", probe=probe))


@needs_root
@needs_xinetd
def test_xinetd_pop3s_service_with_implicit_tls(env: Pop3Env) -> None:
    implicit_tls_round(env, lambda probe: start_xinetd(env, "pop3s", probe=probe))


# ------------------------------------------------------------------------------ 50 at once


def concurrent_sessions(env: Pop3Env, port: int, users: int = 50, refused_extra: bool = False) -> None:
    """`users` clients, each its own user and spool, all logged in at the same moment; each
    retrieves its messages byte-identical, deletes one and quits. With `refused_extra`, one more
    connection while all are in is turned away with [SYS/TEMP] (max_sessions)."""
    names = [f"user{i:02d}" for i in range(users)]
    for name in names:
        env.add_user(name, PASSWORD + name)
    mailboxes = {
        name: [
            b"Subject: %s first\n\nhello %s\n" % (name.encode(), name.encode()),
            b"Subject: %s second\n\n.dot line\n>From quoted\n" % name.encode(),
            b"Subject: %s third\n\n" % name.encode()
            + b"".join(b"line %04d %s\n" % (i, b"x" * 60) for i in range(100)),
        ]
        for name in names
    }
    for name, messages in mailboxes.items():
        env.write_spool(mbox_bytes(messages), user=name)
    all_in = threading.Barrier(users + 1, timeout=180)
    release = threading.Barrier(users + 1, timeout=180)
    errors: list[str] = []

    def client(name: str) -> None:
        try:
            pop = poplib.POP3("127.0.0.1", port, timeout=180)
            pop.user(name)
            pop.pass_(PASSWORD + name)
            all_in.wait()
            release.wait()
            messages = mailboxes[name]
            assert pop.stat()[0] == len(messages)
            for number, message in enumerate(messages, 1):
                got = b"".join(line + b"\r\n" for line in pop.retr(number)[1])
                assert got == wire_form(message), name
            pop.dele(2)
            assert pop.quit().startswith(b"+OK")
        except BaseException as e:  # reported by the main thread
            errors.append(f"{name}: {e!r}")
            all_in.abort()
            release.abort()

    threads = [threading.Thread(target=client, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    try:
        all_in.wait()
        if refused_extra:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as extra:
                assert extra.recv(200).startswith(b"-ERR [SYS/TEMP] Too many sessions")
        release.wait()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors[:5]
    for name, messages in mailboxes.items():
        assert env.spool_path(name).read_bytes() == mbox_bytes([messages[0], messages[2]]), name


@needs_root
@needs_inetd
def test_fifty_concurrent_sessions_through_inetd(env: Pop3Env) -> None:
    served = start_inetd(env)
    try:
        concurrent_sessions(env, served.port)
    finally:
        served.stop()


# ------------------------------------------------------------------------------ unit files


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_the_units(tmp_path) -> None:
    """The units as shipped, with only ExecStart's binary pointed at an existing launcher (verify
    checks that it exists); their Documentation= man pages resolve to ours."""
    launcher = write_launcher(tmp_path)
    names = ["pop3d.socket", "pop3d@.service", "pop3d-listen.socket", "pop3d-listen.service"]
    for name in names:
        text = (ROOT / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/pop3d", str(launcher)))
    env = dict(os.environ, MANPATH=str(ROOT / "man"), SYSTEMD_LOG_LEVEL="notice")
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in names)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # Unknown keys and bad values are only warnings: any output is a failure.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr + done.stdout
