"""The golden byte vector of protocol.md §1.6, byte for byte, both directions."""

from __future__ import annotations

from sttun.core.decap import decapsulate
from sttun.core.encap import Encapsulator
from sttun.wire.ip import ip_bytes, parse_ip
from sttun.wire.stt import SttFlag, SttHeader, TcpLikeHeader
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
    ip = parse_ip(GOLDEN)
    assert (ip.version, ip.header_len, ip.total_len, ip.proto) == (4, 20, 104, 6)
    tcp = TcpLikeHeader.unpack(GOLDEN, 20)
    assert (tcp.sport, tcp.dport, tcp.frame_len, tcp.offset, tcp.frame_id) == (
        50000,
        7471,
        64,
        0,
        1,
    )
    assert tcp.data_offset == 5 and tcp.window == 0xFFFF
    hdr = SttHeader.unpack(GOLDEN, 40)
    assert hdr == SttHeader(flags=SttFlag.CSUM_VERIFIED, context_id=0x0102030405060708)
    result = decapsulate(GOLDEN[40:])
    assert bytes(result.inner) == INNER
    assert result.vnet == VnetHdr(flags=VnetFlag.DATA_VALID)
