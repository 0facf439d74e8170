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
"""

from __future__ import annotations

from typing import Final

from sttun.core.drops import DropReason
from sttun.core.outer import parse_segment
from sttun.core.softpath import finish_checksum
from sttun.errors import DecodeError
from sttun.wire.ether import ETH_HLEN
from sttun.wire.ip import IPV6_HLEN
from sttun.wire.stt import STT_HEADER_LEN, TCP_HEADER_LEN

__all__ = ["OUTER_L4_AT", "finish_inner_checksum"]


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
    if seq & 0xFFFF or seq >> 16 != end - payload:
        return DropReason.BAD_PARTIAL_CHECKSUM
    try:
        finish_checksum(frame[:end], csum_start, csum_offset)
    except DecodeError:
        return DropReason.BAD_PARTIAL_CHECKSUM
    return None
