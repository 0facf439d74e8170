"""Encapsulation: inner Ethernet frame → STT frame → outer packets.

One :class:`Encapsulator` per tunnel precomputes everything that does not change
per frame (addresses, pseudo-header partial sum, L2 header, header templates,
the outer TOS and TTL for every inner value).  Every STT frame is built as a
*super-packet* by one method, :meth:`Encapsulator.encap_gso`; two output shapes:

* **GSO sink** (``gso=True``, an ``AF_PACKET`` socket with ``PACKET_VNET_HDR``):
  the super-packet itself: a ``virtio_net_hdr`` asking the kernel to cut TCP
  segments of the underlay MSS, the outer headers with the TCP checksum field
  seeded with the pseudo-header sum over the full TCP length (Linux
  ``CHECKSUM_PARTIAL`` convention), the STT header and the inner frame.  The
  kernel (software GSO or NIC TSO) produces the segments: SEQ low half advances by
  the payload size, ACK (the frame id) stays, PSH only on the last.
  The daemon asks ``encap_gso`` first for every frame; what it cannot take as it
  is (an 802.1Q tag to move into the STT header, offloads STT cannot carry) goes
  through :meth:`Encapsulator.encap`, which prepares the frame and hands it back to
  ``encap_gso``.
* **Software** (``gso=False``, pcap files, sinks without offload): the super-packet
  cut into the MTU-sized outer segments in Python, each with a complete TCP
  checksum, ACK on all, PSH on the last, data offset 5.

Every output packet is a list of buffers for scatter-gather I/O
(``socket.sendmsg``/``os.writev``); nothing is joined.  The buffers may point into
the caller's frame and into this object's scratch space: send them before the
next call.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence

from sttun.core import softpath
from sttun.core.drops import DropCounters, DropReason
from sttun.core.offload import (
    MAX_OFFLOAD_INNER_LEN,
    TX_OFFLOAD_MEMO,
    tx_offload_fields,
)
from sttun.core.vlan import tx_split_tag
from sttun.errors import DecodeError, EncodeError
from sttun.wire.checksum import fold, little_endian_value, ones_sum
from sttun.wire.ether import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, TPID_8021Q
from sttun.wire.ip import (
    ECN_CE,
    ECN_ECT0,
    ECN_MASK,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_DF,
    IPV4_HLEN,
    IPV6_HLEN,
)
from sttun.wire.stt import (
    MAX_FRAME_LEN,
    STT_HEADER_LEN,
    STT_PORT,
    STT_VERSION,
    TCP_CSUM_OFFSET,
    TCP_DOFF_BYTE,
    TCP_HEADER_LEN,
    TcpFlag,
)
from sttun.wire.vnet import VNET_HDR, GsoType, VnetFlag, VnetHdr

Buffer = bytes | bytearray | memoryview
Packet = list[Buffer]

DEFAULT_TTL = 64  # OVS DEFAULT_TTL
DEFAULT_UNDERLAY_MTU = 1500
MIN_UNDERLAY_MTU = 576  # room for outer headers plus a useful segment
SPORT_BASE = 0x8000  # flow-hash source ports fall in 32768..65535 (as OVS-Windows)
SPORT_MASK = 0x7FFF
TX_TCP_FLAGS = TcpFlag.ACK | TcpFlag.PSH  # GSO clears PSH on all but the last segment
TX_TCP_FLAGS_MID = int(TcpFlag.ACK)
TX_WINDOW = 0  # draft §3.2: SHOULD be 0 (OVS sends 0xFFFF; receivers ignore it)
#: Frame ids (the TCP ACK field) taken here stay in 0..2**31-1 and wrap there: the
#: kernel transmit program of the same tunnel takes its ids with the top bit set, so
#: the two senders never repeat each other's ids (a receiver drops a whole frame
#: with a recently seen (source, destination, frame id) as a late duplicate).
FRAME_ID_MASK = 0x7FFFFFFF

_IP4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_IP6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")
# What _segments reads back from the super-packet's headers.
_IP4_FIRST = struct.Struct("!BBHHHB")  # version/IHL, TOS, total length, ID, DF, TTL
_IP6_FIRST = struct.Struct("!IHBB")  # version/class/label, payload length, next, hop limit
_TCP_PORTS_SEQ_ACK = struct.Struct("!HHII")
_HASHED_L4 = (IPPROTO_TCP, IPPROTO_UDP)
_remembered_offload = TX_OFFLOAD_MEMO.get
_crc32 = zlib.crc32
_NEEDS_CSUM = int(VnetFlag.NEEDS_CSUM)
# Outer IP + TCP-like + STT headers of a super-packet, packed in one call.
_SUPER4 = struct.Struct("!BBHHHBBH4s4sHHIIBBHHHBBBBHHQH")
_SUPER6 = struct.Struct("!IHBB16s16sHHIIBBHHHBBBBHHQH")


def flow_source_port(frame: Buffer, ethertype: int | None = None) -> int:
    """A source port from the inner flow: stable per flow, spread over 32768..65535.

    Hashes the IP addresses and, for unfragmented TCP/UDP, the L4 ports; the MAC
    addresses for anything else.  Every segment of a frame and every frame of one
    inner flow get the same port (draft §2.5, protocol.md #45).  ``ethertype`` is
    the type at byte 12, if the caller has read it already.
    """
    # crc32(b, crc32(a)) == crc32(a + b): where addresses and ports are adjacent
    # (IPv4 without options, IPv6) they are hashed with one call.
    n = len(frame)
    if ethertype is None:
        ethertype = (frame[12] << 8) | frame[13] if n >= ETH_HLEN else 0
    h: int
    if ethertype == ETH_P_IP and n >= 34:
        ihl = frame[14] & 0x0F
        if frame[23] in _HASHED_L4 and not (frame[20] & 0x3F or frame[21]):
            if ihl == 5:
                h = _crc32(frame[26:38] if n >= 38 else frame[26:34])
            else:
                l4 = 14 + ihl * 4
                h = _crc32(frame[26:34])
                if n >= l4 + 4:
                    h = _crc32(frame[l4 : l4 + 4], h)
        else:
            h = _crc32(frame[26:34])
    elif ethertype == ETH_P_IPV6 and n >= 54:
        h = _crc32(frame[22:58] if frame[20] in _HASHED_L4 and n >= 58 else frame[22:54])
    else:
        h = _crc32(frame[0:12])
    return SPORT_BASE | ((h ^ (h >> 15)) & SPORT_MASK)


class Encapsulator:
    """Turns inner Ethernet frames into outer STT packets for one tunnel.

    ``local``/``remote`` are packed 4- or 16-byte addresses of the same family.
    ``tos`` is a DSCP value (0..63) or None to inherit the inner DSCP; ``ttl`` a
    hop limit or None to inherit the inner one.  ECN is always inherited (an inner
    CE becomes ECT(0) outside, as Open vSwitch does).  ``l2`` is the outer
    Ethernet header (14 bytes) or ``b""`` when the sink takes IP packets.
    Frame ids count up from ``first_frame_id`` (default: random) within
    0..2**31-1 (:data:`FRAME_ID_MASK`; a larger start is taken modulo 2**31).

    Every output is built by one method, :meth:`encap_gso`, which the daemon calls
    directly for the frames it can take as they are; :meth:`encap` first moves an
    802.1Q tag into the STT header and completes in software what STT cannot
    carry, then hands each resulting frame to :meth:`encap_gso`, and for a sink
    without offloads cuts the super-packet into finished segments (:meth:`_segments`).
    """

    def __init__(
        self,
        local: bytes,
        remote: bytes,
        context_id: int,
        *,
        dst_port: int = STT_PORT,
        tos: int | None = 0,
        ttl: int | None = DEFAULT_TTL,
        df: bool = True,
        underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
        l2: bytes = b"",
        first_frame_id: int | None = None,
        fixed_sport: int | None = None,
        window: int = TX_WINDOW,
        first_ip_ident: int = 0,
        drops: DropCounters | None = None,
    ) -> None:
        if len(local) not in (4, 16) or len(local) != len(remote):
            raise EncodeError("local and remote must be packed addresses of one family")
        if not 0 <= context_id < 1 << 64:
            raise EncodeError(f"context_id: expected 0..2**64-1, got {context_id}")
        self.local = local
        self.remote = remote
        self.ipv6 = len(local) == 16
        self.context_id = context_id
        self.dst_port = dst_port
        self.tos = tos
        self.ttl = ttl
        # IPv4 header sum of the addresses (the DF bit and the constant words are
        # added by the df setter, the rest per packet).
        self._ip4_addr_sum = ones_sum(local + remote) if len(local) == 4 else 0
        self.fixed_sport = fixed_sport
        self.ip_hlen = IPV6_HLEN if self.ipv6 else IPV4_HLEN
        #: Largest inner frame whose outer IP packet still fits 64 KB (for IPv4 that is
        #: MAX_OFFLOAD_INNER_LEN itself: every frame built may be asked about offloads).
        self.max_inner_len = min(
            MAX_FRAME_LEN - self.ip_hlen - TCP_HEADER_LEN - STT_HEADER_LEN, MAX_OFFLOAD_INNER_LEN
        )
        self.drops = drops if drops is not None else DropCounters()
        # A random start, or the one asked for, in the Python half (FRAME_ID_MASK).
        self._frame_id = (
            first_frame_id if first_frame_id is not None else int.from_bytes(os.urandom(4))
        ) & FRAME_ID_MASK
        self._ip_ident = first_ip_ident & 0xFFFF
        self.window = window
        # Pseudo-header sum without the length: src + dst + protocol.
        self._pseudo_base = ones_sum(local + remote + bytes((0, IPPROTO_TCP)))
        self.df = df
        self.l2 = l2
        self.underlay_mtu = underlay_mtu
        # statistics
        self.frames = 0
        self.bytes = 0
        self.segments = 0
        self.software_completions = 0

    # -- configuration that may change while running ---------------------------
    @property
    def df(self) -> bool:
        """Whether outer IPv4 packets carry the Don't Fragment bit."""
        return self._df_bits != 0

    @df.setter
    def df(self, df: bool) -> None:
        self._df_bits = IPV4_DF if df else 0
        #: The IPv4 header words that never change, summed (version/IHL, DF,
        #: protocol, addresses): a packet adds TOS, length, ID and TTL.
        self._ip4_const = self._ip4_addr_sum + 0x4500 + self._df_bits + IPPROTO_TCP

    @property
    def tos(self) -> int | None:
        """The outer DSCP (0..63), or None to inherit the inner one."""
        return self._tos

    @tos.setter
    def tos(self, dscp: int | None) -> None:
        if dscp is not None and not 0 <= dscp <= 63:
            raise EncodeError(f"tos: expected a DSCP value 0..63 or inherit, got {dscp}")
        self._tos = dscp
        #: The outer TOS byte for each inner TOS byte: DSCP fixed or inherited, ECN
        #: inherited with CE sent as ECT(0) (RFC 6040 normal mode, as Open vSwitch).
        self._outer_tos = bytes(
            ((itos >> 2 if dscp is None else dscp) << 2)
            | (ECN_ECT0 if itos & ECN_MASK == ECN_CE else itos & ECN_MASK)
            for itos in range(256)
        )

    @property
    def ttl(self) -> int | None:
        """The outer TTL / hop limit (1..255), or None to inherit the inner one."""
        return self._ttl

    @ttl.setter
    def ttl(self, ttl: int | None) -> None:
        if ttl is not None and not 1 <= ttl <= 255:
            raise EncodeError(f"ttl: expected 1..255 or inherit, got {ttl}")
        self._ttl = ttl
        #: The outer TTL for each inner TTL (0: no inner IP header, DEFAULT_TTL).
        self._outer_ttl = bytes(ttl if ttl is not None else (i or DEFAULT_TTL) for i in range(256))

    @property
    def l2(self) -> bytes:
        """The outer Ethernet header (or ``b""``)."""
        return self._l2

    @l2.setter
    def l2(self, value: bytes) -> None:
        if value and len(value) != ETH_HLEN:
            raise EncodeError(f"l2 header: expected 14 bytes, got {len(value)}")
        self._l2 = bytes(value)
        self._l2_len = len(value)
        self._hdr_len = self._l2_len + self.ip_hlen + TCP_HEADER_LEN
        self._scratch = bytearray(self._hdr_len + STT_HEADER_LEN)
        self._scratch[: self._l2_len] = self._l2
        self._update_vnet()

    @property
    def underlay_mtu(self) -> int:
        """The underlay IP MTU; sets the segment payload size."""
        return self._mtu

    @underlay_mtu.setter
    def underlay_mtu(self, mtu: int) -> None:
        if mtu < MIN_UNDERLAY_MTU:
            raise EncodeError(f"underlay MTU: expected >= {MIN_UNDERLAY_MTU}, got {mtu}")
        self._mtu = mtu
        #: STT frame bytes per outer segment.
        self.segment_payload = mtu - self.ip_hlen - TCP_HEADER_LEN
        self._update_vnet()

    def _update_vnet(self) -> None:
        """Precompute the two ``virtio_net_hdr`` values a super-packet can carry."""
        if not hasattr(self, "_l2_len") or not hasattr(self, "segment_payload"):
            return
        o = self._l2_len + self.ip_hlen
        gso_type = GsoType.TCPV6 if self.ipv6 else GsoType.TCPV4
        self._vnet_gso = VNET_HDR.pack(
            _NEEDS_CSUM, gso_type, self._hdr_len, self.segment_payload, o, TCP_CSUM_OFFSET
        )
        self._vnet_one = VNET_HDR.pack(_NEEDS_CSUM, 0, 0, 0, o, TCP_CSUM_OFFSET)

    # -- the public operations ---------------------------------------------------
    def encap_gso(
        self,
        frame: Buffer,
        flags: int,
        gso_type: int,
        gso_size: int,
        csum_start: int,
        csum_offset: int,
        tci: int = 0,
    ) -> Packet | None:
        """The GSO super-packet of one inner frame, or None if it needs :meth:`encap`.

        The one place outer packets are built, and the daemon's send path: it is
        asked first for every frame read from the TAP, with the frame's
        ``virtio_net_hdr`` fields unpacked.  It takes a frame that fits one STT
        frame, whose offload state STT carries as it is (:func:`tx_offload_fields`:
        complete, checksum-verified, or checksum-partial TCP/UDP with TCP
        segmentation of the matching family) and that has no 802.1Q tag to move into
        the STT header.  Anything else gives None: :meth:`encap` takes the tag out
        (passing it here as ``tci``, the STT TCI field) and completes in software
        what STT cannot carry, then comes back here.

        Returns ``[vnet header, headers, frame]``: takes the next frame id (and IPv4
        ID), derives the source port from the inner flow and the outer TOS and TTL
        from the inner IP header, and writes outer IP + TCP-like + STT headers with
        one ``pack_into`` into the scratch buffer (after the outer Ethernet header,
        if any): valid until the next call.  The TCP checksum field holds the
        pseudo-header sum over the full TCP length, as Linux expects of a
        ``CHECKSUM_PARTIAL`` packet; the kernel cuts segments of
        :attr:`segment_payload` bytes (SEQ advances by the payload, ACK, the frame
        id, stays).
        """
        n = len(frame)
        if n < ETH_HLEN or n > self.max_inner_len:
            return None
        et = (frame[12] << 8) | frame[13]
        if et == TPID_8021Q and not tci:
            return None  # the tag travels in the STT header: encap() takes it out
        off = _remembered_offload(
            (flags, gso_type, gso_size, csum_start, csum_offset, et)
        ) or tx_offload_fields(flags, gso_type, gso_size, csum_start, csum_offset, et)
        if off is None:
            return None  # STT cannot carry these offloads: encap() completes them
        fl, l4, mss = off
        if et == ETH_P_IP and n >= 34:
            itos = frame[15]
            ittl = frame[22]
        elif et == ETH_P_IPV6 and n >= 54:
            itos = ((frame[14] & 0x0F) << 4) | (frame[15] >> 4)
            ittl = frame[21]
        else:
            itos = ittl = 0
        tos = self._outer_tos[itos]
        ttl = self._outer_ttl[ittl]
        fid = self._frame_id
        self._frame_id = (fid + 1) & FRAME_ID_MASK  # top bit clear: FRAME_ID_MASK
        sport = self.fixed_sport
        if sport is None:
            sport = flow_source_port(frame, et)
        frame_len = n + STT_HEADER_LEN
        tcp_len = TCP_HEADER_LEN + frame_len
        # Sums folded inline: non-zero, so ``% 0xFFFF or 0xFFFF`` (see checksum.fold).
        seed = (self._pseudo_base + tcp_len) % 0xFFFF or 0xFFFF
        buf = self._scratch
        if self.ipv6:
            _SUPER6.pack_into(
                buf, self._l2_len, (6 << 28) | (tos << 20), tcp_len, IPPROTO_TCP, ttl,
                self.local, self.remote, sport, self.dst_port, frame_len << 16, fid,
                TCP_DOFF_BYTE, TX_TCP_FLAGS, self.window, seed, 0,
                STT_VERSION, fl, l4, 0, mss, tci, self.context_id, 0,
            )  # fmt: skip
        else:
            ident = self._ip_ident
            self._ip_ident = (ident + 1) & 0xFFFF
            total = IPV4_HLEN + tcp_len
            ipc = ~((self._ip4_const + tos + total + ident + (ttl << 8)) % 0xFFFF or 0xFFFF)
            _SUPER4.pack_into(
                buf, self._l2_len, 0x45, tos, total, ident, self._df_bits, ttl, IPPROTO_TCP,
                ipc & 0xFFFF, self.local, self.remote, sport, self.dst_port, frame_len << 16,
                fid, TCP_DOFF_BYTE, TX_TCP_FLAGS, self.window, seed, 0,
                STT_VERSION, fl, l4, 0, mss, tci, self.context_id, 0,
            )  # fmt: skip
        self.frames += 1
        self.bytes += n
        seg = self.segment_payload
        if frame_len > seg:
            self.segments += (frame_len + seg - 1) // seg
            return [self._vnet_gso, buf, frame]
        self.segments += 1
        return [self._vnet_one, buf, frame]

    def header_template(self) -> bytes:
        """The outer headers :meth:`encap_gso` writes, with every per-frame field zero.

        Outer Ethernet (:attr:`l2`, which must be set) + IP + TCP-like + STT header:
        addresses, DF, protocol, destination port, data offset, TCP flags, window and
        context id filled in; TOS, TTL, lengths, IPv4 ID and header checksum, source
        port, SEQ, ACK (frame id), the TCP checksum and the STT flags/offset/MSS/TCI
        zero.  The kernel transmit fast path fills those in per frame
        (:mod:`sttun.io.ebpf.tx_program`), with :attr:`outer_tos_table` and
        :attr:`outer_ttl_table`.
        """
        if len(self.l2) != ETH_HLEN:
            raise EncodeError("header template: the outer Ethernet header is not known yet")
        buf = bytearray(ETH_HLEN + self.ip_hlen + TCP_HEADER_LEN + STT_HEADER_LEN)
        buf[:ETH_HLEN] = self.l2
        if self.ipv6:
            _SUPER6.pack_into(
                buf, ETH_HLEN, 6 << 28, 0, IPPROTO_TCP, 0, self.local, self.remote, 0,
                self.dst_port, 0, 0, TCP_DOFF_BYTE, TX_TCP_FLAGS, self.window, 0, 0,
                STT_VERSION, 0, 0, 0, 0, 0, self.context_id, 0,
            )  # fmt: skip
        else:
            _SUPER4.pack_into(
                buf, ETH_HLEN, 0x45, 0, 0, 0, self._df_bits, 0, IPPROTO_TCP, 0, self.local,
                self.remote, 0, self.dst_port, 0, 0, TCP_DOFF_BYTE, TX_TCP_FLAGS, self.window,
                0, 0, STT_VERSION, 0, 0, 0, 0, 0, self.context_id, 0,
            )  # fmt: skip
        return bytes(buf)

    @property
    def outer_tos_table(self) -> bytes:
        """The outer TOS byte for each inner TOS byte (256 entries)."""
        return self._outer_tos

    @property
    def outer_ttl_table(self) -> bytes:
        """The outer TTL for each inner TTL (256 entries; 0 means no inner IP header)."""
        return self._outer_ttl

    @property
    def max_single_inner(self) -> int:
        """The largest inner frame whose STT frame fits one outer segment."""
        return self.segment_payload - STT_HEADER_LEN

    def encap(
        self, frame: Buffer, vnet: VnetHdr | None = None, *, gso: bool = True
    ) -> list[Packet]:
        """Encapsulate one inner Ethernet frame; returns the packets to send.

        ``vnet`` is the overlay stack's offload state for the frame (None: a
        complete, checksummed frame).  An outermost 802.1Q tag moves into the STT
        header; frames whose offloads STT cannot carry are completed in software
        first (each resulting packet its own STT frame, flags 0); each STT frame is
        then built by :meth:`encap_gso`.  ``gso=True`` gives its super-packet
        (headers copied: the packets stay valid together), ``gso=False`` the
        finished outer segments.  A frame that cannot be sent at all is counted as
        a drop and yields an empty list.
        """
        n = len(frame)
        if n < ETH_HLEN:
            self.drops.count(DropReason.TX_BAD_INNER, n)
            return []
        tci, frame = tx_split_tag(frame)
        pieces: Sequence[Buffer]
        if vnet is None or not (vnet.flags or vnet.gso_type):
            pieces = (frame,)  # nothing to complete
        else:
            if tci and vnet.flags & _NEEDS_CSUM:
                vnet = vnet._replace(
                    csum_start=vnet.csum_start - 4, hdr_len=max(0, vnet.hdr_len - 4)
                )
            packet = self.encap_gso(
                frame, vnet.flags, vnet.gso_type, vnet.gso_size, vnet.csum_start,
                vnet.csum_offset, tci,
            )  # fmt: skip
            if packet is not None:
                return self._finish(packet, gso)
            # STT cannot carry these offloads: finish the checksum / segment here
            self.software_completions += 1
            try:
                pieces = softpath.complete(frame, vnet)
            except DecodeError:
                self.drops.count(DropReason.TX_BAD_INNER, len(frame))
                return []
        out: list[Packet] = []
        for piece in pieces:
            packet = self.encap_gso(piece, 0, 0, 0, 0, 0, tci)
            if packet is None:  # too long for one STT frame, or a runt 802.1Q frame
                too_long = len(piece) > self.max_inner_len
                reason = DropReason.TX_FRAME_TOO_BIG if too_long else DropReason.TX_BAD_INNER
                self.drops.count(reason, len(piece))
            else:
                out.extend(self._finish(packet, gso))
        return out

    # -- internals -----------------------------------------------------------------
    def _finish(self, packet: Packet, gso: bool) -> list[Packet]:
        """What :meth:`encap` returns for a super-packet just built: itself, its
        headers copied, or its segments."""
        vnet, headers, inner = packet
        if gso:
            return [[vnet, bytes(headers), inner]]
        return self._segments(inner)

    def _segments(self, inner: Buffer) -> list[Packet]:
        """Cut the super-packet just built for ``inner`` into finished segments.

        What GSO would do, in software, with every checksum complete: the outer
        addresses, TOS, TTL, source port, frame id, first IPv4 ID and STT header
        are those of the super-packet's headers (in the scratch buffer); SEQ's low
        half advances by the payload, IPv4 IDs by one per segment, PSH only on the
        last, and a last segment of 20 bytes or less is lengthened (tshark needs it,
        protocol.md §12.5).  Header checksums are computed arithmetically from the
        field values (no bytes are summed twice); only the payload slices are summed.
        """
        buf = self._scratch
        ip = self._l2_len
        tcp = ip + self.ip_hlen
        sport, _dport, _seq, fid = _TCP_PORTS_SEQ_ACK.unpack_from(buf, tcp)
        stt = bytes(buf[tcp + TCP_HEADER_LEN :])
        frame_len = len(inner) + STT_HEADER_LEN
        sizes = _segment_sizes(frame_len, self.segment_payload)
        mv = inner if isinstance(inner, memoryview) else memoryview(inner)
        out: list[Packet] = []
        l2 = self._l2
        last = len(sizes) - 1
        window = self.window
        dport = self.dst_port
        # TCP header words that do not change between segments, plus the pseudo-header.
        tcp_const = (
            self._pseudo_base + sport + dport + frame_len + (fid >> 16) + (fid & 0xFFFF) + window
        )
        offset = 0
        if self.ipv6:
            first, _plen, _nh, ttl = _IP6_FIRST.unpack_from(buf, ip)
            pack6 = _IP6_TCP.pack
            for i, (size, parts, v) in enumerate(_payloads(mv, stt, sizes)):
                flags = TX_TCP_FLAGS if i == last else TX_TCP_FLAGS_MID
                tcp_len = TCP_HEADER_LEN + size
                c = _checksum_le(v, tcp_const + tcp_len + offset + (TCP_DOFF_BYTE << 8 | flags))
                hdr = pack6(
                    first, tcp_len, IPPROTO_TCP, ttl, self.local, self.remote, sport, dport,
                    (frame_len << 16) | offset, fid, TCP_DOFF_BYTE, flags, window, c, 0,
                )  # fmt: skip
                out.append([l2, hdr, *parts] if l2 else [hdr, *parts])
                offset += size
        else:
            _vihl, tos, _total, ident0, df, ttl = _IP4_FIRST.unpack_from(buf, ip)
            pack4 = _IP4_TCP.pack
            ip_const = self._ip4_const + tos + (ttl << 8)
            for i, (size, parts, v) in enumerate(_payloads(mv, stt, sizes)):
                flags = TX_TCP_FLAGS if i == last else TX_TCP_FLAGS_MID
                tcp_len = TCP_HEADER_LEN + size
                ident = (ident0 + i) & 0xFFFF
                ipc = ~fold(ip_const + IPV4_HLEN + tcp_len + ident) & 0xFFFF
                c = _checksum_le(v, tcp_const + tcp_len + offset + (TCP_DOFF_BYTE << 8 | flags))
                hdr = pack4(
                    0x45, tos, IPV4_HLEN + tcp_len, ident, df, ttl, IPPROTO_TCP, ipc, self.local,
                    self.remote, sport, dport, (frame_len << 16) | offset, fid, TCP_DOFF_BYTE,
                    flags, window, c, 0,
                )  # fmt: skip
                out.append([l2, hdr, *parts] if l2 else [hdr, *parts])
                offset += size
            # the super-packet took one ID, its segments take one each
            self._ip_ident = (ident0 + len(sizes)) & 0xFFFF
        return out


def _payloads(
    mv: memoryview, stt: bytes, sizes: Sequence[int]
) -> Iterator[tuple[int, list[Buffer], int]]:
    """Per segment: its payload size, the payload as parts (STT frame bytes
    ``[offset, offset + size)``; the STT header is a part of the first), and the
    payload read as one little-endian integer (``little_endian_value``, inlined:
    two half reads, each starting at an even position of the segment)."""
    fb = int.from_bytes
    size = sizes[0]
    body = mv[: size - STT_HEADER_LEN]
    yield size, [stt, body], fb(stt, "little") + little_endian_value(body)
    start = size - STT_HEADER_LEN
    for size in sizes[1:]:
        stop = start + size
        mid = start + ((size >> 2) << 1)
        yield size, [mv[start:stop]], fb(mv[start:mid], "little") + fb(mv[mid:stop], "little")
        start = stop


def _checksum_le(value: int, words: int) -> int:
    """TCP checksum from a payload's little-endian value and a (big-endian) word sum."""
    w = words % 0xFFFF
    s = (value + (((w & 0xFF) << 8) | (w >> 8))) % 0xFFFF or 0xFFFF
    return ~(((s & 0xFF) << 8) | (s >> 8)) & 0xFFFF


def _segment_sizes(frame_len: int, seg: int) -> Sequence[int]:
    """Payload sizes of the segments of one frame, last one > 20 bytes if possible."""
    if frame_len <= seg:
        return (frame_len,)
    full, rest = divmod(frame_len, seg)
    sizes = [seg] * full
    if rest:
        sizes.append(rest)
        if rest <= 20:
            sizes[-2] -= 21 - rest
            sizes[-1] = 21
    return sizes
