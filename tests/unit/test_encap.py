"""sttun.core.encap: segments, GSO super-packets and sender edge cases (#42-#45)."""

from __future__ import annotations

import itertools
import struct
from typing import NamedTuple

import pytest
from tests.reference import naive_sum

from sttun.core.api import encapsulate
from sttun.core.drops import DropReason
from sttun.core.encap import FRAME_ID_MASK, Encapsulator, flow_source_port
from sttun.errors import EncodeError
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import SttHeader
from sttun.wire.vnet import GSO_ECN, VNET_HDR_LEN, GsoType, VnetFlag, VnetHdr

MACS = bytes.fromhex("020000000002020000000001")
L4, R4 = ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2")
L6, R6 = ip_bytes("2001:db8:0:1::1"), ip_bytes("2001:db8:0:1::2")
S4, D4 = ip_bytes("192.0.2.1"), ip_bytes("192.0.2.2")
S6, D6 = ip_bytes("2001:db8:1::1"), ip_bytes("2001:db8:1::2")
ACK, PSH = 0x10, 0x08


class Seg(NamedTuple):
    tos: int
    ttl: int
    ident: int
    sport: int
    dport: int
    frame_len: int
    offset: int
    ack: int
    doff: int
    flags: int
    window: int
    payload: bytes


def parse_seg(pkt: bytes) -> Seg:
    """Decode one outer packet, asserting every checksum with the naive reference."""
    if pkt[0] >> 4 == 4:
        assert pkt[0] == 0x45
        total = struct.unpack_from("!H", pkt, 2)[0]
        assert total == len(pkt)
        assert naive_sum(pkt[:20]) == 0xFFFF, "IPv4 header checksum"
        assert pkt[9] == 6
        tos, ttl, ident = pkt[1], pkt[8], struct.unpack_from("!H", pkt, 4)[0]
        src, dst, tcp = pkt[12:16], pkt[16:20], pkt[20:]
    else:
        first, plen, nh, ttl = struct.unpack_from("!IHBB", pkt)
        assert plen == len(pkt) - 40 and nh == 6
        tos, ident = (first >> 20) & 0xFF, 0
        src, dst, tcp = pkt[8:24], pkt[24:40], pkt[40:]
    pseudo = src + dst + bytes([0, 6]) + len(tcp).to_bytes(2)
    assert naive_sum(pseudo + tcp) == 0xFFFF, "TCP checksum"
    sport, dport, seq, ack, doff, flags, win, _c, urg = struct.unpack_from("!HHIIBBHHH", tcp)
    assert urg == 0
    return Seg(tos, ttl, ident, sport, dport, seq >> 16, seq & 0xFFFF, ack, doff >> 4, flags, win,
               tcp[20:])  # fmt: skip


def ipv4_tcp(payload_len: int, *, partial: bool = False, tos: int = 0, ttl: int = 64) -> bytes:
    payload = bytes((i * 13) & 0xFF for i in range(payload_len))
    tcp = bytearray(struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, 0x50, 0x18, 512, 0, 0)) + payload
    pseudo = naive_sum(S4 + D4 + bytes([0, 6]) + len(tcp).to_bytes(2))
    c = pseudo if partial else ~naive_sum(bytes(tcp) + pseudo.to_bytes(2)) & 0xFFFF
    struct.pack_into("!H", tcp, 16, c)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(tcp), 1, 0x4000, ttl, 6, 0,
                               S4, D4))  # fmt: skip
    struct.pack_into("!H", ip, 10, ~naive_sum(bytes(ip)) & 0xFFFF)
    return MACS + b"\x08\x00" + bytes(ip) + bytes(tcp)


def frames_of(packets: list[list[bytes]]) -> list[bytes]:
    return [b"".join(bytes(b) for b in p) for p in packets]


def stt_frame(segs: list[Seg]) -> bytes:
    segs = sorted(segs, key=lambda s: s.offset)
    data = b"".join(s.payload for s in segs)
    assert len(data) == segs[0].frame_len
    return data


def test_single_segment_layout() -> None:
    enc = Encapsulator(L4, R4, 5, first_frame_id=77, fixed_sport=40000, first_ip_ident=9)
    inner = ipv4_tcp(100)
    (pkt,) = frames_of(enc.encap(inner, None, gso=False))
    s = parse_seg(pkt)
    assert (s.sport, s.dport, s.frame_len, s.offset, s.ack) == (40000, 7471, 18 + len(inner), 0, 77)
    assert (s.doff, s.flags, s.window, s.ident, s.ttl) == (5, ACK | PSH, 0, 9, 64)
    assert s.payload == SttHeader(context_id=5).pack() + inner
    assert (enc.frames, enc.segments, enc.bytes) == (1, 1, len(inner))


def test_segment_sizes_and_tail_rule() -> None:
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    seg = enc.segment_payload
    assert seg == 1460
    for frame_len, want in [
        (1460, [1460]),
        (1461, [1440, 21]),
        (2 * 1460 + 10, [1460, 1449, 21]),
        (2 * 1460 + 21, [1460, 1460, 21]),
        (3 * 1460, [1460] * 3),
    ]:
        inner = MACS + b"\x08\x06" + bytes(frame_len - 18 - 14)
        segs = [parse_seg(p) for p in frames_of(enc.encap(inner, None, gso=False))]
        assert [len(s.payload) for s in segs] == want
        assert [s.offset for s in segs] == [sum(want[:i]) for i in range(len(want))]
        assert stt_frame(segs)[18:] == inner


def test_mtu_and_constructor_errors() -> None:
    with pytest.raises(EncodeError):
        Encapsulator(L4, R4, 1, underlay_mtu=575)
    with pytest.raises(EncodeError):
        Encapsulator(L4, R6, 1)
    with pytest.raises(EncodeError):
        Encapsulator(L4, R4, 1 << 64)
    with pytest.raises(EncodeError):
        Encapsulator(L4, R4, 1, tos=64)
    with pytest.raises(EncodeError):
        Encapsulator(L4, R4, 1, ttl=0)
    with pytest.raises(EncodeError):
        Encapsulator(L4, R4, 1, l2=b"abc")
    enc = Encapsulator(L6, R6, 1, underlay_mtu=9000)
    assert enc.segment_payload == 9000 - 60


def test_outer_l2_header_prefix() -> None:
    l2 = bytes(12) + b"\x08\x00"
    enc = Encapsulator(L4, R4, 5, l2=l2, first_frame_id=1)
    for pkt in frames_of(enc.encap(ipv4_tcp(3000), None, gso=False)):
        assert pkt[:14] == l2
        parse_seg(pkt[14:])
    (sp,) = enc.encap(ipv4_tcp(3000), None, gso=True)
    v = VnetHdr.unpack(sp[0])
    assert (v.csum_start, v.hdr_len) == (34, 54) and bytes(sp[1])[:14] == l2


def test_tos_ttl_inherit_and_ecn() -> None:
    inner = ipv4_tcp(10, tos=0xB8 | 3, ttl=9)  # DSCP 46, CE
    enc = Encapsulator(L4, R4, 5, tos=None, ttl=None, first_frame_id=1)
    s = parse_seg(frames_of(enc.encap(inner, None, gso=False))[0])
    assert (s.tos, s.ttl) == (0xB8 | 2, 9)  # CE becomes ECT(0) outside
    enc = Encapsulator(L4, R4, 5, tos=10, ttl=33, first_frame_id=1)
    s = parse_seg(frames_of(enc.encap(ipv4_tcp(10, tos=1), None, gso=False))[0])
    assert (s.tos, s.ttl) == (10 << 2 | 1, 33)  # ECN always inherited
    arp = MACS + b"\x08\x06" + bytes(28)
    enc = Encapsulator(L6, R6, 5, tos=None, ttl=None, first_frame_id=1)
    s = parse_seg(frames_of(enc.encap(arp, None, gso=False))[0])
    assert (s.tos, s.ttl) == (0, 64)


def test_tx_bad_inner_and_too_big_counted() -> None:
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    assert enc.encap(bytes(13), None, gso=False) == []
    assert enc.drops[DropReason.TX_BAD_INNER] == 1
    big = MACS + b"\x08\x06" + bytes(65478 - 14)
    assert enc.encap(big, None, gso=False) == []
    assert enc.drops[DropReason.TX_FRAME_TOO_BIG] == 1
    # a GSO frame whose headers are garbage cannot be completed in software
    bad = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4 | GSO_ECN, 54, 1000, 34, 16)
    assert enc.encap(MACS + b"\x08\x00" + bytes(10), bad, gso=False) == []
    assert enc.drops[DropReason.TX_BAD_INNER] == 2
    with pytest.raises(EncodeError, match="cannot be encapsulated"):
        encapsulate(bytes(5), 1, src="198.18.0.1", dst="198.18.0.2")


def test_api_encapsulate() -> None:
    inner = ipv4_tcp(5000)
    pkts = encapsulate(inner, 7, src="198.18.0.1", dst="198.18.0.2", mtu=1500, frame_id=3)
    segs = [parse_seg(p) for p in pkts]
    assert len(segs) == 4 and {s.ack for s in segs} == {3}
    assert stt_frame(segs) == SttHeader(context_id=7).pack() + inner
    pkts6 = encapsulate(inner, 7, src="2001:db8:0:1::1", dst="2001:db8:0:1::2", mtu=1280)
    assert all(len(p) <= 1280 for p in pkts6)
    assert stt_frame([parse_seg(p) for p in pkts6])[18:] == inner


def sw_stt_headers(packets: list[list[bytes]]) -> list[tuple[SttHeader, bytes]]:
    """(STT header, inner frame) of every STT frame in a list of software segments."""
    out: list[tuple[SttHeader, bytes]] = []
    frames: dict[int, list[Seg]] = {}
    for pkt in frames_of(packets):
        s = parse_seg(pkt)
        frames.setdefault(s.ack, []).append(s)
    for segs in frames.values():
        data = stt_frame(segs)
        out.append((SttHeader.unpack(data), data[18:]))
    return out


def inner_ok(frame: bytes, l3: int = 14) -> None:
    """IPv4/IPv6 + TCP checksums of an inner frame are complete and valid."""
    if frame[l3] >> 4 == 4:
        ihl = (frame[l3] & 15) * 4
        tot = struct.unpack_from("!H", frame, l3 + 2)[0]
        assert naive_sum(frame[l3 : l3 + ihl]) == 0xFFFF
        src, dst, seg = (
            frame[l3 + 12 : l3 + 16],
            frame[l3 + 16 : l3 + 20],
            frame[l3 + ihl : l3 + tot],
        )
        proto = frame[l3 + 9]
    else:
        plen = struct.unpack_from("!H", frame, l3 + 4)[0]
        src, dst = frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40]
        # step over one destination-options header if present
        hl, proto = 40, frame[l3 + 6]
        if proto == 60:
            proto, hl = frame[l3 + 40], 40 + (frame[l3 + 41] + 1) * 8
        seg = frame[l3 + hl : l3 + 40 + plen]
    assert naive_sum(src + dst + bytes([0, proto]) + len(seg).to_bytes(2) + seg) == 0xFFFF


def test_edge42_too_long_frame_segmented_in_software_flags0() -> None:
    inner = ipv4_tcp(65490 - 54, partial=True)
    vnet = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16)
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    got = sw_stt_headers(enc.encap(inner, vnet, gso=False))
    assert len(got) == -(-(65490 - 54) // 1448)
    assert enc.software_completions == 1
    for hdr, frame in got:
        assert (hdr.flags, hdr.l4_offset, hdr.mss, hdr.vlan_tci) == (0, 0, 0, 0)
        assert len(frame) <= 54 + 1448
        inner_ok(frame)


def test_edge42_l4_offset_over_255_completed_in_software() -> None:
    dest_opts = bytes([6, 25]) + bytes(206)  # 208 bytes: L4 offset 14 + 40 + 208 = 262
    payload = bytes(range(256)) * 10
    tcp = bytearray(struct.pack("!HHIIBBHHH", 1, 2, 1, 0, 0x50, 0x18, 512, 0, 0)) + payload
    struct.pack_into("!H", tcp, 16, naive_sum(S6 + D6 + bytes([0, 6]) + len(tcp).to_bytes(2)))
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(dest_opts) + len(tcp), 60, 64, S6, D6)
    inner = MACS + b"\x86\xdd" + ip6 + dest_opts + bytes(tcp)
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    for vnet in (
        VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, 262, 16),
        VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV6, 282, 1000, 262, 16),
    ):
        got = sw_stt_headers(enc.encap(inner, vnet, gso=False))
        assert len(got) == (1 if not vnet.gso_type else 3)
        for hdr, frame in got:
            assert (hdr.flags, hdr.l4_offset, hdr.mss) == (0, 0, 0)
            inner_ok(frame)


def test_edge42_8021ad_tag_completed_in_software() -> None:
    plain = ipv4_tcp(3000, partial=True)
    inner = plain[:12] + bytes.fromhex("88a80064") + plain[12:]
    vnet = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 58, 1448, 38, 16)
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    got = sw_stt_headers(enc.encap(inner, vnet, gso=False))
    assert len(got) == 3
    for hdr, frame in got:
        assert (hdr.flags, hdr.l4_offset, hdr.mss, hdr.vlan_tci) == (0, 0, 0, 0)
        assert frame[12:16] == bytes.fromhex("88a80064")
        inner_ok(frame, 18)


def test_edge42_unsupported_gso_type_completed_in_software() -> None:
    inner = ipv4_tcp(3000, partial=True)
    vnet = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4 | GSO_ECN, 54, 1448, 34, 16)
    for gso in (False, True):
        enc = Encapsulator(L4, R4, 5, first_frame_id=1)
        pkts = enc.encap(inner, vnet, gso=gso)
        assert enc.frames == 3  # one STT frame per inner piece
        if gso:
            assert len(pkts) == 3
            for p in pkts:
                stt = bytes(p[1])[40:]
                assert stt[1:3] == b"\x00\x00"  # flags 0, L4 offset 0
        else:
            for hdr, frame in sw_stt_headers(pkts):
                assert (hdr.flags, hdr.mss) == (0, 0)
                inner_ok(frame)


def test_offloadable_frame_keeps_offload_header() -> None:
    inner = ipv4_tcp(3000, partial=True)
    vnet = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16)
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    ((hdr, frame),) = sw_stt_headers(enc.encap(inner, vnet, gso=False))
    assert (hdr.flags, hdr.l4_offset, hdr.mss) == (0x0E, 34, 1448)
    assert frame == inner  # untouched: the receiver finishes the work
    assert enc.software_completions == 0
    # with an 802.1Q tag: the tag moves to the header and csum_start moves back by 4
    tagged = inner[:12] + bytes.fromhex("8100a064") + inner[12:]
    ((hdr, frame),) = sw_stt_headers(enc.encap(tagged, vnet._replace(csum_start=38), gso=False))
    assert (hdr.flags, hdr.l4_offset, hdr.vlan_tci) == (0x0E, 34, 0xB064)
    assert frame == inner


@pytest.mark.parametrize(
    "inner",
    [
        MACS + b"\x08\x06" + bytes(28),  # ARP
        bytes.fromhex(  # IPv4 ICMP echo
            "020000000002020000000001080045000020000140004001b787c0a80101c0a801020800f7ff00000000"
        ),
    ],
)
def test_edge43_non_tcp_udp_inner_flags0(inner: bytes) -> None:
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    for vnet in (None, VnetHdr()):
        ((hdr, frame),) = sw_stt_headers(enc.encap(inner, vnet, gso=False))
        assert (hdr.flags, hdr.l4_offset, hdr.mss) == (0, 0, 0)
        assert frame == inner
    if inner[12:14] == b"\x08\x00":  # a partial ICMP checksum is finished here
        part = bytearray(inner)
        part[36:38] = b"\x00\x00"
        vnet = VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, 34, 2)
        ((hdr, frame),) = sw_stt_headers(enc.encap(bytes(part), vnet, gso=False))
        assert (hdr.flags, hdr.l4_offset, hdr.mss) == (0, 0, 0)
        assert naive_sum(frame[34:]) == 0xFFFF


def test_edge44_frame_ids_differ_and_do_not_repeat() -> None:
    enc = Encapsulator(L4, R4, 5, first_frame_id=0x7FFFFFF0)
    inner = ipv4_tcp(2000)
    ids = []
    for _ in range(40):
        segs = [parse_seg(p) for p in frames_of(enc.encap(inner, None, gso=False))]
        assert len({s.ack for s in segs}) == 1  # same id on every segment of a frame
        ids.append(segs[0].ack)
        (sp,) = enc.encap(inner, None, gso=True)
        ids.append(struct.unpack_from("!I", bytes(sp[1]), 28)[0])
    assert len(set(ids)) == len(ids) == 80
    assert all((b - a) & FRAME_ID_MASK == 1 for a, b in itertools.pairwise(ids))
    # default start is random per tunnel, then a counter
    e1 = Encapsulator(L4, R4, 5)
    a = [parse_seg(frames_of(e1.encap(inner, None, gso=False))[0]).ack for _ in range(3)]
    assert a[1] == (a[0] + 1) & FRAME_ID_MASK and a[2] == (a[0] + 2) & FRAME_ID_MASK


@pytest.mark.parametrize("first", [0x7FFFFFFC, 0xFFFFFFFC], ids=["top-clear", "top-set"])
def test_frame_ids_wrap_within_31_bits(first: int) -> None:
    """The top bit is the kernel transmit program's: Python's ids never set it, they
    wrap from 0x7FFFFFFF to 0 (a start with the top bit set is taken modulo 2**31)."""
    enc = Encapsulator(L4, R4, 5, first_frame_id=first)
    inner = ipv4_tcp(100)
    ids = []
    for i in range(8):
        if i % 2:
            (pkt,) = enc.encap(inner, None, gso=True)
            ids.append(struct.unpack_from("!I", bytes(pkt[1]), 28)[0])
        else:
            ids.append(parse_seg(frames_of(enc.encap(inner, None, gso=False))[0]).ack)
    assert ids == [0x7FFFFFFC, 0x7FFFFFFD, 0x7FFFFFFE, 0x7FFFFFFF, 0, 1, 2, 3]


def test_random_first_frame_ids_have_the_top_bit_clear() -> None:
    inner = ipv4_tcp(100)
    firsts = [
        parse_seg(frames_of(Encapsulator(L4, R4, 5).encap(inner, None, gso=False))[0]).ack
        for _ in range(64)
    ]
    assert all(f <= FRAME_ID_MASK for f in firsts)
    assert len(set(firsts)) > 1  # still random


@pytest.mark.parametrize("local,remote", [(L4, R4), (L6, R6)])
def test_edge45_segments_same_sport_psh_last_ack_all_doff5_checksums(
    local: bytes, remote: bytes
) -> None:
    enc = Encapsulator(local, remote, 5, first_frame_id=1)
    inner = ipv4_tcp(20000)
    sports = set()
    for _ in range(3):
        segs = [parse_seg(p) for p in frames_of(enc.encap(inner, None, gso=False))]
        assert len(segs) > 10
        assert all(s.flags & ACK for s in segs)
        assert [bool(s.flags & PSH) for s in segs] == [False] * (len(segs) - 1) + [True]
        assert all(s.flags & ~(ACK | PSH) == 0 for s in segs)
        assert all(s.doff == 5 for s in segs)
        sports |= {s.sport for s in segs}
    assert len(sports) == 1  # same flow, same port, every segment and every frame
    (sport,) = sports
    assert 32768 <= sport <= 65535 and sport == flow_source_port(inner)


def test_flow_source_port_depends_on_flow_only() -> None:
    a = ipv4_tcp(10)
    b = bytearray(a)
    b[34:36] = (1001).to_bytes(2)  # another source port: another flow
    assert flow_source_port(a) == flow_source_port(ipv4_tcp(500))  # payload does not matter
    assert flow_source_port(a) != flow_source_port(bytes(b))
    for f in (bytes(14), MACS + b"\x86\xdd" + bytes(60), MACS + b"\x08\x00" + bytes(5)):
        assert 32768 <= flow_source_port(f) <= 65535


def test_gso_super_packet_single_segment_has_no_gso() -> None:
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    (sp,) = enc.encap(ipv4_tcp(100), None, gso=True)
    assert len(sp[0]) == VNET_HDR_LEN
    v = VnetHdr.unpack(sp[0])
    assert v == VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, 20, 16)


# ------------------------------------------------------------------ encap_gso


def ipv6_udp(payload_len: int, *, tclass: int = 0, hop: int = 64) -> bytes:
    """An IPv6/UDP frame whose UDP checksum field holds the pseudo-header sum (partial)."""
    udp = bytearray(struct.pack("!HHHH", 1000, 2000, 8 + payload_len, 0)) + bytes(payload_len)
    struct.pack_into("!H", udp, 6, naive_sum(S6 + D6 + len(udp).to_bytes(4) + bytes([0, 0, 0, 17])))
    ip6 = struct.pack("!IHBB16s16s", 6 << 28 | tclass << 20, len(udp), 17, hop, S6, D6)
    return MACS + b"\x86\xdd" + ip6 + bytes(udp)


def ipv6_tcp(payload_len: int) -> bytes:
    """An IPv6/TCP frame, checksum partial."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", 1, 2, 1, 0, 0x50, 0x18, 512, 0, 0))
    tcp += bytes(payload_len)
    struct.pack_into("!H", tcp, 16, naive_sum(S6 + D6 + len(tcp).to_bytes(4) + bytes([0, 0, 0, 6])))
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, S6, D6)
    return MACS + b"\x86\xdd" + ip6 + bytes(tcp)


NC, DV = int(VnetFlag.NEEDS_CSUM), int(VnetFlag.DATA_VALID)
#: (frame, vnet fields, STT flags, L4 offset, MSS): what encap_gso takes as it is.
GSO_CASES = [
    (ipv4_tcp(3000, partial=True), (NC, GsoType.TCPV4, 1448, 34, 16), 0x0E, 34, 1448),
    (ipv4_tcp(100, partial=True), (NC, 0, 0, 34, 16), 0x0E, 34, 0),
    (ipv6_tcp(5000), (NC, GsoType.TCPV6, 1428, 54, 16), 0x0A, 54, 1428),
    (ipv6_udp(700), (NC, 0, 0, 54, 6), 0x02, 54, 0),
    (ipv4_tcp(100), (DV, 0, 0, 0, 0), 0x01, 0, 0),
    (ipv4_tcp(100), (0, 0, 0, 0, 0), 0x00, 0, 0),
    (MACS + b"\x08\x06" + bytes(28), (0, 0, 0, 0, 0), 0x00, 0, 0),  # ARP
]


@pytest.mark.parametrize("local,remote", [(L4, R4), (L6, R6)])
@pytest.mark.parametrize("frame,fields,flags,l4,mss", GSO_CASES)
def test_encap_gso_takes_the_common_frames(
    local: bytes,
    remote: bytes,
    frame: bytes,
    fields: tuple[int, int, int, int, int],
    flags: int,
    l4: int,
    mss: int,
) -> None:
    """One super-packet with the offload state carried in the STT header, the same
    bytes encap(gso=True) gives, counted once."""
    fast = Encapsulator(local, remote, 5, first_frame_id=9, first_ip_ident=3)
    ref = Encapsulator(local, remote, 5, first_frame_id=9, first_ip_ident=3)
    pkt = fast.encap_gso(memoryview(frame), *fields)
    assert pkt is not None
    vnet = VnetHdr(fields[0], fields[1], 0, fields[2], fields[3], fields[4])
    ((want_vnet, want_hdr, want_inner),) = ref.encap(frame, vnet, gso=True)
    assert [bytes(b) for b in pkt] == [bytes(want_vnet), bytes(want_hdr), bytes(want_inner)]
    ip_hlen = len(local) + len(local) + (12 if len(local) == 4 else 8)  # 20 or 40
    hdr = bytes(pkt[1])
    stt = SttHeader.unpack(hdr, ip_hlen + 20)
    assert (stt.flags, stt.l4_offset, stt.mss, stt.vlan_tci, stt.context_id) == (
        flags,
        l4,
        mss,
        0,
        5,
    )
    assert bytes(pkt[2]) == frame  # the frame is sent as it is, not copied
    frame_len = len(frame) + 18
    nseg = -(-frame_len // fast.segment_payload)
    v = VnetHdr.unpack(pkt[0])
    assert v.gso_type == (0 if nseg == 1 else (GsoType.TCPV4 if ip_hlen == 20 else GsoType.TCPV6))
    assert (fast.frames, fast.bytes, fast.segments) == (1, len(frame), nseg)
    assert (fast.frames, fast.bytes, fast.segments) == (ref.frames, ref.bytes, ref.segments)
    assert fast.software_completions == 0


@pytest.mark.parametrize(
    "frame,fields",
    [
        # an 802.1Q tag: it must move into the STT header first (encap)
        (ipv4_tcp(100)[:12] + bytes.fromhex("81000064") + ipv4_tcp(100)[12:], (0, 0, 0, 0, 0)),
        (bytes(13), (0, 0, 0, 0, 0)),  # shorter than an Ethernet header
        (MACS + b"\x08\x06" + bytes(65478 - 14), (0, 0, 0, 0, 0)),  # too long for a frame
        (ipv4_tcp(3000, partial=True), (NC, GsoType.TCPV4 | GSO_ECN, 1448, 34, 16)),
        (ipv4_tcp(3000, partial=True), (NC, GsoType.TCPV6, 1448, 34, 16)),  # wrong family
        (ipv4_tcp(3000, partial=True), (NC, GsoType.UDP, 1448, 34, 6)),  # UFO
        (ipv4_tcp(3000, partial=True), (0, GsoType.TCPV4, 1448, 0, 0)),  # TSO, no csum
        (ipv4_tcp(100, partial=True), (NC, 0, 0, 20, 16)),  # L4 offset inside IPv4
        (ipv6_tcp(100), (NC, 0, 0, 34, 16)),  # L4 offset inside the IPv6 header
        (ipv4_tcp(100, partial=True), (NC, 0, 0, 34, 2)),  # neither TCP nor UDP
        (MACS + b"\x88\xa8" + bytes(60), (NC, 0, 0, 38, 16)),  # in-band 802.1ad tag
    ],
)
def test_encap_gso_leaves_the_rest_to_encap(
    frame: bytes, fields: tuple[int, int, int, int, int]
) -> None:
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    assert enc.encap_gso(memoryview(frame), *fields) is None
    assert (enc.frames, enc.bytes, enc.segments, enc.software_completions) == (0, 0, 0, 0)
    assert not enc.drops.as_dict()


def test_encap_gso_headers_follow_configuration() -> None:
    """TOS/TTL inherited or fixed (CE sent as ECT(0)), DF, the outer Ethernet header,
    the TCI of a tag encap() took out, frame id and IPv4 ID counting up."""
    l2 = bytes(range(12)) + b"\x08\x00"
    enc = Encapsulator(L4, R4, 5, tos=None, ttl=None, l2=l2, first_frame_id=7, first_ip_ident=9)
    frame = ipv4_tcp(100, tos=0xB8 | 3, ttl=9)
    pkt = enc.encap_gso(memoryview(frame), 0, 0, 0, 0, 0)
    assert pkt is not None
    hdr = bytes(pkt[1])
    assert hdr[:14] == l2
    assert naive_sum(hdr[14:34]) == 0xFFFF  # IPv4 header checksum
    # TOS, ID, DF, TTL; the TCP ACK (frame id) and flags
    assert struct.unpack_from("!xBxxHHB", hdr, 14) == (0xB8 | 2, 9, 0x4000, 9)
    assert struct.unpack_from("!IxB", hdr, 14 + 28) == (7, ACK | PSH)
    enc.tos, enc.ttl, enc.df = 10, 33, False
    pkt = enc.encap_gso(memoryview(frame), 0, 0, 0, 0, 0, 0x1064)
    assert pkt is not None
    hdr = bytes(pkt[1])
    assert naive_sum(hdr[14:34]) == 0xFFFF
    assert struct.unpack_from("!xBxxHHB", hdr, 14) == (10 << 2 | 2, 10, 0, 33)
    assert struct.unpack_from("!I", hdr, 14 + 28) == (8,)
    assert SttHeader.unpack(hdr, 14 + 40).vlan_tci == 0x1064
    # a second, in-band 802.1Q tag stays in the frame once the outer one is in the header
    double = frame[:12] + bytes.fromhex("81000005") + frame[12:]
    assert enc.encap_gso(memoryview(double), 0, 0, 0, 0, 0) is None
    assert enc.encap_gso(memoryview(double), 0, 0, 0, 0, 0, 0x1064) is not None


def test_encap_gso_headers_are_scratch_until_the_next_call() -> None:
    """encap_gso hands out its scratch buffer (no copy per frame); encap() copies, so
    the packets it returns together stay valid."""
    enc = Encapsulator(L4, R4, 5, first_frame_id=1)
    a = enc.encap_gso(memoryview(ipv4_tcp(100)), 0, 0, 0, 0, 0)
    assert a is not None
    first = bytes(a[1])
    b = enc.encap_gso(memoryview(ipv4_tcp(100)), 0, 0, 0, 0, 0)
    assert b is not None and b[1] is a[1] and bytes(a[1]) != first
    vnet = VnetHdr(NC, GsoType.TCPV4 | GSO_ECN, 54, 1000, 34, 16)
    pkts = enc.encap(ipv4_tcp(3000, partial=True), vnet, gso=True)
    assert len(pkts) == 3 and len({bytes(p[1]) for p in pkts}) == 3
