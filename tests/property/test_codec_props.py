"""Hypothesis properties of the wire codecs: round trips, and only typed errors."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from sttun.core.decap import decapsulate
from sttun.errors import DecodeError, EncodeError, SttError
from sttun.wire.ether import skip_vlan_tags
from sttun.wire.ip import parse_ip
from sttun.wire.stt import SttHeader, TcpLikeHeader, pack_tcp
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


tcp_headers = st.builds(
    TcpLikeHeader,
    sport=u16,
    dport=u16,
    frame_len=u16,
    offset=u16,
    frame_id=u32,
    data_offset=st.integers(0, 15),
    flags=u8,
    window=u16,
    checksum=u16,
    urgent=u16,
)


@given(tcp_headers)
def test_tcp_like_roundtrip(t: TcpLikeHeader) -> None:
    raw = t.pack()
    assert len(raw) == 20
    assert TcpLikeHeader.unpack(raw) == t
    assert int.from_bytes(raw[4:8], "big") == t.seq


@given(st.binary(min_size=20, max_size=20))
def test_tcp_like_bytes_roundtrip_except_reserved_bits(raw: bytes) -> None:
    # the low nibble of byte 12 (reserved / NS) is not modelled
    back = TcpLikeHeader.unpack(raw).pack()
    assert back[:12] == raw[:12] and back[13:] == raw[13:] and back[12] == raw[12] & 0xF0


@given(st.binary(max_size=40), st.integers(0, 45))
def test_decoders_raise_only_typed_errors(data: bytes, offset: int) -> None:
    for decode in (SttHeader.unpack, TcpLikeHeader.unpack, VnetHdr.unpack):
        try:
            decode(data, offset)
        except SttError as exc:
            assert isinstance(exc, DecodeError)


@given(st.lists(st.integers(-(1 << 66), 1 << 66), min_size=10, max_size=10))
def test_encoders_raise_only_encode_error(v: list[int]) -> None:
    with contextlib.suppress(EncodeError):
        SttHeader(*v[:8]).pack()
    with contextlib.suppress(EncodeError):
        pack_tcp(*v[:5], v[5], window=v[6], checksum=v[7], data_offset=v[8], urgent=v[9])


def ip_like() -> st.SearchStrategy[bytes]:
    """Random bytes, often with a plausible first byte so the parser goes deep."""
    first = st.sampled_from([0x45, 0x46, 0x4F, 0x44, 0x60, 0x6F, 0x00, 0x50])
    return st.tuples(first, st.binary(max_size=120)).map(lambda t: bytes([t[0]]) + t[1])


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=100), ip_like()), st.integers(0, 10))
def test_parse_ip_raises_only_decode_errors(data: bytes, offset: int) -> None:
    try:
        info = parse_ip(data, offset)
    except DecodeError:
        return
    assert info.version in (4, 6)
    assert info.header_len <= info.total_len <= len(data) - offset


@given(st.binary(min_size=6, max_size=30), st.binary(max_size=40))
def test_parse_ipv6_extension_chains(hdr_tail: bytes, exts: bytes) -> None:
    # an IPv6 header whose next header is an extension, followed by random chains
    plen = len(exts)
    data = bytes([0x60, 0, 0, 0]) + plen.to_bytes(2) + bytes([0, 64]) + bytes(32) + exts
    try:
        info = parse_ip(data)
    except DecodeError:
        return
    assert info.header_len <= info.total_len


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
