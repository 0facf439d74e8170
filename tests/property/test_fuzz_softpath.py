"""Hypothesis fallback of fuzz target ``softpath`` (fuzz/fuzz_softpath.py)."""

from __future__ import annotations

import pytest
from fuzz.common import time_limit
from fuzz.fuzz_softpath import TARGET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sttun.core.softpath import complete
from sttun.errors import DecodeError
from sttun.wire.vnet import VnetHdr

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("seed", TARGET.seeds(), ids=lambda b: b[:4].hex())
def test_seeds(seed: bytes) -> None:
    with time_limit(TARGET.time_limit):
        TARGET.one_input(seed)


@SETTINGS
@given(st.binary(max_size=TARGET.max_len))
def test_any_bytes(data: bytes) -> None:
    with time_limit(TARGET.time_limit):
        TARGET.one_input(data)


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
