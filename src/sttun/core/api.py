"""Convenience functions of the public API that wrap the core's classes."""

from __future__ import annotations

from sttun.core.drops import DropReason
from sttun.core.encap import DEFAULT_TTL, DEFAULT_UNDERLAY_MTU, Encapsulator
from sttun.errors import EncodeError
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import STT_PORT
from sttun.wire.vnet import VnetHdr


def encapsulate(
    inner: bytes | bytearray | memoryview,
    context_id: int,
    *,
    src: str | bytes,
    dst: str | bytes,
    mtu: int = DEFAULT_UNDERLAY_MTU,
    vnet: VnetHdr | None = None,
    dst_port: int = STT_PORT,
    frame_id: int = 0,
    sport: int | None = None,
    tos: int | None = 0,
    ttl: int | None = DEFAULT_TTL,
) -> list[bytes]:
    """Encapsulate one inner Ethernet frame into outer IP packets (software path).

    Returns the complete outer IPv4 or IPv6 packets (by the family of ``src``/
    ``dst``), segmented for an underlay of ``mtu`` bytes, each with a valid TCP
    checksum.  ``vnet`` describes partial checksums or TSO of ``inner`` as a Linux
    stack would hand them over; they are carried as STT offload flags where STT
    can, and completed in software otherwise.  Raises
    :class:`~sttun.errors.EncodeError` if the frame cannot be encapsulated.
    """
    enc = Encapsulator(
        ip_bytes(src),
        ip_bytes(dst),
        context_id,
        dst_port=dst_port,
        underlay_mtu=mtu,
        first_frame_id=frame_id,
        fixed_sport=sport,
        tos=tos,
        ttl=ttl,
    )
    packets = enc.encap(inner, vnet, gso=False)
    if not packets:
        reasons = ", ".join(r.value for r, _n in enc.drops) or DropReason.TX_BAD_INNER.value
        raise EncodeError(f"frame of {len(inner)} bytes cannot be encapsulated: {reasons}")
    return [b"".join(parts) for parts in packets]
