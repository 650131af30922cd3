"""popa3d (Openwall, C): inetd style, the system account's /var/mail spool, its password via PAM.

Debian's package conflicts with dovecot-pop3d: `apt-get download popa3d && dpkg -x` it into a
scratch directory and pass the binary with --popa3d.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
from pathlib import Path

from benchlib.servers.accounts import add_system_account
from benchlib.servers.base import PeerSetup, PeerUnavailable, Server, free_port, inetd_command

NAME = "popa3d"


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--popa3d", default=shutil.which("popa3d"), help="popa3d binary (default: on PATH)")


def start(setup: PeerSetup) -> Server:
    binary = setup.args.popa3d
    if not (binary and os.path.exists(binary)):
        raise PeerUnavailable("popa3d not found (--popa3d)")
    prepare_popa3d()
    try:
        return Popa3d(setup.tool, binary)
    except (RuntimeError, OSError) as e:
        raise PeerUnavailable(f"popa3d did not start: {e}") from e


class Popa3d(Server):
    """popa3d from inetd's seat: the system account's /var/mail spool and shadow password (PAM)."""

    name = NAME

    def __init__(self, tool: str, binary: str) -> None:
        self.port = free_port()
        self._spawn(inetd_command(tool, self.port, [binary]))

    def spool_path(self) -> Path:
        return Path("/var/mail") / self.user


def prepare_popa3d() -> None:
    """popa3d drops to its own account in an empty chroot before it reads a command."""
    try:
        pwd.getpwnam("popa3d")
    except KeyError:
        add_system_account("popa3d", "/var/lib/popa3d")
    os.makedirs("/var/lib/popa3d", mode=0o755, exist_ok=True)
