"""The data path of ``sttun up``: TAP ⇄ core ⇄ underlay, per readiness event.

:class:`Datapath` owns everything a frame touches between a readable descriptor
and the kernel: the TAP read buffer, the underlay receive buffers (and the spares
the reassembler hands back after building a frame in place), each tunnel's queue
of frames waiting for the next hop's MAC address, and the back-pressure wait when
a socket buffer is full.  It does no set-up, no routing and no configuration: the
:class:`~sttun.daemon.endpoint.Daemon` creates the devices and calls
:meth:`Datapath.on_tap` / :meth:`Datapath.on_underlay` when epoll says so, and
:meth:`Datapath.flush_pending` when a next hop is resolved.

It takes its TAPs and sockets by interface (:class:`TapPort`,
:class:`UnderlayPort`) and its clock as an argument, so tests drive it in-process
with fakes.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sttun.core.drops import DropReason
from sttun.core.endpoint import Delivered, Endpoint, Tunnel
from sttun.core.reassembly import Pending
from sttun.core.rx_partial import OUTER_L4_AT, finish_inner_checksum
from sttun.daemon.config import TunnelConfig
from sttun.io.packet_socket import RECV_SIZE
from sttun.io.tap import TAP_READ_SIZE
from sttun.wire.ether import ETH_HLEN, ETH_P_IP, ETH_P_IPV6
from sttun.wire.vnet import VNET_HDR, VNET_HDR_LEN, VNET_NONE, VnetFlag, VnetHdr

Buffer = bytes | bytearray | memoryview

#: Frames handled per readiness event before other descriptors get a turn.
BATCH = 64
#: Frames held per tunnel while its next hop is being resolved (Linux keeps a few
#: too: neighbour ``unres_qlen``); more are dropped as ``tx_no_neighbour``.
PENDING_MAX = 64
#: How long a send waits for room in a full socket buffer before the packet counts
#: as dropped (``tx_error``).
SEND_WAIT = 0.01
#: Receive buffers kept for reuse after frames were built in them (a few suffice:
#: GRO'd frames complete one after another).
RX_SPARES = 4
#: vnet flags saying the kernel checked (DATA_VALID) or will compute (NEEDS_CSUM) the sum.
_CSUM_TRUSTED = int(VnetFlag.NEEDS_CSUM | VnetFlag.DATA_VALID)
_NEEDS_CSUM = int(VnetFlag.NEEDS_CSUM)
#: Where the outer IP header starts in a receive buffer (after vnet + Ethernet).
_IP_OFFSET = VNET_HDR_LEN + ETH_HLEN
_IP_ETHERTYPES = (ETH_P_IP, ETH_P_IPV6)
_ETHERTYPE_AT = VNET_HDR_LEN + 12
# The outer TCP source port where the receive program reads it (no IPv4 options).
_SPORT_AT_V4 = _IP_OFFSET + 20
_SPORT_AT_V6 = _IP_OFFSET + 40
#: Errors after which a send will keep failing until the link changes.
_LINK_GONE = (errno.ENETDOWN, errno.ENXIO, errno.ENODEV)


class TapPort(Protocol):
    """What the data path needs of a TAP device (:class:`~sttun.io.tap.TapDevice`)."""

    def fileno(self) -> int:
        """The descriptor epoll watches."""
        ...

    def read_into(self, buf: bytearray) -> int:
        """Read one vnet header + frame into ``buf``; 0 when nothing is waiting."""
        ...

    def write(self, vnet_hdr: Buffer, frame: Buffer) -> int:
        """Write one frame behind its vnet header; bytes written, 0 if it would block."""
        ...


class TxOrder(Protocol):
    """What the TAP reader tells the transmit program (see
    :class:`~sttun.io.order_counter.OrderCounter`)."""

    def done(self) -> None:
        """One frame read from the queue has been handled (sent, delivered, dropped)."""
        ...

    def drained(self, now: float) -> None:
        """The queue had nothing more to read (at monotonic time ``now``)."""
        ...

    def lagging(self) -> bool:
        """True while the program counts frames the reader has not accounted for."""
        ...


class RxOrder(Protocol):
    """What the underlay reader tells the receive program (see
    :class:`~sttun.io.order_counter.BucketOrder`)."""

    def done(self, sport: int) -> None:
        """One packet with outer source port ``sport`` has been handled."""
        ...

    def drained(self, now: float) -> None:
        """A socket had nothing more to read (at monotonic time ``now``)."""
        ...

    def lagging(self) -> bool:
        """True while the program counts packets the reader has not accounted for."""
        ...


class UnderlayPort(Protocol):
    """What the data path needs of an underlay socket
    (:class:`~sttun.io.packet_socket.PacketSocket` with a vnet header)."""

    def fileno(self) -> int:
        """The descriptor epoll watches."""
        ...

    def recv_into(self, buf: bytearray) -> int:
        """Receive one vnet header + Ethernet frame into ``buf``; 0 when nothing is waiting."""
        ...

    def send(self, parts: Sequence[Buffer]) -> int:
        """Send one packet given as parts; bytes accepted, 0 if the buffer is full."""
        ...

    def wait_writable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for room in the send buffer."""
        ...


@dataclass
class Underlay:
    """One underlay interface: its sockets and the tunnels using it.

    ``ports`` maps an IP version (4, 6) to the socket that sends that family's
    packets and receives them.  Without the kernel fast path one socket bound to
    every protocol serves both versions; with it, each family the tunnels use has a
    socket bound to its ethertype (such sockets run after tc ingress and see only
    what the fast path leaves to Python, and ``AF_PACKET`` takes a sent packet's
    protocol from the socket's binding).
    """

    ifname: str
    ifindex: int
    mac: bytes
    ports: dict[int, UnderlayPort]
    tunnels: list[TunnelRuntime] = field(default_factory=list)
    #: With the kernel receive fast path on the interface: its ordering counters,
    #: which the reader of the sockets updates, else None.
    rx_order: RxOrder | None = None

    def receive_ports(self) -> list[UnderlayPort]:
        """Each distinct socket once (the descriptors epoll watches)."""
        seen: list[UnderlayPort] = []
        for port in self.ports.values():
            if not any(port is s for s in seen):
                seen.append(port)
        return seen


@dataclass
class TunnelRuntime:
    """A configured tunnel with its devices and its transmit state."""

    config: TunnelConfig
    tunnel: Tunnel
    tap: TapPort
    underlay: Underlay | None = None
    nexthop: str = ""
    state: str = "down"
    log: logging.LoggerAdapter[logging.Logger] | None = None
    #: Why frames from the TAP cannot be sent at all right now (``tx_no_route``,
    #: ``tx_underlay_mtu``), or None.  Without a reason and without a next-hop MAC
    #: address, frames wait in :attr:`pending` instead.
    blocked: DropReason | None = None
    #: Frames (vnet header + frame, copied) read while the next hop was unresolved.
    pending: collections.deque[bytes] = field(default_factory=collections.deque)
    #: With the kernel transmit fast path on the TAP: the ordering counters the TAP
    #: reader updates (:class:`~sttun.io.tx_fastpath.OrderCounter`), else None.
    tx_order: TxOrder | None = None
    #: The IP version of the outer addresses: picks the underlay socket that sends.
    version: int = field(init=False)

    def __post_init__(self) -> None:
        self.version = self.config.family

    def ready_underlay(self) -> Underlay | None:
        """The underlay to send on, if frames can leave now: there is one, nothing
        blocks the tunnel and the next hop's MAC address is known."""
        if self.blocked is not None or not self.tunnel.encapsulator.l2:
            return None
        return self.underlay


class Datapath:
    """Moves frames between the TAPs, the core :class:`Endpoint` and the underlays.

    ``clock`` gives the time the core's reassembler runs on (monotonic seconds);
    ``tunnel_for`` finds the runtime of a core tunnel that delivered a frame (the
    daemon's table: a frame for a tunnel removed meanwhile is dropped).
    """

    def __init__(
        self,
        core: Endpoint,
        tunnel_for: Callable[[Tunnel], TunnelRuntime | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
    ) -> None:
        self.core = core
        self.tunnel_for = tunnel_for
        self.clock = clock
        self.log = log if log is not None else logging.getLogger("sttun.daemon")
        self._tap_buf = bytearray(TAP_READ_SIZE)
        self._tap_mv = memoryview(self._tap_buf)
        self._rx_buf = bytearray(RECV_SIZE)
        self._rx_mv = memoryview(self._rx_buf)
        # Receive buffers the reassembler built frames in, given back after the TAP
        # write, for the next time it keeps the current one.
        self._rx_spare: list[bytearray] = []

    # ------------------------------------------------------------------ TAP → wire
    def on_tap(self, rt: TunnelRuntime) -> None:
        """The TAP of ``rt`` is readable: send up to :data:`BATCH` frames."""
        tap = rt.tap
        buf = self._tap_buf
        u = rt.ready_underlay()
        if u is None:
            self._hold_or_drop(rt)
            return
        mv = self._tap_mv
        unpack = VNET_HDR.unpack_from
        transmit = self.transmit
        order = rt.tx_order
        if order is not None:
            for _ in range(BATCH):
                n = tap.read_into(buf)
                if not n:
                    order.drained(self.clock())
                    return
                if n > VNET_HDR_LEN:
                    transmit(rt, u, mv[VNET_HDR_LEN:n], *unpack(buf))
                order.done()
            return
        for _ in range(BATCH):
            n = tap.read_into(buf)
            if not n:
                return
            if n > VNET_HDR_LEN:
                transmit(rt, u, mv[VNET_HDR_LEN:n], *unpack(buf))

    def _hold_or_drop(self, rt: TunnelRuntime) -> None:
        """Frames that cannot be sent now: counted under the tunnel's blocking reason,
        or (next hop unresolved) held, up to :data:`PENDING_MAX`, the rest counted."""
        tap = rt.tap
        buf = self._tap_buf
        drops = rt.tunnel.encapsulator.drops
        blocked = rt.blocked if rt.underlay is not None else DropReason.TX_NO_ROUTE
        order = rt.tx_order
        for _ in range(BATCH):
            n = tap.read_into(buf)
            if not n:
                if order is not None:
                    order.drained(self.clock())
                return
            if order is not None:
                order.done()  # dropped or held: the program does not send either way
            if blocked is not None:
                drops.count(blocked, n - VNET_HDR_LEN)
            elif len(rt.pending) < PENDING_MAX:
                rt.pending.append(bytes(buf[:n]))
            else:
                drops.count(DropReason.TX_NO_NEIGHBOUR, n - VNET_HDR_LEN)

    def flush_pending(self, rt: TunnelRuntime) -> None:
        """Send the frames held while the next hop was unresolved (call once it is)."""
        u = rt.ready_underlay()
        if u is None:
            return
        while rt.pending:
            held = rt.pending.popleft()
            self.transmit(rt, u, memoryview(held)[VNET_HDR_LEN:], *VNET_HDR.unpack_from(held))

    def transmit(
        self,
        rt: TunnelRuntime,
        u: Underlay,
        frame: memoryview,
        flags: int,
        gso_type: int,
        hdr_len: int,
        gso_size: int,
        cstart: int,
        coff: int,
    ) -> None:
        """Encapsulate one frame read from the TAP and send it on the underlay."""
        encap = rt.tunnel.encapsulator
        send = u.ports[rt.version].send
        try:
            if rt.config.offload:
                packet = encap.encap_gso(frame, flags, gso_type, gso_size, cstart, coff)
                if packet is not None:
                    if not send(packet):
                        self._send_when_writable(rt, u, packet)
                    return
            vnet = (
                VnetHdr(flags, gso_type, hdr_len, gso_size, cstart, coff)
                if flags or gso_type
                else None
            )
            if rt.config.offload:
                packets = encap.encap(frame, vnet, gso=True)
            else:
                packets = [[VNET_NONE, *parts] for parts in encap.encap(frame, vnet, gso=False)]
            for parts in packets:
                if not send(parts):
                    self._send_when_writable(rt, u, parts)
        except OSError as exc:
            encap.drops.count(DropReason.TX_ERROR, len(frame))
            if exc.errno in _LINK_GONE:
                rt.state = "down"
            if rt.log:
                rt.log.debug("send failed: %s", exc)

    def _send_when_writable(self, rt: TunnelRuntime, u: Underlay, parts: Sequence[Buffer]) -> None:
        """The socket's send buffer is full: wait a little for room (back-pressure, as a
        blocking send would), then send; count the packet as dropped if it stays full."""
        port = u.ports[rt.version]
        if not port.wait_writable(SEND_WAIT) or not port.send(parts):
            rt.tunnel.encapsulator.drops.count(
                DropReason.TX_ERROR, sum(len(p) for p in parts) - VNET_HDR_LEN
            )

    # ------------------------------------------------------------------ wire → TAP
    def on_underlay(self, u: Underlay, port: UnderlayPort | None = None) -> None:
        """Socket ``port`` of ``u`` is readable: receive up to :data:`BATCH` packets
        (``None``: from each of ``u``'s sockets in turn)."""
        if port is None:
            for p in u.receive_ports():
                self.on_underlay(u, p)
            return
        order = u.rx_order
        if order is None:
            self._receive_batch(u, port)
            return
        # The receive program takes a frame itself only while every packet it left
        # to Python (in the bucket of the frame's outer source port) has been
        # handled here (BucketOrder): count each one.
        done = order.done
        for _ in range(BATCH):
            sport = self._receive_one(u, port)
            if sport < 0:
                order.drained(self.clock())
                return
            done(sport)

    def _receive_batch(self, u: Underlay, port: UnderlayPort) -> None:
        """Up to :data:`BATCH` packets from ``port`` (no ordering counters)."""
        for _ in range(BATCH):
            if self._receive_one(u, port) < 0:
                return

    def _receive_one(self, u: Underlay, port: UnderlayPort) -> int:
        """Receive and handle one packet from ``port``: its outer TCP source port
        where the receive program reads it (0 for a packet too short or not IP), or
        -1 if none was waiting (or the socket failed)."""
        buf = self._rx_buf
        mv = self._rx_mv
        try:
            n = port.recv_into(buf)
        except OSError as exc:
            # e.g. ENETDOWN: the kernel reports a link going down once on the
            # bound socket; the socket keeps working when the link comes back.
            self.log.warning("underlay %s: receive failed: %s", u.ifname, exc)
            for down in u.tunnels:
                down.state = "down"
            return -1
        if not n:
            return -1
        if n < _IP_OFFSET or (buf[_ETHERTYPE_AT] << 8 | buf[_ETHERTYPE_AT + 1]) not in (
            _IP_ETHERTYPES
        ):
            return 0  # the BPF filter lets only IP through; a VLAN'd frame, skip
        at = _SPORT_AT_V4 if buf[_ETHERTYPE_AT + 1] == 0x00 else _SPORT_AT_V6
        sport = buf[at] << 8 | buf[at + 1] if n > at + 1 else 0
        flags = buf[0]
        # A partial checksum that is not the outer TCP one (vnet csum_start, bytes
        # 6-7, little-endian) lies inside the STT frame: finish it first.
        if (
            flags & _NEEDS_CSUM
            and buf[6] | buf[7] << 8 != OUTER_L4_AT[buf[_IP_OFFSET]]
            and not self._finish_inner_checksum(buf, mv, n)
        ):
            return sport
        result = self.core.receive(
            mv[_IP_OFFSET:n], self.clock(), csum_ok=bool(flags & _CSUM_TRUSTED),
            room=(buf, _IP_OFFSET),
        )  # fmt: skip
        if result is Pending.KEPT:
            # The reassembler builds a frame in this buffer: receive into another.
            buf = self._rx_buf = self._spare_buffer()
            self._rx_mv = memoryview(buf)
        elif type(result) is Delivered:
            self._deliver(result)
        return sport

    def _finish_inner_checksum(self, buf: bytearray, mv: memoryview, n: int) -> bool:
        """The received packet in ``buf[:n]`` (vnet header + Ethernet) has a partial
        checksum inside its STT frame (a sender that encapsulated in the kernel and
        left the inner checksum to a NIC): finish it in place
        (:func:`~sttun.core.rx_partial.finish_inner_checksum`).  False if it cannot
        be finished: the packet is then counted as dropped."""
        cstart, coff = VNET_HDR.unpack_from(buf)[4:]
        reason = finish_inner_checksum(mv[VNET_HDR_LEN:n], cstart, coff)
        if reason is None:
            return True
        self.core.drops.count(reason, n - _IP_OFFSET)
        return False

    def _deliver(self, result: Delivered) -> None:
        """Write a delivered frame to its tunnel's TAP; count a refused or short write."""
        tunnel, dec, owner = result
        rt = self.tunnel_for(tunnel)
        if rt is not None:
            inner = dec.inner
            try:
                written = rt.tap.write(dec.vnet.pack(), inner)
            except OSError as exc:
                written = -1
                if rt.log:
                    rt.log.debug("TAP write failed: %s", exc)
            if written != VNET_HDR_LEN + len(inner):
                tunnel.drops.count(DropReason.RX_TAP_ERROR, len(inner))
        if owner is not None and owner is not self._rx_buf and len(self._rx_spare) < RX_SPARES:
            self._rx_spare.append(owner)  # the frame built in it is written: reuse

    def _spare_buffer(self) -> bytearray:
        """A receive buffer to use instead of one the reassembler kept."""
        spare = self._rx_spare
        return spare.pop() if spare else bytearray(RECV_SIZE)
