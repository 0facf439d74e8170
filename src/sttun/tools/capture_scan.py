"""The per-segment loop shared by ``sttun decap`` and ``sttun inspect``.

:func:`scan` reads every packet of a capture, finds the STT segments (TCP to one of
the STT ports), checks their outer headers and TCP checksum, feeds them to the
core :class:`~sttun.core.reassembly.Reassembler` with the capture's clock, and hands
every completed STT frame to a callback.  Packets that are not STT traffic are
tallied as *skipped* (not IP, not TCP, another port); STT segments the tools cannot
use are counted as drops under :class:`~sttun.core.drops.DropReason` names.

Classification: every packet goes through :func:`sttun.core.outer.parse_segment`,
the classifier the endpoint uses, once the link layer is stepped over (Ethernet
with EtherType IPv4 is tried first; 802.1Q/802.1ad tags, Linux cooked and raw-IP
captures go through :func:`sttun.io.pcap.l3_offset`), and its TCP checksum through
:func:`sttun.core.outer.tcp_checksum_ok`, the endpoint's check.

Runs: this loop runs once per packet, so it is written for CPython.  The segments
of one frame that arrive in order (offset 0 first, each starting where the last
ended) are held as a *run* and given to the reassembler joined, in one piece, when
the last one arrives — as GRO would have delivered them — instead of one by one.
A run's frame may interleave with other frames (their runs wait, up to
:data:`_MAX_PARKED` of them).  This changes nothing the tools report: a segment
that does not continue its frame's run (a gap, a duplicate, another L) first sends
the run's segments to the reassembler one by one, in order, with their
timestamps; a run whose reassembly timeout passes is given up as the reassembler
would give it up; no run starts for a frame the reassembler may already know (a
partial frame, or one it remembers as finished or dropped); and runs still open
at the end go to the reassembler before its end-of-capture flush.  (The TOS of a
joined frame's later segments is not passed on: the tools do not use it.)

Checksums: with ``verify=True`` (default) each segment's TCP checksum is checked.
A capture taken on a *sending* host holds packets the NIC has not finished: their
checksum field holds only the pseudo-header sum (recognised exactly, see
:func:`~sttun.core.outer.checksum_is_partial`), and GSO/GRO packets longer than
:data:`OFFLOAD_MIN_LEN` (a 1500-byte link MTU) whose checksum does not verify are
taken to be such offloaded packets too.  Both are accepted and counted as
``offloaded``, not dropped.  A segment sent by a kernel transmit program (sttun's
tc-egress fast path) and captured before the NIC finished it is one whole STT frame
whose *inner* TCP/UDP checksum field still holds the pseudo-header seed, with an
outer checksum computed as if that field held its final value: when finishing the
inner checksum makes the outer one verify
(:func:`~sttun.core.rx_partial.finish_captured_seed`), the segment is accepted,
counted as ``inner_partial``, and its frame goes on with the inner checksum
finished (as carried with ``keep_partial``).  Only segments whose checksum failed
are looked at this way: the outer pseudo-header sum first, then the inner seed,
then the length.  ``verify=False`` checks nothing (``unchecked``), and frames go on
as carried.  The verifier process (``ahead``) only reports which checksums failed;
these decisions are all made here, so one and two processes agree.

Time: the reassembler's timeouts run on capture time (``ts_ns``), never wall time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Final

from sttun.core.drops import DropCounters, DropReason
from sttun.core.outer import Segment, checksum_is_partial, parse_segment, tcp_checksum_ok
from sttun.core.reassembly import RECENT_PER_FRAME, AddResult, Completed, Reassembler
from sttun.core.rx_partial import finish_captured_seed
from sttun.errors import CaptureError
from sttun.io.pcap import LINKTYPE_ETHERNET, CaptureReader, l3_offset
from sttun.tools.checksum_ahead import PERIOD, ChecksumAhead
from sttun.wire.ether import ETH_P_IP, ETH_P_IPV6
from sttun.wire.stt import STT_PORT, TCP_HEADER_LEN

__all__ = [
    "OFFLOAD_MIN_LEN",
    "FrameSink",
    "ScanResult",
    "SegmentSink",
    "locate_segment",
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

#: A run's segments as ``(ts, seq, payload, tos)``, in order.
_Run = list[tuple[int, int, memoryview, int]]
#: Runs of interleaved frames held at once (more go to the reassembler directly).
_MAX_PARKED: Final = 64
_NEVER: Final = 1 << 128


class ScanResult:
    """What :func:`scan` counted (drops live in the :class:`DropCounters` passed in).

    ``packets``: records read.  ``segments``: STT segments (TCP to an STT port,
    dropped ones included).  ``frames``: complete STT frames handed to ``on_frame``.
    ``skipped``: packets that are not STT traffic, by kind.  ``checksums``: how the
    segments' TCP checksums passed (bad ones are drops): ``verified``, ``offloaded``
    (not checkable: a partial outer checksum, a GSO/GRO packet), ``inner_partial``
    (verified once the inner checksum the sender left partial was finished),
    ``unchecked`` (``verify=False``).  ``incomplete_at_eof``:
    partial frames still waiting at the end.  ``truncated``: the reader's note when
    the file ends inside a record.  ``interrupted``: Ctrl-C stopped the scan.
    """

    def __init__(self) -> None:
        self.packets = 0
        self.segments = 0
        self.frames = 0
        self.skipped: dict[str, int] = {"not_ip": 0, "not_tcp": 0, "other_port": 0}
        self.checksums: dict[str, int] = {
            "verified": 0,
            "offloaded": 0,
            "inner_partial": 0,
            "unchecked": 0,
        }
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
    ahead: ChecksumAhead | None = None,
    keep_partial: bool = False,
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

    ``ahead``: a verifier process started on the same file
    (:class:`~sttun.tools.checksum_ahead.ChecksumAhead`, with ``verify`` and the
    same ``ports``) that checks most segments' checksums in parallel; the caller
    closes it.

    ``keep_partial``: a segment accepted as ``inner_partial`` goes on with its
    inner checksum field as carried (the seed), not finished.
    """
    res = ScanResult()
    reasm = reassembler if reassembler is not None else make_reassembler(drops)
    try:
        _loop(
            reader, on_frame, res, drops, frozenset(ports), verify, on_segment, reasm, ahead,
            keep_partial,
        )  # fmt: skip
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
    ahead: ChecksumAhead | None,
    keep_partial: bool,
) -> None:
    """The hot loop; counters are kept in locals and stored back at the end."""
    add = reasm.add
    count = drops.count
    eth = LINKTYPE_ETHERNET
    bad_csum = DropReason.BAD_TCP_CHECKSUM
    bad_doff = DropReason.BAD_DATA_OFFSET
    bad_ip = DropReason.OUTER_BAD_IP
    not_tcp = DropReason.OUTER_NOT_TCP
    timed_out = DropReason.REASSEMBLY_TIMEOUT
    timeout_ns = int(reasm.timeout * 1e9)
    packets = not_ip = not_tcp_n = other_port = 0
    unusable = offloaded = inner_partial = bad_csum_n = 0
    frame_count = [0]
    check_at = float("-inf")  # capture time of the next reassembler timeout check
    # Frames (src, dst, ack) the reassembler may know (a partial frame, or one it
    # remembers as completed or dropped) -> capture time it last saw them.  No run
    # starts for these: their segments go to the reassembler one by one, as they
    # would without runs.  Kept for twice its timeout (it forgets after one); its
    # own memory of finished frames is bounded, so this is too (oldest first).
    known: dict[tuple[bytes, bytes, int], int] = {}
    known_keep = 2 * timeout_ns
    known_cap = 2 * RECENT_PER_FRAME * reasm.max_frames + reasm.max_frames
    prune_at = 0  # capture time of the next look for forgettable frames
    # Checksum verdicts from a verifier process (checksum_ahead): for the records
    # numbered up to ahead_upto whose number is not a multiple of its PERIOD.
    failed: set[int] = ahead.failed if ahead is not None else set()
    ahead_upto = 0
    ahead_own = PERIOD - 1

    def feed(
        ts: int, src: bytes, dst: bytes, ack: int, seq: int, payload: Buffer, tos: int
    ) -> AddResult:
        """One segment (or joined run) into the reassembler, at capture time ``ts``."""
        nonlocal check_at
        now = ts * 1e-9
        if now >= check_at:
            reasm.handle_timeout(now)
            deadline = reasm.next_deadline()
            check_at = deadline if deadline is not None else now + reasm.timeout
        done = add(src, dst, ack, seq, payload, now, tos)
        known[src, dst, ack] = ts
        if type(done) is Completed:
            frame_count[0] += 1
            on_frame(ts, src, dst, done.frame)
        return done

    def replay(segs: _Run, src: bytes, dst: bytes, ack: int, deadline: int, now: int) -> None:
        """A run's segments into the reassembler one by one, as if never held.

        ``deadline``: the first segment's time plus the timeout.  Where the
        reassembler would have given the partial frame up (a segment at or after
        the deadline, or capture time ``now`` past it), those segments are counted
        as the timed-out frame (``REASSEMBLY_TIMEOUT``, nothing remembered), and the
        next segment starts a new partial frame with its own deadline, as there.
        """
        i = 0
        n = len(segs)
        while now >= deadline and i < n:
            start = i
            while i < n and segs[i][0] < deadline:
                i += 1
            count(timed_out, sum(len(seg[2]) for seg in segs[start:i]))
            if i < n:
                deadline = segs[i][0] + timeout_ns
        for ts, seq, payload, tos in segs[i:]:
            feed(ts, src, dst, ack, seq, payload, tos)

    # Runs: the in-order segments of one frame, held here and given to the
    # reassembler joined, in one piece, when the last one arrives (see the module
    # doc).  The current run (the frame of the previous segment) lives in locals:
    # its segments as (ts, seq, payload, tos), addresses, frame id, the SEQ its
    # next segment must carry, L, and when it would time out.  Runs of frames whose
    # segments interleave with the current one's wait in ``parked``.
    run: _Run = []
    run_src = run_dst = b""
    run_ack = run_seq = run_len = run_deadline = 0
    parked: dict[tuple[bytes, bytes, int], tuple[_Run, int, int, int]] = {}
    parked_check = 0  # no parked run times out before this capture time

    def expire_parked(now: int) -> int:
        """Give up parked runs whose time is up (see ``replay``); return the next deadline."""
        soonest = _NEVER
        for key, (segs, _seq, _len, deadline) in list(parked.items()):
            if deadline <= now:
                del parked[key]
                replay(segs, *key, deadline, now)
            elif deadline < soonest:
                soonest = deadline
        return soonest

    def forget_known(now: int) -> None:
        """Drop frames the reassembler has surely forgotten (or too many) from ``known``."""
        while known:
            key = next(iter(known))
            if known[key] + known_keep > now and len(known) <= known_cap:
                break
            del known[key]

    ts = 0
    try:
        for ts, linktype, data, orig in reader:
            packets += 1
            # ---- outer headers: the one classifier, after the link layer.  The
            # usual case, Ethernet + IPv4 (no VLAN tag), is tried first; the
            # EtherType is checked once the packet is known to be long enough.
            l3 = 14
            seg = parse_segment(data, 14) if linktype == eth else bad_ip
            if type(seg) is not tuple or data[12] != 8 or data[13]:
                n = len(data)
                found = locate_segment(linktype, data)
                if found is None:
                    not_ip += 1
                    continue
                l3, seg = found
                if isinstance(seg, DropReason):
                    if seg is not_tcp:
                        not_tcp_n += 1
                        continue
                    # Unusable IP packet: a drop only if it is visibly STT.
                    reason = _refine(data, l3, seg, orig > n, ports)
                    if reason is None:
                        if seg is bad_ip and data[l3] >> 4 not in (4, 6):
                            not_ip += 1
                        else:
                            other_port += 1
                        continue
                    unusable += 1
                    count(reason, n - l3)
                    continue
            src, dst, tos, sport, dport, seq, ack, doffb, l4, end = seg
            if dport not in ports:
                other_port += 1
                continue
            # ---- checks every STT segment passes (segments, verified and
            # unchecked are worked out from the other counters at the end)
            if verify:
                if packets > ahead_upto and ahead is not None:
                    ahead_upto = ahead.wait(packets)
                    if ahead.done:
                        ahead = None
                # the verifier's verdict where it has one, else the check here
                if (
                    (packets in failed)
                    if packets & ahead_own and packets <= ahead_upto
                    else not tcp_checksum_ok(data, l3, l4, end)
                ):
                    failed.discard(packets)
                    if checksum_is_partial(data, l3, l4, end):
                        offloaded += 1
                    elif (fixed := finish_captured_seed(data, l3, l4, end)) is not None:
                        # a kernel-encapsulated frame, its inner checksum unfinished
                        inner_partial += 1
                        if not keep_partial:
                            data = memoryview(fixed)
                    elif end - l3 > OFFLOAD_MIN_LEN:
                        offloaded += 1
                    else:
                        bad_csum_n += 1
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
            if seq == run_seq and ack == run_ack and src == run_src and dst == run_dst and run:
                # The current run's next segment (same frame and L, next offset).
                plen = end - l4 - TCP_HEADER_LEN
                nxt = (seq & 0xFFFF) + plen
                if plen and nxt <= run_len:
                    run.append((ts, seq, payload, tos))
                    if nxt < run_len:
                        run_seq += plen
                    else:  # complete: one piece, as from GRO
                        # (the run is closed first: a Ctrl-C inside feed must not
                        # have the clean-up below give its segments again)
                        segs, run = run, []
                        if ts < run_deadline:
                            # a view of immutable bytes: slices of it are not copies,
                            # and a PcapWriter may queue them by reference
                            joined = memoryview(b"".join([seg[2] for seg in segs]))
                            feed(ts, src, dst, ack, run_len << 16, joined, segs[0][3])
                        else:
                            replay(segs, src, dst, ack, run_deadline, ts)
                    continue
            if on_segment is not None:
                done = feed(ts, src, dst, ack, seq, payload, tos)
                on_segment(
                    src, dst, sport, ack, seq, payload,
                    done if isinstance(done, DropReason) else None,
                )  # fmt: skip
                continue
            plen = end - l4 - TCP_HEADER_LEN
            if run and ack == run_ack and src == run_src and dst == run_dst:
                # Its own frame's run, but not what comes next: a gap, a
                # duplicate, another L.  The run goes to the reassembler first.
                segs, run = run, []
                replay(segs, src, dst, ack, run_deadline, ts)
            elif parked:
                other = parked.pop((src, dst, ack), None)
                if other is not None:
                    segs, o_seq, o_len, o_deadline = other
                    nxt = (seq & 0xFFFF) + plen
                    if seq == o_seq and plen and nxt <= o_len and ts < o_deadline:
                        # A parked run's next segment: it becomes the current run.
                        if run:
                            parked[(run_src, run_dst, run_ack)] = (
                                run, run_seq, run_len, run_deadline,
                            )  # fmt: skip
                        segs.append((ts, seq, payload, tos))
                        if nxt < o_len:
                            run = segs
                            run_src = src
                            run_dst = dst
                            run_ack = ack
                            run_len = o_len
                            run_deadline = o_deadline
                            run_seq = seq + plen
                        else:
                            run = []
                            joined = memoryview(b"".join([seg[2] for seg in segs]))
                            feed(ts, src, dst, ack, o_len << 16, joined, segs[0][3])
                        continue
                    replay(segs, src, dst, ack, o_deadline, ts)
            length = seq >> 16
            if not seq & 0xFFFF and 0 < plen < length:
                # The first segment of a frame: start a run, unless the reassembler
                # may know this frame already, or too many runs are open.
                if ts >= prune_at:
                    forget_known(ts)
                    prune_at = ts + timeout_ns
                if (src, dst, ack) in known:
                    feed(ts, src, dst, ack, seq, payload, tos)
                    continue
                if run:
                    if len(parked) >= _MAX_PARKED:
                        feed(ts, src, dst, ack, seq, payload, tos)
                        continue
                    parked[(run_src, run_dst, run_ack)] = (run, run_seq, run_len, run_deadline)
                    if run_deadline < parked_check:
                        parked_check = run_deadline
                if parked and ts >= parked_check:
                    parked_check = expire_parked(ts)
                run = [(ts, seq, payload, tos)]
                run_src = src
                run_dst = dst
                run_ack = ack
                run_len = length
                run_seq = seq + plen
                run_deadline = ts + timeout_ns
                continue
            feed(ts, src, dst, ack, seq, payload, tos)
    finally:
        # Runs still open go to the reassembler segment by segment, oldest first
        # (or are given up, if their time was up by the last packet's).
        if run:
            parked[(run_src, run_dst, run_ack)] = (run, run_seq, run_len, run_deadline)
        for (src, dst, ack), (segs, _seq, _len, deadline) in sorted(
            parked.items(), key=lambda item: item[1][0][0][0]
        ):
            replay(segs, src, dst, ack, deadline, ts)
        segments = packets - not_ip - not_tcp_n - other_port
        checked = segments - unusable  # the segments that reached the checksum check
        res.packets += packets
        res.segments += segments
        res.frames += frame_count[0]
        res.skipped["not_ip"] += not_ip
        res.skipped["not_tcp"] += not_tcp_n
        res.skipped["other_port"] += other_port
        if verify:
            # a segment dropped for its data offset passed the checksum check
            res.checksums["verified"] += checked - offloaded - inner_partial - bad_csum_n
            res.checksums["offloaded"] += offloaded
            res.checksums["inner_partial"] += inner_partial
        else:
            res.checksums["unchecked"] += checked


def locate_segment(linktype: int, data: Buffer) -> tuple[int, Segment | DropReason] | None:
    """The IP header offset of a captured packet and :func:`parse_segment`'s verdict.

    None when the packet is not IPv4 or IPv6 (after the link layer and any VLAN
    tags, :func:`sttun.io.pcap.l3_offset`).  Plain Ethernet + IPv4 is looked at
    first, at offset 14; the scan's loop makes that case's call itself, inline, and
    comes here for everything else.
    """
    if linktype == LINKTYPE_ETHERNET and len(data) > 14 and data[12] == 8 and not data[13]:
        return 14, parse_segment(data, 14)
    found = l3_offset(linktype, data)
    if found is None or found[0] not in (ETH_P_IP, ETH_P_IPV6):
        return None
    return found[1], parse_segment(data, found[1])


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
