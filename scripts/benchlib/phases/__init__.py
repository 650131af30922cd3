"""The phases of a run, in order. Each module measures one thing on every server and records its rows.

A phase is a module with `run(ctx: Context) -> None`; `plan(args)` returns the ones this command
line asks for. A new phase: a module here and a line in DEFAULT. A new mode of the benchmark (a
different set of measurements, e.g. many clients at once): its phases here, its option in
`cli.py`, and a branch in `plan` that returns its own list.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from benchlib.context import Context
from benchlib.phases import (
    concurrency,
    greeting,
    pam_sessions,
    polling,
    schemes,
    short_sessions,
    spool_sizes,
    stock_poplib,
    tiny,
)

Phase = Callable[[Context], None]

DEFAULT: tuple[Phase, ...] = (
    greeting.run,  # connect -> greeting, with the interpreter floor
    short_sessions.run,  # USER/PASS/STAT/QUIT, small spool
    schemes.run,  # the same per password scheme (pop3d)
    pam_sessions.run,  # the same through PAM, beside popa3d
    spool_sizes.run,  # read sessions and updates per --sizes
    polling.run,  # polls per --sizes: first, unchanged, after a delivery (pop3d with its index)
    tiny.run,  # many tiny messages
    stock_poplib.run,  # RETR all with stock poplib
)


# --phases NAME,...: a phase's name is its module's.
NAMES = tuple(phase.__module__.rpartition(".")[2] for phase in DEFAULT)


def plan(args: argparse.Namespace) -> tuple[Phase, ...]:
    """The phases to run for this command line."""
    if args.concurrency:
        return (concurrency.run,)  # C clients at once: throughput, latency, CPU and memory per session
    if args.phases:
        return tuple(phase for phase in DEFAULT if phase.__module__.rpartition(".")[2] in args.phases)
    return DEFAULT
