"""PACKET_TX_RING sending (sttun.io.tx_ring) between two namespaces.

What the ring must give: the same bytes on the wire as ``sendmsg`` (GSO TCPV4 and
TCPV6 super-packets cut into right segments by a TSO-off veth, small frames as
sent), back-pressure as 0 then recovery, a frame the kernel rejects counted and
skipped, and the reason it exists: on a veth with TSO off at the sender and GRO on
at the receiver a 64 KB GSO frame from the ring arrives as ONE skb, where the same
frame sent with ``sendmsg`` arrives in pieces (``skb_segment`` moves the socket
owner of a ``sendmsg`` skb to its last segment and GRO does not merge skbs of
different owners).
"""

from __future__ import annotations

import select
import time

import pytest

from sttun.io.ethtool import tso_enabled
from sttun.io.packet_socket import RECV_SIZE, PacketSocket
from sttun.tools.topology import TwoHosts
from tests.e2e.test_io_packet_socket import (
    MSS,
    MSS6,
    NSEG,
    PAYLOAD,
    _collect,
    _reassemble,
    _segment_fields,
)
from tests.netns import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    link_mac,
    tcp_frame,
)

pytestmark = pytest.mark.netns


def _ring_socket(h: TwoHosts) -> PacketSocket:
    with h.a.entered():
        tx = PacketSocket(h.dev_a, ports=None, tx_ring=True)
    assert tx.tx_ring is not None, tx.tx_ring_error
    return tx


def _gso_frame(h: TwoHosts, v6: bool, seq: int) -> tuple[bytes, bytes]:
    src, dst = (h.ip6_a, h.ip6_b) if v6 else (h.ip_a, h.ip_b)
    mss = MSS6 if v6 else MSS
    return tcp_frame(
        link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b), src, dst, PAYLOAD[: mss * NSEG],
        seq=seq, ack=0x1234, gso_size=mss,
    )  # fmt: skip


def _receive(rx: PacketSocket, count: int, timeout: float = 10.0) -> list[bytes]:
    """The next ``count`` frames ``rx`` receives (AssertionError if they do not come)."""
    buf = bytearray(RECV_SIZE)
    got: list[bytes] = []
    end = time.monotonic() + timeout  # a hang guard, not a timing assertion
    while len(got) < count:
        left = end - time.monotonic()
        assert left > 0, f"{len(got)} of {count} frames arrived"
        select.select([rx], [], [], left)
        while (n := rx.recv_into(buf)) > 0:
            got.append(bytes(buf[:n]))
    return got


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_ring_gso_frames_are_segmented_right(two_hosts: TwoHosts, v6: bool) -> None:
    """Two 64 KB GSO super-packets from the ring, segmented in software at A (no TSO,
    no checksum offload), received unmerged at B: 45 segments each, sequence numbers
    back to back, every checksum right, the payload intact."""
    h = two_hosts
    h.a.ethtool(h.dev_a, tso="off", tx="off")
    h.b.ethtool(h.dev_b, gro="off")
    mss, l3 = (MSS6 if v6 else MSS), 14
    seqs = [1000, 1000 + mss * NSEG]
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(7471,), vnet_hdr=False)
    with rx, _ring_socket(h) as tx:
        for seq in seqs:
            vnet, frame = _gso_frame(h, v6, seq)
            hdr_len = VNET_HDR.unpack(vnet)[2]
            mv = memoryview(frame)
            parts = [vnet, mv[:hdr_len], mv[hdr_len:30000], mv[30000:]]
            assert tx.send(parts) == len(vnet) + len(frame)
        frames = _receive(rx, NSEG * len(seqs))
        assert tx.tx_ring is not None and tx.tx_ring.rejected == 0
    l4 = l3 + (40 if v6 else 20)
    for k, seq in enumerate(seqs):
        mine = frames[k * NSEG : (k + 1) * NSEG]
        fields = [_segment_fields(f, l3) for f in mine]
        assert [f["seq"] for f in fields] == [seq + i * mss for i in range(NSEG)]
        assert all(f["tcp_csum_ok"] and f["ip_csum_ok"] for f in fields), fields
        assert b"".join(f[l4 + 20 :] for f in mine) == PAYLOAD[: mss * NSEG]


def test_ring_small_frame_arrives_as_sent(two_hosts: TwoHosts) -> None:
    """A frame without GSO (vnet header all zero) arrives byte for byte, through the
    ring and through the socket's send (which sends such frames with sendmsg)."""
    h = two_hosts
    vnet, frame = tcp_frame(
        link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b), h.ip_a, h.ip_b, b"small" * 20
    )
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(7471,), vnet_hdr=False)
    with rx, _ring_socket(h) as tx:
        assert tx.tx_ring is not None
        assert tx.tx_ring.send([vnet, frame]) == len(vnet) + len(frame)
        assert tx.send([vnet, frame]) == len(vnet) + len(frame)  # sendmsg: no GSO
        got = _receive(rx, 2)
    assert got == [frame, frame]


@pytest.mark.parametrize("ring", [True, False], ids=["tx-ring", "sendmsg"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_whole_frame_at_a_gro_receiver(two_hosts: TwoHosts, ring: bool, v6: bool) -> None:
    """TSO off at A, GRO on at B: a 64 KB GSO frame from the ring reaches B as one
    frame carrying the whole payload with its GSO type; from ``sendmsg`` it reaches
    B in more than one piece (the fact that makes the ring worth having)."""
    h = two_hosts
    h.a.ethtool(h.dev_a, tso="off")
    h.b.ethtool(h.dev_b, gro="on")
    l4 = 14 + (40 if v6 else 20)
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(7471,))
    if ring:
        tx = _ring_socket(h)
    else:
        with h.a.entered():
            tx = PacketSocket(h.dev_a, ports=None)
    payload_len = (MSS6 if v6 else MSS) * NSEG
    with rx, tx:
        for seq in (1000, 1000 + payload_len):
            vnet, frame = _gso_frame(h, v6, seq)
            assert tx.send([vnet, frame]) == len(vnet) + len(frame)
        pieces = _collect(rx, 2 * payload_len, l4)
    first = [p for p in pieces if int.from_bytes(p[1][l4 + 4 : l4 + 8], "big") < 1000 + payload_len]
    gso = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    if ring:
        assert len(pieces) == 2, [len(f) for _, f in pieces]  # one per super-packet
        for vnet_rx, frame_rx in pieces:
            assert vnet_rx[1] == gso and vnet_rx[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM
            assert len(frame_rx) == l4 + 20 + payload_len
    else:
        assert len(first) > 1, [len(f) for _, f in pieces]
    assert _reassemble(first, l4, 1000)[:payload_len] == PAYLOAD[:payload_len]


def test_ring_full_returns_zero_then_recovers(two_hosts: TwoHosts) -> None:
    """With A's queue draining slowly (a tbf qdisc), the ring's slots stay held by
    queued skbs: the ring's send returns 0 once every slot is busy, the socket's
    wait_writable returns True when the kernel frees one, and the next send goes;
    every accepted frame arrives."""
    h = two_hosts
    h.a.run(["tc", "qdisc", "replace", "dev", h.dev_a, "root", "tbf", "rate", "2mbit",
             "burst", "2000", "limit", "10000000"])  # fmt: skip
    mac_a, mac_b = link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b)
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(7471,), vnet_hdr=False)
    with rx, _ring_socket(h) as tx:
        ring = tx.tx_ring
        assert ring is not None
        accepted = 0
        for i in range(10 * ring.frames):
            vnet, frame = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"x" * 1000, seq=i)
            if not ring.send([vnet, frame]):
                break
            accepted += 1
        else:
            pytest.fail(f"{accepted} frames accepted, the ring never filled")
        assert accepted >= ring.frames - 1
        assert tx.wait_writable(30.0)
        vnet, frame = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"last", seq=99999)
        assert ring.send([vnet, frame]) == len(vnet) + len(frame)
        got = _receive(rx, accepted + 1, timeout=60.0)
        assert got[-1] == frame and ring.rejected == 0


def test_rejected_frame_is_counted_and_skipped(two_hosts: TwoHosts) -> None:
    """A frame whose vnet header the kernel refuses (checksum field beyond the frame)
    is skipped and counted; the ring keeps sending what follows."""
    h = two_hosts
    mac_a, mac_b = link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b)
    _, bad_frame = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"bad" * 10)
    bad_vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, len(bad_frame), 16)
    vnet, good = tcp_frame(mac_a, mac_b, h.ip_a, h.ip_b, b"good" * 10)
    with h.b.entered():
        rx = PacketSocket(h.dev_b, ports=(7471,), vnet_hdr=False)
    with rx, _ring_socket(h) as tx:
        ring = tx.tx_ring
        assert ring is not None
        with pytest.raises(OSError, match="rejected 1 frame"):  # as sendmsg's EINVAL
            ring.send([bad_vnet, bad_frame])  # taken into the ring, refused by the kernel
        assert ring.rejected == 1 and ring.rejected_bytes == len(bad_frame)
        count = ring.frames + 1  # through every slot, the bad one's too
        for _ in range(count):
            while not ring.send([vnet, good]):
                assert tx.wait_writable(10.0)
        got = _receive(rx, count)
    assert got == [good] * count
    assert ring.rejected == 1


def test_tso_enabled_reads_the_device(two_hosts: TwoHosts) -> None:
    """``tso_enabled`` says what ethtool set (the daemon's ``tx_ring = "auto"`` rule)."""
    h = two_hosts
    with h.a.entered():
        assert tso_enabled(h.dev_a) is True
        h.a.ethtool(h.dev_a, tso="off")
        assert tso_enabled(h.dev_a) is False
        assert tso_enabled("sttun-nonexist") is None
