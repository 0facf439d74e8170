"""sttun.core.outer's readers of a received outer packet: parse_outer and parse_segment.

Every packet is read by both: :func:`read` checks that parse_segment (one ``struct``
call for IPv4 without options) says what parse_outer says, and that the TCP-like
fields it returns are the header's.  The packets come from the tests' builders
(tests/packets.py), whose output is checked here too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from tests.packets import build_ipv4, build_ipv6, pack_tcp
from tests.reference import naive_sum

from sttun.core.drops import DropReason
from sttun.core.outer import OuterFields, parse_outer, parse_segment
from sttun.wire.ip import IPPROTO_TCP, IPPROTO_UDP, ip_bytes
from sttun.wire.stt import TCP_HEADER, TcpFlag

A4, B4 = ip_bytes("192.0.2.1"), ip_bytes("192.0.2.2")
A6, B6 = ip_bytes("2001:db8:1::1"), ip_bytes("2001:db8:1::2")
D = DropReason


def read(pkt: bytes, offset: int = 0) -> OuterFields | DropReason:
    """parse_outer's answer, once parse_segment is seen to agree with it."""
    res = parse_outer(pkt, offset)
    seg = parse_segment(pkt, offset)
    if isinstance(res, DropReason):
        assert seg is res
        return res
    assert not isinstance(seg, DropReason)
    src, dst, tos, l4, end = res
    assert seg[:3] == (src, dst, tos) and seg[8:] == (l4, end)
    assert seg[3:8] == TCP_HEADER.unpack_from(pkt, l4)[:5]
    return res


def test_built_ipv4_header() -> None:
    h = build_ipv4(A4, B4, 100, tos=0xB8, ttl=7, ident=0x1234)
    assert len(h) == 20 and h[0] == 0x45 and h[1] == 0xB8
    assert struct.unpack_from("!H", h, 2)[0] == 120
    assert struct.unpack_from("!H", h, 6)[0] == 0x4000  # DF
    assert h[8] == 7 and h[9] == IPPROTO_TCP
    assert naive_sum(h) == 0xFFFF  # header checksum valid
    assert read(h + bytes(100)) == (A4, B4, 0xB8, 20, 120)
    assert struct.unpack_from("!H", build_ipv4(A4, B4, 0, df=False), 6)[0] == 0
    with pytest.raises(ValueError):
        build_ipv4(A4, B4, 65516)


def test_built_ipv6_header() -> None:
    h = build_ipv6(A6, B6, 300, tclass=0xB9, hop_limit=9, flow_label=0xABCDE)
    assert len(h) == 40
    first = struct.unpack_from("!I", h)[0]
    assert first >> 28 == 6 and (first >> 20) & 0xFF == 0xB9 and first & 0xFFFFF == 0xABCDE
    assert struct.unpack_from("!H", h, 4)[0] == 300 and h[6] == 6 and h[7] == 9
    assert read(h + bytes(300)) == (A6, B6, 0xB9, 40, 340)
    with pytest.raises(ValueError):
        build_ipv6(A6, B6, 65536)


def test_ipv4() -> None:
    pkt = build_ipv4(A4, B4, 30, tos=0x03, ttl=5) + bytes(30) + b"pad"
    assert read(pkt) == (A4, B4, 0x03, 20, 50)  # Ethernet padding after the packet
    assert read(b"zz" + pkt, 2) == (A4, B4, 0x03, 22, 52)


def test_ipv4_options_and_fragments() -> None:
    h = bytearray(build_ipv4(A4, B4, 24))
    h[0] = 0x46  # 4 bytes of options
    assert read(bytes(h) + bytes(24)) == (A4, B4, 0, 24, 44)
    for frag in (0x2000, 0x0001, 0x4000, 0x0000):  # MF, an offset, DF, nothing
        h2 = bytearray(build_ipv4(A4, B4, 20))
        struct.pack_into("!H", h2, 6, frag)
        want = D.OUTER_FRAGMENT if frag & 0x3FFF else (A4, B4, 0, 20, 40)
        assert read(bytes(h2) + bytes(20)) == want


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda b: b.__setitem__(0, 0x44), D.OUTER_BAD_IP),  # IHL 16
        (lambda b: struct.pack_into("!H", b, 2, 19), D.OUTER_BAD_IP),  # total < IHL
        (lambda b: struct.pack_into("!H", b, 2, 500), D.OUTER_TRUNCATED),  # total > buffer
        (lambda b: b.__setitem__(0, 0x55), D.OUTER_BAD_IP),  # version 5
        (lambda b: b.__setitem__(9, IPPROTO_UDP), D.OUTER_NOT_TCP),
        (lambda b: struct.pack_into("!H", b, 2, 39), D.OUTER_TRUNCATED),  # no TCP room
    ],
)
def test_ipv4_errors(mutate: Callable[[bytearray], None], reason: DropReason) -> None:
    b = bytearray(build_ipv4(A4, B4, 20) + bytes(20))
    assert read(bytes(b)) == (A4, B4, 0, 20, 40)
    mutate(b)
    assert read(bytes(b)) is reason


def test_truncated() -> None:
    assert read(b"") is D.OUTER_TRUNCATED
    assert read(b"\x45" + bytes(10)) is D.OUTER_TRUNCATED
    assert read(b"\x60" + bytes(30)) is D.OUTER_TRUNCATED
    assert read(b"zz", 2) is D.OUTER_TRUNCATED
    # a whole IP packet with 19 bytes where the TCP-like header goes
    assert read(build_ipv4(A4, B4, 19) + bytes(19)) is D.OUTER_TRUNCATED
    assert read(build_ipv6(A6, B6, 19) + bytes(19)) is D.OUTER_TRUNCATED


def test_ipv6_and_extension_headers() -> None:
    payload = bytes(20)
    pkt = build_ipv6(A6, B6, len(payload), tclass=0x0B, hop_limit=3) + payload
    assert read(pkt) == (A6, B6, 0x0B, 40, 60)
    # Extension headers are not followed (STT senders use none): hop-by-hop, then a
    # fragment header, then TCP; and one claiming more than there is.
    hbh = bytes([44, 0]) + bytes(6)
    frag = bytes([6, 0]) + bytes(6)
    body = hbh + frag + payload
    assert read(build_ipv6(A6, B6, len(body), next_header=0) + body) is D.OUTER_NOT_TCP
    bad = bytes([6, 5]) + bytes(6)
    assert read(build_ipv6(A6, B6, len(bad), next_header=60) + bad) is D.OUTER_NOT_TCP
    assert read(build_ipv6(A6, B6, 100) + bytes(10)) is D.OUTER_TRUNCATED


@pytest.mark.parametrize("v6", [False, True])
def test_tcp_like_fields(v6: bool) -> None:
    """SEQ carries frame length and offset, ACK the frame id; nothing is judged here."""
    tcp = pack_tcp(1, 2, 0xFFFF, 0xFFEE, 0xFFFFFFFF, TcpFlag.ACK, data_offset=15)
    ip = build_ipv6(A6, B6, 20) if v6 else build_ipv4(A4, B4, 20)
    seg = parse_segment(ip + tcp)
    assert not isinstance(seg, DropReason)
    _src, _dst, _tos, sport, dport, seq, ack, doff, l4, end = seg
    assert (sport, dport, ack, doff >> 4) == (1, 2, 0xFFFFFFFF, 15)
    assert (seq, seq >> 16, seq & 0xFFFF) == (0xFFFFFFEE, 0xFFFF, 0xFFEE)
    assert end - l4 == 20
    with pytest.raises(ValueError):
        pack_tcp(1, 2, 0x10000, 0, 0)
