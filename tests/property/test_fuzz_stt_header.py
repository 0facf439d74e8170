"""Hypothesis fallback of fuzz target ``stt_header`` (fuzz/fuzz_stt_header.py)."""

from __future__ import annotations

import pytest
from fuzz.fuzz_stt_header import TARGET
from hypothesis import given
from hypothesis import strategies as st
from tests.property.fuzz_cases import fuzz_settings, target_tests

from sttun.errors import TruncatedError
from sttun.wire.stt import STT_HEADER_LEN, SttHeader

SETTINGS = fuzz_settings(300)
test_seeds, test_any_bytes = target_tests(TARGET, 300)


@SETTINGS
@given(st.integers(0, 17), st.binary(max_size=40))
def test_short_buffers_raise_truncated(n: int, tail: bytes) -> None:
    """The oracle itself: fewer than 18 bytes is TruncatedError, never another error."""
    with pytest.raises(TruncatedError):
        SttHeader.unpack(bytes(n))
    assert SttHeader.unpack(bytes(STT_HEADER_LEN) + tail).context_id == 0
