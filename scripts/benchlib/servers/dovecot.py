"""Dovecot: a private instance (config, sockets, indexes, spool in the work directory) on loopback.

Its passwd-file has the same bcrypt hash as pop3d's htpasswd. It keeps an index of the mbox (and
may write X-UID/Status headers into it): `forget()` drops the index when the spool is replaced.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
from pathlib import Path

from benchlib.servers.base import PeerSetup, PeerUnavailable, Server, free_port

NAME = "dovecot"


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dovecot", default=shutil.which("dovecot") or "/usr/sbin/dovecot", help="dovecot binary")


def start(setup: PeerSetup) -> Server:
    binary = setup.args.dovecot
    if not (binary and os.path.exists(binary)):
        raise PeerUnavailable("dovecot not found")
    try:
        return Dovecot(binary, setup.workdir, setup.owner, setup.hashed)
    except (RuntimeError, OSError) as e:
        raise PeerUnavailable(f"dovecot did not start: {e}") from e


class Dovecot(Server):
    """A private Dovecot (config, sockets, indexes, spool in the work directory) on loopback."""

    name = NAME
    exact_spool = False  # it may write X-IMAPbase/X-UID/Status headers into the mbox
    indexes = True

    def __init__(
        self,
        binary: str,
        workdir: Path,
        owner: pwd.struct_passwd,
        hashed: str,
        users: list[str] | None = None,
        pam: bool = False,
        subdir: str = "dovecot",
    ) -> None:
        """`users` (default: the test account) share `hashed` in its passwd-file, or, with `pam`,
        are system accounts checked through PAM (the `dovecot` service), as popa3d checks them."""
        d = workdir / subdir
        if d.exists():
            shutil.rmtree(d)
        for sub in ("run", "state", "spool", "mail", "index", "home"):
            (d / sub).mkdir(parents=True)
        os.chmod(d, 0o755)
        for sub in ("spool", "mail", "index", "home"):
            os.chown(d / sub, owner.pw_uid, owner.pw_gid)
            os.chmod(d / sub, 0o755)
        self.dir = d
        self.port = free_port()
        (d / "passwd").write_text("".join(f"{u}:{{CRYPT}}{hashed}\n" for u in users or [self.user]))
        passdb = "driver = pam" if pam else f"driver = passwd-file\n  args = scheme=CRYPT {d}/passwd"
        (d / "dovecot.conf").write_text(
            f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = {owner.pw_uid}
mail_location = mbox:{d}/mail/%u:INBOX={d}/spool/%u:INDEX={d}/index/%u
pop3_uidl_format = %08Xu%08Xv
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  {passdb}
}}
userdb {{
  driver = static
  args = uid={owner.pw_uid} gid={owner.pw_gid} home={d}/home/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""
        )
        self._spawn([binary, "-F", "-c", str(d / "dovecot.conf")])

    def spool_path(self) -> Path:
        return self.dir / "spool" / self.user

    def forget(self) -> None:
        # The spool is replaced by a copy between sessions, with an older mtime: Dovecot could
        # trust its index of the previous file. Start it afresh, as for a new mailbox.
        index = self.dir / "index" / self.user
        if index.exists():
            shutil.rmtree(index)

    def busy(self) -> bool:
        return self.session_pid() is not None

    def session_pid(self) -> int | None:
        """Dovecot serves a logged-in session in a `pop3` process running as the user."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "pop3":
                    found.append((os.stat(f"/proc/{entry}").st_mtime, int(entry)))
            except OSError:
                continue
        return max(found)[1] if found else None
