"""IPv4/IPv6 header layouts and constants, addresses, and the TCP/UDP pseudo-header sum.

The one reader of a received outer header is :mod:`sttun.core.outer`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from sttun.errors import EncodeError
from sttun.wire.checksum import ones_sum

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
