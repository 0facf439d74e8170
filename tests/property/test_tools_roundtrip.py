"""Property: ``sttun encap`` then ``sttun decap`` gives back every frame byte for byte.

Frames up to 65000 bytes, random MTUs, IPv4 and IPv6 outer, with and without an
outer 802.1Q tag on the inner frame (STT carries it in its header; DEI cannot be
carried and comes back cleared, protocol.md §5).  The tools run in-process through
their ``main`` functions (a subprocess per example would be too slow).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sttun.io.pcap import CaptureReader, PcapWriter
from sttun.tools import decap, encap

TS0 = 1_700_000_000 * 10**9


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    size = draw(st.one_of(st.integers(14, 1600), st.integers(1600, 65000)))
    frame = bytearray(draw(st.binary(min_size=14, max_size=64)).ljust(size, b"\x5a"))
    if draw(st.booleans()):
        frame[size - 8 :] = draw(st.binary(min_size=8, max_size=8))
    if len(frame) >= 18 and draw(st.booleans()):
        frame[12:14] = b"\x81\x00"  # tagged: the tag travels in the STT header
    return bytes(frame)


def expected(frame: bytes) -> bytes:
    if len(frame) >= 18 and frame[12:14] == b"\x81\x00":
        return frame[:14] + bytes([frame[14] & ~0x10]) + frame[15:]  # DEI cleared
    return frame


def _quiet(fn, ns):  # type: ignore[no-untyped-def]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = fn(ns)
    return status, out.getvalue()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(frames(), min_size=1, max_size=6),
    mtu=st.integers(576, 9000),
    ipv6=st.booleans(),
    ctx=st.integers(0, 2**64 - 1),
)
def test_encap_decap_round_trip(
    tmp_path: Path, batch: list[bytes], mtu: int, ipv6: bool, ctx: int
) -> None:
    inner, outer, back = tmp_path / "in.pcap", tmp_path / "stt.pcap", tmp_path / "out.pcap"
    with PcapWriter(inner, nanosecond=True) as w:
        for i, f in enumerate(batch):
            w.write(TS0 + i, f)
    src, dst = ("2001:db8:0:1::1", "2001:db8:0:1::2") if ipv6 else ("198.18.0.1", "198.18.0.2")
    status, _ = _quiet(encap.main, argparse.Namespace(
        input=str(inner), output=str(outer), src=src, dst=dst, context_id=ctx, mtu=mtu,
        ipv6=ipv6, sport=None, sport_hash=False, dst_port=7471,
    ))  # fmt: skip
    assert status == 0
    with CaptureReader(outer, strict=True) as r:
        assert all(len(d) <= 14 + mtu for _ts, _lt, d, _o in r)
    status, text = _quiet(decap.main, argparse.Namespace(
        input=str(outer), output=str(back), split_by_context=None, context_id=None, port=None,
        json=True,
    ))  # fmt: skip
    assert status == 0
    summary = json.loads(text)
    assert summary["drops"] == {} and summary["checksums"]["verified"] == summary["segments"]
    with CaptureReader(back, strict=True) as r:
        got = [(ts, bytes(d)) for ts, _lt, d, _o in r]
    assert got == [(TS0 + i, expected(f)) for i, f in enumerate(batch)]
