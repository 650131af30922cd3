"""pop3d.auth: user names, htpasswd verification per scheme, refusal paths, import cost."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from passlib.hash import apr_md5_crypt, ldap_sha1, md5_crypt, sha256_crypt, sha512_crypt
from passlib.hash import bcrypt as passlib_bcrypt

from pop3d import auth, limits

ROOT = Path(__file__).resolve().parent.parent
RIGHT = "c0rrect horse"
WRONG = "c0rrect horsf"


def _stdlib_crypt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt


def _yescrypt(password: str) -> str:
    """A `$y$` hash from libxcrypt, or skip: passlib cannot make one."""
    try:
        crypt = _stdlib_crypt()
    except ImportError:
        pytest.skip("no crypt module (Python 3.13+ without crypt-r): cannot make $y$ hashes")
    salt = crypt.mksalt(crypt.METHOD_SHA512)[3:]  # 16 crypt-alphabet characters
    hashed = crypt.crypt(password, "$y$j9T$" + salt)
    if not hashed or not hashed.startswith("$y$"):
        pytest.skip("this crypt(3) has no yescrypt (not libxcrypt)")
    return hashed


# Cheap costs: the tests check correctness, not strength.
HASHERS = {
    "bcrypt-2b": passlib_bcrypt.using(rounds=4).hash,
    "bcrypt-2y": passlib_bcrypt.using(rounds=4, ident="2y").hash,
    "bcrypt-2a": passlib_bcrypt.using(rounds=4, ident="2a").hash,
    "sha256_crypt": sha256_crypt.using(rounds=5000).hash,
    "sha512_crypt": sha512_crypt.using(rounds=5000).hash,
    "md5_crypt": md5_crypt.hash,
    "apr_md5_crypt": apr_md5_crypt.hash,
    "ldap_sha1": ldap_sha1.hash,
    "yescrypt": _yescrypt,
}
CRYPT_SCHEMES = [
    "bcrypt-2b",
    "bcrypt-2y",
    "bcrypt-2a",
    "sha256_crypt",
    "sha512_crypt",
    "md5_crypt",
    "yescrypt",
]


def _htpasswd(tmp_path: Path, text: str | bytes) -> auth.HtpasswdAuthenticator:
    path = tmp_path / "htpasswd"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return auth.HtpasswdAuthenticator(str(path))


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Records every hash verification (password, hash) and still performs it."""
    calls: list[tuple[str, str]] = []
    real = auth._verify

    def recording(password: str, hashed: str) -> bool:
        calls.append((password, hashed))
        return real(password, hashed)

    monkeypatch.setattr(auth, "_verify", recording)
    return calls


# -- user names ----------------------------------------------------------------------------

ACCEPTED = [
    b"alice",
    b"bob.smith",
    b"a@b.org",
    b"alice+tag@example.org",
    b"user_1",
    b"a-b",
    b"x",
    b"A9",
    b"a" * limits.MAX_USERNAME,
    b"alice.",
]
REFUSED = [
    b"",
    b"../root",
    b"a/b",
    b"/etc",
    b"-x",
    b".x",
    b".",
    b"..",
    b"a..b",
    b"a\x00b",
    b"\x00",
    b"a" * 300,
    b"a" * (limits.MAX_USERNAME + 1),
    b"\xff\xfe",
    b"\xc3\xa9t\xc3\xa9",
    b"a b",
    b" alice",
    b"alice\n",
    b"alice\r",
    b"a\tb",
    b"a\x7fb",
    b"a:b",
    b"a%b",
    b"a\\b",
    b"a*",
    b"$(id)",
    b"a;b",
]


@pytest.mark.parametrize("raw", ACCEPTED)
def test_valid_username_accepts(raw: bytes) -> None:
    assert auth.valid_username(raw) == raw.decode("ascii")


@pytest.mark.parametrize("raw", REFUSED)
def test_valid_username_refuses(raw: bytes) -> None:
    assert auth.valid_username(raw) is None


@given(st.binary(max_size=80))
def test_valid_username_any_bytes(raw: bytes) -> None:
    name = auth.valid_username(raw)
    if name is not None:
        assert name.encode("ascii") == raw
        assert 1 <= len(name) <= limits.MAX_USERNAME
        assert "/" not in name and ".." not in name and name[0] not in "-."
        assert all(c.isascii() and (c.isalnum() or c in "._-@+") for c in name)


# -- each scheme ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", list(HASHERS))
def test_scheme_verifies_right_and_refuses_wrong(tmp_path: Path, scheme: str) -> None:
    hashed = HASHERS[scheme](RIGHT)
    other = HASHERS[scheme]("bob's password")
    authn = _htpasswd(tmp_path, f"bob:{other}\nalice:{hashed}\n")
    assert authn.authenticate("alice", RIGHT.encode())
    assert not authn.authenticate("alice", WRONG.encode())
    assert not authn.authenticate("alice", b"")
    assert not authn.authenticate("alice", RIGHT.encode() + b"\x00")
    assert not authn.authenticate("alice", b"bob's password")
    assert authn.authenticate("bob", b"bob's password")
    assert not authn.authenticate("Alice", RIGHT.encode())


@pytest.mark.parametrize("scheme", list(HASHERS))
@pytest.mark.parametrize("backend", ["crypt(3)", "bcrypt or passlib"])
def test_a_password_is_the_utf8_octets_sent(
    tmp_path: Path, scheme: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the UTF-8 octets of the hashed text verify, whichever backend checks: a latin-1
    fallback made b"p\\xe4ssw\\xf6rd" verify against the hash of "pässwörd" too (two byte strings,
    one hash). A password that is not UTF-8 never verifies."""
    if backend != "crypt(3)":
        if scheme == "yescrypt":
            pytest.skip("only crypt(3) verifies yescrypt")
        monkeypatch.setattr(auth, "_crypt_fn", None)
    authn = _htpasswd(tmp_path, f"alice:{HASHERS[scheme]('pässwörd')}\n")
    assert authn.authenticate("alice", "pässwörd".encode())
    for other in ("latin-1", "cp850", "utf-16-le"):
        assert not authn.authenticate("alice", "pässwörd".encode(other)), other
    assert not authn.authenticate("alice", "pässwörd".encode() + b"\xff")


def test_a_password_that_is_not_utf8_costs_a_verification(tmp_path: Path, spy: list) -> None:
    hashed = HASHERS["sha512_crypt"]("pässwörd")
    authn = _htpasswd(tmp_path, f"alice:{hashed}\n")
    assert not authn.authenticate("alice", "pässwörd".encode("latin-1"))
    assert spy == [("p\ufffdssw\ufffdrd", hashed)]  # against alice's own hash: a wrong password's cost


@pytest.mark.parametrize("scheme", CRYPT_SCHEMES)
def test_crypt_schemes_never_use_passlib(
    tmp_path: Path, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$1$ $5$ $6$ $y$ $2?$ go through crypt(3) at C speed, not passlib's pure Python."""
    authn = _htpasswd(tmp_path, f"alice:{HASHERS[scheme](RIGHT)}\n")

    def forbidden(*args: object) -> bool:
        raise AssertionError("passlib used for a crypt(3) scheme")

    monkeypatch.setattr(auth, "_passlib_verify", forbidden)
    monkeypatch.setattr(auth, "_bcrypt_verify", forbidden)
    assert authn.authenticate("alice", RIGHT.encode())
    assert not authn.authenticate("alice", WRONG.encode())


@pytest.mark.parametrize("scheme", ["bcrypt-2b", "bcrypt-2y", "sha256_crypt", "sha512_crypt", "md5_crypt"])
@pytest.mark.parametrize("crypt_fn", [None, lambda word, salt: "*0"], ids=["missing", "refuses"])
def test_fallback_when_crypt_is_missing_or_refuses(
    tmp_path: Path, scheme: str, crypt_fn: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a usable crypt(3) (3.13 without crypt-r, an old libc), bcrypt/passlib answer."""
    authn = _htpasswd(tmp_path, f"alice:{HASHERS[scheme](RIGHT)}\n")
    monkeypatch.setattr(auth, "_crypt_fn", crypt_fn)
    assert authn.authenticate("alice", RIGHT.encode())
    assert not authn.authenticate("alice", WRONG.encode())


def test_yescrypt_without_crypt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only libxcrypt verifies $y$: no crypt(3) at all is a broken backend, a refusal is False."""
    authn = _htpasswd(tmp_path, f"alice:{_yescrypt(RIGHT)}\n")
    monkeypatch.setattr(auth, "_crypt_fn", None)
    with pytest.raises(auth.AuthUnavailableError):
        authn.authenticate("alice", RIGHT.encode())
    monkeypatch.setattr(auth, "_crypt_fn", lambda word, salt: "*0")
    assert not authn.authenticate("alice", RIGHT.encode())


@pytest.mark.parametrize("scheme", CRYPT_SCHEMES)
def test_crypt_without_the_interpreter_lock_answers_as_crypt(tmp_path: Path, scheme: str) -> None:
    """preload_crypt's crypt_rn (ctypes, no GIL held) gives `_crypt.crypt`'s answers: hashes,
    failure tokens for malformed settings, ValueError for a NUL; and verifies through htpasswd."""
    fn = auth._ctypes_crypt()
    if fn is None:
        pytest.skip("no libxcrypt crypt_rn here")
    reference = _stdlib_crypt().crypt
    hashed = HASHERS[scheme](RIGHT)
    settings = [hashed, hashed[:29], "$2b$", "", "*0", "garbage", "$6$rounds=5000$abcdefgh$"]
    for setting in settings:
        for word in (RIGHT, WRONG, "", "p\xe4ssw\xf6rt"):
            assert fn(word, setting) == reference(word, setting), (word, setting)
    with pytest.raises(ValueError):
        fn("a\0b", hashed)
    authn = _htpasswd(tmp_path, f"alice:{hashed}\n")
    code = (
        "import sys\nfrom pop3d import auth\nauth.preload_crypt()\n"
        "assert auth._crypt_fn.__module__ == 'pop3d.auth', auth._crypt_fn\n"
        "a = auth.HtpasswdAuthenticator(sys.argv[1])\n"
        f"print(a.authenticate('alice', {RIGHT.encode()!r}), a.authenticate('alice', {WRONG.encode()!r}))"
    )
    assert _run(code, authn.path) == "True False"


# -- unknown users cost a verification -----------------------------------------------------


def test_unknown_user_runs_one_verification(tmp_path: Path, spy: list) -> None:
    first = HASHERS["bcrypt-2b"](RIGHT)
    authn = _htpasswd(tmp_path, f"# users\nbroken:plain\nalice:{first}\nbob:{HASHERS['sha512_crypt']('x')}\n")
    assert not authn.authenticate("mallory", RIGHT.encode())
    # Against the first usable entry: the same scheme and cost a real user pays.
    assert spy == [(RIGHT, first)]


def test_known_user_runs_one_verification(tmp_path: Path, spy: list) -> None:
    hashed = HASHERS["sha512_crypt"](RIGHT)
    authn = _htpasswd(tmp_path, f"bob:{HASHERS['bcrypt-2b']('x')}\nalice:{hashed}\n")
    assert authn.authenticate("alice", RIGHT.encode())
    assert spy == [(RIGHT, hashed)]


@pytest.mark.parametrize("content", ["", "# nobody yet\n", "carol:plaintext\n"])
def test_unknown_user_without_usable_entries_uses_dummy(tmp_path: Path, spy: list, content: str) -> None:
    authn = _htpasswd(tmp_path, content)
    assert not authn.authenticate("mallory", b"pw")
    assert spy == [("pw", auth._DUMMY_HASH)]


@pytest.mark.parametrize("name", ["carol", "", "mal\udcffory", "emoji\U0001f600"])
def test_unusable_entry_or_odd_name_still_verifies(tmp_path: Path, spy: list, name: str) -> None:
    authn = _htpasswd(tmp_path, "carol:plaintext\n")
    assert not authn.authenticate(name, b"plaintext")
    assert len(spy) == 1


def test_dummy_hash_costs_a_real_bcrypt() -> None:
    """A dummy crypt(3) rejected at once (failure token) would make misses fast again."""
    assert auth._DUMMY_HASH.startswith(f"$2b${limits.BCRYPT_COST:02d}$")
    assert len(auth._DUMMY_HASH) == 60
    crypt = auth._load_crypt()
    if crypt is None:
        pytest.skip("no crypt(3) here")
    assert crypt("anything", auth._DUMMY_HASH)[:29] == auth._DUMMY_HASH[:29]
    assert not auth._verify("anything", auth._DUMMY_HASH)


def test_overlong_password_refused_before_hashing(tmp_path: Path, spy: list) -> None:
    authn = _htpasswd(tmp_path, f"alice:{HASHERS['sha512_crypt']('x')}\n")
    assert not authn.authenticate("alice", b"x" * (limits.MAX_PASSWORD + 1))
    # The bound is on the octets sent, which are what is hashed.
    assert not authn.authenticate("alice", "é".encode() * (limits.MAX_PASSWORD // 2) + b"x")
    assert spy == []


# -- malformed files -----------------------------------------------------------------------


def test_malformed_lines_are_refused_not_raised(tmp_path: Path) -> None:
    good = HASHERS["bcrypt-2b"](RIGHT)
    sha = HASHERS["sha512_crypt"](RIGHT)
    lines = [
        b"# comment line",
        b"   ",
        b"nocolon",
        b":" + good.encode(),  # empty name
        b"empty:",
        b"carol:" + RIGHT.encode(),  # plaintext: refused
        b"dave:" + good.replace("$2b$", "$2x$").encode(),  # unknown scheme
        b"erin:abJnggxhB/yWI",  # DES crypt (or a 13-character plaintext): refused
        b"frank:{SSHA}" + b"A" * 28,  # not a scheme we verify
        b"grace:" + sha.replace("$", " $", 2).encode(),  # space inside
        b"ivan:$6$rounds=5000$garbage",  # truncated
        b"judy:" + good[:-4].encode() + b"\x00\x01\x02\x03",  # control bytes
        b"ken:" + good.encode() + b"\xff",  # non-ASCII
        b"\xff\xfe:" + good.encode(),  # non-UTF-8 name
        b"mallet:$2b$99$" + good[7:].encode(),  # impossible cost
        b"alice:" + good.encode() + b"\r",  # CRLF files work
        b"heidi:" + good.encode() + b":nginx-style comment",
        b"  # indented comment",
    ]
    authn = _htpasswd(tmp_path, b"\n".join(lines))
    for name in (
        "nocolon",
        "",
        "empty",
        "carol",
        "dave",
        "erin",
        "frank",
        "grace",
        "ivan",
        "judy",
        "ken",
        "mallet",
        "#",
        "\udcff\udcfe",
    ):
        assert authn.authenticate(name, RIGHT.encode()) is False, name
    assert authn.authenticate("alice", RIGHT.encode())
    assert authn.authenticate("heidi", RIGHT.encode())


def test_first_entry_wins(tmp_path: Path) -> None:
    first = HASHERS["md5_crypt"]("first")
    second = HASHERS["md5_crypt"]("second")
    authn = _htpasswd(tmp_path, f"alice:{first}\nalice:{second}\n")
    assert authn.authenticate("alice", b"first")
    assert not authn.authenticate("alice", b"second")
    # An unusable first entry is not skipped in favour of a later one.
    authn = _htpasswd(tmp_path, f"alice:plain\nalice:{second}\n")
    assert not authn.authenticate("alice", b"second")


def test_file_is_read_per_call(tmp_path: Path) -> None:
    authn = _htpasswd(tmp_path, f"alice:{HASHERS['md5_crypt']('old')}\n")
    assert authn.authenticate("alice", b"old")
    _htpasswd(tmp_path, f"alice:{HASHERS['md5_crypt']('new')}\n")
    assert authn.authenticate("alice", b"new")
    assert not authn.authenticate("alice", b"old")


# -- unusable files ------------------------------------------------------------------------


def test_missing_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthUnavailableError):
        auth.HtpasswdAuthenticator(str(tmp_path / "nope")).authenticate("alice", b"pw")


def test_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthUnavailableError):
        auth.HtpasswdAuthenticator(str(tmp_path)).authenticate("alice", b"pw")


def test_fifo_is_unavailable_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(auth.AuthUnavailableError):
        auth.HtpasswdAuthenticator(str(fifo)).authenticate("alice", b"pw")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files")
def test_unreadable_file_is_unavailable(tmp_path: Path) -> None:
    authn = _htpasswd(tmp_path, f"alice:{HASHERS['md5_crypt']('pw')}\n")
    os.chmod(authn.path, 0)
    with pytest.raises(auth.AuthUnavailableError):
        authn.authenticate("alice", b"pw")


def test_unreadable_file_as_root_via_eacces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores modes, so simulate EACCES from open(2)."""
    authn = _htpasswd(tmp_path, f"alice:{HASHERS['md5_crypt']('pw')}\n")

    def eacces(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(auth.os, "open", eacces)
    with pytest.raises(auth.AuthUnavailableError):
        authn.authenticate("alice", b"pw")


def test_oversized_file_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    authn = _htpasswd(tmp_path, f"alice:{HASHERS['md5_crypt']('pw')}\n")
    monkeypatch.setattr(limits, "MAX_HTPASSWD_BYTES", 10)
    with pytest.raises(auth.AuthUnavailableError):
        authn.authenticate("alice", b"pw")


def test_missing_passlib_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An apr1 entry with passlib not installed is a broken backend, not a wrong password."""
    authn = _htpasswd(tmp_path, f"alice:{HASHERS['apr_md5_crypt']('pw')}\n")
    monkeypatch.setitem(sys.modules, "passlib", None)
    monkeypatch.setitem(sys.modules, "passlib.hash", None)
    with pytest.raises(auth.AuthUnavailableError):
        authn.authenticate("alice", b"pw")


# -- hash_password -------------------------------------------------------------------------


@pytest.fixture
def cheap_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "BCRYPT_COST", 4)
    monkeypatch.setattr(limits, "SHA512_CRYPT_ROUNDS", 1000)


@pytest.mark.usefixtures("cheap_costs")
@pytest.mark.parametrize(("scheme", "prefix"), [("bcrypt", "$2b$04$"), ("sha512_crypt", "$6$rounds=1000$")])
@pytest.mark.parametrize("crypt_fn", ["real", None], ids=["crypt", "no-crypt"])
def test_hash_password_round_trip(
    tmp_path: Path, scheme: str, prefix: str, crypt_fn: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    if crypt_fn is None:
        monkeypatch.setattr(auth, "_crypt_fn", None)
    hashed = auth.hash_password("pässwörd", scheme)
    assert hashed.startswith(prefix)
    assert hashed != auth.hash_password("pässwörd", scheme)  # salted
    authn = _htpasswd(tmp_path, f"alice:{hashed}\n")
    assert authn.authenticate("alice", "pässwörd".encode())
    assert not authn.authenticate("alice", b"passwort")


def test_hash_password_default_is_bcrypt_at_configured_cost() -> None:
    assert auth.hash_password("pw").startswith(f"$2b${limits.BCRYPT_COST:02d}$")


@pytest.mark.usefixtures("cheap_costs")
@pytest.mark.parametrize(
    ("password", "scheme"),
    [
        ("pw", "md5_crypt"),
        ("pw", "plaintext"),
        ("a\x00b", "bcrypt"),
        ("x" * 73, "bcrypt"),
        ("x" * (limits.MAX_PASSWORD + 1), "sha512_crypt"),
    ],
)
def test_hash_password_refuses(password: str, scheme: str) -> None:
    with pytest.raises(ValueError):
        auth.hash_password(password, scheme)


# -- import cost ---------------------------------------------------------------------------

HEAVY = (
    "passlib",
    "re",
    "typing",
    "enum",
    "dataclasses",
    "logging",
    "hmac",
    "hashlib",
    "crypt",
    "_crypt",
    "bcrypt",
    "warnings",
    "random",
)


def _run(code: str, *args: str, site: bool = True) -> str:
    flags = [] if site else ["-S"]
    proc = subprocess.run(
        [sys.executable, *flags, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout.strip()


def test_import_is_cheap() -> None:
    """`import pop3d.auth` is on the pre-greeting path: nothing heavy at module level."""
    code = f"import sys, pop3d.auth; print(*[m for m in {HEAVY!r} if m in sys.modules])"
    assert _run(code, site=False) == ""


def test_pam_is_loaded_without_typing_or_threading() -> None:
    """libpam through pop3d's own ctypes binding: starting a PAM transaction (done while the
    client is still typing) imports no python-pam, `typing`, `threading` or `ctypes.util`."""
    if not Path("/etc/pam.d").is_dir():
        pytest.skip("needs Linux-PAM (/etc/pam.d)")
    code = (
        "import sys\nfrom pop3d import auth\nauth.preload_pam('pop3d')\n"
        "assert auth._pam_state.spare is not None, 'no transaction started'\n"
        "print(*[m for m in ('pam', 'typing', 'threading', 'ctypes.util') if m in sys.modules])"
    )
    assert _run(code) == ""


def test_crypt_verification_imports_no_passlib(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{HASHERS['sha512_crypt']('pw')}\nbob:{HASHERS['bcrypt-2b']('pw')}\n")
    code = (
        "import sys\nfrom pop3d.auth import HtpasswdAuthenticator as H\n"
        "a = H(sys.argv[1])\nassert a.authenticate('alice', b'pw')\n"
        "assert a.authenticate('bob', b'pw')\nassert not a.authenticate('eve', b'pw')\n"
        "print(*[m for m in ('passlib', 'crypt', 'hmac', 'hashlib', 're', 'typing') "
        "if m in sys.modules])"
    )
    assert _run(code, str(path)) == ""


def test_passlib_scheme_imports_one_handler(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{HASHERS['apr_md5_crypt']('pw')}\n")
    code = (
        "import sys\nfrom pop3d.auth import HtpasswdAuthenticator as H\n"
        "assert H(sys.argv[1]).authenticate('alice', b'pw')\n"
        "print(*sorted(m for m in sys.modules if m.startswith('passlib.')))"
    )
    loaded = _run(code, str(path)).split()
    assert "passlib.handlers.md5_crypt" in loaded
    assert "passlib.apache" not in loaded
    assert not [m for m in loaded if m.startswith("passlib.handlers.") and not m.endswith("md5_crypt")]


def test_account_is_plain() -> None:
    account = auth.Account("alice", 1000, 1000)
    assert (account.name, account.uid, account.gid, account.home) == ("alice", 1000, 1000, None)
    assert not hasattr(account, "__dict__")
    assert "alice" in repr(account)
