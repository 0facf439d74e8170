"""sttun.daemon.datapath driven in-process with fake TAPs and sockets.

The fakes stand for the kernel objects only: the frames come from the real core
(an :class:`Encapsulator` on the far side builds what the wire would carry), and
what the data path writes is decoded again by the real core.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import struct
from collections import deque
from collections.abc import Sequence

import pytest

from sttun.core.drops import DropReason
from sttun.core.encap import Encapsulator
from sttun.core.endpoint import Endpoint, Tunnel, TunnelSpec
from sttun.daemon.config import TunnelConfig
from sttun.daemon.datapath import (
    BATCH,
    PENDING_MAX,
    Datapath,
    TunnelRuntime,
    Underlay,
)
from sttun.io.packet_socket import RECV_SIZE
from sttun.wire.ether import ETH_P_IP
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import STT_HEADER_LEN, TCP_HEADER_LEN
from sttun.wire.vnet import VNET_HDR, VNET_HDR_LEN, VNET_NONE, GsoType, VnetFlag

Buffer = bytes | bytearray | memoryview

A, B = "198.18.0.1", "198.18.0.2"
KEY = 42
MACS = bytes.fromhex("020000000002020000000001")
L2 = bytes.fromhex("02000000000b02000000000a") + ETH_P_IP.to_bytes(2, "big")
TRUSTED = VNET_HDR.pack(int(VnetFlag.DATA_VALID), 0, 0, 0, 0, 0)


class FakeTap:
    """A TAP: frames the overlay stack 'sent' are read; written frames are kept."""

    def __init__(self) -> None:
        self.outgoing: deque[bytes] = deque()  # vnet header + frame, for read_into
        self.written: list[tuple[bytes, bytes]] = []
        self.write_result: int | None = None  # None: accept everything
        self.write_error: OSError | None = None

    def fileno(self) -> int:
        return -1

    def read_into(self, buf: bytearray) -> int:
        if not self.outgoing:
            return 0
        data = self.outgoing.popleft()
        buf[: len(data)] = data
        return len(data)

    def write(self, vnet_hdr: Buffer, frame: Buffer) -> int:
        if self.write_error is not None:
            raise self.write_error
        self.written.append((bytes(vnet_hdr), bytes(frame)))
        if self.write_result is not None:
            return self.write_result
        return len(vnet_hdr) + len(frame)


class FakeSocket:
    """An AF_PACKET socket with a vnet header: received packets are queued, sent ones kept."""

    def __init__(self) -> None:
        self.incoming: deque[bytes] = deque()
        self.sent: list[bytes] = []
        self.full = 0  # sends refused (buffer full) before one is accepted
        self.writable = True
        self.waits = 0

    def fileno(self) -> int:
        return -2

    def recv_into(self, buf: bytearray) -> int:
        if not self.incoming:
            return 0
        data = self.incoming.popleft()
        buf[: len(data)] = data
        return len(data)

    def send(self, parts: Sequence[Buffer]) -> int:
        if self.full:
            self.full -= 1
            return 0
        data = b"".join(bytes(p) for p in parts)
        self.sent.append(data)
        return len(data)

    def wait_writable(self, timeout: float) -> bool:
        self.waits += 1
        return self.writable


class Host:
    """One end: a core endpoint with one tunnel, a data path, fake TAP and socket."""

    def __init__(self, local: str, remote: str, *, offload: bool = True) -> None:
        self.core = Endpoint()
        spec = TunnelSpec("t", ip_bytes(local), ip_bytes(remote), KEY, KEY)
        self.tunnel: Tunnel = self.core.add_tunnel(spec)
        self.tunnel.encapsulator.l2 = L2
        self.tap = FakeTap()
        self.sock = FakeSocket()
        cfg = TunnelConfig(
            "t", ipaddress.ip_address(local), ipaddress.ip_address(remote), KEY, KEY,
            offload=offload,
        )  # fmt: skip
        self.underlay = Underlay("veth0", 2, bytes(6), {4: self.sock, 6: self.sock})
        self.rt = TunnelRuntime(cfg, self.tunnel, self.tap, self.underlay, state="up")
        self.underlay.tunnels.append(self.rt)
        self.runtimes = {"t": self.rt}
        self.datapath = Datapath(self.core, self._runtime_of, clock=lambda: 1.0)

    def _runtime_of(self, tunnel: Tunnel) -> TunnelRuntime | None:
        rt = self.runtimes.get(tunnel.spec.name)
        return rt if rt is not None and rt.tunnel is tunnel else None


def inner_udp(n: int, fill: int = 0x5A) -> bytes:
    """An inner Ethernet + IPv4 + UDP frame with ``n`` payload bytes (checksum 0)."""
    udp = struct.pack("!HHHH", 5000, 6000, 8 + n, 0) + bytes([fill]) * n
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                     ip_bytes("192.0.2.1"), ip_bytes("192.0.2.2"))  # fmt: skip
    return MACS + b"\x08\x00" + ip + udp


def wire_pieces(sender: Encapsulator, frame: bytes, cuts: Sequence[int] = ()) -> list[bytes]:
    """What the receiver's socket reads for one frame: vnet header + Ethernet + outer
    IPv4 + TCP-like header + a piece of the STT frame, cut at ``cuts`` (GRO pieces)."""
    packet = sender.encap_gso(memoryview(frame), 0, 0, 0, 0, 0)
    assert packet is not None
    _vnet, headers, inner = packet
    whole = bytes(headers) + bytes(inner)
    l3 = len(L2)
    l4 = l3 + 20
    stt = whole[l4 + TCP_HEADER_LEN :]
    length = len(stt)
    out = []
    bounds = [0, *cuts, length]
    for lo, hi in itertools.pairwise(bounds):
        ip = bytearray(whole[l3:l4])
        struct.pack_into("!H", ip, 2, 20 + TCP_HEADER_LEN + hi - lo)
        tcp = bytearray(whole[l4 : l4 + TCP_HEADER_LEN])
        struct.pack_into("!I", tcp, 4, length << 16 | lo)
        out.append(TRUSTED + whole[:l3] + bytes(ip) + bytes(tcp) + stt[lo:hi])
    return out


# ---------------------------------------------------------------------------- TAP → wire


def test_tap_frames_are_encapsulated_and_decoded_by_the_peer() -> None:
    a, b = Host(A, B), Host(B, A)
    frames = [inner_udp(n, fill=n & 0xFF) for n in (10, 1400, 9000)]
    for f in frames:
        a.tap.outgoing.append(VNET_NONE + f)
    a.datapath.on_tap(a.rt)
    assert len(a.sock.sent) == 3
    for sent in a.sock.sent:
        b.sock.incoming.append(TRUSTED + sent[VNET_HDR_LEN:])
    b.datapath.on_underlay(b.underlay)
    assert [w[1] for w in b.tap.written] == frames
    assert b.tunnel.rx.frames == 3 and a.tunnel.tx.frames == 3


def test_a_gso_frame_leaves_as_one_super_packet_with_the_kernels_segment_size() -> None:
    a = Host(A, B)
    frame = inner_udp(60000)
    a.tap.outgoing.append(VNET_NONE + frame)
    a.datapath.on_tap(a.rt)
    (sent,) = a.sock.sent
    flags, gso_type, hdr_len, gso_size, cstart, coff = VNET_HDR.unpack_from(sent)
    assert gso_type == GsoType.TCPV4 and flags == VnetFlag.NEEDS_CSUM
    assert (cstart, coff) == (len(L2) + 20, 16)  # the kernel finishes the outer TCP sum
    assert gso_size == 1500 - 20 - TCP_HEADER_LEN
    assert hdr_len == len(L2) + 20 + TCP_HEADER_LEN
    assert len(sent) == VNET_HDR_LEN + hdr_len + STT_HEADER_LEN + len(frame)


def test_offload_off_sends_finished_segments() -> None:
    a = Host(A, B, offload=False)
    a.tap.outgoing.append(VNET_NONE + inner_udp(5000))
    a.datapath.on_tap(a.rt)
    assert len(a.sock.sent) == 4  # 5042 + 18 bytes of STT frame in 1460-byte segments
    assert all(s[:VNET_HDR_LEN] == VNET_NONE and len(s) <= VNET_HDR_LEN + 1514 for s in a.sock.sent)


def test_frames_wait_for_the_next_hop_then_leave_in_order() -> None:
    a = Host(A, B)
    a.tunnel.encapsulator.l2 = b""  # next hop not resolved yet
    frames = [inner_udp(100, fill=i) for i in range(PENDING_MAX + 5)]
    for f in frames:
        a.tap.outgoing.append(VNET_NONE + f)
    while a.tap.outgoing:
        a.datapath.on_tap(a.rt)
    assert a.sock.sent == []
    assert len(a.rt.pending) == PENDING_MAX
    assert a.tunnel.encapsulator.drops[DropReason.TX_NO_NEIGHBOUR] == 5
    a.datapath.flush_pending(a.rt)  # still unresolved: nothing leaves
    assert a.sock.sent == []
    a.tunnel.encapsulator.l2 = L2
    a.datapath.flush_pending(a.rt)
    assert not a.rt.pending
    b = Host(B, A)
    for sent in a.sock.sent:
        b.sock.incoming.append(TRUSTED + sent[VNET_HDR_LEN:])
    while b.sock.incoming:
        b.datapath.on_underlay(b.underlay)
    assert [w[1] for w in b.tap.written] == frames[:PENDING_MAX]


@pytest.mark.parametrize("reason", [DropReason.TX_NO_ROUTE, DropReason.TX_UNDERLAY_MTU])
def test_a_blocked_tunnel_counts_its_frames_under_the_reason(reason: DropReason) -> None:
    a = Host(A, B)
    a.rt.blocked = reason
    for _ in range(3):
        a.tap.outgoing.append(VNET_NONE + inner_udp(100))
    a.datapath.on_tap(a.rt)
    assert a.sock.sent == [] and not a.rt.pending
    assert a.tunnel.encapsulator.drops[reason] == 3


def test_one_readiness_event_handles_at_most_a_batch() -> None:
    a = Host(A, B)
    for _ in range(BATCH + 3):
        a.tap.outgoing.append(VNET_NONE + inner_udp(10))
    a.datapath.on_tap(a.rt)
    assert len(a.sock.sent) == BATCH and len(a.tap.outgoing) == 3


def test_a_full_socket_buffer_waits_then_sends() -> None:
    a = Host(A, B)
    a.sock.full = 1
    a.tap.outgoing.append(VNET_NONE + inner_udp(100))
    a.datapath.on_tap(a.rt)
    assert a.sock.waits == 1 and len(a.sock.sent) == 1
    assert a.tunnel.encapsulator.drops[DropReason.TX_ERROR] == 0


def test_a_socket_buffer_that_stays_full_counts_a_drop() -> None:
    a = Host(A, B)
    a.sock.full = 1
    a.sock.writable = False
    a.tap.outgoing.append(VNET_NONE + inner_udp(100))
    a.datapath.on_tap(a.rt)
    assert a.sock.sent == []
    assert a.tunnel.encapsulator.drops[DropReason.TX_ERROR] == 1


def test_a_send_error_counts_and_a_vanished_link_marks_the_tunnel_down() -> None:
    a = Host(A, B)

    def refuse(parts: Sequence[Buffer]) -> int:
        raise OSError(errno.ENETDOWN, "Network is down")

    a.sock.send = refuse  # type: ignore[method-assign]
    a.tap.outgoing.append(VNET_NONE + inner_udp(100))
    a.datapath.on_tap(a.rt)
    assert a.tunnel.encapsulator.drops[DropReason.TX_ERROR] == 1
    assert a.rt.state == "down"


# ---------------------------------------------------------------------------- wire → TAP


@pytest.mark.parametrize("tail_first", [False, True], ids=["head-first", "tail-first"])
def test_two_gro_pieces_are_built_in_the_receive_buffer(tail_first: bool) -> None:
    sender = Host(A, B).tunnel.encapsulator
    b = Host(B, A)
    frames = [inner_udp(60000, fill=i) for i in range(6)]
    first_buffer = b.datapath._rx_buf
    for f in frames:
        pieces = wire_pieces(sender, f, [len(f) + STT_HEADER_LEN - 1400])
        b.sock.incoming.extend(reversed(pieces) if tail_first else pieces)
    b.datapath.on_underlay(b.underlay)
    assert [w[1] for w in b.tap.written] == frames
    assert b.tunnel.rx.frames == 6 and b.tunnel.rx.segments == 12
    # every frame was assembled in a receive buffer, never copied into a fresh one
    assert b.core.reassembler.stats()["entries"] == 0
    if tail_first:
        # the big piece completes the frame in the current buffer: no swap needed
        assert b.datapath._rx_buf is first_buffer
    else:
        # each head piece was kept and its buffer came back after the TAP write:
        # two buffers take turns (six frames: the first one is current again)
        (spare,) = b.datapath._rx_spare
        assert spare is not first_buffer and len(spare) == RECV_SIZE
        assert b.datapath._rx_buf is first_buffer


def test_a_kept_buffer_is_not_overwritten_before_its_frame_completes() -> None:
    sender = Host(A, B).tunnel.encapsulator
    b = Host(B, A)
    f1, f2 = inner_udp(30000, fill=1), inner_udp(30000, fill=2)
    p1 = wire_pieces(sender, f1, [20000])
    p2 = wire_pieces(sender, f2, [20000])
    # the heads of both frames first (each kept in its buffer), then both tails
    b.sock.incoming.extend([p1[0], p2[0], p1[1], p2[1]])
    b.datapath.on_underlay(b.underlay)
    assert [w[1] for w in b.tap.written] == [f1, f2]


def test_a_refused_tap_write_is_counted() -> None:
    sender = Host(A, B).tunnel.encapsulator
    b = Host(B, A)
    b.tap.write_result = 0  # would block
    b.sock.incoming.extend(wire_pieces(sender, inner_udp(100)))
    b.sock.incoming.extend(wire_pieces(sender, inner_udp(100)))
    b.datapath.on_underlay(b.underlay)
    assert b.tunnel.drops[DropReason.RX_TAP_ERROR] == 2


def test_a_short_or_failed_tap_write_is_counted() -> None:
    sender = Host(A, B).tunnel.encapsulator
    b = Host(B, A)
    b.tap.write_result = VNET_HDR_LEN + 50  # took part of the frame
    b.sock.incoming.extend(wire_pieces(sender, inner_udp(100)))
    b.datapath.on_underlay(b.underlay)
    b.tap.write_result = None
    b.tap.write_error = OSError(errno.EIO, "Input/output error")
    b.sock.incoming.extend(wire_pieces(sender, inner_udp(100)))
    b.datapath.on_underlay(b.underlay)
    assert b.tunnel.drops[DropReason.RX_TAP_ERROR] == 2
    assert b.tunnel.rx.frames == 2  # delivered by the core, lost at the TAP: counted


def test_non_ip_packets_on_the_underlay_are_skipped() -> None:
    sender = Host(A, B).tunnel.encapsulator
    b = Host(B, A)
    (piece,) = wire_pieces(sender, inner_udp(100))
    vlan = bytearray(piece)
    vlan[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14] = b"\x81\x00"
    b.sock.incoming.extend([bytes(vlan), piece[:20], piece])
    b.datapath.on_underlay(b.underlay)
    assert len(b.tap.written) == 1 and b.core.segments_in == 1


def test_a_frame_for_a_tunnel_replaced_during_a_reload_is_not_written() -> None:
    sender = Host(A, B).tunnel.encapsulator
    b = Host(B, A)
    b.runtimes.clear()  # the daemon removed the tunnel; the core still knows it
    b.sock.incoming.extend(wire_pieces(sender, inner_udp(100)))
    b.datapath.on_underlay(b.underlay)
    assert b.tap.written == []


def test_receive_errors_mark_the_underlays_tunnels_down() -> None:
    b = Host(B, A)

    def fail(buf: bytearray) -> int:
        raise OSError(errno.ENETDOWN, "Network is down")

    b.sock.recv_into = fail  # type: ignore[method-assign]
    b.datapath.on_underlay(b.underlay)
    assert b.rt.state == "down"


def test_with_sockets_per_protocol_each_family_sends_and_receives_on_its_own() -> None:
    """The fast path's layout: an IPv6 tunnel sends on the IPv6-bound socket (the
    kernel takes a packet's protocol from the binding), and each socket's readiness
    event reads that socket only."""
    a6, b6 = "2001:db8:0:1::1", "2001:db8:0:1::2"
    a = Host(a6, b6)
    a.tunnel.encapsulator.l2 = L2[:12] + b"\x86\xdd"
    sock4 = FakeSocket()
    a.underlay.ports[4] = sock4
    a.tap.outgoing.append(VNET_NONE + inner_udp(100))
    a.datapath.on_tap(a.rt)
    assert sock4.sent == [] and len(a.sock.sent) == 1
    b = Host(b6, a6)
    b_sock4 = FakeSocket()
    b.underlay.ports[4] = b_sock4
    assert b.underlay.receive_ports() == [b_sock4, b.sock]
    b_sock4.incoming.append(TRUSTED + a.sock.sent[0][VNET_HDR_LEN:])  # (misfiled: not read)
    b.datapath.on_underlay(b.underlay, b.sock)
    assert b.tap.written == [] and len(b_sock4.incoming) == 1
    b.sock.incoming.append(b_sock4.incoming.popleft())
    b.datapath.on_underlay(b.underlay, b.sock)
    assert [w[1] for w in b.tap.written] == [inner_udp(100)]
