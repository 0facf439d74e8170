"""Unit tests for sttun.core.reassembly (protocol.md §3, §11 edge cases 13-26, 36-41)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from sttun.core.drops import DropCounters, DropReason
from sttun.core.reassembly import (
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    DEFAULT_MAX_FRAMES,
    DEFAULT_SOURCE_BUDGET,
    DEFAULT_TIMEOUT,
    ENTRY_OVERHEAD,
    AddResult,
    Completed,
    Pending,
    Reassembler,
)
from sttun.errors import ConfigError

SRC = "198.18.0.1"
SRC2 = "198.18.0.3"
DST = "198.18.0.2"
MSS = 1460
CE = 0x03
ECT0 = 0x02
STORED = Pending.STORED
KEPT = Pending.KEPT


def make_frame(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def segments(frame: bytes, size: int = MSS) -> list[tuple[int, bytes]]:
    """(seq, payload) for a frame cut TSO-style into ``size``-byte pieces."""
    length = len(frame)
    return [(length << 16 | off, frame[off : off + size]) for off in range(0, length, size)]


def cut(frame: bytes, points: list[int]) -> list[tuple[int, bytes]]:
    """(seq, payload) for a frame cut at the given offsets."""
    bounds = [0, *points, len(frame)]
    return [(len(frame) << 16 | a, frame[a:b]) for a, b in itertools.pairwise(bounds)]


def results(
    r: Reassembler,
    segs: list[tuple[int, bytes]],
    *,
    src: object = SRC,
    ack: int = 1,
    now: float = 0.0,
    tos: int = 0,
) -> list[AddResult]:
    """Feed segments; return what :meth:`Reassembler.add` said of each."""
    return [r.add(src, DST, ack, seq, payload, now, tos) for seq, payload in segs]


def outcomes(got: list[AddResult]) -> list[object]:
    """Each result as it is, except a completed frame: its bytes."""
    return [bytes(x.frame) if isinstance(x, Completed) else x for x in got]


def feed(
    r: Reassembler,
    segs: list[tuple[int, bytes]],
    *,
    src: object = SRC,
    ack: int = 1,
    now: float = 0.0,
    tos: int = 0,
) -> list[bytes]:
    """Feed segments; return every delivered frame (as bytes)."""
    got = results(r, segs, src=src, ack=ack, now=now, tos=tos)
    return [bytes(x.frame) for x in got if isinstance(x, Completed)]


def completed(got: AddResult) -> Completed:
    """``got``, which must be a completed frame."""
    assert isinstance(got, Completed), got
    return got


def assert_empty(r: Reassembler) -> None:
    assert r.entries == 0
    assert r.bytes_held == 0
    assert r.bytes_by_source == {}
    assert r.next_deadline() is None


# --------------------------------------------------------------------- defaults


def test_defaults_match_ovs_constants() -> None:
    assert DEFAULT_TIMEOUT == 30.0
    assert DEFAULT_HIGH_WATER == 4 * 1024 * 1024
    assert DEFAULT_LOW_WATER == 3 * 1024 * 1024
    assert DEFAULT_MAX_FRAMES == 1024
    assert 0 < DEFAULT_SOURCE_BUDGET <= DEFAULT_HIGH_WATER


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": float("nan")},
        {"high_water": 0},
        {"high_water": 100, "low_water": 200},
        {"low_water": -1},
        {"source_budget": 0},
        {"max_frames": 0},
    ],
)
def test_bad_config_raises_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Reassembler(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------- §11 edge cases


def test_edge13_three_in_order_segments() -> None:
    frame = make_frame(4000)
    segs = segments(frame)
    assert [s >> 16 & 0xFFFF for s, _ in segs] == [4000] * 3
    assert [s & 0xFFFF for s, _ in segs] == [0, 1460, 2920]
    r = Reassembler()
    assert r.add(SRC, DST, 7, *segs[0], 1.0) is STORED
    assert r.add(SRC, DST, 7, *segs[1], 1.0) is STORED
    got = completed(r.add(SRC, DST, 7, *segs[2], 1.0))
    assert bytes(got.frame) == frame
    assert (got.tos, got.ce, got.segments, got.buffer) == (0, False, 3, None)
    assert r.drops.total() == 0
    assert r.frames_completed == 1
    assert r.segments_in == 3
    assert_empty(r)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_edge14_reordered(order: tuple[int, ...]) -> None:
    frame = make_frame(4000, seed=14)
    segs = segments(frame)
    r = Reassembler()
    assert outcomes(results(r, [segs[i] for i in order])) == [STORED, STORED, frame]
    assert r.drops.total() == 0
    assert_empty(r)


def test_edge14_many_segments_shuffled() -> None:
    frame = make_frame(20000, seed=141)
    segs = segments(frame, 1000)
    random.Random(5).shuffle(segs)
    r = Reassembler()
    got = results(r, segs)
    assert outcomes(got) == [STORED] * 19 + [frame]
    assert completed(got[-1]).segments == 20
    assert_empty(r)


def test_edge15_duplicate_delivered_once() -> None:
    frame = make_frame(4000, seed=15)
    s0, s1, s2 = segments(frame)
    r = Reassembler()
    got = results(r, [s0, s1, s1, s0, s2, s2, s1])
    # two duplicates while partial, two late copies after completion
    dup, late = DropReason.DUPLICATE_SEGMENT, DropReason.LATE_SEGMENT
    assert outcomes(got) == [STORED, STORED, dup, dup, frame, late, late]
    assert completed(got[4]).segments == 3  # duplicates are not part of the frame
    assert r.drops[DropReason.DUPLICATE_SEGMENT] == 2
    assert r.drops.bytes[DropReason.DUPLICATE_SEGMENT] == len(s1[1]) + len(s0[1])
    assert r.drops[DropReason.LATE_SEGMENT] == 2
    assert r.frames_completed == 1
    assert_empty(r)


def test_edge15_duplicate_inside_merged_range() -> None:
    """A copy of a segment that now lies inside a merged range is still a duplicate."""
    frame = make_frame(5000, seed=151)
    segs = cut(frame, [1000, 2000, 3000])
    r = Reassembler()
    got = results(r, [segs[0], segs[1], segs[2], segs[1], segs[3]])
    assert outcomes(got) == [STORED, STORED, STORED, DropReason.DUPLICATE_SEGMENT, frame]
    assert r.drops[DropReason.DUPLICATE_SEGMENT] == 1


def test_edge16_overlap_conflict() -> None:
    frame = make_frame(4000, seed=16)
    s0, s1, s2 = segments(frame)
    bad = bytearray(s1[1])
    bad[100] ^= 0xFF
    r = Reassembler()
    assert results(r, [s0, s1]) == [STORED, STORED]
    # same range, one byte differs: the whole partial frame goes
    assert r.add(SRC, DST, 1, s1[0], bytes(bad), 0.0) is DropReason.OVERLAP_CONFLICT
    assert r.drops[DropReason.OVERLAP_CONFLICT] == 1
    assert_empty(r)
    # the rest of that frame is known-broken: counted late, not buffered
    assert results(r, [s2]) == [DropReason.LATE_SEGMENT]
    assert r.drops[DropReason.LATE_SEGMENT] == 1
    assert_empty(r)


def test_edge16_partial_overlap_conflict() -> None:
    frame = make_frame(3000, seed=161)
    r = Reassembler()
    assert r.add(SRC, DST, 1, 3000 << 16 | 0, frame[:1500], 0.0) is STORED
    forged = bytearray(frame[1000:2500])
    forged[0] ^= 1  # differs inside the stored part
    got = r.add(SRC, DST, 1, 3000 << 16 | 1000, bytes(forged), 0.0)
    assert got is DropReason.OVERLAP_CONFLICT
    assert r.drops[DropReason.OVERLAP_CONFLICT] == 1
    assert r.drops.bytes[DropReason.OVERLAP_CONFLICT] == 1500 + 1500
    assert_empty(r)


def test_partial_overlap_identical_keeps_new_part() -> None:
    """Re-segmented retransmit: overlapping but identical bytes extend coverage."""
    frame = make_frame(4000, seed=162)
    r = Reassembler()
    assert r.add(SRC, DST, 1, 4000 << 16 | 0, frame[:1500], 0.0) is STORED
    assert r.add(SRC, DST, 1, 4000 << 16 | 2500, frame[2500:], 0.0) is STORED
    # spans the end of the first range, the hole, and the start of the second
    got = completed(r.add(SRC, DST, 1, 4000 << 16 | 1000, frame[1000:3000], 0.0))
    assert bytes(got.frame) == frame and got.segments == 3
    assert r.drops.total() == 0
    assert_empty(r)


def test_segment_covering_several_ranges_and_holes() -> None:
    frame = make_frame(10000, seed=163)
    r = Reassembler()
    for a, b in [(0, 100), (1000, 2000), (3000, 4000), (9000, 10000)]:
        assert r.add(SRC, DST, 1, 10000 << 16 | a, frame[a:b], 0.0) is STORED
    assert r.add(SRC, DST, 1, 10000 << 16 | 500, frame[500:5000], 0.0) is STORED
    assert r.add(SRC, DST, 1, 10000 << 16 | 50, frame[50:600], 0.0) is STORED
    got = completed(r.add(SRC, DST, 1, 10000 << 16 | 4000, frame[4000:9500], 0.0))
    assert bytes(got.frame) == frame and got.segments == 7
    assert r.drops.total() == 0


def test_edge17_segment_past_end() -> None:
    frame = make_frame(4000, seed=17)
    s0, s1, s2 = segments(frame)
    r = Reassembler()
    assert r.add(SRC, DST, 1, s0[0], s0[1], 0.0) is STORED
    # offset 2920 + 1100 bytes > 4000
    got = r.add(SRC, DST, 1, 4000 << 16 | 2920, s2[1] + b"x" * 20, 0.0)
    assert got is DropReason.SEGMENT_PAST_END
    assert r.drops[DropReason.SEGMENT_PAST_END] == 1
    assert r.drops.bytes[DropReason.SEGMENT_PAST_END] == len(s2[1]) + 20
    assert r.entries == 1  # the frame survives
    assert outcomes(results(r, [s1, s2])) == [STORED, frame]
    assert_empty(r)


def test_edge18_zero_length() -> None:
    r = Reassembler()
    assert r.add(SRC, DST, 1, 4000 << 16 | 0, b"", 0.0) is DropReason.EMPTY_SEGMENT
    assert r.drops[DropReason.EMPTY_SEGMENT] == 1
    # a SEQ that announces a 0-byte frame
    assert r.add(SRC, DST, 1, 0 << 16 | 0, b"abc", 0.0) is DropReason.ZERO_LENGTH_FRAME
    assert r.drops[DropReason.ZERO_LENGTH_FRAME] == 1
    assert r.add(SRC, DST, 1, 0x0000_0010, b"abc", 0.0) is DropReason.ZERO_LENGTH_FRAME
    assert r.drops[DropReason.ZERO_LENGTH_FRAME] == 2
    assert r.frames_completed == 0
    assert_empty(r)


def test_edge19_single_segment_trailing_junk() -> None:
    frame = make_frame(100, seed=19)
    r = Reassembler()
    assert r.add(SRC, DST, 1, 100 << 16, frame + b"junk", 0.0) is DropReason.SEGMENT_PAST_END
    assert r.drops[DropReason.SEGMENT_PAST_END] == 1
    assert r.frames_completed == 0
    assert_empty(r)


def test_edge20_missing_middle_times_out() -> None:
    frame = make_frame(4000, seed=20)
    s0, _s1, s2 = segments(frame)
    r = Reassembler()
    assert r.add(SRC, DST, 1, *s0, 100.0) is STORED
    assert r.add(SRC, DST, 1, *s2, 110.0) is STORED
    assert r.entries == 1
    assert r.bytes_held == 4000 + ENTRY_OVERHEAD
    # counted from the first segment, not refreshed by the second
    assert r.next_deadline() == 130.0
    assert r.handle_timeout(129.9) == 0
    assert r.entries == 1
    assert r.handle_timeout(130.0) == 1
    assert r.drops[DropReason.REASSEMBLY_TIMEOUT] == 1
    assert r.drops.bytes[DropReason.REASSEMBLY_TIMEOUT] == len(s0[1]) + len(s2[1])
    assert r.timeouts == 1
    assert r.frames_completed == 0
    assert_empty(r)


def test_edge21_late_duplicate_not_redelivered() -> None:
    frame = make_frame(4000, seed=21)
    segs = segments(frame)
    r = Reassembler()
    assert feed(r, segs, now=5.0) == [frame]
    peak = r.peak_bytes
    for seq, payload in segs:
        assert r.add(SRC, DST, 1, seq, payload, 6.0) is DropReason.LATE_SEGMENT
    assert r.drops[DropReason.LATE_SEGMENT] == 3
    assert r.frames_completed == 1
    assert r.peak_bytes == peak  # nothing was allocated for them
    assert_empty(r)


def test_edge21_key_reusable_after_timeout() -> None:
    frame = make_frame(4000, seed=211)
    other = make_frame(4000, seed=212)
    r = Reassembler()
    assert feed(r, segments(frame), now=0.0) == [frame]
    # after the timeout the id may be reused (protocol.md §11 #44)
    assert feed(r, segments(other), now=DEFAULT_TIMEOUT + 1) == [other]
    assert r.drops.total() == 0


def test_ack_reuse_with_other_length_is_a_new_frame() -> None:
    """A remembered key only swallows segments that agree on L."""
    r = Reassembler()
    a = make_frame(4000, seed=213)
    b = make_frame(3000, seed=214)
    assert feed(r, segments(a)) == [a]
    assert feed(r, segments(b)) == [b]
    assert r.drops.total() == 0


def test_edge22_same_ack_conflict() -> None:
    """Two frames from one address pair share an ACK: they collide and are dropped."""
    a = make_frame(4000, seed=221)
    b = make_frame(4000, seed=222)
    sa, sb = segments(a), segments(b)
    r = Reassembler()
    got = results(r, [sa[0], sb[1], sa[1]])
    assert got == [STORED, STORED, DropReason.OVERLAP_CONFLICT]  # sb[1] and sa[1] differ
    assert r.drops[DropReason.OVERLAP_CONFLICT] == 1
    assert results(r, [sb[0], sa[2], sb[2]]) == [DropReason.LATE_SEGMENT] * 3
    assert r.drops[DropReason.LATE_SEGMENT] == 3
    assert r.frames_completed == 0
    assert_empty(r)


def test_edge22_same_ack_different_lengths() -> None:
    a = make_frame(4000, seed=223)
    b = make_frame(3500, seed=224)
    r = Reassembler()
    got = results(r, [segments(a)[0], segments(b)[1]])
    assert got == [STORED, DropReason.LENGTH_MISMATCH]
    assert r.drops[DropReason.LENGTH_MISMATCH] == 1
    # the id is known-broken whatever L its later segments announce
    assert results(r, segments(a)[1:] + segments(b)) == [DropReason.LATE_SEGMENT] * 5
    assert r.frames_completed == 0
    assert_empty(r)


def test_edge23_same_ack_different_sources() -> None:
    a = make_frame(4000, seed=231)
    b = make_frame(4000, seed=232)
    sa, sb = segments(a), segments(b)
    r = Reassembler()
    out = []
    for x, y in zip(sa, sb, strict=True):
        out += feed(r, [x], src=SRC)
        out += feed(r, [y], src=SRC2)
    assert out == [a, b]
    assert r.drops.total() == 0
    assert_empty(r)


def test_same_ack_different_destinations_are_independent() -> None:
    a = make_frame(3000, seed=233)
    b = make_frame(3000, seed=234)
    r = Reassembler()
    assert r.add(SRC, "d1", 9, *cut(a, [1500])[0], 0.0) is STORED
    assert r.add(SRC, "d2", 9, *cut(b, [1500])[0], 0.0) is STORED
    got_b = completed(r.add(SRC, "d2", 9, *cut(b, [1500])[1], 0.0))
    got_a = completed(r.add(SRC, "d1", 9, *cut(a, [1500])[1], 0.0))
    assert bytes(got_a.frame) == a
    assert bytes(got_b.frame) == b


def test_edge24_length_mismatch() -> None:
    frame = make_frame(4000, seed=24)
    s0, s1, _s2 = segments(frame)
    r = Reassembler()
    assert r.add(SRC, DST, 1, *s0, 0.0) is STORED
    assert r.add(SRC, DST, 1, 4001 << 16 | 1460, s1[1], 0.0) is DropReason.LENGTH_MISMATCH
    assert r.drops[DropReason.LENGTH_MISMATCH] == 1
    assert r.drops.bytes[DropReason.LENGTH_MISMATCH] == len(s0[1]) + len(s1[1])
    assert_empty(r)


def test_edge25_header_split_across_segments() -> None:
    """The first segment carries only 10 of the 18 STT header bytes."""
    frame = make_frame(1000, seed=25)
    r = Reassembler()
    assert feed(r, cut(frame, [10])) == [frame]
    assert feed(r, list(reversed(cut(frame, [10, 17]))), ack=2) == [frame]
    assert feed(r, cut(frame, [1]), ack=3) == [frame]
    assert r.drops.total() == 0


def test_edge26_short_frame_left_to_the_decoder() -> None:
    """Reassembly never parses: a 20-byte frame is delivered; the decoder drops it."""
    frame = make_frame(20, seed=26)
    r = Reassembler()
    assert feed(r, cut(frame, [8])) == [frame]
    single = completed(r.add(SRC, DST, 5, 20 << 16, frame, 0.0))
    assert single.frame is frame and single.segments == 1


def test_edge39_max_frame() -> None:
    frame = make_frame(0xFFFF, seed=39)
    segs = segments(frame)
    assert len(segs) == 45
    assert segs[-1][0] == 0xFFFF_0000 | 44 * 1460
    assert (segs[-1][0] & 0xFFFF) + len(segs[-1][1]) == 0xFFFF
    random.Random(39).shuffle(segs)
    r = Reassembler()
    assert feed(r, segs) == [frame]
    # in order, with memoryview payloads (zero-copy slices of a receive buffer)
    view = memoryview(frame)
    mv_segs = [(0xFFFF_0000 | o, view[o : o + 1460]) for o in range(0, 0xFFFF, 1460)]
    r2 = Reassembler()
    got = [r2.add(SRC, DST, 2, s, p, 0.0) for s, p in mv_segs]
    assert outcomes(got) == [STORED] * 44 + [frame]
    assert completed(got[-1]).buffer is None  # built in the reassembler's own memory
    assert r.drops.total() == 0 and r2.drops.total() == 0


def test_edge40_tiny_tail() -> None:
    frame = make_frame(1470, seed=40)
    segs = cut(frame, [1460])
    assert len(segs[1][1]) == 10
    r = Reassembler()
    assert feed(r, segs) == [frame]
    assert feed(r, list(reversed(segs)), ack=2) == [frame]
    one_byte = make_frame(1461, seed=401)
    assert feed(r, cut(one_byte, [1460]), ack=3) == [one_byte]


def test_edge41_memory_pressure() -> None:
    """> 4 MiB of partial 64 KB frames: the oldest go first, new frames keep flowing."""
    r = Reassembler()
    frame = make_frame(0xFFFF, seed=41)
    first = segments(frame)[0]
    charge = 0xFFFF + ENTRY_OVERHEAD
    n = 100
    sources = [f"198.18.1.{i}" for i in range(4)]  # each stays under its own budget
    for ack in range(n):
        # a newcomer that evicts older frames is itself stored
        assert r.add(sources[ack % 4], DST, ack, *first, float(ack) / 1000) is STORED
        assert r.bytes_held <= DEFAULT_HIGH_WATER
    assert r.peak_bytes <= DEFAULT_HIGH_WATER
    evicted = r.drops[DropReason.MEMORY_EVICTED]
    assert evicted > 0
    assert r.evictions == evicted
    assert r.entries + evicted == n
    # one eviction round goes down to the low watermark (room for the newcomer)
    assert r.entries * charge <= DEFAULT_HIGH_WATER
    # the survivors are the newest: the newest frame still completes ...
    assert feed(r, segments(frame)[1:], src=sources[(n - 1) % 4], ack=n - 1) == [frame]
    # ... and the oldest was evicted: its remaining segments are late, not buffered
    assert feed(r, segments(frame)[1:2], src=sources[0], ack=0) == []
    assert r.drops[DropReason.SOURCE_BUDGET] == 0
    assert r.drops[DropReason.LATE_SEGMENT] == 1


def test_edge41_too_many_frames() -> None:
    r = Reassembler(max_frames=DEFAULT_MAX_FRAMES)
    n = DEFAULT_MAX_FRAMES + 50
    frame = make_frame(200, seed=411)
    for ack in range(n):
        assert r.add(SRC, DST, ack, *cut(frame, [100])[0], 0.0) is STORED
        assert r.entries <= DEFAULT_MAX_FRAMES
    assert r.drops[DropReason.TOO_MANY_FRAMES] == 50
    assert r.evictions == 50
    assert r.entries == DEFAULT_MAX_FRAMES
    # the oldest 50 went, the others complete
    assert feed(r, cut(frame, [100])[1:], ack=49) == []
    assert feed(r, cut(frame, [100])[1:], ack=50) == [frame]


def test_source_budget_evicts_only_that_source() -> None:
    charge = 4000 + ENTRY_OVERHEAD
    r = Reassembler(source_budget=3 * charge)
    frame = make_frame(4000, seed=42)
    s0 = segments(frame)[0]
    assert r.add(SRC2, DST, 100, *s0, 0.0) is STORED  # a well-behaved source's partial frame
    for ack in range(10):
        assert r.add(SRC, DST, ack, *s0, 0.0) is STORED  # evicting the source's oldest
        assert r.bytes_by_source[SRC] <= 3 * charge
    assert r.drops[DropReason.SOURCE_BUDGET] == 7
    assert r.bytes_by_source == {SRC: 3 * charge, SRC2: charge}
    assert r.bytes_held == 4 * charge
    assert feed(r, segments(frame)[1:], src=SRC2, ack=100) == [frame]
    assert feed(r, segments(frame)[1:], src=SRC, ack=9) == [frame]


def test_frame_bigger_than_limits_is_refused_without_evicting() -> None:
    r = Reassembler(high_water=10000, low_water=5000, source_budget=10000)
    small = make_frame(1000, seed=43)
    assert r.add(SRC, DST, 1, *cut(small, [500])[0], 0.0) is STORED
    big = make_frame(20000, seed=44)
    assert r.add(SRC, DST, 2, *segments(big)[0], 0.0) is DropReason.SOURCE_BUDGET
    assert r.drops[DropReason.SOURCE_BUDGET] == 1
    r2 = Reassembler(high_water=10000, low_water=5000, source_budget=100000)
    assert r2.add(SRC, DST, 1, *cut(small, [500])[0], 0.0) is STORED
    assert r2.add(SRC, DST, 2, *segments(big)[0], 0.0) is DropReason.MEMORY_EVICTED
    assert r2.drops[DropReason.MEMORY_EVICTED] == 1
    for x in (r, r2):
        assert x.entries == 1  # the small frame was not evicted for nothing
        assert x.evictions == 0
        assert x.bytes_held <= 10000


# --------------------------------------------------------------------- fast path


def test_single_segment_fast_path_returns_payload_itself() -> None:
    frame = make_frame(1500, seed=50)
    r = Reassembler()
    got = completed(r.add(SRC, DST, 1, 1500 << 16, frame, 0.0))
    assert got.frame is frame
    assert (got.segments, got.buffer) == (1, None)
    view = memoryview(frame)
    assert completed(r.add(SRC, DST, 2, 1500 << 16, view, 0.0)).frame is view
    ba = bytearray(frame)
    got_ba = completed(r.add(SRC, DST, 3, 1500 << 16, ba, 0.0))
    assert isinstance(got_ba.frame, memoryview) and got_ba.frame.obj is ba
    assert got_ba.buffer is None  # the caller's payload, not a buffer handed over
    assert r.frames_completed == 3
    assert r.peak_bytes == 0
    assert_empty(r)


# --------------------------------------------------------------------- ECN (§3.3.1)


def test_edge36_ce_on_non_first_segment_marks_frame() -> None:
    frame = make_frame(4000, seed=36)
    s0, s1, s2 = segments(frame)
    r = Reassembler()
    assert r.add(SRC, DST, 1, *s0, 0.0, ECT0 | 0xB8) is STORED
    assert r.add(SRC, DST, 1, *s1, 0.0, CE | 0x20) is STORED
    got = completed(r.add(SRC, DST, 1, *s2, 0.0, ECT0))
    assert got.ce is True
    assert got.tos == ECT0 | 0xB8


def test_ce_on_first_arriving_segment_is_kept() -> None:
    """OVS loses the first-arriving segment's CE (protocol.md §3.3 inference); we don't."""
    frame = make_frame(4000, seed=361)
    s0, s1, s2 = segments(frame)
    r = Reassembler()
    assert r.add(SRC, DST, 1, *s2, 0.0, CE) is STORED
    assert r.add(SRC, DST, 1, *s0, 0.0, ECT0) is STORED
    got = completed(r.add(SRC, DST, 1, *s1, 0.0, ECT0))
    assert got.ce is True
    assert got.tos == ECT0


def test_no_ce_when_no_segment_had_it() -> None:
    frame = make_frame(4000, seed=362)
    r = Reassembler()
    # a CE frame first, to show the flag is per frame
    first = completed(results(r, segments(frame), ack=1, tos=CE)[-1])
    assert first.ce is True
    second = completed(results(r, segments(frame), ack=2, tos=ECT0)[-1])
    assert bytes(second.frame) == frame
    assert second.ce is False
    assert second.tos == ECT0


def test_edge38_tos_taken_from_offset0_segment_even_if_last() -> None:
    frame = make_frame(4000, seed=38)
    s0, s1, s2 = segments(frame)
    r = Reassembler()
    assert r.add(SRC, DST, 1, *s1, 0.0, 0x10 << 2) is STORED
    assert r.add(SRC, DST, 1, *s2, 0.0, 0x12 << 2) is STORED
    got = completed(r.add(SRC, DST, 1, *s0, 0.0, 0x2E << 2))
    assert got.tos == 0x2E << 2
    assert got.ce is False


def test_single_segment_ecn() -> None:
    r = Reassembler()
    got = completed(r.add(SRC, DST, 1, 10 << 16, b"0123456789", 0.0, 0xB8 | CE))
    assert got.tos == 0xB8 | CE
    assert got.ce is True
    got = completed(r.add(SRC, DST, 2, 10 << 16, b"0123456789", 0.0, 0xB8 | ECT0))
    assert got.tos == 0xB8 | ECT0
    assert got.ce is False


def test_single_segment_duplicate_not_delivered_twice() -> None:
    """A whole one-segment frame seen again within the timeout is a late copy."""
    r = Reassembler(timeout=5.0)
    frame = make_frame(300, seed=51)
    assert completed(r.add(SRC, DST, 9, 300 << 16, frame, 0.0)).frame is frame
    assert r.add(SRC, DST, 9, 300 << 16, frame, 1.0) is DropReason.LATE_SEGMENT
    assert r.drops[DropReason.LATE_SEGMENT] == 1
    # another source: its own ids
    assert completed(r.add(SRC2, DST, 9, 300 << 16, frame, 1.0)).frame is frame
    r.handle_timeout(6.0)
    # the id reused after the timeout
    assert completed(r.add(SRC, DST, 9, 300 << 16, frame, 6.0)).frame is frame
    assert r.frames_completed == 3


# --------------------------------------------------------------------- deadlines


def test_next_deadline_tracks_oldest_partial_frame() -> None:
    frame = make_frame(4000, seed=60)
    s0, s1, s2 = segments(frame)
    r = Reassembler(timeout=10.0)
    assert r.next_deadline() is None
    assert r.add(SRC, DST, 1, *s0, 1.0) is STORED
    assert r.add(SRC, DST, 2, *s0, 2.0) is STORED
    assert r.add(SRC, DST, 3, *s0, 3.0) is STORED
    assert r.next_deadline() == 11.0
    assert r.add(SRC, DST, 1, *s1, 9.0) is STORED  # later segments do not refresh it
    assert r.next_deadline() == 11.0
    assert bytes(completed(r.add(SRC, DST, 1, *s2, 9.5)).frame) == frame  # frame 1 completes
    assert r.next_deadline() == 12.0
    assert r.handle_timeout(12.5) == 1
    assert r.next_deadline() == 13.0
    assert r.handle_timeout(100.0) == 1
    assert r.next_deadline() is None
    assert r.timeouts == 2
    assert r.drops[DropReason.REASSEMBLY_TIMEOUT] == 2


def test_stale_entry_is_not_matched_without_handle_timeout() -> None:
    """A partial frame past its deadline never absorbs new segments (OVS does the same)."""
    frame = make_frame(4000, seed=61)
    s0, s1, s2 = segments(frame)
    r = Reassembler(timeout=10.0)
    assert r.add(SRC, DST, 1, *s0, 0.0) is STORED
    assert r.add(SRC, DST, 1, *s1, 0.0) is STORED
    assert r.add(SRC, DST, 1, *s2, 10.0) is STORED  # not the frame: a new one
    assert r.drops[DropReason.REASSEMBLY_TIMEOUT] == 1
    assert r.timeouts == 1
    assert r.entries == 1  # s2 started a fresh entry
    assert r.next_deadline() == 20.0


def test_new_frame_expires_stale_ones() -> None:
    r = Reassembler(timeout=10.0)
    frame = make_frame(4000, seed=62)
    assert r.add(SRC, DST, 1, *segments(frame)[0], 0.0) is STORED
    assert r.add(SRC, DST, 2, *segments(frame)[0], 50.0) is STORED
    assert r.entries == 1
    assert r.timeouts == 1


def test_clock_going_backwards_is_harmless() -> None:
    frame = make_frame(4000, seed=63)
    r = Reassembler(timeout=10.0)
    assert r.add(SRC, DST, 1, *segments(frame)[0], 100.0) is STORED
    assert r.add(SRC, DST, 2, *segments(frame)[0], 50.0) is STORED  # clock clamped to 100
    assert r.next_deadline() == 110.0
    assert r.handle_timeout(60.0) == 0
    assert r.entries == 2
    assert r.handle_timeout(110.0) == 2


# --------------------------------------------------------------------- flush, stats


def test_flush_drops_everything() -> None:
    frame = make_frame(4000, seed=70)
    r = Reassembler()
    for ack in range(5):
        assert r.add(SRC, DST, ack, *segments(frame)[0], 0.0) is STORED
    assert r.flush() == 5
    assert r.drops[DropReason.INCOMPLETE_AT_EOF] == 5
    assert_empty(r)
    r.add(SRC, DST, 9, *segments(frame)[0], 0.0)
    assert r.flush(DropReason.REASSEMBLY_TIMEOUT) == 1
    assert r.drops[DropReason.REASSEMBLY_TIMEOUT] == 1
    assert r.flush() == 0
    # flushed keys are not remembered: a restarted capture may resend them
    assert feed(r, segments(frame), ack=9) == [frame]


def test_stats_are_json_ready_and_consistent() -> None:
    frame = make_frame(4000, seed=71)
    r = Reassembler()
    feed(r, segments(frame), ack=1)
    r.add(SRC, DST, 2, *segments(frame)[0], 0.0)
    r.add(SRC2, DST, 2, *segments(frame)[0], 0.0)
    stats = r.stats()
    json.dumps(stats)
    assert stats["entries"] == 2
    assert stats["bytes_held"] == 2 * (4000 + ENTRY_OVERHEAD) == sum(r.bytes_by_source.values())
    assert stats["peak_bytes"] == stats["bytes_held"]
    assert stats["frames_completed"] == 1
    assert stats["segments_in"] == 5
    assert stats["evictions"] == 0
    assert stats["timeouts"] == 0
    assert stats["sources"] == 2
    assert all(isinstance(v, int) for v in stats.values())


def test_shared_drop_counters() -> None:
    drops = DropCounters()
    r = Reassembler(drops=drops)
    assert r.add(SRC, DST, 1, 5 << 16, b"", 0.0) is DropReason.EMPTY_SEGMENT
    assert r.drops is drops
    assert drops[DropReason.EMPTY_SEGMENT] == 1


def test_remembered_keys_are_bounded() -> None:
    r = Reassembler(max_frames=4)  # remembers 8 x 4 keys
    frame = make_frame(300, seed=72)
    for ack in range(100):
        assert feed(r, cut(frame, [150]), ack=ack) == [frame]
    assert r.stats()["recent_keys"] <= 32
    r.handle_timeout(DEFAULT_TIMEOUT + 1)
    assert r.stats()["recent_keys"] == 0


# --------------------------------------------------------------------- odd input


@pytest.mark.parametrize(
    "payload",
    [
        memoryview(bytes(range(40)))[::2],  # strided, not contiguous
        memoryview(bytes(range(40))).cast("I"),  # 4-byte items
        memoryview(bytes(range(40))).cast("B", (4, 10)),  # 2-D
        memoryview(bytes(range(40))).cast("b"),  # signed bytes
    ],
)
def test_odd_memoryviews_are_handled_as_their_bytes(payload: memoryview) -> None:
    data = payload.tobytes()
    n = len(data)
    r = Reassembler()
    frame = data + bytes(range(100, 110))
    length = len(frame)
    assert r.add(SRC, DST, 1, length << 16 | 0, payload, 0.0) is STORED
    got = r.add(SRC, DST, 1, length << 16 | 0, payload, 0.0)
    assert got is DropReason.DUPLICATE_SEGMENT
    assert bytes(completed(r.add(SRC, DST, 1, length << 16 | n, frame[n:], 0.0)).frame) == frame
    assert r.drops[DropReason.DUPLICATE_SEGMENT] == 1
    single = completed(r.add(SRC, DST, 2, n << 16, payload, 0.0))
    assert bytes(single.frame) == data


@pytest.mark.parametrize(
    ("seq", "first", "second"),
    [
        # L = 0xFFFF, offset 0xFFFF
        (-1, DropReason.SEGMENT_PAST_END, DropReason.SEGMENT_PAST_END),
        # only the low 32 bits count: L = 10, offset 0, a whole frame; then its copy
        (2**32 + (10 << 16), "complete", DropReason.LATE_SEGMENT),
        (2**40 - 1, DropReason.SEGMENT_PAST_END, DropReason.SEGMENT_PAST_END),
        # L = 0x8000, offset 0: stored; other bytes at the same place conflict
        (-(2**31), STORED, DropReason.OVERLAP_CONFLICT),
    ],
)
def test_out_of_range_seq_never_raises(seq: int, first: object, second: object) -> None:
    r = Reassembler()
    got = r.add(SRC, DST, 1, seq, b"x" * 10, 0.0)
    if first == "complete":
        assert bytes(completed(got).frame) == b"x" * 10
    else:
        assert got is first
    assert r.add(SRC, DST, 1, seq, b"y" * 10, float("nan")) is second
    r.flush()
    assert_empty(r)


# --- building a frame in the caller's receive buffer (``room``) ---------------------


def test_room_first_piece_is_kept_in_place_and_completed_there() -> None:
    frame = bytes(random.Random(5).randbytes(5000))
    rx = bytearray(64 + 6000)
    rx[64 : 64 + 4000] = frame[:4000]
    r = Reassembler()
    assert r.add(SRC, DST, 9, 5000 << 16, memoryview(rx)[64:4064], 0.0, room=(rx, 64)) is KEPT
    assert r.bytes_held == 5000 + ENTRY_OVERHEAD  # charged as if allocated
    got = completed(r.add(SRC, DST, 9, 5000 << 16 | 4000, frame[4000:], 0.0))
    assert bytes(got.frame) == frame
    assert got.buffer is rx  # handed back to the caller
    assert isinstance(got.frame, memoryview) and got.frame.obj is rx  # no copy: built in rx
    assert bytes(rx[64 : 64 + 5000]) == frame
    assert got.segments == 2
    assert r.entries == 0 and r.bytes_held == 0


@pytest.mark.parametrize("tail_start", [4000, 4500])  # touching the first piece, or not
def test_room_first_piece_after_the_tail_takes_the_tail_in(tail_start: int) -> None:
    """GRO's usual order: the short tail, then the big first piece.  The frame moves
    into the first piece's receive buffer (the few tail bytes are copied, not the
    piece)."""
    frame = bytes(random.Random(7).randbytes(5000))
    r = Reassembler()
    tail = bytearray(70000)
    tail[:1000] = frame[4000:]
    got = r.add(SRC, DST, 9, 5000 << 16 | tail_start, memoryview(tail)[tail_start - 4000 : 1000],
                0.0, tos=0x03, room=(tail, tail_start - 4000))  # fmt: skip
    assert got is STORED  # not at offset 0: copied, the buffer stays the caller's
    tail[:] = bytes(70000)  # the caller reuses that receive buffer
    rx = bytearray(64 + 6000)
    rx[64 : 64 + 4000] = frame[:4000]
    got = r.add(SRC, DST, 9, 5000 << 16, memoryview(rx)[64:4064], 0.0, tos=0xB8, room=(rx, 64))
    if tail_start > 4000:
        assert got is KEPT  # the tail moved next to the piece; a hole is left
        got = r.add(SRC, DST, 9, 5000 << 16 | 4000, frame[4000:tail_start], 0.0)
    done = completed(got)
    assert bytes(done.frame) == frame
    assert done.buffer is rx  # also when the piece that is kept completes the frame
    assert isinstance(done.frame, memoryview) and done.frame.obj is rx
    assert done.segments == (2 if tail_start == 4000 else 3)
    # the offset-0 segment's TOS, CE from any segment
    assert (done.tos, done.ce) == (0xB8, True)
    assert r.entries == 0 and r.bytes_held == 0
    assert r.frames_completed == 1


def test_room_first_piece_overlapping_stored_bytes_is_checked_not_kept() -> None:
    frame = bytes(random.Random(8).randbytes(5000))
    r = Reassembler()
    assert r.add(SRC, DST, 9, 5000 << 16 | 3000, frame[3000:], 0.0) is STORED
    rx = bytearray(6000)
    rx[:4000] = frame[:3999] + b"!"  # overlaps the stored bytes with a different one
    got = r.add(SRC, DST, 9, 5000 << 16, memoryview(rx)[:4000], 0.0, room=(rx, 0))
    assert got is DropReason.OVERLAP_CONFLICT  # refused: not kept
    assert r.drops[DropReason.OVERLAP_CONFLICT] == 1
    assert r.entries == 0
    rx[:4000] = frame[:4000]  # the same bytes: completes, in the frame's own buffer
    assert r.add(SRC, DST, 10, 5000 << 16 | 3000, frame[3000:], 0.0) is STORED
    done = completed(r.add(SRC, DST, 10, 5000 << 16, memoryview(rx)[:4000], 0.0, room=(rx, 0)))
    assert bytes(done.frame) == frame
    assert done.buffer is None  # copied: rx was never the reassembler's
    assert isinstance(done.frame, memoryview) and done.frame.obj is not rx


@pytest.mark.parametrize(
    ("what", "offset", "room_size"),
    [("not the first piece", 1000, 6000), ("no space for the whole frame", 0, 4999)],
)
def test_room_is_not_used(what: str, offset: int, room_size: int) -> None:
    frame = bytes(random.Random(6).randbytes(5000))
    rx = bytearray(room_size)
    piece = frame[offset : offset + 1000]
    rx[:1000] = piece
    r = Reassembler()
    got = r.add(SRC, DST, 9, 5000 << 16 | offset, memoryview(rx)[:1000], 0.0, room=(rx, 0))
    assert got is STORED, what  # copied, not kept
    rx[:] = bytes(room_size)  # the caller reuses its buffer: the frame must not change
    rest = [
        r.add(SRC, DST, 9, 5000 << 16 | start, frame[start : start + 1000], 0.0)
        for start in range(0, 5000, 1000)
        if start != offset
    ]
    assert outcomes(rest) == [STORED, STORED, STORED, frame]
    assert completed(rest[-1]).buffer is None


@pytest.mark.parametrize(
    ("reason", "limits", "seq"),
    [
        (DropReason.SOURCE_BUDGET, {"source_budget": 1000}, 5000 << 16),
        (DropReason.MEMORY_EVICTED, {"high_water": 1000, "low_water": 500}, 5000 << 16),
        (DropReason.SEGMENT_PAST_END, {}, 50 << 16),
    ],
)
def test_room_is_not_kept_when_the_segment_is_refused(
    reason: DropReason, limits: dict[str, int], seq: int
) -> None:
    rx = bytearray(70000)
    r = Reassembler(**limits)  # type: ignore[arg-type]
    assert r.add(SRC, DST, 9, seq, memoryview(rx)[:100], 0.0, room=(rx, 0)) is reason
    assert r.drops[reason] == 1
    assert r.entries == 0 and r.bytes_held == 0


def test_room_copy_of_a_kept_first_piece_is_not_kept() -> None:
    """A duplicate of the first piece, offered in a second buffer, leaves that buffer
    to the caller; a late copy after completion too."""
    frame = bytes(random.Random(9).randbytes(5000))
    rx1, rx2 = bytearray(6000), bytearray(6000)
    rx1[:4000] = rx2[:4000] = frame[:4000]
    r = Reassembler()
    assert r.add(SRC, DST, 9, 5000 << 16, memoryview(rx1)[:4000], 0.0, room=(rx1, 0)) is KEPT
    got = r.add(SRC, DST, 9, 5000 << 16, memoryview(rx2)[:4000], 0.0, room=(rx2, 0))
    assert got is DropReason.DUPLICATE_SEGMENT
    rx2[:] = bytes(6000)  # the caller reuses rx2 at once
    done = completed(r.add(SRC, DST, 9, 5000 << 16 | 4000, frame[4000:], 0.0))
    assert bytes(done.frame) == frame and done.buffer is rx1
    rx2[:4000] = frame[:4000]
    got = r.add(SRC, DST, 9, 5000 << 16, memoryview(rx2)[:4000], 0.0, room=(rx2, 0))
    assert got is DropReason.LATE_SEGMENT


def test_room_kept_buffer_of_a_dropped_frame_is_let_go() -> None:
    """A kept frame that is dropped (another L for its id) gives no buffer back; the
    next frame is built in the buffer offered with it."""
    frame = bytes(random.Random(10).randbytes(5000))
    rx1, rx2 = bytearray(6000), bytearray(6000)
    rx1[:4000] = rx2[:4000] = frame[:4000]
    r = Reassembler()
    assert r.add(SRC, DST, 9, 5000 << 16, memoryview(rx1)[:4000], 0.0, room=(rx1, 0)) is KEPT
    got = r.add(SRC, DST, 9, 5001 << 16 | 4000, frame[4000:], 0.0)
    assert got is DropReason.LENGTH_MISMATCH
    assert r.entries == 0 and r.bytes_held == 0
    assert r.add(SRC, DST, 10, 5000 << 16, memoryview(rx2)[:4000], 0.0, room=(rx2, 0)) is KEPT
    done = completed(r.add(SRC, DST, 10, 5000 << 16 | 4000, frame[4000:], 0.0))
    assert bytes(done.frame) == frame and done.buffer is rx2


def test_a_whole_copy_of_a_partly_stored_frame_is_delivered_once() -> None:
    """A frame that arrives whole while some of its segments are stored completes
    that partial frame; the segments still to come are late, not a second frame."""
    r = Reassembler()
    frame = bytes(range(200))
    first, rest = cut(frame, [100])
    assert r.add(SRC, DST, 1, *first, 0.0) is Pending.STORED
    done = r.add(SRC, DST, 1, 200 << 16, frame, 0.0)
    assert type(done) is Completed and bytes(done.frame) == frame and done.segments == 2
    assert r.add(SRC, DST, 1, *rest, 0.0) is DropReason.LATE_SEGMENT
    assert r.frames_completed == 1 and r.entries == 0


def test_a_whole_copy_that_disagrees_with_stored_bytes_drops_the_frame() -> None:
    r = Reassembler()
    frame = bytes(range(200))
    first, _rest = cut(frame, [100])
    assert r.add(SRC, DST, 1, *first, 0.0) is Pending.STORED
    forged = bytes(50) + frame[50:]
    assert r.add(SRC, DST, 1, 200 << 16, forged, 0.0) is DropReason.OVERLAP_CONFLICT
    assert r.frames_completed == 0 and r.entries == 0
