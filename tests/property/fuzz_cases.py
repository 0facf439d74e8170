"""The tests every fuzz target gets in CI: its seeds, and hypothesis-chosen bytes.

Each ``test_fuzz_<target>.py`` binds them with
``test_seeds, test_any_bytes = target_tests(TARGET)`` and adds its structured cases.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fuzz.common import Target, time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def fuzz_settings(max_examples: int = 300) -> settings:
    """Hypothesis settings for fuzz fallbacks: no deadline, no health checks."""
    return settings(
        max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck)
    )


def target_tests(
    target: Target, max_examples: int = 300
) -> tuple[Callable[..., None], Callable[..., None]]:
    """``(test_seeds, test_any_bytes)`` for ``target``, each input under its time limit."""

    @pytest.mark.parametrize("seed", target.seeds(), ids=lambda b: b[:6].hex())
    def test_seeds(seed: bytes) -> None:
        with time_limit(target.time_limit):
            target.one_input(seed)

    @fuzz_settings(max_examples)
    @given(st.binary(max_size=target.max_len))
    def test_any_bytes(data: bytes) -> None:
        with time_limit(target.time_limit):
            target.one_input(data)

    return test_seeds, test_any_bytes
