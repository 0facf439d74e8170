"""The STT frame header (18 bytes) and the TCP-like segment header (20 bytes).

Layouts and flag masks follow ``protocol.md`` §1.2–§1.4: flags use the
least-significant-bit-first masks every implementation uses (C = 0x01, P = 0x02,
V = 0x04, T = 0x08), SEQ carries ``frame_length << 16 | offset`` and ACK the frame id.
"""

from __future__ import annotations

import enum
import struct

from sttun.errors import EncodeError, TruncatedError
from sttun.wire.ether import ETH_HLEN

STT_PORT = 7471  # IANA-assigned destination port (draft §5)
STT_VERSION = 0
STT_HEADER = struct.Struct("!BBBBHHQH")
STT_HEADER_LEN = STT_HEADER.size  # 18, includes the 2-byte pad (OVS STT_BASE_HLEN)
MAX_FRAME_LEN = 0xFFFF  # 16-bit length in the upper half of SEQ
MAX_INNER_LEN = MAX_FRAME_LEN - STT_HEADER_LEN  # 65517
MIN_FRAME_LEN = STT_HEADER_LEN + ETH_HLEN  # shorter complete frames are dropped (#26)

TCP_HEADER = struct.Struct("!HHIIBBHHH")
TCP_HEADER_LEN = TCP_HEADER.size  # 20
TCP_DOFF_BYTE = 5 << 4  # data offset 5 words, no options
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6

VLAN_PCP_MASK = 0xE000
VLAN_V_MASK = 0x1000
VLAN_VID_MASK = 0x0FFF


class SttFlag(enum.IntFlag):
    """Bits of the STT flags byte (LSB-first, protocol.md §1.4)."""

    CSUM_VERIFIED = 0x01  # C: sender verified the inner checksum
    CSUM_PARTIAL = 0x02  # P: inner L4 checksum holds only the pseudo-header sum
    IPV4 = 0x04  # V: inner packet is IPv4 (clear: IPv6)
    TCP = 0x08  # T: inner packet is TCP (clear: UDP)


FLAGS_RESERVED_MASK = 0xF0  # sent as 0, ignored on receipt


class TcpFlag(enum.IntFlag):
    """TCP header flag bits (byte 13)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


class SttHeader:
    """The 18-byte STT frame header that starts every STT frame.

    ``vlan_tci`` is the raw 16-bit field: PCP (3 bits) | V (1 bit) | VLAN ID (12
    bits); use :attr:`vlan_present`, :attr:`vlan_id` and :attr:`pcp` to read it.
    Fields compare by value (``==``); instances are mutable and so not hashable.
    (Written out rather than a dataclass: ``dataclasses`` costs the capture tools
    several milliseconds of start-up.)
    """

    __slots__ = _FIELDS = (
        "version",
        "flags",
        "l4_offset",
        "reserved",
        "mss",
        "vlan_tci",
        "context_id",
        "pad",
    )
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        version: int = STT_VERSION,
        flags: int = 0,
        l4_offset: int = 0,
        reserved: int = 0,
        mss: int = 0,
        vlan_tci: int = 0,
        context_id: int = 0,
        pad: int = 0,
    ) -> None:
        self.version = version
        self.flags = flags
        self.l4_offset = l4_offset
        self.reserved = reserved
        self.mss = mss
        self.vlan_tci = vlan_tci
        self.context_id = context_id
        self.pad = pad

    def _values(self) -> tuple[int, ...]:
        return (
            self.version,
            self.flags,
            self.l4_offset,
            self.reserved,
            self.mss,
            self.vlan_tci,
            self.context_id,
            self.pad,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, SttHeader)
        return self._values() == other._values()

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(self._FIELDS, self._values(), strict=True))
        return f"SttHeader({fields})"

    @property
    def vlan_present(self) -> bool:
        """True if the V bit says the VLAN ID and PCP are valid."""
        return bool(self.vlan_tci & VLAN_V_MASK)

    @property
    def vlan_id(self) -> int:
        """The 12-bit VLAN ID."""
        return self.vlan_tci & VLAN_VID_MASK

    @property
    def pcp(self) -> int:
        """The 3-bit priority code point."""
        return self.vlan_tci >> 13

    @property
    def csum_partial(self) -> bool:
        """The P flag."""
        return bool(self.flags & SttFlag.CSUM_PARTIAL)

    @property
    def csum_verified(self) -> bool:
        """The C flag."""
        return bool(self.flags & SttFlag.CSUM_VERIFIED)

    def pack(self) -> bytes:
        """The 18 wire bytes; raises :class:`EncodeError` for out-of-range fields."""
        try:
            return STT_HEADER.pack(*self._values())
        except struct.error as exc:
            raise self._range_error(exc) from None

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the header into ``buf`` at ``offset``."""
        try:
            STT_HEADER.pack_into(buf, offset, *self._values())
        except struct.error as exc:
            raise self._range_error(exc) from None

    def _range_error(self, exc: struct.error) -> EncodeError:
        return EncodeError(f"STT header field out of range: {exc} ({self!r})")

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> SttHeader:
        """Decode the header at ``offset``; raises :class:`TruncatedError` if short.

        The version is *not* checked here (a decoder for inspection tools must show
        any version); the receive path's :class:`~sttun.core.decap.Decapsulator` drops
        other versions (``BAD_VERSION``).
        """
        have = len(buf) - offset
        if have < STT_HEADER_LEN:
            raise TruncatedError("STT header", STT_HEADER_LEN, max(0, have))
        return cls(*STT_HEADER.unpack_from(buf, offset))

    @classmethod
    def build(
        cls,
        context_id: int,
        *,
        flags: int = 0,
        l4_offset: int = 0,
        mss: int = 0,
        vlan_id: int | None = None,
        pcp: int = 0,
    ) -> SttHeader:
        """Convenience constructor; ``vlan_id`` (0..4095) sets V with that VID and PCP."""
        tci = 0
        if vlan_id is not None:
            if not 0 <= vlan_id <= VLAN_VID_MASK:
                raise EncodeError(f"vlan_id: expected 0..4095, got {vlan_id}")
            if not 0 <= pcp <= 7:
                raise EncodeError(f"pcp: expected 0..7, got {pcp}")
            tci = (pcp << 13) | VLAN_V_MASK | vlan_id
        return cls(flags=flags, l4_offset=l4_offset, mss=mss, vlan_tci=tci, context_id=context_id)
