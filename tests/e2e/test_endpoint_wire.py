"""tcpdump on the underlay while ``sttun up`` carries a transfer: tshark (heuristic STT
dissector) decodes every TCP/7471 segment as STT with the configured context id, every
outer TCP checksum is good, and no RST ever goes from or to port 7471.

Where the capture is taken: on the sender's (A's) veth, with ``ethtool -K tx off`` on
*both* veths, so each kernel completes every checksum and segments in software before
the packet reaches a capture tap (with tx checksumming on, a veth hands its peer
CHECKSUM_PARTIAL packets: the capture would show partial checksums, and 64 KB GSO
packets on the sending side).  The capture sees both directions: STT data frames
A -> B, the STT frames carrying the overlay TCP ACKs B -> A, and any RST either host
stack might send.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sttun.tools.capture import Capture
from sttun.tools.wire_check import TSHARK_CHECKSUM_FIELDS, tshark_checksum_verdict
from tests.e2e.sttun_hosts import OVERLAY_B, ping, tcp_transfer, tunnel_pair
from tests.netns import need_root, need_tools

pytestmark = pytest.mark.netns

KEY = 0x0123456789ABCDEF
MiB = 1024 * 1024
#: pass 1, heuristic STT-over-IP dissection (STT's TCP-like header is part of "stt")
STT_FIELDS = ["frame.number", "frame.protocols", "ip.src", "stt.pkt_id", "stt.context_id"]
#: pass 2, the outer header as plain TCP (first occurrence = outer)
TCP_FIELDS = [
    "frame.number",
    "ip.src",
    "tcp.srcport",
    "tcp.dstport",
    *TSHARK_CHECKSUM_FIELDS,
    "tcp.flags.reset",
    "tcp.seq_raw",
    "tcp.ack_raw",
    "tcp.len",
]


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()
    need_tools("tcpdump", "tshark")


def _tshark(pcap: Path, fields: list[str], *prefs: str) -> dict[int, dict[str, str]]:
    argv = ["tshark", "-r", str(pcap), "-T", "fields", "-E", "occurrence=f"]
    for p in prefs:
        argv += ["-o", p]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    rows = [dict(zip(fields, ln.split("\t"), strict=True)) for ln in res.stdout.splitlines()]
    return {int(r["frame.number"]): r for r in rows}


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "software"])
def test_underlay_capture_decodes_as_stt(tmp_path: Path, offload: bool) -> None:
    pcap = tmp_path / "underlay.pcap"
    with tunnel_pair(tmp_path, key=KEY, offload=offload) as t:
        h = t.hosts
        for ns, dev in ((h.a, h.dev_a), (h.b, h.dev_b)):
            ns.ethtool(dev, tx=False)  # complete checksums before the capture taps
        ping(h.a, OVERLAY_B, count=1)
        with Capture(h.a, h.dev_a, pcap, "tcp") as cap:
            ping(h.a, OVERLAY_B, count=2)
            tcp_transfer(h.a, h.b, OVERLAY_B, 8 * MiB)
        assert t.b.tunnel(t.dev)["rx"]["bytes"] >= 8 * MiB

    stt = _tshark(pcap, STT_FIELDS, "ip.try_heuristic_first:TRUE")
    tcp = _tshark(pcap, TCP_FIELDS, "tcp.check_checksum:TRUE")
    assert stt.keys() == tcp.keys()
    assert len(tcp) > 8 * MiB // 1500, f"only {len(tcp)} segments captured"
    from_a = from_b = 0
    frames: dict[tuple[str, str], list[str]] = {}  # (source, frame id) -> context ids seen
    # (source, frame id) -> (frame length from SEQ, captured bytes per offset)
    pieces: dict[tuple[str, int], tuple[int, dict[int, int]]] = {}
    for n, r in tcp.items():
        s = stt[n]
        where = f"frame {n}: {r} {s}"
        # outer TCP: to the STT port, checksum good, never a reset
        assert r["tcp.dstport"] == "7471", where  # the capture filter was just "tcp"
        assert tshark_checksum_verdict(*(r[f] for f in TSHARK_CHECKSUM_FIELDS)) == "good", where
        assert r["tcp.flags.reset"] in ("0", "False"), where
        # STT: every segment; the context id shows in the segment completing its frame
        assert s["frame.protocols"].startswith("eth:ethertype:ip:stt"), where
        assert s["stt.pkt_id"], where
        ids = frames.setdefault((s["ip.src"], s["stt.pkt_id"]), [])
        if s["stt.context_id"]:
            ids.append(s["stt.context_id"])
        seq = int(r["tcp.seq_raw"])
        got = pieces.setdefault((r["ip.src"], int(r["tcp.ack_raw"])), (seq >> 16, {}))[1]
        got[seq & 0xFFFF] = max(got.get(seq & 0xFFFF, 0), int(r["tcp.len"]))
        if r["ip.src"] == h.ip_a:
            from_a += 1
        else:
            assert r["ip.src"] == h.ip_b, where
            from_b += 1
    assert from_a > 8 * MiB // 1500, f"{from_a} data segments, tcpdump dropped {cap.dropped}"
    assert from_b > 0  # the overlay's ACKs
    # every STT frame was reassembled by tshark exactly once, with our context id —
    # unless the capture itself lost some of its segments (tcpdump under load)
    bad = {k: v for k, v in frames.items() if [int(c, 16) for c in v] != [KEY]}
    lost = 0
    for (src, pkt_id), ids in list(bad.items()):
        length, got = pieces[(src, int(pkt_id, 16))]
        covered = sum(got.values())
        if not ids and covered < length:
            assert cap.dropped, f"frame {pkt_id} from {src}: {covered} of {length} bytes captured"
            del bad[(src, pkt_id)]
            lost += 1
    assert not bad, f"{len(bad)} of {len(frames)} STT frames: {list(bad.items())[:5]}"
    assert lost <= len(frames) // 20, f"the capture lost segments of {lost} frames"


def test_rst_check_can_fail_without_firewall(tmp_path: Path) -> None:
    """Control for the RST assertion: with ``--no-firewall`` the host stacks do answer.
    (Without the kernel fast path: it takes whole frames before the IP stack sees them.)"""
    pcap = tmp_path / "nofw.pcap"
    with tunnel_pair(tmp_path, key=KEY, extra=["--no-firewall", "--fastpath", "off"]) as t:
        h = t.hosts
        with Capture(h.a, h.dev_a, pcap, "tcp"):
            h.a.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", OVERLAY_B], check=False)
    tcp = _tshark(pcap, TCP_FIELDS)
    resets = [r for r in tcp.values() if r["tcp.flags.reset"] not in ("0", "False")]
    assert resets, "expected the host stack to answer STT with RSTs when unprotected"
    assert all(r["tcp.srcport"] == "7471" for r in resets)
