"""From credentials to an open, locked maildrop: authenticate, become the account, open the spool.

The one place where adapter exceptions become RFC 2449/3206 response codes (`ERROR_CODES`), and
where login successes and failures are logged. Loaded only when a client sends PASS or AUTH.
"""

from __future__ import annotations

import os

from pop3d import auth, log, maildrop, privs, protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config

# Adapter exception -> response code. Messages of these exceptions go to the log, never the wire.
ERROR_CODES: tuple[tuple[type[BaseException], bytes], ...] = (
    (maildrop.MaildropInUseError, protocol.IN_USE),
    (maildrop.MaildropFormatError, protocol.SYS_PERM),
    (maildrop.MaildropPermError, protocol.SYS_PERM),
    (privs.PrivilegeError, protocol.SYS_PERM),
    (auth.AuthUnavailableError, protocol.SYS_TEMP),
    (maildrop.MaildropError, protocol.SYS_TEMP),
    (OSError, protocol.SYS_TEMP),
)

# Checked against a real hash when the name is malformed, so that case costs what a wrong password does.
_INVALID_NAME = "\0invalid"


class LoginRefused(Exception):
    """Not an error of the server: the login cannot go on (reason for the log only)."""

    def __init__(self, reason: str, code: bytes = protocol.SYS_PERM) -> None:
        super().__init__(reason)
        self.code = code


def expand_mailbox(template: str, user: str, home: str | None) -> str:
    """The maildrop path from the `mailbox` template: %u user, %h home directory, %% a percent."""
    if "%h" in template and not home:
        raise LoginRefused("mailbox template uses %h but the account has no home directory")
    out = []
    i = 0
    while i < len(template):
        char = template[i]
        if char == "%" and i + 1 < len(template):
            code = template[i + 1]
            out.append({"u": user, "h": home or "", "%": "%"}.get(code, "%" + code))
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def login(
    config: Config, raw_user: bytes, password: bytes, peer: str
) -> bytes | tuple[str, maildrop.Maildrop]:
    """Authenticate and open the maildrop: (user, maildrop), or the response code of the failure."""
    name = auth.valid_username(raw_user)
    shown = name if name is not None else log.escape(raw_user)
    try:
        account = _authenticate(config, name, password)
        if account is None:
            log.info(f"login failed: user={shown} rip={peer}")
            return protocol.AUTH
        _drop_privileges(config, account)
        path = expand_mailbox(str(config.mailbox), account.name, account.home)
        opened = maildrop.Maildrop.open(
            path,
            locks=tuple(config.locks),  # type: ignore[arg-type]
            lock_timeout=float(config.lock_timeout),  # type: ignore[arg-type]
            stale_lock=float(config.stale_lock),  # type: ignore[arg-type]
            mbox_format=str(config.mbox_format),
            expected_uid=os.geteuid(),
            log=log.warning,
        )
    except LoginRefused as e:
        log.error(f"login refused: user={shown} rip={peer}: {e}")
        return e.code
    except Exception as e:
        for kind, code in ERROR_CODES:
            if isinstance(e, kind):
                log.error(f"login failed: user={shown} rip={peer}: {e}")
                return code
        raise
    log.info(
        f"login: user={account.name} rip={peer} messages={opened.listing.count} "
        f"size={opened.listing.total_size}"
    )
    return account.name, opened


def _authenticate(config: Config, name: str | None, password: bytes) -> auth.Account | None:
    """The account if the credentials are right, else None (after the same work either way)."""
    if config.auth == "htpasswd":
        checker = auth.HtpasswdAuthenticator(str(config.htpasswd))
        good = checker.authenticate(name if name is not None else _INVALID_NAME, password)
        if not good or name is None:
            return None
        return _virtual_account(config, name)
    raise LoginRefused("auth = system is not available yet; use auth = htpasswd")


def _virtual_account(config: Config, name: str) -> auth.Account:
    """htpasswd users have no system account: their sessions run as mail_user (or as the caller)."""
    if os.geteuid() != 0:
        return auth.Account(name, os.geteuid(), os.getegid(), None)
    if not config.mail_user:
        raise LoginRefused("htpasswd users need mail_user when pop3d runs as root")
    import pwd

    try:
        entry = pwd.getpwnam(str(config.mail_user))
    except KeyError:
        raise LoginRefused(f"mail_user {config.mail_user!r} does not exist") from None
    return auth.Account(name, entry.pw_uid, entry.pw_gid, None)


def preload() -> None:
    """Import now what the session needs after dropping root.

    The account may not be able to read the interpreter's or pop3d's files (a Python under
    /root, a mode-700 checkout), and a failed import mid-session would end it with an error.
    """
    import array  # noqa: F401
    import binascii  # noqa: F401
    import fcntl  # noqa: F401
    import hashlib  # noqa: F401
    import mmap  # noqa: F401
    import re  # noqa: F401
    import struct  # noqa: F401

    from pop3d import locking, mbox  # noqa: F401


def _drop_privileges(config: Config, account: auth.Account) -> None:
    """As root, become the account before the maildrop is touched; keep group mail for dotlocks."""
    preload()
    if os.geteuid() != 0:
        if os.geteuid() != account.uid:
            raise LoginRefused("cannot serve another account's maildrop without root")
        return
    groups = [account.gid]
    import grp

    try:
        groups.append(grp.getgrnam("mail").gr_gid)
    except KeyError:
        pass
    privs.become(account.uid, account.gid, sorted(set(groups)))
