"""Ethernet: header length, EtherTypes, VLAN tags.

The one home of these numbers for all of sttun (the core, the I/O layer's capture
reader, the tools).  Offsets count from the first byte of the Ethernet header, as
STT's L4 offset does.
"""

from __future__ import annotations

from sttun.errors import TruncatedError

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

TPID_8021Q = 0x8100  # the only tag STT's header can carry (protocol.md §5)
TPID_8021AD = 0x88A8
TPID_QINQ_OLD = 0x9100  # pre-802.1ad QinQ
#: The tag types stepped over to find the L3 header: 802.1Q and 802.1ad, which
#: Linux knows (``eth_type_vlan``), and the old QinQ type 0x9100, which Wireshark's
#: VLAN dissector also steps over (the capture tools agree with it).  Only 802.1Q
#: travels in the STT header; every other tag stays in the frame (protocol.md §5).
VLAN_TPIDS = frozenset({TPID_8021Q, TPID_8021AD, TPID_QINQ_OLD})
VLAN_HLEN = 4


def skip_vlan_tags(
    frame: bytes | bytearray | memoryview, type_at: int = 12, payload_at: int = ETH_HLEN
) -> tuple[int, int]:
    """The EtherType after every VLAN tag, and the offset of what it announces.

    ``type_at`` is the offset of the first 2-byte type field and ``payload_at``
    that of the bytes it describes: 12 and 14 in an Ethernet header (Linux cooked
    captures put them elsewhere).  Raises :class:`TruncatedError` if the frame ends
    before ``payload_at`` or inside a tag.
    """
    n = len(frame)
    if n < payload_at:
        raise TruncatedError("Ethernet header", payload_at, n)
    etype = (frame[type_at] << 8) | frame[type_at + 1]
    off = payload_at
    while etype in VLAN_TPIDS:
        if off + VLAN_HLEN > n:
            raise TruncatedError("VLAN tag", off + VLAN_HLEN, n)
        etype = (frame[off + 2] << 8) | frame[off + 3]
        off += VLAN_HLEN
    return etype, off
