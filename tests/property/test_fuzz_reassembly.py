"""Hypothesis fallback of fuzz target ``reassembly`` (fuzz/fuzz_reassembly.py).

Besides the byte-level program, hypothesis draws sequences of ``(source, ack,
seq, payload, now)`` segments directly; valid outer packets are built around
them and fed to ``Endpoint.receive`` with the fuzz invariants checked.
"""

from __future__ import annotations

import pytest
from fuzz.common import time_limit
from fuzz.fuzz_reassembly import TARGET
from fuzz.netutil import ADDRS, build_packet, check_limits, make_endpoint, receive_checked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sttun.core.reassembly import Pending
from sttun.wire.stt import SttHeader

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

segments = st.lists(
    st.tuples(
        st.integers(0, len(ADDRS) - 1),  # source
        st.integers(0, 3) | st.integers(0, 2**32 - 1),  # ack (frame id)
        st.tuples(
            st.sampled_from([40, 100, 1500, 9000, 65535]) | st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFF),
        ),
        st.binary(max_size=300) | st.integers(1, 9000),  # payload, or a length of it
        st.floats(0, 100, allow_nan=False),  # time step
    ),
    max_size=40,
)


@pytest.mark.parametrize("seed", TARGET.seeds(), ids=lambda b: b[:4].hex())
def test_seeds(seed: bytes) -> None:
    with time_limit(TARGET.time_limit):
        TARGET.one_input(seed)


@SETTINGS
@given(st.binary(max_size=1024))
def test_any_program(data: bytes) -> None:
    with time_limit(TARGET.time_limit):
        TARGET.one_input(data)


@SETTINGS
@given(st.booleans(), st.sampled_from([0x10, 0x11, 0x20, 0x99]), segments)
def test_segment_sequences(
    small: bool,
    key: int,
    segs: list[tuple[int, int, tuple[int, int], bytes | int, float]],
) -> None:
    ep = make_endpoint(small=small)
    now = 0.0
    with time_limit(TARGET.time_limit):
        for si, ack, (length, off), payload, step in segs:
            now += step
            src, dst = ADDRS[si]
            if isinstance(payload, int):  # a slice of a plausible STT frame
                frame = SttHeader(context_id=key).pack() + bytes(12) + b"\x08\x00"
                frame = (frame + bytes(range(256)) * 40)[off : off + payload]
                payload = frame
            pkt = build_packet(src, dst, payload, seq=(length << 16) | off, ack=ack)
            receive_checked(ep, pkt, now, False)
        ep.handle_timeout(now + 1e6)
    check_limits(ep)
    assert ep.reassembler.entries == 0
    assert ep.reassembler.bytes_held == 0


def test_too_many_frames_keeps_the_limits() -> None:
    """The one reassembly drop the long atheris run's corpus did not reach."""
    ep = make_endpoint(small=True)
    src, dst = ADDRS[0]
    limit = ep.reassembler.max_frames
    for ack in range(limit + 4):
        pkt = build_packet(src, dst, b"\0" * 10, seq=100 << 16, ack=ack)
        # a newcomer beyond the limit evicts the oldest frame and is stored itself
        assert receive_checked(ep, pkt, 1.0, False) is Pending.STORED
    assert ep.reassembler.entries == limit
    assert ep.stats()["drops"] == {"too_many_frames": 4}
    ep.handle_timeout(1e9)
    assert ep.reassembler.entries == 0
    assert ep.reassembler.bytes_held == 0
