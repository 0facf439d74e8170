"""AF_PACKET socket with vnet headers between two namespaces: GSO out, GRO in."""

from __future__ import annotations

import ipaddress
import select
import struct
import subprocess
import time
from pathlib import Path

import pytest

from sttun.errors import SetupError
from sttun.io.packet_socket import RECV_SIZE, PacketSocket
from sttun.tools.capture import Capture
from sttun.tools.topology import TwoHosts
from tests.netns import (
    STT_PORT,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    link_mac,
    need_tools,
    ones_sum,
    pseudo_sum,
    tcp_frame,
)

pytestmark = pytest.mark.netns

MSS = 1448  # 1500 - 20 (IPv4) - 20 (TCP) - 12 (TCP timestamps, as Linux would use)
MSS6 = 1440  # 1500 - 40 (IPv6) - 20 (TCP)
NSEG = 45
PAYLOAD = bytes((i * 7 + i // 251) & 0xFF for i in range(MSS * NSEG))  # 65160 bytes


def _collect(
    sock: PacketSocket,
    want_payload: int,
    l4: int,
    deadline_s: float = 10.0,
) -> list[tuple[tuple[int, ...], bytes]]:
    """Receive pieces until ``want_payload`` TCP payload bytes arrived (or give up)."""
    buf = bytearray(RECV_SIZE)
    pieces: list[tuple[tuple[int, ...], bytes]] = []
    got = 0
    end = time.monotonic() + deadline_s  # a hang guard, not a timing assertion
    while got < want_payload and time.monotonic() < end:
        select.select([sock], [], [], 0.2)
        while (n := sock.recv_into(buf)) > 0:
            vnet = VNET_HDR.unpack_from(buf, 0)
            pieces.append((vnet, bytes(buf[10:n])))
            got += n - 10 - l4 - 20
    return pieces


def _reassemble(pieces: list[tuple[tuple[int, ...], bytes]], l4: int, base_seq: int) -> bytes:
    out = bytearray(len(PAYLOAD))
    for _vnet, frame in pieces:
        seq = struct.unpack_from("!I", frame, l4 + 4)[0]
        data = frame[l4 + 20 :]
        off = seq - base_seq
        out[off : off + len(data)] = data
    return bytes(out)


def _send_gso(h: TwoHosts, v6: bool = False, seq: int = 1000) -> None:
    src, dst = (h.ip6_a, h.ip6_b) if v6 else (h.ip_a, h.ip_b)
    vnet, frame = tcp_frame(
        link_mac(h.a, h.dev_a),
        link_mac(h.b, h.dev_b),
        src,
        dst,
        PAYLOAD,
        seq=seq,
        ack=0x1234,
        gso_size=MSS6 if v6 else MSS,
    )
    hdr_len = VNET_HDR.unpack(vnet)[2]
    with h.a.entered(), PacketSocket(h.dev_a, ports=None) as tx:
        mv = memoryview(frame)
        # scatter-gather: vnet header, outer headers, payload in two buffers
        n = tx.send([vnet, mv[:hdr_len], mv[hdr_len:30000], mv[30000:]])
    assert n == len(vnet) + len(frame)


def test_gso_send_gro_receive(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """A 64 KB GSO frame leaves A as 45 segments and reaches B merged by GRO, intact."""
    h = two_hosts
    h.a.ethtool(h.dev_a, tso="off")
    h.b.ethtool(h.dev_b, gro="on")
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,))
    with rx:
        _send_gso(h)
        pieces = _collect(rx, len(PAYLOAD), 34)
    assert 1 <= len(pieces) < NSEG // 2, f"expected GRO merges, got {len(pieces)} pieces"
    assert any(v[1] == VIRTIO_NET_HDR_GSO_TCPV4 for v, _ in pieces), [v for v, _ in pieces]
    for vnet, _ in pieces:
        assert vnet[0] & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)
    assert _reassemble(pieces, 34, 1000) == PAYLOAD


def test_gso_segments_on_the_wire_have_good_checksums(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """With GRO off at B and checksum offload off at A (so GSO completes the seeded
    checksum in software), B's capture shows 45 segments, every checksum good."""
    need_tools("tshark", "tcpdump")
    h = two_hosts
    h.a.ethtool(h.dev_a, tso="off", tx="off")
    h.b.ethtool(h.dev_b, gro="off")
    pcap = tmp_path / "b.pcap"
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,))
    with rx, Capture(h.b, h.dev_b, pcap, f"tcp dst port {STT_PORT}", immediate=True):
        _send_gso(h)
        pieces = _collect(rx, len(PAYLOAD), 34)
    assert len(pieces) == NSEG
    assert all(v[1] == 0 for v, _ in pieces)  # no GSO metadata on single segments
    assert _reassemble(pieces, 34, 1000) == PAYLOAD
    res = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "tcp.checksum.status",
            "-e",
            "ip.checksum.status",
            "-e",
            "tcp.len",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [ln.split("\t") for ln in res.stdout.splitlines() if ln.strip()]
    assert len(rows) == NSEG
    assert all(r[0] == "1" and r[1] == "1" for r in rows), rows  # 1 = good
    assert sum(int(r[2]) for r in rows) == len(PAYLOAD)


def test_gso_ipv6(two_hosts: TwoHosts) -> None:
    """The same over IPv6: gso_type TCPV6 arrives merged and intact."""
    h = two_hosts
    h.a.ethtool(h.dev_a, tso="off")
    h.b.ethtool(h.dev_b, gro="on")
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,))
    with rx:
        _send_gso(h, v6=True, seq=77)
        pieces = _collect(rx, len(PAYLOAD), 54)
    assert 1 <= len(pieces) < NSEG // 2
    assert any(v[1] == VIRTIO_NET_HDR_GSO_TCPV6 for v, _ in pieces)
    assert _reassemble(pieces, 54, 77) == PAYLOAD


def _until_marker(rx: PacketSocket, marker: bytes, timeout: float = 10.0) -> list[bytes]:
    """Every frame ``rx`` receives up to and including the one containing ``marker``.

    The marker is sent last: once it is here, every frame sent before it has been
    through the filter (AssertionError naming what arrived if it never comes).
    """
    buf = bytearray(RECV_SIZE)
    got: list[bytes] = []
    end = time.monotonic() + timeout
    while not any(marker in f for f in got):
        left = end - time.monotonic()
        assert left > 0, f"marker {marker!r} not received in {timeout:g}s; got {got}"
        select.select([rx], [], [], left)
        while (n := rx.recv_into(buf)) > 0:
            got.append(bytes(buf[:n]))
    return got


def test_filter_drops_other_traffic(two_hosts: TwoHosts) -> None:
    """Ping and TCP to another port never reach the filtered socket; STT does."""
    h = two_hosts
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,), vnet_hdr=False)
    with rx:
        h.a.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", h.ip_b])
        mac_a, mac_b = link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b)
        _, other = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"x" * 100, dport=7472)
        _, stt = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"y" * 100)
        _, marker = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"end-marker" * 10)
        with h.a.entered(), PacketSocket(h.dev_a, ports=None, vnet_hdr=False) as tx:
            for frame in (other, stt, marker):
                tx.send([frame])
        got = _until_marker(rx, b"end-marker")
    assert got == [stt, marker]  # no vnet header with vnet_hdr=False


def test_set_ports_swaps_filter(two_hosts: TwoHosts) -> None:
    """After set_ports the socket gets the new port only (a marker on the allowed
    port, sent last, shows the other frame has been filtered, not just late)."""
    h = two_hosts
    mac_a, mac_b = link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b)
    _, f7471 = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"a" * 64)
    _, f9000 = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"b" * 64, dport=9000)
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,), vnet_hdr=False)

    def exchange(port: int, tag: bytes) -> tuple[list[bytes], bytes]:
        _, marker = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, tag * 8, dport=port)
        with h.a.entered(), PacketSocket(h.dev_a, ports=None, vnet_hdr=False) as tx:
            for frame in (f7471, f9000, marker):
                tx.send([frame])
        return _until_marker(rx, tag), marker

    with rx:
        got, marker = exchange(STT_PORT, b"marker-1")
        assert got == [f7471, marker]
        rx.set_ports([9000])
        got, marker = exchange(9000, b"marker-2")
        assert got == [f9000, marker]


def test_no_such_interface() -> None:
    with pytest.raises(SetupError, match="no interface"):
        PacketSocket("sttun-nonexist")


def _segment_fields(frame: bytes, l3: int) -> dict[str, int]:
    """The header fields of one IPv4 or IPv6 TCP segment that GSO sets per segment."""
    v6 = frame[l3] >> 4 == 6
    l4 = l3 + (40 if v6 else (frame[l3] & 0x0F) * 4)
    tcp_len = len(frame) - l4
    if v6:
        src, dst = frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40]
    else:
        src, dst = frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20]
    s_ip, d_ip = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
    return {
        "ip_len": struct.unpack_from("!H", frame, l3 + 4 if v6 else l3 + 2)[0],
        "ip_id": -1 if v6 else struct.unpack_from("!H", frame, l3 + 4)[0],
        "ip_csum_ok": 1 if v6 else int(ones_sum(frame[l3 : l3 + 20]) == 0xFFFF),
        "tcp_csum_ok": int(ones_sum(frame[l4:], pseudo_sum(s_ip, d_ip, tcp_len)) == 0xFFFF),
        "seq": struct.unpack_from("!I", frame, l4 + 4)[0],
        "ack": struct.unpack_from("!I", frame, l4 + 8)[0],
        "flags": frame[l4 + 13],
        "payload": tcp_len - 20,
    }


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_gso_send_segments_each_right(two_hosts: TwoHosts, v6: bool) -> None:
    """Three 64 KB GSO super-packets in a row, segmented in software at A (no TSO,
    no checksum offload) and received unmerged at B: each becomes exactly 45 frames
    of MSS payload, sequence numbers back to back, ACK kept, PSH only on the last
    segment, IPv4 ids consecutive, every IPv4 header and TCP checksum correct
    (checked here in Python), and the payload intact.  (The cost of such a send is
    measured by ``bench/gso_send.py``.)"""
    h = two_hosts
    h.a.ethtool(h.dev_a, tso="off", tx="off")
    h.b.ethtool(h.dev_b, gro="off")
    mss, l3 = (MSS6 if v6 else MSS), 14
    payload = PAYLOAD[: mss * NSEG]
    src, dst = (h.ip6_a, h.ip6_b) if v6 else (h.ip_a, h.ip_b)
    mac_a, mac_b = link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b)
    seqs = [1000, 1000 + len(payload), 7_000_000]
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,), vnet_hdr=False)
    with rx:
        with h.a.entered(), PacketSocket(h.dev_a, ports=None) as tx:
            for seq in seqs:
                vnet, frame = tcp_frame(mac_a, mac_b, src, dst, payload, seq=seq, ack=0x1234,
                                        gso_size=mss)  # fmt: skip
                hdr_len = VNET_HDR.unpack(vnet)[2]
                mv = memoryview(frame)
                assert tx.send([vnet, mv[:hdr_len], mv[hdr_len:]]) == len(vnet) + len(frame)
        buf = bytearray(RECV_SIZE)
        frames: list[bytes] = []
        end = time.monotonic() + 10
        while len(frames) < NSEG * len(seqs):
            left = end - time.monotonic()
            assert left > 0, f"{len(frames)} of {NSEG * len(seqs)} segments arrived"
            select.select([rx], [], [], left)
            while (n := rx.recv_into(buf)) > 0:
                frames.append(bytes(buf[:n]))
    for k, seq in enumerate(seqs):
        mine = frames[k * NSEG : (k + 1) * NSEG]
        fields = [_segment_fields(f, l3) for f in mine]
        where = f"super-packet {k}"
        assert [f["seq"] for f in fields] == [seq + i * mss for i in range(NSEG)], where
        assert all(f["payload"] == mss for f in fields), where
        assert all(f["ack"] == 0x1234 for f in fields), where
        assert all(f["tcp_csum_ok"] and f["ip_csum_ok"] for f in fields), (where, fields)
        # GSO clears PSH on every segment but the last
        assert [f["flags"] for f in fields] == [0x10] * (NSEG - 1) + [0x18], where
        if v6:
            assert all(f["ip_len"] == 20 + mss for f in fields), where
        else:
            assert all(f["ip_len"] == 40 + mss for f in fields), where
            ids = [f["ip_id"] for f in fields]
            assert ids == [(ids[0] + i) & 0xFFFF for i in range(NSEG)], where
        l4 = l3 + (40 if v6 else 20)
        assert b"".join(f[l4 + 20 :] for f in mine) == payload, where
