"""A null tunnel: sttun's data path with the STT work taken out (a benchmark baseline).

It moves frames exactly the way ``sttun up`` does — a TAP with vnet headers and
offloads, one ``AF_PACKET`` socket with ``PACKET_VNET_HDR`` and the same BPF
filter, one GSO ``sendmsg`` per frame, GRO'd pieces received into a buffer and
written to the TAP with one ``writev``, sttun's nftables rules, one Python process
and one epoll loop per host — but does none of the protocol work: no STT header,
no demultiplexing, checks, offload mapping, DSCP/ECN or statistics.  The outer
IPv4 + TCP header is a template with the length, SEQ (frame length and offset,
as in STT), ACK (frame id) and IP checksum filled in; the payload is the TAP's own
vnet header followed by the frame, which the receiver writes back unchanged.

What it measures is the ceiling of the design: no Python implementation of STT
over a TAP and an ``AF_PACKET`` socket can carry more than this on the same
machine.  ``bench/throughput.py`` runs it as the ``null-tunnel`` mode.  It is not
a tunnel anyone should use: it trusts every packet that reaches it.

Usage (as root, inside a host of ``sttun.tools.topology.TwoHosts``)::

    python bench/null_tunnel.py --local-ip A --remote-ip B [--dev nul0]

Runs until SIGTERM or SIGINT, then removes its nftables table.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import struct
import sys
import time
from types import FrameType

from sttun.errors import SetupError
from sttun.io import netlink
from sttun.io.firewall import Firewall
from sttun.io.packet_socket import RECV_SIZE, PacketSocket
from sttun.io.tap import TAP_READ_SIZE, TapDevice

PORT = 7471
#: As sttun's daemon: overlay TSO frames that fit a 64 KB outer packet.
TAP_GSO_MAX_SIZE = 65000
VNET_LEN = 10
ETH_LEN = 14
HDR_LEN = ETH_LEN + 20 + 20  # Ethernet + IPv4 + TCP
RX_PAYLOAD = VNET_LEN + HDR_LEN  # where the payload starts in a receive buffer
#: Partial frames kept at most (a lost tail leaves one behind; oldest dropped first).
PENDING_MAX = 64
_IP_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_SEQ_ACK = struct.Struct("!II")
_VNET = struct.Struct("<BBHHHH")
_NEEDS_CSUM = 1
_GSO_TCPV4 = 1


def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


class _Partial:
    """A frame whose pieces are still arriving."""

    __slots__ = ("frame", "got")

    def __init__(self, length: int) -> None:
        self.frame = bytearray(length)
        self.got = 0


class NullTunnel:
    """One host's end: TAP ``dev`` <-> ``AF_PACKET`` on the route to ``remote``."""

    def __init__(self, local: str, remote: str, dev: str) -> None:
        route = netlink.route_lookup(remote)
        self.firewall = Firewall("null")
        self.firewall.install([local], [PORT])
        self.tap = TapDevice(dev, offload=True, mtu=1500)
        netlink.set_gso_max_size(dev, TAP_GSO_MAX_SIZE)
        self.sock = PacketSocket(route.ifname, (PORT,))
        mac = None
        nexthop = route.gateway or remote  # a router between the hosts: its MAC
        deadline = time.monotonic() + 5.0
        while mac is None and time.monotonic() < deadline:
            mac = netlink.neighbour(route.ifindex, nexthop)
            if mac is None:
                netlink.resolve(route.ifindex, nexthop)
                time.sleep(0.05)
        if mac is None:
            raise SetupError(f"null tunnel: {nexthop} does not answer ARP on {route.ifname}")
        own = netlink.link_info(route.ifname).mac
        self.header = bytearray(HDR_LEN)
        self.header[:ETH_LEN] = (
            bytes.fromhex(mac.replace(":", "")) + bytes.fromhex(own.replace(":", "")) + b"\x08\x00"
        )
        self.src, self.dst = socket.inet_aton(local), socket.inet_aton(remote)
        addrs = sum(struct.unpack("!HHHH", self.src + self.dst))
        #: TCP pseudo-header sum without the TCP length (the GSO checksum seed).
        self.pseudo = _fold(addrs + 6)
        #: IPv4 header words that never change (version/IHL, DF, TTL 64, protocol).
        self.ip_const = _fold(addrs + 0x4500 + 0x4000 + (64 << 8 | 6))
        seg = route.mtu - 40
        self.segment = seg
        self.vnet_gso = _VNET.pack(_NEEDS_CSUM, _GSO_TCPV4, HDR_LEN, seg, ETH_LEN + 20, 16)
        self.vnet_one = _VNET.pack(_NEEDS_CSUM, 0, 0, 0, ETH_LEN + 20, 16)
        self.frame_id = 0
        self.pending: dict[int, _Partial] = {}
        self.tap_buf = bytearray(TAP_READ_SIZE)
        self.rx_buf = bytearray(RECV_SIZE)
        self.stopping = False

    def from_tap(self) -> None:
        """Read frames from the TAP, send each as one (GSO) packet."""
        tap, send, hdr, buf = self.tap, self.sock.send, self.header, self.tap_buf
        mv = memoryview(buf)
        for _ in range(64):
            n = tap.read_into(buf)
            if not n:
                return
            if n > 0xFFFF:
                continue
            fid = self.frame_id = (self.frame_id + 1) & 0xFFFFFFFF
            tcp_len = 20 + n
            ident = fid & 0xFFFF
            ipc = ~_fold(self.ip_const + 20 + tcp_len + ident) & 0xFFFF
            _IP_TCP.pack_into(
                hdr, ETH_LEN, 0x45, 0, 20 + tcp_len, ident, 0x4000, 64, 6, ipc, self.src,
                self.dst, 40000, PORT, n << 16, fid, 0x50, 0x18, 65535,
                _fold(self.pseudo + tcp_len), 0,
            )  # fmt: skip
            send([self.vnet_gso if n > self.segment else self.vnet_one, hdr, mv[:n]])

    def from_underlay(self) -> None:
        """Receive pieces, put frames together, write each to the TAP."""
        recv, write, pending, buf = self.sock.recv_into, self.tap.writev, self.pending, self.rx_buf
        mv = memoryview(buf)
        for _ in range(64):
            n = recv(buf)
            if not n:
                return
            if n <= RX_PAYLOAD:
                continue
            seq, fid = _SEQ_ACK.unpack_from(buf, VNET_LEN + ETH_LEN + 20 + 4)
            length, off = seq >> 16, seq & 0xFFFF
            size = n - RX_PAYLOAD
            if off == 0 and size >= length:
                write([mv[RX_PAYLOAD : RX_PAYLOAD + length]])
                continue
            part = pending.get(fid)
            if part is None:
                if len(pending) >= PENDING_MAX:
                    del pending[next(iter(pending))]
                part = pending[fid] = _Partial(length)
            part.frame[off : off + size] = mv[RX_PAYLOAD:n]
            part.got += size
            if part.got >= length:
                del pending[fid]
                write([part.frame])

    def run(self) -> None:
        """Serve until :meth:`stop`."""
        ep = select.epoll()
        tap_fd = self.tap.fileno()
        ep.register(tap_fd, select.EPOLLIN)
        ep.register(self.sock.fileno(), select.EPOLLIN)
        while not self.stopping:
            try:
                events = ep.poll(0.5)
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == tap_fd:
                    self.from_tap()
                else:
                    self.from_underlay()

    def stop(self, _sig: int = 0, _frame: FrameType | None = None) -> None:
        """Ask :meth:`run` to return."""
        self.stopping = True

    def close(self) -> None:
        """Remove the nftables table, close the devices."""
        self.firewall.remove()
        self.sock.close()
        self.tap.close()


def main(argv: list[str] | None = None) -> int:
    """Run one end of the null tunnel until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local-ip", required=True)
    p.add_argument("--remote-ip", required=True)
    p.add_argument("--dev", default="nul0")
    args = p.parse_args(argv)
    try:
        tunnel = NullTunnel(args.local_ip, args.remote_ip, args.dev)
    except SetupError as e:
        print(f"null_tunnel: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, tunnel.stop)
    signal.signal(signal.SIGINT, tunnel.stop)
    try:
        tunnel.run()
    finally:
        tunnel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
