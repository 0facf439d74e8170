"""sttun.core.offload: the TX/RX offload tables, iterated rather than hard-coded."""

from __future__ import annotations

import itertools

import pytest

from sttun.core.drops import DropReason
from sttun.core.offload import (
    CSUM_OFFSET_BY_L4,
    L4_BY_CSUM_OFFSET,
    MAX_L4_OFFSET,
    MAX_OFFLOAD_INNER_LEN,
    RX_OFFLOAD_MAP,
    TX_GSO_FOR_L3,
    TX_GSO_WHITELIST,
    TX_NONE,
    TX_OFFLOAD_MEMO,
    TX_VERIFIED,
    SoftwareReason,
    TxOffload,
    rx_vnet,
    tx_offload,
    tx_offload_fields,
)
from sttun.wire.ether import ETH_P_IP, ETH_P_IPV6
from sttun.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from sttun.wire.stt import SttFlag
from sttun.wire.vnet import GSO_ECN, GsoType, VnetFlag, VnetHdr

P, C, V, T = (
    int(f) for f in (SttFlag.CSUM_PARTIAL, SttFlag.CSUM_VERIFIED, SttFlag.IPV4, SttFlag.TCP)
)
L4_HLEN = {IPPROTO_TCP: 20, IPPROTO_UDP: 8}
L3_MIN = {ETH_P_IP: 34, ETH_P_IPV6: 54}


def stt_flags(ipv4: bool, tcp: bool) -> int:
    return P | (V if ipv4 else 0) | (T if tcp else 0)


def test_tables_are_consistent() -> None:
    assert CSUM_OFFSET_BY_L4 == {IPPROTO_TCP: 16, IPPROTO_UDP: 6}
    assert {v: k for k, v in L4_BY_CSUM_OFFSET.items()} == CSUM_OFFSET_BY_L4
    assert MAX_OFFLOAD_INNER_LEN == 65477 and MAX_L4_OFFSET == 255
    assert set(TX_GSO_FOR_L3) == {ETH_P_IP, ETH_P_IPV6}
    assert set(TX_GSO_FOR_L3.values()) <= TX_GSO_WHITELIST
    assert GsoType.UDP not in TX_GSO_WHITELIST  # UFO is gone from current kernels
    assert set(RX_OFFLOAD_MAP) == set(itertools.product((True, False), repeat=2))
    for (ipv4, tcp), row in RX_OFFLOAD_MAP.items():
        l4 = IPPROTO_TCP if tcp else IPPROTO_UDP
        assert row.csum_offset == CSUM_OFFSET_BY_L4[l4]
        assert row.l4_header_len == L4_HLEN[l4]
        assert row.min_l4_offset == L3_MIN[ETH_P_IP if ipv4 else ETH_P_IPV6]
        if tcp:
            assert row.gso_type == TX_GSO_FOR_L3[ETH_P_IP if ipv4 else ETH_P_IPV6]
        else:
            assert row.gso_type == GsoType.NONE


@pytest.mark.parametrize("key", list(RX_OFFLOAD_MAP))
@pytest.mark.parametrize("mss", [0, 1448])
def test_rx_each_row(key: tuple[bool, bool], mss: int) -> None:
    row = RX_OFFLOAD_MAP[key]
    flags = stt_flags(*key)
    lo = row.min_l4_offset
    n = lo + row.l4_header_len
    got = rx_vnet(flags, lo, mss, n)
    assert isinstance(got, VnetHdr)
    assert got.flags == VnetFlag.NEEDS_CSUM
    assert (got.csum_start, got.csum_offset) == (lo, row.csum_offset)
    if mss and row.gso_type != GsoType.NONE:
        assert (got.gso_type, got.gso_size, got.hdr_len) == (row.gso_type, mss, n)
    else:
        assert (got.gso_type, got.gso_size, got.hdr_len) == (0, 0, 0)
    # C together with P: P wins (#9)
    assert rx_vnet(flags | C, lo, mss, n) == got
    # bounds: L4 offset one too small, L4 header one byte short (#7, #8)
    assert rx_vnet(flags, lo - 1, mss, n) is DropReason.BAD_L4_OFFSET
    assert rx_vnet(flags, 0, mss, n) is DropReason.BAD_L4_OFFSET
    assert rx_vnet(flags, lo, mss, n - 1) is DropReason.BAD_L4_OFFSET
    assert rx_vnet(flags, 255, mss, 255 + row.l4_header_len) == got._replace(
        csum_start=255, hdr_len=255 + row.l4_header_len if got.hdr_len else 0
    )


@pytest.mark.parametrize("extra", [0, V, T, V | T, 0xF0])
def test_rx_without_p_ignores_offset_and_mss(extra: int) -> None:
    assert rx_vnet(extra, 0, 0, 100) == VnetHdr()
    assert rx_vnet(extra, 3, 1448, 10) == VnetHdr()  # #10: ignored, not dropped
    assert rx_vnet(extra | C, 77, 9, 10) == VnetHdr(flags=VnetFlag.DATA_VALID)


ALL_GSO = [int(g) for g in GsoType] + [int(g) | GSO_ECN for g in GsoType] + [2, 0x10]


@pytest.mark.parametrize("gso", ALL_GSO)
@pytest.mark.parametrize("ethertype", list(TX_GSO_FOR_L3))
@pytest.mark.parametrize("l4", list(CSUM_OFFSET_BY_L4))
def test_tx_every_gso_type(gso: int, ethertype: int, l4: int) -> None:
    lo = L3_MIN[ethertype]
    vnet = VnetHdr(VnetFlag.NEEDS_CSUM, gso, lo + L4_HLEN[l4], 1448, lo, CSUM_OFFSET_BY_L4[l4])
    got = tx_offload(vnet, ethertype, 3000)
    if gso not in TX_GSO_WHITELIST:
        assert got is SoftwareReason.GSO_TYPE
        return
    if gso and (l4 != IPPROTO_TCP or TX_GSO_FOR_L3[ethertype] != gso):
        assert got is SoftwareReason.MISMATCH
        return
    flags = stt_flags(ethertype == ETH_P_IP, l4 == IPPROTO_TCP)
    assert got == TxOffload(flags, lo, 1448 if gso else 0)
    # what the receiver makes of it is the vnet header we started from
    back = rx_vnet(got.flags, got.l4_offset, got.mss, 3000)
    if gso:
        assert back == vnet
    else:
        assert back == vnet._replace(hdr_len=0, gso_size=0)


def test_tx_without_partial_checksum() -> None:
    assert tx_offload(VnetHdr(), ETH_P_IP, 100) == TX_NONE == (0, 0, 0)
    dv = VnetHdr(flags=VnetFlag.DATA_VALID)
    assert tx_offload(dv, ETH_P_IP, 100) == TX_VERIFIED == (C, 0, 0)
    assert tx_offload(dv, 0x0806, 100) == TX_VERIFIED
    for gso in TX_GSO_FOR_L3.values():
        assert tx_offload(VnetHdr(gso_type=gso, gso_size=1448), ETH_P_IP, 100) is (
            SoftwareReason.GSO_TYPE
        )


def test_tx_software_reasons() -> None:
    tcp4 = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16)
    assert isinstance(tx_offload(tcp4, ETH_P_IP, MAX_OFFLOAD_INNER_LEN), TxOffload)
    assert tx_offload(tcp4, ETH_P_IP, MAX_OFFLOAD_INNER_LEN + 1) is SoftwareReason.TOO_LONG
    assert isinstance(tx_offload(tcp4._replace(csum_start=255), ETH_P_IP, 999), TxOffload)
    assert tx_offload(tcp4._replace(csum_start=256), ETH_P_IP, 999) is SoftwareReason.L4_OFFSET
    for et in (0x8100, 0x88A8, 0x0806, 0x8847):
        assert tx_offload(tcp4, et, 999) is SoftwareReason.NOT_IP
    assert tx_offload(tcp4._replace(csum_offset=2), ETH_P_IP, 999) is SoftwareReason.L4_PROTO
    assert tx_offload(tcp4._replace(csum_start=54), ETH_P_IPV6, 999) is SoftwareReason.MISMATCH
    udp_gso = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 42, 1448, 34, 6)
    assert tx_offload(udp_gso, ETH_P_IP, 999) is SoftwareReason.MISMATCH
    ecn = tcp4._replace(gso_type=GsoType.TCPV4 | GSO_ECN)
    assert tx_offload(ecn, ETH_P_IP, 999) is SoftwareReason.GSO_TYPE


@pytest.mark.parametrize("key", list(RX_OFFLOAD_MAP))
def test_tx_l4_offset_is_one_the_receiver_accepts(key: tuple[bool, bool]) -> None:
    """An L4 offset inside the Ethernet + minimal IP header would be dropped by the
    receiver (#7): such a frame is completed here instead (never a wrong header, #42)."""
    ipv4, tcp = key
    row = RX_OFFLOAD_MAP[key]
    ethertype = ETH_P_IP if ipv4 else ETH_P_IPV6
    vnet = VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, row.min_l4_offset, row.csum_offset)
    got = tx_offload(vnet, ethertype, 3000)
    assert got == TxOffload(stt_flags(ipv4, tcp), row.min_l4_offset, 0)
    assert isinstance(rx_vnet(got.flags, got.l4_offset, 0, 3000), VnetHdr)
    for start in (0, 14, row.min_l4_offset - 1, MAX_L4_OFFSET + 1):
        low = vnet._replace(csum_start=start)
        assert tx_offload(low, ethertype, 3000) is SoftwareReason.L4_OFFSET


FIELD_VALUES = {
    "flags": [0, 1, 2, 3, 4],
    "gso_type": [0, 1, 3, 4, 5, 0x81, 0x84, 2],
    "gso_size": [0, 1448],
    "csum_start": [0, 33, 34, 53, 54, 255, 256],
    "csum_offset": [0, 2, 6, 16],
    "ethertype": [ETH_P_IP, ETH_P_IPV6, 0x8100, 0x88A8, 0x0806],
}


def test_tx_offload_fields_is_tx_offload() -> None:
    """The send path's remembered answers are tx_offload's (None for a SoftwareReason),
    for every combination, asked twice: computed, then looked up (the memo is cleared
    when full several times over)."""
    for values in itertools.product(*FIELD_VALUES.values()):
        flags, gso_type, gso_size, start, offset, ethertype = values
        got = tx_offload(VnetHdr(flags, gso_type, 0, gso_size, start, offset), ethertype, 9000)
        want = got if isinstance(got, TxOffload) else None
        assert tx_offload_fields(*values) == want
        assert TX_OFFLOAD_MEMO[values] == want
        assert tx_offload_fields(*values) == want
