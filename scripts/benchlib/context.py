"""What a phase is given: the options, the results, the started servers, and how to take turns.

Every figure is measured interleaved (`Context.interleaved`: one call per server per round,
alternating servers each round) so that a slower minute of the machine falls on all of them.
"""

from __future__ import annotations

import argparse
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.results import Results
from benchlib.servers.base import Server
from benchlib.servers.pop3d import Pop3d
from benchlib.spools import Spool, load_or_generate, place_spool


@dataclass
class Context:
    args: argparse.Namespace
    res: Results
    workdir: Path  # spools (cached across runs) and the servers' configurations
    servers: list[Server]  # pop3d first, then the peers that started
    floor: Server | None  # None without tcpserver or socat
    pop3d: Pop3d
    owner: pwd.struct_passwd | None  # the account spools are given to (root only)
    python: str  # the interpreter pop3d runs on
    env: dict[str, str]  # pop3d's environment

    @property
    def by_name(self) -> dict[str, Server]:
        return {s.name: s for s in self.servers}

    def servers_named(self, name: str) -> list[Server]:
        """The started server of that name, as a list (empty if it did not start)."""
        return [s for s in self.servers if s.name == name]

    def spool(self, mib: float, seed_offset: int = 0, tiny: int = 0) -> Spool:
        """The generated spool of this size (or of `tiny` messages), from the cache if it is there."""
        return load_or_generate(self.workdir, mib, self.args.seed + seed_offset, tiny)

    def small_spool(self) -> Spool:
        """A small spool (5 messages): a session's scan of it costs next to nothing."""
        return self.spool(0.05)

    def place(self, spool: Spool, servers: list[Server] | None = None) -> None:
        """A fresh copy of `spool` for every server (or those given)."""
        for s in self.servers if servers is None else servers:
            place_spool(spool, s.spool_path(), self.owner)

    def interleaved(
        self, rounds: int, fn: Callable[[Server], Any], what: str, servers: list[Server] | None = None
    ) -> dict[str, list[Any]]:
        """Call fn(server) `rounds` times per server, alternating servers each round.

        A wrong answer (or any failure) is recorded as a verification failure and the run goes on.
        """
        targets = self.servers if servers is None else servers
        got: dict[str, list[Any]] = {s.name: [] for s in targets}
        for _ in range(rounds):
            for s in targets:
                try:
                    got[s.name].append(fn(s))
                except Exception as e:  # any wrong answer is reported, and the run goes on
                    self.res.fail(f"{what} [{s.name}]", e)
                s.settle()
        return got
