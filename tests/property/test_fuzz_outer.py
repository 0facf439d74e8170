"""Hypothesis fallback of fuzz target ``outer`` (fuzz/fuzz_outer.py)."""

from __future__ import annotations

from fuzz.common import time_limit
from fuzz.fuzz_outer import TARGET
from fuzz.netutil import ADDRS, build_packet, make_endpoint, receive_checked
from hypothesis import given
from hypothesis import strategies as st
from tests.property.fuzz_cases import fuzz_settings, target_tests

from sttun.core.drops import DropReason

SETTINGS = fuzz_settings(300)
test_seeds, test_any_bytes = target_tests(TARGET, 300)


@SETTINGS
@given(st.integers(0, 255), st.binary(min_size=1, max_size=200))
def test_crafted(mode: int, rest: bytes) -> None:
    """The crafted mode (odd first byte) with hypothesis choosing the fields."""
    with time_limit(TARGET.time_limit):
        TARGET.one_input(bytes((mode | 1,)) + rest)


@SETTINGS
@given(
    st.sampled_from(ADDRS),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
    st.booleans(),
)
def test_valid_segments_any_fields(
    addrs: tuple[bytes, bytes], seq: int, ack: int, payload: bytes, csum_ok: bool
) -> None:
    """Correct outer headers and checksum around any SEQ, ACK and payload."""
    src, dst = addrs
    ep = make_endpoint(small=True)
    pkt = build_packet(src, dst, payload, seq=seq, ack=ack)
    with time_limit(TARGET.time_limit):
        receive_checked(ep, pkt, 1.0, csum_ok)


def test_stranger_is_dropped_before_reassembly() -> None:
    """The invariant checker catches bytes buffered for a source no tunnel names."""
    src, dst = ADDRS[3]
    ep = make_endpoint(small=True)
    pkt = build_packet(src, dst, b"x" * 100, seq=1000 << 16, ack=1)
    assert receive_checked(ep, pkt, 1.0, False) is DropReason.UNKNOWN_SOURCE
    assert ep.reassembler.bytes_held == 0
    assert ep.stats()["drops"] == {"unknown_source": 1}
