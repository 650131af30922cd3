"""Replay the fuzz harnesses' seed corpora and every input they ever found, in the normal suite.

The harnesses (tests/fuzz/fuzz_*.py, run by scripts/fuzz with atheris) expose `check(data)`,
which raises on a finding; each crashing input found is kept in tests/fuzz/regressions/NAME/,
named after what it found. A short hypothesis run of the same checks keeps them honest without
atheris installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz import fuzz_mbox, fuzz_protocol, fuzz_proxy
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent / "fuzz"
HARNESSES = {"protocol": fuzz_protocol.check, "mbox": fuzz_mbox.check, "proxy": fuzz_proxy.check}


def inputs(kind: str) -> list[Path]:
    return sorted((HERE / kind).glob("*"))


@pytest.mark.parametrize(
    ("name", "path"),
    [
        (name, path)
        for name in HARNESSES
        for kind in ("regressions", "corpus")
        for path in inputs(f"{kind}/{name}")
    ],
    ids=lambda value: value.name if isinstance(value, Path) else value,
)
def test_replay(name: str, path: Path) -> None:
    HARNESSES[name](path.read_bytes())


def test_every_harness_has_seeds_and_the_older_ones_their_regressions() -> None:
    for name in HARNESSES:
        assert inputs(f"corpus/{name}"), name
    # The proxy harness has found nothing yet (scripts/fuzz: millions of runs): no regression to keep.
    for name in ("protocol", "mbox"):
        assert inputs(f"regressions/{name}"), name


_commands = st.lists(
    st.sampled_from(
        [b"USER a", b"PASS b", b"STAT", b"LIST", b"LIST 1", b"UIDL", b"RETR 1", b"TOP 1 0", b"DELE 1",
         b"RSET", b"NOOP", b"QUIT", b"CAPA", b"STLS", b"AUTH PLAIN", b"AGEAYg==", b"\x00", b"A" * 300]
    ).map(lambda c: c + b"\r\n")
    | st.binary(max_size=20),
    max_size=30,
).map(b"".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(seed=st.binary(min_size=4, max_size=4), stream=_commands)
def test_protocol_core_any_bytes_any_chunking(seed: bytes, stream: bytes) -> None:
    fuzz_protocol.check(seed + stream)


_spool_parts = st.lists(
    st.sampled_from([b"From a\n", b"From b\r\n", b"\n", b"\r\n", b">From x\n", b">>From ", b"From ", b"\r",
                     b"Subject: s\n", b"body\n", b".\n", b"\x00"]) | st.binary(max_size=8),
    max_size=40,
).map(lambda parts: b"From x\n" + b"".join(parts))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(control=st.binary(min_size=2, max_size=2), spool=_spool_parts | st.binary(max_size=64))
def test_mbox_scanner_against_the_reference(control: bytes, spool: bytes) -> None:
    fuzz_mbox.check(control + spool)
