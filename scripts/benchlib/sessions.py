"""The POP3 sessions the phases time, each verified against the spool while it is measured.

A dialogue used by one phase only lives in that phase's module; the ones here are shared.
"""

from __future__ import annotations

import pwd
import time

from benchlib.client import Pop3Client, quit_session
from benchlib.servers.base import Server, proc_usage
from benchlib.spools import Spool, place_spool
from benchlib.verify import (
    VerifyError,
    check_listing,
    check_message,
    check_sizes,
    check_stat,
    check_uids,
    kept_range,
    same_bytes,
)


def short_session(
    server: Server, spool_count: int | None, user: str | None = None, password: str | None = None
) -> float:
    """USER/PASS/STAT/QUIT, connect to QUIT's reply; checks the count when it is known."""
    t0 = time.perf_counter()
    c = Pop3Client(server.port)
    c.login(user or server.user, password or server.password)
    stat = c.ok(b"STAT").split()
    c.send(b"QUIT\r\n")
    reply = c.line()
    dt = time.perf_counter() - t0
    c.drain_eof()
    c.close()
    if not reply.startswith(b"+OK"):
        raise VerifyError(f"QUIT: {reply!r}")
    if spool_count is not None and int(stat[1]) != spool_count:
        raise VerifyError(f"STAT says {int(stat[1])} messages, the spool has {spool_count}")
    return dt


def poll_session(server: Server, spool: Spool, user: str | None = None) -> float:
    """A client's poll: login, UIDL, QUIT; connect to QUIT's reply. Every message numbered once,
    the UIDs unique."""
    return poll_uids(server, spool, user)[0]


def poll_uids(server: Server, spool: Spool, user: str | None = None) -> tuple[float, list[bytes]]:
    """poll_session, and the UIDs the server listed (to compare polls with each other)."""
    t0 = time.perf_counter()
    c = Pop3Client(server.port)
    c.login(user or server.user, server.password)
    uids = check_listing("UIDL", c.multi(b"UIDL"), spool)
    c.send(b"QUIT\r\n")
    reply = c.line()
    dt = time.perf_counter() - t0
    c.drain_eof()
    c.close()
    check_uids(uids)
    if not reply.startswith(b"+OK"):
        raise VerifyError(f"QUIT: {reply!r}")
    return dt, uids


def read_session(server: Server, spool: Spool, retr: bool = True) -> dict[str, float]:
    """PASS, STAT, LIST, UIDL, RETR of every message (verified), usage sampled before QUIT.

    Returns seconds for pass_s, stat_s, login_stat_s, list_s, uidl_s, quit_s (and retr_s, with
    retr_mbps, when asked to retrieve and there are messages); the session's rss_mb and cpu_s
    when known.
    """
    out: dict[str, float] = {}
    c = Pop3Client(server.port)
    c.line()
    c.ok(b"USER " + server.user.encode())
    t0 = time.perf_counter()
    c.ok(b"PASS " + server.password.encode())
    t1 = time.perf_counter()
    stat = c.ok(b"STAT").split()
    t2 = time.perf_counter()
    out["pass_s"], out["stat_s"], out["login_stat_s"] = t1 - t0, t2 - t1, t2 - t0
    check_stat(stat, spool)
    t0 = time.perf_counter()
    listed = check_listing("LIST", c.multi(b"LIST"), spool)
    out["list_s"] = time.perf_counter() - t0
    sizes = [int(v) for v in listed]
    check_sizes(sizes, spool)
    t0 = time.perf_counter()
    uids = check_listing("UIDL", c.multi(b"UIDL"), spool)
    out["uidl_s"] = time.perf_counter() - t0
    check_uids(uids)
    if retr and spool.count:  # an empty spool has no throughput to measure
        t0 = time.perf_counter()
        total = 0
        for n in range(1, spool.count + 1):
            data = c.multi(b"RETR %d" % n)
            check_message(n, data, sizes[n - 1], spool)
            total += len(data)
        dt = time.perf_counter() - t0
        out["retr_s"] = dt
        out["retr_mbps"] = total / dt / 1e6
    usage = proc_usage(server.session_pid())
    if usage:
        out.update(usage)
    t0 = time.perf_counter()
    c.ok(b"QUIT")  # nothing deleted: the reply should not wait for anything
    out["quit_s"] = time.perf_counter() - t0
    c.drain_eof()
    c.close()
    return out


def update_session(server: Server, spool: Spool, owner: pwd.struct_passwd | None, which: str) -> float:
    """A fresh spool copy; DELE (1, last or all, pipelined) then QUIT, timed to QUIT's reply; verified.

    The spool must hold a message (there is nothing to delete in an empty one).
    """
    dest = server.spool_path()
    place_spool(spool, dest, owner)
    server.forget()
    n = spool.count
    dele = {"first": [1], "last": [n], "all": list(range(1, n + 1))}[which]
    c = Pop3Client(server.port)
    c.login(server.user, server.password)
    if int(c.ok(b"STAT").split()[1]) != n:
        raise VerifyError(f"STAT before DELE {which}: not the {n} messages of the spool")
    t0 = time.perf_counter()
    c.send(b"".join(b"DELE %d\r\n" % k for k in dele) + b"QUIT\r\n")
    for k in dele:
        reply = c.line()
        if not reply.startswith(b"+OK"):
            raise VerifyError(f"DELE {k}: {reply[:60]!r}")
    reply = c.line()
    dt = time.perf_counter() - t0
    c.drain_eof()
    c.close()
    if not reply.startswith(b"+OK"):
        raise VerifyError(f"QUIT after DELE: {reply[:60]!r}")
    server.settle()
    kept = n - len(dele)
    # The spool now holds exactly the kept messages' bytes (with their separators), in order.
    if server.exact_spool and not same_bytes(dest, spool.path, *kept_range(spool, which)):
        raise VerifyError(f"after DELE {which}: the spool is not exactly the kept messages' bytes")
    if which != "all":
        c = Pop3Client(server.port)
        c.login(server.user, server.password)
        stat = c.ok(b"STAT").split()
        quit_session(c)
        if int(stat[1]) != kept:
            raise VerifyError(f"after DELE {which}: STAT {stat[1]!r}, expected {kept}")
    return dt
