"""Coverage-guided fuzzing of the PROXY protocol header parser (atheris): any bytes.

    python tests/fuzz/fuzz_proxy.py [libFuzzer options] [CORPUS_DIR ...]   # see scripts/fuzz

`check(data)` parses `data` as everything received so far on a connection from a proxy, and fails
(raises) unless the verdict is one a driver can rely on:

* exactly one of a `ProxyHeader`, `NEED_MORE` or an `Invalid` with a one-line reason, never an
  exception;
* a header ends inside the data and within the bounds (107 octets for version 1,
  limits.PROXY_HEADER_MAX for version 2); parsing exactly its octets gives the same header, and
  every shorter prefix of them asks for more (the driver never reads past the header, and never
  needs to);
* its client is canonical address text (re-parsing it as a version 1 address gives it back);
* NEED_MORE comes only below those bounds, and no prefix of the data is already a header (the
  octets consumed while waiting are all the header's);
* Invalid stays invalid whatever follows (the verdict does not depend on how the bytes arrive).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from pop3d import limits, proxyheader
else:
    from pop3d import limits, proxyheader


def _same(a: proxyheader.ProxyHeader, b: object) -> bool:
    return isinstance(b, proxyheader.ProxyHeader) and all(
        getattr(a, name) == getattr(b, name) for name in proxyheader.ProxyHeader.__slots__
    )


def check(data: bytes) -> None:
    """The fuzz target: raises AssertionError on a finding (or whatever the parser raises)."""
    result = proxyheader.parse(data)
    if isinstance(result, proxyheader.ProxyHeader):
        bound = proxyheader.V1_MAX if result.version == 1 else limits.PROXY_HEADER_MAX
        if not 0 < result.length <= min(len(data), bound):
            raise AssertionError(f"header length {result.length} outside the data or the bound")
        exact = data[: result.length]
        if not _same(result, proxyheader.parse(exact)):
            raise AssertionError("the header's own octets parse differently")
        for end in range(result.length):
            if proxyheader.parse(exact[:end]) is not proxyheader.NEED_MORE:
                raise AssertionError(f"a prefix of {end} octets of a valid header is not NEED_MORE")
        if result.local and result.source is not None:
            raise AssertionError("a LOCAL header with a client address")
        if result.source is not None:
            family = b"TCP6" if ":" in result.source else b"TCP4"
            line = b"PROXY %s %s %s 1 2\r\n" % (family, result.source.encode(), result.source.encode())
            again = proxyheader.parse(line)
            if not isinstance(again, proxyheader.ProxyHeader) or again.source != result.source:
                raise AssertionError(f"client {result.source!r} is not canonical text")
            if not 0 <= result.source_port <= 65535:
                raise AssertionError("port out of range")
    elif result is proxyheader.NEED_MORE:
        if len(data) >= limits.PROXY_HEADER_MAX or (data[:1] == b"P" and len(data) >= proxyheader.V1_MAX):
            raise AssertionError(f"NEED_MORE at {len(data)} octets")
        for end in range(len(data)):
            if isinstance(proxyheader.parse(data[:end]), proxyheader.ProxyHeader):
                raise AssertionError("NEED_MORE after a complete header")
    elif isinstance(result, proxyheader.Invalid):
        if not result.reason or "\n" in result.reason or "\r" in result.reason:
            raise AssertionError(f"bad reason {result.reason!r}")
        for more in (b"\r\n", b"\x00" * 64, b"1 2\r\n" * 30):
            if not isinstance(proxyheader.parse(data + more), proxyheader.Invalid):
                raise AssertionError("an invalid start became valid")
    else:
        raise AssertionError(f"unexpected verdict {result!r}")


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
