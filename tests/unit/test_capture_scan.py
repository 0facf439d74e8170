"""The capture scan's runs change nothing: same frames, same drops as segment by segment.

:func:`sttun.tools.capture_scan.scan` holds the in-order segments of a frame (a
*run*, also while other frames' segments interleave with it) and gives the frame to
the reassembler in one piece.  With an ``on_segment`` callback it gives every
segment to the reassembler as it comes instead: that is the reference here.  Random
captures — interleaved frames, lost, duplicated, reordered and corrupted segments,
frame ids used again, whole frames sent twice, pauses longer than the reassembly
timeout, other traffic — must give the same frames (bytes, order, timestamps,
addresses), the same drop counts and bytes, and the same scan counters both ways.

Segments are built with the independent helpers of ``tests/netns.py`` (through
``tests/unit/test_tools_decap.py``), not with sttun's encapsulator.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tests.unit.test_tools_decap import SRC, SRC6, TS0, segment, write_pcap

from sttun.core.drops import DropCounters, DropReason
from sttun.io.pcap import CaptureReader
from sttun.tools.capture_scan import OFFLINE_TIMEOUT, scan

SOURCES = (SRC, "198.18.0.3", SRC6)
DST_OF = {SRC: "198.18.0.2", "198.18.0.3": "198.18.0.2", SRC6: "2001:db8:0:1::2"}


def _scan(cap: Path, per_segment: bool) -> tuple[list[Any], dict[str, Any], Any, Any]:
    frames: list[tuple[int, bytes, bytes, bytes]] = []
    drops = DropCounters()

    def on_frame(ts: int, src: bytes, dst: bytes, frame: Any) -> None:
        frames.append((ts, src, dst, bytes(frame)))

    def on_segment(*_args: Any) -> None:
        pass

    with CaptureReader(cap) as reader:
        res = scan(reader, on_frame, drops=drops, on_segment=on_segment if per_segment else None)
    packets = {r.value: n for r, n in drops.packets.items() if n}
    nbytes = {r.value: n for r, n in drops.bytes.items() if n}
    return frames, res.as_dict(), packets, nbytes


def _frame_segments(rnd: random.Random, src: str, ack: int, length: int) -> list[bytes]:
    """The segments of one frame of ``length`` random bytes, of random sizes."""
    body = rnd.randbytes(length)
    out = []
    off = 0
    while off < length:
        size = min(length - off, rnd.choice((1, 7, 100, 512, 1000, 1460)))
        out.append(segment(body[off : off + size], length=length, offset=off, ack=ack,
                           src=src, dst=DST_OF[src]))  # fmt: skip
        off += size
    return out


def _capture(rnd: random.Random) -> list[tuple[int, bytes]]:
    """A random capture: groups of frames, their segments interleaved and mangled."""
    ts = TS0
    out: list[tuple[int, bytes]] = []
    sent: list[list[bytes]] = []
    acks = [rnd.randrange(1 << 32) for _ in range(3)]
    for _ in range(rnd.randrange(5, 25)):
        group = []
        for _ in range(rnd.choice((1, 1, 1, 2, 3, 4))):
            src = rnd.choice(SOURCES)
            k = rnd.randrange(len(acks))
            if rnd.random() < 0.9:
                acks[k] = (acks[k] + 1) & 0xFFFFFFFF  # else: a frame id used again
            length = rnd.choice((20, 300, 1460, 1461, 3000, 7000, 20000))
            group.append(_frame_segments(rnd, src, acks[k], length))
        if sent and rnd.random() < 0.1:
            group.append(list(rnd.choice(sent)))  # a whole frame once more
        sent.extend(group)
        pkts: list[bytes] = []
        left = [list(g) for g in group]
        while any(left):
            g = rnd.choices(left, weights=[len(x) for x in left])[0]
            pkts.append(g.pop(0))
        for i in range(len(pkts)):
            r = rnd.random()
            if r < 0.03:
                pkts[i] = b""  # lost
            elif r < 0.06:
                pkts.insert(rnd.randrange(i, len(pkts)), pkts[i])  # duplicated, later
            elif r < 0.09 and i + 1 < len(pkts):
                pkts[i], pkts[i + 1] = pkts[i + 1], pkts[i]  # reordered
            elif r < 0.1:
                bad = bytearray(pkts[i])
                bad[-1] ^= 0x40  # corrupted: bad TCP checksum
                pkts[i] = bytes(bad)
            elif r < 0.11:
                pkts.insert(i, segment(b"x" * 40, length=40, dport=80))  # other traffic
        for p in pkts:
            if p:
                out.append((ts, p))
            ts += rnd.randrange(1, 50_000)
            if rnd.random() < 0.01:
                ts += int((OFFLINE_TIMEOUT + rnd.choice((0.5, 5, 40))) * 1e9)  # a pause
    return out


@pytest.mark.parametrize("seed", range(60))
def test_runs_give_what_segment_by_segment_gives(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    cap = write_pcap(tmp_path / "in.pcap", _capture(rnd))  # type: ignore[arg-type]
    with_runs = _scan(cap, per_segment=False)
    reference = _scan(cap, per_segment=True)
    assert with_runs[0] == reference[0]  # frames: time, addresses, bytes, order
    assert with_runs[1:] == reference[1:]  # scan counters, drop counts and bytes
    assert reference[0], "the capture should complete some frames"


def _seq(ts0: int, pkts: list[bytes], step: int = 1000) -> list[tuple[int, bytes]]:
    return [(ts0 + i * step, p) for i, p in enumerate(pkts)]


def test_interleaved_frames_each_come_back_whole(tmp_path: Path) -> None:
    rnd = random.Random(1)
    a = _frame_segments(rnd, SRC, 1, 20000)
    b = _frame_segments(rnd, SRC, 2, 7000)
    c = _frame_segments(rnd, "198.18.0.3", 1, 3000)  # same frame id, other source
    order = []
    while a or b or c:
        for segs in (a, b, c):
            if segs:
                order.append(segs.pop(0))
    frames, res, packets, _ = _scan(write_pcap(tmp_path / "in.pcap", _seq(TS0, order)), False)
    assert [len(f[3]) for f in frames] == [3000, 7000, 20000]
    assert packets == {} and res["frames"] == 3


def test_frame_given_up_after_the_timeout_while_held(tmp_path: Path) -> None:
    """A frame whose segments span more than the timeout is not put back together."""
    rnd = random.Random(2)
    segs = _frame_segments(rnd, SRC, 5, 3000)
    late = int((OFFLINE_TIMEOUT + 1) * 1e9)
    pkts = [(TS0, segs[0]), *[(TS0 + late + i, s) for i, s in enumerate(segs[1:])]]
    for per_segment in (False, True):
        frames, _res, packets, _ = _scan(write_pcap(tmp_path / "in.pcap", pkts), per_segment)
        assert frames == []
        assert packets == {
            DropReason.REASSEMBLY_TIMEOUT.value: 1,
            DropReason.INCOMPLETE_AT_EOF.value: 1,
        }


def test_a_late_copy_of_a_finished_frame_is_late(tmp_path: Path) -> None:
    rnd = random.Random(3)
    segs = _frame_segments(rnd, SRC, 9, 3000)
    cap = write_pcap(tmp_path / "in.pcap", _seq(TS0, [*segs, *segs]))
    frames, _res, packets, _ = _scan(cap, False)
    assert len(frames) == 1
    assert packets == {DropReason.LATE_SEGMENT.value: len(segs)}


def test_more_interleaved_frames_than_runs_held(tmp_path: Path) -> None:
    """80 frames whose segments all interleave: the runs held here are bounded
    (the rest go to the reassembler as they come) and every frame comes back."""
    rnd = random.Random(4)
    frames = [_frame_segments(rnd, SRC, 1000 + i, 3000) for i in range(80)]
    order = [segs[k] for k in range(max(map(len, frames))) for segs in frames if k < len(segs)]
    cap = write_pcap(tmp_path / "in.pcap", _seq(TS0, order))
    with_runs = _scan(cap, per_segment=False)
    assert with_runs == _scan(cap, per_segment=True)
    assert len(with_runs[0]) == 80 and with_runs[2] == {}


@pytest.mark.parametrize("interleaved", [False, True])
def test_ctrl_c_while_a_frame_is_delivered_gives_nothing_twice(
    tmp_path: Path, interleaved: bool
) -> None:
    """Ctrl-C inside the delivery of a frame completed from a run: the scan stops,
    and the clean-up does not give that run's segments to the reassembler again
    (which would count them as late segments of a finished frame)."""
    frames = [b"\x00" * 18 + bytes([i]) * 4000 for i in range(3)]
    segs = [
        [segment(f[o : o + 1460], length=len(f), offset=o, ack=i + 1) for o in range(0, 4018, 1460)]
        for i, f in enumerate(frames)
    ]
    if interleaved:  # frame 2's segments between frame 1's: frame 1 is parked, then resumed
        order = [segs[0][0], segs[1][0], segs[2][0], segs[1][1], segs[2][1], segs[1][2]]
        order += [segs[2][2], segs[0][1], segs[0][2]]
    else:
        order = [s for f in segs for s in f]
    cap = write_pcap(tmp_path / "in.pcap", order)
    drops = DropCounters()
    delivered: list[int] = []

    def on_frame(_ts: int, _src: bytes, _dst: bytes, _frame: Any) -> None:
        delivered.append(1)
        if len(delivered) == 2:
            raise KeyboardInterrupt

    with CaptureReader(cap) as reader:
        result = scan(reader, on_frame, drops=drops)
    assert result.interrupted and len(delivered) == 2
    assert DropReason.LATE_SEGMENT.value not in drops.as_dict()
    assert DropReason.DUPLICATE_SEGMENT.value not in drops.as_dict()
