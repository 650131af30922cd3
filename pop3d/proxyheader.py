"""The PROXY protocol header (HAProxy's specification, versions 1 and 2), without I/O.

A proxy that relays a client's connection (HAProxy `send-proxy`/`send-proxy-v2`, nginx
`proxy_protocol on`) sends this header first, so that the server learns who the client is. The
driver asks for it only from the peers `proxy_from` names; it feeds everything received so far to
`parse`, which answers with a complete `ProxyHeader` (and how many octets it took: nothing after
it is the header's), `NEED_MORE`, or `Invalid` — never an exception, whatever the bytes.

`NEED_MORE` also promises that every octet given belongs to the header if a valid one follows, so
a driver may consume them and wait for more without reading into the client's own stream.
Parsing is strict (the specification: "any sequence which does not exactly match the protocol
must be discarded"), and bounded: a version 1 line within 107 octets, a version 2 header within
`limits.PROXY_HEADER_MAX`.
"""

from __future__ import annotations

from pop3d import limits

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The longest version 1 line, CRLF included ("PROXY UNKNOWN" + two IPv6 addresses + two ports).
V1_MAX = 107
V2_FIXED = 16  # signature, version and command, family and transport, address length
# Version 2 address blocks: family nibble -> octets of (source, destination, ports).
_V2_ADDRESS = {1: 12, 2: 36, 3: 216}
_PRINTABLE = frozenset(range(0x20, 0x7F))
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class ProxyHeader:
    """A complete, valid header.

    `local` is True for a version 2 LOCAL command (the proxy's own connection: a health check).
    `source` is the client's address as canonical text (IPv4 dotted quad; IPv6 as RFC 5952, an
    IPv4-mapped one as IPv4), or None when the header names no IP client (version 1 UNKNOWN,
    version 2 LOCAL, UNSPEC, UNIX or datagram): the connection's own peer then stands, as the
    specification says. `length` is the number of octets the header took.
    """

    __slots__ = ("length", "local", "source", "source_port", "version")

    def __init__(
        self, version: int, length: int, source: str | None = None, source_port: int = 0, local: bool = False
    ) -> None:
        self.version = version
        self.length = length
        self.source = source
        self.source_port = source_port
        self.local = local

    def __repr__(self) -> str:
        return (
            f"ProxyHeader(v{self.version}, length={self.length}, source={self.source!r}, "
            f"port={self.source_port}, local={self.local})"
        )


class NeedMore:
    """The bytes so far are a prefix of a valid header: read more (all of them are header)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


class Invalid:
    """Not a valid header; `reason` says why, in words for the log (never the client's bytes)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Invalid({self.reason!r})"


def parse(data: bytes) -> ProxyHeader | NeedMore | Invalid:
    """The header at the start of `data` (everything received so far), judged as above."""
    if not data:
        return NEED_MORE
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return _parse_v1(data)


# ------------------------------------------------------------------------------ version 2


def _parse_v2(data: bytes) -> ProxyHeader | NeedMore | Invalid:
    known = min(len(data), len(V2_SIGNATURE))
    if data[:known] != V2_SIGNATURE[:known]:
        return Invalid("not a PROXY protocol header")
    if len(data) < V2_FIXED:
        return NEED_MORE
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if version != 2:
        return Invalid(f"version 2 signature with version {version}")
    if command > 1:
        return Invalid(f"unknown version 2 command {command}")
    if family > 3 or transport > 2:
        return Invalid(f"unknown version 2 family/transport 0x{data[13]:02x}")
    if length > limits.PROXY_HEADER_MAX:
        return Invalid(f"version 2 header of {length} octets (at most {limits.PROXY_HEADER_MAX})")
    if command == 1 and length - V2_FIXED < _V2_ADDRESS.get(family, 0):
        return Invalid("version 2 address block shorter than its family")
    if len(data) < length:
        return NEED_MORE
    if command == 0:
        return ProxyHeader(2, length, local=True)
    if transport != 1 or family not in (1, 2):
        return ProxyHeader(2, length)  # UNSPEC, UNIX or datagram: no IP client to take
    size = 4 if family == 1 else 16
    source = bytes(data[16 : 16 + size])
    port = int.from_bytes(data[16 + 2 * size : 18 + 2 * size], "big")
    return ProxyHeader(2, length, format_ip(source), port)


# ------------------------------------------------------------------------------ version 1


def _parse_v1(data: bytes) -> ProxyHeader | NeedMore | Invalid:
    known = min(len(data), len(V1_PREFIX))
    if data[:known] != V1_PREFIX[:known]:
        return Invalid("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    line = data[: end if end >= 0 else min(len(data), V1_MAX)]
    if line.endswith(b"\r") and end < 0:
        line = line[:-1]  # the CR of a CRLF whose LF is still to come
    if not all(c in _PRINTABLE for c in line):
        return Invalid("version 1 line with a control or 8-bit octet")
    if end < 0:
        if len(data) >= V1_MAX:
            return Invalid(f"version 1 line without CRLF in {V1_MAX} octets")
        return NEED_MORE
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        return ProxyHeader(1, end + 2)  # the rest of the line is to be ignored
    if protocol not in (b"TCP4", b"TCP6"):
        return Invalid("version 1 protocol is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        return Invalid("version 1 line without exactly four address fields")
    parse_address = _ipv4 if protocol == b"TCP4" else _ipv6
    source, destination = parse_address(fields[2]), parse_address(fields[3])
    source_port, destination_port = _port(fields[4]), _port(fields[5])
    if source is None or destination is None:
        return Invalid(f"version 1 {protocol.decode()} line with a malformed address")
    if source_port is None or destination_port is None:
        return Invalid("version 1 line with a malformed port")
    return ProxyHeader(1, end + 2, format_ip(source), source_port)


def _decimal(text: bytes, digits: int) -> int | None:
    """1 to `digits` decimal digits without a leading zero (the specification forbids them:
    they could be read as octal), or None."""
    if not 1 <= len(text) <= digits or not all(c in _DIGITS for c in text) or text[:1] == b"0" != text:
        return None
    return int(text)


def _port(text: bytes) -> int | None:
    value = _decimal(text, 5)
    return value if value is not None and value <= 65535 else None


def _ipv4(text: bytes) -> bytes | None:
    """Four decimal numbers 0..255 joined by dots, no leading zeros (the specification's form)."""
    parts = text.split(b".")
    if len(parts) != 4:
        return None
    values = [_decimal(part, 3) for part in parts]
    if any(value is None or value > 255 for value in values):
        return None
    return bytes(values)  # type: ignore[arg-type]


def _ipv6(text: bytes) -> bytes | None:
    """Groups of 1 to 4 hex digits joined by colons, at most one `::`, optionally ending with an
    IPv4 dotted quad (what inet_ntop writes for a mapped address); exactly 128 bits."""
    if len(text) > 45 or text.count(b"::") > 1:
        return None
    head, double, tail = text.partition(b"::")
    if double:
        before, after = _hex_groups(head), _hex_groups(tail, ipv4_last=True)
    else:
        before, after = _hex_groups(head, ipv4_last=True), []
    if before is None or after is None:
        return None
    missing = 8 - len(before) - len(after)
    if missing < (1 if double else 0) or (missing and not double):
        return None
    groups = before + [0] * missing + after
    return b"".join(g.to_bytes(2, "big") for g in groups)


def _hex_groups(text: bytes, ipv4_last: bool = False) -> list[int] | None:
    """The 16-bit groups of one side of `::` (empty text: none); None if malformed."""
    if not text:
        return []
    parts = text.split(b":")
    groups: list[int] = []
    for i, part in enumerate(parts):
        if ipv4_last and i == len(parts) - 1 and b"." in part:
            quad = _ipv4(part)
            if quad is None:
                return None
            groups += [quad[0] << 8 | quad[1], quad[2] << 8 | quad[3]]
        elif 1 <= len(part) <= 4 and all(c in _HEX for c in part):
            groups.append(int(part, 16))
        else:
            return None
    return groups


def format_ip(packed: bytes) -> str:
    """Canonical text of a 4- or 16-octet address: dotted quad; RFC 5952 for IPv6 (lower case,
    no leading zeros, the longest run of two or more zero groups as `::`, the first if tied); an
    IPv4-mapped IPv6 address as its IPv4 address, as the server shows a dual-stack client."""
    if len(packed) == 4:
        return ".".join(str(b) for b in packed)
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return format_ip(packed[12:])
    groups = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, 16, 2)]
    best, best_len, run_start = -1, 1, -1
    for i in range(9):
        if i < 8 and groups[i] == 0:
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            if i - run_start > best_len:
                best, best_len = run_start, i - run_start
            run_start = -1
    if best < 0:
        return ":".join(f"{g:x}" for g in groups)
    left = ":".join(f"{g:x}" for g in groups[:best])
    right = ":".join(f"{g:x}" for g in groups[best + best_len :])
    return f"{left}::{right}"
