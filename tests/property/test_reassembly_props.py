"""Hypothesis properties of sttun.core.reassembly.Reassembler."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from random import Random

from hypothesis import given, settings
from hypothesis import strategies as st

from sttun.core.drops import DropReason
from sttun.core.reassembly import ENTRY_OVERHEAD, Completed, Pending, Reassembler

SRC = "198.18.0.1"
DST = "198.18.0.2"
#: Reasons a segment's arrival may count against *other* partial frames (expired,
#: evicted for room) while the segment itself is stored or refused.
SIDE_DROPS = frozenset(
    {
        DropReason.REASSEMBLY_TIMEOUT,
        DropReason.MEMORY_EVICTED,
        DropReason.SOURCE_BUDGET,
        DropReason.TOO_MANY_FRAMES,
    }
)


@st.composite
def delivery(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]], bool]:
    """A frame, the segments actually delivered (shuffled, duplicated, some lost,
    some re-segmented or corrupted copies), and whether the uncorrupted segments
    cover the whole frame."""
    length = draw(st.integers(2, 6000))
    frame = draw(st.binary(min_size=length, max_size=length))
    points = sorted(draw(st.sets(st.integers(1, length - 1), min_size=1, max_size=12)))
    bounds = [0, *points, length]
    pieces = list(itertools.pairwise(bounds))
    # lost pieces
    keep = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    if draw(st.booleans()):
        keep = [True] * len(pieces)  # often nothing lost
    sent = [p for p, k in zip(pieces, keep, strict=True) if k]
    # duplicates and re-segmented retransmits (arbitrary sub-ranges, never the whole frame)
    extra = draw(
        st.lists(
            st.tuples(st.integers(0, length - 1), st.integers(1, length)).filter(
                lambda t: t[0] < t[1] and t[1] - t[0] < length
            ),
            max_size=6,
        )
    )
    good = sent + extra + [pieces[i] for i in draw(st.lists(st.integers(0, len(pieces) - 1)))]
    good = draw(st.permutations(good))
    segs = [(length << 16 | a, frame[a:b]) for a, b in good]
    # corrupted copies, each sent some time after the genuine segment it imitates
    # (a forgery that arrives first is indistinguishable from the real thing)
    if good:
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.integers(0, len(good) - 1))
            a, b = good[i]
            bad = bytearray(frame[a:b])
            bad[draw(st.integers(0, b - a - 1))] ^= 0xFF
            twin = segs.index((length << 16 | a, frame[a:b]))
            segs.insert(draw(st.integers(twin + 1, len(segs))), (length << 16 | a, bytes(bad)))
    covered = bytearray(length)
    for a, b in good:
        covered[a:b] = b"\x01" * (b - a)
    return frame, segs, all(covered)


@settings(max_examples=300, deadline=None)
@given(delivery())
def test_reassembly_gives_the_frame_or_nothing(
    case: tuple[bytes, list[tuple[int, bytes]], bool],
) -> None:
    frame, segs, complete = case
    r = Reassembler()
    out = []
    for seq, payload in segs:
        got = r.add(SRC, DST, 1, seq, payload, 0.0)
        if isinstance(got, Completed):
            out.append(bytes(got.frame))
            assert got.buffer is None  # no receive buffer was offered
        else:
            assert isinstance(got, DropReason) or got is Pending.STORED
    check_outcome(r, frame, segs, complete, out)


def check_outcome(
    r: Reassembler, frame: bytes, segs: list[tuple[int, bytes]], complete: bool, out: list[bytes]
) -> None:
    """The frame came out once if all of it arrived uncorrupted, never anything else."""
    assert len(out) <= 1  # delivered at most once
    assert all(o == frame for o in out)  # never anything else
    corrupted = len(segs) > sum(1 for s, p in segs if frame[s & 0xFFFF :][: len(p)] == p)
    if complete and not corrupted:
        assert out == [frame]
    if not complete:
        assert out == []
    r.flush()
    assert r.entries == 0
    assert r.bytes_held == 0


@settings(max_examples=300, deadline=None)
@given(delivery(), st.integers(0, 80), st.integers(-100, 100), st.randoms(use_true_random=False))
def test_reassembly_in_the_receive_buffer(
    case: tuple[bytes, list[tuple[int, bytes]], bool], header: int, slack: int, rnd: Random
) -> None:
    """Like the daemon: every segment arrives in one receive buffer at ``header``,
    offered with ``room``; the buffer is overwritten by the next packet unless the
    reassembler kept it (``Pending.KEPT``), and a kept one is replaced.  Every result
    is the one without ``room`` (STORED may become KEPT), frames, their TOS, CE and
    segment count included (a buffer kept without saying so would be scribbled
    over); a completed frame built in a kept buffer hands that buffer back."""
    frame, segs, complete = case
    toses = [rnd.randrange(256) for _ in segs]
    size = max(header + len(frame) + slack, header + max((len(p) for _, p in segs), default=0))
    r = Reassembler()
    plain = Reassembler()
    rx = bytearray(size)
    out = []
    held: list[bytearray] = []  # buffers the reassembler said it kept, not yet given back
    for (seq, payload), tos in zip(segs, toses, strict=True):
        rx[header : header + len(payload)] = payload
        got = r.add(SRC, DST, 1, seq, memoryview(rx)[header : header + len(payload)], 0.0,
                    tos, room=(rx, header))  # fmt: skip
        want = plain.add(SRC, DST, 1, seq, payload, 0.0, tos)
        if isinstance(want, Completed):
            assert isinstance(got, Completed)
            out.append(bytes(got.frame))
            assert bytes(got.frame) == bytes(want.frame)
            assert (got.tos, got.ce, got.segments) == (want.tos, want.ce, want.segments)
            assert want.buffer is None
            if got.buffer is not None:  # built in place: in a kept buffer, or in rx now
                assert isinstance(got.frame, memoryview) and got.frame.obj is got.buffer
                assert got.buffer is rx or any(got.buffer is b for b in held)
                held = [b for b in held if b is not got.buffer]
            elif got.segments > 1:  # in the reassembler's own memory, not in rx
                assert not (isinstance(got.frame, memoryview) and got.frame.obj is rx)
        elif want is Pending.STORED:
            assert got in (Pending.STORED, Pending.KEPT)
        else:
            assert got is want  # the same drop
        if got is Pending.KEPT:
            assert seq & 0xFFFF == 0  # only the first piece is kept
            held.append(rx)
            rx = bytearray(size)
        else:
            rx[:] = b"\xa5" * size  # the next receive overwrites everything
    # one frame id at one time: one frame, and only its first piece may be kept
    assert len(held) <= 1
    check_outcome(r, frame, segs, complete, out)


segment = st.tuples(
    st.sampled_from(["s1", "s2", "s3"]),  # src
    st.sampled_from(["d1", "d2"]),  # dst
    st.integers(0, 3),  # ack
    st.one_of(
        st.integers(0, 2**32 - 1),  # any SEQ at all
        st.tuples(st.integers(0, 5000), st.integers(0, 5000)).map(lambda t: t[0] << 16 | t[1]),
    ),
    st.integers(0, 3000),  # payload length
    st.integers(0, 255),  # payload fill byte
    st.floats(0, 20, allow_nan=False),  # time step
    st.integers(0, 255),  # tos
)
op = st.one_of(
    segment,
    st.just("timeout"),
    st.just("flush"),
)


def check_invariants(r: Reassembler) -> None:
    stats = r.stats()
    assert r.bytes_held <= r.high_water
    assert r.peak_bytes <= r.high_water
    assert r.entries <= r.max_frames
    by_src: dict[Hashable, int] = r.bytes_by_source
    assert sum(by_src.values()) == r.bytes_held == stats["bytes_held"]
    assert all(0 < v <= r.source_budget for v in by_src.values())
    assert stats["entries"] == r.entries
    assert (r.entries == 0) == (r.bytes_held == 0) == (r.next_deadline() is None)
    assert r.bytes_held >= r.entries * (1 + ENTRY_OVERHEAD)
    # evictions are counted under these reasons (which also count refused newcomers)
    assert r.evictions <= sum(
        r.drops[x]
        for x in (DropReason.MEMORY_EVICTED, DropReason.SOURCE_BUDGET, DropReason.TOO_MANY_FRAMES)
    )


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(op, max_size=80),
    high_water=st.integers(1, 40_000),
    low_frac=st.floats(0, 1),
    source_budget=st.integers(1, 30_000),
    max_frames=st.integers(1, 6),
    timeout=st.floats(0.5, 60),
)
def test_segment_storms_stay_bounded(
    ops: list[object],
    high_water: int,
    low_frac: float,
    source_budget: int,
    max_frames: int,
    timeout: float,
) -> None:
    r = Reassembler(
        timeout=timeout,
        high_water=high_water,
        low_water=int(high_water * low_frac),
        source_budget=source_budget,
        max_frames=max_frames,
    )
    now = 0.0
    adds = 0
    delivered = 0
    for o in ops:
        if o == "timeout":
            r.handle_timeout(now)
        elif o == "flush":
            r.flush()
        else:
            assert isinstance(o, tuple)
            src, dst, ack, seq, n, fill, step, tos = o
            now += step
            before = dict(r.drops.packets)
            got = r.add(src, dst, ack, seq, bytes([fill]) * n, now, tos)
            adds += 1
            counted = {k for k, v in r.drops.packets.items() if v != before[k]}
            if isinstance(got, Completed):
                delivered += 1
                assert len(got.frame) == (seq >> 16) & 0xFFFF
                if got.segments == 1:
                    assert bytes(got.frame) == bytes([fill]) * n
                assert 0 <= got.tos <= 255 and got.segments >= 1 and got.buffer is None
                assert got.tos == tos or got.segments > 1  # a whole frame: its own TOS
                assert not counted  # completing a frame drops nothing
            elif isinstance(got, DropReason):
                # the reason returned is counted once; frames may expire on the way
                assert r.drops.packets[got] == before[got] + 1
                assert counted - {got} <= {DropReason.REASSEMBLY_TIMEOUT}
            else:
                assert got is Pending.STORED  # no room offered: never KEPT
                assert (src, dst, ack) in r._frames  # stored in a partial frame
                assert counted <= SIDE_DROPS  # others may have been evicted for it
        check_invariants(r)
    assert r.segments_in == adds
    assert r.frames_completed == delivered
    r.flush()
    assert r.entries == 0
    assert r.bytes_held == 0
    assert r.bytes_by_source == {}
    assert r.next_deadline() is None
