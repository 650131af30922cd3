"""Configuration: the `[pop3d]` section of an INI file plus long options, into one frozen object.

Parsed by hand, not with configparser/argparse: this runs before the greeting of every connection,
and those modules cost more start-up time than the whole session's protocol handling. No side
effects here: files named by keys are checked by the code that uses them.
"""

from __future__ import annotations

import os

from pop3d import limits, names

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEFAULT_CONFIG_FILE = "/etc/pop3d.conf"
EX_USAGE = 64
EX_CONFIG = 78  # sysexits.h: configuration error


class ConfigError(Exception):
    """A bad key or value; the message names the key and is shown to the administrator."""

    def __init__(self, message: str, status: int = EX_CONFIG) -> None:
        super().__init__(message)
        self.status = status


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def check(key: str, value: str) -> str:
        value = value.strip().lower()
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _number(low: float, high: float, kind: type = float) -> Callable[[str, str], float]:
    def check(key: str, value: str) -> float:
        try:
            number = kind(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not a {kind.__name__} number") from None
        if not low <= number <= high or number != number:
            raise ConfigError(f"{key}: {value!r} is outside {low:g}..{high:g}")
        return number

    return check


def _text(key: str, value: str) -> str:
    value = value.strip()
    if "\0" in value:
        raise ConfigError(f"{key}: contains a NUL byte")
    return value


def _path(key: str, value: str) -> str:
    value = _text(key, value)
    if value and not value.startswith("/"):
        raise ConfigError(f"{key}: {value!r} must be an absolute path")
    return value


def _bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ConfigError(f"{key}: {value!r} is not yes or no")


def _locks(key: str, value: str) -> tuple[str, ...]:
    methods = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    for method in methods:
        if method not in ("dotlock", "fcntl", "flock"):
            raise ConfigError(f"{key}: {method!r} is not one of dotlock, fcntl, flock")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"{key}: a method is listed twice")
    return methods


def _mailbox(key: str, value: str) -> str:
    value = _text(key, value)
    rest = value.replace("%%", "")
    for i, char in enumerate(rest):
        if char == "%" and rest[i + 1 : i + 2] not in ("u", "h"):
            raise ConfigError(f"{key}: {value!r}: only %u, %h and %% may follow %")
    if "%u" not in rest and "%h" not in rest:
        raise ConfigError(f"{key}: {value!r} must contain %u or %h (one maildrop per user)")
    if not value.startswith(("/", "%h")):
        raise ConfigError(f"{key}: {value!r} must be an absolute path")
    try:
        names.check_template(value)
    except names.ReservedNameError as e:
        raise ConfigError(f"{key}: {e}") from None
    return value


def _chroot(key: str, value: str) -> str:
    value = _path(key, value)
    if value.rstrip("/") == "":
        raise ConfigError(f"{key}: {value!r} must be an absolute path other than /")
    return value


def _log(key: str, value: str) -> str:
    value = _text(key, value)
    if value not in ("syslog", "stderr") and not value.startswith("/"):
        raise ConfigError(f"{key}: {value!r} is not syslog, stderr or an absolute file path")
    return value


def _networks(key: str, value: str) -> tuple[tuple[bytes, int], ...]:
    """Addresses and CIDR networks, IPv4 and IPv6, separated by commas or spaces ->
    ((packed network, prefix length), ...). A network with host bits set is refused (a typo that
    would trust more or fewer hosts than meant)."""
    from _socket import AF_INET, AF_INET6, inet_pton

    networks = []
    for item in value.replace(",", " ").split():
        address, slash, length = item.partition("/")
        family = AF_INET6 if ":" in address else AF_INET
        try:
            packed = inet_pton(family, address)
        except (OSError, ValueError):
            raise ConfigError(f"{key}: {item!r} is not an IP address or network") from None
        bits = 8 * len(packed)
        if not slash:
            prefix = bits
        elif length.isascii() and length.isdigit() and int(length) <= bits:
            prefix = int(length)
        else:
            raise ConfigError(f"{key}: {item!r}: the prefix length must be 0..{bits}")
        if int.from_bytes(packed, "big") & ((1 << (bits - prefix)) - 1):
            raise ConfigError(f"{key}: {item!r} has host bits set beyond /{prefix}")
        networks.append((packed, prefix))
    return tuple(networks)


# key -> (default, parser). Every key is also a long option: --mail-user for mail_user.
KEYS: dict[str, tuple[object, Callable[[str, str], object]]] = {
    "auth": ("system", _choice("system", "htpasswd")),
    "htpasswd": ("", _path),
    "mailbox": ("/var/mail/%u", _mailbox),
    "mail_user": ("", _text),
    "locks": (("dotlock", "fcntl"), _locks),
    "lock_timeout": (limits.DEFAULT_LOCK_TIMEOUT, _number(0, 3600)),
    "stale_lock": (limits.DEFAULT_STALE_LOCK, _number(1, 86400)),
    # session: the `locks` are held from login to the end (today's behaviour, safe beside local
    # mail readers); brief: only to scan and to update, so MDAs deliver while a session is open
    # (issue 17). The default stays session: brief trusts readers not to rewrite mid-session.
    "mda_locks": ("session", _choice("session", "brief")),
    "timeout": (limits.DEFAULT_IDLE_TIMEOUT, _number(1, 86400)),
    "login_timeout": (limits.DEFAULT_LOGIN_TIMEOUT, _number(1, 86400)),
    "line_timeout": (limits.COMMAND_LINE_TIMEOUT, _number(1, 86400)),
    "write_timeout": (limits.WRITE_TIMEOUT, _number(1, 86400)),
    "mbox_format": ("mboxo", _choice("mboxo", "mboxrd")),
    # A cache (docs/DATA-SAFETY.md): /var/cache, whose contents may be deleted at any time.
    "index_dir": (limits.DEFAULT_INDEX_DIR, _path),
    "log": ("syslog", _log),
    "pam_service": ("pop3d", _text),
    "first_uid": (1000, _number(1, 2**31, int)),
    # As root: the account that runs the pre-authentication dialogue ("" = no separation).
    "preauth_user": ("nobody", _text),
    # Where that dialogue is chrooted: made at start if missing, root's, empty. Not under /tmp,
    # which a local user can fill (popa3d: /var/lib/popa3d; Dovecot: base_dir/empty).
    "preauth_chroot": ("/run/pop3d/empty", _chroot),
    "auth_failure_delay": (limits.DEFAULT_AUTH_FAILURE_DELAY, _number(0, 60)),
    "max_auth_failures": (limits.DEFAULT_MAX_AUTH_FAILURES, _number(1, 100, int)),
    "max_sessions": (100, _number(1, 100000, int)),
    "max_sessions_per_ip": (10, _number(1, 100000, int)),
    # IPv6 clients are counted per /64: a site gets a /64 (RFC 6177) and picks its addresses in it
    # at will (RFC 8981 privacy addresses), so a count per address would not bound anyone.
    "max_sessions_per_ip_v6_prefix": (64, _number(1, 128, int)),
    # inetd `wait` mode only: the listener inetd started exits after this many seconds without a
    # session (0: never), so that a new configuration, or an inetd restarted and wanting its
    # port back, waits at most that long; the next connection starts it again (~50 ms).
    "idle_exit": (limits.DEFAULT_IDLE_EXIT, _number(0, 86400)),
    # TLS (issue 5). None = decided in _check from the other keys.
    "tls": (None, _choice("none", "starttls", "implicit")),
    "tls_cert": ("", _path),
    "tls_key": ("", _path),
    # AEAD, forward-secret suites only (issue 12): see limits.TLS12_CIPHERS.
    "tls_ciphers": (limits.TLS12_CIPHERS, _text),
    "tls_min_version": ("tlsv1.2", _choice("tlsv1.2", "tlsv1.3")),
    "plaintext_auth": (None, _choice("yes", "tls")),
    "plaintext_on_loopback": (False, _bool),
    # PROXY protocol (issue 14): the proxies whose connections start with a header naming the
    # client. Empty: nobody's (a header is then an ordinary bad command line).
    "proxy_from": ((), _networks),
    # Seconds a proxy has to send its header (it sends it at once; see limits).
    "proxy_timeout": (limits.DEFAULT_PROXY_TIMEOUT, _number(0.1, 60)),
}

# Options that are not configuration keys: name -> takes a value.
_COMMAND_OPTIONS = {"config": True, "listen": True, "daemon": False, "pidfile": True}


class Config:
    """All settings for one process; read-only once built."""

    def __init__(self, values: dict[str, object]) -> None:
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> object:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Config is read-only")

    def as_dict(self) -> dict[str, object]:
        return dict(self._values)


HELP = """\
usage: pop3d [-c FILE] [--listen [HOST:]PORT ...] [--daemon] [--pidfile FILE] [--KEY VALUE ...]

Serve one POP3 session on standard input/output (inetd mode), or with --listen accept
connections and fork a session per connection. Configuration: the [pop3d] section of FILE
(default /etc/pop3d.conf when it exists); every key is also a long option, which wins.

keys: {keys}
"""


def parse_argv(argv: Sequence[str]) -> tuple[dict[str, str], dict[str, object]]:
    """Split the command line into configuration keys and command options (raw strings)."""
    keys: dict[str, str] = {}
    options: dict[str, object] = {"listen": []}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            raise ConfigError(HELP.format(keys=", ".join(KEYS)), status=0)
        if arg == "--version":
            from pop3d import __version__

            raise ConfigError(f"pop3d {__version__}", status=0)
        if arg == "-c":
            arg = "--config"
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (see --help)", status=EX_USAGE)
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name in _COMMAND_OPTIONS and not _COMMAND_OPTIONS[name]:
            if eq:
                raise ConfigError(f"--{name} takes no value", status=EX_USAGE)
            options[name] = True
            continue
        if name not in KEYS and name not in _COMMAND_OPTIONS:
            raise ConfigError(f"unknown option --{name.replace('_', '-')}", status=EX_USAGE)
        if not eq:
            if i >= len(args):
                raise ConfigError(f"--{name.replace('_', '-')} needs a value", status=EX_USAGE)
            value = args[i]
            i += 1
        if name == "listen":
            options["listen"].append(value)  # type: ignore[union-attr]
        elif name in _COMMAND_OPTIONS:
            options[name] = value
        else:
            keys[name] = value
    return keys, options


def read_file(path: str) -> dict[str, str]:
    """The `[pop3d]` section of an INI file: `key = value`, `#`/`;` comments, no interpolation."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    values: dict[str, str] = {}
    section = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{path}:{number}: malformed section header")
            section = line[1:-1].strip()
            if section != "pop3d":
                raise ConfigError(f"{path}:{number}: unknown section [{section}] (only [pop3d])")
            continue
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"{path}:{number}: expected 'key = value'")
        if section is None:
            raise ConfigError(f"{path}:{number}: '{key}' outside the [pop3d] section")
        if key not in KEYS:
            raise ConfigError(f"{path}:{number}: unknown key '{key}'")
        if key in values:
            raise ConfigError(f"{path}:{number}: key '{key}' given twice")
        values[key] = value.strip()
    return values


def load(argv: Sequence[str]) -> Config:
    """Build the configuration from the command line and the file it names (or the default)."""
    keys, options = parse_argv(argv)
    path = options.get("config")
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    raw: dict[str, str] = read_file(str(path)) if path else {}
    raw.update(keys)
    values: dict[str, object] = {}
    for key, (default, parse) in KEYS.items():
        values[key] = parse(key, raw[key]) if key in raw else default
    values.update(options)
    _check(values)
    return Config(values)


def _check(values: dict[str, object]) -> None:
    """Rules that involve more than one key."""
    if values["auth"] == "htpasswd" and not values["htpasswd"]:
        raise ConfigError("auth = htpasswd needs the htpasswd key (path of the password file)")
    if (values.get("daemon", False)) and not values["listen"]:
        raise ConfigError("--daemon needs --listen", status=EX_USAGE)
    if "%h" in str(values["mailbox"]) and values["auth"] == "htpasswd":
        raise ConfigError("mailbox: %h needs system accounts (auth = system)")
    _check_tls(values)


def _check_tls(values: dict[str, object]) -> None:
    """TLS is on (STLS) as soon as a certificate is given; then passwords need TLS by default."""
    if values["tls"] is None:
        values["tls"] = "starttls" if values["tls_cert"] else "none"
    if values["tls"] != "none" and not values["tls_cert"]:
        raise ConfigError(f"tls = {values['tls']} needs tls_cert (the certificate file)")
    if values["plaintext_auth"] is None:
        values["plaintext_auth"] = "yes" if values["tls"] == "none" else "tls"
    if values["plaintext_auth"] == "tls" and values["tls"] == "none" and not values["plaintext_on_loopback"]:
        raise ConfigError(
            "plaintext_auth = tls without TLS (tls_cert) or plaintext_on_loopback: nobody could log in"
        )
