"""TLS adapter: the server's SSLContext, checked at start, and the server side of a handshake.

Imported only when TLS is configured: `ssl` (and the `socket`, `re`, `enum` it pulls in) costs
every connection start-up time. It knows nothing of POP3: it wraps a connected socket given as a
file descriptor and reports failures as exceptions whose text names the configuration key.
"""

from __future__ import annotations

import binascii
import os
import select
import socket
import ssl
import time

from pop3d import limits
from pop3d.config import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config

MIN_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}

_PEM_CERT = (b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----")


class TlsConfigError(ConfigError):
    """The certificate, key or TLS settings cannot serve: a configuration error (exit 78)."""


class HandshakeError(Exception):
    """The client did not complete the handshake (failure, timeout, or it went away); for the log."""


_context: ssl.SSLContext | None = None


def server_context(config: Config) -> ssl.SSLContext:
    """The process's one server context, built (and checked) on first use.

    The command line builds it before serving, so a bad certificate is a configuration error at
    start, never a failure mid-session; `--listen` children inherit it through fork.
    """
    global _context
    if _context is None:
        _context = make_context(
            str(config.tls_cert),
            str(config.tls_key),
            ciphers=str(config.tls_ciphers),
            min_version=str(config.tls_min_version),
        )
    return _context


def reload_server_context(config: Config) -> ssl.SSLContext:
    """Build the context again from `config` (standalone SIGHUP: a renewed certificate) and make it
    the process's one; on TlsConfigError the previous context stays in force."""
    global _context
    previous, _context = _context, None
    try:
        return server_context(config)
    except BaseException:
        _context = previous
        raise


def make_context(
    cert: str,
    key: str = "",
    *,
    ciphers: str = limits.TLS12_CIPHERS,
    min_version: str = "tlsv1.2",
    now: float | None = None,
) -> ssl.SSLContext:
    """A server context for the PEM certificate chain in `cert` and the key in `key` (or in `cert`).

    `ciphers` is an OpenSSL list for TLS 1.2 ("": pop3d's default, never OpenSSL's, which offers
    CBC suites)."""
    cert_pem = _read("tls_cert", cert)
    if key:
        key_pem = _read("tls_key", key)
        key_where = f"tls_key: {key}"
    else:
        key_pem = cert_pem
        key_where = f"tls_key is not set and tls_cert {cert}"
    if b"PRIVATE KEY-----" not in key_pem:
        raise TlsConfigError(f"{key_where}: no PEM private key in the file")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_pem or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise TlsConfigError(f"{key_where}: the private key is encrypted (no passphrase can be asked)")
    ders = _pem_certificates(cert_pem)
    if not ders:
        raise TlsConfigError(f"tls_cert: {cert}: no PEM certificate in the file")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[min_version]
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # One process per connection: a session ticket could only be redeemed by this process (inetd)
    # or not at all, so sending them is wasted work and bytes.
    context.num_tickets = 0
    try:
        context.set_ciphers(ciphers or limits.TLS12_CIPHERS)
    except ssl.SSLError:
        raise TlsConfigError(f"tls_ciphers: {ciphers!r} selects no cipher") from None
    try:
        # The first certificate in the file is ours; the ones after it are the chain we send.
        context.load_cert_chain(cert, key or None, password=_no_passphrase)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            message = f"tls_key: {key or cert}: the key does not match the certificate in {cert}"
            raise TlsConfigError(message) from None
        raise TlsConfigError(f"tls_cert/tls_key: {cert}: cannot load: {e.reason or e}") from None
    except OSError as e:
        raise TlsConfigError(f"tls_cert/tls_key: cannot read {cert}: {e.strerror}") from None
    _check_dates(cert, ders, now if now is not None else time.time())
    return context


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, or hang an inetd session.
    raise TlsConfigError("tls_key: the private key is encrypted (a server cannot ask for a passphrase)")


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise TlsConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def _pem_certificates(pem: bytes) -> list[bytes]:
    """The DER bytes of every certificate in a PEM file, in order."""
    begin, end = _PEM_CERT
    ders = []
    pos = pem.find(begin)
    while pos >= 0:
        stop = pem.find(end, pos)
        if stop < 0:
            break
        try:
            ders.append(binascii.a2b_base64(pem[pos + len(begin) : stop]))
        except binascii.Error:
            pass  # OpenSSL refuses it when loading, with its own message
        pos = pem.find(begin, stop)
    return ders


def _check_dates(path: str, ders: list[bytes], now: float) -> None:
    """Refuse a leaf or chain certificate that is expired or not yet valid: clients would refuse it."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    for number, der in enumerate(ders):
        which = "the certificate" if number == 0 else f"chain certificate {number + 1}"
        try:
            not_before, not_after = _validity(der)
        except (IndexError, ValueError):
            raise TlsConfigError(f"tls_cert: {path}: {which} is not a valid X.509 certificate") from None
        if stamp > not_after:
            raise TlsConfigError(f"tls_cert: {path}: {which} expired on {_show(not_after)}")
        if stamp < not_before:
            raise TlsConfigError(f"tls_cert: {path}: {which} is not valid before {_show(not_before)}")


def _der_item(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER item at `pos`."""
    tag = der[pos]
    length = der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _validity(der: bytes) -> tuple[str, str]:
    """notBefore and notAfter of an X.509 certificate (RFC 5280 4.1) as YYYYMMDDHHMMSS, UTC.

    A dozen lines of DER walking instead of `cryptography` or `ssl`'s private decoder, and strings
    compared instead of `time.strptime` (which imports `re`, `locale`, `calendar`, `datetime`).
    """
    _, pos, _ = _der_item(der, 0)  # Certificate ::= SEQUENCE
    _, pos, _ = _der_item(der, pos)  # tbsCertificate ::= SEQUENCE
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _field in ("serialNumber", "signature", "issuer"):
        _, _, pos = _der_item(der, pos)
    tag, pos, _ = _der_item(der, pos)  # validity ::= SEQUENCE
    if tag != 0x30:
        raise ValueError("no validity")
    times = []
    for _field in ("notBefore", "notAfter"):
        tag, start, pos = _der_item(der, pos)
        text = der[start:pos].decode("ascii").rstrip("Z")
        if tag == 0x17:  # UTCTime YYMMDDHHMMSS: years 50-99 are 19xx (RFC 5280 4.1.2.5.1)
            text = ("19" if int(text[:2]) >= 50 else "20") + text
        elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSS
            raise ValueError("bad time")
        if len(text) != 14 or not text.isdigit():
            raise ValueError("bad time")
        times.append(text)
    return times[0], times[1]


def _show(stamp: str) -> str:
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[8:10]}:{stamp[10:12]}:{stamp[12:]} UTC"


def accept(context: ssl.SSLContext, fd: int, timeout: float) -> ssl.SSLSocket:
    """The server side of a handshake on the connected stream socket `fd`, within `timeout` seconds.

    The socket object is made from a duplicate of `fd` (under inetd fd 0 and 1 are one socket: it is
    wrapped once, for both directions) and is non-blocking. The handshake reads the socket itself,
    so nothing received before it can leak into the TLS stream.
    """
    deadline = time.monotonic() + timeout
    duplicate = os.dup(fd)
    try:
        plain = socket.socket(fileno=duplicate)
    except OSError as e:
        os.close(duplicate)
        raise HandshakeError(f"not a socket: {e.strerror}") from None
    try:
        plain.setblocking(False)
        sock = context.wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
    except OSError as e:
        plain.close()
        raise HandshakeError(_describe(e)) from None
    poller = select.poll()
    try:
        while True:
            try:
                sock.do_handshake()
                return sock
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            remaining = deadline - time.monotonic()
            poller.register(sock.fileno(), events)
            if remaining <= 0 or not poller.poll(remaining * 1000.0):
                raise HandshakeError(f"not completed within {timeout:g} seconds")
    except HandshakeError:
        sock.close()
        raise
    except OSError as e:  # ssl.SSLError included: a bad ClientHello, no shared cipher, an early EOF
        sock.close()
        raise HandshakeError(_describe(e)) from None


def _describe(error: OSError) -> str:
    # Debian 12's Python 3.11.2 reports a client's EOF mid-handshake as SSLZeroReturnError (later
    # 3.11 releases: SSLEOFError).
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "the client closed the connection"
    if isinstance(error, ssl.SSLError) and "EOF" in str(error.reason):
        return "the client closed the connection"
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return "the client closed the connection"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error.strerror or error.args}"
    return error.strerror or type(error).__name__
