"""VLAN handling between inner frames and the STT header's TCI field (protocol.md §5).

* Send: an outermost 802.1Q tag (TPID 0x8100) leaves the frame and travels in the
  STT header with V = 1.  The V bit sits where 802.1Q has DEI, so DEI cannot be
  carried (it is cleared).  Other TPIDs (802.1ad, 0x9100, ...) stay in-band.
* Receive: V = 1 re-inserts an 802.1Q tag with the header's VID and PCP, VID 0
  included (a priority tag, #32).
* V = 0 with a non-zero TCI (#33): an Open vSwitch Linux peer on a kernel with a
  separate ``vlan_present`` bit sends exactly that for a tagged frame, and OVS-Linux
  itself applies any non-zero TCI on receipt.  sttun's default policy,
  :attr:`VlanPolicy.OVS_LINUX`, does the same (interoperates with both OVS flavours:
  OVS-Windows always sets V with a tag) and counts each such frame;
  :attr:`VlanPolicy.STRICT` follows the draft and OVS-Windows and ignores the TCI.
"""

from __future__ import annotations

import enum

from sttun.wire.ether import TPID_8021Q
from sttun.wire.stt import VLAN_V_MASK

TPID_8021Q_BYTES = TPID_8021Q.to_bytes(2, "big")


class VlanPolicy(enum.Enum):
    """What to do with a received STT header whose TCI is non-zero but V is clear."""

    OVS_LINUX = "ovs-linux"  # apply the TCI as an 802.1Q tag, count it (default)
    STRICT = "strict"  # ignore the TCI, as the draft and OVS-Windows do


DEFAULT_VLAN_POLICY = VlanPolicy.OVS_LINUX


def tx_split_tag(
    frame: bytes | bytearray | memoryview,
) -> tuple[int, bytes | bytearray | memoryview]:
    """Take an outermost 802.1Q tag out of ``frame`` for the STT header.

    Returns ``(stt_tci, frame)``: ``stt_tci`` is 0 and ``frame`` unchanged when the
    frame has no 802.1Q tag at the outside; otherwise ``stt_tci`` has V set and
    ``frame`` is a new untagged copy.
    """
    if len(frame) >= 18 and frame[12:14] == TPID_8021Q_BYTES:
        tci = int.from_bytes(frame[14:16], "big")
        untagged = bytearray(frame[:12])
        untagged += frame[16:]
        return (tci & ~VLAN_V_MASK) | VLAN_V_MASK, untagged
    return 0, frame


def rx_tag_tci(stt_tci: int, policy: VlanPolicy = DEFAULT_VLAN_POLICY) -> int | None:
    """The 802.1Q TCI to insert on receipt, or None for no tag.

    With V set the TCI's V bit is cleared (it is DEI in 802.1Q, which STT cannot
    carry).  With V clear the answer depends on ``policy`` (see the module doc).
    """
    if stt_tci & VLAN_V_MASK:
        return stt_tci & ~VLAN_V_MASK
    if stt_tci and policy is VlanPolicy.OVS_LINUX:
        return stt_tci
    return None


def insert_tag(frame: bytes | bytearray | memoryview, tci: int) -> bytearray:
    """A copy of ``frame`` with an 802.1Q tag (TPID 0x8100, ``tci``) after the MACs."""
    out = bytearray(frame[:12])
    out += TPID_8021Q_BYTES
    out += tci.to_bytes(2, "big")
    out += frame[12:]
    return out
