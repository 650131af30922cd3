"""An `auth_http` service for nginx's mail proxy: which pop3d back end serves a user.

nginx (`mail { auth_http ...; }`, the module ngx_mail_auth_http_module) asks an HTTP server, for
every login, where to send the client: `GET` with `Auth-User`, `Auth-Pass`, `Auth-Protocol`,
`Client-IP`... headers; the answer is in the response headers (`Auth-Status: OK`, `Auth-Server`,
`Auth-Port`). This service answers from a map file of `user address:port` lines and nothing
else. It does not check the password: nginx passes the client's USER and PASS on to the back
end, and the back end checks them as it checks any client (PAM or htpasswd, padded failures). So
the password is never read here, let alone logged.

    python3 -m pop3d.authhttp --listen 127.0.0.1:9110 --map /etc/pop3d/backends [--user NAME]
                              [--secret-file FILE] [--log syslog|stderr|/path]

The map file (re-read when it changes): `#` comments; `user  address:port` (IPv4, or [IPv6]:port:
nginx takes an address, not a host name); one `*  address:port` line routes every other name, so
that an unknown user gets the same answer as a known one with a bad password, from a back end.
With `--secret-file`, a request must carry `X-Auth-Key: <the file's first line>` (nginx:
`auth_http_header X-Auth-Key "...";`). Started as root it needs `--user` and drops to that account
once the port is bound. Requests are bounded (8 KiB, 10 s) and at most 64 are served at once.
It is never on pop3d's path to the greeting: a separate program, for nginx only.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from pop3d import auth, log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# A request head larger than this is not nginx's (its requests are a few hundred octets).
MAX_REQUEST = 8192
# Seconds a client has to send its whole request.
REQUEST_TIMEOUT = 10.0
# Requests served at once; more wait in the listen queue.
MAX_CONCURRENT = 64
MAX_MAP_BYTES = 16 * 1024 * 1024
SECRET_HEADER = b"x-auth-key"

# Answers (nginx reads only the headers). Without Auth-Wait nginx ends the client's session.
_REFUSED = b"Invalid login or password"
_UNAVAILABLE = b"Temporary server problem, try again later"


class MapError(Exception):
    """The map file cannot be used; the message names the file and line."""


class Routes:
    """User name -> (address, port), and the route for every other name (or None)."""

    __slots__ = ("default", "users")

    def __init__(self, users: dict[str, tuple[str, int]], default: tuple[str, int] | None) -> None:
        self.users = users
        self.default = default

    def lookup(self, name: str | None) -> tuple[str, int] | None:
        if name is not None and name in self.users:
            return self.users[name]
        return self.default


def parse_backend(text: str) -> tuple[str, int] | None:
    """`192.0.2.1:110` or `[2001:db8::1]:110` -> (address, port); None if not that."""
    if text.startswith("["):
        address, bracket, port = text[1:].partition("]:")
        family = socket.AF_INET6
        if not bracket:
            return None
    else:
        address, _, port = text.rpartition(":")
        family = socket.AF_INET
    try:
        socket.inet_pton(family, address)
    except (OSError, ValueError):
        return None
    if not port.isdigit() or not 0 < int(port) < 65536 or not port.isascii():
        return None
    return address, int(port)


def parse_map(text: str, name: str = "map") -> Routes:
    users: dict[str, tuple[str, int]] = {}
    default = None
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{name}:{number}"
        if len(fields) != 2:
            raise MapError(f"{where}: expected `user address:port`")
        user, backend = fields
        route = parse_backend(backend)
        if route is None:
            raise MapError(f"{where}: {backend!r} is not address:port (an IP address, not a name)")
        if user == "*":
            if default is not None:
                raise MapError(f"{where}: a second `*` line")
            default = route
            continue
        if auth.valid_username(user.encode("utf-8", "surrogateescape")) != user:
            raise MapError(f"{where}: {user!r} is not a name pop3d accepts")
        if user in users:
            raise MapError(f"{where}: {user!r} is listed twice")
        users[user] = route
    return Routes(users, default)


class MapFile:
    """The map, read again whenever the file changes (inode, size or mtime); a broken new version
    is logged and the last good one kept."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._lock = threading.Lock()
        self.routes = self._read()

    def _read(self) -> Routes:
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_MAP_BYTES + 1)
        if len(data) > MAX_MAP_BYTES:
            raise MapError(f"{self.path}: larger than {MAX_MAP_BYTES} octets")
        routes = parse_map(data.decode("utf-8", "surrogateescape"), self.path)
        self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        return routes

    def current(self) -> Routes:
        with self._lock:
            try:
                st = os.stat(self.path)
                if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
                    self.routes = self._read()
                    log.info(f"auth_http: map {self.path} reloaded ({len(self.routes.users)} users)")
            except (OSError, MapError) as e:
                self._stamp = None  # try again at the next request
                log.error(f"auth_http: keeping the previous map: {e}")
            return self.routes


def parse_head(head: bytes) -> dict[bytes, bytes] | None:
    """The request's headers (lower-case names, first occurrence) or None if it is not a GET."""
    lines = head.split(b"\r\n")
    request = lines[0].split(b" ")
    if len(request) != 3 or request[0] != b"GET" or not request[2].startswith(b"HTTP/1."):
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name:
            return None
        headers.setdefault(name.strip().lower(), value.strip())
    return headers


def unescape(value: bytes) -> bytes:
    """nginx %-escapes the user name (ngx_escape_uri, NGX_ESCAPE_MAIL_AUTH): undo it. A `%` not
    followed by two hex digits stays as it is."""
    parts = value.split(b"%")
    out = bytearray(parts[0])
    for part in parts[1:]:
        if len(part) >= 2 and all(c in _HEX for c in part[:2]):
            out.append(int(part[:2], 16))
            out += part[2:]
        else:
            out += b"%" + part
    return bytes(out)


_HEX = frozenset(b"0123456789abcdefABCDEF")


def answer(
    routes: Routes, headers: dict[bytes, bytes] | None, secret: bytes | None = None
) -> tuple[bytes, str]:
    """The HTTP response for one request, and a line for the log (user, client, decision; never
    the password)."""
    if headers is None:
        return _response(_UNAVAILABLE), "malformed request"
    client = log.escape(headers.get(b"client-ip", b"?"), 64)
    if secret is not None:
        import hmac

        if not hmac.compare_digest(headers.get(SECRET_HEADER, b""), secret):
            return _response(_UNAVAILABLE), f"rip={client}: request without the shared secret"
    raw_user = unescape(headers.get(b"auth-user", b""))
    shown = log.escape(raw_user, 64)
    protocol = headers.get(b"auth-protocol", b"")
    method = headers.get(b"auth-method", b"")
    if protocol != b"pop3" or method not in (b"plain", b"login"):
        why = f"protocol {log.escape(protocol, 16)} method {log.escape(method, 16)} not served"
        return _response(_REFUSED), f"user={shown} rip={client}: {why}"
    route = routes.lookup(auth.valid_username(raw_user))
    if route is None:
        return _response(_REFUSED), f"user={shown} rip={client}: no back end for this name"
    address, port = route
    response = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: %s\r\nAuth-Port: %d\r\n" % (
        address.encode(),
        port,
    )
    return response + b"Content-Length: 0\r\n\r\n", f"user={shown} rip={client}: to {address}:{port}"


def _response(status: bytes) -> bytes:
    return b"HTTP/1.0 200 OK\r\nAuth-Status: " + status + b"\r\nContent-Length: 0\r\n\r\n"


def read_head(conn: socket.socket) -> bytes | None:
    """The request head, up to its empty line; None if too large, too slow or cut short."""
    import time

    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    while b"\r\n\r\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > MAX_REQUEST:
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0]
    return head if len(head) <= MAX_REQUEST else None


class Service:
    """The accept loop: one thread per request, at most MAX_CONCURRENT at once."""

    def __init__(self, sock: socket.socket, mapfile: MapFile, secret: bytes | None = None) -> None:
        self.sock = sock
        self.mapfile = mapfile
        self.secret = secret
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)

    def handle(self, conn: socket.socket) -> None:
        try:
            head = read_head(conn)
            if head is None:
                log.warning("auth_http: request too large, too slow or cut short")
                return
            response, line = answer(self.mapfile.current(), parse_head(head), self.secret)
            log.info(f"auth_http: {line}")
            conn.settimeout(REQUEST_TIMEOUT)
            conn.sendall(response)
        except OSError:
            pass
        finally:
            conn.close()
            self.slots.release()

    def serve_forever(self) -> None:
        while True:
            self.slots.acquire()
            try:
                conn, _ = self.sock.accept()
            except OSError:
                self.slots.release()
                continue
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()


USAGE = (
    "usage: python3 -m pop3d.authhttp --listen ADDRESS:PORT --map FILE [--user NAME] [--secret-file FILE]"
    " [--log TARGET]"
)


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {"log": "syslog"}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name = arg[2:].replace("-", "_")
        if (
            not arg.startswith("--")
            or name not in ("listen", "map", "user", "secret_file", "log")
            or not args
        ):
            raise SystemExit(USAGE)
        options[name] = args.pop(0)
    if "listen" not in options or "map" not in options:
        raise SystemExit(USAGE)
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    log.setup(options["log"])
    listen = parse_backend(options["listen"])
    if listen is None:
        raise SystemExit(f"--listen {options['listen']!r}: expected address:port or [address]:port")
    if os.geteuid() == 0 and "user" not in options:
        raise SystemExit("auth_http: refusing to run as root: give --user NAME (or start it as that user)")
    try:
        mapfile = MapFile(options["map"])
        secret = None
        if "secret_file" in options:
            with open(options["secret_file"], "rb") as f:
                secret = f.readline().strip()
            if not secret:
                raise SystemExit(f"{options['secret_file']}: empty secret")
    except (OSError, MapError) as e:
        raise SystemExit(f"auth_http: {e}") from None
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(listen)
    except OSError as e:
        raise SystemExit(f"auth_http: cannot listen on {options['listen']}: {e.strerror}") from None
    sock.listen(128)
    if "user" in options and os.geteuid() == 0:
        import pwd

        from pop3d import privs

        try:
            entry = pwd.getpwnam(options["user"])
        except KeyError:
            raise SystemExit(f"auth_http: no user {options['user']!r}") from None
        privs.become(entry.pw_uid, entry.pw_gid, [])
    log.info(
        f"auth_http: listening on {options['listen']}, {len(mapfile.routes.users)} users in {mapfile.path}"
    )
    try:
        Service(sock, mapfile, secret).serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
