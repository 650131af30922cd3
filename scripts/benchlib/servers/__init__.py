"""The servers a run measures: pop3d, the interpreter floor, and the peers (popa3d, Dovecot).

A peer is a module here with NAME, `add_argument(parser)` (its --NAME option) and `start(setup)`,
which returns a started `Server` or raises `PeerUnavailable(why)`; PEERS lists them in the order
of the results table's columns.
"""

from __future__ import annotations

import argparse
import os
import pwd
from pathlib import Path

from benchlib.servers import dovecot, popa3d
from benchlib.servers.accounts import USER, ensure_account, set_system_password
from benchlib.servers.base import PeerSetup, PeerUnavailable, Server

PEERS = (popa3d, dovecot)


def start_peers(
    args: argparse.Namespace, tool: str, workdir: Path, owner: pwd.struct_passwd | None, hashed: str
) -> tuple[list[Server], list[str], pwd.struct_passwd | None]:
    """Start every peer that can run here: (the started ones, why the others did not, the account)."""
    started: list[Server] = []
    why: list[str] = []
    if args.no_peers:
        return started, why, owner
    if os.geteuid() != 0:
        return started, ["peers need root (system account, /var/mail, Dovecot)"], owner
    if not tool:
        return started, ["peers need tcpserver or socat"], owner
    if owner is None or owner.pw_name != USER:
        owner = ensure_account(create=True)
    assert owner is not None  # created as root
    set_system_password()
    setup = PeerSetup(args, tool, workdir, owner, hashed)
    try:
        for peer in PEERS:
            try:
                started.append(peer.start(setup))
            except PeerUnavailable as e:
                why.append(str(e))
    except BaseException:
        for s in started:
            s.stop()
        raise
    return started, why, owner
