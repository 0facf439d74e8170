"""The sans-I/O tunnel endpoint: demultiplexing, reassembly, per-tunnel counters.

An :class:`Endpoint` holds any number of :class:`Tunnel` objects and one shared
:class:`~sttun.core.reassembly.Reassembler`.  The I/O layer hands it outer IP
packets (:meth:`Endpoint.receive`) and inner frames (:meth:`Tunnel.transmit`);
time is always an argument.

Receive demultiplexing (issue #6): a segment whose (outer source, outer
destination) pair names no tunnel is dropped *before* reassembly, so strangers
cost no memory; after reassembly the context id picks the tunnel among those of
that peer, and an unknown id is counted and dropped.  A frame can therefore only
reach the tunnel whose remote address *and* key it carries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sttun.core.decap import Decapsulated, Decapsulator, DscpModel
from sttun.core.drops import DropCounters, DropReason
from sttun.core.encap import DEFAULT_TTL, DEFAULT_UNDERLAY_MTU, Encapsulator, Packet
from sttun.core.keys import format_key
from sttun.core.outer import parse_segment, tcp_checksum_ok
from sttun.core.reassembly import Completed, Pending, Reassembler
from sttun.core.vlan import DEFAULT_VLAN_POLICY, VlanPolicy
from sttun.errors import ConfigError
from sttun.wire.stt import MIN_FRAME_LEN, STT_PORT, TCP_HEADER_LEN
from sttun.wire.vnet import VnetHdr

Buffer = bytes | bytearray | memoryview
_CONTEXT_ID = struct.Struct("!Q")  # at byte 8 of the STT header
_new_tuple = tuple.__new__


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    """Everything the core needs to know about one tunnel."""

    name: str
    local: bytes  # packed underlay address (4 or 16 bytes)
    remote: bytes
    in_key: int
    out_key: int
    dst_port: int = STT_PORT
    tos: int | None = None  # DSCP, None = inherit
    ttl: int | None = DEFAULT_TTL  # None = inherit
    df: bool = True
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU
    dscp_model: DscpModel = DscpModel.UNIFORM


@dataclass
class Direction:
    """Frame, byte and segment counts for one direction of a tunnel."""

    frames: int = 0
    bytes: int = 0
    segments: int = 0

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return {"frames": self.frames, "bytes": self.bytes, "segments": self.segments}


@dataclass
class Tunnel:
    """One tunnel: its spec, its encapsulator and its counters."""

    spec: TunnelSpec
    encapsulator: Encapsulator
    decapsulator: Decapsulator
    rx: Direction = field(default_factory=Direction)
    drops: DropCounters = field(default_factory=DropCounters)

    def transmit(self, frame: Buffer, vnet: VnetHdr | None, *, gso: bool) -> list[Packet]:
        """Encapsulate one inner frame; returns the packets (buffer lists) to send."""
        return self.encapsulator.encap(frame, vnet, gso=gso)

    @property
    def tx(self) -> Direction:
        """Transmit counts (kept by the encapsulator)."""
        e = self.encapsulator
        return Direction(e.frames, e.bytes, e.segments)

    def stats(self) -> dict[str, Any]:
        """JSON-ready per-tunnel counters."""
        return {
            "tx": self.tx.as_dict(),
            "rx": self.rx.as_dict(),
            "drops": {**self.drops.as_dict(), **self.encapsulator.drops.as_dict()},
            "software_completions": self.encapsulator.software_completions,
            "vlan_without_v": self.decapsulator.vlan_without_v,
            "ce_marked": self.decapsulator.ce_marked,
        }


class Delivered(NamedTuple):
    """A frame :meth:`Endpoint.receive` delivered: the tunnel it is for, the
    decapsulated frame, and the caller's receive buffer it was built in (the
    caller's again once ``frame.inner`` has been used; None if there is none)."""

    tunnel: Tunnel
    frame: Decapsulated
    buffer: bytearray | None


#: What one :meth:`Endpoint.receive` call did with a packet.
Received = Delivered | Pending | DropReason


class _Peer:
    """Tunnels sharing one (remote, local) underlay address pair, by context id."""

    __slots__ = ("by_key", "segments")

    def __init__(self) -> None:
        self.by_key: dict[int, Tunnel] = {}
        self.segments = 0


class Endpoint:
    """All tunnels of one process, the shared reassembler, and global drop counts."""

    def __init__(
        self,
        *,
        reassembler: Reassembler | None = None,
        vlan_policy: VlanPolicy = DEFAULT_VLAN_POLICY,
    ) -> None:
        self.drops = DropCounters()
        self.reassembler = reassembler if reassembler is not None else Reassembler()
        self.vlan_policy = vlan_policy
        # Classifies frames whose context id names no tunnel (no tunnel's counters).
        self._classifier = Decapsulator(vlan_policy=vlan_policy, dscp_model=DscpModel.PIPE)
        self.tunnels: dict[str, Tunnel] = {}
        self._peers: dict[tuple[bytes, bytes], _Peer] = {}
        self.ports: frozenset[int] = frozenset()
        self.segments_in = 0

    # -- tunnel table ---------------------------------------------------------------
    def add_tunnel(self, spec: TunnelSpec, **encap_kw: Any) -> Tunnel:
        """Create a tunnel.

        Raises :class:`~sttun.errors.ConfigError` if its name is taken or if another
        tunnel has the same demultiplexing key: (local address, remote address,
        ``in_key``).  The destination port is not part of that key (segments to any
        configured port reach every tunnel; the reassembler keys on the outer
        addresses and the frame id, protocol.md), so two tunnels that differ only in
        ``dst_port`` are refused too.  The :class:`~sttun.core.encap.Encapsulator`
        raises :class:`~sttun.errors.EncodeError` for arguments it cannot use (an
        underlay MTU below :data:`~sttun.core.encap.MIN_UNDERLAY_MTU`, ...).
        """
        if spec.name in self.tunnels:
            raise ConfigError(f"tunnel {spec.name!r} exists already")
        peer = self._peers.get((spec.remote, spec.local))
        if peer is not None and spec.in_key in peer.by_key:
            raise ConfigError(
                f"tunnels {peer.by_key[spec.in_key].spec.name!r} and {spec.name!r} have the "
                f"same local address, remote address and in_key ({format_key(spec.in_key)}): "
                "received frames could not be told apart (dst_port is not part of the match)"
            )
        enc = Encapsulator(
            spec.local,
            spec.remote,
            spec.out_key,
            dst_port=spec.dst_port,
            tos=spec.tos,
            ttl=spec.ttl,
            df=spec.df,
            underlay_mtu=spec.underlay_mtu,
            **encap_kw,
        )
        dec = Decapsulator(vlan_policy=self.vlan_policy, dscp_model=spec.dscp_model)
        tunnel = Tunnel(spec, enc, dec)
        if peer is None:
            peer = self._peers[spec.remote, spec.local] = _Peer()
        peer.by_key[spec.in_key] = tunnel
        self.tunnels[spec.name] = tunnel
        self.ports = frozenset(t.spec.dst_port for t in self.tunnels.values())
        return tunnel

    def remove_tunnel(self, name: str) -> Tunnel:
        """Remove a tunnel by name (KeyError if there is none)."""
        tunnel = self.tunnels.pop(name)
        key = (tunnel.spec.remote, tunnel.spec.local)
        peer = self._peers[key]
        del peer.by_key[tunnel.spec.in_key]
        if not peer.by_key:
            del self._peers[key]
        self.ports = frozenset(t.spec.dst_port for t in self.tunnels.values())
        return tunnel

    # -- receive --------------------------------------------------------------------
    def receive(
        self,
        packet: Buffer,
        now: float,
        *,
        csum_ok: bool = False,
        room: tuple[bytearray, int] | None = None,
    ) -> Received:
        """Feed one outer IP packet (starting at the IP header); say what became of it.

        ``csum_ok`` says the kernel or NIC has already validated (or will compute)
        the TCP checksum (``virtio_net_hdr`` DATA_VALID or NEEDS_CSUM); otherwise
        it is verified here.  Returns :class:`Delivered` when this packet completes
        a frame for a tunnel, :class:`~sttun.core.reassembly.Pending` while its frame
        has holes, or the :class:`~sttun.core.drops.DropReason` it was dropped for
        (counted here or in the reassembler).

        The delivered inner frame may point into ``packet``: use it before reusing
        the receive buffer.  ``room = (buffer, offset)``: ``packet`` is
        ``buffer[offset:]`` and the reassembler may keep ``buffer`` to build a frame
        in place: the result is then :attr:`Pending.KEPT <sttun.core.reassembly.Pending.KEPT>`
        (receive into another buffer), and :attr:`Delivered.buffer` gives it back.
        """
        self.segments_in += 1
        seg = parse_segment(packet)
        if isinstance(seg, DropReason):
            return self._drop(seg, len(packet))
        src, dst, tos, _sport, dport, seq, ack, doff, l4, end = seg
        if dport not in self.ports:
            return self._drop(DropReason.WRONG_PORT, len(packet))
        peer = self._peers.get((src, dst))
        if peer is None:
            return self._drop(DropReason.UNKNOWN_SOURCE, len(packet))
        if not csum_ok and not tcp_checksum_ok(packet, 0, l4, end):
            return self._drop(DropReason.BAD_TCP_CHECKSUM, len(packet))
        if doff >> 4 != 5:
            return self._drop(DropReason.BAD_DATA_OFFSET, len(packet))
        mv = packet if type(packet) is memoryview else memoryview(packet)
        peer.segments += 1
        start = l4 + TCP_HEADER_LEN
        done = self.reassembler.add(
            src, dst, ack, seq, mv[start:end], now, tos,
            None if room is None else (room[0], room[1] + start),
        )  # fmt: skip
        if type(done) is not Completed:
            return done  # type: ignore[return-value]  # Pending or DropReason
        frame, first_tos, ce, segments, owner = done
        # The context id picks the tunnel, whose decapsulator (DSCP model, counters)
        # then runs; a frame for no tunnel is still classified (too short, bad
        # version, ...) before it counts as an unknown context.
        target = None
        if len(frame) >= MIN_FRAME_LEN:
            target = peer.by_key.get(_CONTEXT_ID.unpack_from(frame, 8)[0])
        dec = target.decapsulator if target is not None else self._classifier
        result = dec.decap(frame, first_tos, ce)
        if isinstance(result, DropReason):
            return self._drop(result, len(frame))
        if target is None:
            return self._drop(DropReason.UNKNOWN_CONTEXT, len(frame))
        rx = target.rx
        rx.frames += 1
        rx.bytes += len(result.inner)
        rx.segments += segments
        return _new_tuple(Delivered, (target, result, owner))

    def _drop(self, reason: DropReason, nbytes: int) -> DropReason:
        """Count a receive-side drop of ``nbytes``; return its reason."""
        self.drops.count(reason, nbytes)
        return reason

    # -- time -----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` should next be called (None: nothing pending)."""
        return self.reassembler.next_deadline()

    def handle_timeout(self, now: float) -> int:
        """Expire partial frames; returns how many were dropped."""
        return self.reassembler.handle_timeout(now)

    # -- reporting ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """JSON-ready counters: per tunnel, global drops, reassembly."""
        drops = self.drops.as_dict()
        for reason, count in self.reassembler.drops.as_dict().items():
            drops[reason] = drops.get(reason, 0) + count
        tunnels = {}
        for name, t in self.tunnels.items():
            s = t.stats()
            tunnels[name] = s
        return {
            "segments_in": self.segments_in,
            "drops": drops,
            "reassembly": self.reassembler.stats(),
            "tunnels": tunnels,
        }
