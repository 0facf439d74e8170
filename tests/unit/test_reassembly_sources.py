"""Per-source reassembly numbers (``Reassembler.source_stats``), what ``sttun show``
gives each tunnel as its peer's reassembly state (issue #12): two peers get their own
numbers, which add up to the reassembler's."""

from __future__ import annotations

from sttun.core.drops import DropReason
from sttun.core.reassembly import ENTRY_OVERHEAD, SOURCES_PER_FRAME, Pending, Reassembler

A = b"\xc6\x12\x00\x02"  # 198.18.0.2, packed as Endpoint.receive passes it
B = b"\xc6\x12\x00\x03"  # 198.18.0.3
DST = b"\xc6\x12\x00\x01"
ZERO = {"entries": 0, "bytes": 0, "peak_bytes": 0, "evictions": 0, "timeouts": 0}


def first_piece(r: Reassembler, src: bytes, ack: int, length: int, now: float) -> None:
    """The first 100 bytes of a ``length``-byte frame: starts a partial frame."""
    assert r.add(src, DST, ack, length << 16, bytes(100), now, 0) is Pending.STORED


def test_two_peers_get_their_own_numbers() -> None:
    r = Reassembler(timeout=10.0)
    first_piece(r, A, 1, 1000, now=0.0)
    first_piece(r, A, 2, 2000, now=0.0)
    first_piece(r, B, 1, 3000, now=5.0)
    a, b = r.source_stats(A), r.source_stats(B)
    charge = ENTRY_OVERHEAD
    assert a == {
        "entries": 2, "bytes": 3000 + 2 * charge, "peak_bytes": 3000 + 2 * charge,
        "evictions": 0, "timeouts": 0,
    }  # fmt: skip
    assert b == {
        "entries": 1, "bytes": 3000 + charge, "peak_bytes": 3000 + charge,
        "evictions": 0, "timeouts": 0,
    }  # fmt: skip
    total = r.stats()
    assert total["entries"] == a["entries"] + b["entries"]
    assert total["bytes_held"] == a["bytes"] + b["bytes"]

    # A's frames time out; B's (started later) are still waiting
    assert r.handle_timeout(10.0) == 2
    a, b = r.source_stats(A), r.source_stats(B)
    assert a == {"entries": 0, "bytes": 0, "peak_bytes": 3000 + 2 * charge,
                 "evictions": 0, "timeouts": 2}  # fmt: skip
    assert (b["entries"], b["timeouts"]) == (1, 0)
    assert r.stats()["timeouts"] == a["timeouts"] + b["timeouts"]


def test_evictions_are_counted_for_the_source_that_lost_the_frame() -> None:
    charge = 20000 + ENTRY_OVERHEAD
    r = Reassembler(source_budget=2 * charge, high_water=10 * charge, low_water=5 * charge)
    for ack in (1, 2, 3):  # the third pushes A's oldest out of its budget
        first_piece(r, A, ack, 20000, now=0.0)
    first_piece(r, B, 1, 20000, now=0.0)
    assert r.drops.as_dict() == {DropReason.SOURCE_BUDGET.value: 1}
    a, b = r.source_stats(A), r.source_stats(B)
    assert (a["entries"], a["evictions"], a["peak_bytes"]) == (2, 1, 2 * charge)
    assert (b["entries"], b["evictions"], b["peak_bytes"]) == (1, 0, charge)
    assert r.stats()["evictions"] == 1


def test_completed_frames_leave_the_peak_and_release_the_bytes() -> None:
    r = Reassembler()
    first_piece(r, A, 7, 200, now=0.0)
    assert r.add(A, DST, 7, 200 << 16 | 100, bytes(100), 0.0, 0) is not None
    assert r.source_stats(A) == {**ZERO, "peak_bytes": 200 + ENTRY_OVERHEAD}
    # a whole frame in one segment never touches the partial-frame tables
    assert r.add(B, DST, 1, 100 << 16, bytes(100), 0.0, 0) is not None
    assert r.source_stats(B) == ZERO
    assert r.source_stats(b"unknown") == ZERO


def test_history_is_bounded_and_keeps_sources_that_hold_frames() -> None:
    r = Reassembler(max_frames=2, timeout=100.0)
    limit = SOURCES_PER_FRAME * 2
    first_piece(r, b"keep", 1, 1000, now=0.0)  # stays partial throughout
    for i in range(3 * limit):  # idle sources: a frame each, completed at once
        src = i.to_bytes(4, "big")
        first_piece(r, src, 1, 200, now=0.0)
        assert r.add(src, DST, 1, 200 << 16 | 100, bytes(100), 0.0, 0) is not None
    assert r.stats()["sources_remembered"] == limit
    assert r.source_stats(b"keep")["entries"] == 1
    assert r.source_stats(b"keep")["peak_bytes"] == 1000 + ENTRY_OVERHEAD
    newest = (3 * limit - 1).to_bytes(4, "big")
    assert r.source_stats(newest)["peak_bytes"] == 200 + ENTRY_OVERHEAD
    assert r.source_stats((0).to_bytes(4, "big")) == ZERO  # forgotten first
