"""Receive side: finish a partial checksum that lies inside a received STT frame.

A received outer packet whose ``virtio_net_hdr`` says ``NEEDS_CSUM`` normally
points ``csum_start`` at its own outer TCP header: a GSO super-packet from a local
sender whose checksum nobody needed to finish on a veth.  The outer checksum is then
trusted and nothing else is owed.

A sender that encapsulates in the kernel (sttun's own tc-egress transmit program)
can leave a different packet: one whole STT frame in one segment whose *inner*
TCP/UDP checksum is still partial (Linux ``CHECKSUM_PARTIAL``, the field holding
the pseudo-header sum), ``csum_start`` at the inner L4 header, and the outer TCP
checksum already complete as if the inner field held its final value.  A NIC or
``skb_checksum_help`` would finish the inner sum on the way out; over a veth nobody
does, so the receiver must, before the inner frame goes to the TAP as complete.

:func:`finish_inner_checksum` does that, in the receive buffer, for an Ethernet
frame as an ``AF_PACKET`` socket with a vnet header delivers it.  The receive loop
calls it only when :data:`OUTER_L4_AT` says ``csum_start`` is not the outer TCP
header, so the common case costs one table look-up and one compare.

A capture of such a packet (taken on a veth, or on the sending host before the
NIC) has no vnet header to say where the partial checksum is.  The capture tools
recognise it by its bytes instead: the outer checksum fails, the segment is a whole
STT frame, the inner TCP/UDP checksum field holds exactly the Linux pseudo-header
seed (:func:`inner_seed_field`), and the outer checksum verifies once that field is
finished (:func:`finish_captured_seed`).  Finishing is the same
:func:`~sttun.core.softpath.finish_checksum` the receive path uses.
"""

from __future__ import annotations

import struct
from typing import Final

from sttun.core.drops import DropReason
from sttun.core.outer import parse_segment, tcp_checksum_ok
from sttun.core.softpath import finish_checksum
from sttun.errors import DecodeError
from sttun.wire.ether import ETH_HLEN, ETH_P_IP, ETH_P_IPV6
from sttun.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_FRAG_MASK,
    IPV4_HLEN,
    IPV4_MF,
    IPV6_HLEN,
    UDP_HEADER_LEN,
)
from sttun.wire.stt import STT_HEADER_LEN, TCP_CSUM_OFFSET, TCP_HEADER_LEN, UDP_CSUM_OFFSET

__all__ = ["OUTER_L4_AT", "finish_captured_seed", "finish_inner_checksum", "inner_seed_field"]

Buffer = bytes | bytearray | memoryview

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_FOLD: Final = 0xFFFF
#: Per inner L4 protocol: (checksum field offset, shortest header).
_L4_FIELD: Final = {
    IPPROTO_TCP: (TCP_CSUM_OFFSET, TCP_HEADER_LEN),
    IPPROTO_UDP: (UDP_CSUM_OFFSET, UDP_HEADER_LEN),
}


def _outer_l4(first: int) -> int:
    """Where the outer TCP header starts (from the Ethernet header) for an IP header
    whose first byte is ``first``; -1 for a byte no STT packet starts with."""
    if first >> 4 == 4 and first & 0x0F >= 5:
        return ETH_HLEN + (first & 0x0F) * 4
    if first >> 4 == 6:
        return ETH_HLEN + IPV6_HLEN  # extension headers are not followed (outer.py)
    return -1


#: The outer TCP header's offset in an Ethernet frame, indexed by the first byte of
#: its IP header (version and IPv4 header length): what ``csum_start`` is when the
#: partial checksum is the outer one.  -1 where no usable IP header starts so.
OUTER_L4_AT: Final[tuple[int, ...]] = tuple(_outer_l4(b) for b in range(256))


def finish_inner_checksum(
    frame: memoryview, csum_start: int, csum_offset: int
) -> DropReason | None:
    """Finish a partial checksum at ``csum_start`` inside the STT frame of ``frame``.

    ``frame`` is a writable Ethernet frame (Ethernet + outer IP + TCP-like header +
    STT frame) and ``csum_start``/``csum_offset`` the ``virtio_net_hdr`` fields,
    counted from the Ethernet header as an ``AF_PACKET`` socket gives them.  The sum
    runs from ``csum_start`` to the end of the outer IP packet (Ethernet padding is
    left out) and is stored in place, as ``skb_checksum_help`` would store it
    (:func:`~sttun.core.softpath.finish_checksum`).

    Returns None when the packet can go on to :meth:`Endpoint.receive
    <sttun.core.endpoint.Endpoint.receive>` with its outer checksum trusted: the sum
    is finished, or ``csum_start`` is the outer TCP header after all (nothing to do),
    or the outer headers are unusable (the endpoint counts why).  Returns
    :attr:`DropReason.BAD_PARTIAL_CHECKSUM` when the partial checksum cannot be
    finished: it does not start inside the STT frame after its header, the segment
    is not the whole STT frame (a sum over a piece would be wrong), or the field
    lies past the end of the packet.
    """
    seg = parse_segment(frame, ETH_HLEN)
    if isinstance(seg, DropReason):
        return None
    seq, doff, l4, end = seg[5], seg[7], seg[8], seg[9]
    if csum_start == l4 or doff >> 4 != 5:
        return None  # the outer checksum, or a header the endpoint refuses anyway
    payload = l4 + TCP_HEADER_LEN
    if csum_start < payload + STT_HEADER_LEN:
        return DropReason.BAD_PARTIAL_CHECKSUM
    if not _whole_frame(seq, payload, end):
        return DropReason.BAD_PARTIAL_CHECKSUM
    try:
        finish_checksum(frame[:end], csum_start, csum_offset)
    except DecodeError:
        return DropReason.BAD_PARTIAL_CHECKSUM
    return None


def _whole_frame(seq: int, payload: int, end: int) -> bool:
    """True if a segment with SEQ ``seq`` whose payload runs from ``payload`` to
    ``end`` is one whole STT frame (offset 0, frame length == payload length)."""
    return not seq & 0xFFFF and seq >> 16 == end - payload


def inner_seed_field(packet: Buffer, eth: int, end: int) -> tuple[int, int, int] | None:
    """Where a partial inner checksum lies, if the inner frame's field holds the seed.

    ``packet[eth:end]`` is an inner Ethernet frame (EtherType IPv4 or IPv6 right
    after the addresses, no VLAN tag).  Its IP packet must be IPv4 (not a fragment)
    or IPv6 whose next header is directly TCP or UDP, and lie inside ``end``; the
    TCP or UDP checksum field must hold the folded pseudo-header sum including the
    L4 length, not complemented: what Linux leaves in a ``CHECKSUM_PARTIAL``
    packet.  Returns ``(csum_start, csum_offset, ip_end)`` (offsets in ``packet``)
    for :func:`~sttun.core.softpath.finish_checksum` over ``packet[:ip_end]``, or
    None.
    """
    l3 = eth + ETH_HLEN
    if end - l3 < IPV4_HLEN:
        return None
    etype = _U16.unpack_from(packet, eth + 12)[0]
    first = packet[l3]
    if etype == ETH_P_IP and first >> 4 == 4:
        ihl = (first & 0x0F) * 4
        if ihl < IPV4_HLEN or _U16.unpack_from(packet, l3 + 6)[0] & (IPV4_MF | IPV4_FRAG_MASK):
            return None
        proto = packet[l3 + 9]
        l4 = l3 + ihl
        ip_end = l3 + _U16.unpack_from(packet, l3 + 2)[0]
        addrs = packet[l3 + 12 : l3 + 20]
    elif etype == ETH_P_IPV6 and first >> 4 == 6 and end - l3 >= IPV6_HLEN:
        proto = packet[l3 + 6]
        l4 = l3 + IPV6_HLEN
        ip_end = l4 + _U16.unpack_from(packet, l3 + 4)[0]
        addrs = packet[l3 + 8 : l3 + 40]
    else:
        return None
    field = _L4_FIELD.get(proto)
    if field is None:
        return None
    offset, hlen = field
    if ip_end > end or ip_end - l4 < hlen:
        return None
    seed = (int.from_bytes(addrs, "big") + proto + ip_end - l4) % _FOLD or _FOLD
    if _U16.unpack_from(packet, l4 + offset)[0] != seed:
        return None
    return l4, offset, ip_end


def finish_captured_seed(packet: Buffer, l3: int, l4: int, end: int) -> bytearray | None:
    """A captured segment's bytes with its inner partial checksum finished, or None.

    For a segment whose outer TCP checksum failed: the outer IP header at ``l3``,
    the TCP-like header at ``l4`` (20 bytes), the IP packet's end at ``end``.  If
    the segment is one whole STT frame whose inner TCP/UDP checksum field holds the
    pseudo-header seed (:func:`inner_seed_field`), a copy of ``packet[:end]`` gets
    that checksum finished (:func:`~sttun.core.softpath.finish_checksum`); the copy
    is returned if its outer checksum now verifies: the packet is what a kernel
    transmit program sent before the NIC (or ``skb_checksum_help``) finished the
    inner checksum.  None otherwise (``packet`` is never changed).

    A changed byte inside the inner TCP/UDP packet cannot be told apart here: the
    finished checksum covers it, as the NIC's would have.  Changed bytes anywhere
    else (outer, STT or inner Ethernet/IP header, inner addresses) still fail.
    """
    if end - l4 < TCP_HEADER_LEN + STT_HEADER_LEN + ETH_HLEN or packet[l4 + 12] >> 4 != 5:
        return None
    payload = l4 + TCP_HEADER_LEN
    if not _whole_frame(_U32.unpack_from(packet, l4 + 4)[0], payload, end):
        return None
    found = inner_seed_field(packet, payload + STT_HEADER_LEN, end)
    if found is None:
        return None
    csum_start, csum_offset, ip_end = found
    buf = bytearray(packet[:end])
    finish_checksum(memoryview(buf)[:ip_end], csum_start, csum_offset)
    return buf if tcp_checksum_ok(buf, l3, l4, end) else None
