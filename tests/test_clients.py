"""Real mail clients through a real launcher (openbsd-inetd with the shipped line; the standalone
server where inetd cannot run): fetchmail, getmail6, mpop, neomutt, curl and poplib each retrieve
a known mailbox, and every message arrives byte-identical (in the client's line-end convention:
the Unix clients store LF). Deleting through a client leaves exactly the other messages."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, PASSWORD, ROOT, Pop3Env, child_env, mbox_bytes, wait_for
from serving import Launched, curl_round, inetd_conf_line, launch, poplib_round, write_launcher

INETD = shutil.which("inetd") or ("/usr/sbin/inetd" if os.access("/usr/sbin/inetd", os.X_OK) else None)


def known_mailbox() -> list[bytes]:
    """Messages that exercise what clients trip over: dot lines, `From ` in bodies, a stored
    CRLF message, trailing blank lines, a long one."""
    return [
        b"From: a@example.org\nTo: alice@example.org\nSubject: one\nMessage-ID: <1@x>\n\n"
        b"Hello.\n.leading dot\n..two dots\n.\n",
        b"From: b@example.org\nSubject: two\nMessage-ID: <2@x>\n\n>From quoted by the MDA\n"
        b"From unquoted (not after a blank line)\n",
        b"From: c@example.org\r\nSubject: three\r\nMessage-ID: <3@x>\r\n\r\nstored with CRLF\r\n",
        b"From: d@example.org\nSubject: four\nMessage-ID: <4@x>\n\nbody\n\n\n",
        b"From: e@example.org\nSubject: five\nMessage-ID: <5@x>\n\n"
        + b"".join(b"line %05d of a longer message\n" % i for i in range(3000)),
    ]


def unix_form(message: bytes) -> bytes:
    """The message as a Unix client stores it: LF line ends, a final LF."""
    out = message.replace(b"\r\n", b"\n")
    return out if out.endswith(b"\n") else out + b"\n"


def split_mbox(data: bytes, fmt: str) -> list[bytes]:
    """The messages of an mbox a client wrote: From_ lines at the start or after a blank line,
    one separator blank line dropped, mboxrd `>From` unquoted."""
    starts = [0] if data.startswith(b"From ") else []
    position = 0
    while (found := data.find(b"\n\nFrom ", position)) >= 0:
        starts.append(found + 2)
        position = found + 1
    messages = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        chunk = data[start:end]
        body = chunk[chunk.index(b"\n") + 1 :]
        assert body.endswith(b"\n\n")
        body = body[:-1]
        if fmt == "mboxrd":
            lines = body.split(b"\n")
            body = b"\n".join(
                line[1:] if line.startswith(b">") and line.lstrip(b">").startswith(b"From ") else line
                for line in lines
            )
        messages.append(body)
    return messages


@pytest.fixture
def served(env: Pop3Env):
    """pop3d behind openbsd-inetd (the shipped line), or the standalone server without it."""
    if IS_ROOT and INETD:
        launcher = write_launcher(env.base)
        conf = env.base / "inetd.conf"

        def command(port: int) -> list[str]:
            conf.write_text(inetd_conf_line("pop3", port, launcher, env.conf))
            return [INETD, "-d", str(conf)]

        launched = launch(command, env.base / "inetd.out")
    else:
        launched = launch(
            lambda port: [*env.command("--listen", f"127.0.0.1:{port}")],
            env.base / "server.out",
            cwd=str(ROOT),
            env=child_env(),
        )
    yield launched
    launched.stop()


def own_for_client(path: Path) -> None:
    """Files a client run as `nobody` (getmail refuses to deliver as root) must write."""
    if IS_ROOT:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


# ------------------------------------------------------------------------------ fetchmail


def run_fetchmail(env: Pop3Env, served: Launched, out: Path, keep: bool) -> None:
    out.mkdir(exist_ok=True)
    home = env.base / "fetchmail-home"
    home.mkdir(exist_ok=True)
    # One file per message, numbered in delivery order (fetchmail delivers one at a time).
    mda = f"/bin/sh -c 'n=$(ls {out} | wc -l); cat > {out}/$n'"
    rc = home / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 service {served.port} protocol pop3 auth password\n"
        f'  user "alice" there with password "{PASSWORD}" is "root" here\n'
        # sslproto '': no opportunistic STLS (this pop3d offers none); fetchall: also what a
        # previous run saw; no rewrite: addresses untouched.
        f"  options {'keep' if keep else 'no keep'} fetchall no rewrite sslproto ''\n"
        f'  mda "{mda}"\n'
    )
    rc.chmod(0o600)
    done = subprocess.run(
        ["fetchmail", "-f", str(rc), "--invisible", "--nodetach", "--idfile", str(home / "ids"),
         "--pidfile", str(home / "pid")],
        env=dict(os.environ, HOME=str(home)),
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not shutil.which("fetchmail"), reason="fetchmail is not installed (Debian fetchmail)")
def test_fetchmail_keep_then_delete(env: Pop3Env, served: Launched, tmp_path: Path) -> None:
    messages = known_mailbox()
    spool = env.write_spool(mbox_bytes(messages))
    run_fetchmail(env, served, tmp_path / "kept", keep=True)
    got = [(tmp_path / "kept" / str(i)).read_bytes() for i in range(len(messages))]
    # --invisible: no Received: header; the MDA gets the message as sent, in LF form.
    assert got == [unix_form(m) for m in messages]
    assert spool.read_bytes() == mbox_bytes(messages)
    run_fetchmail(env, served, tmp_path / "taken", keep=False)
    got = [(tmp_path / "taken" / str(i)).read_bytes() for i in range(len(messages))]
    assert got == [unix_form(m) for m in messages]
    assert wait_for(lambda: spool.read_bytes() == b"")


# ------------------------------------------------------------------------------ getmail6


# getmail6 (6.18) delivers each message in a forked child, installs its SIGCHLD handler only
# after the fork and then waits on a condition that handler notifies: a child that exits first
# (or a notification before the wait), common under load, is never seen and getmail gives up
# after its socket timeout. That race is in its local delivery, not in POP3: this runs the real
# getmail with only its wait for the delivery child replaced by a plain waitpid.
GETMAIL = """
import os, runpy, shutil, sys
from getmailcore import baseclasses, exceptions

def wait_for_child(self, pid):
    status = os.waitpid(pid, 0)[1]
    if not os.WIFEXITED(status):
        raise exceptions.getmailOperationError(f"child pid {pid} ended with status {status}")
    return os.WEXITSTATUS(status)

baseclasses.ForkingBase._prepare_child = lambda self: None
baseclasses.ForkingBase._wait_for_child = wait_for_child
sys.argv[0] = "getmail"
runpy.run_path(shutil.which("getmail"), run_name="__main__")
"""


def run_getmail(served: Launched, directory: Path, delete: bool) -> Path:
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    mbox = directory / "inbox.mbox"
    mbox.touch()
    rc = directory / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
        f"port = {served.port}\nusername = alice\npassword = {PASSWORD}\ntimeout = 20\n\n"
        f"[destination]\ntype = Mboxrd\npath = {mbox}\n"
        f"\n[options]\nread_all = true\ndelete = {str(delete).lower()}\n"
        "delivered_to = false\nreceived = false\nverbose = 0\n"
    )
    for path in (directory, mbox, rc):
        own_for_client(path)
    # getmail refuses to write an mbox as root: run it as that user, as a user would.
    done = subprocess.run(
        ["/usr/bin/python3", "-c", GETMAIL, "--getmaildir", str(directory), "--rcfile", str(rc)],
        capture_output=True,
        timeout=120,
        env={**child_env(), "HOME": str(directory)},
        **({"user": "nobody", "group": "nogroup", "extra_groups": []} if IS_ROOT else {}),  # type: ignore[arg-type]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return mbox


@pytest.mark.skipif(not shutil.which("getmail"), reason="getmail6 is not installed (Debian getmail6)")
def test_getmail6_mboxrd_keep_then_delete(env: Pop3Env, served: Launched) -> None:
    messages = known_mailbox()
    spool = env.write_spool(mbox_bytes(messages))
    for delete, name in ((False, "kept"), (True, "taken")):
        # Under env.base (mode 755): getmail delivers as nobody, who cannot enter pytest's tmp_path.
        mbox = run_getmail(served, env.base / f"getmail-{name}", delete)
        got = split_mbox(mbox.read_bytes(), "mboxrd")
        # getmail always puts a Return-Path: header first (the envelope sender, unknown here).
        for message in got:
            assert message.startswith(b"Return-Path: <unknown>\n")
        assert [m.split(b"\n", 1)[1] for m in got] == [unix_form(m) for m in messages]
        expected = b"" if delete else mbox_bytes(messages)
        assert wait_for(lambda expected=expected: spool.read_bytes() == expected)


# ------------------------------------------------------------------------------ mpop


@pytest.mark.skipif(not shutil.which("mpop"), reason="mpop is not installed (Debian mpop)")
def test_mpop_keep_then_delete(env: Pop3Env, served: Launched, tmp_path: Path) -> None:
    messages = known_mailbox()
    spool = env.write_spool(mbox_bytes(messages))
    rc = tmp_path / "mpoprc"
    rc.write_text(
        f"account default\nhost 127.0.0.1\nport {served.port}\nuser alice\n"
        f"password {PASSWORD}\ntls off\nauth user\n"
        f"delivery mbox {tmp_path / 'inbox.mbox'}\nreceived_header off\n"
        f"uidls_file {tmp_path / 'uidls'}\n"
    )
    rc.chmod(0o600)  # mpop refuses a password in a file others can read

    def mpop(*options: str) -> None:
        done = subprocess.run(
            ["mpop", "-C", str(rc), "--only-new=off", *options], capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr

    mpop("--keep=on")
    got = split_mbox((tmp_path / "inbox.mbox").read_bytes(), "mboxrd")
    assert got == [unix_form(m) for m in messages]
    assert spool.read_bytes() == mbox_bytes(messages)
    (tmp_path / "inbox.mbox").unlink()
    mpop("--keep=off")
    got = split_mbox((tmp_path / "inbox.mbox").read_bytes(), "mboxrd")
    assert got == [unix_form(m) for m in messages]
    assert wait_for(lambda: spool.read_bytes() == b"")


# ------------------------------------------------------------------------------ neomutt


def run_neomutt(rc: Path, url: str, home: Path, timeout: float = 120) -> bytes:
    """neomutt on a pseudo-terminal, driven by the keys its rc file pushes (its -B batch mode
    only sends mail: reading a POP mailbox needs the index screen)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs
        os.environ.update(TERM="vt100", HOME=str(home), LINES="24", COLUMNS="80")
        os.execvp("neomutt", ["neomutt", "-n", "-F", str(rc), "-f", url])
    screen = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        else:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                break
    else:
        os.kill(pid, 9)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(screen[-2000:])
    return bytes(screen)


@pytest.mark.skipif(not shutil.which("neomutt"), reason="neomutt is not installed (Debian neomutt)")
def test_neomutt_reads_pipes_and_deletes(env: Pop3Env, served: Launched, tmp_path: Path) -> None:
    messages = known_mailbox()
    spool = env.write_spool(mbox_bytes(messages))
    out = tmp_path / "piped"
    out.mkdir()
    save = tmp_path / "save.sh"
    save.write_text(f"#!/bin/sh\nn=$(ls {out} | wc -l)\ncat > {out}/$n\n")
    save.chmod(0o755)
    settings = (
        f'set pop_pass="{PASSWORD}"\nset folder="{tmp_path}"\nset header_cache=""\n'
        'set message_cachedir=""\nset ssl_starttls=no\nset ssl_force_tls=no\n'
        "set sort=unsorted\nset wait_key=no\nset quit=yes\nset move=no\nset delete=yes\n"
        # Pipe each message raw (not decoded) to its own process, with nothing in between.
        'set pipe_decode=no\nset pipe_split=yes\nset pipe_sep=""\nset mail_check_stats=no\n'
    )
    url = f"pop://alice@127.0.0.1:{served.port}/"
    rc = tmp_path / "read.rc"
    rc.write_text(settings + f'push "<tag-pattern>~A<enter><tag-prefix><pipe-message>{save}<enter><quit>"\n')
    run_neomutt(rc, url, tmp_path)
    got = [(out / str(i)).read_bytes() for i in range(len(messages))]
    assert got == [unix_form(m) for m in messages]
    assert spool.read_bytes() == mbox_bytes(messages)
    # Delete the first message; neomutt sends DELE and QUIT when it leaves the mailbox.
    rc = tmp_path / "delete.rc"
    rc.write_text(settings + 'push "<first-entry><delete-message><quit>"\n')
    run_neomutt(rc, url, tmp_path)
    assert wait_for(lambda: spool.read_bytes() == mbox_bytes(messages[1:]))


# ------------------------------------------------------------------------------ curl, poplib


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (Debian curl)")
def test_curl(env: Pop3Env, served: Launched) -> None:
    curl_round(env, served.port, known_mailbox())


def test_poplib(env: Pop3Env, served: Launched) -> None:
    poplib_round(env, served.port, known_mailbox())
