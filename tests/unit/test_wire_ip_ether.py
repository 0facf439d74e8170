"""sttun.wire.ip and sttun.wire.ether: addresses, pseudo-header sums, inner frame layout.

The outer header reader (``sttun.core.outer``) is tested in test_outer_parse.py.
"""

from __future__ import annotations

import struct

import pytest
from tests.packets import build_ipv4, build_ipv6
from tests.reference import naive_sum

from sttun.errors import EncodeError, TruncatedError
from sttun.wire.ether import (
    ETH_P_IP,
    ETH_P_IPV6,
    TPID_8021AD,
    TPID_8021Q,
    TPID_QINQ_OLD,
    VLAN_TPIDS,
    skip_vlan_tags,
)
from sttun.wire.ip import ip_bytes, ip_text, pseudo_sum

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


def test_pseudo_sum_v4_v6() -> None:
    assert pseudo_sum(A4, B4, 6, 1000) == naive_sum(A4 + B4 + bytes([0, 6]) + (1000).to_bytes(2))
    want6 = naive_sum(A6 + B6 + (70000 & 0xFFFF).to_bytes(4) + bytes([0, 0, 0, 17]))
    assert pseudo_sum(A6, B6, 17, 70000 & 0xFFFF) == want6


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
