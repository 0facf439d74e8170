"""Hypothesis fallback of fuzz target ``pcap`` (fuzz/fuzz_pcap.py)."""

from __future__ import annotations

from fuzz.common import time_limit
from fuzz.fuzz_pcap import TARGET
from hypothesis import given
from hypothesis import strategies as st
from tests.property.fuzz_cases import fuzz_settings, target_tests

SETTINGS = fuzz_settings(300)
test_seeds, test_any_bytes = target_tests(TARGET, 300)


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
