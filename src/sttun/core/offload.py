"""Offload mapping between Linux ``virtio_net_hdr`` and STT flags (protocol.md §4).

Every row is a table entry so tests can iterate over it:

* :data:`TX_GSO_WHITELIST` — the inner GSO types a sender may hand to the peer as
  an STT MSS (OVS ``SUPPORTED_GSO_TYPES`` minus UDP/UFO, which current kernels
  dropped; anything else is segmented in software before encapsulation).
* :data:`RX_OFFLOAD_MAP` — what the (V, T) flag pair means on receipt: checksum
  offset, GSO type, and the smallest legal L4 offset and L4 header length.

:func:`tx_offload` decides, for one frame from the overlay stack, which STT
flags/L4 offset/MSS to send or that the frame must be completed in software
(:func:`tx_offload_fields` is the same answer, remembered, for the send path).
:func:`rx_vnet` turns a received STT header into the ``virtio_net_hdr`` for the TAP.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from sttun.core.drops import DropReason
from sttun.wire.ether import ETH_HLEN, ETH_P_IP, ETH_P_IPV6
from sttun.wire.ip import IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, UDP_HEADER_LEN
from sttun.wire.stt import (
    MAX_FRAME_LEN,
    STT_HEADER_LEN,
    TCP_CSUM_OFFSET,
    TCP_HEADER_LEN,
    UDP_CSUM_OFFSET,
    SttFlag,
)
from sttun.wire.vnet import GSO_ECN, GsoType, VnetFlag, VnetHdr

MAX_L4_OFFSET = 0xFF  # 8-bit L4 offset field
#: Largest inner frame that may keep its offloads: inner + 20 (TCP) + 18 (STT) + 20
#: (IPv4) must fit 65535 (OVS ``stt_can_offload``).
MAX_OFFLOAD_INNER_LEN = MAX_FRAME_LEN - TCP_HEADER_LEN - STT_HEADER_LEN - IPV4_HLEN  # 65477

#: Inner GSO types an STT sender may pass on as MSS (OVS whitelist, protocol.md §4.1).
TX_GSO_WHITELIST: frozenset[int] = frozenset({GsoType.NONE, GsoType.TCPV4, GsoType.TCPV6})

#: GSO type the inner packet's L3/L4 pair requires for TCP segmentation offload.
TX_GSO_FOR_L3: dict[int, int] = {ETH_P_IP: GsoType.TCPV4, ETH_P_IPV6: GsoType.TCPV6}

#: The csum_offset of each inner L4 protocol (and back).
CSUM_OFFSET_BY_L4: dict[int, int] = {IPPROTO_TCP: TCP_CSUM_OFFSET, IPPROTO_UDP: UDP_CSUM_OFFSET}
L4_BY_CSUM_OFFSET: dict[int, int] = {v: k for k, v in CSUM_OFFSET_BY_L4.items()}


class RxOffload(NamedTuple):
    """What the receiver does for one (IPv4?, TCP?) flag pair when P is set."""

    csum_offset: int
    gso_type: int  # used when MSS != 0
    min_l4_offset: int  # smallest legal L4 offset (Ethernet + minimal IP header)
    l4_header_len: int  # smallest L4 header that must fit in the frame


#: (V flag set, T flag set) → receive offload (OVS ``set_offloads``, protocol.md §4.2).
#: UDP with MSS ≠ 0 would be UFO; current kernels cannot take it, so it maps to
#: GSO NONE and the datagram is delivered with only its checksum partial.
RX_OFFLOAD_MAP: dict[tuple[bool, bool], RxOffload] = {
    (True, True): RxOffload(TCP_CSUM_OFFSET, GsoType.TCPV4, ETH_HLEN + IPV4_HLEN, TCP_HEADER_LEN),
    (False, True): RxOffload(TCP_CSUM_OFFSET, GsoType.TCPV6, ETH_HLEN + IPV6_HLEN, TCP_HEADER_LEN),
    (True, False): RxOffload(UDP_CSUM_OFFSET, GsoType.NONE, ETH_HLEN + IPV4_HLEN, UDP_HEADER_LEN),
    (False, False): RxOffload(UDP_CSUM_OFFSET, GsoType.NONE, ETH_HLEN + IPV6_HLEN, UDP_HEADER_LEN),
}


# Plain-int copies of the flag bits for the per-packet paths (enum arithmetic is slow).
_C = int(SttFlag.CSUM_VERIFIED)
_P = int(SttFlag.CSUM_PARTIAL)
_V4 = int(SttFlag.IPV4)
_T = int(SttFlag.TCP)
_NEEDS_CSUM = int(VnetFlag.NEEDS_CSUM)
_DATA_VALID = int(VnetFlag.DATA_VALID)
#: RX_OFFLOAD_MAP indexed by the flag byte's V|T bits.
_RX_BY_BITS: dict[int, RxOffload] = {
    (_V4 if v4 else 0) | (_T if tcp else 0): row for (v4, tcp), row in RX_OFFLOAD_MAP.items()
}


class SoftwareReason(enum.Enum):
    """Why a frame's offloads must be completed in software before sending (§4.1)."""

    TOO_LONG = "inner frame longer than 65477 bytes"
    L4_OFFSET = "L4 offset inside the IP header or beyond 255"
    GSO_TYPE = "GSO type not in the whitelist"
    NOT_IP = "checksum offload on a frame that is not plain IPv4/IPv6"
    L4_PROTO = "checksum offload on an L4 protocol other than TCP/UDP"
    MISMATCH = "GSO type disagrees with the inner L3 protocol"


class TxOffload(NamedTuple):
    """STT header fields derived from the inner frame's offload state."""

    flags: int
    l4_offset: int
    mss: int


TX_NONE = TxOffload(0, 0, 0)
TX_VERIFIED = TxOffload(int(SttFlag.CSUM_VERIFIED), 0, 0)


def tx_offload(vnet: VnetHdr, ethertype: int, inner_len: int) -> TxOffload | SoftwareReason:
    """Map the overlay stack's ``virtio_net_hdr`` to STT offload fields.

    ``ethertype`` is the inner frame's type at byte 12 (after any 802.1Q tag that
    travels in the STT header has been removed): a frame with a remaining in-band
    tag (802.1ad, or a second tag) is not offloadable.  Returns the fields to send,
    or a :class:`SoftwareReason` when checksum/segmentation must be done here first.
    The L4 offset sent is one the receiver accepts (:data:`RX_OFFLOAD_MAP`: room for
    Ethernet and a minimal IP header, at most 255): never a wrong offload header
    (protocol.md §11 #42).  This is the only statement of these rules;
    :func:`tx_offload_fields` remembers its answers for the send path.
    """
    flags = vnet.flags
    gso = vnet.gso_type
    if gso & GSO_ECN or gso not in TX_GSO_WHITELIST:
        return SoftwareReason.GSO_TYPE
    if not flags & _NEEDS_CSUM:
        if gso:
            return SoftwareReason.GSO_TYPE  # GSO without partial checksum: not a state we accept
        return TX_VERIFIED if flags & _DATA_VALID else TX_NONE
    if inner_len > MAX_OFFLOAD_INNER_LEN:
        return SoftwareReason.TOO_LONG
    if ethertype == ETH_P_IP:
        flags_out = _P | _V4
    elif ethertype == ETH_P_IPV6:
        flags_out = _P
    else:
        return SoftwareReason.NOT_IP
    l4 = L4_BY_CSUM_OFFSET.get(vnet.csum_offset)
    if l4 is None:
        return SoftwareReason.L4_PROTO
    if l4 == IPPROTO_TCP:
        flags_out |= _T
    l4_offset = vnet.csum_start
    if not _RX_BY_BITS[flags_out & (_V4 | _T)].min_l4_offset <= l4_offset <= MAX_L4_OFFSET:
        return SoftwareReason.L4_OFFSET
    mss = 0
    if gso:
        if l4 != IPPROTO_TCP or TX_GSO_FOR_L3[ethertype] != gso:
            return SoftwareReason.MISMATCH
        mss = vnet.gso_size
    return TxOffload(flags_out, l4_offset, mss)


def tx_offload_fields(
    flags: int, gso_type: int, gso_size: int, csum_start: int, csum_offset: int, ethertype: int
) -> TxOffload | None:
    """:func:`tx_offload` for the unpacked ``virtio_net_hdr`` fields of a frame of at
    most :data:`MAX_OFFLOAD_INNER_LEN` bytes, remembered; None where it gives a
    :class:`SoftwareReason`.

    The send path (``Encapsulator.encap_gso``) asks this for every frame; a tunnel
    sees a handful of distinct headers (one per MSS and header layout), so each
    answer is computed by :func:`tx_offload` once and then looked up.
    """
    key = (flags, gso_type, gso_size, csum_start, csum_offset, ethertype)
    if key in TX_OFFLOAD_MEMO:
        return TX_OFFLOAD_MEMO[key]
    if len(TX_OFFLOAD_MEMO) >= _MEMO_MAX:
        TX_OFFLOAD_MEMO.clear()
    off = tx_offload(VnetHdr(flags, gso_type, 0, gso_size, csum_start, csum_offset), ethertype, 0)
    TX_OFFLOAD_MEMO[key] = result = off if isinstance(off, TxOffload) else None
    return result


#: :func:`tx_offload_fields`' answers by its arguments (the key), cleared when full:
#: a bound against a stack that varies them all.  The send path looks a key up here
#: first and calls :func:`tx_offload_fields` when that gives None (saving a call per
#: frame).
TX_OFFLOAD_MEMO: dict[tuple[int, int, int, int, int, int], TxOffload | None] = {}
_MEMO_MAX = 256


def rx_vnet(flags: int, l4_offset: int, mss: int, inner_len: int) -> VnetHdr | DropReason:
    """The ``virtio_net_hdr`` for a received inner frame, or why it is dropped.

    P wins over C (protocol.md §11 #9); with P clear, MSS and L4 offset are ignored
    (#10).  With P set the L4 offset must leave room for Ethernet plus a minimal IP
    header (#7) and the L4 header must fit in the frame (#8).
    """
    if not flags & _P:
        return VNET_DATA_VALID if flags & _C else VNET_NONE_HDR
    bits = flags & (_V4 | _T)
    csum_offset, gso_type, min_l4, l4_len = _RX_BY_BITS[bits]
    if l4_offset < min_l4 or l4_offset + l4_len > inner_len:
        return DropReason.BAD_L4_OFFSET
    if not gso_type:
        mss = 0
    key = (bits, l4_offset, mss)
    vnet = _RX_VNET_MEMO.get(key)
    if vnet is None:
        if len(_RX_VNET_MEMO) >= _MEMO_MAX:
            _RX_VNET_MEMO.clear()
        if mss:
            vnet = VnetHdr(_NEEDS_CSUM, gso_type, l4_offset + l4_len, mss, l4_offset, csum_offset)
        else:
            vnet = VnetHdr(_NEEDS_CSUM, 0, 0, 0, l4_offset, csum_offset)
        _RX_VNET_MEMO[key] = vnet
    return vnet


#: rx_vnet's results by (V|T bits, L4 offset, MSS): a tunnel sees a handful of
#: combinations, so the headers are built once (immutable tuples, safe to share).
_RX_VNET_MEMO: dict[tuple[int, int, int], VnetHdr] = {}


VNET_NONE_HDR = VnetHdr()
VNET_DATA_VALID = VnetHdr(flags=VnetFlag.DATA_VALID)
