"""Capture file I/O: a streaming pcap/pcapng reader and a classic pcap writer.

This module gathers the public names of :mod:`sttun.io.pcap_read` and
:mod:`sttun.io.pcap_write`; see those modules for the details.
"""

from __future__ import annotations

from sttun.errors import CaptureError
from sttun.io.pcap_read import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    SUPPORTED_LINKTYPES,
    CaptureReader,
    Packet,
    l3_offset,
    read_packets,
)
from sttun.io.pcap_write import DEFAULT_SNAPLEN, PcapWriter

__all__ = [
    "DEFAULT_SNAPLEN",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_RAW",
    "SUPPORTED_LINKTYPES",
    "CaptureError",
    "CaptureReader",
    "Packet",
    "PcapWriter",
    "l3_offset",
    "read_packets",
]
