"""The transmit program's pieces that can be checked without a kernel: the header
template against the Python send path's own headers, the CRC table, the map value
layout, the encodings it adds to the assembler."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from tests.packets import inner_l4_frame

from sttun.core.encap import Encapsulator, flow_source_port
from sttun.io.ebpf import tx_program as txp
from sttun.io.ebpf.asm import R1, R2, Asm
from sttun.io.tx_fastpath import TxTunnel
from sttun.wire.ip import IPPROTO_UDP

V4 = (bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
V6 = (
    bytes.fromhex("20010db8000100000000000000000001"),
    bytes.fromhex("20010db8000100000000000000000002"),
)


def ipv4_udp_frame(payload: bytes) -> bytes:
    return inner_l4_frame(*V4, IPPROTO_UDP, payload, seeded=False)


def ipv6_udp_frame(payload: bytes) -> bytes:
    return inner_l4_frame(*V6, IPPROTO_UDP, payload, seeded=False)


L2_V4 = bytes.fromhex("0200000000020200000000010800")
L2_V6 = bytes.fromhex("02000000000202000000000186dd")


def _zero_per_frame_fields(pkt: bytearray, ipv6: bool) -> None:
    """Zero what the program fills in per frame (see Encapsulator.header_template)."""
    if ipv6:
        pkt[14:18] = b"\x60\0\0\0"  # traffic class (from the inner TOS)
        pkt[18:20] = b"\0\0"  # payload length
        pkt[21] = 0  # hop limit
        tcp = 54
    else:
        pkt[15] = 0  # TOS
        pkt[16:20] = b"\0\0\0\0"  # total length, ID
        pkt[22] = 0  # TTL
        pkt[24:26] = b"\0\0"  # header checksum
        tcp = 34
    pkt[tcp : tcp + 2] = b"\0\0"  # source port
    pkt[tcp + 4 : tcp + 12] = bytes(8)  # SEQ, ACK (frame id)
    pkt[tcp + 16 : tcp + 18] = b"\0\0"  # checksum
    stt = tcp + 20
    pkt[stt + 1 : stt + 8] = bytes(7)  # flags, L4 offset, reserved, MSS, TCI


@pytest.mark.parametrize("ipv6", [False, True])
@pytest.mark.parametrize("df", [False, True])
def test_template_is_the_send_paths_headers_with_per_frame_fields_zero(
    ipv6: bool, df: bool
) -> None:
    if ipv6:
        local, remote = bytes(15) + b"\1", bytes(15) + b"\2"
        frame = ipv6_udp_frame(b"x" * 40)
    else:
        local, remote = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
        frame = ipv4_udp_frame(b"x" * 40)
    enc = Encapsulator(
        local, remote, 0x1122334455667788, dst_port=7472, df=df, l2=L2_V6 if ipv6 else L2_V4
    )
    pkt = enc.encap_gso(frame, 0, 0, 0, 0, 0)
    assert pkt is not None
    headers = bytearray(bytes(pkt[1])[: len(enc.header_template())])
    _zero_per_frame_fields(headers, ipv6)
    assert enc.header_template() == bytes(headers)
    assert len(enc.header_template()) == (txp.HDR_V6 if ipv6 else txp.HDR_V4)


def test_template_needs_the_outer_ethernet_header() -> None:
    enc = Encapsulator(bytes(4), bytes(3) + b"\1", 1)
    with pytest.raises(Exception, match="Ethernet"):
        enc.header_template()


def test_crc_table_gives_zlibs_crc32() -> None:
    table = txp.crc_table_bytes()
    rng = random.Random(7)
    for n in (0, 1, 12, 36, 100):
        data = rng.randbytes(n)
        c = 0xFFFFFFFF
        for b in data:
            i = (c ^ b) & 0xFF
            c = struct.unpack_from("<I", table, 4 * i)[0] ^ (c >> 8)
        assert c ^ 0xFFFFFFFF == zlib.crc32(data)


def test_flow_hash_bytes_the_program_reads() -> None:
    """The program hashes frame[26:38] (IPv4 TCP/UDP, no options) and frame[22:58]
    (IPv6 TCP/UDP); flow_source_port must mean the same bytes."""
    f4 = ipv4_udp_frame(b"abc")
    h = zlib.crc32(f4[26:38])
    assert flow_source_port(f4) == 0x8000 | ((h ^ (h >> 15)) & 0x7FFF)
    f6 = ipv6_udp_frame(b"abc")
    h = zlib.crc32(f6[22:58])
    assert flow_source_port(f6) == 0x8000 | ((h ^ (h >> 15)) & 0x7FFF)


def test_map_value_layout() -> None:
    enc = Encapsulator(bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]), 5, l2=L2_V4, tos=None)
    t = TxTunnel(
        "t", 7, 3, enc.header_template(), enc.outer_tos_table, enc.outer_ttl_table,
        enc.max_single_inner, False, fixed_sport=4242,
        segment_payload=enc.segment_payload, max_gso_inner=enc.max_inner_len,
    )  # fmt: skip
    v = t.value(9)
    assert struct.unpack_from("<H", v, txp.VAL_SEGMENT)[0] == enc.segment_payload == 1460
    assert struct.unpack_from("<I", v, txp.VAL_MAX_GSO_INNER)[0] == enc.max_inner_len
    assert len(v) == txp.TX_VALUE_SIZE
    assert v[: txp.HDR_V4] == enc.header_template()
    ifindex, slot, max_inner, flags = struct.unpack_from("<IIII", v, txp.VAL_IFINDEX)
    assert (ifindex, slot, max_inner) == (3, 9, enc.max_single_inner)
    assert flags == txp.TX_FLAG_ENABLED | txp.TX_FLAG_FIXED_SPORT
    assert struct.unpack_from("<H", v, txp.VAL_SPORT)[0] == 4242
    assert v[txp.VAL_TOS : txp.VAL_TOS + 256] == enc.outer_tos_table
    assert v[txp.VAL_TTL : txp.VAL_TTL + 256] == enc.outer_ttl_table
    # inner CE leaves as ECT(0), the DSCP is inherited (tos=None)
    assert enc.outer_tos_table[0xB8 | 3] == 0xB8 | 2
    # no segment size: the program leaves GSO frames to Python
    plain = TxTunnel(
        "t", 7, 3, enc.header_template(), enc.outer_tos_table, enc.outer_ttl_table,
        enc.max_single_inner, False,
    ).value(0)  # fmt: skip
    assert struct.unpack_from("<H", plain, txp.VAL_SEGMENT)[0] == 0
    with pytest.raises(ValueError, match="template"):
        TxTunnel("t", 7, 3, b"short", bytes(256), bytes(256), 1000, False).value(0)


def test_max_single_inner_fits_one_segment() -> None:
    enc = Encapsulator(bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]), 5, l2=L2_V4)
    frame = ipv4_udp_frame(b"y" * (enc.max_single_inner - 42))
    assert len(frame) == enc.max_single_inner
    pkt = enc.encap_gso(frame, 0, 0, 0, 0, 0)
    assert pkt is not None and enc.segments == 1
    pkt = enc.encap_gso(ipv4_udp_frame(b"y" * (enc.max_single_inner - 41)), 0, 0, 0, 0, 0)
    assert enc.segments == 3  # one byte more: two segments


def test_new_encodings() -> None:
    a = Asm()
    a.atomic_add("dw", R1, 8, R2)  # db: STX | ATOMIC | DW, imm BPF_ADD
    a.be32(R1)  # dc: ALU | END | TO_BE, imm 32
    assert list(struct.iter_unpack("<BBhi", a.assemble())) == [
        (0xDB, 0x21, 8, 0),
        (0xDC, 0x01, 0, 32),
    ]


def test_program_is_deterministic_and_reasons_are_dense() -> None:
    maps = txp.TxMapFds(tunnels=3, reasons=4, tunnel_stats=5, scratch=6, crc_table=7, order=8)
    assert txp.build(maps) == txp.build(maps)
    assert [r.value for r in txp.TxPassReason] == list(range(len(txp.TxPassReason)))
    assert txp.SCRATCH_COUNTER + 8 == txp.SCRATCH_SIZE
    assert txp.HDR_V6 + txp.TX_MAX_INNER + 8 <= txp.SCRATCH_COUNTER
