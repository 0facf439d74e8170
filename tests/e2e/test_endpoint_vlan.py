"""VLAN tags through ``sttun up``: an 802.1Q tag rides in the STT header (V=1, VID, PCP)
and is put back on the far side; an 802.1ad tag travels in-band, STT TCI 0.

There are no VLAN devices on this kernel, so the frames are written into TAP A with an
``AF_PACKET`` socket bound to it and read on TAP B the same way (the receiving kernel
hands the tag to packet sockets as auxdata; :func:`recv_frame` puts it back in-band).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sttun.tools.capture import Capture
from tests.e2e.sttun_hosts import (
    OVERLAY_A,
    OVERLAY_B,
    Tunnelled,
    packet_socket,
    ping,
    recv_frame,
    tunnel_pair,
    udp_frame,
)
from tests.netns import link_mac, need_root, need_tools

pytestmark = pytest.mark.netns

KEY = 0x5A5A0001
TPID_8021Q = 0x8100
TPID_8021AD = 0x88A8
TCI_Q = (5 << 13) | 100  # PCP 5, DEI 0, VID 100
TCI_AD = (3 << 13) | 200  # PCP 3, VID 200 (S-tag)
TCI_INNER = (1 << 13) | 300  # a C-tag inside the S-tag


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()
    need_tools("tcpdump", "tshark")


def _tshark_fields(pcap: Path, marker: bytes, fields: list[str]) -> list[list[str]]:
    argv = ["tshark", "-r", str(pcap), "-o", "ip.try_heuristic_first:TRUE"]
    argv += ["-Y", f"frame contains {marker.hex(':')}", "-T", "fields", "-E", "occurrence=a"]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return [line.split("\t") for line in res.stdout.splitlines() if line.strip()]


def _send_and_receive(
    t: Tunnelled, tmp: Path, tags: list[tuple[int, int]], label: str
) -> tuple[bytes, bytes, tuple[int, int] | None, Path, bytes]:
    """Write one tagged frame into TAP A; return (sent, received, aux tag, pcap, marker)."""
    h = t.hosts
    marker = f"sttun-vlan-{label}-".encode() + os.urandom(6).hex().encode()
    frame = udp_frame(
        link_mac(h.b, t.dev), link_mac(h.a, t.dev), OVERLAY_A, OVERLAY_B, marker * 4, tags=tags
    )
    pcap = tmp / f"underlay-{label}.pcap"
    tx = packet_socket(h.a, t.dev)
    rx = packet_socket(h.b, t.dev)
    try:
        with Capture(h.b, h.dev_b, pcap, "tcp port 7471"):
            tx.send(frame)
            got, tag = recv_frame(rx, marker)
    finally:
        tx.close()
        rx.close()
    return frame, got, tag, pcap, marker


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "software"])
def test_8021q_tag_in_stt_header(tmp_path: Path, offload: bool) -> None:
    with tunnel_pair(tmp_path, key=KEY, offload=offload) as t:
        ping(t.hosts.a, OVERLAY_B, count=1)  # neighbours resolved both ways
        sent, got, tag, pcap, marker = _send_and_receive(t, tmp_path, [(TPID_8021Q, TCI_Q)], "q")
        assert tag == (TPID_8021Q, TCI_Q), "the tag must arrive on TAP B"
        assert got == sent
        rows = _tshark_fields(
            pcap,
            marker,
            ["stt.context_id", "stt.vlan.v", "stt.vlan.id", "stt.vlan.pcp", "eth.type"],
        )
        assert len(rows) == 1, rows
        ctx, v, vid, pcp, etypes = rows[0]
        assert int(ctx, 16) == KEY
        assert v in ("1", "True"), rows
        assert int(vid) == 100 and int(pcp) == 5
        # the inner frame on the wire is untagged: outer IPv4, inner IPv4, no 0x8100
        assert etypes.split(",") == ["0x0800", "0x0800"], etypes
        sb = t.b.tunnel(t.dev)
        assert sb["vlan_without_v"] == 0


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "software"])
def test_8021ad_tag_in_band(tmp_path: Path, offload: bool) -> None:
    with tunnel_pair(tmp_path, key=KEY, offload=offload) as t:
        ping(t.hosts.a, OVERLAY_B, count=1)
        tags = [(TPID_8021AD, TCI_AD), (TPID_8021Q, TCI_INNER)]
        sent, got, tag, pcap, marker = _send_and_receive(t, tmp_path, tags, "ad")
        assert got == sent, "the 802.1ad frame must arrive unchanged, both tags kept"
        assert tag is None or tag == (TPID_8021AD, TCI_AD)
        fields = ["stt.context_id", "stt.vlan", "stt.vlan.v", "frame.protocols"]
        fields += ["eth.type", "ieee8021ad.id", "ieee8021ad.priority", "vlan.id"]
        rows = _tshark_fields(pcap, marker, fields)
        assert len(rows) == 1, rows
        ctx, tci, v, protocols, etypes, s_vid, s_pcp, c_vid = rows[0]
        assert int(ctx, 16) == KEY
        assert tci in ("", "0", "0x0000"), f"STT TCI must be 0 for 802.1ad, got {rows[0]}"
        assert v in ("", "0", "False")
        # in-band on the wire: inner Ethernet type 0x88a8, then the C-tag, then IPv4
        assert protocols.endswith(
            ":stt:eth:ethertype:ieee8021ad:ethertype:vlan:ethertype:ip:udp:data"
        )
        assert etypes.split(",") == ["0x0800", "0x88a8"], etypes
        assert (int(s_vid), int(s_pcp), int(c_vid)) == (200, 3, 300)
