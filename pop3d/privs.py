"""Become the account that owns the maildrop, for good, before touching it."""

from __future__ import annotations

import os


class PrivilegeError(Exception):
    """Privileges could not be dropped, or root could be regained: the session must not go on."""


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Irrevocably switch real, effective and saved ids to uid/gid with these supplementary groups.

    Order matters: groups and gid while still root, uid last. Then prove root is gone.
    """
    if uid == 0:
        raise PrivilegeError("refusing to serve a maildrop as root")
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise PrivilegeError(f"cannot switch to uid {uid} gid {gid}: {e.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError("ids did not change as requested")
    try:
        os.setuid(0)
    except OSError:
        return
    raise PrivilegeError("root could be regained after dropping privileges")
