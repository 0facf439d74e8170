"""Why the core dropped a packet: one enum member per reason, one counter each.

The core never raises on bad input.  Every packet it refuses is counted under a
:class:`DropReason`; :class:`DropCounters` keeps the tallies that ``sttun show``,
the metrics endpoint and the capture tools report.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator


class DropReason(enum.Enum):
    """Every reason the protocol core can drop a segment, frame or packet.

    The value is the stable snake_case name used in JSON output and metrics labels.
    """

    # --- outer packet (per segment) ---
    OUTER_TRUNCATED = "outer_truncated"  # shorter than outer IP + 20-byte TCP header
    OUTER_NOT_TCP = "outer_not_tcp"  # IP protocol / next header is not 6
    OUTER_BAD_IP = "outer_bad_ip"  # bad IP version, header length or total length
    OUTER_FRAGMENT = "outer_fragment"  # outer IP fragment (not reassembled by sttun)
    WRONG_PORT = "wrong_port"  # TCP destination port is not an STT port
    BAD_TCP_CHECKSUM = "bad_tcp_checksum"  # outer TCP checksum wrong
    BAD_DATA_OFFSET = "bad_data_offset"  # TCP data offset is not 5 (protocol.md #28)
    # vnet NEEDS_CSUM inside the STT frame that cannot be finished: csum_start before the
    # inner frame, the segment not the whole frame, or the field past the packet's end
    BAD_PARTIAL_CHECKSUM = "bad_partial_checksum"
    UNKNOWN_SOURCE = "unknown_source"  # outer source address names no tunnel
    # --- reassembly (per segment) ---
    EMPTY_SEGMENT = "empty_segment"  # zero-length payload (#18)
    SEGMENT_PAST_END = "segment_past_end"  # offset + len > frame length (#17, #19)
    ZERO_LENGTH_FRAME = "zero_length_frame"  # SEQ says the frame has 0 bytes
    DUPLICATE_SEGMENT = "duplicate_segment"  # same bytes already stored (#15)
    OVERLAP_CONFLICT = "overlap_conflict"  # overlaps stored bytes with other bytes (#16)
    LENGTH_MISMATCH = "length_mismatch"  # segments of one frame disagree on L (#24)
    LATE_SEGMENT = "late_segment"  # segment of a frame already completed/dropped
    # --- reassembly (per frame, whole partial frames thrown away) ---
    REASSEMBLY_TIMEOUT = "reassembly_timeout"  # incomplete after the timeout (#20)
    MEMORY_EVICTED = "memory_evicted"  # evicted under global memory pressure (#41)
    SOURCE_BUDGET = "source_budget"  # evicted because its source exceeded its budget
    TOO_MANY_FRAMES = "too_many_frames"  # evicted, too many partial frames (#41)
    INCOMPLETE_AT_EOF = "incomplete_at_eof"  # capture ended before the frame completed
    # --- complete STT frame ---
    FRAME_TOO_SHORT = "frame_too_short"  # < 18 + 14 bytes (#26)
    BAD_VERSION = "bad_version"  # STT version != 0 (#11)
    BAD_L4_OFFSET = "bad_l4_offset"  # P set, L4 offset too small or past the frame (#7, #8)
    UNKNOWN_CONTEXT = "unknown_context"  # context id no tunnel from this source uses
    ECN_CE_NOT_ECT = "ecn_ce_not_ect"  # outer CE but inner packet not ECN-capable (#37)
    RX_TAP_ERROR = "rx_tap_error"  # the TAP refused a decapsulated frame or took part of it
    # --- transmit ---
    TX_FRAME_TOO_BIG = "tx_frame_too_big"  # inner frame > 65517 bytes cannot be sent
    TX_BAD_INNER = "tx_bad_inner"  # inner frame malformed (shorter than Ethernet, ...)
    TX_NO_NEIGHBOUR = "tx_no_neighbour"  # next hop MAC unresolved
    TX_NO_ROUTE = "tx_no_route"  # no route to the remote (lost after start-up)
    TX_UNDERLAY_MTU = "tx_underlay_mtu"  # the route's MTU is below the underlay minimum
    TX_ERROR = "tx_error"  # the sink refused the packet, or its buffer stayed full


class DropCounters:
    """Packet and byte tallies per :class:`DropReason`.

    ``counters[reason]`` is the number of drops; :meth:`count` adds one.
    Iteration yields ``(reason, packets)`` for every reason with a non-zero count.
    """

    __slots__ = ("bytes", "packets")

    def __init__(self) -> None:
        self.packets: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.bytes: dict[DropReason, int] = dict.fromkeys(DropReason, 0)

    def count(self, reason: DropReason, nbytes: int = 0, packets: int = 1) -> None:
        """Record ``packets`` drops of ``nbytes`` bytes in total for ``reason``."""
        self.packets[reason] += packets
        self.bytes[reason] += nbytes

    def __getitem__(self, reason: DropReason) -> int:
        return self.packets[reason]

    def __iter__(self) -> Iterator[tuple[DropReason, int]]:
        return ((r, n) for r, n in self.packets.items() if n)

    def total(self) -> int:
        """All drops of every reason."""
        return sum(self.packets.values())

    def as_dict(self) -> dict[str, int]:
        """Non-zero counts keyed by the reason's stable name."""
        return {r.value: n for r, n in self.packets.items() if n}

    def merge(self, other: DropCounters) -> None:
        """Add ``other``'s counts into this one."""
        for r in DropReason:
            self.packets[r] += other.packets[r]
            self.bytes[r] += other.bytes[r]
