"""The golden byte vector of protocol.md §1.6, byte for byte, both directions."""

from __future__ import annotations

from sttun.core.decap import decapsulate
from sttun.core.drops import DropReason
from sttun.core.encap import Encapsulator
from sttun.core.outer import parse_outer, parse_segment
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import TCP_HEADER, SttFlag, SttHeader
from sttun.wire.vnet import VnetFlag, VnetHdr

GOLDEN = bytes.fromhex(
    "45000068123440004006145a0a0000010a000002"
    "c3501d2f00400000000000015018ffff22230000"
    "000100000000000001020304050607080000"
    "020000000002020000000001080045000020000140004011b778c0a80101c0a8010203e807d0000c91f970696e67"
)
INNER = GOLDEN[20 + 20 + 18 :]


def test_golden_vector_encode() -> None:
    enc = Encapsulator(
        ip_bytes("10.0.0.1"),
        ip_bytes("10.0.0.2"),
        0x0102030405060708,
        first_frame_id=1,
        fixed_sport=50000,
        window=0xFFFF,
        first_ip_ident=0x1234,
    )
    packets = enc.encap(INNER, VnetHdr(flags=VnetFlag.DATA_VALID), gso=False)
    assert len(packets) == 1
    assert b"".join(packets[0]) == GOLDEN


def test_golden_vector_decode() -> None:
    outer = parse_outer(GOLDEN)
    assert not isinstance(outer, DropReason)
    src, dst, tos, l4, end = outer
    assert (GOLDEN[0] >> 4, l4, end, GOLDEN[9]) == (4, 20, 104, 6)
    assert (src, dst, tos) == (ip_bytes("10.0.0.1"), ip_bytes("10.0.0.2"), 0)
    sport, dport, seq, ack, doff, flags, window, csum, urgent = TCP_HEADER.unpack_from(GOLDEN, 20)
    assert (sport, dport, seq >> 16, seq & 0xFFFF, ack) == (50000, 7471, 64, 0, 1)
    assert doff >> 4 == 5 and window == 0xFFFF
    assert (flags, csum, urgent) == (0x18, 0x2223, 0)
    assert parse_segment(GOLDEN) == (src, dst, tos, sport, dport, seq, ack, doff, l4, end)
    hdr = SttHeader.unpack(GOLDEN, 40)
    assert hdr == SttHeader(flags=SttFlag.CSUM_VERIFIED, context_id=0x0102030405060708)
    result = decapsulate(GOLDEN[40:])
    assert bytes(result.inner) == INNER
    assert result.vnet == VnetHdr(flags=VnetFlag.DATA_VALID)
