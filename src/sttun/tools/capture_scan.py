"""The per-segment loop shared by ``sttun decap`` and ``sttun inspect``.

:func:`scan` reads every packet of a capture, finds the STT segments (TCP to one of
the STT ports), checks their outer headers and TCP checksum, feeds them to the
core :class:`~sttun.core.reassembly.Reassembler` with the capture's clock, and hands
every completed STT frame to a callback.  Packets that are not STT traffic are
tallied as *skipped* (not IP, not TCP, another port); STT segments the tools cannot
use are counted as drops under :class:`~sttun.core.drops.DropReason` names.

Speed: this loop runs once per packet, so it is written for CPython.  The common
case — Ethernet, IPv4 without options, TCP — is decoded with one precompiled
``struct`` call on the reader's ``memoryview`` and checked inline; everything else
(802.1Q/802.1ad tags, Linux cooked and raw-IP captures, IPv6, IP options) goes
through :func:`sttun.io.pcap.l3_offset` and :func:`sttun.core.outer.parse_outer`, the
same checks the endpoint uses.  No object is created per packet apart from the
tuples ``struct`` returns and the payload view.

Checksums: with ``verify=True`` (default) each segment's TCP checksum is checked.
A capture taken on a *sending* host holds packets the NIC has not finished: their
checksum field holds only the pseudo-header sum (recognised exactly, see
:func:`~sttun.core.outer.checksum_is_partial`), and GSO/GRO packets longer than
:data:`OFFLOAD_MIN_LEN` (a 1500-byte link MTU) whose checksum does not verify are
taken to be such offloaded packets too.  Both are accepted and counted as
``offloaded``, not dropped.  ``verify=False`` checks nothing (``unchecked``).

Time: the reassembler's timeouts run on capture time (``ts_ns``), never wall time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection
from typing import Final

from sttun.core.drops import DropCounters, DropReason
from sttun.core.outer import checksum_is_partial, parse_outer, tcp_checksum_ok
from sttun.core.reassembly import AddResult, Completed, Reassembler
from sttun.errors import CaptureError
from sttun.io.pcap import LINKTYPE_ETHERNET, CaptureReader, l3_offset
from sttun.wire.stt import STT_PORT, TCP_HEADER, TCP_HEADER_LEN

__all__ = [
    "OFFLOAD_MIN_LEN",
    "FrameSink",
    "ScanResult",
    "SegmentSink",
    "make_reassembler",
    "scan",
]

Buffer = bytes | bytearray | memoryview

#: Outer IP packets longer than this whose TCP checksum fails are taken to be
#: GSO/GRO packets captured above the NIC (checksum not meaningful), not bad ones.
OFFLOAD_MIN_LEN: Final = 1500

#: Reassembly limits for offline use: a capture may interleave many frames from many
#: sources, and a tool should extract what it can; memory stays bounded.
OFFLINE_TIMEOUT: Final = 30.0
OFFLINE_HIGH_WATER: Final = 256 * 1024 * 1024
OFFLINE_LOW_WATER: Final = 192 * 1024 * 1024
OFFLINE_SOURCE_BUDGET: Final = 128 * 1024 * 1024
OFFLINE_MAX_FRAMES: Final = 16384

#: ``on_frame(ts_ns, src, dst, frame)``: a complete STT frame (header + inner frame),
#: with the timestamp of the segment that completed it and the packed outer addresses.
#: ``frame`` may point into the reader's buffer: use or copy it before returning.
FrameSink = Callable[[int, bytes, bytes, Buffer], None]
#: ``on_segment(src, dst, sport, ack, seq, payload, reason)`` for every STT segment;
#: ``reason`` is the drop reason if this segment was refused, else None.
SegmentSink = Callable[[bytes, bytes, int, int, int, memoryview, "DropReason | None"], None]

# Ethernet + IPv4 (no options) + TCP in one call, only the fields the loop reads:
# EtherType; IPv4 version/IHL, TOS, total length, fragment word, protocol,
# addresses; TCP ports, SEQ, ACK, data offset.
_ETH_IP4_TCP: Final = struct.Struct("!12xHBBH2xHxB2x4s4sHHIIB7x")
_FAST_LEN: Final = _ETH_IP4_TCP.size  # 54


class ScanResult:
    """What :func:`scan` counted (drops live in the :class:`DropCounters` passed in).

    ``packets``: records read.  ``segments``: STT segments (TCP to an STT port,
    dropped ones included).  ``frames``: complete STT frames handed to ``on_frame``.
    ``skipped``: packets that are not STT traffic, by kind.  ``checksums``: how the
    segments' TCP checksums passed (bad ones are drops).  ``incomplete_at_eof``:
    partial frames still waiting at the end.  ``truncated``: the reader's note when
    the file ends inside a record.  ``interrupted``: Ctrl-C stopped the scan.
    """

    def __init__(self) -> None:
        self.packets = 0
        self.segments = 0
        self.frames = 0
        self.skipped: dict[str, int] = {"not_ip": 0, "not_tcp": 0, "other_port": 0}
        self.checksums: dict[str, int] = {"verified": 0, "offloaded": 0, "unchecked": 0}
        self.incomplete_at_eof = 0
        self.truncated: str | None = None
        self.interrupted = False

    def as_dict(self) -> dict[str, object]:
        """JSON-ready counters."""
        return {
            "packets": self.packets,
            "segments": self.segments,
            "frames": self.frames,
            "skipped": dict(self.skipped),
            "checksums": dict(self.checksums),
            "incomplete_at_eof": self.incomplete_at_eof,
            "truncated": self.truncated,
            "interrupted": self.interrupted,
        }


def make_reassembler(drops: DropCounters) -> Reassembler:
    """A reassembler with the offline limits (see the ``OFFLINE_*`` constants)."""
    return Reassembler(
        timeout=OFFLINE_TIMEOUT,
        high_water=OFFLINE_HIGH_WATER,
        low_water=OFFLINE_LOW_WATER,
        source_budget=OFFLINE_SOURCE_BUDGET,
        max_frames=OFFLINE_MAX_FRAMES,
        drops=drops,
    )


def scan(
    reader: CaptureReader,
    on_frame: FrameSink,
    *,
    drops: DropCounters,
    ports: Collection[int] = (STT_PORT,),
    verify: bool = True,
    on_segment: SegmentSink | None = None,
    reassembler: Reassembler | None = None,
) -> ScanResult:
    """Read ``reader`` to the end, reassembling STT frames into ``on_frame``.

    ``ports``: STT destination ports.  ``verify``: check outer TCP checksums (see
    the module doc).  ``on_segment``: optional per-segment callback (slower; used by
    ``sttun inspect``).  ``drops`` receives every drop, the reassembler's included
    (a reassembler passed in should count into the same object).

    A :class:`~sttun.errors.CaptureError` from the reader propagates (frames
    completed before it have been delivered).  ``KeyboardInterrupt`` stops the
    scan quietly with :attr:`ScanResult.interrupted` set.  At the end, partial
    frames are dropped as ``INCOMPLETE_AT_EOF``.
    """
    res = ScanResult()
    reasm = reassembler if reassembler is not None else make_reassembler(drops)
    try:
        _loop(reader, on_frame, res, drops, frozenset(ports), verify, on_segment, reasm)
    except KeyboardInterrupt:
        res.interrupted = True
    except CaptureError:
        res.incomplete_at_eof = reasm.flush(DropReason.INCOMPLETE_AT_EOF)
        raise
    res.incomplete_at_eof = reasm.flush(DropReason.INCOMPLETE_AT_EOF)
    if reader.truncated is not None:
        res.truncated = str(reader.truncated)
    return res


def _loop(
    reader: CaptureReader,
    on_frame: FrameSink,
    res: ScanResult,
    drops: DropCounters,
    ports: frozenset[int],
    verify: bool,
    on_segment: SegmentSink | None,
    reasm: Reassembler,
) -> None:
    """The hot loop; counters are kept in locals and stored back at the end."""
    unpack_fast = _ETH_IP4_TCP.unpack_from
    unpack_tcp = TCP_HEADER.unpack_from
    add = reasm.add
    count = drops.count
    from_bytes = int.from_bytes
    eth = LINKTYPE_ETHERNET
    bad_csum = DropReason.BAD_TCP_CHECKSUM
    bad_doff = DropReason.BAD_DATA_OFFSET
    bad_ip = DropReason.OUTER_BAD_IP
    not_tcp = DropReason.OUTER_NOT_TCP
    packets = segments = 0
    not_ip = not_tcp_n = other_port = 0
    verified = offloaded = unchecked = 0
    frame_count = [0]
    check_at = float("-inf")  # capture time of the next reassembler timeout check

    def feed(
        ts: int, src: bytes, dst: bytes, ack: int, seq: int, payload: Buffer, tos: int
    ) -> AddResult:
        """One segment (or coalesced run) into the reassembler, at capture time ``ts``."""
        nonlocal check_at
        now = ts * 1e-9
        if now >= check_at:
            reasm.handle_timeout(now)
            deadline = reasm.next_deadline()
            check_at = deadline if deadline is not None else now + reasm.timeout
        done = add(src, dst, ack, seq, payload, now, tos)
        if type(done) is Completed:
            frame_count[0] += 1
            on_frame(ts, src, dst, done.frame)
        return done

    # The pending run: consecutive in-order segments of one frame, joined and given
    # to the reassembler in one piece once complete (see the module doc); replayed
    # segment by segment if anything else comes first.
    # Its segments as (ts, seq, payload, tos); all share run_src/run_dst/run_ack.
    run: list[tuple[int, int, memoryview, int]] = []
    run_src = run_dst = b""
    run_ack = run_len = run_seq = 0
    try:
        for ts, linktype, data, orig in reader:
            packets += 1
            n = len(data)
            # ---- outer headers: fast path (Ethernet, IPv4 without options, TCP)
            if linktype == eth and n >= _FAST_LEN:
                (et, vihl, tos, total, frag, proto, src, dst,
                 sport, dport, seq, ack, doffb) = unpack_fast(data, 0)  # fmt: skip
                fast = (
                    et == 0x0800
                    and vihl == 0x45
                    and proto == 6
                    and not frag & 0x3FFF
                    and 40 <= total <= n - 14
                )
            else:
                fast = False
            if fast:
                if dport not in ports:
                    other_port += 1
                    continue
                l3 = 14
                l4 = 34
                end = 14 + total
                segments += 1
                if verify:
                    # tcp_checksum_ok() inline: addresses + segment in one slice,
                    # read big-endian as four parts, the last three of even length
                    # (so each part's weight 256**k is ≡ 1): the modulo then runs on
                    # a quarter of the digits.
                    extra = 6 + total - 20
                    if total & 1:
                        extra <<= 8
                    q = (total - 12) >> 2 & ~1
                    m3 = end - q
                    m2 = m3 - q
                    m1 = m2 - q
                    ok = (
                        from_bytes(data[26:m1], "big")
                        + from_bytes(data[m1:m2], "big")
                        + from_bytes(data[m2:m3], "big")
                        + from_bytes(data[m3:end], "big")
                        + extra
                    ) % 0xFFFF == 0
            else:
                # ---- outer headers: general path
                found = l3_offset(linktype, data)
                if found is None or found[0] not in (0x0800, 0x86DD):
                    not_ip += 1
                    continue
                l3 = found[1]
                outer = parse_outer(data, l3)
                if isinstance(outer, DropReason):
                    if outer is not_tcp:
                        not_tcp_n += 1
                        continue
                    # Unusable IP packet: a drop only if it is visibly STT.
                    reason = _refine(data, l3, outer, orig > n, ports)
                    if reason is None:
                        if outer is bad_ip and data[l3] >> 4 not in (4, 6):
                            not_ip += 1
                        else:
                            other_port += 1
                        continue
                    segments += 1
                    count(reason, n - l3)
                    continue
                src, dst, tos, l4, end = outer
                sport, dport, seq, ack, doffb, _fl, _win, _cs, _urg = unpack_tcp(data, l4)
                if dport not in ports:
                    other_port += 1
                    continue
                segments += 1
                if verify:
                    ok = tcp_checksum_ok(data, l3, l4, end)
            # ---- checks every STT segment passes
            if not verify:
                unchecked += 1
            elif ok:
                verified += 1
            elif end - l3 > OFFLOAD_MIN_LEN or checksum_is_partial(data, l3, l4, end):
                offloaded += 1
            else:
                count(bad_csum, end - l3)
                if on_segment is not None:
                    on_segment(src, dst, sport, ack, seq, data[l4 + 20 : end], bad_csum)
                continue
            if doffb >> 4 != 5:
                count(bad_doff, end - l3)
                if on_segment is not None:
                    on_segment(src, dst, sport, ack, seq, data[l4 + 20 : end], bad_doff)
                continue
            # ---- reassembly on capture time
            payload = data[l4 + TCP_HEADER_LEN : end]
            if on_segment is not None:
                done = feed(ts, src, dst, ack, seq, payload, tos)
                on_segment(
                    src, dst, sport, ack, seq, payload,
                    done if isinstance(done, DropReason) else None,
                )  # fmt: skip
                continue
            plen = end - l4 - TCP_HEADER_LEN
            if run:
                # Continues the run: same frame (src, dst, ack), same L, next offset.
                nxt = (seq & 0xFFFF) + plen
                if (
                    seq == run_seq
                    and ack == run_ack
                    and src == run_src
                    and dst == run_dst
                    and plen
                    and nxt <= run_len
                ):
                    run.append((ts, seq, payload, tos))
                    if nxt == run_len:  # complete: one piece, as from GRO
                        # a view of immutable bytes: slices of it are not copies,
                        # and a PcapWriter may queue them by reference
                        joined = memoryview(b"".join([seg[2] for seg in run]))
                        tos0 = run[0][3]
                        run = []
                        feed(ts, src, dst, ack, run_len << 16, joined, tos0)
                    else:
                        run_seq = (run_len << 16) | nxt
                    continue
                pending = run
                run = []
                for seg in pending:
                    feed(seg[0], run_src, run_dst, run_ack, seg[1], seg[2], seg[3])
            length = seq >> 16
            if not seq & 0xFFFF and 0 < plen < length and not reasm.entries:
                run = [(ts, seq, payload, tos)]
                run_src = src
                run_dst = dst
                run_ack = ack
                run_len = length
                run_seq = seq + plen
                continue
            feed(ts, src, dst, ack, seq, payload, tos)
    finally:
        pending = run
        run = []
        for seg in pending:
            feed(seg[0], run_src, run_dst, run_ack, seg[1], seg[2], seg[3])
        res.packets += packets
        res.segments += segments
        res.frames += frame_count[0]
        res.skipped["not_ip"] += not_ip
        res.skipped["not_tcp"] += not_tcp_n
        res.skipped["other_port"] += other_port
        res.checksums["verified"] += verified
        res.checksums["offloaded"] += offloaded
        res.checksums["unchecked"] += unchecked


def _refine(
    data: memoryview, l3: int, reason: DropReason, cut: bool, ports: frozenset[int]
) -> DropReason | None:
    """The drop reason of an unusable IP packet if it is an STT segment, else None.

    The TCP destination port must be visible and be an STT port; a packet whose
    total length runs past the captured bytes because the capture's snaplen cut it
    is ``OUTER_TRUNCATED`` (the endpoint would call it ``OUTER_BAD_IP``).
    """
    n = len(data)
    version = data[l3] >> 4
    if version == 4 and n - l3 >= 20:
        if data[l3 + 9] != 6:
            return None
        if (data[l3 + 6] & 0x1F) or data[l3 + 7]:
            return None  # a non-first fragment: no TCP header to look at
        l4 = l3 + (data[l3] & 0x0F) * 4
    elif version == 6 and n - l3 >= 40:
        if data[l3 + 6] != 6:
            return None
        l4 = l3 + 40
    else:
        return None
    if l4 < l3 + 20 or l4 + 4 > n:
        return None
    if (data[l4 + 2] << 8 | data[l4 + 3]) not in ports:
        return None
    if reason is DropReason.OUTER_BAD_IP and cut:
        return DropReason.OUTER_TRUNCATED
    return reason
