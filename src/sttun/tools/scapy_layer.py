"""A Scapy layer for the STT frame header, for tests and interactive work.

Importing this module imports Scapy (a development dependency, not needed by
sttun itself) and binds the layer to TCP destination port 7471::

    >>> from scapy.all import Ether, IP, TCP, UDP
    >>> from sttun.tools.scapy_layer import STT, fix_seq
    >>> pkt = fix_seq(Ether() / IP(src="198.18.0.1", dst="198.18.0.2")
    ...               / TCP(dport=7471, flags="PA", ack=1) / STT(context_id=5)
    ...               / Ether() / IP() / UDP())
    >>> Ether(bytes(pkt))[STT].context_id
    5

The STT header is only present in the segment at offset 0 of a frame; other
segments to port 7471 are dissected as raw bytes (the layer checks the TCP SEQ's
offset half).  Scapy does not reassemble: a frame bigger than one segment is
dissected up to the end of the first segment.  Flags use the LSB-first masks all
implementations use (``C`` = 0x01, ``P`` = 0x02, ``V`` = 0x04, ``T`` = 0x08,
protocol.md §1.4).  :func:`fix_seq` fills in the TCP SEQ (frame length << 16) that
an STT receiver needs, since Scapy cannot set a lower layer's field from above.
"""

from __future__ import annotations

from typing import Any

from scapy.config import conf
from scapy.fields import (
    BitField,
    ByteField,
    FlagsField,
    ShortField,
    XLongField,
    XShortField,
)
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, bind_layers

from sttun.wire.stt import STT_PORT

__all__ = ["STT", "STT_PORT", "fix_seq"]


class STT(Packet):
    """The 18-byte STT frame header (draft-davie-stt-08 §3.1), followed by Ethernet."""

    name = "STT"
    fields_desc = [  # noqa: RUF012 - Scapy's declarative field list
        ByteField("version", 0),
        FlagsField("flags", 0, 8, ["C", "P", "V", "T", "r4", "r5", "r6", "r7"]),
        ByteField("l4_offset", 0),
        ByteField("reserved", 0),
        ShortField("mss", 0),
        BitField("pcp", 0, 3),
        BitField("v", 0, 1),
        BitField("vlan_id", 0, 12),
        XLongField("context_id", 0),
        XShortField("pad", 0),
    ]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kargs: Any) -> Any:
        """Raw bytes, not STT, for a segment that is not the first of its frame."""
        under = kargs.get("_underlayer")
        seq = getattr(under, "seq", 0) or 0
        if seq & 0xFFFF or (_pkt is not None and len(_pkt) < 18):
            return conf.raw_layer
        return cls

    def mysummary(self) -> str:
        """``STT ctx=0x5 flags=...`` in ``pkt.summary()``."""
        return str(self.sprintf("STT ctx=%STT.context_id% flags=%STT.flags%"))


bind_layers(TCP, STT, dport=STT_PORT)
bind_layers(STT, Ether)


def fix_seq(pkt: Any, *, offset: int = 0) -> Any:
    """Set the SEQ of every TCP layer that carries an STT header to ``len << 16``.

    ``len`` is the STT frame length (header + inner frame); the TCP checksum is
    recomputed.  Returns ``pkt`` (modified in place).
    """
    layer = pkt
    while layer is not None and not isinstance(layer, conf.raw_layer):
        if isinstance(layer, TCP) and isinstance(layer.payload, STT):
            layer.seq = (len(bytes(layer.payload)) << 16) | offset
            layer.chksum = None
        payload = layer.payload
        layer = payload if payload else None
    return pkt
