"""AF_PACKET socket with vnet headers between two namespaces: GSO out, GRO in."""

from __future__ import annotations

import os
import select
import struct
import subprocess
import time
from pathlib import Path

import pytest

from sttun.errors import SetupError
from sttun.io.packet_socket import RECV_SIZE, PacketSocket
from tests import netns
from tests.netns import (
    STT_PORT,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    Capture,
    TwoHosts,
    link_mac,
    need_tools,
    tcp_frame,
)

two_hosts = netns.two_hosts  # fixture (until tests/conftest.py re-exports it)

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
    h.a.ethtool_k(h.dev_a, tso="off")
    h.b.ethtool_k(h.dev_b, gro="on")
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
    h.a.ethtool_k(h.dev_a, tso="off", tx="off")
    h.b.ethtool_k(h.dev_b, gro="off")
    pcap = tmp_path / "b.pcap"
    os.chmod(tmp_path, 0o777)
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,))
    with rx, Capture(h.b, h.dev_b, pcap, f"tcp dst port {STT_PORT}"):
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
    h.a.ethtool_k(h.dev_a, tso="off")
    h.b.ethtool_k(h.dev_b, gro="on")
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,))
    with rx:
        _send_gso(h, v6=True, seq=77)
        pieces = _collect(rx, len(PAYLOAD), 54)
    assert 1 <= len(pieces) < NSEG // 2
    assert any(v[1] == VIRTIO_NET_HDR_GSO_TCPV6 for v, _ in pieces)
    assert _reassemble(pieces, 54, 77) == PAYLOAD


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
        with h.a.entered(), PacketSocket(h.dev_a, ports=None, vnet_hdr=False) as tx:
            tx.send([other])
            tx.send([stt])
        buf = bytearray(RECV_SIZE)
        got: list[bytes] = []
        end = time.monotonic() + 5
        while not got and time.monotonic() < end:
            select.select([rx], [], [], 0.2)
            while (n := rx.recv_into(buf)) > 0:
                got.append(bytes(buf[:n]))
        time.sleep(0.2)
        while (n := rx.recv_into(buf)) > 0:
            got.append(bytes(buf[:n]))
    assert got == [stt]  # no vnet header with vnet_hdr=False


def test_set_ports_swaps_filter(two_hosts: TwoHosts) -> None:
    h = two_hosts
    mac_a, mac_b = link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b)
    _, f7471 = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"a" * 64)
    _, f9000 = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"b" * 64, dport=9000)
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,), vnet_hdr=False)
    buf = bytearray(RECV_SIZE)

    def exchange() -> list[bytes]:
        with h.a.entered(), PacketSocket(h.dev_a, ports=None, vnet_hdr=False) as tx:
            tx.send([f7471])
            tx.send([f9000])
        got: list[bytes] = []
        end = time.monotonic() + 5  # hang guard
        while not got and time.monotonic() < end:
            select.select([rx], [], [], 0.2)
            while (n := rx.recv_into(buf)) > 0:
                got.append(bytes(buf[:n]))
        return got

    with rx:
        assert exchange() == [f7471]
        rx.set_ports([9000])
        assert exchange() == [f9000]


def test_no_such_interface() -> None:
    with pytest.raises(SetupError, match="no interface"):
        PacketSocket("sttun-nonexist")


def test_gso_send_cost(two_hosts: TwoHosts) -> None:
    """Print (never assert) the cost of one 64 KB GSO sendmsg for the docs."""
    h = two_hosts
    h.a.ethtool_k(h.dev_a, tso="off")
    vnet, frame = tcp_frame(
        link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b), h.ip_a, h.ip_b, PAYLOAD, gso_size=MSS
    )
    hdr_len = VNET_HDR.unpack(vnet)[2]
    mv = memoryview(frame)
    parts = [vnet, mv[:hdr_len], mv[hdr_len:]]
    costs: list[float] = []
    clock = time.perf_counter
    with h.a.entered(), PacketSocket(h.dev_a, ports=None) as tx:
        for _ in range(500):
            t0 = clock()
            ok = tx.send(parts)
            t1 = clock()
            if ok:
                costs.append(t1 - t0)
            else:
                select.select([], [tx], [], 0.1)
    assert costs
    costs.sort()
    print(
        f"\n64 KB GSO sendmsg (software GSO into 45 segments, veth): median "
        f"{costs[len(costs) // 2] * 1e6:.1f} us, p90 {costs[len(costs) * 9 // 10] * 1e6:.1f} us"
        f" over {len(costs)} sends"
    )
