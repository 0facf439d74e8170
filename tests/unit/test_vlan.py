"""sttun.core.vlan and the VLAN edge cases of protocol.md §11 (#31-#34)."""

from __future__ import annotations

import struct

import pytest

from sttun.core.decap import Decapsulated, Decapsulator
from sttun.core.encap import Encapsulator
from sttun.core.vlan import VlanPolicy, insert_tag, rx_tag_tci, tx_split_tag
from sttun.wire.ether import TPID_8021AD, TPID_8021Q
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import STT_HEADER_LEN, SttHeader
from sttun.wire.vnet import VnetFlag, VnetHdr

MACS = bytes.fromhex("020000000002020000000001")
ARP = MACS + b"\x08\x06" + bytes(28)


def tagged(tpid: int, tci: int, rest: bytes = ARP) -> bytes:
    return rest[:12] + struct.pack("!HH", tpid, tci) + rest[12:]


def test_tx_split_tag_untagged_is_unchanged() -> None:
    tci, out = tx_split_tag(ARP)
    assert tci == 0 and out is ARP
    assert tx_split_tag(ARP[:14]) == (0, ARP[:14])


@pytest.mark.parametrize("tci", [0x0000, 0x0064, 0xB064, 0x1FFF, 0xFFFF])
def test_tx_split_tag_8021q(tci: int) -> None:
    for frame in (tagged(TPID_8021Q, tci), memoryview(tagged(TPID_8021Q, tci))):
        got, out = tx_split_tag(frame)
        assert bytes(out) == ARP
        # V set, DEI (same bit) cannot be carried, PCP and VID kept
        assert got == (tci & 0xEFFF) | 0x1000


@pytest.mark.parametrize("tpid", [TPID_8021AD, 0x9100])
def test_tx_split_tag_other_tpid_stays_in_band(tpid: int) -> None:
    f = tagged(tpid, 0x0123)
    assert tx_split_tag(f) == (0, f)


def test_rx_tag_tci_policies() -> None:
    for policy in VlanPolicy:
        assert rx_tag_tci(0xB064, policy) == 0xA064  # V bit cleared (would be DEI)
        assert rx_tag_tci(0x1000, policy) == 0  # priority tag, VID 0
        assert rx_tag_tci(0, policy) is None
    assert rx_tag_tci(0xA064, VlanPolicy.OVS_LINUX) == 0xA064
    assert rx_tag_tci(0xA064, VlanPolicy.STRICT) is None


def test_insert_tag() -> None:
    assert insert_tag(ARP, 0xA064) == bytearray(tagged(TPID_8021Q, 0xA064))
    assert insert_tag(memoryview(ARP), 0) == bytearray(tagged(TPID_8021Q, 0))


def frame(tci: int, inner: bytes = ARP) -> bytes:
    return SttHeader(flags=0, vlan_tci=tci, context_id=9).pack() + inner


def decap_ok(d: Decapsulator, f: bytes) -> Decapsulated:
    r = d.decap(f)
    assert isinstance(r, Decapsulated), r
    return r


def test_edge31_v_bit_vid100_pcp5_tagged() -> None:
    d = Decapsulator()
    r = decap_ok(d, frame(0xB064))
    assert bytes(r.inner) == tagged(TPID_8021Q, 0xA064)
    vid_pcp = struct.unpack_from("!H", r.inner, 14)[0]
    assert vid_pcp & 0x0FFF == 100 and vid_pcp >> 13 == 5
    assert d.vlan_without_v == 0
    # and the sender produces exactly that header from a tagged frame
    enc = Encapsulator(ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2"), 9, first_frame_id=1)
    pkt = b"".join(enc.encap(tagged(TPID_8021Q, 0xA064), None, gso=False)[0])
    hdr = SttHeader.unpack(pkt, 40)
    assert hdr.vlan_tci == 0xB064 and pkt[40 + STT_HEADER_LEN :] == ARP


def test_edge32_v_bit_vid0_priority_tag_kept() -> None:
    for policy in VlanPolicy:
        r = decap_ok(Decapsulator(vlan_policy=policy), frame(0x1000))
        assert bytes(r.inner) == tagged(TPID_8021Q, 0x0000)
    r = decap_ok(Decapsulator(), frame(0x7000))  # PCP 3, VID 0
    assert bytes(r.inner) == tagged(TPID_8021Q, 0x6000)


def test_edge33_tci_without_v_by_policy_and_counted() -> None:
    d = Decapsulator(vlan_policy=VlanPolicy.OVS_LINUX)
    r = decap_ok(d, frame(0xA064))
    assert bytes(r.inner) == tagged(TPID_8021Q, 0xA064)
    assert d.vlan_without_v == 1
    strict = Decapsulator(vlan_policy=VlanPolicy.STRICT)
    r = decap_ok(strict, frame(0xA064))
    assert bytes(r.inner) == ARP
    assert r.header.vlan_tci == 0xA064  # still visible in the header


def test_edge34_inband_8021ad_with_tci0_delivered_as_is() -> None:
    inner = tagged(TPID_8021AD, 0x0123, tagged(TPID_8021Q, 0x0045))
    r = decap_ok(Decapsulator(), frame(0, inner))
    assert bytes(r.inner) == inner
    # sender side: the 802.1ad tag stays in band, STT TCI 0, flags 0
    enc = Encapsulator(ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2"), 9, first_frame_id=1)
    pkt = b"".join(enc.encap(inner, VnetHdr(flags=VnetFlag.DATA_VALID), gso=False)[0])
    hdr = SttHeader.unpack(pkt, 40)
    assert hdr.vlan_tci == 0 and pkt[40 + STT_HEADER_LEN :] == inner


def test_vlan_shifts_csum_start_only_for_needs_csum() -> None:
    """A re-inserted tag moves csum_start by 4, but only when there is one."""
    tcp = MACS + b"\x08\x00" + bytes(40)
    hdr = SttHeader(flags=0x0E, l4_offset=34, mss=1448, vlan_tci=0x1005, context_id=1)
    r = decap_ok(Decapsulator(), hdr.pack() + tcp)
    assert (r.vnet.csum_start, r.vnet.hdr_len) == (38, 58)
    r = decap_ok(Decapsulator(), SttHeader(flags=0x01, vlan_tci=0x1005).pack() + tcp)
    assert r.vnet == VnetHdr(flags=VnetFlag.DATA_VALID)
