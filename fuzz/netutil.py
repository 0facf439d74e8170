"""Test network for the endpoint targets: tunnels, packet builders, checked receive.

Addresses are from the underlay test ranges (docs/architecture.md, "Tests");
nothing here touches a socket.
"""

from __future__ import annotations

import struct

from tests.packets import build_ipv4, build_ipv6

from fuzz.common import check
from sttun.core.decap import Decapsulated
from sttun.core.drops import DropReason
from sttun.core.endpoint import Delivered, Endpoint, Received, TunnelSpec
from sttun.core.outer import Segment, parse_segment
from sttun.core.reassembly import Pending, Reassembler
from sttun.wire.checksum import ones_sum
from sttun.wire.ip import ip_bytes, pseudo_sum
from sttun.wire.stt import STT_HEADER_LEN, STT_PORT, SttHeader

__all__ = [
    "ADDRS",
    "KEYS",
    "LOCAL4",
    "LOCAL6",
    "PORTS",
    "RX_HEAD",
    "RX_SIZE",
    "SIDE_DROPS",
    "build_packet",
    "check_decapsulated",
    "check_limits",
    "make_endpoint",
    "receive_checked",
]

LOCAL4 = ip_bytes("198.18.0.2")
LOCAL6 = ip_bytes("2001:db8:0:1::2")
PEER4A = ip_bytes("198.18.0.1")
PEER4B = ip_bytes("198.18.0.3")
PEER6 = ip_bytes("2001:db8:0:1::1")
STRANGER4 = ip_bytes("198.18.0.9")
STRANGER6 = ip_bytes("2001:db8:0:1::9")

#: (remote, local) pairs a packet may come from: three tunnel peers, two strangers.
ADDRS: tuple[tuple[bytes, bytes], ...] = (
    (PEER4A, LOCAL4),
    (PEER4B, LOCAL4),
    (PEER6, LOCAL6),
    (STRANGER4, LOCAL4),
    (STRANGER6, LOCAL6),
)
#: Context ids: those of the tunnels, and some no tunnel uses.
KEYS: tuple[int, ...] = (0x10, 0x11, 0x20, 0x0, 0x12, 0xFFFFFFFFFFFFFFFF)
#: Destination ports: the two tunnel ports and others.
PORTS: tuple[int, ...] = (STT_PORT, 7472, 80, 0)

_TUNNELS = (
    ("a0", PEER4A, LOCAL4, 0x10, STT_PORT),
    ("a1", PEER4A, LOCAL4, 0x11, STT_PORT),
    ("b0", PEER4B, LOCAL4, 0x10, 7472),
    ("c0", PEER6, LOCAL6, 0x20, STT_PORT),
)

SMALL_LIMITS = {
    "timeout": 30.0,
    "high_water": 256 * 1024,
    "low_water": 192 * 1024,
    "source_budget": 160 * 1024,
    "max_frames": 16,
}


def make_endpoint(small: bool) -> Endpoint:
    """An endpoint with four tunnels; ``small`` uses tight reassembly limits."""
    reasm = Reassembler(**SMALL_LIMITS) if small else Reassembler()  # type: ignore[arg-type]
    ep = Endpoint(reassembler=reasm)
    for name, remote, local, key, port in _TUNNELS:
        ep.add_tunnel(
            TunnelSpec(
                name=name, local=local, remote=remote, in_key=key, out_key=key, dst_port=port
            )
        )
    return ep


def build_packet(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    seq: int,
    ack: int,
    dport: int = STT_PORT,
    sport: int = 49152,
    tos: int = 0,
    doff_byte: int = 0x50,
    tcp_flags: int = 0x18,
    csum_xor: int = 0,
    df: bool = True,
) -> bytes:
    """An outer IPv4/IPv6 + TCP-like segment with a correct checksum (xor ``csum_xor``)."""
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH",
            sport & 0xFFFF,
            dport & 0xFFFF,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            doff_byte & 0xFF,
            tcp_flags & 0xFF,
            0xFFFF,
            0,
            0,
        )
    )
    tcp += payload
    if len(src) == 4:
        ip = build_ipv4(src, dst, len(tcp), tos=tos & 0xFF, df=df)
    else:
        ip = build_ipv6(src, dst, len(tcp), tclass=tos & 0xFF)
    csum = ~ones_sum(tcp, pseudo_sum(src, dst, 6, len(tcp))) & 0xFFFF
    struct.pack_into("!H", tcp, 16, csum ^ (csum_xor & 0xFFFF))
    return ip + bytes(tcp)


#: Where a packet starts in a receive buffer offered as ``room`` (a vnet header's
#: place), and the buffer's size: room for any frame after any packet's headers.
RX_HEAD = 12
RX_SIZE = RX_HEAD + 60 + 20 + 65535

#: Reasons one packet's arrival may count against *other* partial frames (expired on
#: the way, evicted to make room) while the packet itself is stored.
SIDE_DROPS = frozenset(
    {
        DropReason.REASSEMBLY_TIMEOUT,
        DropReason.MEMORY_EVICTED,
        DropReason.SOURCE_BUDGET,
        DropReason.TOO_MANY_FRAMES,
    }
)


def _tally(ep: Endpoint) -> dict[DropReason, int]:
    """Drops counted so far per reason, endpoint and reassembler together."""
    reasm = ep.reassembler.drops.packets
    return {reason: n + reasm[reason] for reason, n in ep.drops.packets.items()}


def _names(reasons: set[DropReason]) -> list[str]:
    return sorted(r.value for r in reasons)


def _holder(fr: object) -> object:
    """The caller's buffer a partial frame lives in, or None (its own memory)."""
    buf = getattr(fr, "buf", None)
    return buf.obj if isinstance(buf, memoryview) else None


def _holds(ep: Endpoint, buffer: bytearray) -> bool:
    """A partial frame of the reassembler lives in ``buffer``."""
    return any(_holder(fr) is buffer for fr in ep.reassembler._frames.values())


def _completion(
    ep: Endpoint, seg: Segment, packet: bytes | bytearray | memoryview, now: float
) -> bytes | None:
    """The STT frame the segment ``seg`` of ``packet`` completes, if it can complete
    one: the segment alone (a whole frame), or the bytes its partial frame holds with
    the segment's over them.  Read before the segment is added (reassembler internals)."""
    src, dst, _tos, _sport, _dport, seq, ack, _doff, l4, end = seg
    payload = bytes(packet[l4 + 20 : end])
    length, off, n = (seq >> 16) & 0xFFFF, seq & 0xFFFF, len(payload)
    if n == 0 or off + n > length:
        return None
    if n == length:
        return payload
    r = ep.reassembler
    fr = r._frames.get((src, dst, ack))
    clock = now if now > r._clock else r._clock
    if fr is None or fr.length != length or fr.deadline <= clock or fr.covered + n < length:
        return None
    spans = sorted([*zip(fr.ivs[::2], fr.ivs[1::2], strict=True), (off, off + n)])
    reach = 0
    for lo, hi in spans:
        if lo > reach:
            return None  # a hole stays
        reach = max(reach, hi)
    if reach < length:
        return None
    frame = bytearray(fr.buf)
    frame[off : off + n] = payload
    return bytes(frame)


def check_decapsulated(dec: Decapsulated, frame: bytes) -> None:
    """``dec`` is what the STT ``frame`` that was sent decapsulates to: its header, and
    its inner frame except where the receive path rewrites that (an 802.1Q tag put
    back from the header's TCI; the inner IP TOS / traffic class for DSCP and ECN,
    with the IPv4 header checksum)."""
    check(dec.header == SttHeader.unpack(frame), "delivered STT header is not the one sent")
    sent = frame[STT_HEADER_LEN:]
    got = bytearray(dec.inner)
    if len(got) == len(sent) + 4:
        check(dec.header.vlan_tci != 0, "a tag was inserted without a TCI")
        check(got[12:14] == b"\x81\x00", "inserted tag is not 802.1Q")
        del got[12:16]
    check(len(got) == len(sent), f"delivered inner frame {len(got)} bytes, sent {len(sent)}")
    ethertype = sent[12:14]
    rewritable: tuple[int, ...] = (15, 24, 25) if ethertype == b"\x08\x00" else ()
    if ethertype == b"\x86\xdd":
        rewritable = (14, 15)
    for i in rewritable:
        if i < len(got):
            got[i] = sent[i]
    check(got == sent, "delivered inner frame differs from the one sent")


def check_limits(ep: Endpoint) -> None:
    """The reassembler's memory limits and bookkeeping hold."""
    r = ep.reassembler
    check(r.bytes_held <= r.high_water, f"bytes_held {r.bytes_held} > high {r.high_water}")
    check(r.entries <= r.max_frames, f"{r.entries} partial frames > {r.max_frames}")
    charged = sum(fr.charge for fr in r._frames.values())
    check(charged == r.bytes_held, f"bytes_held {r.bytes_held} != charged {charged}")
    peers = {remote for remote, _local in ADDRS[:3]}
    for src, nbytes in r.bytes_by_source.items():
        check(nbytes <= r.source_budget, f"source {src!r} holds {nbytes} > budget")
        check(src in peers, f"bytes buffered for a source no tunnel names: {src!r}")


def receive_checked(
    ep: Endpoint,
    packet: bytes | bytearray | memoryview,
    now: float,
    csum_ok: bool,
    *,
    room: tuple[bytearray, int] | None = None,
    held: list[bytearray] | None = None,
) -> Received:
    """``ep.receive`` plus the invariants of what it returns.

    * a :class:`~sttun.core.drops.DropReason`: that reason, and no other, was counted
      once (partial frames that expired on the way aside);
    * :class:`~sttun.core.reassembly.Pending`: the segment's bytes are in its partial
      frame; only :data:`SIDE_DROPS` were counted (frames evicted for it); KEPT only
      for a first piece offered with ``room``;
    * :class:`~sttun.core.endpoint.Delivered`: nothing counted; the tunnel is the one
      of the packet's remote, local address and context id; the frame is the one the
      segments sent make up (:func:`check_decapsulated`); its ``buffer`` is one the
      reassembler said it kept (``held``, updated here) or this ``room``'s, or None,
      and it is the one the partial frame lived in, if it lived in one;
    * with ``room``: a partial frame lives in the buffer iff the result is KEPT;
    * the reassembler's limits (:func:`check_limits`).
    """
    seg = parse_segment(packet)
    expected = holder = None
    if not isinstance(seg, DropReason):
        expected = _completion(ep, seg, packet, now)
        src, dst, _tos, _sport, _dport, seq, ack, _doff, l4, end = seg
        if end - l4 - 20 != (seq >> 16) & 0xFFFF:  # not a whole frame: its partial frame's
            holder = _holder(ep.reassembler._frames.get((src, dst, ack)))
    before = _tally(ep)
    res = ep.receive(packet, now, csum_ok=csum_ok, room=room)
    after = _tally(ep)
    counted = {reason for reason, n in after.items() if n != before[reason]}
    if isinstance(res, DropReason):
        check(
            after[res] == before[res] + 1,
            f"{res.value} returned but counted {after[res] - before[res]} times",
        )
        check(
            counted - {res} <= {DropReason.REASSEMBLY_TIMEOUT},
            f"{res.value} returned, also counted: {_names(counted)}",
        )
    elif isinstance(res, Pending):
        check(not isinstance(seg, DropReason), f"{res} for a packet parse_segment refuses")
        assert not isinstance(seg, DropReason)
        src, dst, _tos, _sport, _dport, seq, ack, _doff, l4, end = seg
        check(counted <= SIDE_DROPS, f"segment stored, counted: {_names(counted)}")
        fr = ep.reassembler._frames.get((src, dst, ack))
        check(fr is not None, f"{res} but no partial frame for the segment (silent loss)")
        assert fr is not None
        lo, hi = seq & 0xFFFF, (seq & 0xFFFF) + end - l4 - 20
        check(
            any(a <= lo and hi <= b for a, b in zip(fr.ivs[::2], fr.ivs[1::2], strict=True)),
            f"{res} but [{lo}, {hi}) is not covered by its partial frame",
        )
        if res is Pending.KEPT:
            check(room is not None and lo == 0, "KEPT without room, or not the first piece")
    else:
        check(isinstance(res, Delivered), f"receive returned {res!r}")
        tunnel, dec, buffer = res
        check(not counted, f"frame delivered, counted: {_names(counted)}")
        raw = bytes(packet[:40])
        src, dst = (raw[12:16], raw[16:20]) if raw[0] >> 4 == 4 else (raw[8:24], raw[24:40])
        check(tunnel.spec.remote == src, "frame delivered to a tunnel of another remote")
        check(tunnel.spec.local == dst, "frame delivered to a tunnel of another local address")
        check(
            dec.header.context_id == tunnel.spec.in_key,
            f"frame with context {dec.header.context_id:#x} delivered to {tunnel.spec.name}",
        )
        check(dec.header.version == 0, "frame with STT version != 0 delivered")
        check(len(dec.inner) >= 14, "inner frame shorter than Ethernet delivered")
        check(expected is not None, "frame delivered that the segments sent do not make up")
        assert expected is not None
        check_decapsulated(dec, expected)
        if holder is not None:
            check(buffer is holder, "frame built in a kept buffer, which is not given back")
        if buffer is not None:
            mine = held if held is not None else []
            check(
                (room is not None and buffer is room[0]) or any(buffer is b for b in mine),
                "a buffer handed back that was not kept",
            )
            if held is not None:
                held[:] = [b for b in held if b is not buffer]
    if room is not None:
        if res is Pending.KEPT:
            check(_holds(ep, room[0]), "KEPT, but no partial frame is in the buffer")
        else:
            check(not _holds(ep, room[0]), f"{res!r}, but a partial frame is in the buffer")
        if res is Pending.KEPT and held is not None:
            held.append(room[0])
    check_limits(ep)
    return res
