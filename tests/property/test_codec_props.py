"""Hypothesis properties of the wire codecs and the outer reader: round trips, and only
typed errors or drop reasons."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.packets import build_ipv4, build_ipv6, pack_tcp

from sttun.core.decap import decapsulate
from sttun.core.drops import DropReason
from sttun.core.outer import parse_outer, parse_segment
from sttun.errors import DecodeError, EncodeError, SttError
from sttun.wire.ether import skip_vlan_tags
from sttun.wire.ip import IPV6_EXT_HEADERS, IPV6_FRAGMENT, ip_bytes
from sttun.wire.stt import SttHeader
from sttun.wire.vnet import VnetHdr

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)

headers = st.builds(
    SttHeader,
    version=u8,
    flags=u8,
    l4_offset=u8,
    reserved=u8,
    mss=u16,
    vlan_tci=u16,
    context_id=u64,
    pad=u16,
)


@given(headers, st.binary(max_size=8), st.binary(max_size=8))
def test_stt_header_roundtrip(h: SttHeader, before: bytes, after: bytes) -> None:
    raw = h.pack()
    assert len(raw) == 18
    assert SttHeader.unpack(raw) == h
    buf = bytearray(before + bytes(18) + after)
    h.pack_into(buf, len(before))
    assert SttHeader.unpack(memoryview(buf), len(before)) == h
    assert bytes(buf[: len(before)]) == before and bytes(buf[len(before) + 18 :]) == after
    assert h.vlan_id == h.vlan_tci & 0xFFF and h.pcp == h.vlan_tci >> 13
    assert h.vlan_present == bool(h.vlan_tci & 0x1000)


@given(st.binary(min_size=18, max_size=18))
def test_stt_header_bytes_roundtrip(raw: bytes) -> None:
    assert SttHeader.unpack(raw).pack() == raw


A4, B4 = ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2")
A6, B6 = ip_bytes("2001:db8:0:1::1"), ip_bytes("2001:db8:0:1::2")

tcp_fields = st.tuples(u16, u16, u16, u16, u32, u8, st.integers(0, 15), u16, u16, u16)


@given(tcp_fields, st.booleans(), st.binary(max_size=8))
def test_tcp_like_fields_read_back(t: tuple[int, ...], v6: bool, payload: bytes) -> None:
    """What the tests' builder writes, parse_segment reads back (IPv4 fast path, IPv6)."""
    sport, dport, frame_len, offset, frame_id, flags, doff, window, csum, urgent = t
    tcp = pack_tcp(
        sport,
        dport,
        frame_len,
        offset,
        frame_id,
        flags,
        window=window,
        checksum=csum,
        data_offset=doff,
        urgent=urgent,
    )
    assert len(tcp) == 20
    n = len(tcp) + len(payload)
    ip = build_ipv6(A6, B6, n) if v6 else build_ipv4(A4, B4, n)
    seg = parse_segment(ip + tcp + payload)
    assert not isinstance(seg, DropReason)
    _src, _dst, _tos, got_sport, got_dport, seq, ack, got_doff, l4, end = seg
    assert (got_sport, got_dport, ack, got_doff >> 4) == (sport, dport, frame_id, doff)
    assert (seq >> 16, seq & 0xFFFF) == (frame_len, offset)
    assert int.from_bytes(tcp[4:8], "big") == seq
    assert (l4, end) == (len(ip), len(ip) + n)


@given(st.binary(min_size=20, max_size=20), st.booleans())
def test_tcp_like_bytes_read_back(raw: bytes, v6: bool) -> None:
    """Any 20 header bytes: ports, SEQ, ACK and the data-offset byte come back as sent."""
    ip = build_ipv6(A6, B6, 20) if v6 else build_ipv4(A4, B4, 20)
    seg = parse_segment(ip + raw)
    assert not isinstance(seg, DropReason)
    assert seg[3:8] == struct.unpack("!HHIIB", raw[:13])


@given(st.binary(max_size=40), st.integers(0, 45))
def test_decoders_raise_only_typed_errors(data: bytes, offset: int) -> None:
    for decode in (SttHeader.unpack, VnetHdr.unpack):
        try:
            decode(data, offset)
        except SttError as exc:
            assert isinstance(exc, DecodeError)


@given(st.lists(st.integers(-(1 << 66), 1 << 66), min_size=8, max_size=8))
def test_encoders_raise_only_encode_error(v: list[int]) -> None:
    with contextlib.suppress(EncodeError):
        SttHeader(*v).pack()


def ip_like() -> st.SearchStrategy[bytes]:
    """Random bytes, often with a plausible first byte so the parser goes deep."""
    first = st.sampled_from([0x45, 0x46, 0x4F, 0x44, 0x60, 0x6F, 0x00, 0x50])
    return st.tuples(first, st.binary(max_size=120)).map(lambda t: bytes([t[0]]) + t[1])


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=100), ip_like()), st.integers(0, 10))
def test_outer_readers_return_fields_or_a_reason(data: bytes, offset: int) -> None:
    """parse_outer and parse_segment never raise, and agree."""
    res = parse_outer(data, offset)
    seg = parse_segment(data, offset)
    if isinstance(res, DropReason):
        assert seg is res
        return
    src, dst, _tos, l4, end = res
    assert data[offset] >> 4 in (4, 6) and len(src) == len(dst) in (4, 16)
    assert offset + 20 <= l4 and l4 + 20 <= end <= len(data)
    assert not isinstance(seg, DropReason) and seg[:3] == res[:3] and seg[8:] == res[3:]


@given(st.sampled_from(sorted(IPV6_EXT_HEADERS | {IPV6_FRAGMENT})), st.binary(max_size=40))
def test_ipv6_extension_chains_not_followed(nh: int, exts: bytes) -> None:
    """An IPv6 header whose next header is an extension, then random chains: refused."""
    data = bytes([0x60, 0, 0, 0]) + len(exts).to_bytes(2) + bytes([nh, 64]) + bytes(32) + exts
    assert parse_outer(data) is DropReason.OUTER_NOT_TCP
    assert parse_segment(data) is DropReason.OUTER_NOT_TCP


def frame_like() -> st.SearchStrategy[bytes]:
    etype = st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xa8", b"\x08\x06"])
    return st.tuples(st.binary(min_size=12, max_size=12), etype, st.binary(max_size=120)).map(
        lambda t: t[0] + t[1] + t[2]
    )


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=80), frame_like()))
def test_skip_vlan_tags_raises_only_decode_errors(data: bytes) -> None:
    try:
        etype, l3 = skip_vlan_tags(data)
    except DecodeError:
        return
    assert 14 <= l3 <= len(data) and (l3 - 14) % 4 == 0
    assert etype == int.from_bytes(data[l3 - 2 : l3], "big")


@settings(max_examples=300)
@given(st.binary(max_size=120), st.integers(0, 255), st.booleans())
def test_decapsulate_raises_only_decode_errors(data: bytes, tos: int, ce: bool) -> None:
    try:
        r = decapsulate(data, tos=tos, ce=ce)
    except DecodeError:
        return
    assert len(r.inner) >= 14
