"""Authentication adapter: htpasswd files, system accounts, password hashing.

The user-name rule lives in `names` (with the file names derived from a name) and is re-exported
here as `valid_username`. Each connection is a fresh process, so import cost is latency: at load
time this module imports only `os`, `stat`, `limits` and `names`. crypt(3), bcrypt and the one
passlib handler a hash needs are imported when a password is checked (never `passlib.apache`:
~80 ms). Knows nothing of POP3.
"""

from __future__ import annotations

import os
import stat

from pop3d import limits
from pop3d.names import valid_username

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "Account",
    "AuthUnavailableError",
    "HtpasswdAuthenticator",
    "SystemAuthenticator",
    "hash_password",
    "valid_username",
]

# A hash field is printable ASCII without space or ':' (anything else is a malformed line).
_HASH_CHARS = bytes(c for c in range(0x21, 0x7F) if c != 0x3A)
_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# bcrypt's 22nd salt character carries 2 bits: these are its canonical values.
_BCRYPT_SALT_LAST = ".Oeu"

# Hash prefix -> the backend used when crypt(3) is missing or refuses the hash. None: no
# fallback ($y$ is libxcrypt-only). "bcrypt" is the C `bcrypt` package; other names are
# passlib handlers. Prefixes absent here (plaintext, DES crypt, {SSHA}, $2x$ ...) are refused.
_CRYPT_SCHEMES: dict[str, str | None] = {
    "$1$": "md5_crypt",
    "$5$": "sha256_crypt",
    "$6$": "sha512_crypt",
    "$y$": None,
    "$2a$": "bcrypt",
    "$2b$": "bcrypt",
    "$2y$": "bcrypt",
}
# Schemes crypt(3) does not know: passlib, one handler imported on first use.
_PASSLIB_SCHEMES = {"$apr1$": "apr_md5_crypt", "{SHA}": "ldap_sha1"}

# Verified for an unknown user when the file has no usable entry to imitate: a bcrypt hash of
# nothing anyone can type, at the cost new hashes get, so the miss costs what a hit would.
_DUMMY_HASH = f"$2b${limits.BCRYPT_COST:02d}$Pop3dDummySaltForMisseoPXtQQraeCCF3Tno09tMdc1QEBau5AK"

# Verified when a system login is refused before PAM (unknown or ineligible account, invalid
# name): yescrypt at Debian 12's default cost ("j9T"), what pam_unix spends on a real account,
# so the refusal costs the same CPU time as a wrong password. Nothing hashes to it.
_DUMMY_SYSTEM_SETTING = "$y$j9T$Pop3dDummySalt.Pop3d$"
# Linux-PAM item types (security/_pam_types.h).
_PAM_USER = 2
_PAM_RHOST = 4
_PAM_FAIL_DELAY = 10
# PAM results that mean "the backend is broken", not "these credentials are wrong": [SYS/TEMP].
_PAM_UNAVAILABLE = {
    1,  # PAM_OPEN_ERR: a module could not be loaded
    2,  # PAM_SYMBOL_ERR
    3,  # PAM_SERVICE_ERR
    4,  # PAM_SYSTEM_ERR
    5,  # PAM_BUF_ERR
    9,  # PAM_AUTHINFO_UNAVAIL: e.g. the directory server is down
    19,  # PAM_CONV_ERR
    26,  # PAM_ABORT
    28,  # PAM_MODULE_UNKNOWN
}

_UNSET = object()
_pam_state: _Pam | None = None  # libpam, once loaded
_crypt_fn: object = _UNSET  # Callable[[str, str], str] | None once loaded


class AuthUnavailableError(Exception):
    """The authentication backend is broken or unreadable: answer [SYS/TEMP], not [AUTH]."""


class Account:
    """Who a session becomes: uid/gid to switch to, home for `%h` (None for htpasswd users)."""

    __slots__ = ("gid", "home", "name", "uid")

    def __init__(self, name: str, uid: int, gid: int, home: str | None = None) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home

    def __repr__(self) -> str:
        return f"Account({self.name!r}, uid={self.uid}, gid={self.gid}, home={self.home!r})"


class HtpasswdAuthenticator:
    """Checks passwords against an Apache-style htpasswd file (`user:hash` lines).

    The file is read on each call: a process serves one session, so there is nothing to cache
    and an edited file takes effect at the next connection.
    """

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def authenticate(self, name: str, password: bytes) -> bool:
        """True if `password` matches `name`'s entry; never raises for bad input.

        Unknown users, malformed entries and unknown schemes are False after the same kind of
        hash verification a real user costs, so timing does not tell them apart. Raises
        AuthUnavailableError only when the file (or a needed hash backend) is unusable.
        """
        if len(password) > limits.MAX_PASSWORD:
            return False  # bounded hashing cost; says nothing about the user
        secret = _decode_password(password)
        data = _read_file(self.path)
        try:
            want: bytes | None = name.encode("utf-8")
        except UnicodeEncodeError:
            want = None
        compare = _compare_fn()
        found: str | None = None  # first entry for the name ("" if unusable)
        template: str | None = None  # first usable hash: what a miss imitates
        for line in data.splitlines():
            line = line.strip()
            if not line or line[:1] == b"#":
                continue
            user, sep, rest = line.partition(b":")
            if not sep or not user:
                continue  # not attributable to anyone: ignore
            # A third field is nginx's comment; no supported hash contains ':'.
            usable = _usable_hash(rest.partition(b":")[0])
            if template is None:
                template = usable
            # Compare every line in constant time (loop length depends on `want` only),
            # and do not stop at the first match.
            if want is not None and compare(user, want) and found is None:
                found = usable or ""
        if found and secret is not None:
            return _verify(secret, found)
        # Spend what a real check spends (a password that is not UTF-8: against the user's hash).
        _verify(password.decode("utf-8", "replace"), found or template or _DUMMY_HASH)
        return False


class SystemAuthenticator:
    """System accounts: the password through PAM (auth and account phases), the account by pwd.

    Only accounts with uid >= first_uid (never uid 0) may log in. Every refusal returns None
    after comparable work: PAM for an eligible account, a yescrypt verification otherwise (an
    unknown, ineligible or malformed name never reaches PAM, so it can neither lock a system
    account through pam_faillock nor be timed against a real one). `reason` says why, for the log.
    """

    __slots__ = ("first_uid", "reason", "service")

    def __init__(self, service: str, first_uid: int) -> None:
        self.service = service
        self.first_uid = first_uid
        self.reason = ""

    def authenticate(self, name: str | None, password: bytes, rhost: str = "unknown") -> Account | None:
        """The account if PAM accepts `password` and the account may read mail here, else None.

        Raises AuthUnavailableError when PAM itself is broken (module missing, backend down).
        """
        if name is None:
            return self._refuse("invalid user name", password)
        if len(password) > limits.MAX_PASSWORD or b"\0" in password:
            return self._refuse("password too long or with NUL", password)
        import pwd

        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return self._refuse("unknown user", password)
        if entry.pw_uid == 0:
            return self._refuse("uid 0 may not log in", password)
        if entry.pw_uid < self.first_uid:
            return self._refuse(f"uid {entry.pw_uid} is below first_uid {self.first_uid}", password)
        code, reason = _pam_check(self.service, name, password, rhost)
        if code != 0:
            if code in _PAM_UNAVAILABLE:
                raise AuthUnavailableError(f"PAM service {self.service!r}: {reason}")
            self.reason = f"PAM: {reason}"
            return None
        self.reason = ""
        return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def _refuse(self, reason: str, password: bytes) -> None:
        self.reason = reason
        crypt = _load_crypt()
        if crypt is not None:
            try:
                crypt(password[: limits.MAX_PASSWORD].decode("utf-8", "replace"), _DUMMY_SYSTEM_SETTING)
            except (ValueError, OSError):
                pass
        return None


def preload_pam(service: str | None = None) -> None:
    """Load libpam now, and with `service` also start a PAM transaction (its modules loaded),
    instead of at PASS time.

    Called while the client is still typing (privilege separation) or before a privilege drop.
    The transaction started here has no user yet: the first check of `service` takes it over.
    """
    pam = _load_pam()
    if service is not None and pam.spare is None:
        code, handle, conv = pam.start(service)
        if code == 0:
            pam.spare = (service, handle, conv)  # else the check starts again, and reports


def hold_pam_modules(service: str) -> None:
    """Start a PAM transaction for `service` and never use it: its modules stay loaded.

    For a listener: every session it forks still starts a transaction of its own (reading the
    PAM configuration afresh), but finds the modules and the libraries they link already in
    memory, not to be mapped and relocated again (~0.6 ms of each session's CPU). Called again
    (SIGHUP), it holds the new service's transaction and ends the previous one.
    """
    pam = _load_pam()
    code, handle, conv = pam.start(service)
    if code != 0:
        return  # the sessions' own pam_start says why, and they answer [SYS/TEMP]
    held, pam.held = pam.held, (handle, conv)
    if held is not None:
        pam.pam_end(held[0], 0)


def _load_pam() -> _Pam:
    global _pam_state
    if _pam_state is None:
        _pam_state = _Pam()
    return _pam_state


class _Pam:
    """Linux-PAM through ctypes: pam_start, the auth and account phases, pam_end; nothing else.

    Written here rather than taken from python-pam: that package imports `typing` and
    `threading` (~3 ms of every login), answers only the first prompt, and cannot start a
    transaction before the user name is known. Raises AuthUnavailableError if libpam is missing.
    """

    def __init__(self) -> None:
        try:
            import ctypes
        except ImportError as exc:
            raise AuthUnavailableError("ctypes is not available: cannot call libpam") from exc
        self.ctypes = ctypes
        lib = None
        for name in ("libpam.so.0", "libpam.so"):  # the dynamic loader resolves stable sonames
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            from ctypes.util import find_library

            found = find_library("pam")
            try:
                lib = ctypes.CDLL(found) if found else None
            except OSError:
                lib = None
        if lib is None:
            raise AuthUnavailableError("cannot load libpam (Linux-PAM)")
        libc = ctypes.CDLL(None)
        c_int, c_void_p, c_char_p, pointer = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER

        class Message(ctypes.Structure):
            _fields_ = (("msg_style", c_int), ("msg", c_char_p))

        class Response(ctypes.Structure):
            _fields_ = (("resp", c_void_p), ("resp_retcode", c_int))

        conv_type = ctypes.CFUNCTYPE(
            c_int, c_int, pointer(pointer(Message)), pointer(pointer(Response)), c_void_p
        )

        class Conv(ctypes.Structure):
            _fields_ = (("conv", conv_type), ("appdata_ptr", c_void_p))

        self.calloc = libc.calloc
        self.calloc.restype, self.calloc.argtypes = c_void_p, (ctypes.c_size_t, ctypes.c_size_t)
        self.strdup = libc.strdup
        self.strdup.restype, self.strdup.argtypes = c_void_p, (c_char_p,)
        self.free = libc.free
        self.free.restype, self.free.argtypes = None, (c_void_p,)
        handle_p = pointer(c_void_p)
        self.pam_start = lib.pam_start
        self.pam_start.restype, self.pam_start.argtypes = c_int, (c_char_p, c_char_p, pointer(Conv), handle_p)
        self.pam_set_item = lib.pam_set_item
        self.pam_set_item.restype, self.pam_set_item.argtypes = c_int, (c_void_p, c_int, c_void_p)
        self.pam_authenticate = lib.pam_authenticate
        self.pam_authenticate.restype, self.pam_authenticate.argtypes = c_int, (c_void_p, c_int)
        self.pam_acct_mgmt = lib.pam_acct_mgmt
        self.pam_acct_mgmt.restype, self.pam_acct_mgmt.argtypes = c_int, (c_void_p, c_int)
        self.pam_strerror = lib.pam_strerror
        self.pam_strerror.restype, self.pam_strerror.argtypes = c_char_p, (c_void_p, c_int)
        self.pam_end = lib.pam_end
        self.pam_end.restype, self.pam_end.argtypes = c_int, (c_void_p, c_int)
        self.response_size = ctypes.sizeof(Response)
        self.response_array = pointer(Response)
        # The answers of the conversation: the user name (echo on), the password (echo off).
        self.answers: tuple[bytes, bytes] | None = None
        # (service, handle, conversation) of a transaction started ahead of the check.
        self.spare: tuple[str, object, object] | None = None
        # (handle, conversation) of a transaction a listener holds for its modules (never used).
        self.held: tuple[object, object] | None = None
        # An exception (a signal's SessionEnd) raised inside the conversation: re-raised after
        # pam_end, never unwound through libpam.
        self.raised: BaseException | None = None
        self.conv_type = conv_type
        self.conv_struct = Conv

        @ctypes.CFUNCTYPE(None, c_int, ctypes.c_uint, c_void_p)
        def no_delay(retval: int, usec: int, appdata: object) -> None:
            """PAM's failure delay (pam_unix: 2 s, pam_faildelay): skipped, pop3d pads instead."""

        self.no_delay = no_delay

    def start(self, service: str) -> tuple[int, object, object]:
        """pam_start for `service`, without a user yet: (result code, handle, conversation)."""
        ctypes = self.ctypes
        conv = self.conv_struct(self.conv_type(self._converse), None)
        handle = ctypes.c_void_p()
        name = service.encode("ascii", "replace")
        code = self.pam_start(name, None, ctypes.byref(conv), ctypes.byref(handle))
        if code == 0 and not handle.value:
            code = 4  # PAM_SYSTEM_ERR
        return code, handle, conv

    def _converse(self, count: int, messages: object, responses: object, appdata: object) -> int:
        """Answer each prompt: the user name when it echoes, the password when it does not;
        nothing to error and information messages. Runs inside pam_authenticate."""
        try:
            if count <= 0 or self.answers is None:
                return 19  # PAM_CONV_ERR
            replies = self.calloc(count, self.response_size)
            if not replies:
                return 5  # PAM_BUF_ERR
            array = self.ctypes.cast(replies, self.response_array)
            for i in range(count):
                style = messages[i].contents.msg_style  # type: ignore[index]
                answer = self.answers[1] if style == 1 else self.answers[0] if style == 2 else None
                if answer is not None:
                    copy = self.strdup(answer)
                    if not copy:
                        for j in range(i):
                            self.free(array[j].resp)
                        self.free(replies)
                        return 5  # PAM_BUF_ERR
                    array[i].resp = copy
            responses[0] = array  # type: ignore[index]
            return 0
        except BaseException as e:  # never unwind through libpam
            self.raised = e
            return 19  # PAM_CONV_ERR

    def check(self, service: str, name: str, password: bytes, rhost: str) -> tuple[int, str]:
        """pam_authenticate + pam_acct_mgmt for `name`: (PAM result code, its text)."""
        ctypes = self.ctypes
        spare, self.spare = self.spare, None
        if spare is not None and spare[0] == service:
            handle, conv = spare[1], spare[2]
        else:
            if spare is not None:
                self.pam_end(spare[1], 0)
            code, handle, conv = self.start(service)
            if code != 0:
                return code, "pam_start failed"
        code = 4  # PAM_SYSTEM_ERR
        flags = 0x8000 | 0x1  # PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK
        user = name.encode("ascii", "replace")
        # Without the delay callback, PAM sleeps ~2 s (randomised) after a failure, on top of
        # pop3d's own delay.
        items = (
            (_PAM_USER, user),
            (_PAM_RHOST, rhost.encode("ascii", "replace")),
            (_PAM_FAIL_DELAY, ctypes.cast(self.no_delay, ctypes.c_void_p)),
        )
        reason = None
        try:
            self.answers = (user, password)
            if all(self.pam_set_item(handle, item, value) == 0 for item, value in items):
                code = self.pam_authenticate(handle, flags)
                if code == 0:
                    code = self.pam_acct_mgmt(handle, flags)
            reason = self.pam_strerror(handle, code)
        finally:
            self.answers = None
            self.pam_end(handle, code)
            del conv  # the conversation had to live until pam_end
            raised, self.raised = self.raised, None
        if raised is not None:
            raise raised
        return code, (reason or b"").decode("utf-8", "replace")


def _pam_check(service: str, name: str, password: bytes, rhost: str) -> tuple[int, str]:
    """pam_authenticate + pam_acct_mgmt for `service`: (PAM result code, its text)."""
    return _load_pam().check(service, name, password, rhost)


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """A new hash for `pop3d-passwd`: "bcrypt" (default) or "sha512_crypt".

    Both are verified by crypt(3) at C speed; costs come from `limits`. Raises ValueError for
    an unknown scheme, a NUL, or a password longer than the scheme really uses (bcrypt: 72
    octets; silent truncation would surprise the user).
    """
    secret = password.encode("utf-8")
    if "\0" in password:
        raise ValueError("a password cannot contain NUL")
    if len(secret) > limits.MAX_PASSWORD:
        raise ValueError(f"a password is at most {limits.MAX_PASSWORD} octets")
    if scheme == "bcrypt":
        if len(secret) > 72:
            raise ValueError("bcrypt uses only the first 72 octets of a password")
        last = _BCRYPT_SALT_LAST[os.urandom(1)[0] & 3]
        setting = f"$2b${limits.BCRYPT_COST:02d}${_salt(21)}{last}"
    elif scheme == "sha512_crypt":
        setting = f"$6$rounds={limits.SHA512_CRYPT_ROUNDS}${_salt(16)}"
    else:
        raise ValueError(f"unknown scheme {scheme!r}: use 'bcrypt' or 'sha512_crypt'")
    hashed = None
    crypt = _load_crypt()
    if crypt is not None:
        try:
            hashed = crypt(password, setting)
        except OSError:
            hashed = None
    if not hashed or hashed[0] == "*":  # crypt(3) missing or without this method
        if scheme == "bcrypt":
            import bcrypt

            salt = bcrypt.gensalt(rounds=limits.BCRYPT_COST, prefix=b"2b")
            hashed = bcrypt.hashpw(secret, salt).decode("ascii")
        else:
            from passlib.hash import sha512_crypt

            hashed = sha512_crypt.using(rounds=limits.SHA512_CRYPT_ROUNDS).hash(password)
    if not _verify(password, hashed):  # never hand out a hash we would not accept
        raise RuntimeError("the new hash does not verify")
    return hashed


# -- helpers -------------------------------------------------------------------------------


def _decode_password(raw: bytes) -> str | None:
    """The password as str if `raw` is UTF-8, else None: it never verifies.

    A password is the UTF-8 octets the client sent, and crypt(3), bcrypt and passlib all hash
    exactly those (the str's UTF-8 encoding is `raw` again), so no two byte strings verify
    against one hash. (A latin-1 fallback made b"\\xe9" and b"\\xc3\\xa9" one password; and
    `_crypt` cannot hash octets that are not UTF-8, so "those octets" cannot be the rule.)"""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_file(path: str) -> bytes:
    """The whole file, or AuthUnavailableError: missing, unreadable, not regular, too large."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK  # a FIFO must not hang us
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise AuthUnavailableError(f"htpasswd {path!r}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuthUnavailableError(f"htpasswd {path!r}: not a regular file")
        limit = limits.MAX_HTPASSWD_BYTES
        chunks = []
        total = 0
        while chunk := os.read(fd, max(st.st_size + 1, 4096)):
            total += len(chunk)
            if total > limit:
                raise AuthUnavailableError(f"htpasswd {path!r}: larger than {limit} octets")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise AuthUnavailableError(f"htpasswd {path!r}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _usable_hash(field: bytes) -> str | None:
    """The hash as str if well formed and of a scheme we verify, else None."""
    if not field or field.translate(None, _HASH_CHARS):
        return None
    hashed = field.decode("ascii")
    return hashed if _scheme(hashed) is not None else None


def _scheme(hashed: str) -> str | None:
    """The supported prefix `hashed` starts with, or None."""
    for prefix in _CRYPT_SCHEMES:
        if hashed.startswith(prefix):
            return prefix
    for prefix in _PASSLIB_SCHEMES:
        if hashed.startswith(prefix):
            return prefix
    return None


def _compare_fn() -> Callable[[bytes, bytes], bool]:
    """hmac.compare_digest without importing hmac (which pulls hashlib/OpenSSL: ~3 ms)."""
    try:
        from _operator import _compare_digest  # the very function hmac re-exports
    except ImportError:  # pragma: no cover - other interpreters
        from hmac import compare_digest as _compare_digest
    return _compare_digest


def preload_crypt() -> None:
    """Verify crypt(3) hashes from now on through libxcrypt's `crypt_rn`, called by ctypes, if
    it is there: the hash (~50 ms for bcrypt) then runs without the interpreter lock, so another
    thread goes on meanwhile (privsep's root imports the session's modules). `_crypt` holds
    the lock throughout. Costs the import of ctypes (~2 ms): call it while the client types.
    """
    global _crypt_fn
    if _crypt_fn is _UNSET:
        fn = _ctypes_crypt()
        if fn is not None:
            _crypt_fn = fn


def _ctypes_crypt() -> Callable[[str, str], str] | None:
    """crypt(word, setting) with `_crypt.crypt`'s contract, by libxcrypt's crypt_rn; None if
    ctypes, libcrypt.so.1 or crypt_rn (libxcrypt only) is missing."""
    try:
        import ctypes

        crypt_rn = ctypes.CDLL("libcrypt.so.1").crypt_rn
    except (ImportError, OSError, AttributeError):
        return None
    crypt_rn.restype = ctypes.c_char_p
    crypt_rn.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
    # struct crypt_data is 32 KiB in libxcrypt (crypt_rn refuses a smaller buffer: ERANGE);
    # twice that leaves room, and stays under malloc's mmap threshold (128 KiB).
    size = 1 << 16

    def crypt(word: str, setting: str) -> str:
        if "\0" in word or "\0" in setting:
            raise ValueError("embedded null character")
        data = ctypes.create_string_buffer(size)
        try:
            result = crypt_rn(word.encode("utf-8"), setting.encode("utf-8"), data, size)
        finally:
            ctypes.memset(data, 0, size)  # it held a copy of the password
        if result is None:  # what crypt_r (behind `_crypt`) returns instead: a failure token
            return "*1" if setting.startswith("*0") else "*0"
        return result.decode("utf-8", "replace")

    return crypt


def _load_crypt() -> Callable[[str, str], str] | None:
    """libxcrypt's crypt(3) through the cheapest import that has it, or None.

    `_crypt` (3.11-3.12) and `_crypt_r` (PyPI crypt-r, 3.13+) are the C functions that
    `crypt.crypt` / `crypt_r.crypt` call for an explicit salt; the Python wrappers cost ~10 ms
    more (random, string, re) and `crypt` warns, so they are the last resort.
    """
    global _crypt_fn
    if _crypt_fn is _UNSET:
        fn = None
        for module in ("_crypt", "_crypt_r", "crypt_r", "crypt"):
            try:
                if module == "crypt":
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        fn = __import__(module).crypt
                else:
                    fn = __import__(module).crypt
                break
            except (ImportError, AttributeError):
                continue
        _crypt_fn = fn
    return _crypt_fn  # type: ignore[return-value]


def _verify(password: str, hashed: str) -> bool:
    """True if `password` matches `hashed`; False for a mismatch or an unsupported hash.

    crypt(3) first for `$1$ $5$ $6$ $y$ $2?$`: C speed, ~0.3 ms to import, and the only
    yescrypt; passlib costs ~30 ms to import (its bcrypt ~90 ms more: a backend self-test) and
    its sha-crypt runs in Python. The C bcrypt package or one passlib handler otherwise.
    """
    prefix = _scheme(hashed)
    if prefix is None:
        return False
    if prefix in _PASSLIB_SCHEMES:
        return _passlib_verify(_PASSLIB_SCHEMES[prefix], password, hashed)
    crypt = _load_crypt()
    if crypt is not None:
        try:
            result = crypt(password, hashed)
        except ValueError:
            return False  # NUL in the password: no stored hash can match it
        except OSError:
            result = None  # crypt(3) returned NULL: an old libc without this method
        if result and result[0] != "*":  # "*0"/"*1": libxcrypt's failure tokens
            return _compare_fn()(result.encode("ascii"), hashed.encode("ascii"))
    fallback = _CRYPT_SCHEMES[prefix]
    try:
        if fallback is None:
            raise AuthUnavailableError(f"only crypt(3) verifies {prefix} hashes")
        if fallback == "bcrypt":
            return _bcrypt_verify(password, hashed)
        return _passlib_verify(fallback, password, hashed)
    except AuthUnavailableError:
        if crypt is not None:
            return False  # crypt(3) refused this hash and no other backend is installed
        raise


def _bcrypt_verify(password: str, hashed: str) -> bool:
    """bcrypt through the C `bcrypt` package (for a libc whose crypt(3) lacks it)."""
    try:
        import bcrypt
    except ImportError as exc:
        raise AuthUnavailableError("no bcrypt backend") from exc
    # bcrypt reads 72 octets; the package raises beyond that where crypt(3) truncates.
    secret = password.encode("utf-8")[:72]
    try:
        return bool(bcrypt.checkpw(secret, hashed.encode("ascii")))
    except ValueError:
        return False


def _passlib_verify(handler_name: str, password: str, hashed: str) -> bool:
    """One passlib handler, imported alone (the registry proxy loads just that module)."""
    try:
        from passlib import hash as passlib_hash

        handler = getattr(passlib_hash, handler_name)
    except (ImportError, AttributeError) as exc:
        raise AuthUnavailableError(f"passlib cannot verify {handler_name}") from exc
    try:
        return bool(handler.verify(password, hashed))
    except (ValueError, TypeError):
        return False  # malformed hash, or a secret passlib refuses


def _salt(length: int) -> str:
    """`length` random characters of the crypt alphabet (64 symbols: uniform from a byte)."""
    return "".join(_SALT_CHARS[b & 63] for b in os.urandom(length))
