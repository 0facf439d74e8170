"""Hypothesis fallback of fuzz target ``pcap`` (fuzz/fuzz_pcap.py)."""

from __future__ import annotations

import pytest
from fuzz.common import time_limit
from fuzz.fuzz_pcap import TARGET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("seed", TARGET.seeds(), ids=lambda b: b[:2].hex())
def test_seeds(seed: bytes) -> None:
    with time_limit(TARGET.time_limit):
        TARGET.one_input(seed)


@SETTINGS
@given(st.binary(max_size=TARGET.max_len))
def test_any_bytes(data: bytes) -> None:
    with time_limit(TARGET.time_limit):
        TARGET.one_input(data)


@SETTINGS
@given(st.integers(0, 127), st.integers(0, 255), st.binary(max_size=120))
def test_mutated_valid_captures(mode: int, opts: int, edits: bytes) -> None:
    """Valid pcap / pcapng files built by the harness, then mutated by hypothesis."""
    with time_limit(TARGET.time_limit):
        TARGET.one_input(bytes((mode * 2 + 1, opts)) + edits)


@SETTINGS
@given(
    st.sampled_from(
        [b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a"]
    ),
    st.binary(max_size=300),
)
def test_magic_then_garbage(magic: bytes, rest: bytes) -> None:
    """A real magic followed by anything: the header checks and record loops."""
    with time_limit(TARGET.time_limit):
        TARGET.one_input(b"\x00\x00" + magic + rest)
