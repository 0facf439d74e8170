"""Outer and inner IPv4/IPv6 headers and their TCP/UDP pseudo-header sums."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple

from sttun.errors import DecodeError, EncodeError, TruncatedError
from sttun.wire.checksum import checksum, ones_sum

if TYPE_CHECKING:
    import ipaddress

# ipaddress and socket are imported where used: the capture tools import this
# module for its constants and should start fast.

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV4_HLEN = IPV4_HEADER.size  # 20
IPV6_HEADER = struct.Struct("!IHBB16s16s")
IPV6_HLEN = IPV6_HEADER.size  # 40
IPPROTO_TCP = 6
IPPROTO_UDP = 17
UDP_HEADER_LEN = 8
IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_FRAG_MASK = 0x1FFF

ECN_MASK = 0x03
ECN_NOT_ECT = 0
ECN_ECT1 = 1
ECN_ECT0 = 2
ECN_CE = 3

# IPv6 extension headers that a parser may step over to find the L4 header.
# HBH, routing, destination options, mobility, HIP, shim6.
IPV6_EXT_HEADERS = frozenset({0, 43, 60, 135, 139, 140})
IPV6_FRAGMENT = 44

_PSEUDO4 = struct.Struct("!4s4sBBH")
_PSEUDO6 = struct.Struct("!16s16sIxxxB")


def ip_bytes(addr: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """Packed address bytes (4 or 16) from text, bytes or an ipaddress object."""
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise EncodeError(f"address: expected 4 or 16 bytes, got {len(addr)}")
        return addr
    import ipaddress

    try:
        return ipaddress.ip_address(addr).packed
    except ValueError:
        raise EncodeError(f"address: not an IPv4 or IPv6 address: {addr!r}") from None


def ip_text(packed: bytes | memoryview) -> str:
    """Text form of a packed 4- or 16-byte address."""
    import socket

    b = bytes(packed)
    return socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Ones'-complement sum of the IPv4 or IPv6 pseudo-header (not complemented)."""
    if len(src) == 4:
        return ones_sum(_PSEUDO4.pack(src, dst, 0, proto, length))
    return ones_sum(_PSEUDO6.pack(src, dst, length, proto))


def build_ipv4(
    src: bytes,
    dst: bytes,
    payload_len: int,
    *,
    proto: int = IPPROTO_TCP,
    tos: int = 0,
    ttl: int = 64,
    ident: int = 0,
    df: bool = True,
) -> bytes:
    """A 20-byte IPv4 header with a correct header checksum."""
    total = IPV4_HLEN + payload_len
    if total > 0xFFFF:
        raise EncodeError(f"IPv4 total length: expected <= 65535, got {total}")
    hdr = bytearray(IPV4_HLEN)
    IPV4_HEADER.pack_into(
        hdr, 0, 0x45, tos, total, ident & 0xFFFF, IPV4_DF if df else 0, ttl, proto, 0, src, dst
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr)


def build_ipv6(
    src: bytes,
    dst: bytes,
    payload_len: int,
    *,
    next_header: int = IPPROTO_TCP,
    tclass: int = 0,
    hop_limit: int = 64,
    flow_label: int = 0,
) -> bytes:
    """A 40-byte IPv6 header."""
    if payload_len > 0xFFFF:
        raise EncodeError(f"IPv6 payload length: expected <= 65535, got {payload_len}")
    first = (6 << 28) | ((tclass & 0xFF) << 20) | (flow_label & 0xFFFFF)
    return IPV6_HEADER.pack(first, payload_len, next_header, hop_limit, src, dst)


class IpInfo(NamedTuple):
    """What a receiver needs from an outer IP header."""

    version: int
    header_len: int  # bytes up to the transport header
    total_len: int  # header + payload as the header states it
    proto: int  # transport protocol (after IPv6 extension headers)
    src: bytes
    dst: bytes
    tos: int  # IPv4 TOS or IPv6 traffic class (DSCP << 2 | ECN)
    ttl: int
    is_fragment: bool  # any fragment (IPv4 MF or offset, IPv6 fragment header)


def parse_ip(buf: bytes | bytearray | memoryview, offset: int = 0) -> IpInfo:
    """Decode an IPv4 or IPv6 header at ``offset``.

    Raises :class:`DecodeError` (or :class:`TruncatedError`) with the field name for
    anything that is not a well-formed header that fits in ``buf``.
    """
    have = len(buf) - offset
    if have < 1:
        raise TruncatedError("IP header", IPV4_HLEN, 0)
    version = buf[offset] >> 4
    if version == 4:
        if have < IPV4_HLEN:
            raise TruncatedError("IPv4 header", IPV4_HLEN, have)
        vihl, tos, total, _id, frag, ttl, proto, _c, src, dst = IPV4_HEADER.unpack_from(buf, offset)
        ihl = (vihl & 0x0F) * 4
        if ihl < IPV4_HLEN:
            raise DecodeError("IPv4 header length", ">= 20", ihl)
        if total < ihl or total > have:
            raise DecodeError("IPv4 total length", f"{ihl}..{have}", total)
        is_frag = bool(frag & (IPV4_MF | IPV4_FRAG_MASK))
        return IpInfo(4, ihl, total, proto, src, dst, tos, ttl, is_frag)
    if version == 6:
        if have < IPV6_HLEN:
            raise TruncatedError("IPv6 header", IPV6_HLEN, have)
        first, plen, nh, hop, src, dst = IPV6_HEADER.unpack_from(buf, offset)
        total = IPV6_HLEN + plen
        if total > have:
            raise DecodeError("IPv6 payload length", f"<= {have - IPV6_HLEN}", plen)
        hlen = IPV6_HLEN
        is_frag = False
        while nh in IPV6_EXT_HEADERS or nh == IPV6_FRAGMENT:
            if hlen + 8 > total:
                raise TruncatedError("IPv6 extension header", hlen + 8, total)
            pos = offset + hlen
            if nh == IPV6_FRAGMENT:
                is_frag = True
                ext_len = 8
            else:
                ext_len = (buf[pos + 1] + 1) * 8
            nh = buf[pos]
            hlen += ext_len
            if hlen > total:
                raise TruncatedError("IPv6 extension header", hlen, total)
        tclass = (first >> 20) & 0xFF
        return IpInfo(6, hlen, total, nh, src, dst, tclass, hop, is_frag)
    raise DecodeError("IP version", "4 or 6", version)
