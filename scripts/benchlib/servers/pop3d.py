"""pop3d, the server measured: which one (this checkout, a --venv, a --pop3d launcher), how it starts.

By default it is this checkout, started as the installed command starts it (`python -I`), under
the inetd-style launcher (tcpserver or socat), else with its own --listen.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchlib.servers.accounts import PASSWORD
from benchlib.servers.base import CLEAN_ENV, Server, free_port, inetd_command

ROOT = Path(__file__).resolve().parents[3]  # the checkout this benchmark belongs to


@dataclass
class Pop3dCommand:
    command: list[str]  # argv that starts pop3d (before its -c CONFIG)
    env: dict[str, str]
    python: str  # the interpreter it runs on: the floor uses it too
    note: str  # where pop3d is imported from, bytecode, C accelerator


def bcrypt_hash(found: Pop3dCommand) -> str:
    """The benchmark password, hashed as pop3d-passwd does by default (with pop3d's own code)."""
    code = "import sys; from pop3d import auth; print(auth.hash_password(sys.argv[1], 'bcrypt'))"
    return subprocess.run(
        [found.python, "-c", code, PASSWORD], env=found.env, capture_output=True, text=True, check=True
    ).stdout.strip()


def pop3d_command(args: argparse.Namespace) -> Pop3dCommand:
    """How to start pop3d (launcher, environment, interpreter) and a note on its bytecode."""
    env = dict(CLEAN_ENV)
    if args.venv:
        venv = Path(args.venv)
        if not (venv / "bin" / "pop3d").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True)
        launcher = str(venv / "bin" / "pop3d")
    elif args.pop3d:
        launcher = args.pop3d
    else:
        launcher = ""
    if launcher and not launcher.endswith(" -m pop3d"):
        with open(launcher, "rb") as f:
            shebang = f.readline().decode().strip()[2:].split()
        python = shebang[0]
        command = [launcher]
    elif launcher:
        python = sys.executable
        command = [python, "-m", "pop3d"]
        env["PYTHONPATH"] = str(ROOT)
    else:
        # What the installed command (scripts/pop3d) runs, started as the floor is (`python -I
        # -c`), importing this checkout. Not `python -m pop3d`: runpy's imports (~3.5 ms before
        # the greeting) are paid by no deployment.
        python = sys.executable
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pop3d.cli import main; sys.exit(main())"
        command = [python, "-I", "-c", code]
        env["PYTHONPATH"] = str(ROOT)  # for the bytecode probe below only (-I ignores it)
    probe = subprocess.run(
        [
            python,
            "-c",
            "import pop3d, importlib.util as u, os; p = pop3d.__file__; "
            "from pop3d import bulk; "
            "print(os.path.exists(u.cache_from_source(p)), os.path.dirname(p), bulk.ACCELERATED)",
        ],
        env=env,
        cwd="/",  # not this checkout: the probe must import what the launcher imports
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    note = (
        f"pop3d from {probe[1]}: bytecode {'present' if probe[0] == 'True' else 'ABSENT'}; "
        f"C accelerator {'in use' if probe[2] == 'True' else 'NOT BUILT (pure Python)'}; "
        + interpreter_note(python, env)
    )
    return Pop3dCommand(command, env, python, note)


def interpreter_note(python: str, env: dict[str, str]) -> str:
    """The interpreter, and how many modules it has imported before running any code.

    Every inetd-style session pays the interpreter's start. A bare CPython 3.11 has ~35 modules
    then; a site-packages `.pth` file that imports something (certifi, a distutils shim...) adds
    its imports to every session (measured: 8 -> 27 ms of CPU), and to the floor too.
    """
    code = "import sys; print(len(sys.modules), sys.version.split()[0])"
    out = subprocess.run([python, "-I", "-c", code], env=env, capture_output=True, text=True, check=True)
    count, version = out.stdout.split()
    warn = " (site imports modules at start: .pth files?)" if int(count) > 60 else ""
    return f"Python {version} ({python}), {count} modules at start{warn}"


class Pop3d(Server):
    """pop3d with an htpasswd user (and `extra` settings), a fresh process per connection."""

    name = "pop3d"

    def __init__(
        self,
        tool: str,
        command: list[str],
        env: dict[str, str],
        workdir: Path,
        owner: pwd.struct_passwd | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir / "pop3d"
        (self.dir / "spool").mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        os.chmod(self.dir / "spool", 0o775)
        if owner is not None and os.geteuid() == 0:
            os.chown(self.dir / "spool", owner.pw_uid, owner.pw_gid)
        self.conf = self.dir / "pop3d.conf"
        settings = {
            "auth": "htpasswd",
            "htpasswd": str(self.dir / "htpasswd"),
            "mailbox": f"{self.dir}/spool/%u",
            "log": str(self.dir / "pop3d.log"),
            "auth_failure_delay": "0",
            # No index: the other phases measure the scan; the polling phase runs a pop3d with one.
            "index_dir": "",
        }
        if os.geteuid() == 0 and owner is not None:
            settings["mail_user"] = owner.pw_name
        settings.update(extra or {})
        self.mailbox = settings["mailbox"]
        self.conf.write_text("[pop3d]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        if not (self.dir / "pop3d.log").exists():
            (self.dir / "pop3d.log").touch()
        if owner is not None and os.geteuid() == 0:
            os.chown(self.dir / "pop3d.log", owner.pw_uid, owner.pw_gid)
        self.index_dir = settings["index_dir"]
        self.command = [*command, "-c", str(self.conf)]
        self.env = env
        self.tool = tool
        self.port = free_port()
        if tool:
            self._spawn(inetd_command(tool, self.port, self.command), env)
        else:  # pop3d's own listener: still a fresh (forked) process per connection
            self._spawn([*self.command, "--listen", f"127.0.0.1:{self.port}"], env)

    def forget(self) -> None:
        """Drop the index of the previous spool (a fresh copy has a new inode: it would not be
        used anyway; this makes a first poll a first poll)."""
        if self.index_dir and os.path.isdir(self.index_dir):
            shutil.rmtree(self.index_dir)

    def set_password(self, hashed: str, users: list[str] | None = None) -> None:
        """The htpasswd file: `hashed` for the test user (or for each of `users`)."""
        self.hashed = hashed
        (self.dir / "htpasswd").write_text("".join(f"{u}:{hashed}\n" for u in users or [self.user]))
        os.chmod(self.dir / "htpasswd", 0o644)

    def spool_path(self) -> Path:
        return self.spool_for(self.user)

    def spool_for(self, user: str) -> Path:
        return Path(self.mailbox.replace("%u", user))


def pam_pop3d(
    pop3d: Pop3d,
    workdir: Path,
    owner: pwd.struct_passwd,
    tool: str | None = None,
    extra: dict[str, str] | None = None,
    name: str = "system",
) -> Pop3d:
    """Another pop3d like `pop3d`, with auth = system: the system test account's /var/mail spool and
    password (PAM), as popa3d serves it. `tool=""`: its own --listen instead of pop3d's launcher;
    `extra` settings; `name`: its directory in workdir (one per configuration)."""
    settings = {"auth": "system", "mailbox": "/var/mail/%u", "first_uid": str(min(owner.pw_uid, 1000))}
    settings.update(extra or {})
    tool = pop3d.tool if tool is None else tool
    where = workdir / (name if tool == pop3d.tool else f"{name}-listen")
    return Pop3d(tool, pop3d.command[:-2], pop3d.env, where, None, settings)


def hash_prefix(hashed: str) -> str:
    """A password hash's scheme, as the tables name it: "$2b$", "$y$", "{SHA}"."""
    return "$" + hashed.split("$")[1] + "$" if hashed.startswith("$") else hashed[:5]
