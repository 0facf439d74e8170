"""sttun.core.decap: STT frame → inner frame + offload state (protocol.md §11)."""

from __future__ import annotations

import struct

import pytest
from tests.reference import naive_sum

from sttun.core import softpath
from sttun.core.decap import Decapsulated, Decapsulator, DscpModel, decapsulate
from sttun.core.drops import DropReason
from sttun.errors import DecodeError, TruncatedError
from sttun.wire.stt import SttHeader
from sttun.wire.vnet import GsoType, VnetFlag, VnetHdr

MACS = bytes.fromhex("020000000002020000000001")
S4, D4 = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
S6, D6 = (
    bytes.fromhex("20010db8000100000000000000000001"),
    bytes.fromhex("20010db8000100000000000000000002"),
)
P, C, V, T = 0x02, 0x01, 0x04, 0x08


def ip4(proto: int, plen: int, tos: int = 0) -> bytes:
    h = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + plen, 7, 0x4000, 64, proto, 0, S4, D4)
    )
    struct.pack_into("!H", h, 10, ~naive_sum(bytes(h)) & 0xFFFF)
    return bytes(h)


def ip6(nh: int, plen: int, tclass: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (tclass << 20), plen, nh, 64, S6, D6)


def l4_packet(v4: bool, tcp: bool, payload: bytes, *, partial: bool, tos: int = 0) -> bytes:
    """An inner Ethernet frame; its L4 checksum complete, or the pseudo sum if partial."""
    proto = 6 if tcp else 17
    if tcp:
        l4 = bytearray(struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, 0x50, 0x18, 512, 0, 0))
    else:
        l4 = bytearray(struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0))
    seg = bytes(l4) + payload
    src, dst = (S4, D4) if v4 else (S6, D6)
    pseudo = naive_sum(src + dst + bytes([0, proto]) + len(seg).to_bytes(2))
    field = pseudo if partial else ~naive_sum(seg + pseudo.to_bytes(2)) & 0xFFFF
    off = 16 if tcp else 6
    seg = seg[:off] + field.to_bytes(2) + seg[off + 2 :]
    if v4:
        return MACS + b"\x08\x00" + ip4(proto, len(seg), tos) + seg
    return MACS + b"\x86\xdd" + ip6(proto, len(seg), tos) + seg


def l4_ok(frame: bytes, l3: int = 14) -> bool:
    """The L4 checksum of a complete IPv4/IPv6 frame verifies."""
    if frame[l3] >> 4 == 4:
        ihl = (frame[l3] & 15) * 4
        total = struct.unpack_from("!H", frame, l3 + 2)[0]
        seg = frame[l3 + ihl : l3 + total]
        src, dst, proto = frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20], frame[l3 + 9]
        assert naive_sum(frame[l3 : l3 + ihl]) == 0xFFFF
    else:
        plen = struct.unpack_from("!H", frame, l3 + 4)[0]
        seg = frame[l3 + 40 : l3 + 40 + plen]
        src, dst, proto = frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40], frame[l3 + 6]
    pseudo = src + dst + bytes([0, proto]) + len(seg).to_bytes(2)
    return naive_sum(pseudo + seg) == 0xFFFF


def stt(flags: int = 0, l4: int = 0, mss: int = 0, **kw: int) -> bytes:
    return SttHeader(flags=flags, l4_offset=l4, mss=mss, context_id=0x42, **kw).pack()


def ok(result: Decapsulated | DropReason) -> Decapsulated:
    assert isinstance(result, Decapsulated), result
    return result


TCP4 = l4_packet(True, True, b"hello world", partial=False)
TCP4_PARTIAL = l4_packet(True, True, b"hello world", partial=True)


def test_edge01_flags0_deliver_checksum_must_verify() -> None:
    r = ok(Decapsulator().decap(stt() + TCP4))
    assert bytes(r.inner) == TCP4
    assert r.vnet == VnetHdr()  # no flags: the receiver must verify
    assert r.header.context_id == 0x42


def test_edge02_flag_c_checksum_marked_valid() -> None:
    r = ok(Decapsulator().decap(stt(C) + TCP4))
    assert r.vnet == VnetHdr(flags=VnetFlag.DATA_VALID)


def test_edge03_pvt_l4_34_mss0_needs_csum_no_gso() -> None:
    r = ok(Decapsulator().decap(stt(P | V | T, 34) + TCP4_PARTIAL))
    assert r.vnet == VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.NONE, 0, 0, 34, 16)
    done = softpath.complete(bytes(r.inner), r.vnet)
    assert len(done) == 1 and l4_ok(bytes(done[0]))


def test_edge04_pvt_mss1448_4000_byte_segment_gso_or_3_packets() -> None:
    payload = bytes(i & 0xFF for i in range(4000))
    inner = l4_packet(True, True, payload, partial=True)
    r = ok(Decapsulator().decap(stt(P | V | T, 34, 1448) + inner))
    assert r.vnet == VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16)
    pieces = [bytes(p) for p in softpath.complete(bytes(r.inner), r.vnet)]
    assert len(pieces) == 3
    assert [len(p) - 54 for p in pieces] == [1448, 1448, 4000 - 2 * 1448]
    seqs = [struct.unpack_from("!I", p, 38)[0] for p in pieces]
    assert seqs == [1, 1 + 1448, 1 + 2 * 1448]
    assert b"".join(p[54:] for p in pieces) == payload
    for p in pieces:
        assert struct.unpack_from("!H", p, 16)[0] == len(p) - 14  # fixed total length
        assert l4_ok(p)


def test_edge05_pt_ipv6_tcp_l4_54() -> None:
    inner = l4_packet(False, True, bytes(3000), partial=True)
    r = ok(Decapsulator().decap(stt(P | T, 54, 1220) + inner))
    assert r.vnet == VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV6, 74, 1220, 54, 16)
    r = ok(Decapsulator().decap(stt(P | T, 54) + inner))
    assert (r.vnet.csum_offset, r.vnet.gso_type) == (16, GsoType.NONE)
    pieces = softpath.complete(bytes(r.inner), r.vnet)
    assert l4_ok(bytes(pieces[0]))


def test_edge06_pv_ipv4_udp_csum_offset6() -> None:
    inner = l4_packet(True, False, bytes(range(200)), partial=True)
    r = ok(Decapsulator().decap(stt(P | V, 34, 1448) + inner))
    # UFO is gone from current kernels: delivered with only the checksum partial
    assert r.vnet == VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.NONE, 0, 0, 34, 6)
    done = softpath.complete(bytes(r.inner), r.vnet)
    assert l4_ok(bytes(done[0]))


@pytest.mark.parametrize(
    "flags,l4", [(P | V | T, 0), (P | V | T, 33), (P | V, 20), (P | T, 53), (P, 34), (P | T, 0)]
)
def test_edge07_partial_with_small_l4_offset_dropped(flags: int, l4: int) -> None:
    inner = l4_packet(bool(flags & V), True, bytes(100), partial=True)
    assert Decapsulator().decap(stt(flags, l4) + inner) is DropReason.BAD_L4_OFFSET
    with pytest.raises(DecodeError, match="L4 offset"):
        decapsulate(stt(flags, l4) + inner)


@pytest.mark.parametrize("flags,hl", [(P | V | T, 20), (P | V, 8), (P | T, 20), (P, 8)])
def test_edge08_partial_l4_header_past_end_dropped(flags: int, hl: int) -> None:
    l4 = 34 if flags & V else 54
    inner = MACS + b"\x08\x00" + bytes(l4 - 14 + hl)
    assert isinstance(Decapsulator().decap(stt(flags, l4) + inner), Decapsulated)
    assert Decapsulator().decap(stt(flags, l4) + inner[:-1]) is DropReason.BAD_L4_OFFSET
    assert Decapsulator().decap(stt(flags, 250) + inner) is DropReason.BAD_L4_OFFSET


def test_edge09_c_and_p_treated_as_p_and_counted() -> None:
    d = Decapsulator()
    r = ok(d.decap(stt(C | P | V | T, 34, 1448) + TCP4_PARTIAL))
    assert r.vnet == VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16)
    assert d.csum_both_flags == 1


@pytest.mark.parametrize("flags", [0, C, V | T])
def test_edge10_p_clear_mss_and_l4_offset_ignored(flags: int) -> None:
    r = ok(Decapsulator().decap(stt(flags, 34, 1448) + TCP4))
    assert r.vnet == (VnetHdr(flags=VnetFlag.DATA_VALID) if flags & C else VnetHdr())
    assert bytes(r.inner) == TCP4
    r = ok(Decapsulator().decap(stt(flags, 3, 0) + TCP4))  # even an impossible offset
    assert bytes(r.inner) == TCP4


@pytest.mark.parametrize("version", [1, 2, 255])
def test_edge11_version_nonzero_dropped(version: int) -> None:
    f = SttHeader(version=version).pack() + TCP4
    assert Decapsulator().decap(f) is DropReason.BAD_VERSION
    with pytest.raises(DecodeError) as ei:
        decapsulate(f)
    assert ei.value.field == "STT version" and ei.value.got == version


def test_edge12_reserved_fields_ignored() -> None:
    r = ok(Decapsulator().decap(stt(0xF0 | C, reserved=0xAA, pad=0xBEEF) + TCP4))
    assert r.vnet == VnetHdr(flags=VnetFlag.DATA_VALID)
    assert bytes(r.inner) == TCP4
    assert (r.header.reserved, r.header.pad, r.header.flags) == (0xAA, 0xBEEF, 0xF1)
    r = ok(Decapsulator().decap(stt(0xF0 | P | V | T, 34, reserved=1, pad=1) + TCP4_PARTIAL))
    assert r.vnet.csum_start == 34


@pytest.mark.parametrize("n", [0, 1, 17, 18, 31])
def test_edge26_frame_shorter_than_32_dropped(n: int) -> None:
    f = (stt() + TCP4)[:n]
    assert Decapsulator().decap(f) is DropReason.FRAME_TOO_SHORT
    with pytest.raises(TruncatedError):
        decapsulate(f)
    assert isinstance(Decapsulator().decap((stt() + TCP4)[:32]), Decapsulated)


def test_edge37_outer_ce_inner_not_ect_dropped() -> None:
    assert Decapsulator().decap(stt() + TCP4, 0x03, True) is DropReason.ECN_CE_NOT_ECT
    v6 = l4_packet(False, True, b"x", partial=False)
    assert Decapsulator().decap(stt() + v6, 0x03, True) is DropReason.ECN_CE_NOT_ECT
    with pytest.raises(DecodeError, match="ECN"):
        decapsulate(stt() + TCP4, tos=3, ce=True)
    # a non-IP inner frame has nothing to mark: delivered
    arp = MACS + b"\x08\x06" + bytes(28)
    assert bytes(ok(Decapsulator().decap(stt() + arp, 3, True)).inner) == arp


@pytest.mark.parametrize("ecn", [1, 2, 3])
def test_ce_marks_ect_inner_ipv4_and_fixes_header_checksum(ecn: int) -> None:
    inner = l4_packet(True, True, b"data", partial=False, tos=0xB8 | ecn)
    d = Decapsulator(dscp_model=DscpModel.PIPE)
    r = ok(d.decap(stt() + inner, 0x02, True))
    out = bytes(r.inner)
    assert out[15] == 0xB8 | 3
    assert naive_sum(out[14:34]) == 0xFFFF
    assert out[:15] == inner[:15] and out[34:] == inner[34:]
    assert d.ce_marked == (0 if ecn == 3 else 1)  # already CE: nothing to change


def test_ce_marks_ect_inner_ipv6() -> None:
    inner = l4_packet(False, True, b"data", partial=False, tos=0xB9)
    r = ok(Decapsulator(dscp_model=DscpModel.PIPE).decap(stt() + inner, 0, True))
    first = struct.unpack_from("!I", r.inner, 14)[0]
    assert (first >> 20) & 0xFF == 0xBB and first >> 28 == 6
    assert bytes(r.inner[18:]) == inner[18:]


def test_dscp_uniform_vs_pipe() -> None:
    inner = l4_packet(True, True, b"data", partial=False, tos=0x01)
    r = ok(Decapsulator(dscp_model=DscpModel.UNIFORM).decap(stt() + inner, 0xB8))
    assert r.inner[15] == 0xB9 and naive_sum(bytes(r.inner[14:34])) == 0xFFFF
    r = ok(Decapsulator(dscp_model=DscpModel.PIPE).decap(stt() + inner, 0xB8))
    assert bytes(r.inner) == inner


def test_decapsulate_defaults_and_memoryview() -> None:
    f = stt(C) + TCP4
    for buf in (f, bytearray(f), memoryview(f)):
        r = decapsulate(buf)
        assert bytes(r.inner) == TCP4 and r.vnet.flags == VnetFlag.DATA_VALID
