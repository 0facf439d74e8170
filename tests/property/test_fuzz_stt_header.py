"""Hypothesis fallback of fuzz target ``stt_header`` (fuzz/fuzz_stt_header.py)."""

from __future__ import annotations

import pytest
from fuzz.common import time_limit
from fuzz.fuzz_stt_header import TARGET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sttun.errors import TruncatedError
from sttun.wire.stt import STT_HEADER_LEN, SttHeader

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
@given(st.integers(0, 17), st.binary(max_size=40))
def test_short_buffers_raise_truncated(n: int, tail: bytes) -> None:
    """The oracle itself: fewer than 18 bytes is TruncatedError, never another error."""
    with pytest.raises(TruncatedError):
        SttHeader.unpack(bytes(n))
    assert SttHeader.unpack(bytes(STT_HEADER_LEN) + tail).context_id == 0
