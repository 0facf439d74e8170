"""The tc egress program of the transmit fast path, generated as eBPF bytecode.

Attached at the egress of every tunnel TAP (TCX or clsact): the overlay stack's
frames pass through it on their way to sttun's TAP reader.  A frame that fits one
outer segment and needs no offload STT would have to describe (no GSO), and a TCP
GSO frame where the underlay has TSO, is encapsulated here, in the kernel, exactly
as the Python send path would build it
(:meth:`sttun.core.encap.Encapsulator.encap_gso`), and redirected to the underlay
interface's egress (``bpf_redirect(ifindex, 0)``).  That takes the ACKs of a bulk
transfer, pings, small request/response traffic and the bulk data itself past user
space.  Everything else goes on to the TAP (``TC_ACT_UNSPEC``) and Python, which
keeps every send-side rule, resolution and drop count; the program counts why it
passed a frame on (:class:`TxPassReason`).

What the program takes (anything else is passed on):

* a TAP with an entry in the tunnel map (the daemon writes one while the tunnel is
  up with its next hop resolved and offloads on, and deletes it otherwise);
* no VLAN tag in the skb, ``skb->protocol`` IPv4 or IPv6 (either over either
  underlay family: across families ``bpf_skb_change_proto`` makes it the outer
  one), and either no GSO (``gso_size`` 0) and an inner frame of at most
  :data:`TX_MAX_INNER` bytes whose outer packet fits the underlay MTU, or TCP GSO
  on a tunnel given a segment size (:data:`VAL_SEGMENT`: its underlay has TSO), no
  CWR, more than one outer segment, within STT's 64 KB (:meth:`_Builder.gso_family`);
* inner IPv4 (not a fragment, length exactly the frame) carrying TCP, UDP or ICMP,
  or IPv6 whose next header is directly TCP, UDP or ICMPv6;
* an inner L4 checksum that is either complete (it verifies; UDP over IPv4 may
  carry 0) or, for TCP and UDP, the pseudo-header sum Linux leaves in the field of a
  ``CHECKSUM_PARTIAL`` skb.  Anything else (a bad checksum, another seed
  convention) goes to Python, which knows the skb's checksum state from the vnet
  header.

For a single frame the checksum state is left as it is (no helper moves
``csum_start``; GSO frames lose ``CHECKSUM_PARTIAL`` by a trick of
``bpf_skb_adjust_room`` that only pays for 64 KB, see ``gso_family``), so the outer
TCP checksum is computed as if the inner checksum were final: for a
partial inner the program computes the final value ``F`` in its scratch copy only.
The skb keeps ``CHECKSUM_PARTIAL`` at the inner L4 header; a NIC or
``skb_checksum_help`` writes ``F`` and every byte on the wire is consistent (STT
flags 0: the inner checksum is complete).  Over veth nobody writes it: the peer gets
a ``CHECKSUM_PARTIAL`` skb whose inner field still holds the seed, which the
receive program and the Python receive path complete (docs/architecture.md,
"Transmit fast path").

The outer headers come from a per-tunnel template the daemon writes from the
tunnel's :class:`~sttun.core.encap.Encapsulator` (outer Ethernet, addresses, DF,
port, window, TCP flags, context id), with its outer TOS and TTL tables; per frame
the program fills in TOS, TTL, lengths, the IPv4 ID, the source port (the same
CRC-32 flow hash as :func:`~sttun.core.encap.flow_source_port`), SEQ (frame length,
offset 0), the frame id (ACK) and the checksums.  Frame ids have the top bit set
(``0x80000000 | cpu << 24 | per-CPU counter``); Python's never do, so the two
senders of one tunnel never repeat each other's ids.

Helper numbers, ``__sk_buff`` offsets and flag values are from
``include/uapi/linux/bpf.h``.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from sttun.io.ebpf import emit
from sttun.io.ebpf.asm import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Asm, Reg
from sttun.io.ebpf.emit import (
    BPF_F_ADJ_ROOM_FIXED_GSO,
    CSUM_LEVEL,
    CSUM_LEVEL_QUERY,
    GET_SMP_PROCESSOR_ID,
    REDIRECT,
    SKB_GSO_SIZE,
    SKB_IFINDEX,
    SKB_LEN,
    SKB_LOAD_BYTES,
    SKB_PROTOCOL,
    SKB_STORE_BYTES,
    SKB_VLAN_PRESENT,
)
from sttun.wire.stt import SttFlag

#: Largest inner frame the program encapsulates (an inner MTU of ~2000 bytes);
#: longer frames (jumbo underlays) go through Python.
TX_MAX_INNER = 2048
#: Outer headers before the inner frame: Ethernet + IP + TCP-like + STT.
HDR_V4 = 14 + 20 + 20 + 18
HDR_V6 = 14 + 40 + 20 + 18
#: Scratch buffer per CPU: the outer packet is assembled at offset 0 (headers, then
#: a copy of the inner frame), 8 zero bytes after it for the summing loop, then the
#: CPU's frame counter (u64) at :data:`SCRATCH_COUNTER`.
SCRATCH_COUNTER = HDR_V6 + TX_MAX_INNER + 8
#: GSO frames: how far ``gso_size`` may have to grow or shrink to become the outer
#: segment size (further goes to Python, counted "too_big"), and how many of the inner
#: frame's first bytes are copied to the scratch buffer (headers, and every byte
#: taken out and written back).
GSO_MAX_CHANGE = 1024
GSO_LOAD = 14 + 75 + 1 + GSO_MAX_CHANGE + 20 + 18
SCRATCH_SIZE = SCRATCH_COUNTER + 8

#: The tunnel map: TAP ifindex (u32) -> this value.
TX_KEY_SIZE = 4
TPL_SIZE = 96  # the header template, HDR_V4 or HDR_V6 bytes used
VAL_IFINDEX = 96  # u32 underlay interface
VAL_SLOT = 100  # u32 counter slot
VAL_MAX_INNER = 104  # u32 largest inner frame whose outer packet fits the MTU
VAL_FLAGS = 108  # u32 TX_FLAG_*
VAL_SPORT = 112  # u16 fixed source port (host order), with TX_FLAG_FIXED_SPORT
VAL_SEGMENT = 114  # u16 outer segment payload (GSO frames' gso_size); 0: no GSO frames
VAL_MAX_GSO_INNER = 116  # u32 largest inner GSO frame (the STT frame's 64 KB limit)
VAL_TOS = 120  # u8[256] outer TOS byte by inner TOS byte
VAL_TTL = 376  # u8[256] outer TTL by inner TTL
TX_VALUE_SIZE = 632
TX_FLAG_FIXED_SPORT = 1
TX_FLAG_IPV6 = 2
TX_FLAG_ENABLED = 4  # the tunnel can send now; without it every frame goes to Python
COUNTER_VALUE_SIZE = 16  # packets u64, bytes u64 (per CPU)
CRC_TABLE_SIZE = 1024

_SPORT_BASE = 0x8000
_SPORT_MASK = 0x7FFF
_FRAME_ID_TOP = 0x80000000

# skb->protocol as the program reads it (a __be16 loaded little-endian).
_ETH_P_IP_RAW = emit.ETH_P_IP_RAW
_ETH_P_IPV6_RAW = emit.ETH_P_IPV6_RAW

# Stack slots (offsets from the frame pointer).
_S_KEY = -8
_S_L4OFF = -16
_S_L4LEN = -24
_S_CSUMOFF = -32
_S_PROTO = -40
_S_ITOS = -48
_S_ITTL = -56
_S_SPORT = -64
_S_STATKEY = -72
_S_FIELD = -80
_S_PSEUDO = -88
_S_CRCTBL = -96
_S_ZERO = -104
_S_ORDER = -112
_S_GSO = -120  # the inner frame's gso_size (STT's MSS)
_S_ADJ = -128  # signed change of gso_size still to make (GSO frames)
_S_SAVED = -136  # bytes after the inner Ethernet header taken out and written back
_S_CUT = -144  # the first cut: up to and including the inner L4 header's first byte
_STACK_LOW = _S_CUT


class TxPassReason(enum.IntEnum):
    """Why the transmit program left a frame to Python (index of the per-CPU counter)."""

    NO_TUNNEL = 0  # no entry, or disabled: tunnel down, next hop unresolved, offload off
    GSO = 1  # a GSO frame not taken: not TCP, ECN (CWR), one outer segment, GSO off
    NOT_IP = 2  # not IP of the underlay's family (ARP, VLAN, the other family)
    TOO_BIG = 3  # the outer packet would not fit one segment, or > TX_MAX_INNER
    L4 = 4  # not TCP/UDP/ICMP, a fragment, extension headers, lengths that disagree
    CHECKSUM = 5  # the inner checksum is neither complete nor a Linux partial seed
    QUEUED = 6  # frames of the tunnel wait for Python: this one must not overtake them
    ERROR = 7  # a helper failed (after the frame was changed: dropped, TC_ACT_SHOT)


@dataclass(frozen=True)
class TxMapFds:
    """File descriptors of the transmit program's maps."""

    tunnels: int  # HASH TAP ifindex -> TX value
    reasons: int  # PERCPU_ARRAY TxPassReason -> counter
    tunnel_stats: int  # PERCPU_ARRAY counter slot -> counter
    scratch: int  # PERCPU_ARRAY [0] -> SCRATCH_SIZE bytes
    crc_table: int  # ARRAY [0] -> the CRC-32 table (256 x u32)
    order: int  # ARRAY (mmapable) counter slot -> passed u64, consumed u64


def crc_table_bytes() -> bytes:
    """zlib's CRC-32 table (reflected polynomial 0xEDB88320) as 256 little-endian u32."""
    out = bytearray()
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        out += c.to_bytes(4, "little")
    # the table must give zlib's answer (checked once, cheaply)
    assert _crc_with(bytes(out), b"sttun") == zlib.crc32(b"sttun")
    return bytes(out)


def _crc_with(table: bytes, data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        i = (c ^ b) & 0xFF
        c = int.from_bytes(table[4 * i : 4 * i + 4], "little") ^ (c >> 8)
    return c ^ 0xFFFFFFFF


@dataclass(frozen=True)
class _Family:
    version: int
    ip_len: int

    @property
    def hdr(self) -> int:
        return 14 + self.ip_len + 20 + 18

    @property
    def tcp(self) -> int:
        return 14 + self.ip_len

    @property
    def stt(self) -> int:
        return self.tcp + 20


_V4 = _Family(4, 20)
_V6 = _Family(6, 40)


def build(maps: TxMapFds, *, invalid: bool = False) -> bytes:
    """The program's bytecode for these maps (``invalid``: one the verifier refuses)."""
    a = Asm()
    if invalid:
        a.exit()  # R0 never written
        return a.assemble()
    _Builder(a, maps).emit()
    return a.assemble()


class _Builder:
    def __init__(self, a: Asm, maps: TxMapFds) -> None:
        self.a = a
        self.maps = maps

    def lookup(self, fd: int, key_slot: int) -> None:
        """R0 = map_lookup_elem(fd, fp + key_slot)."""
        emit.lookup(self.a, fd, key_slot)

    def fold(self, reg: Reg, tmp: Reg) -> None:
        """Fold a (64-bit) one's complement sum in ``reg`` to 16 bits."""
        emit.fold64(self.a, reg, tmp)

    def sum_range(self, end_max: int) -> None:
        """R2 = sum of the 16-bit lanes of scratch[R1, R1 + roundup(R3, 8)) (64-bit,
        not folded); the caller has zeroed the bytes past the data.  Clobbers R1-R5.
        ``end_max`` bounds R1 + R3 for the verifier (checked, else "internal")."""
        a = self.a
        a.add(R3, 7)
        a.and_(R3, -8)
        a.add(R3, R1)
        a.jgt(R3, end_max, "internal")
        a.mov(R2, 0)
        emit.sum_words(a, R9)

    def crc_range(self, end_max: int) -> None:
        """Run the CRC-32 state in R2 over scratch[R1, R3) (table pointer in R0).
        Clobbers R1, R4, R5."""
        a = self.a
        loop = a.fresh("crc_loop")
        done = a.fresh("crc_done")
        a.jgt(R3, end_max, "internal")
        a.label(loop)
        a.jge(R1, R3, done)
        a.mov(R4, R9)
        a.add(R4, R1)
        a.ldx("b", R5, R4, 0)
        a.xor(R5, R2)
        a.and_(R5, 0xFF)
        a.lsh(R5, 2)
        a.mov(R4, R0)
        a.add(R4, R5)
        a.ldx("w", R4, R4, 0)
        a.alu32("rsh", R2, 8)
        a.alu32("xor", R2, R4)
        a.add(R1, 1)
        a.ja(loop)
        a.label(done)

    # -- the program ------------------------------------------------------------------
    def emit(self) -> None:
        a = self.a
        a.mov(R6, R1)
        for off in range(_STACK_LOW, 0, 8):
            a.st("dw", FP, off, 0)
        a.ldx("w", R1, R6, SKB_IFINDEX)
        a.stx("w", FP, _S_KEY, R1)
        self.lookup(self.maps.tunnels, _S_KEY)
        a.jeq(R0, 0, "no_tunnel")
        a.mov(R7, R0)
        # the tunnel's ordering counters: from here on every frame passed is counted
        a.ldx("w", R1, R7, VAL_SLOT)
        a.stx("w", FP, _S_STATKEY, R1)
        self.lookup(self.maps.order, _S_STATKEY)
        a.jeq(R0, 0, "no_tunnel")
        a.stx("dw", FP, _S_ORDER, R0)
        a.ldx("w", R1, R7, VAL_FLAGS)
        a.jset(R1, TX_FLAG_ENABLED, "enabled")
        a.ja("no_tunnel")
        a.label("enabled")
        # frames of this tunnel wait for Python: this one must not overtake them
        emit.order_wait(a, _S_ORDER, "queued")
        a.ldx("w", R1, R6, SKB_VLAN_PRESENT)
        a.jne(R1, 0, "not_ip")
        self.lookup(self.maps.scratch, _S_ZERO)
        a.jeq(R0, 0, "not_ip")
        a.mov(R9, R0)
        a.ldx("w", R8, R6, SKB_LEN)
        a.ldx("w", R1, R6, SKB_GSO_SIZE)
        a.jne(R1, 0, "gso_frame")
        a.ldx("w", R2, R7, VAL_MAX_INNER)
        a.jgt(R8, R2, "too_big")
        a.jgt(R8, TX_MAX_INNER, "too_big")
        self.by_family(self.family)
        a.label("gso_frame")
        a.stx("dw", FP, _S_GSO, R1)
        a.ldx("h", R2, R7, VAL_SEGMENT)
        a.jeq(R2, 0, "gso")  # not given: GSO frames go to Python
        a.ldx("w", R2, R7, VAL_MAX_GSO_INNER)
        a.jgt(R8, R2, "too_big")
        self.by_family(self.gso_family)
        self.exits()

    def by_family(self, body: Callable[[_Family, _Family], None]) -> None:
        """``body(outer, inner)`` for each combination of the tunnel's family and the
        frame's (``skb->protocol``); anything else is "not_ip"."""
        a = self.a
        a.ldx("w", R1, R7, VAL_FLAGS)
        a.ldx("w", R2, R6, SKB_PROTOCOL)
        v6 = a.fresh("tunnel_v6")
        a.jset(R1, TX_FLAG_IPV6, v6)
        for out in (_V4, _V6):
            if out is _V6:
                a.label(v6)
            same = a.fresh("same_family")
            a.jeq(R2, _ETH_P_IP_RAW if out is _V4 else _ETH_P_IPV6_RAW, same)
            a.jne(R2, _ETH_P_IPV6_RAW if out is _V4 else _ETH_P_IP_RAW, "not_ip")
            body(out, _V6 if out is _V4 else _V4)
            a.label(same)
            body(out, out)

    def family(self, out: _Family, inner: _Family) -> None:
        """One (outer family, inner family) combination, from the inner frame's copy
        to the redirect."""
        a = self.a
        h = out.hdr
        v4 = inner.version == 4
        ip = h + 14  # the inner IP header in the scratch buffer
        a.jlt(R8, 14 + inner.ip_len + 8, "l4")
        # -- the inner frame into the scratch buffer, 8 zero bytes after it ----------
        a.mov(R4, R8)
        self.load_inner(h)
        a.mov(R1, R9)
        a.add(R1, R8)
        a.st("dw", R1, h, 0)
        addrs = self.inner_ip(inner, ip)
        # L4 length; the checksum field's offset by protocol
        a.mov(R3, R8)
        a.sub(R3, R1)
        a.stx("dw", FP, _S_L4LEN, R3)
        tcp = a.fresh("p_tcp")
        udp = a.fresh("p_udp")
        icmp = a.fresh("p_icmp")
        known = a.fresh("p_known")
        a.ldx("dw", R2, FP, _S_PROTO)
        a.jeq(R2, 6, tcp)
        a.jeq(R2, 17, udp)
        a.jeq(R2, 1 if v4 else 58, icmp)
        a.ja("l4")
        a.label(tcp)
        a.jlt(R3, 20, "l4")
        a.mov(R4, 16)
        a.ja(known)
        a.label(udp)
        a.jlt(R3, 8, "l4")
        a.mov(R4, 6)
        a.ja(known)
        a.label(icmp)
        a.jlt(R3, 8, "l4")
        a.mov(R4, 2)
        a.label(known)
        a.stx("dw", FP, _S_CSUMOFF, R4)
        # the field as it is, and the pseudo-header sum (LE lanes, like the loads)
        a.ldx("dw", R1, FP, _S_L4OFF)
        a.jgt(R1, 14 + 60, "internal")
        a.add(R1, R4)
        a.add(R1, R9)
        a.ldx("h", R5, R1, h)
        a.stx("dw", FP, _S_FIELD, R5)
        self.pseudo(inner, addrs)
        # -- the inner checksum: complete, or a partial seed to finish ----------------
        a.ldx("dw", R1, FP, _S_L4OFF)
        a.add(R1, h)
        a.ldx("dw", R3, FP, _S_L4LEN)
        self.sum_range(h + TX_MAX_INNER + 8)
        a.mov(R3, R2)  # S: the L4 segment as it is (field included)
        a.ldx("dw", R1, FP, _S_PSEUDO)
        a.add(R2, R1)
        self.fold(R2, R4)
        complete = a.fresh("complete")
        a.jeq(R2, 0xFFFF, complete)
        if v4:
            not_udp0 = a.fresh("not_udp0")
            a.ldx("dw", R1, FP, _S_PROTO)
            a.jne(R1, 17, not_udp0)
            a.ldx("dw", R1, FP, _S_FIELD)
            a.jeq(R1, 0, complete)  # UDP over IPv4 without a checksum
            a.label(not_udp0)
        # not complete: only a TCP/UDP field holding the pseudo-header sum will do
        seeded = a.fresh("seeded")
        a.ldx("dw", R1, FP, _S_PROTO)
        a.jeq(R1, 6, seeded)
        a.jeq(R1, 17, seeded)
        a.ja("checksum")
        a.label(seeded)
        a.ldx("dw", R1, FP, _S_FIELD)
        a.ldx("dw", R2, FP, _S_PSEUDO)
        a.jne(R1, R2, "checksum")
        # the final value a NIC / skb_checksum_help will write, in the scratch copy
        self.fold(R3, R4)
        a.xor(R3, 0xFFFF)
        a.ldx("dw", R1, FP, _S_L4OFF)
        a.jgt(R1, 14 + 60, "internal")
        a.ldx("dw", R2, FP, _S_CSUMOFF)
        a.jgt(R2, 16, "internal")
        a.add(R1, R2)
        a.add(R1, R9)
        a.stx("h", R1, h, R3)
        a.label(complete)
        self.outer(out, inner)

    def inner_ip(self, inner: _Family, ip: int) -> range:
        """Parse the inner IP header at scratch offset ``ip``: the L4 offset (also left
        in R1), TOS, TTL and protocol into their stack slots ("l4" unless it is a
        plain IP packet exactly as long as the frame).  Returns the scratch offsets of
        the address words."""
        a = self.a
        v4 = inner.version == 4
        if v4:
            a.ldx("b", R1, R9, ip)
            a.mov(R2, R1)
            a.rsh(R2, 4)
            a.jne(R2, 4, "l4")
            a.and_(R1, 0x0F)
            a.lsh(R1, 2)
            a.jlt(R1, 20, "l4")
            a.add(R1, 14)
            a.stx("dw", FP, _S_L4OFF, R1)
            a.ldx("h", R2, R9, ip + 6)
            a.and_(R2, 0xFF3F)  # MF | fragment offset
            a.jne(R2, 0, "l4")
            a.ldx("h", R2, R9, ip + 2)
            a.be16(R2)
            a.add(R2, 14)
            a.jne(R2, R8, "l4")  # the frame is exactly the IP packet
            a.ldx("b", R2, R9, ip + 1)
            a.stx("dw", FP, _S_ITOS, R2)
            a.ldx("b", R2, R9, ip + 8)
            a.stx("dw", FP, _S_ITTL, R2)
            a.ldx("b", R2, R9, ip + 9)
            a.stx("dw", FP, _S_PROTO, R2)
            addrs = range(ip + 12, ip + 20, 2)
        else:
            a.ldx("b", R1, R9, ip)
            a.rsh(R1, 4)
            a.jne(R1, 6, "l4")
            a.mov(R1, 14 + 40)
            a.stx("dw", FP, _S_L4OFF, R1)
            a.ldx("h", R2, R9, ip + 4)
            a.be16(R2)
            a.add(R2, 14 + 40)
            a.jne(R2, R8, "l4")
            a.ldx("b", R2, R9, ip)
            a.and_(R2, 0x0F)
            a.lsh(R2, 4)
            a.ldx("b", R3, R9, ip + 1)
            a.rsh(R3, 4)
            a.or_(R2, R3)
            a.stx("dw", FP, _S_ITOS, R2)
            a.ldx("b", R2, R9, ip + 7)
            a.stx("dw", FP, _S_ITTL, R2)
            a.ldx("b", R2, R9, ip + 6)
            a.stx("dw", FP, _S_PROTO, R2)
            addrs = range(ip + 8, ip + 40, 2)
        return addrs

    def pseudo(self, inner: _Family, addrs: range) -> None:
        """_S_PSEUDO = the inner pseudo-header sum (addresses at ``addrs``, protocol,
        _S_L4LEN), folded; 0 for ICMP over IPv4, which sums no pseudo header."""
        a = self.a
        a.mov(R1, 0)
        nopseudo = a.fresh("no_pseudo")
        if inner.version == 4:
            a.ldx("dw", R2, FP, _S_PROTO)
            a.jeq(R2, 1, nopseudo)
        for off in addrs:
            a.ldx("h", R2, R9, off)
            a.add(R1, R2)
        a.ldx("dw", R2, FP, _S_PROTO)
        a.lsh(R2, 8)
        a.add(R1, R2)
        a.ldx("dw", R2, FP, _S_L4LEN)
        a.be16(R2)
        a.add(R1, R2)
        self.fold(R1, R2)
        a.label(nopseudo)
        a.stx("dw", FP, _S_PSEUDO, R1)

    def gso_family(self, out: _Family, inner: _Family) -> None:
        """A TCP GSO frame of one (outer, inner) family combination.

        The outer headers go in front as for a single frame, with STT's P flag, L4
        offset and MSS (the inner ``gso_size``), and the skb leaves as a TCP GSO
        packet of the *outer* header that the kernel cuts (or a TSO device, or a
        veth passes whole) into segments of :data:`VAL_SEGMENT` bytes of payload,
        as for the Python path's GSO frames.  Two things no helper sets directly:

        * ``CHECKSUM_PARTIAL`` at the inner TCP header, which TCP GSO would refuse
          (it needs ``csum_start`` at the header it segments).  Taking bytes out after
          the Ethernet header is how the skb loses it: once a cut has moved the data
          past ``csum_start``, the next cut turns the skb to ``CHECKSUM_NONE``
          (``skb_postpull_rcsum``).  GSO then sets ``CHECKSUM_PARTIAL`` at the outer
          TCP header itself (``tcp4/6_gso_segment``); the inner TCP checksum keeps
          the pseudo-header seed, which STT's P flag says it holds.
        * ``gso_size``: cuts and growth without ``BPF_F_ADJ_ROOM_FIXED_GSO`` change
          it by their length, so a cut (to grow it) or the first part of the room
          added back (to shrink it) carries the difference to the outer segment size.

        The bytes taken out are in the scratch copy and written back with the outer
        headers."""
        a = self.a
        h, stt = out.hdr, out.stt
        ip = h + 14
        v6_to_v4 = inner.version == 6 and out.version == 4
        v4_to_v6 = inner.version == 4 and out.version == 6
        a.jlt(R8, 14 + inner.ip_len + 20, "l4")
        # -- the headers into the scratch buffer ----------------------------------------
        loaded = a.fresh("gso_loaded")
        a.mov(R4, R8)
        a.jle(R4, GSO_LOAD, loaded)
        a.mov(R4, GSO_LOAD)
        a.label(loaded)
        self.load_inner(h)
        addrs = self.inner_ip(inner, ip)
        a.mov(R3, R8)
        a.sub(R3, R1)
        a.stx("dw", FP, _S_L4LEN, R3)
        a.ldx("dw", R2, FP, _S_PROTO)
        a.jne(R2, 6, "gso")  # TCP segmentation only (UDP GSO goes to Python)
        a.jlt(R3, 20, "l4")
        a.jgt(R1, 14 + 60, "internal")
        a.add(R1, R9)
        a.ldx("b", R2, R1, h + 13)
        a.jset(R2, 0x80, "gso")  # CWR: SKB_GSO_TCP_ECN, which STT cannot carry
        a.ldx("h", R5, R1, h + 16)
        a.stx("dw", FP, _S_FIELD, R5)
        self.pseudo(inner, addrs)
        a.ldx("dw", R1, FP, _S_FIELD)
        a.ldx("dw", R2, FP, _S_PSEUDO)
        a.jne(R1, R2, "checksum")  # a GSO frame's TCP checksum is the seed
        # -- the change of gso_size to make; what is taken out and written back --------
        a.ldx("h", R1, R7, VAL_SEGMENT)
        a.ldx("dw", R2, FP, _S_GSO)
        a.sub(R1, R2)
        a.stx("dw", FP, _S_ADJ, R1)
        a.jmp("sgt", R1, GSO_MAX_CHANGE, "too_big")
        a.jslt(R1, -GSO_MAX_CHANGE, "too_big")
        a.mov(R2, R8)
        a.add(R2, 18)
        a.ldx("h", R3, R7, VAL_SEGMENT)
        a.jle(R2, R3, "gso")  # one outer segment: Python sends it without GSO
        a.ldx("dw", R2, FP, _S_L4OFF)
        a.add(R2, 1)
        a.stx("dw", FP, _S_CUT, R2)
        # saved: the cut, the second cut (1 byte, and |change| more when gso_size must
        # shrink: the room added back has to be at least that), the change when it
        # grows, and the 20 bytes bpf_skb_change_proto takes out (6 -> 4)
        a.add(R2, 1 + (20 if v6_to_v4 else 0))
        positive = a.fresh("gso_positive")
        a.jsge(R1, 0, positive)
        a.neg(R1)
        a.label(positive)
        a.add(R2, R1)
        a.stx("dw", FP, _S_SAVED, R2)
        a.add(R2, 14 + 64)
        a.jlt(R8, R2, "gso")  # too short to take the bytes out of
        # -- the outer headers, with the offload fields of a segmented TCP frame --------
        self.headers(out, inner)
        flags = int(SttFlag.CSUM_PARTIAL | SttFlag.TCP)
        if inner.version == 4:
            flags |= SttFlag.IPV4
        a.st("b", R9, stt + 1, flags)
        a.ldx("dw", R1, FP, _S_L4OFF)
        a.stx("b", R9, stt + 2, R1)
        a.ldx("dw", R1, FP, _S_GSO)
        a.be16(R1)
        a.stx("h", R9, stt + 4, R1)
        # (the outer TCP checksum field stays 0: a CHECKSUM_NONE GSO packet always goes
        # through skb_gso_segment, where tcp4/6_gso_segment writes the seed)
        # -- cut (unchanged if it fails), cut again (now CHECKSUM_NONE), gso_size -------
        a.ldx("dw", R2, FP, _S_CUT)
        a.neg(R2)
        self.adjust(R2, BPF_F_ADJ_ROOM_FIXED_GSO, "internal")
        second = a.fresh("gso_second")
        a.mov(R2, -1)
        a.ldx("dw", R1, FP, _S_ADJ)
        a.jsge(R1, 0, second)
        a.add(R2, R1)
        a.label(second)
        self.adjust(R2, BPF_F_ADJ_ROOM_FIXED_GSO, "error")
        grown = a.fresh("gso_grown")
        a.ldx("dw", R2, FP, _S_ADJ)
        a.jslt(R2, 1, grown)
        a.neg(R2)
        self.adjust(R2, 0, "error")  # gso_size += the bytes cut
        a.label(grown)
        if inner is not out:
            # 20 bytes in (4 -> 6) or out (6 -> 4) after the Ethernet header; kernels
            # before 5.13 also changed gso_size by 20, hence the reading below
            emit.change_proto(a, out.version, "error")
        # -- the room: the first part without FIXED_GSO takes gso_size down to the
        # outer segment size, the rest keeps it; then the headers and the bytes taken
        # out are written back
        a.ldx("h", R3, R7, VAL_SEGMENT)
        a.ldx("w", R1, R6, SKB_GSO_SIZE)
        a.sub(R1, R3)  # how far above the segment size gso_size still is
        a.jslt(R1, 0, "error")  # (a kernel that took 20 off across families)
        a.stx("dw", FP, _S_ADJ, R1)
        shrunk = a.fresh("gso_shrunk")
        a.jeq(R1, 0, shrunk)
        self.adjust(R1, 0, "error")
        a.label(shrunk)
        a.ldx("dw", R2, FP, _S_SAVED)
        a.add(R2, h - (20 if v4_to_v6 else 0))
        a.ldx("dw", R1, FP, _S_ADJ)
        a.sub(R2, R1)
        a.jslt(R2, 1, "error")
        self.adjust(R2, BPF_F_ADJ_ROOM_FIXED_GSO, "error")
        a.ldx("dw", R4, FP, _S_SAVED)
        a.jgt(R4, GSO_LOAD - 14, "error")
        a.add(R4, h + 14)
        self.store_scratch()
        self.send()

    def load_inner(self, h: int) -> None:
        """Copy the inner frame's first R4 bytes to the scratch buffer at ``h`` (to
        "not_ip" if that fails).  Clobbers R0-R5."""
        a = self.a
        a.mov(R1, R6)
        a.mov(R2, 0)
        a.mov(R3, R9)
        a.add(R3, h)
        a.call(SKB_LOAD_BYTES)
        a.jne(R0, 0, "not_ip")

    def store_scratch(self) -> None:
        """Write the scratch buffer's first R4 bytes over the skb's (outer headers,
        inner Ethernet header and what was taken out); to "error" if that fails.
        Clobbers R0-R5."""
        a = self.a
        a.mov(R1, R6)
        a.mov(R2, 0)
        a.mov(R3, R9)
        a.mov(R5, 0)
        a.call(SKB_STORE_BYTES)
        a.jne(R0, 0, "error")

    def adjust(self, diff: Reg | int, flags: int, fail: str) -> None:
        """bpf_skb_adjust_room(skb, diff, BPF_ADJ_ROOM_MAC, flags); to ``fail`` if it
        fails."""
        emit.adjust_room(self.a, diff, flags, fail)

    def headers(self, f: _Family, inner: _Family) -> None:
        """The outer headers in scratch[0, f.hdr) from the template, with everything
        per frame but the TCP checksum and the STT offload fields (flags, L4 offset,
        MSS) filled in for an inner frame of R8 bytes."""
        a = self.a
        h, tcp = f.hdr, f.tcp
        v4 = f.version == 4
        # -- the template ---------------------------------------------------------------
        for off in range(0, h - h % 8, 8):
            a.ldx("dw", R1, R7, off)
            a.stx("dw", R9, off, R1)
        if h % 8:
            a.ldx("w", R1, R7, h - 4)
            a.stx("w", R9, h - 4, R1)
        # -- TOS and TTL from the tunnel's tables ---------------------------------------
        a.ldx("dw", R1, FP, _S_ITOS)
        a.and_(R1, 0xFF)
        a.add(R1, R7)
        a.ldx("b", R3, R1, VAL_TOS)
        a.ldx("dw", R1, FP, _S_ITTL)
        a.and_(R1, 0xFF)
        a.add(R1, R7)
        a.ldx("b", R4, R1, VAL_TTL)
        if v4:
            a.stx("b", R9, 15, R3)
            a.stx("b", R9, 22, R4)
            a.mov(R1, R8)
            a.add(R1, 20 + 20 + 18)
            a.be16(R1)
            a.stx("h", R9, 16, R1)
        else:
            a.mov(R1, R3)
            a.rsh(R1, 4)
            a.or_(R1, 0x60)
            a.stx("b", R9, 14, R1)
            a.mov(R1, R3)
            a.and_(R1, 0x0F)
            a.lsh(R1, 4)
            a.stx("b", R9, 15, R1)
            a.stx("b", R9, 21, R4)
            a.mov(R1, R8)
            a.add(R1, 20 + 18)
            a.be16(R1)
            a.stx("h", R9, 18, R1)
        # -- frame id (ACK) and IPv4 ID from this CPU's counter ---------------------------
        a.ldx("dw", R1, R9, SCRATCH_COUNTER)
        a.stx("dw", FP, _S_FIELD, R1)
        a.add(R1, 1)
        a.stx("dw", R9, SCRATCH_COUNTER, R1)
        a.call(GET_SMP_PROCESSOR_ID)
        a.ldx("dw", R1, FP, _S_FIELD)
        if v4:
            a.mov(R2, R0)
            a.lsh(R2, 12)
            a.add(R2, R1)
            a.be16(R2)
            a.stx("h", R9, 18, R2)
        a.alu32("and", R0, 0x7F)
        a.alu32("lsh", R0, 24)
        a.alu32("and", R1, 0xFFFFFF)
        a.alu32("or", R0, R1)
        a.alu32("or", R0, _FRAME_ID_TOP)
        a.be32(R0)
        a.stx("w", R9, tcp + 8, R0)
        # -- SEQ: frame length << 16, offset 0 ----------------------------------------
        a.mov(R1, R8)
        a.add(R1, 18)
        a.lsh(R1, 16)
        a.be32(R1)
        a.stx("w", R9, tcp + 4, R1)
        # -- source port: fixed, or the CRC-32 flow hash of flow_source_port() ----------
        fixed = a.fresh("sport_fixed")
        have = a.fresh("sport_have")
        a.ldx("w", R1, R7, VAL_FLAGS)
        a.jset(R1, TX_FLAG_FIXED_SPORT, fixed)
        self.sport_hash(f, inner)
        a.ja(have)
        a.label(fixed)
        a.ldx("h", R1, R7, VAL_SPORT)
        a.label(have)
        a.be16(R1)
        a.stx("h", R9, tcp, R1)
        # -- IPv4 header checksum ---------------------------------------------------------
        if v4:
            a.mov(R1, 0)
            for off in range(14, 34, 2):
                if off != 24:
                    a.ldx("h", R2, R9, off)
                    a.add(R1, R2)
            self.fold(R1, R2)
            a.xor(R1, 0xFFFF)
            a.stx("h", R9, 24, R1)

    def outer(self, f: _Family, inner: _Family) -> None:
        """Fill in the outer headers, grow the skb, write them, count, redirect."""
        a = self.a
        h, tcp, stt = f.hdr, f.tcp, f.stt
        v4 = f.version == 4
        self.headers(f, inner)
        # -- C: the inner skb was CHECKSUM_UNNECESSARY (Python: vnet DATA_VALID) -------
        no_c = a.fresh("no_c")
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_QUERY)
        a.call(CSUM_LEVEL)
        a.jslt(R0, 0, no_c)
        a.st("b", R9, stt + 1, 1)
        a.label(no_c)
        # -- outer TCP checksum over TCP + STT + the inner frame (final values) --------
        a.mov(R1, tcp)
        a.mov(R3, R8)
        a.add(R3, 20 + 18)
        self.sum_range(f.hdr + TX_MAX_INNER + 8)
        addrs = range(26, 34, 2) if v4 else range(22, 54, 2)
        for off in addrs:
            a.ldx("h", R1, R9, off)
            a.add(R2, R1)
        a.add(R2, 0x0600)
        a.mov(R1, R8)
        a.add(R1, 20 + 18)
        a.be16(R1)
        a.add(R2, R1)
        self.fold(R2, R1)
        a.xor(R2, 0xFFFF)
        a.stx("h", R9, tcp + 16, R2)
        # -- room for the outer headers after the Ethernet header, then write them ------
        # Across families skb->protocol must become the outer one (drivers and
        # qdiscs read it): bpf_skb_change_proto also adds (4 -> 6) or removes (6 -> 4)
        # 20 bytes right after the Ethernet header, which the room and the write
        # below account for (the scratch copy has the whole inner frame).
        grow, write = h, h + 14  # outer headers, + the inner Ethernet header
        if inner is not f:
            emit.change_proto(a, f.version, "error")
            if f.version == 6:
                grow -= 20  # 20 bytes of room are there already
            else:
                grow += 20  # the first 20 bytes of the inner IPv6 header went
                write += 20
        self.adjust(grow, 0, "internal" if inner is f else "error")  # unchanged if it fails
        a.mov(R4, write)
        self.store_scratch()
        self.send()

    def send(self) -> None:
        """Count the frame (R8 bytes) for its tunnel and redirect it to the underlay."""
        a = self.a
        a.ldx("w", R1, R7, VAL_SLOT)
        a.stx("w", FP, _S_STATKEY, R1)
        self.count(self.maps.tunnel_stats)
        a.ldx("w", R1, R7, VAL_IFINDEX)
        a.mov(R2, 0)
        a.call(REDIRECT)
        a.exit()

    def sport_hash(self, f: _Family, inner: _Family) -> None:
        """R1 = flow_source_port() of the inner frame: CRC-32 over the inner addresses
        and, for TCP/UDP, the ports (the same bytes Python hashes)."""
        a = self.a
        base = f.hdr
        end_max = base + 14 + 60 + 8
        self.lookup(self.maps.crc_table, _S_ZERO)
        a.jeq(R0, 0, "internal")
        a.alu32("mov", R2, -1)

        def crc(start: int, end: int) -> None:
            a.mov(R1, base + start)
            a.mov(R3, base + end)
            self.crc_range(end_max)

        done = a.fresh("crc_all")
        if inner.version == 4:
            opts = a.fresh("crc_opts")
            a.ldx("dw", R1, FP, _S_PROTO)
            icmp = a.fresh("crc_icmp")
            a.jeq(R1, 1, icmp)
            a.ldx("dw", R1, FP, _S_L4OFF)
            a.jne(R1, 34, opts)
            crc(26, 38)
            a.ja(done)
            a.label(opts)  # addresses, then the ports after the options
            crc(26, 34)
            a.ldx("dw", R1, FP, _S_L4OFF)
            a.jgt(R1, 14 + 60, "internal")
            a.add(R1, base)
            a.mov(R3, R1)
            a.add(R3, 4)
            self.crc_range(end_max)
            a.ja(done)
            a.label(icmp)
            crc(26, 34)
        else:
            icmp6 = a.fresh("crc_icmp6")
            a.ldx("dw", R1, FP, _S_PROTO)
            a.jeq(R1, 58, icmp6)
            crc(22, 58)
            a.ja(done)
            a.label(icmp6)
            crc(22, 54)
        a.label(done)
        a.alu32("xor", R2, -1)
        a.mov(R1, R2)
        a.alu32("rsh", R1, 15)
        a.alu32("xor", R1, R2)
        a.and_(R1, _SPORT_MASK)
        a.or_(R1, _SPORT_BASE)

    def count(self, fd: int) -> None:
        """Add one packet and R8 bytes to ``fd``'s per-CPU slot at _S_STATKEY."""
        emit.count(self.a, fd, _S_STATKEY, R8)

    def exits(self) -> None:
        a = self.a
        labels = {
            "no_tunnel": TxPassReason.NO_TUNNEL,
            "gso": TxPassReason.GSO,
            "not_ip": TxPassReason.NOT_IP,
            "too_big": TxPassReason.TOO_BIG,
            "l4": TxPassReason.L4,
            "checksum": TxPassReason.CHECKSUM,
            "queued": TxPassReason.QUEUED,
            "internal": TxPassReason.ERROR,
        }

        emit.pass_exits(a, labels, self.maps.reasons, _S_STATKEY, emit.order_count(a, _S_ORDER))
        emit.drop_exit(a, "error", TxPassReason.ERROR, self.maps.reasons, _S_STATKEY)
