"""sttun.wire.ip and sttun.wire.ether: outer IP parsing/building, inner frame layout."""

from __future__ import annotations

import struct

import pytest
from tests.reference import naive_sum

from sttun.errors import DecodeError, EncodeError, TruncatedError
from sttun.wire.ether import (
    ETH_P_IP,
    ETH_P_IPV6,
    TPID_8021AD,
    TPID_8021Q,
    TPID_QINQ_OLD,
    VLAN_TPIDS,
    skip_vlan_tags,
)
from sttun.wire.ip import (
    IPPROTO_TCP,
    build_ipv4,
    build_ipv6,
    ip_bytes,
    ip_text,
    parse_ip,
    pseudo_sum,
)

MACS = bytes.fromhex("020000000002020000000001")
A4, B4 = ip_bytes("192.0.2.1"), ip_bytes("192.0.2.2")
A6, B6 = ip_bytes("2001:db8:1::1"), ip_bytes("2001:db8:1::2")


def test_ip_bytes_and_text() -> None:
    assert ip_bytes("198.18.0.1") == bytes([198, 18, 0, 1])
    assert ip_bytes(b"\x01\x02\x03\x04") == b"\x01\x02\x03\x04"
    assert len(ip_bytes("2001:db8:0:1::1")) == 16
    assert ip_text(A4) == "192.0.2.1" and ip_text(A6) == "2001:db8:1::1"
    with pytest.raises(EncodeError):
        ip_bytes("not an address")
    with pytest.raises(EncodeError):
        ip_bytes(b"\x01\x02\x03")


def test_build_ipv4_header() -> None:
    h = build_ipv4(A4, B4, 100, tos=0xB8, ttl=7, ident=0x1234)
    assert len(h) == 20 and h[0] == 0x45 and h[1] == 0xB8
    assert struct.unpack_from("!H", h, 2)[0] == 120
    assert struct.unpack_from("!H", h, 6)[0] == 0x4000  # DF
    assert h[8] == 7 and h[9] == IPPROTO_TCP
    assert naive_sum(h) == 0xFFFF  # header checksum valid
    assert struct.unpack_from("!H", build_ipv4(A4, B4, 0, df=False), 6)[0] == 0
    with pytest.raises(EncodeError):
        build_ipv4(A4, B4, 65516)


def test_build_ipv6_header() -> None:
    h = build_ipv6(A6, B6, 300, tclass=0xB9, hop_limit=9, flow_label=0xABCDE)
    assert len(h) == 40
    first = struct.unpack_from("!I", h)[0]
    assert first >> 28 == 6 and (first >> 20) & 0xFF == 0xB9 and first & 0xFFFFF == 0xABCDE
    assert struct.unpack_from("!H", h, 4)[0] == 300 and h[6] == 6 and h[7] == 9
    with pytest.raises(EncodeError):
        build_ipv6(A6, B6, 65536)


def test_pseudo_sum_v4_v6() -> None:
    assert pseudo_sum(A4, B4, 6, 1000) == naive_sum(A4 + B4 + bytes([0, 6]) + (1000).to_bytes(2))
    want6 = naive_sum(A6 + B6 + (70000 & 0xFFFF).to_bytes(4) + bytes([0, 0, 0, 17]))
    assert pseudo_sum(A6, B6, 17, 70000 & 0xFFFF) == want6


def test_parse_ipv4() -> None:
    pkt = build_ipv4(A4, B4, 30, tos=0x03, ttl=5) + bytes(30) + b"pad"
    info = parse_ip(pkt)
    assert info == (4, 20, 50, 6, A4, B4, 0x03, 5, False)
    assert parse_ip(b"zz" + pkt, 2).total_len == 50


def test_parse_ipv4_options_and_fragments() -> None:
    h = bytearray(build_ipv4(A4, B4, 8))
    h[0] = 0x46
    struct.pack_into("!H", h, 2, 32)
    pkt = bytes(h) + bytes(12)
    assert parse_ip(pkt).header_len == 24
    for frag in (0x2000, 0x0001, 0x4000):
        h2 = bytearray(build_ipv4(A4, B4, 8))
        struct.pack_into("!H", h2, 6, frag)
        assert parse_ip(bytes(h2) + bytes(8)).is_fragment == (frag != 0x4000)


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda b: b.__setitem__(0, 0x44), "IPv4 header length"),
        (lambda b: struct.pack_into("!H", b, 2, 19), "IPv4 total length"),
        (lambda b: struct.pack_into("!H", b, 2, 500), "IPv4 total length"),
        (lambda b: b.__setitem__(0, 0x55), "IP version"),
    ],
)
def test_parse_ipv4_errors(mutate: object, field: str) -> None:
    b = bytearray(build_ipv4(A4, B4, 8) + bytes(8))
    mutate(b)  # type: ignore[operator]
    with pytest.raises(DecodeError) as ei:
        parse_ip(bytes(b))
    assert ei.value.field == field


def test_parse_ip_truncated() -> None:
    with pytest.raises(TruncatedError):
        parse_ip(b"")
    with pytest.raises(TruncatedError):
        parse_ip(b"\x45" + bytes(10))
    with pytest.raises(TruncatedError):
        parse_ip(b"\x60" + bytes(30))


def test_parse_ipv6_and_extension_headers() -> None:
    payload = bytes(20)
    pkt = build_ipv6(A6, B6, len(payload), tclass=0x0B, hop_limit=3) + payload
    info = parse_ip(pkt)
    assert info == (6, 40, 60, 6, A6, B6, 0x0B, 3, False)
    # hop-by-hop (8 bytes) then fragment header then TCP
    hbh = bytes([44, 0]) + bytes(6)
    frag = bytes([6, 0]) + bytes(6)
    body = hbh + frag + payload
    info = parse_ip(build_ipv6(A6, B6, len(body), next_header=0) + body)
    assert (info.header_len, info.proto, info.is_fragment) == (56, 6, True)
    # an extension header claiming more than there is
    bad = bytes([6, 5]) + bytes(6)
    with pytest.raises(TruncatedError):
        parse_ip(build_ipv6(A6, B6, len(bad), next_header=60) + bad)
    with pytest.raises(DecodeError):
        parse_ip(build_ipv6(A6, B6, 100) + bytes(10))


def eth(etype: int, body: bytes, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    t = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in tags)
    return MACS + t + struct.pack("!H", etype) + body


def test_skip_vlan_tags_untagged_and_tagged() -> None:
    ip4 = build_ipv4(A4, B4, 20) + bytes(20)
    assert skip_vlan_tags(eth(ETH_P_IP, ip4)) == (ETH_P_IP, 14)
    assert skip_vlan_tags(eth(0x0806, bytes(28))) == (0x0806, 14)
    one = eth(ETH_P_IPV6, build_ipv6(A6, B6, 20) + bytes(20), ((TPID_8021Q, 0xB064),))
    assert skip_vlan_tags(one) == (ETH_P_IPV6, 18)
    assert skip_vlan_tags(memoryview(one)) == (ETH_P_IPV6, 18)
    qinq = eth(ETH_P_IP, ip4, ((TPID_8021AD, 5), (TPID_8021Q, 6)))
    assert skip_vlan_tags(qinq) == (ETH_P_IP, 22)
    old = eth(ETH_P_IP, ip4, ((TPID_QINQ_OLD, 5), (TPID_8021Q, 6)))
    assert skip_vlan_tags(old) == (ETH_P_IP, 22)


def test_vlan_tpid_set() -> None:
    """802.1Q and 802.1ad (Linux ``eth_type_vlan``) and the old QinQ type (Wireshark)."""
    assert {0x8100, 0x88A8, 0x9100} == VLAN_TPIDS
    for tpid in (0x9200, 0x9300, 0x8847, 0x0806):  # not tags: the type is the payload's
        assert skip_vlan_tags(eth(tpid, bytes(30), ((TPID_8021Q, 1),))) == (tpid, 18)


def test_skip_vlan_tags_other_layouts() -> None:
    """Linux cooked captures: the protocol field and the payload elsewhere."""
    sll = bytes(14) + struct.pack("!HHH", TPID_8021Q, 7, ETH_P_IP) + bytes(20)
    assert skip_vlan_tags(sll, 14, 16) == (ETH_P_IP, 20)
    sll2 = struct.pack("!H", ETH_P_IPV6) + bytes(18) + bytes(40)
    assert skip_vlan_tags(sll2, 0, 20) == (ETH_P_IPV6, 20)


def test_skip_vlan_tags_truncated() -> None:
    with pytest.raises(TruncatedError, match="Ethernet header"):
        skip_vlan_tags(bytes(13))
    with pytest.raises(TruncatedError, match="VLAN tag"):
        skip_vlan_tags(MACS + b"\x81\x00\x00")
    assert skip_vlan_tags(MACS + bytes.fromhex("810000010800")) == (ETH_P_IP, 18)
    with pytest.raises(TruncatedError, match="VLAN tag"):
        skip_vlan_tags(MACS + bytes.fromhex("8100000188a80002"))
