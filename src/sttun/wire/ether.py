"""Inner Ethernet frames: VLAN tags, and where the L3 and L4 headers are.

Used by the sender to decide what can be offloaded (protocol.md §4.1) and by the
software path to finish checksums and re-segment.  Offsets count from the first
byte of the Ethernet header, as STT's L4 offset does.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from sttun.errors import DecodeError, TruncatedError
from sttun.wire.ip import (
    ETH_P_IP,
    ETH_P_IPV6,
    IPV4_FRAG_MASK,
    IPV4_HLEN,
    IPV4_MF,
    IPV6_EXT_HEADERS,
    IPV6_FRAGMENT,
    IPV6_HLEN,
)

ETH_HLEN = 14
ETH_ALEN = 6
TPID_8021Q = 0x8100
TPID_8021AD = 0x88A8
TPID_QINQ_OLD = (0x9100, 0x9200, 0x9300)
VLAN_TPIDS = frozenset({TPID_8021Q, TPID_8021AD, *TPID_QINQ_OLD})
VLAN_HLEN = 4

_U16 = struct.Struct("!H")
_TAG = struct.Struct("!HH")


class FrameInfo(NamedTuple):
    """Where things are in an Ethernet frame.

    ``outer_tpid``/``outer_tci`` describe the first VLAN tag (0 if untagged).
    ``ethertype`` is the type after every tag; ``l3_offset`` where that header
    starts; ``l4_proto``/``l4_offset`` the transport protocol and its offset (0 and
    0 when not IPv4/IPv6 or when the L4 header cannot be found, e.g. a non-first
    fragment).  ``tags`` is the number of VLAN tags stepped over.
    """

    ethertype: int
    l3_offset: int
    l4_proto: int
    l4_offset: int
    outer_tpid: int
    outer_tci: int
    tags: int


def parse_frame(frame: bytes | bytearray | memoryview) -> FrameInfo:
    """Locate the L3/L4 headers of an Ethernet frame (no FCS).

    Raises :class:`TruncatedError` if the frame is shorter than an Ethernet
    header or a VLAN tag it announces.  An IP header that does not fit or is
    inconsistent gives ``l4_offset`` 0 (no L4 found), not an error: it is still a
    valid Ethernet frame to forward.
    """
    n = len(frame)
    if n < ETH_HLEN:
        raise TruncatedError("Ethernet header", ETH_HLEN, n)
    (etype,) = _U16.unpack_from(frame, 12)
    off = ETH_HLEN
    outer_tpid = outer_tci = tags = 0
    while etype in VLAN_TPIDS:
        if off + VLAN_HLEN > n:
            raise TruncatedError("VLAN tag", off + VLAN_HLEN, n)
        tci, inner = _TAG.unpack_from(frame, off)
        if not tags:
            outer_tpid, outer_tci = etype, tci
        tags += 1
        etype = inner
        off += VLAN_HLEN
    l4_proto = l4_off = 0
    if etype == ETH_P_IP and off + IPV4_HLEN <= n:
        vihl = frame[off]
        ihl = (vihl & 0x0F) * 4
        (frag,) = _U16.unpack_from(frame, off + 6)
        if vihl >> 4 == 4 and ihl >= IPV4_HLEN and off + ihl <= n and not frag & IPV4_FRAG_MASK:
            l4_proto = frame[off + 9]
            l4_off = off + ihl
    elif etype == ETH_P_IPV6 and off + IPV6_HLEN <= n and frame[off] >> 4 == 6:
        nh = frame[off + 6]
        pos = off + IPV6_HLEN
        ok = True
        while nh in IPV6_EXT_HEADERS or nh == IPV6_FRAGMENT:
            if pos + 8 > n:
                ok = False
                break
            if nh == IPV6_FRAGMENT:
                (fo,) = _U16.unpack_from(frame, pos + 2)
                if fo & 0xFFF8:  # non-first fragment: no L4 header here
                    ok = False
                    break
                ext = 8
            else:
                ext = (frame[pos + 1] + 1) * 8
            nh = frame[pos]
            pos += ext
        if ok and pos <= n:
            l4_proto, l4_off = nh, pos
    return FrameInfo(etype, off, l4_proto, l4_off, outer_tpid, outer_tci, tags)


def ipv4_is_fragment(frame: bytes | bytearray | memoryview, l3_offset: int) -> bool:
    """True if the IPv4 header at ``l3_offset`` is any fragment (MF or offset set)."""
    if len(frame) < l3_offset + IPV4_HLEN:
        raise TruncatedError("IPv4 header", l3_offset + IPV4_HLEN, len(frame))
    (frag,) = _U16.unpack_from(frame, l3_offset + 6)
    return bool(frag & (IPV4_MF | IPV4_FRAG_MASK))


def pop_vlan(frame: bytes | bytearray | memoryview) -> tuple[int, int, bytes]:
    """Remove the outermost VLAN tag: returns ``(tpid, tci, untagged_frame)``.

    Raises :class:`DecodeError` if the frame has no VLAN tag.
    """
    if len(frame) < ETH_HLEN + VLAN_HLEN:
        raise TruncatedError("VLAN-tagged Ethernet header", ETH_HLEN + VLAN_HLEN, len(frame))
    (tpid,) = _U16.unpack_from(frame, 12)
    if tpid not in VLAN_TPIDS:
        raise DecodeError("Ethernet type", "a VLAN TPID", hex(tpid))
    (tci,) = _U16.unpack_from(frame, 14)
    return tpid, tci, bytes(frame[:12]) + bytes(frame[16:])


def push_vlan(frame: bytes | bytearray | memoryview, tci: int, tpid: int = TPID_8021Q) -> bytes:
    """Insert a VLAN tag after the MAC addresses (the tag becomes the outermost)."""
    if len(frame) < 12:
        raise TruncatedError("Ethernet header", ETH_HLEN, len(frame))
    return bytes(frame[:12]) + _TAG.pack(tpid, tci & 0xFFFF) + bytes(frame[12:])
