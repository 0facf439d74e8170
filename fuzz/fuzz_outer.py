"""Fuzz target ``outer``: outer packet parsing, ``Endpoint.receive`` on any bytes.

Byte 0 picks the mode:

* raw — the rest of the input is handed to ``Endpoint.receive`` as it is (and to
  ``skip_vlan_tags``, ``parse_outer`` and ``parse_segment``);
* crafted — fuzz-chosen header fields around a fuzz payload: source/destination
  from the tunnel table or strangers, TOS, DF/fragment bits, protocol, IPv4 options,
  a lying total length, ports, SEQ/ACK, data offset, a right or wrong checksum, and
  often a single-segment STT frame (SEQ = L << 16) so that decapsulation runs too.

The packet is received as bytes, a bytearray, a memoryview, or (like the daemon)
from a receive buffer offered as ``room``; then once more as bytes.

Invariants: ``receive`` never raises, and what it returns is what happened (see
``fuzz.netutil.receive_checked``): a drop reason is the one counter that went up, a
pending segment is in its partial frame, a delivered frame went to the tunnel whose
remote, local address and key it carries and is the packet's own payload,
decapsulated; the receive buffer is held exactly when ``Pending.KEPT`` says so;
reassembly limits hold.  ``skip_vlan_tags`` raises only ``DecodeError``
(``TruncatedError``), ``parse_outer`` and ``parse_segment`` return fields or a
``DropReason``, and agree.
"""

from __future__ import annotations

import contextlib
import struct

from fuzz.common import Input, Target, check, main
from fuzz.netutil import (
    ADDRS,
    KEYS,
    PORTS,
    RX_HEAD,
    RX_SIZE,
    build_packet,
    make_endpoint,
    receive_checked,
)
from sttun.core.drops import DropReason
from sttun.core.outer import parse_outer, parse_segment
from sttun.errors import DecodeError
from sttun.wire.ether import skip_vlan_tags
from sttun.wire.stt import SttHeader


def _parsers(buf: bytes) -> None:
    with contextlib.suppress(DecodeError):
        skip_vlan_tags(buf)
    res = parse_outer(buf)
    seg = parse_segment(buf)
    if isinstance(res, DropReason):
        check(seg is res, f"parse_outer says {res.value}, parse_segment {seg!r}")
    else:
        src, dst, _tos, l4, end = res
        check(len(src) in (4, 16) and len(dst) == len(src), "parse_outer: addresses")
        check(l4 + 20 <= end <= len(buf), f"parse_outer: l4 {l4} end {end} len {len(buf)}")
        check(not isinstance(seg, DropReason), f"parse_segment refuses: {seg!r}")
        assert not isinstance(seg, DropReason)
        check(seg[:3] == res[:3] and seg[8:] == res[3:], "parse_segment and parse_outer differ")


def _crafted(inp: Input) -> tuple[bytes, bool]:
    # Fixed-size fields first, the payload (the rest of the input) last.
    src, dst = inp.pick(ADDRS)
    if inp.below(8) == 0:
        src, dst = dst, src
    tos = inp.u8()
    knobs = inp.u8()
    dport = inp.pick(PORTS) if knobs & 1 else inp.u16()
    hdr = SttHeader(
        version=0 if inp.below(8) else inp.u8(),
        flags=inp.u8(),
        l4_offset=inp.u8(),
        mss=inp.u16(),
        vlan_tci=inp.u16() if inp.boolean() else 0,
        context_id=inp.pick(KEYS),
    ).pack()
    seq_xor = inp.u32() if knobs & 4 else 0
    ack = inp.u32()
    doff = 0x50 if inp.below(8) else inp.u8()
    csum_xor = 0 if inp.below(4) else inp.u16()
    csum_ok = inp.boolean()
    frag, proto, vihl, total = inp.u16(), inp.pick((6, 6, 17, 0, 44, 255)), inp.u8(), inp.u16()
    cut = inp.u16()
    body = inp.rest()
    payload = body if knobs & 2 else hdr + body  # knobs & 2: no STT header
    pkt = bytearray(
        build_packet(
            src,
            dst,
            payload,
            seq=(len(payload) << 16) ^ seq_xor,
            ack=ack,
            dport=dport,
            tos=tos,
            doff_byte=doff,
            csum_xor=csum_xor,
            df=bool(knobs & 8),
        )
    )
    if knobs & 0x10 and len(src) == 4:  # fragment bits / protocol / IHL / total length
        struct.pack_into("!H", pkt, 6, frag)
        pkt[9] = proto
        if knobs & 0x20:
            pkt[0] = 0x40 | (vihl & 0x0F)
        if knobs & 0x40:
            struct.pack_into("!H", pkt, 2, total)
    elif knobs & 0x10:  # IPv6: next header / payload length
        pkt[6] = proto
        if knobs & 0x40:
            struct.pack_into("!H", pkt, 4, total)
    if knobs & 0x80:
        pkt = pkt[: cut % (len(pkt) + 1)]
    return bytes(pkt), csum_ok


def one_input(data: bytes) -> None:
    """See the module docstring."""
    inp = Input(data)
    mode = inp.u8()
    ep = make_endpoint(small=bool(mode & 2))
    if mode & 1:
        pkt, csum_ok = _crafted(inp)
    else:
        pkt, csum_ok = inp.rest(), bool(mode & 4)
    _parsers(pkt)
    view: bytes | bytearray | memoryview = pkt
    room = None
    if mode & 32:  # in a receive buffer the reassembler may keep
        rx = bytearray(RX_SIZE)
        rx[RX_HEAD : RX_HEAD + len(pkt)] = pkt
        view = memoryview(rx)[RX_HEAD : RX_HEAD + len(pkt)]
        room = (rx, RX_HEAD)
    elif mode & 8:
        view = bytearray(pkt)
    elif mode & 16:
        view = memoryview(pkt)
    receive_checked(ep, view, 1.0, csum_ok, room=room, held=[])
    # A second copy: a duplicate (or a late segment) must be counted too.
    receive_checked(ep, pkt, 2.0, csum_ok)


def seeds() -> list[bytes]:
    """A raw valid segment, crafted inputs of each kind."""
    from fuzz.netutil import LOCAL4, PEER4A

    frame = SttHeader(context_id=0x10).pack() + bytes(12) + b"\x08\x00" + bytes(46)
    raw = build_packet(PEER4A, LOCAL4, frame, seq=len(frame) << 16, ack=1)
    return [
        b"\x00" + raw,
        b"\x04" + raw,
        b"\x01" + bytes(20),
        b"\x01\x00\x00\x00\x00" + bytes(8) + b"\x08\x00" + bytes(60),
        b"\x01\x02\x11\x02" + bytes(30),
        b"\x03\x01\x00\x51" + bytes(40),
    ]


TARGET = Target("outer", one_input, seeds, max_len=2048)

if __name__ == "__main__":
    main(TARGET)
