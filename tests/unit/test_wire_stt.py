"""sttun.wire.stt and sttun.wire.vnet: layouts, flag masks, range checks, errors."""

from __future__ import annotations

import struct

import pytest
from tests.packets import pack_tcp

from sttun.errors import EncodeError, TruncatedError
from sttun.wire.stt import (
    FLAGS_RESERVED_MASK,
    MAX_INNER_LEN,
    MIN_FRAME_LEN,
    STT_HEADER_LEN,
    STT_PORT,
    TCP_HEADER,
    TCP_HEADER_LEN,
    SttFlag,
    SttHeader,
)
from sttun.wire.vnet import VNET_HDR_LEN, VNET_NONE, GsoType, VnetFlag, VnetHdr


def test_constants() -> None:
    assert STT_PORT == 7471
    assert STT_HEADER_LEN == 18
    assert TCP_HEADER_LEN == 20
    assert MIN_FRAME_LEN == 32
    assert MAX_INNER_LEN == 65517
    assert FLAGS_RESERVED_MASK == 0xF0


def test_flag_masks_are_lsb_first() -> None:
    # protocol.md §1.4: C=0x01, P=0x02, V=0x04, T=0x08 (not the draft's MSB reading)
    assert [int(f) for f in SttFlag] == [0x01, 0x02, 0x04, 0x08]
    assert SttFlag.CSUM_VERIFIED == 1 and SttFlag.TCP == 8


def test_header_layout_byte_by_byte() -> None:
    h = SttHeader(
        version=0,
        flags=0x0E,
        l4_offset=34,
        reserved=0xAB,
        mss=1448,
        vlan_tci=0xB064,
        context_id=0x0102030405060708,
        pad=0xBEEF,
    )
    raw = h.pack()
    assert raw == bytes.fromhex("000e22ab05a8b0640102030405060708beef")
    assert SttHeader.unpack(raw) == h
    assert h.vlan_present and h.vlan_id == 100 and h.pcp == 5
    assert h.csum_partial and not h.csum_verified


def test_header_pack_into_offset_and_unpack_offset() -> None:
    buf = bytearray(40)
    h = SttHeader.build(7, flags=SttFlag.CSUM_VERIFIED)
    h.pack_into(buf, 5)
    assert bytes(buf[:5]) == bytes(5)
    assert SttHeader.unpack(buf, 5) == h
    assert SttHeader.unpack(memoryview(bytes(buf)), 5) == h


@pytest.mark.parametrize(
    "field,value",
    [
        ("version", 256),
        ("flags", -1),
        ("l4_offset", 256),
        ("reserved", 300),
        ("mss", 1 << 16),
        ("vlan_tci", 1 << 16),
        ("context_id", 1 << 64),
        ("context_id", -1),
        ("pad", 1 << 16),
    ],
)
def test_header_out_of_range_raises_encode_error(field: str, value: int) -> None:
    h = SttHeader(**{field: value})
    with pytest.raises(EncodeError, match="out of range"):
        h.pack()


@pytest.mark.parametrize("n", [0, 1, 17])
def test_header_truncated(n: int) -> None:
    with pytest.raises(TruncatedError) as ei:
        SttHeader.unpack(bytes(n))
    assert ei.value.need == 18 and ei.value.have == n
    assert "STT header" in str(ei.value)


def test_header_unpack_offset_past_end() -> None:
    with pytest.raises(TruncatedError) as ei:
        SttHeader.unpack(bytes(18), 30)
    assert ei.value.have == 0


def test_build_vlan() -> None:
    assert SttHeader.build(1).vlan_tci == 0
    assert SttHeader.build(1, vlan_id=0).vlan_tci == 0x1000  # priority tag keeps V (#32)
    assert SttHeader.build(1, vlan_id=100, pcp=5).vlan_tci == 0xB064  # #31
    assert SttHeader.build(1, vlan_id=4095, pcp=7).vlan_tci == 0xFFFF
    with pytest.raises(EncodeError, match="vlan_id"):
        SttHeader.build(1, vlan_id=4096)
    with pytest.raises(EncodeError, match="pcp"):
        SttHeader.build(1, vlan_id=1, pcp=8)


# The version check is the decapsulator's: test_decap.py::test_edge11_version_nonzero_dropped.
# The reader of the TCP-like header in a received packet is sttun.core.outer.parse_segment
# (test_outer_parse.py); here its layout, with the tests' builder.


def test_tcp_like_layout() -> None:
    raw = pack_tcp(50000, 7471, 64, 0, 1, window=0xFFFF, checksum=0x2223)
    assert raw == bytes.fromhex("c3501d2f00400000000000015018ffff22230000")
    assert TCP_HEADER.size == TCP_HEADER_LEN
    fields = TCP_HEADER.unpack(raw)
    assert fields == (50000, 7471, 0x00400000, 1, 0x50, 0x18, 0xFFFF, 0x2223, 0)
    assert TCP_HEADER.pack(*fields) == raw


def test_vnet_roundtrip_and_layout() -> None:
    v = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16)
    raw = v.pack()
    assert len(raw) == VNET_HDR_LEN == 10
    assert raw == struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)  # host (little) endian
    assert VnetHdr.unpack(raw) == v
    assert VnetHdr.unpack(b"xx" + raw, 2) == v
    assert VnetHdr.unpack(VNET_NONE) == VnetHdr()
    with pytest.raises(TruncatedError):
        VnetHdr.unpack(raw[:9])
    assert (int(GsoType.TCPV4), int(GsoType.UDP), int(GsoType.TCPV6)) == (1, 3, 4)
