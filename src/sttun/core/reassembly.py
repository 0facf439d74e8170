"""STT segment reassembly (sans-I/O).

STT cuts each STT frame (18-byte STT header + inner Ethernet frame, at most 65535
bytes) into segments that look like TCP.  The 32-bit SEQ of each segment carries the
frame length ``L`` in its upper half and the segment's byte offset in its lower half;
the ACK number is the frame identifier (protocol.md §1.2, §3).  :class:`Reassembler`
puts the frames back together.

It works on *raw segment payloads*: the caller has already verified the outer TCP
checksum and removed the 20-byte TCP-like header.  The STT header is never parsed
here (it may even be split across segments, protocol.md §11 #25); that happens after
completion, elsewhere.  Time is only ever the ``now`` argument (seconds, any
monotonic origin); nothing here reads a clock or touches a socket.

Rules (docs/protocol.md §3.2-3.3 and its recommendations):

* Frames are keyed on ``(src, dst, ack)``; ports are not part of the key.
* Coverage is tracked as byte intervals, never as a byte count alone, so duplicates
  and overlaps cannot "complete" a frame that still has holes.  A segment whose bytes
  are all stored already, identically, is a ``DUPLICATE_SEGMENT``; an overlap with
  different bytes, or a segment that disagrees on ``L``, throws the whole partial
  frame away (``OVERLAP_CONFLICT`` / ``LENGTH_MISMATCH``).  A partial overlap with
  identical bytes keeps the new part (re-segmented retransmits).
* Keys of recently completed or deliberately dropped frames are remembered for one
  timeout, so late segments of them are counted (``LATE_SEGMENT``) and neither
  allocate nor redeliver.
* Memory is charged before it is allocated (the ``L``-byte buffer plus
  :data:`ENTRY_OVERHEAD`) against a global high/low watermark, a per-source budget
  and a cap on concurrent partial frames; the oldest partial frames are evicted
  first.  ``bytes_held`` never exceeds ``high_water``.
* A partial frame expires ``timeout`` seconds after its *first* segment; the timer is
  never refreshed (OVS ``FRAG_EXP_TIME``).
"""

from __future__ import annotations

import enum
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Hashable
from typing import NamedTuple

from sttun.core.drops import DropCounters, DropReason
from sttun.errors import ConfigError

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_SOURCE_BUDGET",
    "DEFAULT_TIMEOUT",
    "ENTRY_OVERHEAD",
    "RECENT_PER_FRAME",
    "SOURCES_PER_FRAME",
    "AddResult",
    "Completed",
    "Pending",
    "Reassembler",
]

#: Seconds a partial frame may wait for its missing segments, counted from its first
#: segment.  OVS ``FRAG_EXP_TIME`` (docs/protocol.md, limits); the draft only says "recently".
DEFAULT_TIMEOUT: float = 30.0
#: Bytes held by partial frames above which eviction starts.  OVS ``REASM_HI_THRESH``
#: (4 MiB per CPU; docs/protocol.md, limits).
DEFAULT_HIGH_WATER: int = 4 * 1024 * 1024
#: Eviction goes on until this many bytes (plus the newcomer) are held.  OVS
#: ``REASM_LO_THRESH`` (3 MiB per CPU; docs/protocol.md, limits).
DEFAULT_LOW_WATER: int = 3 * 1024 * 1024
#: Bytes one outer source address may hold in partial frames.  Not in OVS (which has
#: no per-source limit); our choice: half of the high watermark, i.e. ~32 concurrent
#: 64 KB partial frames, far more than a well-behaved sender needs (GRO delivers most
#: frames in 1-2 pieces, RSS keeps a frame's segments together), while a single
#: misbehaving or spoofed source can never push the others out of more than half of
#: the memory.
DEFAULT_SOURCE_BUDGET: int = DEFAULT_HIGH_WATER // 2
#: Partial frames held at once.  OVS: 256 hash slots x 4 probes per CPU
#: (``FRAG_HASH_ENTRIES`` x ``FRAG_HASH_SEGS``), OVS-Windows: 1024 buckets.
DEFAULT_MAX_FRAMES: int = 1024
#: Fixed bytes charged per partial frame on top of its ``L``-byte buffer: the Python
#: objects that describe it (frame record ~120 B, bytearray header ~60 B, interval
#: list ~100 B, key tuple ~70 B, slots in three dicts ~150 B), rounded up.
ENTRY_OVERHEAD: int = 512
#: How many completed/dropped keys are remembered, per allowed partial frame
#: (8 x 1024 = 8192 keys by default, a few hundred KB of dict at most).
RECENT_PER_FRAME: int = 8
#: How many outer source addresses keep their per-source history (peak bytes,
#: evictions, timeouts), per allowed partial frame: 2 x 1024 by default.  Sources
#: holding partial frames always keep theirs (there are at most ``max_frames``); of
#: the others, the one that started a frame longest ago is forgotten first.
SOURCES_PER_FRAME: int = 2

_Key = tuple[Hashable, Hashable, int]

# Per-frame drop reasons that throw away a whole partial frame because of eviction.
_EVICTIONS = frozenset(
    (DropReason.MEMORY_EVICTED, DropReason.SOURCE_BUDGET, DropReason.TOO_MANY_FRAMES)
)


class Completed(NamedTuple):
    """A frame :meth:`Reassembler.add` finished.

    ``frame``: the STT frame, exactly ``L`` bytes.  ``tos``: the outer TOS /
    traffic class byte of its offset-0 segment.  ``ce``: any accepted segment
    carried ECN CE.  ``segments``: how many segments made it up.  ``buffer``: the
    caller's receive buffer the frame was built in (see ``room`` in
    :meth:`Reassembler.add`) — the caller's again once it is done with ``frame`` —
    or None when the frame is in the reassembler's own memory or is the payload
    that was passed in.
    """

    frame: bytes | memoryview
    tos: int
    ce: bool
    segments: int
    buffer: bytearray | None


class Pending(enum.Enum):
    """:meth:`Reassembler.add` stored the segment; its frame is not complete yet."""

    #: Copied into the reassembler's memory: the caller's buffer is free.
    STORED = "stored"
    #: Stored in place in the caller's receive buffer (``room``), which the
    #: reassembler now holds: the caller must receive into another one.  The buffer
    #: comes back as :attr:`Completed.buffer` when the frame completes.
    KEPT = "kept"


#: What one :meth:`Reassembler.add` call did with a segment.
AddResult = Completed | Pending | DropReason

_STORED = Pending.STORED
_KEPT = Pending.KEPT
_new_tuple = tuple.__new__


class _Frame:
    """One partial STT frame.  Internal: one object per frame, none per segment."""

    __slots__ = (
        "buf",
        "ce",
        "charge",
        "covered",
        "deadline",
        "ivs",
        "length",
        "owner",
        "segs",
        "src",
        "tos",
    )

    def __init__(
        self,
        src: Hashable,
        length: int,
        charge: int,
        deadline: float,
        tos: int,
        ce: bool,
        buf: memoryview | None = None,
        owner: bytearray | None = None,
    ) -> None:
        self.src = src
        self.length = length
        self.charge = charge
        self.deadline = deadline
        # The frame's bytes: a fresh buffer, or the caller's receive buffer kept in
        # place (see Reassembler.add, ``room``).
        self.buf: bytearray | memoryview = bytearray(length) if buf is None else buf
        # The caller's receive buffer ``buf`` lives in, if any.
        self.owner = owner
        # Covered byte ranges as a flat sorted list [s0, e0, s1, e1, ...] of half-open
        # intervals, merged so that e_k < s_(k+1) (never touching).
        self.ivs: list[int] = []
        self.covered = 0
        self.tos = tos
        self.ce = ce
        self.segs = 1  # segments stored (the first one included)


class _SourceHistory:
    """What one outer source address did over time (its current state is in the
    reassembler's per-source tables)."""

    __slots__ = ("evictions", "peak_bytes", "timeouts")

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.evictions = 0
        self.timeouts = 0


class Reassembler:
    """Reassembles STT frames from segment payloads; never raises on packet input.

    Feed every STT segment to :meth:`add`; it returns the complete frame when one is
    finished.  Call :meth:`handle_timeout` when :meth:`next_deadline` has passed, and
    :meth:`flush` at end of input.  Every refused segment or discarded partial frame
    is counted in :attr:`drops`.

    ``timeout``: seconds from a frame's first segment until it is given up.
    ``high_water`` / ``low_water``: when a new frame would push :attr:`bytes_held`
    over ``high_water``, the oldest partial frames are evicted until the new one fits
    under ``low_water``.  ``source_budget``: bytes one ``src`` may hold.
    ``max_frames``: partial frames held at once.  ``drops``: counters to add to
    (a fresh :class:`DropCounters` if omitted).  Raises :class:`ConfigError` for
    impossible limits.
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        source_budget: int = DEFAULT_SOURCE_BUDGET,
        max_frames: int = DEFAULT_MAX_FRAMES,
        drops: DropCounters | None = None,
    ) -> None:
        if not timeout > 0:
            raise ConfigError(f"reassembly timeout: expected > 0 seconds, got {timeout!r}")
        if high_water <= 0:
            raise ConfigError(f"reassembly high_water: expected > 0 bytes, got {high_water!r}")
        if not 0 <= low_water <= high_water:
            raise ConfigError(
                f"reassembly low_water: expected 0..high_water ({high_water}), got {low_water!r}"
            )
        if source_budget <= 0:
            raise ConfigError(
                f"reassembly source_budget: expected > 0 bytes, got {source_budget!r}"
            )
        if max_frames < 1:
            raise ConfigError(f"reassembly max_frames: expected >= 1, got {max_frames!r}")
        self.timeout = float(timeout)
        self.high_water = high_water
        self.low_water = low_water
        self.source_budget = source_budget
        self.max_frames = max_frames
        #: Drop tallies (segments and frames this reassembler refused).
        self.drops: DropCounters = drops if drops is not None else DropCounters()
        #: Bytes charged for partial frames right now (buffers + ENTRY_OVERHEAD each).
        self.bytes_held: int = 0
        #: Highest ``bytes_held`` seen.
        self.peak_bytes: int = 0
        #: Frames returned by add() (single-segment ones included).
        self.frames_completed: int = 0
        #: Calls to add().
        self.segments_in: int = 0
        #: Partial frames evicted (MEMORY_EVICTED, SOURCE_BUDGET, TOO_MANY_FRAMES).
        self.evictions: int = 0
        #: Partial frames given up after the timeout.
        self.timeouts: int = 0
        # Partial frames in first-seen order (== deadline order, the clock is clamped
        # to be monotonic), so the oldest / first to expire is always at the front.
        self._frames: OrderedDict[_Key, _Frame] = OrderedDict()
        # Per source: its partial frames in first-seen order, and the bytes charged.
        self._src_frames: dict[Hashable, OrderedDict[_Key, None]] = {}
        self._src_bytes: dict[Hashable, int] = {}
        # Per source: peak bytes, evictions, timeouts (see source_stats), bounded; the
        # source that started a frame most recently is at the end.
        self._src_history: OrderedDict[Hashable, _SourceHistory] = OrderedDict()
        self._src_history_max = SOURCES_PER_FRAME * max_frames
        # Recently completed or dropped keys -> (expiry, L or -1 for "any L").
        self._recent: OrderedDict[_Key, tuple[float, int]] = OrderedDict()
        self._recent_max = RECENT_PER_FRAME * max_frames
        self._clock = float("-inf")

    # ------------------------------------------------------------------ hot path

    def add(
        self,
        src: Hashable,
        dst: Hashable,
        ack: int,
        seq: int,
        payload: bytes | bytearray | memoryview,
        now: float,
        tos: int = 0,
        room: tuple[bytearray, int] | None = None,
    ) -> AddResult:
        """Take one segment payload; say what became of it.

        ``src``/``dst`` are the outer addresses (any hashable), ``ack`` the frame id,
        ``seq`` the raw 32-bit TCP SEQ (``L = seq >> 16``, offset ``seq & 0xFFFF``),
        ``payload`` the bytes after the 20-byte TCP-like header, ``now`` the current
        time in seconds and ``tos`` the outer IPv4 TOS / IPv6 traffic class byte.

        Returns a :class:`Completed` when this segment finishes a frame, a
        :class:`Pending` when it was stored and the frame still has holes, or the
        :class:`~sttun.core.drops.DropReason` it (or the partial frame it belonged
        to) was dropped for — also counted in :attr:`drops`.

        **Buffer ownership:** a frame that arrives whole in one segment (offset 0 and
        ``len(payload) == L``, the usual case with GRO) is returned *without a copy*:
        it is ``payload`` itself (a ``memoryview`` of it if it was a bytearray).  The
        caller must finish with it before reusing its receive buffer.  A frame built
        from several segments is a ``memoryview`` of a buffer the caller may keep.

        ``room = (buffer, offset)`` says ``payload`` is ``buffer[offset:offset +
        len(payload)]`` of a receive buffer the caller is willing to give up.  When
        such a segment is the offset-0 piece of a frame and ``buffer`` has space for
        the whole frame after ``offset``, the frame is assembled in place there
        instead of the piece being copied (for GRO, which delivers a 64 KB frame as
        one big piece and a short tail, usually the tail first): a new frame starts
        in ``buffer`` (the result is :attr:`Pending.KEPT`: receive into another
        buffer), and a frame that so far holds only bytes after the piece moves them
        into ``buffer``.  The completed frame is then a view of ``buffer``, and
        :attr:`Completed.buffer` hands ``buffer`` back.
        """
        self.segments_in += 1
        clock = self._clock
        if now > clock:
            self._clock = clock = now
        n = len(payload)
        if type(payload) is memoryview and (payload.nbytes != n or not payload.c_contiguous):
            # Not a flat byte view (items wider than a byte, several dimensions, or
            # strided): take its bytes.
            payload = _as_bytes_view(payload)
            n = len(payload)
        if n == 0:
            return self._refuse(DropReason.EMPTY_SEGMENT, 0)
        length = (seq >> 16) & 0xFFFF
        off = seq & 0xFFFF
        if length == 0:
            return self._refuse(DropReason.ZERO_LENGTH_FRAME, n)
        end = off + n
        if end > length:
            return self._refuse(DropReason.SEGMENT_PAST_END, n)
        key = (src, dst, ack)
        if n == length and key not in self._frames:
            # Whole frame in one segment (off is 0): no partial-frame table, no copy
            # (OVS does the same, protocol.md §3.3 step 4).  The key is remembered
            # like any completed frame's, so a duplicate is not delivered twice.
            # (A whole copy of a frame that is partly stored already goes the
            # general way: it completes that frame, which is then delivered once.)
            recent = self._recent
            seen = recent.get(key)
            if seen is not None and seen[0] > clock and seen[1] in (length, -1):
                return self._refuse(DropReason.LATE_SEGMENT, n)
            self._remember(key, length)
            self.frames_completed += 1
            if isinstance(payload, bytearray):
                payload = memoryview(payload)
            return _new_tuple(Completed, (payload, tos & 0xFF, tos & 3 == 3, 1, None))

        fr = self._frames.get(key)
        if fr is not None and fr.deadline <= clock:
            # Stale: OVS no longer matches an entry older than the timeout.
            self._drop(key, DropReason.REASSEMBLY_TIMEOUT, tombstone=False)
            self.timeouts += 1
            fr = None
        if fr is None:
            return self._start(key, src, length, off, end, payload, tos, room)
        if fr.length != length:
            self._drop(key, DropReason.LENGTH_MISMATCH, extra=n, any_length=True)
            return DropReason.LENGTH_MISMATCH
        stored = _STORED

        ivs = fr.ivs
        if (
            off == 0
            and room is not None
            and end <= ivs[0]
            and type(fr.buf) is bytearray
            and len(room[0]) - room[1] >= length
        ):
            # The big first piece after a short later one (GRO's usual order): move
            # the few stored bytes next to it in the caller's buffer rather than
            # copying the piece into the frame's own buffer.
            owner, base = room
            old = fr.buf
            fr.buf = view = memoryview(owner)[base : base + length]
            for k in range(0, len(ivs), 2):
                lo = ivs[k]
                hi = ivs[k + 1]
                view[lo:hi] = old[lo:hi]
            if ivs[0] == end:
                ivs[0] = 0
            else:
                ivs[0:0] = (0, end)
            fr.covered += n
            fr.tos = tos & 0xFF
            fr.owner = owner
            stored = _KEPT
        elif off == ivs[-1]:
            # In order: starts exactly where the highest covered range ends.
            fr.buf[off:end] = payload
            ivs[-1] = end
            fr.covered += n
        else:
            buf = fr.buf
            i = bisect_right(ivs, off)
            if not i & 1 and (i == len(ivs) or ivs[i] >= end):
                # Lands in a hole (no stored byte in [off, end)); at most touches the
                # ranges either side, which then merge.
                buf[off:end] = payload
                if i and ivs[i - 1] == off:
                    if i < len(ivs) and ivs[i] == end:
                        del ivs[i - 1 : i + 1]
                    else:
                        ivs[i - 1] = end
                elif i < len(ivs) and ivs[i] == end:
                    ivs[i] = off
                else:
                    ivs[i:i] = (off, end)
                fr.covered += n
            else:
                # Overlaps stored bytes: they must be identical.
                k0 = bisect_left(ivs, off) >> 1  # first range ending at or after off
                k1 = (bisect_right(ivs, end) + 1) >> 1  # ranges starting at or before end
                overlap = 0
                for k in range(2 * k0, 2 * k1, 2):
                    lo = ivs[k]
                    hi = ivs[k + 1]
                    if lo < off:
                        lo = off
                    if hi > end:
                        hi = end
                    if hi > lo:
                        overlap += hi - lo
                        if buf[lo:hi] != payload[lo - off : hi - off]:
                            self._drop(key, DropReason.OVERLAP_CONFLICT, extra=n, any_length=True)
                            return DropReason.OVERLAP_CONFLICT
                if overlap == n:
                    return self._refuse(DropReason.DUPLICATE_SEGMENT, n)
                # The overlapping bytes are identical, so writing the whole segment
                # only fills the holes.
                buf[off:end] = payload
                lo = ivs[2 * k0]
                hi = ivs[2 * k1 - 1]
                ivs[2 * k0 : 2 * k1] = (off if off < lo else lo, end if end > hi else hi)
                fr.covered += n - overlap
            if off == 0:
                fr.tos = tos & 0xFF
        fr.segs += 1
        if tos & 3 == 3:
            fr.ce = True
        if fr.covered < length:
            return stored

        # Complete.
        del self._frames[key]
        self._release(key, fr)
        self._remember(key, length)
        self.frames_completed += 1
        return _new_tuple(Completed, (memoryview(fr.buf), fr.tos, fr.ce, fr.segs, fr.owner))

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """When the oldest partial frame expires (its first segment + timeout), or None."""
        for fr in self._frames.values():
            return fr.deadline
        return None

    def handle_timeout(self, now: float) -> int:
        """Drop partial frames whose deadline is ``<= now``; return how many."""
        if now > self._clock:
            self._clock = now
        expired = self._expire()
        self._prune_recent()
        return expired

    def flush(self, reason: DropReason = DropReason.INCOMPLETE_AT_EOF) -> int:
        """Drop every partial frame, counted under ``reason``; return how many."""
        count = len(self._frames)
        while self._frames:
            self._drop(next(iter(self._frames)), reason, tombstone=False)
        return count

    # ------------------------------------------------------------------ stats

    @property
    def entries(self) -> int:
        """Partial frames held."""
        return len(self._frames)

    @property
    def bytes_by_source(self) -> dict[Hashable, int]:
        """Bytes charged per outer source address (a copy)."""
        return dict(self._src_bytes)

    def source_stats(self, src: Hashable) -> dict[str, int]:
        """One outer source address's share, as a JSON-ready dict.

        ``entries`` and ``bytes`` are its partial frames and the bytes charged for them
        now; ``peak_bytes``, ``evictions`` and ``timeouts`` its history (the same
        counters as :meth:`stats`, for this source only).  Before a frame completes
        its context id is unknown, so this is all the reassembler can say per tunnel:
        tunnels to the same remote address share these numbers.  Zeros for a source
        it has not seen (or has forgotten, see :data:`SOURCES_PER_FRAME`).
        """
        frames = self._src_frames.get(src)
        hist = self._src_history.get(src)
        return {
            "entries": 0 if frames is None else len(frames),
            "bytes": self._src_bytes.get(src, 0),
            "peak_bytes": 0 if hist is None else hist.peak_bytes,
            "evictions": 0 if hist is None else hist.evictions,
            "timeouts": 0 if hist is None else hist.timeouts,
        }

    def stats(self) -> dict[str, int]:
        """Counters as a JSON-ready dict (per source: :meth:`source_stats`)."""
        return {
            "entries": len(self._frames),
            "bytes_held": self.bytes_held,
            "peak_bytes": self.peak_bytes,
            "frames_completed": self.frames_completed,
            "segments_in": self.segments_in,
            "evictions": self.evictions,
            "timeouts": self.timeouts,
            "sources": len(self._src_bytes),
            "sources_remembered": len(self._src_history),
            "recent_keys": len(self._recent),
        }

    # ------------------------------------------------------------------ internals

    def _start(
        self,
        key: _Key,
        src: Hashable,
        length: int,
        off: int,
        end: int,
        payload: bytes | bytearray | memoryview,
        tos: int,
        room: tuple[bytearray, int] | None = None,
    ) -> Pending | DropReason:
        """First segment of a (so far) unknown frame: check limits, then allocate
        (or keep the caller's buffer, see ``room`` in :meth:`add`)."""
        n = end - off
        recent = self._recent.get(key)
        if recent is not None:
            expiry, rlen = recent
            if expiry > self._clock and (rlen < 0 or rlen == length):
                return self._refuse(DropReason.LATE_SEGMENT, n)
            # Expired, or a different L: a new frame that reuses the id.
            del self._recent[key]
        self._expire()
        charge = length + ENTRY_OVERHEAD
        refused = self._make_room(src, charge, n)
        if refused is not None:
            return refused
        kept = owner = None
        if room is not None and off == 0 and len(room[0]) - room[1] >= length:
            owner, base = room
            kept = memoryview(owner)[base : base + length]  # payload is already there
        fr = _Frame(
            src, length, charge, self._clock + self.timeout, tos & 0xFF, tos & 3 == 3, kept, owner
        )
        if kept is None:
            fr.buf[off:end] = payload
        fr.ivs.extend((off, end))
        fr.covered = n
        self._frames[key] = fr
        sf = self._src_frames.get(src)
        if sf is None:
            sf = self._src_frames[src] = OrderedDict()
            self._src_bytes[src] = 0
        sf[key] = None
        held = self._src_bytes[src] + charge
        self._src_bytes[src] = held
        self.bytes_held += charge
        if self.bytes_held > self.peak_bytes:
            self.peak_bytes = self.bytes_held
        history = self._src_history
        hist = history.get(src)
        if hist is None:
            hist = history[src] = _SourceHistory()
            if len(history) > self._src_history_max:
                self._forget_a_source()
        else:
            history.move_to_end(src)
        if held > hist.peak_bytes:
            hist.peak_bytes = held
        return _STORED if kept is None else _KEPT

    def _forget_a_source(self) -> None:
        """Drop the history of the idle source that started a frame longest ago."""
        holding = self._src_frames
        for old in self._src_history:
            if old not in holding:
                del self._src_history[old]
                return

    def _refuse(self, reason: DropReason, nbytes: int) -> DropReason:
        """Count one refused segment of ``nbytes`` payload bytes; return ``reason``."""
        self.drops.count(reason, nbytes)
        return reason

    def _make_room(self, src: Hashable, charge: int, n: int) -> DropReason | None:
        """Evict so a new frame costing ``charge`` fits; the (counted) reason if it never can."""
        if charge > self.source_budget:
            return self._refuse(DropReason.SOURCE_BUDGET, n)
        if charge > self.high_water:
            return self._refuse(DropReason.MEMORY_EVICTED, n)
        used = self._src_bytes.get(src, 0)
        if used + charge > self.source_budget:
            sf = self._src_frames[src]
            while self._src_bytes.get(src, 0) + charge > self.source_budget:
                self._drop(next(iter(sf)), DropReason.SOURCE_BUDGET)
        frames = self._frames
        while len(frames) >= self.max_frames:
            self._drop(next(iter(frames)), DropReason.TOO_MANY_FRAMES)
        if self.bytes_held + charge > self.high_water:
            while frames and self.bytes_held + charge > self.low_water:
                self._drop(next(iter(frames)), DropReason.MEMORY_EVICTED)
        return None

    def _expire(self) -> int:
        """Drop partial frames whose deadline has passed (they sit at the front)."""
        expired = 0
        frames = self._frames
        clock = self._clock
        while frames:
            key = next(iter(frames))
            if frames[key].deadline > clock:
                break
            self._drop(key, DropReason.REASSEMBLY_TIMEOUT, tombstone=False)
            expired += 1
        self.timeouts += expired
        return expired

    def _drop(
        self,
        key: _Key,
        reason: DropReason,
        *,
        extra: int = 0,
        tombstone: bool = True,
        any_length: bool = False,
    ) -> None:
        """Throw away a partial frame, counted once under ``reason``.

        ``extra``: payload bytes of the segment that caused it, counted with it.
        ``tombstone``: remember the key so that its remaining segments are counted as
        LATE_SEGMENT instead of starting a frame that can never complete.
        """
        fr = self._frames.pop(key)
        self._release(key, fr)
        self.drops.count(reason, fr.covered + extra)
        if reason in _EVICTIONS:
            self.evictions += 1
            self._src_history[fr.src].evictions += 1
        elif reason is DropReason.REASSEMBLY_TIMEOUT:
            self._src_history[fr.src].timeouts += 1
        if tombstone:
            self._remember(key, -1 if any_length else fr.length)

    def _release(self, key: _Key, fr: _Frame) -> None:
        """Return a frame's charge (it has already left ``_frames``)."""
        src = fr.src
        self.bytes_held -= fr.charge
        sf = self._src_frames[src]
        del sf[key]
        if sf:
            self._src_bytes[src] -= fr.charge
        else:
            del self._src_frames[src]
            del self._src_bytes[src]

    def _remember(self, key: _Key, length: int) -> None:
        """Remember a finished key for one timeout (bounded, oldest forgotten first)."""
        recent = self._recent
        recent[key] = (self._clock + self.timeout, length)
        recent.move_to_end(key)
        if len(recent) > self._recent_max:
            recent.popitem(last=False)
        self._prune_recent()

    def _prune_recent(self) -> None:
        """Forget remembered keys whose time is up (they sit at the front)."""
        recent = self._recent
        clock = self._clock
        while recent:
            key = next(iter(recent))
            if recent[key][0] > clock:
                break
            del recent[key]


def _as_bytes_view(view: memoryview) -> memoryview:
    """A flat, contiguous, unsigned-byte view of ``view``'s bytes (copying if needed)."""
    if view.c_contiguous:
        try:
            return view.cast("B")
        except (TypeError, ValueError):
            pass
    return memoryview(view.tobytes())
