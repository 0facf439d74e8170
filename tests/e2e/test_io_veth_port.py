"""sttun.io.veth_port: the kernel segments and completes what sttun sends, GRO merges
what the switch sends, and the pair survives the process."""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Iterator

import pytest

from sttun.errors import SetupError
from sttun.io.ethtool import get_feature
from sttun.io.veth_port import (
    GRO_FLUSH_TIMEOUT_NS,
    VethPort,
    get_gro_flush_timeout,
    sttun_ports,
)
from tests.netns import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    Netns,
    need_root,
    ones_sum,
    pseudo_sum,
    tcp_frame,
)

pytestmark = pytest.mark.netns

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"
IP_A, IP_B = "192.0.2.1", "192.0.2.2"
MSS = 1448


@pytest.fixture
def ns() -> Iterator[Netns]:
    need_root()
    with Netns("veth") as n:
        yield n


def switch_socket(name: str, vnet: bool = False) -> socket.socket:
    """What OVS does on a system port: a plain AF_PACKET socket on the device."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    if vnet:
        s.setsockopt(263, 15, 1)  # PACKET_VNET_HDR
    s.bind((name, 0))
    s.setblocking(False)
    return s


def drain(sock: object, read: object, idle: float = 0.5) -> list[bytes]:
    """Everything readable until nothing arrives for ``idle`` seconds."""
    out: list[bytes] = []
    buf = bytearray(70000)
    while select.select([sock], [], [], idle)[0]:
        try:
            n = read(buf)  # type: ignore[operator]
        except BlockingIOError:
            continue
        if not n:
            continue
        out.append(bytes(buf[:n]))
    return out


def tcp_payloads(frames: list[bytes]) -> list[tuple[int, bytes]]:
    """(seq, payload) of the IPv4/TCP frames from A to B; asserts every TCP checksum."""
    got = []
    for f in frames:
        if f[12:14] != b"\x08\x00" or f[23] != 6:
            continue
        ihl = (f[14] & 0x0F) * 4
        tlen = struct.unpack_from("!H", f, 16)[0]
        l4 = f[14 + ihl : 14 + tlen]
        assert ones_sum(l4, pseudo_sum(IP_A, IP_B, len(l4))) == 0xFFFF, "bad TCP checksum"
        doff = (l4[12] >> 4) * 4
        got.append((struct.unpack_from("!I", l4, 4)[0], l4[doff:]))
    return got


def test_a_gso_frame_reaches_the_switch_as_checksummed_mtu_segments(ns: Netns) -> None:
    payload = bytes(range(256)) * 200  # 51200 bytes
    vnet, frame = tcp_frame(MAC_A, MAC_B, IP_A, IP_B, payload, seq=1000, gso_size=MSS)
    assert VNET_HDR.unpack(vnet)[:2] == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4)
    with ns.entered():
        port = VethPort("sw0", offload=False, mtu=1500)
        try:
            sw = switch_socket("sw0")
            assert port.write(vnet, frame) == len(vnet) + len(frame)
            segs = tcp_payloads(drain(sw, sw.recv_into))
        finally:
            port.close(remove=True)
    assert len(segs) == -(-len(payload) // MSS)
    assert all(len(p) <= MSS for _s, p in segs)
    assert b"".join(p for _s, p in sorted(segs)) == payload
    assert segs[0][0] == 1000


def test_with_offload_the_gso_frame_crosses_whole(ns: Netns) -> None:
    payload = bytes(40000)
    vnet, frame = tcp_frame(MAC_A, MAC_B, IP_A, IP_B, payload, gso_size=MSS)
    with ns.entered():
        port = VethPort("sw0", offload=True)
        try:
            assert get_feature(port.peer, "tcp-segmentation-offload")
            sw = switch_socket("sw0", vnet=True)
            port.write(vnet, frame)
            got = [f for f in drain(sw, sw.recv_into) if len(f) > 1000]
        finally:
            port.close(remove=True)
    assert len(got) == 1
    flags, gso_type, _hl, gso_size, _cs, _co = VNET_HDR.unpack(got[0][:10])
    assert (flags, gso_type, gso_size) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV4,
        MSS,
    )
    assert got[0][10:] == frame


@pytest.mark.parametrize("offload", [False, True], ids=["offload-off", "offload-on"])
def test_gro_merges_what_the_switch_sends(ns: Netns, offload: bool) -> None:
    n = 40
    with ns.entered():
        port = VethPort("sw0", offload=offload)
        try:
            assert get_feature(port.peer, "generic-receive-offload")
            assert get_gro_flush_timeout(port.peer) == GRO_FLUSH_TIMEOUT_NS
            sw = switch_socket("sw0")
            for i in range(n):
                _v, f = tcp_frame(MAC_A, MAC_B, IP_A, IP_B, bytes([i]) * MSS, seq=i * MSS,
                                  flags=0x10)  # fmt: skip
                # IPv4 GRO wants incrementing IP ids
                f = bytearray(f)
                struct.pack_into("!H", f, 18, 100 + i)
                struct.pack_into("!H", f, 24, 0)
                struct.pack_into("!H", f, 24, ~ones_sum(f[14:34]) & 0xFFFF)
                sw.send(f)
            frames = [f for f in drain(port, port.read_into) if f[22:24] == b"\x08\x00"]
        finally:
            port.close(remove=True)
    # each frame: vnet header + Ethernet; sttun sees fewer, bigger frames than were sent
    assert 1 <= len(frames) < n
    assert max(len(f) for f in frames) > 1514 + 10
    assert sum(len(f) - 10 - 54 for f in frames) == n * MSS


def test_the_pair_outlives_the_process_and_is_adopted(ns: Netns) -> None:
    with ns.entered():
        first = VethPort("stt0", offload=False, mtu=9000)
        assert not first.existed and first.peer == "stt0-s"
        assert sttun_ports() == ["stt0"]
        first.close()
        assert "stt0" in ns.ip("-br", "link")
        again = VethPort("stt0", offload=True)
        try:
            assert again.existed and again.peer == "stt0-s"
            assert "mtu 9000" in ns.ip("link", "show", "stt0")  # kept
            assert get_feature("stt0-s", "tx-checksumming")
            for dev in ("stt0", "stt0-s"):
                assert ns.run(["sysctl", "-n", f"net.ipv6.conf.{dev}.disable_ipv6"]).stdout == "1\n"
                assert "inet" not in ns.ip("addr", "show", dev)
        finally:
            again.close(remove=True)
        assert sttun_ports() == []
    assert "stt0" not in ns.ip("-br", "link")


def test_a_name_taken_by_another_kind_of_device_is_an_error(ns: Netns) -> None:
    ns.run(["ip", "tuntap", "add", "dev", "stt0", "mode", "tap"])
    with ns.entered(), pytest.raises(SetupError, match="exists and is a tun, not a veth"):
        VethPort("stt0")
    assert "stt0" in ns.ip("-br", "link")  # left alone
