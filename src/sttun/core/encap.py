"""Encapsulation: inner Ethernet frame → STT frame → outer packets.

One :class:`Encapsulator` per tunnel precomputes everything that does not change
per frame (addresses, pseudo-header partial sum, L2 header, header templates).
Two output shapes:

* **GSO sink** (``gso=True``, an ``AF_PACKET`` socket with ``PACKET_VNET_HDR``):
  one *super-packet* per STT frame: a ``virtio_net_hdr`` asking the kernel to cut
  TCP segments of the underlay MSS, the outer headers with the TCP checksum field
  seeded with the pseudo-header sum over the full TCP length (Linux
  ``CHECKSUM_PARTIAL`` convention), the STT header and the inner frame.  The
  kernel (software GSO or NIC TSO) produces the segments: SEQ low half advances by
  the payload size, ACK (the frame id) stays, PSH only on the last.
* **Software** (``gso=False``, pcap files, sinks without offload): the MTU-sized
  outer segments themselves, each with a complete TCP checksum, ACK on all, PSH
  on the last, data offset 5.

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
from typing import NamedTuple

from sttun.core import softpath
from sttun.core.drops import DropCounters, DropReason
from sttun.core.offload import SoftwareReason, tx_offload
from sttun.core.vlan import tx_split_tag
from sttun.errors import DecodeError, EncodeError
from sttun.wire.checksum import add, little_endian_value, ones_sum
from sttun.wire.ip import (
    ECN_CE,
    ECN_ECT0,
    ECN_MASK,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_DF,
    IPV4_HEADER,
    IPV4_HLEN,
    IPV6_HEADER,
    IPV6_HLEN,
)
from sttun.wire.stt import (
    MAX_FRAME_LEN,
    STT_HEADER,
    STT_HEADER_LEN,
    STT_PORT,
    TCP_CSUM_OFFSET,
    TCP_DOFF_BYTE,
    TCP_HEADER,
    TCP_HEADER_LEN,
    SttFlag,
    TcpFlag,
)
from sttun.wire.vnet import VNET_HDR, GsoType, VnetFlag, VnetHdr

Buffer = bytes | bytearray | memoryview
Packet = list[Buffer]

ETH_HLEN = 14
DEFAULT_TTL = 64  # OVS DEFAULT_TTL
DEFAULT_UNDERLAY_MTU = 1500
MIN_UNDERLAY_MTU = 576  # room for outer headers plus a useful segment
SPORT_BASE = 0x8000  # flow-hash source ports fall in 32768..65535 (as OVS-Windows)
SPORT_MASK = 0x7FFF
TX_TCP_FLAGS = TcpFlag.ACK | TcpFlag.PSH  # GSO clears PSH on all but the last segment
TX_TCP_FLAGS_MID = int(TcpFlag.ACK)
TX_WINDOW = 0  # draft §3.2: SHOULD be 0 (OVS sends 0xFFFF; receivers ignore it)

_U16 = struct.Struct("!H")
_IP4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_IP6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")
_HASHED_L4 = (IPPROTO_TCP, IPPROTO_UDP)
_NEEDS_CSUM = int(VnetFlag.NEEDS_CSUM)
_DATA_VALID = int(VnetFlag.DATA_VALID)
_C = int(SttFlag.CSUM_VERIFIED)
_P = int(SttFlag.CSUM_PARTIAL)
_V4 = int(SttFlag.IPV4)
_T = int(SttFlag.TCP)
# Outer IP + TCP-like + STT headers of a super-packet, packed in one call.
_SUPER4 = struct.Struct("!BBHHHBBH4s4sHHIIBBHHHBBBBHHQH")
_SUPER6 = struct.Struct("!IHBB16s16sHHIIBBHHHBBBBHHQH")


class TxFrame(NamedTuple):
    """What one STT frame became on the wire (for stats and tests)."""

    frame_id: int
    frame_len: int
    segments: int


def flow_source_port(frame: Buffer) -> int:
    """A source port from the inner flow: stable per flow, spread over 32768..65535.

    Hashes the IP addresses and, for unfragmented TCP/UDP, the L4 ports; the MAC
    addresses for anything else.  Every segment of a frame and every frame of one
    inner flow get the same port (draft §2.5, protocol.md #45).
    """
    # crc32(b, crc32(a)) == crc32(a + b): where addresses and ports are adjacent
    # (IPv4 without options, IPv6) they are hashed with one call.
    n = len(frame)
    h: int
    if n >= 34 and frame[12] == 0x08 and frame[13] == 0x00:
        ihl = frame[14] & 0x0F
        if frame[23] in _HASHED_L4 and not (frame[20] & 0x3F or frame[21]):
            if ihl == 5:
                h = zlib.crc32(frame[26:38] if n >= 38 else frame[26:34])
            else:
                l4 = 14 + ihl * 4
                h = zlib.crc32(frame[26:34])
                if n >= l4 + 4:
                    h = zlib.crc32(frame[l4 : l4 + 4], h)
        else:
            h = zlib.crc32(frame[26:34])
    elif n >= 54 and frame[12] == 0x86 and frame[13] == 0xDD:
        h = zlib.crc32(frame[22:58] if frame[20] in _HASHED_L4 and n >= 58 else frame[22:54])
    else:
        h = zlib.crc32(frame[0:12])
    return SPORT_BASE | ((h ^ (h >> 15)) & SPORT_MASK)


class Encapsulator:
    """Turns inner Ethernet frames into outer STT packets for one tunnel.

    ``local``/``remote`` are packed 4- or 16-byte addresses of the same family.
    ``tos`` is a DSCP value (0..63) or None to inherit the inner DSCP; ``ttl`` a
    hop limit or None to inherit the inner one.  ECN is always inherited (an inner
    CE becomes ECT(0) outside, as Open vSwitch does).  ``l2`` is the outer
    Ethernet header (14 bytes) or ``b""`` when the sink takes IP packets.
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
        if tos is not None and not 0 <= tos <= 63:
            raise EncodeError(f"tos: expected a DSCP value 0..63 or inherit, got {tos}")
        if ttl is not None and not 1 <= ttl <= 255:
            raise EncodeError(f"ttl: expected 1..255 or inherit, got {ttl}")
        self.local = local
        self.remote = remote
        self.ipv6 = len(local) == 16
        self.context_id = context_id
        self.dst_port = dst_port
        self.tos = tos
        self.ttl = ttl
        self.df = df
        self.fixed_sport = fixed_sport
        self.ip_hlen = IPV6_HLEN if self.ipv6 else IPV4_HLEN
        self.drops = drops if drops is not None else DropCounters()
        self._frame_id = (
            first_frame_id if first_frame_id is not None else int.from_bytes(os.urandom(4))
        ) & 0xFFFFFFFF
        self._ip_ident = first_ip_ident & 0xFFFF
        self.window = window
        # Pseudo-header sum without the length: src + dst + protocol.
        self._pseudo_base = ones_sum(local + remote + bytes((0, IPPROTO_TCP)))
        # IPv4 header sum of the addresses (the other words are added per segment).
        self._ip4_const = ones_sum(local + remote) if not self.ipv6 else 0
        self.l2 = l2
        self.underlay_mtu = underlay_mtu
        # statistics
        self.frames = 0
        self.bytes = 0
        self.segments = 0
        self.software_completions = 0

    # -- configuration that may change while running ---------------------------
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
        # largest inner frame whose outer IP packet still fits 64 KB
        self._fast_max = MAX_FRAME_LEN - self.ip_hlen - TCP_HEADER_LEN - STT_HEADER_LEN

    def next_frame_id(self) -> int:
        """Allocate a frame id (ACK): a 32-bit counter per tunnel, random start."""
        fid = self._frame_id
        self._frame_id = (fid + 1) & 0xFFFFFFFF
        return fid

    # -- the public operation ----------------------------------------------------
    def encap(
        self, frame: Buffer, vnet: VnetHdr | None = None, *, gso: bool = True
    ) -> list[Packet]:
        """Encapsulate one inner Ethernet frame; returns the packets to send.

        ``vnet`` is the overlay stack's offload state for the frame (None: a
        complete, checksummed frame).  Frames whose offloads STT cannot carry are
        completed in software first (each resulting packet its own STT frame,
        flags 0).  A frame that cannot be sent at all is counted as a drop and
        yields an empty list.
        """
        n = len(frame)
        if n < ETH_HLEN:
            self.drops.count(DropReason.TX_BAD_INNER, n)
            return []
        tci, frame = tx_split_tag(frame)
        if tci and vnet is not None and vnet.flags & _NEEDS_CSUM:
            vnet = vnet._replace(csum_start=vnet.csum_start - 4, hdr_len=max(0, vnet.hdr_len - 4))
        n = len(frame)
        if vnet is None or not (vnet.flags or vnet.gso_type):
            return self._emit(frame, 0, 0, 0, tci, gso)
        ethertype = _U16.unpack_from(frame, 12)[0]
        off = tx_offload(vnet, ethertype, n)
        fits = n + STT_HEADER_LEN + TCP_HEADER_LEN + self.ip_hlen <= MAX_FRAME_LEN
        if fits and not isinstance(off, SoftwareReason):
            return self._emit(frame, off.flags, off.l4_offset, off.mss, tci, gso)
        # software completion: finish the checksum / segment the inner packet
        self.software_completions += 1
        try:
            pieces = softpath.complete(frame, vnet)
        except DecodeError:
            self.drops.count(DropReason.TX_BAD_INNER, n)
            return []
        out: list[Packet] = []
        for piece in pieces:
            out.extend(self._emit(piece, 0, 0, 0, tci, gso))
        return out

    # -- internals -----------------------------------------------------------------
    def _emit(
        self, inner: Buffer, flags: int, l4_offset: int, mss: int, tci: int, gso: bool
    ) -> list[Packet]:
        n = len(inner)
        frame_len = n + STT_HEADER_LEN
        if frame_len + TCP_HEADER_LEN + self.ip_hlen > MAX_FRAME_LEN:
            self.drops.count(DropReason.TX_FRAME_TOO_BIG, n)
            return []
        fid = self.next_frame_id()
        sport = self.fixed_sport if self.fixed_sport is not None else flow_source_port(inner)
        tos, ttl = self._outer_tos_ttl(inner)
        self.frames += 1
        self.bytes += n
        stt = STT_HEADER.pack(0, flags, l4_offset, 0, mss, tci, self.context_id, 0)
        seg = self.segment_payload
        if gso:
            nseg = (frame_len + seg - 1) // seg
            self.segments += nseg
            return [self._super_packet(inner, stt, frame_len, fid, sport, tos, ttl, nseg)]
        return self._segments(inner, stt, frame_len, fid, sport, tos, ttl)

    def _outer_tos_ttl(self, inner: Buffer) -> tuple[int, int]:
        """Outer TOS byte (DSCP and ECN) and TTL for this inner frame."""
        et = inner[12:14]
        if et == b"\x08\x00" and len(inner) >= 34:
            itos = inner[15]
            ittl = inner[22]
        elif et == b"\x86\xdd" and len(inner) >= 54:
            itos = ((inner[14] & 0x0F) << 4) | (inner[15] >> 4)
            ittl = inner[21]
        else:
            itos = 0
            ittl = DEFAULT_TTL
        ecn = itos & ECN_MASK
        if ecn == ECN_CE:
            ecn = ECN_ECT0
        dscp = (itos >> 2) if self.tos is None else self.tos
        ttl = self.ttl if self.ttl is not None else (ittl or DEFAULT_TTL)
        return (dscp << 2) | ecn, ttl

    def _pack_ip(self, buf: bytearray, tcp_len: int, tos: int, ttl: int) -> None:
        """Write the outer IP header for a TCP segment of ``tcp_len`` bytes."""
        o = self._l2_len
        if self.ipv6:
            first = (6 << 28) | (tos << 20)
            IPV6_HEADER.pack_into(buf, o, first, tcp_len, IPPROTO_TCP, ttl, self.local, self.remote)
            return
        ident = self._ip_ident
        self._ip_ident = (ident + 1) & 0xFFFF
        IPV4_HEADER.pack_into(
            buf,
            o,
            0x45,
            tos,
            IPV4_HLEN + tcp_len,
            ident,
            IPV4_DF if self.df else 0,
            ttl,
            IPPROTO_TCP,
            0,
            self.local,
            self.remote,
        )
        _U16.pack_into(buf, o + 10, ~ones_sum(buf[o : o + IPV4_HLEN]) & 0xFFFF)

    def _super_packet(
        self,
        inner: Buffer,
        stt: bytes,
        frame_len: int,
        fid: int,
        sport: int,
        tos: int,
        ttl: int,
        nseg: int,
    ) -> Packet:
        buf = self._scratch
        tcp_len = TCP_HEADER_LEN + frame_len
        self._pack_ip(buf, tcp_len, tos, ttl)
        o = self._l2_len + self.ip_hlen
        seed = add(self._pseudo_base, tcp_len)
        TCP_HEADER.pack_into(
            buf, o, sport, self.dst_port, frame_len << 16, fid, TCP_DOFF_BYTE, TX_TCP_FLAGS,
            self.window, seed, 0,
        )  # fmt: skip
        buf[o + TCP_HEADER_LEN :] = stt
        return [self._vnet_gso if nseg > 1 else self._vnet_one, bytes(buf), inner]

    def encap_gso(
        self,
        frame: memoryview,
        flags: int,
        gso_type: int,
        gso_size: int,
        csum_start: int,
        csum_offset: int,
    ) -> Packet | None:
        """Fast path of :meth:`encap` for a GSO sink and the common frames.

        Takes the ``virtio_net_hdr`` fields unpacked.  Handles an untagged IPv4 or
        IPv6 frame that is complete, checksum-verified, or checksum-partial TCP/UDP
        with TCP segmentation of the matching family; returns the one packet to
        send.  Returns None for anything else: call :meth:`encap` then.
        """
        n = len(frame)
        if n < 54 or n > self._fast_max:
            return None
        et = (frame[12] << 8) | frame[13]
        if et == 0x0800:
            v4 = _V4
            tcp_gso = 1
            itos = frame[15]
            ittl = frame[22]
        elif et == 0x86DD:
            v4 = 0
            tcp_gso = 4
            itos = ((frame[14] & 0x0F) << 4) | (frame[15] >> 4)
            ittl = frame[21]
        else:
            return None
        if flags == _NEEDS_CSUM:
            if csum_start > 255 or csum_start < 34:
                return None
            if csum_offset == 16:
                fl = _P | _T | v4
                if gso_type:
                    if gso_type != tcp_gso:
                        return None
                    mss = gso_size
                else:
                    mss = 0
            elif csum_offset == 6 and not gso_type:
                fl = _P | v4
                mss = 0
            else:
                return None
            l4 = csum_start
        elif gso_type:
            return None
        else:
            fl = _C if flags & _DATA_VALID else 0
            l4 = mss = 0
        fid = self._frame_id
        self._frame_id = (fid + 1) & 0xFFFFFFFF
        sport = self.fixed_sport if self.fixed_sport is not None else flow_source_port(frame)
        ecn = itos & 3
        if ecn == 3:
            ecn = 2  # inner CE -> outer ECT(0), as Open vSwitch does
        tos = (((itos >> 2) if self.tos is None else self.tos) << 2) | ecn
        ttl = self.ttl if self.ttl is not None else (ittl or DEFAULT_TTL)
        frame_len = n + STT_HEADER_LEN
        tcp_len = TCP_HEADER_LEN + frame_len
        seed = _fold(self._pseudo_base + tcp_len)
        buf = self._scratch
        if self.ipv6:
            _SUPER6.pack_into(
                buf, self._l2_len, (6 << 28) | (tos << 20), tcp_len, IPPROTO_TCP, ttl,
                self.local, self.remote, sport, self.dst_port, frame_len << 16, fid,
                TCP_DOFF_BYTE, TX_TCP_FLAGS, self.window, seed, 0,
                0, fl, l4, 0, mss, 0, self.context_id, 0,
            )  # fmt: skip
        else:
            ident = self._ip_ident
            self._ip_ident = (ident + 1) & 0xFFFF
            total = IPV4_HLEN + tcp_len
            df = IPV4_DF if self.df else 0
            ipc = ~_fold(self._ip4_const + 0x4500 + tos + total + ident + df + (ttl << 8) + 6)
            _SUPER4.pack_into(
                buf, self._l2_len, 0x45, tos, total, ident, df, ttl, IPPROTO_TCP,
                ipc & 0xFFFF, self.local, self.remote, sport, self.dst_port, frame_len << 16,
                fid, TCP_DOFF_BYTE, TX_TCP_FLAGS, self.window, seed, 0,
                0, fl, l4, 0, mss, 0, self.context_id, 0,
            )  # fmt: skip
        self.frames += 1
        self.bytes += n
        seg = self.segment_payload
        if frame_len > seg:
            self.segments += (frame_len + seg - 1) // seg
            return [self._vnet_gso, buf, frame]
        self.segments += 1
        return [self._vnet_one, buf, frame]

    def _segments(
        self,
        inner: Buffer,
        stt: bytes,
        frame_len: int,
        fid: int,
        sport: int,
        tos: int,
        ttl: int,
    ) -> list[Packet]:
        """The outer segments of one frame, checksums complete.

        Header checksums are computed arithmetically from the field values (no
        bytes are summed twice); only the payload slices are summed.
        """
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
            first = (6 << 28) | (tos << 20)
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
            pack4 = _IP4_TCP.pack
            df = IPV4_DF if self.df else 0
            ip_const = self._ip4_const + (tos | 0x4500) + df + (ttl << 8 | IPPROTO_TCP)
            for i, (size, parts, v) in enumerate(_payloads(mv, stt, sizes)):
                flags = TX_TCP_FLAGS if i == last else TX_TCP_FLAGS_MID
                tcp_len = TCP_HEADER_LEN + size
                ident = self._ip_ident
                self._ip_ident = (ident + 1) & 0xFFFF
                ipc = ~_fold(ip_const + IPV4_HLEN + tcp_len + ident) & 0xFFFF
                c = _checksum_le(v, tcp_const + tcp_len + offset + (TCP_DOFF_BYTE << 8 | flags))
                hdr = pack4(
                    0x45, tos, IPV4_HLEN + tcp_len, ident, df, ttl, IPPROTO_TCP, ipc, self.local,
                    self.remote, sport, dport, (frame_len << 16) | offset, fid, TCP_DOFF_BYTE,
                    flags, window, c, 0,
                )  # fmt: skip
                out.append([l2, hdr, *parts] if l2 else [hdr, *parts])
                offset += size
        self.segments += len(sizes)
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


def _fold(s: int) -> int:
    """Fold a non-negative integer sum of 16-bit words to 16 bits (ones' complement)."""
    # Same as adding the carries back until none is left: 2**16 ≡ 1 (mod 0xFFFF),
    # and a non-zero sum folds to 1..0xFFFF (never to 0).
    if s > 0xFFFF:
        return s % 0xFFFF or 0xFFFF
    return s


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
