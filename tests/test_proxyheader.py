"""The PROXY protocol header parser (pop3d.proxyheader): byte strings in, a verdict out.

Each verdict is checked where a driver relies on it: a header's `length` ends exactly where the
client's own bytes begin; every proper prefix of a valid header asks for more (never a verdict
that would make the driver read past it or give up too early); an invalid start stays invalid.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from fuzz import fuzz_proxy
from hypothesis import given, settings
from hypothesis import strategies as st
from proxying import v2, v2_inet

from pop3d import limits
from pop3d.proxyheader import NEED_MORE, V2_SIGNATURE, Invalid, ProxyHeader, format_ip, parse

VALID = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\n", "192.0.2.7", 56324),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", "255.255.255.255", 65535),
    (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 110\r\n", "0.0.0.0", 0),
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1024 110\r\n", "2001:db8::1", 1024),
    (b"PROXY TCP6 ::ffff:192.0.2.9 ::ffff:127.0.0.1 7 110\r\n", "192.0.2.9", 7),
    (b"PROXY TCP6 fe80:0:0:1:0:0:0:0 ::1 7 110\r\n", "fe80:0:0:1::", 7),
    (b"PROXY TCP6 " + b":".join([b"ffff"] * 8) * 1 + b" " + b":".join([b"ffff"] * 8) + b" 65535 65535\r\n",
     "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    (b"PROXY UNKNOWN\r\n", None, 0),
    (b"PROXY UNKNOWN anything at all here 1 2\r\n", None, 0),
    (v2_inet("192.0.2.7"), "192.0.2.7", 40000),
    (v2_inet("2001:db8::7", 1), "2001:db8::7", 1),
    (v2_inet("::ffff:192.0.2.8"), "192.0.2.8", 40000),
    (v2_inet("192.0.2.7", tlvs=b"\x05\x00\x04abcd" + b"\x04\x00\x00"), "192.0.2.7", 40000),
    (v2(1, 0x00, b""), None, 0),  # PROXY, UNSPEC: the connection's own peer stands
    (v2(1, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")), None, 0),  # AF_UNIX
    (v2(1, 0x12, bytes(12)), None, 0),  # UDP over IPv4: no TCP client to take
]  # fmt: skip


@pytest.mark.parametrize(("header", "source", "port"), VALID, ids=range(len(VALID)))
def test_a_valid_header_gives_the_client_and_ends_where_the_client_begins(
    header: bytes, source: str | None, port: int
) -> None:
    for after in (b"", b"USER alice\r\n", b"\x16\x03\x01\x02\x00", V2_SIGNATURE, b"PROXY TCP4 x\r\n"):
        result = parse(header + after)
        assert isinstance(result, ProxyHeader), result
        assert (result.length, result.source, result.source_port, result.local) == (
            len(header),
            source,
            port,
            False,
        )
        assert result.version == (2 if header.startswith(V2_SIGNATURE) else 1)


@pytest.mark.parametrize(("header", "source", "port"), VALID, ids=range(len(VALID)))
def test_every_proper_prefix_of_a_valid_header_asks_for_more(
    header: bytes, source: str | None, port: int
) -> None:
    for end in range(len(header)):
        assert parse(header[:end]) is NEED_MORE, header[:end]


def test_a_version_2_local_command_is_the_proxy_itself() -> None:
    for family, body in ((0x00, b""), (0x11, bytes(12)), (0x21, bytes(36)), (0x00, b"\x04\x00\x01x")):
        result = parse(v2(0, family, body) + b"CAPA\r\n")
        assert isinstance(result, ProxyHeader)
        assert (result.local, result.source, result.length) == (True, None, 16 + len(body))


INVALID = [
    b"G",  # the first octet already rules it out
    b"GET / HTTP/1.0\r\n",
    b"USER alice\r\n",
    b"\x16\x03\x01",  # a TLS ClientHello without the header
    b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n",
    b"PROXY  TCP4 192.0.2.7 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7  198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 \r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",  # a bare LF does not end the line
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\rX\r\n",
    b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.256 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7.1 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family and address disagree
    b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 2\r\n",
    b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
    b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n",
    b"PROXY TCP6 1:2:3:4:5:6:7:8:: ::1 1 2\r\n",
    b"PROXY TCP6 12345:: ::1 1 2\r\n",
    b"PROXY TCP6 :1:2:3:4:5:6:7 ::1 1 2\r\n",
    b"PROXY TCP6 ::1.2.3.4.5 ::1 1 2\r\n",
    b"PROXY TCP6 1.2.3.4:: ::1 1 2\r\n",
    b"PROXY TCP6 \xff::1 ::1 1 2\r\n",
    b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\x00\r\n",
    b"PROXY " + b"x" * 101,  # 107 octets and no CRLF
    b"PROXY UNKNOWN" + b" " * 93 + b"\r\n",  # CRLF at octets 107-108: one too many
    V2_SIGNATURE[:11] + b"X",
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a version 2 header
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    V2_SIGNATURE + b"\x21\x41\x00\x00",  # family 4
    V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),  # transport 3
    V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11),  # IPv4 block too short
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # IPv6 block too short
    V2_SIGNATURE + b"\x21\x31\x00\x10" + bytes(16),  # UNIX block too short
    V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", limits.PROXY_HEADER_MAX),  # oversized
]


@pytest.mark.parametrize("data", INVALID, ids=range(len(INVALID)))
def test_anything_else_is_invalid_and_stays_so(data: bytes) -> None:
    result = parse(data)
    assert isinstance(result, Invalid), result
    assert result.reason and "\n" not in result.reason
    for more in (b"\r\n", b"\r\n" * 100, b"1 2\r\n"):
        assert isinstance(parse(data + more), Invalid)


def test_the_reason_never_carries_the_clients_bytes() -> None:
    secret = b"PROXY TCP4 192.0.2.7 198.51.100.1 SECRET 2\r\n"
    result = parse(secret)
    assert isinstance(result, Invalid)
    assert "SECRET" not in result.reason


def test_the_longest_version_1_line_is_accepted() -> None:
    line = b"PROXY UNKNOWN" + b" " * 92 + b"\r\n"
    assert len(line) == 107
    result = parse(line)
    assert isinstance(result, ProxyHeader) and result.length == 107
    assert parse(line[:-1]) is NEED_MORE


def test_the_largest_version_2_header_is_accepted() -> None:
    body = (
        bytes(12)
        + b"\x04"
        + struct.pack("!H", limits.PROXY_HEADER_MAX - 16 - 15)
        + bytes(limits.PROXY_HEADER_MAX - 16 - 15)
    )
    header = v2(1, 0x11, body)
    assert len(header) == limits.PROXY_HEADER_MAX
    result = parse(header)
    assert isinstance(result, ProxyHeader) and result.length == limits.PROXY_HEADER_MAX
    assert isinstance(parse(v2(1, 0x11, body + b"x")), Invalid)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_ipv6_text_is_rfc_5952_as_the_standard_library_writes_it(packed: bytes) -> None:
    address = ipaddress.IPv6Address(packed)
    expected = str(address.ipv4_mapped) if address.ipv4_mapped else str(address)
    assert format_ip(packed) == expected


@settings(max_examples=300, deadline=None)
@given(
    packed=st.binary(min_size=16, max_size=16)
    | st.sampled_from([bytes(16), bytes(15) + b"\1", b"\xfe\x80" + bytes(14)]),
    form=st.sampled_from(["compressed", "exploded", "upper", "ipv4-tail"]),
)
def test_any_textual_form_of_an_ipv6_address_gives_the_same_client(packed: bytes, form: str) -> None:
    address = ipaddress.IPv6Address(packed)
    text = {
        "compressed": address.compressed,
        "exploded": address.exploded,
        "upper": address.compressed.upper(),
    }.get(form, address.exploded[:30] + str(ipaddress.IPv4Address(packed[12:])))
    result = parse(b"PROXY TCP6 %s ::1 1 2\r\n" % text.encode())
    assert isinstance(result, ProxyHeader), (text, result)
    assert result.source == format_ip(packed)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.sampled_from([v for v, _, _ in VALID]).flatmap(
    lambda h: st.integers(0, len(h)).flatmap(lambda n: st.binary(max_size=8).map(lambda b: h[:n] + b))
))  # fmt: skip
def test_any_bytes_give_a_header_need_more_or_invalid_never_an_exception(data: bytes) -> None:
    fuzz_proxy.check(data)
