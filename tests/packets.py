"""Outer packet builders for tests, fuzz targets and benchmarks.

sttun itself builds outer headers in one ``struct`` call per packet
(:class:`sttun.core.encap.Encapsulator`) and reads them with
:func:`sttun.core.outer.parse_segment`; these builders make the packets, good and
bad, that tests hand to that reader.  They take packed addresses
(:func:`sttun.wire.ip.ip_bytes`); :mod:`tests.netns` has text-address builders
for the namespace tests.
"""

from __future__ import annotations

import struct

from sttun.wire.checksum import checksum
from sttun.wire.ip import IPPROTO_TCP, IPPROTO_UDP, IPV4_DF, IPV4_HEADER, IPV4_HLEN, IPV6_HEADER
from sttun.wire.stt import MAX_FRAME_LEN, TCP_HEADER, TcpFlag
from tests.reference import naive_sum

#: Ethernet addresses of :func:`inner_l4_frame` (destination, source).
INNER_MACS = bytes.fromhex("020000000002020000000001")

__all__ = ["build_ipv4", "build_ipv6", "inner_l4_frame", "pack_tcp"]


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
        raise ValueError(f"IPv4 total length: expected <= 65535, got {total}")
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
        raise ValueError(f"IPv6 payload length: expected <= 65535, got {payload_len}")
    first = (6 << 28) | ((tclass & 0xFF) << 20) | (flow_label & 0xFFFFF)
    return IPV6_HEADER.pack(first, payload_len, next_header, hop_limit, src, dst)


def pack_tcp(
    sport: int,
    dport: int,
    frame_len: int,
    offset: int,
    frame_id: int,
    flags: int = TcpFlag.ACK | TcpFlag.PSH,
    *,
    window: int = 0,
    checksum: int = 0,
    data_offset: int = 5,
    urgent: int = 0,
) -> bytes:
    """A 20-byte TCP-like header: SEQ = ``frame_len << 16 | offset``, ACK = ``frame_id``.

    Out-of-range fields raise ``ValueError`` (``struct.error`` for the plain ones).
    """
    if not 0 <= frame_len <= MAX_FRAME_LEN or not 0 <= offset <= MAX_FRAME_LEN:
        raise ValueError(f"frame_len / offset: expected 0..65535, got {frame_len}, {offset}")
    return TCP_HEADER.pack(
        sport,
        dport,
        (frame_len << 16) | offset,
        frame_id,
        data_offset << 4,
        flags,
        window,
        checksum,
        urgent,
    )


def inner_l4_frame(src: bytes, dst: bytes, proto: int, payload: bytes, *, seeded: bool) -> bytes:
    """An inner Ethernet + IPv4/IPv6 (by the address length) + TCP or UDP frame.

    ``seeded``: the L4 checksum field holds the folded pseudo-header sum, as Linux
    leaves it in a ``CHECKSUM_PARTIAL`` packet; else the complete checksum (UDP: 0
    sent as 0xFFFF).  Summed with :func:`tests.reference.naive_sum`.
    """
    if proto == IPPROTO_TCP:
        l4 = bytearray(pack_tcp(40000, 5001, 0, 0, 0, TcpFlag.ACK, window=512)) + payload
        coff = 16
    elif proto == IPPROTO_UDP:
        l4 = bytearray(struct.pack("!HHHH", 40000, 5001, 8 + len(payload), 0)) + payload
        coff = 6
    else:
        raise ValueError(f"proto: expected TCP or UDP, got {proto}")
    pseudo = src + dst + struct.pack("!HH", proto, len(l4))
    if seeded:
        struct.pack_into("!H", l4, coff, naive_sum(pseudo))
    else:
        struct.pack_into("!H", l4, coff, (~naive_sum(pseudo + l4) & 0xFFFF) or 0xFFFF)
    if len(src) == 4:
        return INNER_MACS + b"\x08\x00" + build_ipv4(src, dst, len(l4), proto=proto) + l4
    return INNER_MACS + b"\x86\xdd" + build_ipv6(src, dst, len(l4), next_header=proto) + l4
