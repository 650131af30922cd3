"""A connection from a proxy (`proxy_from`): reading its PROXY protocol header, and the client.

The driver asks `proxy_peer` whether the connection's peer is a proxy `proxy_from` names; only
then is a header required, and read by `read_header` before anything is sent: within
`proxy_timeout`, with MSG_PEEK, consuming exactly the header's octets (`proxyheader` promises that
bytes it asks more for are all header), so what follows — the client's POP3 commands, or its TLS
ClientHello — stays in the socket for the session. Anything wrong ends the connection with a log
line and nothing sent. The result is a `Client`: the address every later use takes (log lines,
max_sessions_per_ip, PAM_RHOST) and whether the client is on this host (plaintext_on_loopback).

Under privilege separation the confined pre-authentication child calls `read_header` (no client
byte is parsed as root) and sends the client to root as a frame that root checks with
`checked_address`. A standalone listener learns it through a socket pair made at the fork
(`admit`): the session writes the address, the listener counts it and answers whether the
session may go on.
"""

from __future__ import annotations

import time

from pop3d import limits, log, proxyheader
from pop3d.transport import SessionEnd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config
    from pop3d.transport import Connection

# The octets of a proxy-to-listener report: an address (at most 45 characters) and a newline.
REPORT_MAX = 64
ADMITTED = b"+"
REFUSED = b"-"


class Client:
    """Who the session serves: `address` (canonical text), `local` (on this host), and `proxy`,
    the address of the proxy that relayed it (None for a direct connection)."""

    __slots__ = ("address", "local", "proxy")

    def __init__(self, address: str, local: bool, proxy: str | None = None) -> None:
        self.address = address
        self.local = local
        self.proxy = proxy

    def __repr__(self) -> str:
        return f"Client({self.address!r}, local={self.local}, proxy={self.proxy!r})"


def _socket_module():  # type: ignore[no-untyped-def]
    try:  # the C module under `socket`: the same objects without `socket`'s ~4 ms of imports
        import _socket
    except ImportError:  # pragma: no cover - other interpreters
        import socket as _socket
    return _socket


def _peer(fd: int) -> tuple[str, bool] | None:
    """The socket's peer as canonical text and whether it is on this host; None if the descriptor
    is not an IP socket. Uses no new descriptor (the confined child has none to spare)."""
    _socket = _socket_module()
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family not in (_socket.AF_INET, _socket.AF_INET6):
            return None
        host = str(sock.getpeername()[0])
        packed = _socket.inet_pton(sock.family, host.partition("%")[0])
    except (OSError, ValueError):
        return None
    finally:
        sock.detach()
    address = proxyheader.format_ip(packed)
    return address, _loopback(address)


def _loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def in_networks(address: str, networks: tuple[tuple[bytes, int], ...]) -> bool:
    """True if the canonical `address` lies in one of the (packed network, prefix) pairs."""
    _socket = _socket_module()
    try:
        packed = _socket.inet_pton(_socket.AF_INET6 if ":" in address else _socket.AF_INET, address)
    except (OSError, ValueError):
        return False  # not an IP address ("local"), or one with a scope (fe80::1%eth0)
    value = int.from_bytes(packed, "big")
    bits = 8 * len(packed)
    for network, prefix in networks:
        if len(network) == len(packed) and value >> (bits - prefix) == int.from_bytes(network, "big") >> (
            bits - prefix
        ):
            return True
    return False


def proxy_peer(config: Config, fd: int) -> Client | None:
    """The proxy at the other end of `fd`, if `proxy_from` names it: a header is then required."""
    networks = config.proxy_from
    if not networks:
        return None
    peer = _peer(fd)
    if peer is None or not in_networks(peer[0], networks):  # type: ignore[arg-type]
        return None
    return Client(peer[0], peer[1])


def read_header(config: Config, fd: int, proxy: Client) -> Client:
    """Read the header on `fd` from `proxy` and return the client it names, or log why not and
    raise SessionEnd("proxy-header"). Never consumes an octet after the header."""
    import select

    _socket = _socket_module()
    deadline = time.monotonic() + float(config.proxy_timeout)  # type: ignore[arg-type]
    sock = _socket.socket(fileno=fd)
    received = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                why = f"no complete header within {float(config.proxy_timeout):g} s"  # type: ignore[arg-type]
                break
            try:
                peeked = sock.recv(limits.PROXY_HEADER_MAX - len(received), _socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                why = f"connection failed ({e.strerror})"
                break
            if not peeked:
                why = "connection closed before a complete header"
                break
            verdict = proxyheader.parse(received + peeked)
            if isinstance(verdict, proxyheader.ProxyHeader):
                _consume(sock, verdict.length - len(received))
                return _client(verdict, proxy)
            if isinstance(verdict, proxyheader.Invalid):
                why = verdict.reason
                break
            received += _consume(sock, len(peeked))  # all of it is header: wait for the rest
    finally:
        sock.detach()
    log.warning(f"PROXY header from {proxy.address}: {why}; connection closed")
    raise SessionEnd("proxy-header")


def _consume(sock: object, count: int) -> bytes:
    """Read exactly `count` octets already waiting in the socket (seen with MSG_PEEK)."""
    out = b""
    while len(out) < count:
        chunk = sock.recv(count - len(out))  # type: ignore[attr-defined]
        if not chunk:
            raise SessionEnd("proxy-header")
        out += chunk
    return out


def _client(header: proxyheader.ProxyHeader, proxy: Client) -> Client:
    """The client a header names. Without an IP client in it (a LOCAL health check, UNKNOWN,
    UNSPEC, UNIX) the connection is the proxy's own, as the specification says. A client is on
    this host only if the proxy is and the header names a loopback address."""
    if header.source is None:
        return Client(proxy.address, proxy.local, proxy.address)
    return Client(header.source, proxy.local and _loopback(header.source), proxy.address)


def checked_address(text: bytes) -> str | None:
    """An address reported by another process (the confined child, a session to its listener),
    as canonical text; None unless it is exactly the canonical text of an IP address."""
    if not 0 < len(text) <= REPORT_MAX or not text.isascii():
        return None
    _socket = _socket_module()
    address = text.decode()
    try:
        packed = _socket.inet_pton(_socket.AF_INET6 if ":" in address else _socket.AF_INET, address)
    except (OSError, ValueError):
        return None
    return address if proxyheader.format_ip(packed) == address else None


def refuse(config: Config, conn: Connection) -> None:
    """The listener said no (max_sessions_per_ip): say so, as it would itself, and end."""
    from pop3d import protocol

    if config.tls != "implicit":  # a TLS client would take plaintext for a bad record
        try:
            conn.write_all(protocol.REPLIES["busy_address"], 1.0)
        except SessionEnd:
            pass


def admit(fd: int, client: Client) -> bool:
    """Tell the standalone listener who the client is (`fd`: the socket pair made at the fork)
    and wait for its verdict on max_sessions_per_ip. A listener gone counts as a yes: it can no
    longer count anyone, and the sessions it started go on."""
    import os

    try:
        os.write(fd, client.address.encode() + b"\n")
        os.set_blocking(fd, True)
        answer = os.read(fd, 1)
    except OSError:
        answer = b""
    finally:
        os.close(fd)
    return answer != REFUSED
