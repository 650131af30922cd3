"""The Debian package (debian/, docs/DEBIAN.md) and what it ships beside the code.

Always: the conffile made from config.KEYS and pop3d.conf(5); the fail2ban filter and jail on
the log lines of real failed logins (fail2ban-regex, and a real fail2ban server banning a
guesser); logrotate rotating a real log under a running server.

Opt-in (POP3D_DEB_TESTS=1, which .ci/run sets): dpkg-buildpackage on a copy of the tree,
lintian, and, as root, `apt-get install ./pop3d_*.deb` on this machine, logins through
openbsd-inetd with the installed files, then remove and purge. That test changes the host's
/etc (pop3d's default configuration file and PAM service, /etc/inetd.conf) for a few seconds
and restores it, so a plain `scripts/test` skips it.
"""

from __future__ import annotations

import base64
import grp
import importlib.metadata
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

import pytest
from conftest import IO_TIMEOUT, IS_ROOT, PASSWORD, ROOT, Pop3Env, child_env, mbox_bytes, wait_for
from serving import children, greets, launch, proc_status

from pop3d import __version__, config

DEB_TESTS = os.environ.get("POP3D_DEB_TESTS") == "1"
# Debian's own tools, never a Python earlier in PATH (a pyenv shim would build against itself).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
ACCOUNT = "_pop3d"  # the package's preauth_user

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def render_conffile() -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "debian" / "conffile.py")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------------------------------ the conffile


def test_conffile_lists_every_key_commented_out_with_its_default(tmp_path: Path) -> None:
    """Every key of config.py is in /etc/pop3d.conf, and uncommenting every shown default
    changes nothing: a key left out, or a default shown wrong, fails here."""
    text = render_conffile()
    shipped = tmp_path / "pop3d.conf"
    shipped.write_text(text)
    assert config.read_file(str(shipped)) == {"preauth_user": ACCOUNT}

    listed = {}
    for line in text.splitlines():
        match = re.match(r"^(#?)(\w+) =(?: (.*))?$", line)
        if match and match.group(2) in config.KEYS:
            listed[match.group(2)] = (match.group(1), match.group(3))
    assert set(listed) == set(config.KEYS)
    assert listed["preauth_user"] == ("", ACCOUNT)
    assert all(commented == "#" for key, (commented, _) in listed.items() if key != "preauth_user")

    every_default = tmp_path / "uncommented.conf"
    every_default.write_text("\n".join(re.sub(r"^#(\w+ = \S)", r"\1", line) for line in text.splitlines()))
    only_package_value = tmp_path / "package.conf"
    only_package_value.write_text(f"[pop3d]\npreauth_user = {ACCOUNT}\n")
    uncommented = config.load(["-c", str(every_default)]).as_dict()
    defaults = config.load(["-c", str(only_package_value)]).as_dict()
    assert {k: uncommented[k] for k in config.KEYS} == {k: defaults[k] for k in config.KEYS}


def test_conffile_preauth_user_is_the_account_the_maintainer_scripts_make() -> None:
    for script in ("pop3d.postinst", "pop3d.postrm"):
        assert f"\nACCOUNT={ACCOUNT}\n" in (ROOT / "debian" / script).read_text(), script
    assert f"\npreauth_user = {ACCOUNT}\n" in render_conffile()


def test_package_version_is_pop3ds() -> None:
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"pop3d ({__version__}) "), first


# ------------------------------------------------------------- Debian's own Python libraries


@pytest.mark.skipif(
    os.environ.get("POP3D_DEBIAN_LIBS") != "1",
    reason="runs in the venv over Debian's packages (POP3D_DEBIAN_LIBS=1 scripts/test; .ci/run does)",
)
def test_the_suite_runs_on_debians_python_and_libraries() -> None:
    """What the .deb depends on: Debian 12's python3, python3-passlib 1.7.4, python3-bcrypt
    3.2 and python3-daemon 2.3, not PyPI's libpass, bcrypt 4 and python-daemon 3."""
    import bcrypt
    import daemon
    import passlib

    assert os.path.realpath(sys.executable).startswith("/usr/bin/python3")
    for module in (passlib, bcrypt, daemon):
        assert module.__file__.startswith("/usr/lib/python3/dist-packages/"), module.__file__
    assert passlib.__version__ == "1.7.4"
    assert bcrypt.__version__.startswith("3.2.")
    assert importlib.metadata.version("python-daemon").startswith("2.3.")


# ------------------------------------------------------------------------------- fail2ban

FAIL2BAN_REGEX = shutil.which("fail2ban-regex", path=SYSTEM_PATH)
FAIL2BAN_CLIENT = shutil.which("fail2ban-client", path=SYSTEM_PATH)
FAIL2BAN_COMMON = Path("/etc/fail2ban/filter.d/common.conf")
needs_fail2ban = pytest.mark.skipif(
    not (FAIL2BAN_REGEX and FAIL2BAN_CLIENT and FAIL2BAN_COMMON.exists()),
    reason="fail2ban is not installed (Debian package fail2ban)",
)
# User names that look like addresses: valid names may hold digits, '.', '@', '-', '+', and
# AUTH PLAIN may carry any text (pop3d logs it escaped), spaces and "rip=" included.
LOOKALIKE_NAMES = ["203.0.113.9", "a@198.51.100.7", "x rip=203.0.113.9: PAM: Authentication failure"]


def fail2ban_config(base: Path) -> Path:
    """A private fail2ban configuration: the system's common.conf and the shipped filter."""
    directory = base / "fail2ban"
    (directory / "filter.d").mkdir(parents=True)
    shutil.copy(FAIL2BAN_COMMON, directory / "filter.d")
    shutil.copy(ROOT / "fail2ban" / "filter.d" / "pop3d.conf", directory / "filter.d")
    return directory


def auth_plain(port: int, host: str, name: str, password: str) -> bytes:
    """AUTH PLAIN with any name (poplib has no AUTH): pop3d's answer."""
    token = base64.b64encode(b"\0" + name.encode() + b"\0" + password.encode())
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        sock.sendall(b"AUTH PLAIN\r\n")
        assert reader.readline() == b"+ \r\n"
        sock.sendall(token + b"\r\n")
        answer = reader.readline()
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        return answer


def fail_login(port: int, host: str, name: str) -> None:
    client = poplib.POP3(host, port, timeout=IO_TIMEOUT)
    client.user(name)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong password")
    client.quit()


def listen(env: Pop3Env, *extra: str):
    """pop3d --listen on 127.0.0.1, as a packaged pop3d-listen.service would run it."""
    return launch(
        lambda port: env.command("--listen", f"127.0.0.1:{port}", *extra),
        env.base / "listen.out",
        cwd=str(ROOT),
        env=child_env(),
    )


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def failed_logins(env: Pop3Env) -> Iterator[tuple[Pop3Env, list[tuple[str, str]]]]:
    """pop3d's log after real logins: one good, the rest failures; the (address, name) of each
    failure, in order."""
    env.write_spool(mbox_bytes([b"Subject: hi\n\nhello\n"]))
    served = listen(env)
    try:
        port = served.port
        expected = []
        good = poplib.POP3("127.0.0.1", port, timeout=IO_TIMEOUT)
        good.user("alice")
        good.pass_(PASSWORD)  # a successful login: must not match
        good.quit()
        for name in ["alice", "nosuchuser", *LOOKALIKE_NAMES[:2]]:
            fail_login(port, "127.0.0.1", name)
            expected.append(("127.0.0.1", name))
        assert auth_plain(port, "127.0.0.1", LOOKALIKE_NAMES[2], "guess").startswith(b"-ERR [AUTH]")
        expected.append(("127.0.0.1", LOOKALIKE_NAMES[2]))
        assert auth_plain(port, "127.0.0.1", "alice", PASSWORD).startswith(b"+OK")
        # The right password, but the maildrop is locked (an MDA delivering): not the client's doing.
        lock = Path(f"{env.spool_path()}.lock")
        lock.write_text("0\n")
        busy = poplib.POP3("127.0.0.1", port, timeout=IO_TIMEOUT)
        busy.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            busy.pass_(PASSWORD)
        busy.close()
        lock.unlink()
    finally:
        served.stop()
    if ipv6_loopback():
        served = launch(
            lambda port: env.command("--listen", f"[::1]:{port}"),
            env.base / "listen6.out",
            host="::1",
            cwd=str(ROOT),
            env=child_env(),
        )
        try:
            fail_login(served.port, "::1", "alice")
            expected.append(("::1", "alice"))
        finally:
            served.stop()
    yield env, expected


def fail2ban_matches(config_dir: Path, log: Path) -> list[tuple[str, str]]:
    done = subprocess.run(
        [FAIL2BAN_REGEX, "-c", str(config_dir), "-o", "<ip>|<F-USER>", str(log), "pop3d"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [tuple(line.split("|", 1)) for line in done.stdout.splitlines() if "|" in line]


@needs_fail2ban
def test_fail2ban_filter_matches_real_failed_logins_only(failed_logins) -> None:
    env, expected = failed_logins
    lines = env.log_text().splitlines()
    assert any(" login: user=alice rip=127.0.0.1 " in line for line in lines)  # the good ones
    assert any(" login failed: user=alice rip=127.0.0.1: " in line and "lock" in line for line in lines)
    config_dir = fail2ban_config(env.base)
    # pop3d's own log file (log = FILE), as written.
    assert fail2ban_matches(config_dir, env.log) == expected
    # The same messages as rsyslog writes them to /var/log/mail.log (pop3d's syslog lines:
    # ident pop3d, with the pid): "Dec  6 01:40:07 host pop3d[107]: ...".
    mail_log = env.base / "mail.log"
    mail_log.write_text(
        "".join(
            time.strftime("%b %e %H:%M:%S myhost ", time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
            + line[20:]
            + "\n"
            for line in lines
        )
    )
    assert fail2ban_matches(config_dir, mail_log) == expected


@needs_fail2ban
def test_fail2ban_jail_bans_a_guesser(env: Pop3Env) -> None:
    """The shipped jail, enabled the documented way (a .local file) and pointed at pop3d's log
    file, run by a real fail2ban server: five wrong passwords ban the address. The ban action
    records the address instead of changing this machine's firewall."""
    config_dir = fail2ban_config(env.base)
    shutil.copy("/etc/fail2ban/fail2ban.conf", config_dir)
    (config_dir / "fail2ban.local").write_text("[DEFAULT]\ndbfile = :memory:\n")
    (config_dir / "jail.conf").write_text("[DEFAULT]\nignoreself = false\nignoreip =\n")
    (config_dir / "jail.d").mkdir()
    shutil.copy(ROOT / "fail2ban" / "jail.d" / "pop3d.conf", config_dir / "jail.d")
    banned = env.base / "banned"
    (config_dir / "action.d").mkdir()
    (config_dir / "action.d" / "record.conf").write_text(
        f"[Definition]\nactionban = echo <ip> >> {banned}\nactionunban = true\n"
    )
    (config_dir / "jail.d" / "pop3d.local").write_text(
        f"[pop3d]\nenabled = true\nbackend = polling\nlogpath = {env.log}\naction = record\n"
    )
    env.log.touch()
    sock = env.base / "fail2ban.sock"
    base_command = [FAIL2BAN_CLIENT, "-c", str(config_dir), "-s", str(sock), "-p", str(env.base / "f2b.pid")]
    f2b_log = env.base / "fail2ban.log"
    with open(env.base / "fail2ban.out", "wb") as out:
        server = subprocess.Popen(
            [*base_command, "--logtarget", str(f2b_log), "-x", "-f", "start"], stdout=out, stderr=out
        )
    served = None
    try:
        assert wait_for(
            lambda: "Jail 'pop3d' started" in (f2b_log.read_text() if f2b_log.exists() else "")
        ), (env.base / "fail2ban.out").read_text()
        served = listen(env)
        for _ in range(2):  # max_auth_failures (3) a session: five guesses take two sessions
            client = poplib.POP3("127.0.0.1", served.port, timeout=IO_TIMEOUT)
            for _ in range(3):
                client.user("alice")
                try:
                    client.pass_("guess")
                except poplib.error_proto:
                    pass
            client.close()
        assert wait_for(lambda: banned.exists() and banned.read_text() == "127.0.0.1\n"), f2b_log.read_text()
        status = subprocess.run(
            [*base_command, "status", "pop3d"], capture_output=True, text=True, timeout=60
        )
        assert "Banned IP list:\t127.0.0.1" in status.stdout
    finally:
        if served is not None:
            served.stop()
        subprocess.run([*base_command, "stop"], capture_output=True, timeout=60)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ------------------------------------------------------------------------------- logrotate

LOGROTATE = shutil.which("logrotate", path=SYSTEM_PATH)


@needs_root  # the shipped file creates the new log as root:adm, which only root can do
@pytest.mark.skipif(LOGROTATE is None, reason="logrotate is not installed (Debian package logrotate)")
def test_logrotate_under_a_running_listen_server_and_inetd_sessions(env: Pop3Env) -> None:
    """The shipped logrotate file, pointed at this test's log and pidfile: the standalone
    server's sessions write the new file after the rotation (its SIGHUP), and so does an
    inetd-style session (it opens the log when it starts)."""
    pidfile = env.base / "pop3d.pid"
    rotate_conf = env.base / "logrotate.conf"
    rotate_conf.write_text(
        (ROOT / "logrotate" / "pop3d")
        .read_text()
        .replace("/var/log/pop3d.log", str(env.log))
        .replace("/run/pop3d.pid", str(pidfile))
    )
    env.write_spool(mbox_bytes([b"Subject: hi\n\nhello\n"]))
    served = listen(env, "--pidfile", str(pidfile))
    try:
        assert wait_for(pidfile.exists)
        client = poplib.POP3("127.0.0.1", served.port, timeout=IO_TIMEOUT)
        client.user("alice")
        client.pass_(PASSWORD)
        client.quit()
        assert wait_for(lambda: "login: user=alice" in env.log_text())
        done = subprocess.run(
            [LOGROTATE, "-f", "-s", str(env.base / "logrotate.state"), str(rotate_conf)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        rotated = env.base / "pop3d.log.1"
        assert "login: user=alice" in rotated.read_text()
        new = env.log.stat()
        assert (new.st_uid, new.st_gid, new.st_mode & 0o777) == (0, grp.getgrnam("adm").gr_gid, 0o640)
        # The server got SIGHUP and reopened the file: a session forked from now on logs there.
        assert wait_for(lambda: greets(served.port) and "disconnected before login" in env.log_text())
        client = poplib.POP3("127.0.0.1", served.port, timeout=IO_TIMEOUT)
        client.user("alice")
        client.pass_(PASSWORD)
        client.quit()
        assert wait_for(lambda: "login: user=alice" in env.log_text())
        inetd_session = env.client()
        inetd_session.quit()
        assert wait_for(lambda: env.log_text().count("disconnected before login") >= 2)
        assert rotated.read_text().count("login: user=alice") == 1
    finally:
        served.stop()


# ------------------------------------------------------ the package itself (opt-in: CI)

needs_deb_tests = pytest.mark.skipif(
    not DEB_TESTS,
    reason="builds and installs the .deb: opt-in with POP3D_DEB_TESTS=1 (.ci/run sets it; the "
    "install test changes /etc/inetd.conf, /etc/pop3d.conf and /etc/pam.d/pop3d for seconds)",
)


def run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=SYSTEM_PATH, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
    kwargs.setdefault("timeout", 600)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """dpkg-buildpackage -us -uc -b on a copy of the tree as a clean clone has it (tracked and
    new files, nothing that .gitignore leaves out): the directory holding pop3d_*.deb."""
    if not DEB_TESTS:
        pytest.skip("opt-in: POP3D_DEB_TESTS=1")
    for tool in ("dpkg-buildpackage", "dh", "git"):
        if not shutil.which(tool, path=SYSTEM_PATH):
            pytest.skip(f"{tool} is not installed (.ci/run installs debhelper, dh-python, dpkg-dev)")
    out = tmp_path_factory.mktemp("deb")
    source = out / f"pop3d-{__version__}"
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    done = run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=str(source))
    (out / "build.log").write_text(done.stdout + done.stderr)
    return out


def deb(built: Path) -> Path:
    (package,) = built.glob("pop3d_*_*.deb")
    return package


def package_files(built: Path) -> dict[str, str]:
    """path -> mode string of every entry in the .deb's data."""
    listing = run("dpkg-deb", "-c", str(deb(built))).stdout
    return {line.split()[5].removeprefix("."): line.split()[0] for line in listing.splitlines()}


def package_text(built: Path, path: str) -> str:
    data = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb(built))], capture_output=True, check=True, timeout=60
    ).stdout
    done = subprocess.run(["tar", "-xO", "." + path], input=data, capture_output=True, check=True, timeout=60)
    return done.stdout.decode()


@needs_deb_tests
def test_lintian_finds_nothing(built: Path) -> None:
    """No error, warning, info or pedantic tag left; each override says why (pop3d.lintian-overrides)."""
    if not shutil.which("lintian", path=SYSTEM_PATH):
        pytest.skip("lintian is not installed")
    done = subprocess.run(
        ["lintian", "-EvIL", "+pedantic", "--show-overrides", "--tag-display-limit", "0", str(deb(built))],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PATH=SYSTEM_PATH),
    )
    (built / "lintian.txt").write_text(done.stdout)
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EWIP]: ", line)]
    assert done.returncode == 0 and tags == [], done.stdout + done.stderr


@needs_deb_tests
def test_package_fields_are_a_pop3_server_on_debians_packages(built: Path) -> None:
    def field(name: str) -> set[str]:
        value = run("dpkg-deb", "-f", str(deb(built)), name).stdout
        return {part.split()[0] for part in value.replace("|", ",").split(",") if part.strip()}

    assert {"pop3-server"} <= field("Provides") and {"pop3-server"} <= field("Conflicts")
    assert "mailutils-pop3d" in field("Replaces")
    depends = field("Depends")
    assert {"python3-passlib", "python3-bcrypt", "python3-daemon", "libpam0g", "libcrypt1"} <= depends
    assert {"update-inetd", "adduser", "openbsd-inetd", "inet-superserver"} <= depends
    assert not {"python3-libpass", "libpass"} & depends
    assert (
        run("dpkg-deb", "-f", str(deb(built)), "Architecture").stdout.strip()
        == run("dpkg", "--print-architecture").stdout.strip()
    )


@needs_deb_tests
def test_package_installs_what_pip_installs_from_the_same_files(built: Path) -> None:
    """setup.cfg's data files are in the package under /usr/share, the same bytes but for the
    command's path; the units, xinetd services, PAM file, fail2ban and logrotate files in /etc
    and /lib come from the same tree files; the C accelerator is built for this architecture."""
    setupcfg = pytest.importorskip("setuptools.config.setupcfg")
    files = package_files(built)
    data_files = setupcfg.read_configuration(str(ROOT / "setup.cfg"))["options"]["data_files"]

    def packaged(text: str) -> str:
        return text.replace("/usr/local/bin/pop3d", "/usr/sbin/pop3d")

    for directory, paths in data_files:
        for path in paths:
            target = f"/usr/{directory}/{Path(path).name}"
            if target.startswith("/usr/share/man/"):
                assert target + ".gz" in files, target
            else:
                assert package_text(built, target) == packaged((ROOT / path).read_text()), target
    for unit in (ROOT / "systemd").iterdir():
        assert package_text(built, f"/lib/systemd/system/{unit.name}") == packaged(unit.read_text())
    for service in (ROOT / "xinetd").iterdir():
        shipped = package_text(built, f"/etc/xinetd.d/{service.name}")
        assert re.search(r"^\s*disable\s*=\s*yes$", shipped, re.MULTILINE), service.name
        assert shipped == re.sub(r"(?m)^(\s*disable\s*=\s*)no$", r"\1yes", packaged(service.read_text()))
    for tree, installed in (
        ("pam.d/pop3d", "/etc/pam.d/pop3d"),
        ("fail2ban/filter.d/pop3d.conf", "/etc/fail2ban/filter.d/pop3d.conf"),
        ("fail2ban/jail.d/pop3d.conf", "/etc/fail2ban/jail.d/pop3d.conf"),
        ("logrotate/pop3d", "/etc/logrotate.d/pop3d"),
    ):
        assert package_text(built, installed) == (ROOT / tree).read_text(), installed
    assert package_text(built, "/etc/pop3d.conf") == render_conffile()
    for command in ("/usr/sbin/pop3d", "/usr/sbin/pop3d-passwd"):
        assert files[command].startswith("-rwxr-xr-x")
    assert package_text(built, "/usr/sbin/pop3d").startswith("#!/usr/bin/python3 -I\n")
    multiarch = run("dpkg-architecture", "-qDEB_HOST_MULTIARCH").stdout.strip()
    assert any(
        re.fullmatch(rf"/usr/lib/python3/dist-packages/pop3d/_speedups\.cpython-3\d+-{multiarch}\.so", f)
        for f in files
    )
    assert not [f for f in files if "/usr/local" in f or f.endswith("requires.txt")]


@needs_deb_tests
def test_package_overwrites_no_other_packages_file(built: Path) -> None:
    """No file of the package belongs to an installed package, and of mailutils-pop3d's (the
    other pop3d, which .ci/run downloads), only those the package declares it Replaces."""
    for path, mode in package_files(built).items():
        if mode.startswith("d") or path == "/":
            continue
        owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, timeout=60)
        assert owner.returncode != 0 or owner.stdout.startswith("pop3d:"), owner.stdout
    others = sorted(Path("/opt/pop3d-ci/debs").glob("mailutils-pop3d_*.deb"))
    if not others:
        pytest.skip("mailutils-pop3d's .deb is not in /opt/pop3d-ci/debs (.ci/run downloads it)")
    theirs = {
        line.split()[5].removeprefix(".")
        for line in run("dpkg-deb", "-c", str(others[-1])).stdout.splitlines()
    }
    ours = {path for path, mode in package_files(built).items() if not mode.startswith("d")}
    assert ours & theirs == {"/usr/sbin/pop3d", "/usr/share/man/man8/pop3d.8.gz"}


INETD = shutil.which("inetd", path=SYSTEM_PATH)
INETD_CONF = Path("/etc/inetd.conf")
# A line popa3d's prerm leaves behind when apt removes it for pop3d (they conflict): disabled,
# naming a program that is gone. update-inetd --add would enable it instead of adding pop3d's.
POPA3D_LEFTOVER = "#<off># pop3\tstream\ttcp\tnowait\troot\t/usr/sbin/tcpd\t/usr/sbin/popa3d\n"


def dpkg_state(package: str) -> str:
    """dpkg's status abbreviation ("ii ", "rc "), or "" when dpkg knows nothing of it."""
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", package], capture_output=True, text=True, timeout=60
    )
    return done.stdout if done.returncode == 0 and not done.stdout.startswith("un") else ""


def shipped_inetd_entries() -> list[str]:
    """The tree's inetd/pop3d.conf lines, as the package registers them."""
    return [
        line.replace("/usr/local/bin/pop3d", "/usr/sbin/pop3d")
        for line in (ROOT / "inetd" / "pop3d.conf").read_text().splitlines()
        if line and not line.startswith("#")
    ]


def private_inetd(base: Path, line: str, extra: str = ""):
    """openbsd-inetd with one line of the host's /etc/inetd.conf, on a loopback high port."""
    conf = base / f"inetd-{secrets.token_hex(3)}.conf"

    def command(port: int) -> list[str]:
        fields = line.split("\t")
        conf.write_text("\t".join([f"127.0.0.1:{port}", *fields[1:]]) + extra + "\n")
        return [INETD, "-d", str(conf)]

    return launch(command, base / "inetd.out")


def pop_round(port: int, user: str, password: str, spool: Path, messages: list[bytes]) -> None:
    """Log in, retrieve the first message, delete it, quit: the spool keeps the rest."""
    client = poplib.POP3("127.0.0.1", port, timeout=IO_TIMEOUT)
    client.user(user)
    client.pass_(password)
    assert client.stat()[0] == len(messages)
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == messages[0].replace(b"\n", b"\r\n")
    client.dele(1)
    client.quit()
    assert wait_for(lambda: spool.read_bytes() == mbox_bytes(messages[1:]))


def leftovers() -> list[str]:
    """Files named pop3d* (not solid-pop3d, dovecot-pop3d...) where a package, its maintainer
    scripts or their helpers put them."""
    patterns = [
        "/etc/pop3d*", "/etc/*/pop3d*", "/etc/*/*/pop3d*", "/etc/systemd/system/*/pop3d*",
        "/lib/systemd/system/pop3d*", "/usr/sbin/pop3d*", "/usr/share/doc/pop3d", "/usr/share/man/*/pop3d*",
        "/usr/lib/python3/dist-packages/pop3d*", "/var/lib/dpkg/info/pop3d.*", "/var/log/pop3d*",
        "/var/cache/pop3d", "/var/lib/pop3d", "/var/lib/systemd/deb-systemd-helper-*/pop3d*",
    ]  # fmt: skip
    return sorted(str(path) for pattern in patterns for path in Path("/").glob(pattern.lstrip("/")))


@needs_deb_tests
@needs_root
@pytest.mark.skipif(
    INETD is None or not INETD_CONF.exists(), reason="openbsd-inetd is not installed (.ci/run installs it)"
)
def test_apt_install_serve_through_inetd_remove_purge(built: Path, tmp_path: Path) -> None:
    """The whole life of the package on this machine, restored afterwards exactly as it was."""
    if dpkg_state("pop3d"):
        pytest.skip("a pop3d package is already known to dpkg here: not touching it")
    # /var/cache/pop3d (index_dir's default) may be there from pop3d run as root by other tests:
    # a cache, which the purge removes (and pop3d makes again).
    blocking = [path for path in leftovers() if path != "/var/cache/pop3d"]
    if blocking or any(Path(p).exists() for p in ("/etc/pop3d.conf", "/etc/pam.d/pop3d")):
        pytest.skip(f"pop3d files are already on this host (a pip install?): {blocking}")
    try:
        pwd.getpwnam(ACCOUNT)
        pytest.skip(f"the account {ACCOUNT} already exists here")
    except KeyError:
        pass
    # Another pop3-server (dovecot-pop3d for scripts/bench, say): apt replaces it (Conflicts:
    # pop3-server), and it is installed again at the end, manual or automatic as it was.
    listing = run("dpkg-query", "-W", "-f", "${Package}|${Provides}|${db:Status-Abbrev}\\n").stdout
    replaced = [
        fields[0]
        for fields in (line.split("|") for line in listing.splitlines())
        if "pop3-server" in fields[1] and fields[2] == "ii " and fields[0] != "pop3d"
    ]
    manual = set(run("apt-mark", "showmanual").stdout.split())

    inetd_before = INETD_CONF.read_bytes()
    user = f"pop3deb{secrets.token_hex(3)}"
    spool = Path("/var/mail") / user
    # The htpasswd user's spool directory: reachable by its mail_user (pytest's are mode 700).
    virtual = Path(tempfile.mkdtemp(prefix="pop3d-deb-")) / "virtual"
    virtual.parent.chmod(0o755)
    transcript = []

    def step(*argv: str) -> str:
        done = run(*argv)
        transcript.append(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    try:
        if not Path("/usr/sbin/popa3d").exists():
            INETD_CONF.write_bytes(inetd_before + POPA3D_LEFTOVER.encode())
        step("apt-get", "install", "-y", "--no-install-recommends", str(deb(built)))
        assert dpkg_state("pop3d") == "ii "

        # inetd: pop3 enabled, pop3s disabled (no certificate yet), popa3d's dead line gone.
        pop3, pop3s = shipped_inetd_entries()
        lines = INETD_CONF.read_text().splitlines()
        assert pop3 in lines and f"#<off># {pop3s}" in lines
        assert not [line for line in lines if "popa3d" in line]
        assert len([line for line in lines if "pop3d" in line]) == 2

        account = pwd.getpwnam(ACCOUNT)
        assert account.pw_uid < 1000 and account.pw_shell == "/usr/sbin/nologin"
        assert account.pw_dir == "/nonexistent" and not Path("/nonexistent").exists()
        assert grp.getgrgid(account.pw_gid).gr_name == ACCOUNT
        assert config.load([]).preauth_user == ACCOUNT  # /etc/pop3d.conf, read when no -c
        accelerated = run("/usr/bin/python3", "-I", "-c", "from pop3d import bulk; print(bulk.ACCELERATED)")
        assert accelerated.stdout.strip() == "True"

        # A PAM system account through openbsd-inetd, with the installed line, files and /etc/pam.d/pop3d.
        subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", user], check=True)
        password = f"Pw {secrets.token_hex(6)}!"
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
        entry = pwd.getpwnam(user)
        messages = [b"From: a@example.org\nSubject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"]
        spool.write_bytes(mbox_bytes(messages))
        spool.chmod(0o600)
        os.chown(spool, entry.pw_uid, grp.getgrnam("mail").gr_gid)
        installed_line = next(
            line for line in INETD_CONF.read_text().splitlines() if line.startswith("pop3\t")
        )
        served = private_inetd(tmp_path, installed_line)
        try:
            # Before login, the dialogue runs in a child as the package's account.
            with socket.create_connection(("127.0.0.1", served.port), timeout=IO_TIMEOUT) as sock:
                assert sock.recv(100).startswith(b"+OK")
                # (once the start-up probe's session has gone: ours is then inetd's only child)
                pairs = lambda: [(p, children(p)) for p in children(served.proc.pid)]  # noqa: E731
                assert wait_for(lambda: len(pairs()) == 1 and len(pairs()[0][1]) == 1), pairs()
                ((_, (preauth,)),) = pairs()
                assert proc_status(preauth)["Uid"].split() == [str(account.pw_uid)] * 4
            pop_round(served.port, user, password, spool, messages)
        finally:
            served.stop()

        # An htpasswd user, its password set with the installed pop3d-passwd.
        virtual.mkdir()
        os.chown(virtual, entry.pw_uid, entry.pw_gid)
        htpasswd = tmp_path / "htpasswd"
        run("/usr/sbin/pop3d-passwd", "-c", "-i", str(htpasswd), "bob", input="bob's secret\n")
        (virtual / "bob").write_bytes(mbox_bytes(messages))
        os.chown(virtual / "bob", entry.pw_uid, entry.pw_gid)
        (virtual / "bob").chmod(0o600)
        served = private_inetd(
            tmp_path,
            installed_line,
            f" --auth htpasswd --htpasswd {htpasswd} --mail-user {user} --mailbox {virtual}/%u",
        )
        try:
            pop_round(served.port, "bob", "bob's secret", virtual / "bob", messages)
        finally:
            served.stop()

        # An upgrade (here: the same version again) keeps a local change and adds nothing twice.
        with open("/etc/pop3d.conf", "a") as f:
            f.write("# a local change\n")
        step("dpkg", "-i", str(deb(built)))
        assert Path("/etc/pop3d.conf").read_text().endswith("# a local change\n")
        assert len([line for line in INETD_CONF.read_text().splitlines() if "pop3d" in line]) == 2
        assert pwd.getpwnam(ACCOUNT).pw_uid == account.pw_uid

        # remove: inetd no longer starts pop3d (its lines disabled); configuration and account stay.
        step("apt-get", "remove", "-y", "pop3d")
        assert dpkg_state("pop3d") == "rc "
        assert not Path("/usr/sbin/pop3d").exists()
        lines = INETD_CONF.read_text().splitlines()
        assert f"#<off># {pop3}" in lines and f"#<off># {pop3s}" in lines
        assert not [line for line in lines if "pop3d" in line and not line.startswith("#<off># ")]
        assert Path("/etc/pop3d.conf").read_text().endswith("# a local change\n")

        # purge: nothing of pop3d is left.
        step("apt-get", "purge", "-y", "pop3d")
        assert dpkg_state("pop3d") == ""
        assert INETD_CONF.read_bytes() == inetd_before
        for name, lookup in ((ACCOUNT, pwd.getpwnam), (ACCOUNT, grp.getgrnam)):
            with pytest.raises(KeyError):
                lookup(name)
        assert leftovers() == []
    finally:
        (built / "transcript.txt").write_text("\n".join(transcript))
        if dpkg_state("pop3d"):
            subprocess.run(["apt-get", "purge", "-y", "pop3d"], capture_output=True, timeout=600)
        INETD_CONF.write_bytes(inetd_before)
        if replaced:
            run("apt-get", "install", "-y", "--no-install-recommends", *replaced)
            if set(replaced) - manual:
                run("apt-mark", "auto", *(set(replaced) - manual))
        subprocess.run(["userdel", user], capture_output=True, timeout=60)
        spool.unlink(missing_ok=True)
        shutil.rmtree(virtual.parent, ignore_errors=True)
