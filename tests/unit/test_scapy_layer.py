"""The Scapy STT layer agrees with sttun's own codec in both directions."""

from __future__ import annotations

import pytest

pytest.importorskip("scapy")

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from sttun.core.api import encapsulate
from sttun.core.decap import decapsulate
from sttun.core.drops import DropReason
from sttun.core.outer import parse_segment
from sttun.tools.scapy_layer import STT, fix_seq
from sttun.wire.stt import SttHeader

INNER = (
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    / IP(src="192.0.2.1", dst="192.0.2.2")
    / UDP(sport=1000, dport=2000)
    / b"ping"
)


def test_scapy_built_frame_decodes_with_sttun() -> None:
    pkt = fix_seq(
        IP(src="198.18.0.1", dst="198.18.0.2")
        / TCP(sport=50000, dport=7471, flags="PA", ack=9)
        / STT(flags="C", context_id=0x0102030405060708, v=1, vlan_id=100, pcp=5)
        / INNER
    )
    raw = bytes(pkt)
    seg = parse_segment(raw)
    assert not isinstance(seg, DropReason)
    _src, _dst, _tos, _sport, dport, seq, ack, _doff, l4, end = seg
    assert (dport, seq >> 16, seq & 0xFFFF, ack) == (7471, 18 + len(INNER), 0, 9)
    assert (l4, end) == (20, len(raw))
    hdr = SttHeader.unpack(raw, 40)
    assert hdr.context_id == 0x0102030405060708
    assert hdr.csum_verified and not hdr.csum_partial
    assert (hdr.vlan_present, hdr.vlan_id, hdr.pcp) == (True, 100, 5)
    inner = decapsulate(raw[40:]).inner
    assert bytes(inner)[12:16] == bytes.fromhex("8100a064")  # the tag re-inserted


def test_sttun_encapsulated_frame_dissects_in_scapy() -> None:
    (outer,) = encapsulate(bytes(INNER), 42, src="198.18.0.1", dst="198.18.0.2", sport=40000)
    pkt = IP(outer)
    assert pkt[TCP].dport == 7471
    assert pkt[STT].context_id == 42
    assert pkt[STT].version == 0
    assert bytes(pkt[STT].payload) == bytes(INNER)
    assert pkt[UDP].dport == 2000


def test_non_first_segment_is_raw() -> None:
    segs = encapsulate(bytes(INNER / (b"x" * 3000)), 7, src="198.18.0.1", dst="198.18.0.2")
    assert len(segs) == 3
    assert STT in IP(segs[0])
    assert STT not in IP(segs[1])
