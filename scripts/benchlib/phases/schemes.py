"""A short session per password scheme (--schemes), pop3d's htpasswd: what each hash costs a login.

The hashes are made with pop3d's own code, passlib or crypt(3), in pop3d's interpreter.
"""

from __future__ import annotations

import statistics
import subprocess

from benchlib.context import Context
from benchlib.servers.accounts import PASSWORD
from benchlib.servers.pop3d import hash_prefix
from benchlib.sessions import short_session
from benchlib.verify import VerifyError

HASH = r"""
import sys
from pop3d import auth
pw, scheme = sys.argv[1], sys.argv[2]
if scheme in ("bcrypt", "sha512_crypt"):
    print(auth.hash_password(pw, scheme))
elif scheme in ("sha256_crypt", "md5_crypt", "apr1", "sha1"):
    from passlib import hash as h
    print({"sha256_crypt": h.sha256_crypt, "md5_crypt": h.md5_crypt, "apr1": h.apr_md5_crypt,
           "sha1": h.ldap_sha1}[scheme].hash(pw))
elif scheme == "yescrypt":
    import _crypt
    print(_crypt.crypt(pw, "$y$j9T$" + "abcdefghijklmnopqrstuv"[:22]))
"""


def run(ctx: Context) -> None:
    pop3d, res = ctx.pop3d, ctx.res
    small = ctx.small_spool()
    ctx.place(small, [pop3d])
    saved = pop3d.hashed
    for scheme in [s for s in ctx.args.schemes.split(",") if s]:
        r = subprocess.run(
            [ctx.python, "-c", HASH, PASSWORD, scheme], env=ctx.env, capture_output=True, text=True
        )
        hashed = r.stdout.strip()
        if r.returncode or not hashed or hashed.startswith("*"):
            res.add(f"short session, {scheme}", "pop3d", None, "s", skipped="cannot make such a hash")
            continue
        pop3d.set_password(hashed)
        values = []
        try:
            for _ in range(max(3, ctx.args.sessions // 4)):
                values.append(short_session(pop3d, small.count))
        except VerifyError as e:
            res.fail(f"short session {scheme}", e)
        if values:
            res.add(
                f"USER/PASS/STAT/QUIT p50, {scheme} ({hash_prefix(hashed)})",
                "pop3d",
                statistics.median(values),
                "s",
                n=len(values),
            )
    pop3d.set_password(saved)  # what the other measurements use
