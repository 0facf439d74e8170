"""Hypothesis fallback of fuzz target ``softpath`` (fuzz/fuzz_softpath.py)."""

from __future__ import annotations

from fuzz.common import time_limit
from fuzz.fuzz_softpath import TARGET
from hypothesis import given
from hypothesis import strategies as st
from tests.property.fuzz_cases import fuzz_settings, target_tests

from sttun.core.softpath import complete
from sttun.errors import DecodeError
from sttun.wire.vnet import VnetHdr

SETTINGS = fuzz_settings(300)
test_seeds, test_any_bytes = target_tests(TARGET, 300)


@SETTINGS
@given(st.binary(min_size=1, max_size=80))
def test_built_frames(rest: bytes) -> None:
    """The built mode: valid-looking frames, vnet headers mostly consistent."""
    with time_limit(TARGET.time_limit):
        TARGET.one_input(b"\x01" + rest)


u16 = st.integers(0, 0xFFFF)


@SETTINGS
@given(
    st.builds(VnetHdr, st.integers(0, 255), st.integers(0, 255), u16, u16, u16, u16),
    st.binary(max_size=200),
)
def test_random_vnet_headers(vnet: VnetHdr, frame: bytes) -> None:
    """Any ``virtio_net_hdr`` on any frame: new bytearrays or DecodeError."""
    with time_limit(TARGET.time_limit):
        try:
            out = complete(frame, vnet)
        except DecodeError:
            return
    assert all(type(p) is bytearray for p in out)
