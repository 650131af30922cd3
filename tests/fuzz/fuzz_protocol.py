"""Coverage-guided fuzzing of the protocol core (atheris): any bytes, in any chunking.

    python tests/fuzz/fuzz_protocol.py [libFuzzer options] [CORPUS_DIR ...]   # see scripts/fuzz

Input layout: 4 control octets (a seed for the driver's choices and the chunking), then the bytes
the client sends. `check(data)` drives a `Pop3Core` the way `session` does: feed a chunk, then
serve requests until none is left (authenticate with a made-up listing or a failure code, stream
a message, commit, start TLS), at random failing or timing out like a real driver may. It fails
(raises) unless:

* the core raises nothing, and after `Close` it produces neither a request nor a byte;
* every output octet is printable ASCII in CRLF lines (nothing of the client's is echoed);
* every request is valid for the state: a Retrieve names an existing, undeleted message with
  body_lines None or >= 0; a Commit only existing messages; Authenticate only before login;
* input held by the core stays bounded (a partial line is under the line limit);
* the outcome does not depend on the chunking: one chunk and random chunks give the same
  replies and requests (up to a StartTLS, after which buffered plaintext is discarded by design).
"""

from __future__ import annotations

import random
import sys

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from pop3d import limits, protocol
else:
    from pop3d import limits, protocol

_PRINTABLE = frozenset(range(0x20, 0x7F))


class FakeListing:
    """A listing as the core sees it: sizes and UIDs only."""

    def __init__(self, sizes: list[int]) -> None:
        self._sizes = sizes
        self.count = len(sizes)
        self.total_size = sum(sizes)

    def size(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self._sizes[index]

    def uid(self, index: int) -> bytes:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return b"uid%d" % index

    def sizes(self, lo: int, hi: int) -> list[int]:
        if not 0 <= lo <= hi <= self.count:
            raise IndexError((lo, hi))
        return [self.size(i) for i in range(lo, hi)]

    def uids(self, lo: int, hi: int) -> list[bytes]:
        if not 0 <= lo <= hi <= self.count:
            raise IndexError((lo, hi))
        return [self.uid(i) for i in range(lo, hi)]


def _options(rng: random.Random) -> protocol.Options:
    flags = rng.getrandbits(4)
    return protocol.Options(
        plaintext_allowed=bool(flags & 1),
        stls_available=bool(flags & 2),
        sasl_mechanisms=(b"PLAIN", b"LOGIN") if flags & 4 else (),
        max_bad_commands=rng.choice((1, 3, limits.MAX_BAD_COMMANDS)),
        max_auth_failures=rng.choice((1, 3)),
    )


def _check_output(out: bytes) -> None:
    if not out:
        return
    if not out.endswith(b"\r\n"):
        raise AssertionError(f"output does not end a line: {out[-40:]!r}")
    for line in out[:-2].split(b"\r\n"):
        if not all(c in _PRINTABLE for c in line):
            raise AssertionError(f"non-printable or bare CR/LF in reply line {line[:80]!r}")


def run(seed: int, stream: bytes, chunks: list[int] | None) -> list[object]:
    """Drive one core over `stream` split at `chunks` (None: one chunk); the trace of events."""
    rng = random.Random(seed)  # the driver's choices: the same sequence whatever the chunking
    core = protocol.Pop3Core(_options(rng))
    trace: list[object] = []
    listing: FakeListing | None = None
    closed = False
    pieces = ([stream] if stream else []) if chunks is None else _split(stream, chunks)
    by_timeout = rng.randrange(4) == 0
    max_line = max(limits.MAX_COMMAND_LINE, limits.MAX_SASL_LINE)
    for piece in pieces:
        core.receive_data(piece)
        while True:
            request = core.next_request()
            out = bytes(core.data_to_send())
            _check_output(out)
            if out:
                trace.append(out)
            if request is None:
                break
            if closed:
                raise AssertionError(f"request {request!r} after Close")
            trace.append("StartTLS" if isinstance(request, protocol.StartTLS) else repr(request))
            if isinstance(request, protocol.Close):
                closed = True
                continue
            if isinstance(request, protocol.StartTLS):
                if core.state != protocol.AUTHORIZATION or core.tls_active:
                    raise AssertionError("StartTLS in the wrong state")
                core.tls_started()
                return trace  # later plaintext is chunking-dependent by design
            action = rng.randrange(16)
            if action == 0:
                core.fail()  # an unexpected error while serving the request
                continue
            if isinstance(request, protocol.Authenticate):
                if core.state != protocol.AUTHORIZATION or listing is not None:
                    raise AssertionError("Authenticate outside AUTHORIZATION")
                if not request.user or not request.password:
                    raise AssertionError("empty credentials requested")
                if action < 9:
                    listing = FakeListing(
                        [rng.randrange(0, 10 ** rng.randrange(1, 12)) for _ in range(rng.randrange(0, 6))]
                    )
                    core.auth_succeeded(listing)
                else:
                    core.auth_failed(
                        rng.choice(
                            (protocol.AUTH, protocol.IN_USE, protocol.SYS_TEMP, protocol.SYS_PERM, b"?")
                        )
                    )
            elif isinstance(request, protocol.Retrieve):
                if listing is None or core.state != protocol.TRANSACTION:
                    raise AssertionError("Retrieve outside TRANSACTION")
                if not 0 <= request.index < listing.count or request.index in core.deleted:
                    raise AssertionError(f"Retrieve of a bad message {request!r}")
                if request.body_lines is not None and request.body_lines < 0:
                    raise AssertionError(f"negative TOP {request!r}")
                core.retrieve_done()
            elif isinstance(request, protocol.Commit):
                if listing is None or core.state != protocol.UPDATE:
                    raise AssertionError("Commit outside UPDATE")
                if any(not 0 <= i < listing.count for i in request.deleted):
                    raise AssertionError(f"Commit of bad messages {request!r}")
                core.commit_done(None if action < 12 else protocol.SYS_TEMP)
            else:
                raise AssertionError(f"unknown request {request!r}")
        if not closed and core.pending_input() >= max_line:
            raise AssertionError(f"{core.pending_input()} octets of a partial line held")
    if not closed:
        # The input is exhausted: the idle timer fires, or the client closes its side.
        if by_timeout:
            core.timed_out()
        else:
            core.receive_data(b"")
        request = core.next_request()
        out = bytes(core.data_to_send())
        _check_output(out)
        if out:
            trace.append(out)
        if not isinstance(request, protocol.Close):
            raise AssertionError(f"timeout or EOF did not close the session: {request!r}")
        trace.append(repr(request))
        if core.next_request() is not None:
            raise AssertionError("a request after Close")
    core.receive_data(b"QUIT\r\n")
    if core.next_request() is not None or core.data_to_send():
        raise AssertionError("the core answered after Close")
    return trace


def _split(stream: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(stream):
        size = sizes[i % len(sizes)] if sizes else len(stream)
        out.append(stream[pos : pos + size])
        pos += size
        i += 1
    return out


def check(data: bytes) -> None:
    """The fuzz target: raises AssertionError (or whatever the core raises) on a finding."""
    if len(data) < 4:
        return
    seed = int.from_bytes(data[:4], "little")
    stream = data[4:]
    whole = run(seed, stream, None)
    rng = random.Random(seed ^ 0x5EED)
    sizes = [rng.choice((1, 1, 2, 3, 5, 7, 64, 255, 256, 4096)) for _ in range(rng.randrange(1, 8))]
    chunked = run(seed, stream, sizes)
    if _normal(whole) != _normal(chunked):
        raise AssertionError(f"chunking changed the outcome:\n{_normal(whole)!r}\n!=\n{_normal(chunked)!r}")


def _normal(trace: list[object]) -> list[object]:
    """Output concatenated between requests (the core may split its writes differently)."""
    out: list[object] = []
    for item in trace:
        if isinstance(item, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += item
        else:
            out.append(item)
    return out


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
