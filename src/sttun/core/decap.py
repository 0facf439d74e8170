"""Decapsulation: a complete STT frame → inner Ethernet frame + offload state.

:class:`Decapsulator` is the receive-path version: it never raises, it returns a
:class:`~sttun.core.drops.DropReason` instead.  :func:`decapsulate` is the public,
raising form for tools and library users.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from sttun.core.drops import DropReason
from sttun.core.offload import rx_vnet
from sttun.core.vlan import DEFAULT_VLAN_POLICY, VlanPolicy, insert_tag, rx_tag_tci
from sttun.errors import DecodeError, TruncatedError
from sttun.wire.checksum import update16
from sttun.wire.ether import ETH_HLEN, ETH_P_IP, ETH_P_IPV6
from sttun.wire.ip import ECN_CE, ECN_MASK, ECN_NOT_ECT
from sttun.wire.stt import (
    MIN_FRAME_LEN,
    STT_HEADER,
    STT_HEADER_LEN,
    STT_VERSION,
    VLAN_V_MASK,
    SttHeader,
)
from sttun.wire.vnet import VnetFlag, VnetHdr

Buffer = bytes | bytearray | memoryview
_U16 = struct.Struct("!H")
_NEEDS_CSUM = int(VnetFlag.NEEDS_CSUM)


class DscpModel(enum.Enum):
    """How the outer DSCP relates to the inner one on decapsulation (RFC 2983)."""

    UNIFORM = "uniform"  # the inner packet takes the DSCP of the offset-0 segment
    PIPE = "pipe"  # the inner DSCP is left alone


class Decapsulated(NamedTuple):
    """A decapsulated frame: its STT header's fields, the inner frame, and offload state.

    ``header_fields`` are the eight values of the STT header in wire order;
    :attr:`header` makes them an :class:`~sttun.wire.stt.SttHeader` when asked (the
    data path never asks, so it builds no header object per frame).
    """

    header_fields: tuple[int, int, int, int, int, int, int, int]
    inner: Buffer
    vnet: VnetHdr

    @property
    def header(self) -> SttHeader:
        """The STT header (a new object each time)."""
        return SttHeader(*self.header_fields)


class Decapsulator:
    """Turns complete STT frames into inner frames for the overlay, counting oddities.

    ``vlan_policy`` chooses what a TCI without the V bit means (see
    :mod:`sttun.core.vlan`); ``dscp_model`` whether the outer DSCP is copied in.
    """

    def __init__(
        self,
        *,
        vlan_policy: VlanPolicy = DEFAULT_VLAN_POLICY,
        dscp_model: DscpModel = DscpModel.UNIFORM,
    ) -> None:
        self.vlan_policy = vlan_policy
        self.dscp_model = dscp_model  # sets _uniform too
        #: frames whose TCI was non-zero with V clear (protocol.md #33)
        self.vlan_without_v = 0
        #: frames with both C and P set (P wins, #9)
        self.csum_both_flags = 0
        #: frames marked CE because an outer segment carried CE
        self.ce_marked = 0

    @property
    def dscp_model(self) -> DscpModel:
        """Whether the outer DSCP is copied into the inner packet."""
        return self._dscp_model

    @dscp_model.setter
    def dscp_model(self, model: DscpModel) -> None:
        self._dscp_model = model
        self._uniform = model is DscpModel.UNIFORM

    def decap(self, frame: Buffer, tos: int = 0, ce: bool = False) -> Decapsulated | DropReason:
        """Decapsulate one complete STT frame.

        ``tos`` is the outer TOS byte of the offset-0 segment and ``ce`` whether any
        segment carried ECN CE (both from the reassembler).
        """
        if len(frame) < MIN_FRAME_LEN:
            return DropReason.FRAME_TOO_SHORT
        fields = STT_HEADER.unpack_from(frame)
        version, flags, l4_offset, _reserved, mss, tci, _ctx, _pad = fields
        if version != STT_VERSION:
            return DropReason.BAD_VERSION
        inner: Buffer = (
            frame[STT_HEADER_LEN:]
            if isinstance(frame, memoryview)
            else memoryview(frame)[STT_HEADER_LEN:]
        )
        vnet = rx_vnet(flags, l4_offset, mss, len(inner))
        if isinstance(vnet, DropReason):
            return vnet
        if flags & 3 == 3:
            self.csum_both_flags += 1
        dscp = tos >> 2 if self._uniform else None
        if ce or dscp is not None:
            marked = self._mark(inner, dscp, ce)
            if isinstance(marked, DropReason):
                return marked
            inner = marked
        if tci:
            tag = rx_tag_tci(tci, self.vlan_policy)
            if tag is not None:
                if not tci & VLAN_V_MASK:
                    self.vlan_without_v += 1
                inner = insert_tag(inner, tag)
                if vnet.flags & _NEEDS_CSUM:
                    vnet = vnet._replace(
                        csum_start=vnet.csum_start + 4,
                        hdr_len=vnet.hdr_len + 4 if vnet.hdr_len else 0,
                    )
        return Decapsulated(fields, inner, vnet)

    def _mark(self, inner: Buffer, dscp: int | None, ce: bool) -> Buffer | DropReason:
        """Apply the outer DSCP (uniform model) and CE to the inner IP header."""
        et = (inner[12] << 8) | inner[13] if len(inner) >= ETH_HLEN else 0
        if et == ETH_P_IP and len(inner) >= 34:
            old = inner[15]
        elif et == ETH_P_IPV6 and len(inner) >= 54:
            old = ((inner[14] & 0x0F) << 4) | (inner[15] >> 4)
        else:
            return inner  # not IP: nothing to mark
        if not ce and old >> 2 == dscp:
            return inner  # the common case: nothing to change
        new = _new_tos(old, dscp, ce)
        if isinstance(new, DropReason):
            return new
        if new == old:
            return inner
        out = bytearray(inner)
        if et == ETH_P_IP:
            out[15] = new
            (csum,) = _U16.unpack_from(out, 24)
            _U16.pack_into(out, 24, update16(csum, (out[14] << 8) | old, (out[14] << 8) | new))
        else:
            out[14] = (out[14] & 0xF0) | (new >> 4)
            out[15] = ((new & 0x0F) << 4) | (out[15] & 0x0F)
        if ce:
            self.ce_marked += 1
        return out


def _new_tos(old: int, dscp: int | None, ce: bool) -> int | DropReason:
    ecn = old & ECN_MASK
    if ce:
        if ecn == ECN_NOT_ECT:
            return DropReason.ECN_CE_NOT_ECT  # RFC 6040 / OVS: drop
        ecn = ECN_CE
    return ((old >> 2 if dscp is None else dscp) << 2) | ecn


def decapsulate(
    frame: Buffer,
    *,
    vlan_policy: VlanPolicy = DEFAULT_VLAN_POLICY,
    tos: int = 0,
    ce: bool = False,
    dscp_model: DscpModel = DscpModel.PIPE,
) -> Decapsulated:
    """Decapsulate one complete STT frame (STT header + inner Ethernet frame).

    Raises :class:`~sttun.errors.DecodeError` naming the problem (too short, bad
    version, bad L4 offset, CE on a not-ECT packet).  The inner frame gets its
    802.1Q tag back when the header carries one; the returned ``vnet`` says what
    offload state a Linux sink should be told (see :mod:`sttun.core.offload`).
    """
    result = Decapsulator(vlan_policy=vlan_policy, dscp_model=dscp_model).decap(frame, tos, ce)
    if isinstance(result, Decapsulated):
        return result
    if result is DropReason.FRAME_TOO_SHORT:
        raise TruncatedError("STT frame", MIN_FRAME_LEN, len(frame))
    if result is DropReason.BAD_VERSION:
        raise DecodeError("STT version", STT_VERSION, frame[0])
    if result is DropReason.BAD_L4_OFFSET:
        raise DecodeError("STT L4 offset", "room for the inner IP and L4 headers", frame[2])
    raise DecodeError("inner ECN", "an ECN-capable packet for an outer CE", "Not-ECT")
