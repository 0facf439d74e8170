"""Hypothesis properties of encapsulation: segment rules, checksums, GSO model, round trip."""

from __future__ import annotations

import random
import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.reference import naive_sum

from sttun.core.encap import Encapsulator, flow_source_port
from sttun.core.endpoint import Delivered, Endpoint, TunnelSpec
from sttun.core.reassembly import Pending
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import SttHeader
from sttun.wire.vnet import GsoType, VnetFlag, VnetHdr

L4, R4 = ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2")
L6, R6 = ip_bytes("2001:db8:0:1::1"), ip_bytes("2001:db8:0:1::2")
ACK, PSH, FIN, CWR = 0x10, 0x08, 0x01, 0x80
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -------------------------------------------------- independent reference code


def ones_add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def pseudo(src: bytes, dst: bytes, tcp_len: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, 6]) + tcp_len.to_bytes(2)
    return src + dst + tcp_len.to_bytes(4) + bytes([0, 0, 0, 6])


def check_segment(pkt: bytes, src: bytes, dst: bytes) -> tuple[int, bytes, bytes]:
    """Assert IP and TCP checksums; return (IP header length, TCP header, payload)."""
    if len(src) == 4:
        assert pkt[0] == 0x45 and struct.unpack_from("!H", pkt, 2)[0] == len(pkt)
        assert naive_sum(pkt[:20]) == 0xFFFF, "IPv4 header checksum"
        assert pkt[12:20] == src + dst and pkt[9] == 6
        hl = 20
    else:
        assert pkt[0] >> 4 == 6 and struct.unpack_from("!H", pkt, 4)[0] == len(pkt) - 40
        assert pkt[8:40] == src + dst and pkt[6] == 6
        hl = 40
    tcp = pkt[hl:]
    assert naive_sum(pseudo(src, dst, len(tcp)) + tcp) == 0xFFFF, "TCP checksum"
    return hl, tcp[:20], tcp[20:]


def kernel_gso(super_pkt: bytes, vnet: VnetHdr) -> list[bytes]:
    """A Python model of Linux tcp_gso_segment + checksum completion.

    Cuts the payload at gso_size, fixes IP lengths (IPv4: ID + i, header checksum),
    advances SEQ by the bytes before each piece, keeps PSH/FIN only on the last and
    CWR only on the first, adjusts the seeded pseudo-header sum for each piece's length
    and then finishes the checksum over the piece (skb_checksum_help).
    """
    hl = vnet.csum_start
    v4 = hl == 20
    hdr = super_pkt[: vnet.hdr_len] if vnet.gso_type else super_pkt[: hl + 20]
    data = super_pkt[len(hdr) :]
    g = vnet.gso_size if vnet.gso_type else len(data)
    full_tcp = len(super_pkt) - hl
    seed = struct.unpack_from("!H", super_pkt, hl + 16)[0]
    (seq0,) = struct.unpack_from("!I", super_pkt, hl + 4)
    ident0 = struct.unpack_from("!H", super_pkt, 4)[0] if v4 else 0
    pieces = [data[i : i + g] for i in range(0, len(data), g)]
    out = []
    for i, piece in enumerate(pieces):
        h = bytearray(hdr)
        tcp_len = 20 + len(piece)
        if v4:
            struct.pack_into("!HH", h, 2, 20 + tcp_len, (ident0 + i) & 0xFFFF)
            struct.pack_into("!H", h, 10, 0)
            struct.pack_into("!H", h, 10, ~naive_sum(bytes(h[:20])) & 0xFFFF)
        else:
            struct.pack_into("!H", h, 4, tcp_len)
        struct.pack_into("!I", h, hl + 4, (seq0 + i * g) & 0xFFFFFFFF)
        fl = h[hl + 13]
        if i != len(pieces) - 1:
            fl &= ~(PSH | FIN)
        if i:
            fl &= ~CWR
        h[hl + 13] = fl
        # csum field: seed - full length + this length (ones' complement arithmetic)
        adj = ones_add(ones_add(seed, ~full_tcp & 0xFFFF), tcp_len)
        struct.pack_into("!H", h, hl + 16, adj)
        seg = bytearray(bytes(h) + piece)
        c = ~naive_sum(bytes(seg[hl:])) & 0xFFFF
        struct.pack_into("!H", seg, hl + 16, c)
        out.append(bytes(seg))
    return out


# ------------------------------------------------------------------ inputs


@st.composite
def inner_frames(draw: st.DrawFn) -> bytes:
    """A random Ethernet frame of 14..65000 bytes, sometimes IP-looking or 802.1Q tagged."""
    size = draw(st.one_of(st.integers(14, 200), st.integers(14, 65000), st.just(65000)))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    body = bytearray(rnd.randbytes(size))
    kind = draw(st.sampled_from(["raw", "ipv4", "ipv6", "arp", "dot1q"]))
    if kind == "ipv4":
        body[12:14] = b"\x08\x00"
    elif kind == "ipv6":
        body[12:14] = b"\x86\xdd"
    elif kind == "arp":
        body[12:14] = b"\x08\x06"
    elif kind == "dot1q" and size >= 18:
        body[12:14] = b"\x81\x00"
        body[14] &= 0xEF  # DEI clear: STT cannot carry it (protocol.md §5)
        body[16:18] = b"\x08\x00"
    elif body[12:14] in (b"\x81\x00", b"\x88\xa8", b"\x91\x00", b"\x92\x00", b"\x93\x00"):
        body[12] = 0x12
    return bytes(body)


families = st.sampled_from([(L4, R4), (L6, R6)])
mtus = st.integers(576, 9000)


def stt_len(inner: bytes) -> int:
    return len(inner) + 18 - (4 if inner[12:14] == b"\x81\x00" and len(inner) >= 18 else 0)


@SETTINGS
@given(inner_frames(), families, mtus, st.integers(0, 2**32 - 1), st.randoms())
def test_software_segments(
    inner: bytes, fam: tuple[bytes, bytes], mtu: int, fid: int, rnd: random.Random
) -> None:
    local, remote = fam
    if len(inner) + 18 + 20 + len(local) + 20 > 65535:  # the encapsulator's frame limit
        inner = inner[: 65535 - 18 - 40 - len(local)]
    enc = Encapsulator(local, remote, 7, underlay_mtu=mtu, first_frame_id=fid, tos=None, ttl=None)
    pkts = [b"".join(bytes(b) for b in p) for p in enc.encap(inner, None, gso=False)]
    frame_len = stt_len(inner)
    assert pkts
    offset = 0
    sports = set()
    for i, pkt in enumerate(pkts):
        assert len(pkt) <= mtu
        _hl, tcp, payload = check_segment(pkt, local, remote)
        sport, dport, seq, ack, doff, flags, _win, _c, urg = struct.unpack("!HHIIBBHHH", tcp)
        sports.add(sport)
        assert dport == 7471 and ack == fid and doff == 0x50 and urg == 0
        assert seq == (frame_len << 16) | offset
        assert flags == (ACK | PSH if i == len(pkts) - 1 else ACK)
        assert payload
        offset += len(payload)
    assert offset == frame_len
    assert len(sports) == 1
    if len(pkts) > 1:
        assert len(check_segment(pkts[-1], local, remote)[2]) > 20

    # the other side gives back exactly the inner frame, whatever the order
    ep = Endpoint()
    tun = ep.add_tunnel(TunnelSpec("t", remote, local, 7, 7, underlay_mtu=mtu))
    rnd.shuffle(pkts)
    *pending, last = [ep.receive(p, 1.0) for p in pkts]
    assert pending == [Pending.STORED] * len(pending)
    assert isinstance(last, Delivered)
    assert last.tunnel is tun and last.buffer is None
    assert bytes(last.frame.inner) == inner
    assert ep.stats()["drops"] == {}


@SETTINGS
@given(inner_frames(), families, mtus, st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF))
def test_gso_super_packet_matches_kernel_model(
    inner: bytes, fam: tuple[bytes, bytes], mtu: int, fid: int, ident: int
) -> None:
    local, remote = fam
    ip_hlen = 20 if len(local) == 4 else 40
    if len(inner) + 18 + 20 + ip_hlen > 65535:
        inner = inner[: 65535 - 18 - 20 - ip_hlen]
    kw = {"underlay_mtu": mtu, "first_frame_id": fid, "first_ip_ident": ident}
    gso_enc = Encapsulator(local, remote, 7, **kw)  # type: ignore[arg-type]
    sw_enc = Encapsulator(local, remote, 7, **kw)  # type: ignore[arg-type]
    ((vnet_raw, hdr, body),) = gso_enc.encap(inner, None, gso=True)
    super_pkt = bytes(hdr) + bytes(body)
    vnet = VnetHdr.unpack(vnet_raw)
    frame_len = stt_len(inner)
    tcp_len = 20 + frame_len
    gso_size = mtu - ip_hlen - 20
    assert len(super_pkt) == ip_hlen + tcp_len
    nseg = -(-frame_len // gso_size)
    assert vnet.flags == VnetFlag.NEEDS_CSUM
    assert (vnet.csum_start, vnet.csum_offset) == (ip_hlen, 16)
    if nseg > 1:
        want_type = GsoType.TCPV4 if ip_hlen == 20 else GsoType.TCPV6
        assert (vnet.gso_type, vnet.gso_size, vnet.hdr_len) == (want_type, gso_size, ip_hlen + 20)
    else:
        assert vnet.gso_type == GsoType.NONE
    # seeded checksum: folded, non-complemented pseudo-header sum over the full TCP length
    seed = struct.unpack_from("!H", super_pkt, ip_hlen + 16)[0]
    assert seed == naive_sum(pseudo(local, remote, tcp_len))
    if ip_hlen == 20:
        assert naive_sum(super_pkt[:20]) == 0xFFFF
    assert SttHeader.unpack(super_pkt, ip_hlen + 20).context_id == 7

    model = kernel_gso(super_pkt, vnet)
    sw = [b"".join(bytes(b) for b in p) for p in sw_enc.encap(inner, None, gso=False)]
    for pkt in model:
        check_segment(pkt, local, remote)
        assert len(pkt) <= mtu
    tail = frame_len % gso_size
    if nseg > 1 and 0 < tail <= 20:
        # The software path moves bytes so that the last segment is > 20 bytes
        # (tshark's reassembly needs it, protocol.md §12.5); kernel GSO cannot.
        assert len(model) == len(sw) == nseg
        assert len(model[-1]) - ip_hlen - 20 == tail
        model_data = b"".join(p[ip_hlen + 20 :] for p in model)
        assert model_data == b"".join(p[ip_hlen + 20 :] for p in sw)
    else:
        assert model == sw


def _flow_key(frame: bytes) -> bytes:
    """What the outer source port is derived from (protocol.md #45), spelled out:
    IPv4/IPv6 addresses plus, for unfragmented TCP/UDP, the two L4 ports; the MAC
    addresses for anything else."""
    if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
        l4 = 14 + (frame[14] & 0x0F) * 4
        unfragmented = not (frame[20] & 0x3F or frame[21])
        ports = frame[l4 : l4 + 4] if len(frame) >= l4 + 4 else b""
        return frame[26:34] + (ports if frame[23] in (6, 17) and unfragmented else b"")
    if len(frame) >= 54 and frame[12:14] == b"\x86\xdd":
        return frame[22:54] + (frame[54:58] if frame[20] in (6, 17) and len(frame) >= 58 else b"")
    return frame[0:12]


@st.composite
def ip_looking_frames(draw: st.DrawFn) -> bytes:
    """Frames of 14..120 bytes, mostly IPv4 or IPv6 with TCP, UDP or another protocol,
    any IHL, fragmented or not."""
    f = bytearray(draw(st.binary(min_size=14, max_size=120)))
    f[12:14] = draw(st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00", bytes(2)]))
    if len(f) > 23:
        f[14] = 0x40 | draw(st.sampled_from([5, 5, 5, 6, 15, 3]))
        f[23] = draw(st.sampled_from([6, 17, 1]))
        f[20] = draw(st.sampled_from([6, 17, 0, 0x20, 44]))
        f[21] = draw(st.sampled_from([0, 0, 1]))
    return bytes(f)


@given(ip_looking_frames())
def test_flow_source_port_hashes_the_flow_key(frame: bytes) -> None:
    h = zlib.crc32(_flow_key(frame))
    want = 0x8000 | ((h ^ (h >> 15)) & 0x7FFF)
    assert flow_source_port(frame) == want
    assert flow_source_port(memoryview(frame)) == want
