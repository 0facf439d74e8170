"""The software path: finish checksums and segment GSO frames in Python.

A sink without offload support (a TAP without ``IFF_VNET_HDR``, a pcap file, a
socket that cannot take ``PACKET_VNET_HDR``) cannot be handed a frame whose
checksum is "partial" or that is a 64 KB GSO super-packet.  This module does that
work the way the Linux kernel would (protocol.md §4.2, §4.4, §11 #4–#6, #42):

* :func:`finish_checksum` — ``skb_checksum_help``: sum from ``csum_start`` to the
  end (the field already holds the folded pseudo-header sum), complement, store;
  or, for a frame from another sender (``sttun decap``), with the pseudo-header
  recomputed from the inner IP header.
* :func:`segment_gso` — software GSO: TCP segmentation (TSO), UDP segmentation
  (USO, ``UDP_L4``) and UDP fragmentation (UFO, ``UDP``) for IPv4 and IPv6 inner
  frames, with any VLAN tags, IPv4 options, TCP options and IPv6 extension
  headers copied into every piece, and complete, correct checksums.  The
  incoming partial checksum is never trusted: pseudo-header sums are recomputed
  from the addresses and each piece's length (protocol.md §4.2).
* :func:`complete` — what a sink without offloads needs.

Every malformed input raises :class:`sttun.errors.DecodeError` (or its subclass
:class:`~sttun.errors.TruncatedError`) naming the field; no other exception escapes
for any byte string and any :class:`~sttun.wire.vnet.VnetHdr`.

The per-piece work is a handful of integer additions, three or four
``pack_into`` calls, one copy of the header template and of the payload slice,
and one C-speed ``int.from_bytes`` sum over the payload slice.
"""

from __future__ import annotations

import itertools
import os
import struct

from sttun.errors import DecodeError, TruncatedError
from sttun.wire.checksum import fold, ones_sum, ones_sum_parts
from sttun.wire.ether import ETH_P_IP, ETH_P_IPV6, skip_vlan_tags
from sttun.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_FRAG_MASK,
    IPV4_HLEN,
    IPV4_MF,
    IPV6_EXT_HEADERS,
    IPV6_FRAGMENT,
    IPV6_HLEN,
    UDP_HEADER_LEN,
)
from sttun.wire.stt import TCP_CSUM_OFFSET, TCP_HEADER_LEN, UDP_CSUM_OFFSET, TcpFlag
from sttun.wire.vnet import GSO_ECN, GsoType, VnetFlag, VnetHdr

__all__ = ["complete", "finish_checksum", "segment_gso"]

Frame = bytes | bytearray | memoryview

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IPV6_FRAG_HDR = struct.Struct("!BBHI")

IPV6_FRAG_HLEN = 8

_TCP_FIN = int(TcpFlag.FIN)
_TCP_PSH = int(TcpFlag.PSH)
_TCP_CWR = int(TcpFlag.CWR)

_NEXTHDR_HOP = 0
_NEXTHDR_ROUTING = 43
_NEXTHDR_DEST = 60

# IPv6 fragment identifications for UFO; a random start like the kernel's hash.
_ipv6_frag_ids = itertools.count(int.from_bytes(os.urandom(4), "big"))


def finish_checksum(
    frame: bytearray | memoryview,
    csum_start: int,
    csum_offset: int,
    *,
    pseudo_from_headers: bool = False,
) -> None:
    """Complete a partial checksum in place (Linux ``skb_checksum_help``).

    The 16-bit field at ``csum_start + csum_offset`` holds the folded pseudo-header
    sum (not complemented).  The sum of ``frame[csum_start:]`` (that field included)
    is complemented and stored there.  For UDP (``csum_offset == 6``) a result of 0
    is stored as 0xFFFF (RFC 768: 0 would mean "no checksum").

    With ``pseudo_from_headers`` the field is not trusted (senders differ on
    whether the seeded sum includes the length, protocol.md §4.2): the TCP (offset
    16) or UDP pseudo-header sum is recomputed from the IPv4/IPv6 header after the
    Ethernet header and any VLAN tags, and the sum stops where that IP packet ends
    (Ethernet padding is not summed).  Where those headers cannot be followed, the
    field is trusted after all.

    ``frame`` must be writable.  Raises :class:`DecodeError` if the field does not
    lie inside the frame.
    """
    n = len(frame)
    if csum_start < 0 or csum_start > n - 2:
        raise DecodeError("csum_start", f"0..{n - 2}", csum_start)
    pos = csum_start + csum_offset
    if csum_offset < 0 or pos > n - 2:
        raise DecodeError("csum_offset", f"0..{n - 2 - csum_start}", csum_offset)
    pseudo = 0
    end = n
    if pseudo_from_headers:
        found = _pseudo_header(frame, csum_start, csum_offset)
        if found is not None:
            pseudo, end = found
            _U16.pack_into(frame, pos, 0)
    c = ~ones_sum(memoryview(frame)[csum_start:end], pseudo) & 0xFFFF
    if not c and csum_offset == UDP_CSUM_OFFSET:
        c = 0xFFFF
    _U16.pack_into(frame, pos, c)


def _pseudo_header(frame: Frame, csum_start: int, csum_offset: int) -> tuple[int, int] | None:
    """(pseudo-header sum, end of the IP packet) for the L4 checksum at ``csum_start``,
    from the IP header the frame starts with; None if there is none to follow or the
    field lies outside that packet."""
    try:
        etype, l3 = skip_vlan_tags(frame)
    except TruncatedError:
        return None
    n = len(frame)
    if etype == ETH_P_IP and l3 + IPV4_HLEN <= n:
        addresses = frame[l3 + 12 : l3 + 20]
        end = l3 + _U16.unpack_from(frame, l3 + 2)[0]
    elif etype == ETH_P_IPV6 and l3 + IPV6_HLEN <= n:
        addresses = frame[l3 + 8 : l3 + 40]
        end = l3 + IPV6_HLEN + _U16.unpack_from(frame, l3 + 4)[0]
    else:
        return None
    if not csum_start < csum_start + csum_offset + 2 <= end <= n:
        return None
    proto = IPPROTO_TCP if csum_offset == TCP_CSUM_OFFSET else IPPROTO_UDP
    return fold(ones_sum(addresses) + proto + end - csum_start), end


def complete(frame: Frame, vnet: VnetHdr) -> list[bytearray]:
    """Do all the offload work ``vnet`` asks for, for a sink that can do none.

    GSO frames are segmented (:func:`segment_gso`); otherwise a frame flagged
    ``NEEDS_CSUM`` gets its checksum finished; otherwise the frame is returned as
    is.  Always returns new ``bytearray`` objects; ``frame`` is never modified.
    """
    if vnet.gso_type != GsoType.NONE:
        return segment_gso(frame, vnet)
    out = bytearray(frame)
    if vnet.flags & VnetFlag.NEEDS_CSUM:
        finish_checksum(out, vnet.csum_start, vnet.csum_offset)
    return [out]


def segment_gso(frame: Frame, vnet: VnetHdr) -> list[bytearray]:
    """Software GSO of one inner Ethernet frame; returns the pieces in order.

    * ``TCPV4``/``TCPV6`` (ECN bit allowed): the TCP payload is cut into
      ``gso_size`` pieces.  Each piece copies L2 (VLAN tags included), L3 (IPv4
      options, IPv6 extension headers) and the TCP header with its options; gets
      its own IPv4 total length, ID (incremented per piece) and header checksum or
      IPv6 payload length; its own sequence number; CWR only on the first piece,
      FIN/PSH only on the last; and a complete TCP checksum.
    * ``UDP_L4`` (USO): the UDP payload is cut into ``gso_size`` datagrams, each
      with its own UDP length and complete checksum, IPv4 ID incremented.
    * ``UDP`` (UFO): the UDP datagram gets a complete checksum and is then
      IP-fragmented: IPv4 fragments (same ID, MF, offsets; DF cleared) or IPv6
      fragments with a fragment header inserted after the unfragmentable part.
      Every fragment but the last carries ``gso_size`` rounded down to a multiple
      of 8 bytes of fragmentable data.
    * ``NONE``: one piece, checksum finished if ``NEEDS_CSUM``.

    The IP length fields delimit the packet; Ethernet padding after it is dropped.
    A payload that fits in one piece gives one piece with a complete checksum.
    Raises :class:`DecodeError` for anything malformed or inconsistent with the
    GSO type; ``frame`` is never modified.
    """
    gso_type = vnet.gso_type
    base_type = gso_type & ~GSO_ECN
    if base_type == GsoType.NONE and not gso_type & GSO_ECN:
        return complete(frame, vnet)
    if base_type in (GsoType.TCPV4, GsoType.TCPV6):
        proto = IPPROTO_TCP
    elif base_type in (GsoType.UDP, GsoType.UDP_L4) and not gso_type & GSO_ECN:
        proto = IPPROTO_UDP
    else:
        raise DecodeError("gso_type", "NONE, TCPV4, TCPV6 (| ECN), UDP or UDP_L4", gso_type)
    if vnet.gso_size <= 0:
        raise DecodeError("gso_size", ">= 1", vnet.gso_size)

    mv = memoryview(frame)
    if mv.format != "B":
        mv = mv.cast("B")
    etype, l3 = skip_vlan_tags(mv)
    if base_type == GsoType.TCPV4 and etype != ETH_P_IP:
        raise DecodeError("ethertype for GSO TCPV4", hex(ETH_P_IP), hex(etype))
    if base_type == GsoType.TCPV6 and etype != ETH_P_IPV6:
        raise DecodeError("ethertype for GSO TCPV6", hex(ETH_P_IPV6), hex(etype))
    if etype == ETH_P_IP:
        l4, end = _ipv4_bounds(mv, l3, proto)
        nh_pos = unfrag_end = l4
    elif etype == ETH_P_IPV6:
        l4, end, nh_pos, unfrag_end = _ipv6_bounds(mv, l3, proto)
    else:
        raise DecodeError("ethertype for UDP GSO", "0x800 or 0x86dd", hex(etype))

    csum_offset = TCP_CSUM_OFFSET if proto == IPPROTO_TCP else UDP_CSUM_OFFSET
    if vnet.flags & VnetFlag.NEEDS_CSUM:
        if vnet.csum_start != l4:
            raise DecodeError("csum_start", l4, vnet.csum_start)
        if vnet.csum_offset != csum_offset:
            raise DecodeError("csum_offset", csum_offset, vnet.csum_offset)

    v4 = etype == ETH_P_IP
    if proto == IPPROTO_TCP:
        if l4 + TCP_HEADER_LEN > end:
            raise TruncatedError("TCP header", l4 + TCP_HEADER_LEN - l3, end - l3)
        doff = mv[l4 + 12] >> 4
        if doff < 5:
            raise DecodeError("TCP data offset", ">= 5", doff)
        hlen = l4 + doff * 4
        if hlen > end:
            raise TruncatedError("TCP header with options", hlen - l3, end - l3)
        return _split(mv, l3, l4, hlen, end, vnet.gso_size, v4, True)
    if l4 + UDP_HEADER_LEN > end:
        raise TruncatedError("UDP header", l4 + UDP_HEADER_LEN - l3, end - l3)
    (ulen,) = _U16.unpack_from(mv, l4 + 4)
    if ulen != end - l4:
        raise DecodeError("UDP length", end - l4, ulen)
    if base_type == GsoType.UDP_L4:
        return _split(mv, l3, l4, l4 + UDP_HEADER_LEN, end, vnet.gso_size, v4, False)
    return _fragment_udp(mv, l3, l4, end, nh_pos, unfrag_end, vnet.gso_size, v4)


def _ipv4_bounds(frame: Frame, l3: int, proto: int) -> tuple[int, int]:
    """Validate the IPv4 header at ``l3``: returns (L4 offset, end of packet)."""
    n = len(frame)
    if l3 + IPV4_HLEN > n:
        raise TruncatedError("IPv4 header", l3 + IPV4_HLEN, n)
    vihl = frame[l3]
    if vihl >> 4 != 4:
        raise DecodeError("IP version", 4, vihl >> 4)
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_HLEN:
        raise DecodeError("IPv4 header length", ">= 20", ihl)
    if l3 + ihl > n:
        raise TruncatedError("IPv4 header with options", l3 + ihl, n)
    (total,) = _U16.unpack_from(frame, l3 + 2)
    if total < ihl:
        raise DecodeError("IPv4 total length", f">= {ihl}", total)
    if l3 + total > n:
        raise TruncatedError("IPv4 packet", l3 + total, n)
    (frag,) = _U16.unpack_from(frame, l3 + 6)
    if frag & (IPV4_MF | IPV4_FRAG_MASK):
        raise DecodeError("IPv4 fragment bits", "not a fragment", hex(frag))
    if frame[l3 + 9] != proto:
        raise DecodeError("IPv4 protocol", proto, frame[l3 + 9])
    return l3 + ihl, l3 + total


def _ipv6_bounds(frame: Frame, l3: int, proto: int) -> tuple[int, int, int, int]:
    """Validate the IPv6 header chain at ``l3``.

    Returns (L4 offset, end of packet, offset of the next-header byte that names
    the first fragmentable header, end of the unfragmentable part).  The
    unfragmentable part follows the kernel's ``ip6_find_1stfragopt``: hop-by-hop,
    routing, and destination options before a routing header.
    """
    n = len(frame)
    if l3 + IPV6_HLEN > n:
        raise TruncatedError("IPv6 header", l3 + IPV6_HLEN, n)
    if frame[l3] >> 4 != 6:
        raise DecodeError("IP version", 6, frame[l3] >> 4)
    (plen,) = _U16.unpack_from(frame, l3 + 4)
    if not plen:
        raise DecodeError("IPv6 payload length", "1..65535 (no jumbograms)", 0)
    end = l3 + IPV6_HLEN + plen
    if end > n:
        raise TruncatedError("IPv6 packet", end, n)
    nh_field = l3 + 6
    nh = frame[nh_field]
    pos = l3 + IPV6_HLEN
    nh_pos, unfrag_end = nh_field, pos
    in_unfrag = True
    seen_routing = False
    while nh in IPV6_EXT_HEADERS or nh == IPV6_FRAGMENT:
        if nh == IPV6_FRAGMENT:
            raise DecodeError("IPv6 fragment header", "none in a GSO packet", "present")
        if pos + 8 > end:
            raise TruncatedError("IPv6 extension header", pos + 8 - l3, end - l3)
        ext = (frame[pos + 1] + 1) * 8
        if pos + ext > end:
            raise TruncatedError("IPv6 extension header", pos + ext - l3, end - l3)
        if in_unfrag:
            if nh == _NEXTHDR_ROUTING:
                seen_routing = True
            if nh in (_NEXTHDR_HOP, _NEXTHDR_ROUTING) or (nh == _NEXTHDR_DEST and not seen_routing):
                nh_pos, unfrag_end = pos, pos + ext
            else:
                in_unfrag = False
        nh = frame[pos]
        pos += ext
    if nh != proto:
        raise DecodeError("IPv6 next header", proto, nh)
    return pos, end, nh_pos, unfrag_end


def _split(
    mv: memoryview, l3: int, l4: int, hlen: int, end: int, mss: int, v4: bool, tcp: bool
) -> list[bytearray]:
    """Cut the L4 payload ``mv[hlen:end]`` into ``mss`` pieces (TSO or USO)."""
    tmpl = bytearray(mv[:hlen])
    l4_hlen = hlen - l4
    # Zero what changes per piece so that the template sums cover only the rest.
    if tcp:
        seq0, hw12 = struct.unpack_from("!I4xH", mv, l4 + 4)
        flags = hw12 & 0xFF
        _U32.pack_into(tmpl, l4 + 4, 0)  # (pad bytes in a format would be written as 0)
        tmpl[l4 + 13] = 0
        _U16.pack_into(tmpl, l4 + 16, 0)
        l4_base = ones_sum(tmpl[l4:hlen]) + IPPROTO_TCP
    else:
        seq0 = flags = 0
        _U32.pack_into(tmpl, l4 + 4, 0)  # UDP length and checksum
        l4_base = ones_sum(tmpl[l4:hlen]) + IPPROTO_UDP
    if v4:
        l4_base += ones_sum(mv[l3 + 12 : l3 + 20])
        (ip_id,) = _U16.unpack_from(mv, l3 + 4)
        _U16.pack_into(tmpl, l3 + 2, 0)  # total length, ID and checksum change per piece
        _U16.pack_into(tmpl, l3 + 4, 0)
        _U16.pack_into(tmpl, l3 + 10, 0)
        ip_base = ones_sum(tmpl[l3:l4])
    else:
        l4_base += ones_sum(mv[l3 + 8 : l3 + 40])
        ip_id = ip_base = 0
    l3_to_l4 = l4 - l3  # IPv4 header (options) or IPv6 header + extension headers
    v6_ext = l4 - l3 - IPV6_HLEN

    payload = end - hlen
    count = max(1, -(-payload // mss))
    first_flags = flags & ~(_TCP_FIN | _TCP_PSH) if count > 1 else flags
    mid_flags = flags & ~(_TCP_FIN | _TCP_PSH | _TCP_CWR)
    last_flags = flags & ~_TCP_CWR
    pack16 = _U16.pack_into
    pack32 = _U32.pack_into
    out_list: list[bytearray] = []
    a = hlen
    for i in range(count):
        b = a + mss
        if b > end:
            b = end
        data = mv[a:b]
        out = tmpl + data
        l4_len = l4_hlen + (b - a)
        # ones_sum(data) inlined: the little-endian residue is the byte-swapped sum.
        v = int.from_bytes(data, "little") % 0xFFFF
        s = l4_base + l4_len + (((v & 0xFF) << 8) | (v >> 8))
        if tcp:
            f = first_flags if i == 0 else (last_flags if i == count - 1 else mid_flags)
            seq = (seq0 + (a - hlen)) & 0xFFFFFFFF
            s += (seq >> 16) + (seq & 0xFFFF) + f
            pack32(out, l4 + 4, seq)
            out[l4 + 13] = f
            pack16(out, l4 + 16, ~fold(s) & 0xFFFF)
        else:
            s += l4_len  # the UDP length field is summed as well as the pseudo-header's
            pack16(out, l4 + 4, l4_len)
            pack16(out, l4 + 6, (~fold(s) & 0xFFFF) or 0xFFFF)
        if v4:
            total = l3_to_l4 + l4_len
            ident = (ip_id + i) & 0xFFFF
            pack16(out, l3 + 2, total)
            pack16(out, l3 + 4, ident)
            pack16(out, l3 + 10, ~fold(ip_base + total + ident) & 0xFFFF)
        else:
            pack16(out, l3 + 4, v6_ext + l4_len)
        out_list.append(out)
        a = b
    return out_list


def _fragment_udp(
    mv: memoryview,
    l3: int,
    l4: int,
    end: int,
    nh_pos: int,
    unfrag_end: int,
    size: int,
    v4: bool,
) -> list[bytearray]:
    """UFO: complete the UDP checksum, then IP-fragment the datagram."""
    ulen = end - l4
    addr = ones_sum(mv[l3 + 12 : l3 + 20]) if v4 else ones_sum(mv[l3 + 8 : l3 + 40])
    s = addr + IPPROTO_UDP + ulen + ones_sum_parts((mv[l4 : l4 + 6], mv[l4 + 8 : end]))
    csum = (~fold(s) & 0xFFFF) or 0xFFFF
    frag_data = bytearray(mv[unfrag_end:end])
    _U16.pack_into(frag_data, l4 - unfrag_end + UDP_CSUM_OFFSET, csum)
    flen = len(frag_data)
    if flen <= size:
        return [bytearray(mv[:unfrag_end]) + frag_data]
    chunk = size & ~7
    if not chunk:
        raise DecodeError("gso_size", ">= 8 for UDP fragmentation", size)
    fmv = memoryview(frag_data)
    out_list: list[bytearray] = []
    pack16 = _U16.pack_into
    if v4:
        tmpl = bytearray(mv[:unfrag_end])
        ihl = unfrag_end - l3
        _U16.pack_into(tmpl, l3 + 2, 0)
        _U16.pack_into(tmpl, l3 + 6, 0)
        _U16.pack_into(tmpl, l3 + 10, 0)
        ip_base = ones_sum(tmpl[l3:unfrag_end])
        for off in range(0, flen, chunk):
            piece = fmv[off : off + chunk]
            out = tmpl + piece
            total = ihl + len(piece)
            fo = (off >> 3) | (IPV4_MF if off + chunk < flen else 0)
            pack16(out, l3 + 2, total)
            pack16(out, l3 + 6, fo)
            pack16(out, l3 + 10, ~fold(ip_base + total + fo) & 0xFFFF)
            out_list.append(out)
        return out_list
    unfrag_ext = unfrag_end - l3 - IPV6_HLEN
    if unfrag_ext + IPV6_FRAG_HLEN + chunk > 0xFFFF:
        raise DecodeError("IPv6 fragment payload length", "<= 65535", unfrag_ext + 8 + chunk)
    first_nh = mv[nh_pos]
    ident = next(_ipv6_frag_ids) & 0xFFFFFFFF
    tmpl = bytearray(mv[:unfrag_end]) + bytes(IPV6_FRAG_HLEN)
    tmpl[nh_pos] = IPV6_FRAGMENT
    for off in range(0, flen, chunk):
        piece = fmv[off : off + chunk]
        out = tmpl + piece
        more = 1 if off + chunk < flen else 0
        pack16(out, l3 + 4, unfrag_ext + IPV6_FRAG_HLEN + len(piece))
        _IPV6_FRAG_HDR.pack_into(out, unfrag_end, first_nh, 0, off | more, ident)
        out_list.append(out)
    return out_list
