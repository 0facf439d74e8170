"""``struct virtio_net_hdr``: offload metadata on TAP and AF_PACKET sockets.

Both ``IFF_VNET_HDR`` TAP devices (with ``TUNSETVNETHDRSZ`` = 10) and
``PACKET_VNET_HDR`` packet sockets prefix every frame with this 10-byte header,
in host byte order (little-endian on every machine sttun targets).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from sttun.errors import TruncatedError

VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size  # 10

#: A header with every field zero: no checksum or segmentation work asked for.
VNET_NONE = bytes(VNET_HDR_LEN)


class VnetFlag(enum.IntFlag):
    """``virtio_net_hdr.flags`` bits."""

    NEEDS_CSUM = 1  # checksum from csum_start to the end, stored at csum_start+csum_offset
    DATA_VALID = 2  # the checksum has been verified already
    RSC_INFO = 4


class GsoType(enum.IntEnum):
    """``virtio_net_hdr.gso_type`` values (without the ECN bit)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


GSO_ECN = 0x80  # VIRTIO_NET_HDR_GSO_ECN: never produced by sttun (protocol.md §4.3)


class VnetHdr(NamedTuple):
    """A decoded ``virtio_net_hdr``."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        """The 10 wire bytes."""
        return VNET_HDR.pack(*self)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> VnetHdr:
        """Decode from ``buf`` at ``offset``; raises :class:`TruncatedError`."""
        if len(buf) - offset < VNET_HDR_LEN:
            raise TruncatedError("virtio_net_hdr", VNET_HDR_LEN, max(0, len(buf) - offset))
        return cls._make(VNET_HDR.unpack_from(buf, offset))
