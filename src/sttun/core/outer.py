"""Outer IP + TCP-like header checks for received STT segments (sans-I/O).

Shared by the endpoint's receive path and the capture tools, so both count a bad
outer packet under the same :class:`~sttun.core.drops.DropReason`:

* :func:`parse_segment` — the one classifier of a received outer packet: the
  checks of :func:`parse_outer`, then the TCP-like header's fields.  IPv4 without
  options (every STT sender's packets) is decoded with one ``struct`` call.
* :func:`parse_outer` — IPv4 or IPv6 header checks (version, header and total
  length, protocol TCP, not a fragment, room for the 20-byte TCP-like header).
* :func:`tcp_checksum_ok` — the outer TCP checksum over pseudo-header and segment.
* :func:`checksum_is_partial` — recognises a checksum field that only holds the
  pseudo-header sum: what a packet looks like when captured on the *sending* host
  before the NIC or GSO finished it (Linux ``CHECKSUM_PARTIAL``).

Checksum arithmetic: the Internet checksum of a buffer is its value as one big
integer modulo 0xFFFF (2**16 ≡ 1), so ``int.from_bytes`` plus one modulo does the
whole sum in C.  For IPv4 without options the addresses (bytes 12..20) are
directly followed by the TCP header, and for IPv6 the addresses (8..40) too, so
one slice covers addresses and segment; only protocol and length are added.  The
check is a test for ≡ 0 (mod 0xFFFF): an odd-length slice read big-endian is the
zero-padded value divided by 256, which changes nothing about being ≡ 0 once the
added words are multiplied by 256 as well (256 * 256 ≡ 1).  A part of a slice
followed by an even number of bytes has weight ≡ 1, so parts may be read
separately and added; and ``(v >> k) + (v & (2**k - 1))`` ≡ ``v`` for ``k`` a multiple of 16
("folding"): both make the number the modulo divides smaller, and the modulo
(one hardware division per 30-bit digit) is the slow step.
"""

from __future__ import annotations

import struct
from typing import Final

from sttun.core.drops import DropReason
from sttun.wire.checksum import little_endian_value
from sttun.wire.ip import IPPROTO_TCP, IPV4_FRAG_MASK, IPV4_MF, IPV6_HLEN
from sttun.wire.stt import TCP_CSUM_OFFSET, TCP_HEADER_LEN

__all__ = [
    "OuterFields",
    "Segment",
    "checksum_is_partial",
    "parse_outer",
    "parse_segment",
    "tcp_checksum_ok",
]

Buffer = bytes | bytearray | memoryview

#: ``(src, dst, tos, l4, end)``: packed outer addresses, TOS / traffic class byte,
#: offset of the TCP-like header and end of the IP packet (both from the buffer start).
OuterFields = tuple[bytes, bytes, int, int, int]

#: ``(src, dst, tos, sport, dport, seq, ack, doff, l4, end)``: what
#: :func:`parse_segment` finds — the :data:`OuterFields` plus the TCP-like header's
#: ports, SEQ, ACK and data-offset byte (``doff >> 4`` is the header length in words).
Segment = tuple[bytes, bytes, int, int, int, int, int, int, int, int]

_IPV4_FIXED: Final = struct.Struct("!BBHHHBBH4s4s")
# IPv4 header without options + TCP-like header, the fields parse_segment returns:
# TOS, total length, fragment word, protocol, addresses; ports, SEQ, ACK, data offset.
_V4_TCP: Final = struct.Struct("!xBH2xHxB2x4s4sHHIIB")
_V4_TCP_LEN: Final = 40
_TCP_FIELDS: Final = struct.Struct("!HHIIB")
_IPV6_FIXED: Final = struct.Struct("!IHBB16s16s")
_U16: Final = struct.Struct("!H")
_FOLD: Final = 0xFFFF
# tcp_checksum_ok: slices up to _ONE_READ bytes are read in one piece, up to _CHUNKED
# in two halves, longer ones in chunks; sums are folded at these widths (bits,
# multiples of 16) before the modulo (measured fastest on CPython 3.11 for 1500- and
# 9000-byte MTUs and GRO super-packets).
_ONE_READ: Final = 256
_CHUNKED: Final = 12288
_MASK_5888: Final = (1 << 5888) - 1
_MASK_2944: Final = (1 << 2944) - 1
_MASK_1472: Final = (1 << 1472) - 1
_HALF_MASKS: dict[int, int] = {}
_from_bytes: Final = int.from_bytes


def parse_segment(packet: Buffer, offset: int = 0) -> Segment | DropReason:
    """Classify one received outer packet whose IP header starts at ``offset``.

    Returns :data:`Segment` or the :class:`~sttun.core.drops.DropReason` of
    :func:`parse_outer`.  Neither ports nor checksum nor data offset are judged
    here: the caller decides what its ports are and whether the checksum was
    already verified.
    """
    room = len(packet) - offset
    if room >= _V4_TCP_LEN and packet[offset] == 0x45:
        tos, total, frag, proto, src, dst, sport, dport, seq, ack, doff = _V4_TCP.unpack_from(
            packet, offset
        )
        if proto == IPPROTO_TCP and not frag & 0x3FFF and _V4_TCP_LEN <= total <= room:
            return src, dst, tos, sport, dport, seq, ack, doff, offset + 20, offset + total
    outer = parse_outer(packet, offset)
    if isinstance(outer, DropReason):
        return outer
    src, dst, tos, l4, end = outer
    sport, dport, seq, ack, doff = _TCP_FIELDS.unpack_from(packet, l4)
    return src, dst, tos, sport, dport, seq, ack, doff, l4, end


def parse_outer(packet: Buffer, offset: int = 0) -> OuterFields | DropReason:
    """Check the outer IP header at ``offset`` and locate the TCP-like header.

    Returns ``(src, dst, tos, l4, end)`` or the reason the packet is unusable:
    ``OUTER_BAD_IP`` (not IPv4/IPv6, bad header or total length), ``OUTER_NOT_TCP``,
    ``OUTER_FRAGMENT`` (IPv4), or ``OUTER_TRUNCATED`` (the buffer ends before the IP
    packet does, or no room for the 20-byte TCP-like header).  IPv6 extension headers
    are not followed: STT senders do not use them (``OUTER_NOT_TCP``).
    Bytes after ``end`` (Ethernet padding) are ignored.
    """
    n = len(packet) - offset
    if n < 1:
        return DropReason.OUTER_TRUNCATED
    version = packet[offset] >> 4
    if version == 4:
        if n < 20:
            return DropReason.OUTER_TRUNCATED
        vihl, tos, total, _id, frag, _ttl, proto, _c, src, dst = _IPV4_FIXED.unpack_from(
            packet, offset
        )
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl:
            return DropReason.OUTER_BAD_IP
        if total > n:
            return DropReason.OUTER_TRUNCATED  # the buffer ends before the packet does
        if proto != IPPROTO_TCP:
            return DropReason.OUTER_NOT_TCP
        if frag & (IPV4_MF | IPV4_FRAG_MASK):
            return DropReason.OUTER_FRAGMENT
        l4 = offset + ihl
        end = offset + total
    elif version == 6:
        if n < IPV6_HLEN:
            return DropReason.OUTER_TRUNCATED
        first, plen, nh, _hop, src, dst = _IPV6_FIXED.unpack_from(packet, offset)
        if IPV6_HLEN + plen > n:
            return DropReason.OUTER_TRUNCATED
        if nh != IPPROTO_TCP:
            return DropReason.OUTER_NOT_TCP
        tos = (first >> 20) & 0xFF
        l4 = offset + IPV6_HLEN
        end = l4 + plen
    else:
        return DropReason.OUTER_BAD_IP
    if end - l4 < TCP_HEADER_LEN:
        return DropReason.OUTER_TRUNCATED
    return src, dst, tos, l4, end


def tcp_checksum_ok(packet: Buffer, l3: int, l4: int, end: int) -> bool:
    """True if the TCP segment ``packet[l4:end]`` has a correct checksum.

    ``l3`` is the offset of the IPv4 or IPv6 header the segment belongs to (the
    pseudo-header addresses are read from it).  A checksum field holding 0xFFFF where
    0x0000 is right (Linux ``CSUM_MANGLED_0``) counts as correct.

    Speed (this runs once per received segment, see the module doc for the
    arithmetic): the addresses and the segment are one slice, read big-endian as
    two halves whose values are added (the second of even length, so its weight is
    ≡ 1).  The modulo divides once per 30-bit digit, a slow step, so the sum is
    first folded — ``v >> k`` plus ``v``'s low ``k`` bits, ``k`` a multiple of 16 —
    at fixed widths (5888, 2944 and 1472 bits, constant masks: a 1500-byte MTU's
    segment is folded twice and divided on 52 digits instead of 199) and, for
    jumbo frames, by halves before that (:func:`_fold_halves`).  Slices longer
    than :data:`_CHUNKED` (GRO super-packets) go through
    :func:`~sttun.wire.checksum.little_endian_value`, which reads in chunks and
    folds.
    """
    if l4 - l3 == 20:  # IPv4 without options: addresses (12..20), then the TCP header
        start = l3 + 12
        extra = IPPROTO_TCP + end - l4
    elif packet[l3] >> 4 == 6:  # IPv6: addresses (8..40), then the TCP header
        start = l3 + 8
        extra = IPPROTO_TCP + end - l4
    else:  # IPv4 with options between the addresses and the segment
        start = l4
        extra = IPPROTO_TCP + end - l4 + _from_bytes(packet[l3 + 12 : l3 + 20], "big")
    n = end - start
    if n > _CHUNKED:
        # GRO super-packets: read little-endian in chunks (the extra words go in
        # byte-swapped; an odd length needs no shift in that order).
        extra %= _FOLD
        extra = ((extra & 0xFF) << 8) | (extra >> 8)
        return (little_endian_value(packet[start:end]) + extra) % _FOLD == 0
    # An odd-length slice's big-endian value is the zero-padded one divided by 256,
    # so the extra words are multiplied by 256 as well (256 * 256 ≡ 1).
    if n & 1:
        extra <<= 8
    if n <= _ONE_READ:
        v = _from_bytes(packet[start:end], "big")
    else:
        half = end - ((n >> 2) << 1)
        v = _from_bytes(packet[start:half], "big") + _from_bytes(packet[half:end], "big")
        # v < 2**(4n + 17).  Fold at k where v has well over k bits (a fold leaves
        # at most max(bits - k, k) + 1); a 1500-byte MTU's slice (1488 bytes) is
        # folded at 2944 and 1472 bits.
        if n > 552:
            if n > 1104:
                if n > 2208:
                    if n > 2944:  # jumbo frames
                        v = _fold_halves(v)  # now below 2**8194
                    v = (v >> 5888) + (v & _MASK_5888)
                v = (v >> 2944) + (v & _MASK_2944)
            v = (v >> 1472) + (v & _MASK_1472)
    # ≡ 0 with the extra words added is ≡ -extra without them (one big addition less)
    return v % _FOLD == -extra % _FOLD


def _fold_halves(v: int) -> int:
    """``v`` folded in about halves (at multiples of 4096 bits) to below 2**8194."""
    k = v.bit_length() >> 1
    while k >= 4096:
        k &= ~4095
        mask = _HALF_MASKS.get(k)
        if mask is None:
            mask = _HALF_MASKS[k] = (1 << k) - 1  # at most 64 of them: k < 2**18
        v = (v >> k) + (v & mask)
        k = v.bit_length() >> 1
    return v


def checksum_is_partial(packet: Buffer, l3: int, l4: int, end: int) -> bool:
    """True if the TCP checksum field holds just the pseudo-header sum.

    That is a ``CHECKSUM_PARTIAL`` packet seen before the NIC or GSO completed it
    (a capture on the sending host, a GSO super-packet).  Both conventions are
    recognised: the sum including the TCP length (Linux) and without it (the
    Windows LSO path, protocol.md §4.2).
    """
    if end - l4 < TCP_HEADER_LEN:
        return False
    field = _U16.unpack_from(packet, l4 + TCP_CSUM_OFFSET)[0]
    if packet[l3] >> 4 == 4:
        addrs = packet[l3 + 12 : l3 + 20]
    else:
        addrs = packet[l3 + 8 : l3 + 40]
    base = int.from_bytes(addrs, "big") + IPPROTO_TCP
    for total in (base + end - l4, base):
        s = total % _FOLD or _FOLD  # the folded sum; never 0 here (protocol 6 is in it)
        if field == s:
            return True
    return False
