"""The tc ingress program of the receive fast path, generated as eBPF bytecode.

One program per underlay interface, run by tc (TCX or clsact) after GRO.  For an
skb that holds one **whole** STT frame for a configured tunnel it strips the outer
Ethernet + IP + TCP-like + STT headers and redirects the inner frame into the
tunnel's TAP as if received there (``bpf_redirect(tap, BPF_F_INGRESS)``).  Every
other packet goes on untouched (``TC_ACT_UNSPEC``: the next tc program, then the
stack) to the Python receive path, which
keeps counting every drop reason; the program counts why it passed a packet on
(:class:`PassReason`).  The accept set is a strict subset of the frames Python's
``Endpoint.receive`` + ``Decapsulator.decap`` deliver unchanged:

* outer IPv4 without options, not a fragment, or IPv6 with TCP as next header;
  outer length exactly the skb length (no trailing padding), TCP data offset 5;
* SEQ: offset 0 and frame length == payload length (a whole frame), >= 32 bytes;
* STT version 0, VLAN TCI 0, not both C and P, L4 offset valid when P is set;
* (remote, local, destination port, context id) names a tunnel in the map;
* outer ECN not CE; with the uniform DSCP model, the inner IP header already has
  the outer DSCP (so Python would not rewrite it);
* the outer checksum was verified or will be, in this order: ``CHECKSUM_UNNECESSARY``;
  a GSO skb (GRO merged it after checking, or a local sender's partial checksum);
  a non-GSO ``CHECKSUM_PARTIAL`` skb whose field holds the pseudo-header sum; a
  non-GSO skb in any other state (``CHECKSUM_NONE`` too) whose outer TCP segment,
  at most :data:`CSUM_MAX` bytes, the program sums to 0xFFFF with its pseudo
  header; or the **inner-partial** rule: a ``CHECKSUM_PARTIAL`` skb (not
  ``COMPLETE``: ``bpf_csum_update`` tells) without P whose inner IPv4 (any header
  length, not a fragment) or IPv6 (no extension header) TCP/UDP checksum field
  holds the inner pseudo-header sum (with the L4 length, as Linux seeds it) and
  whose outer checksum verifies with that field's final value in its place (how
  a tc-egress encapsulator of a partial inner packet computes it).  Anything else
  goes to Python with reason CHECKSUM (a ``CHECKSUM_NONE`` frame that does not
  verify, for one: Python counts the drop).

What the inner frame becomes (docs/architecture.md, "Kernel receive fast path"):

* P with an MSS and more payload than one MSS (the rule of the kernel's
  ``virtio_net_hdr_to_skb``, which the Python path's TAP write goes through): a GSO
  skb - gso_size set to the STT MSS by growing then shrinking with
  ``BPF_F_ADJ_ROOM_FIXED_GSO``, and ``CHECKSUM_UNNECESSARY`` (TCP segmentation
  recomputes the checksums of a non-partial skb).  Only when the outer skb is GSO
  (the program cannot make one) and the inner packet is of the family V says; an
  inner family other than the outer one gets its GSO type from
  ``bpf_skb_change_proto``.
* P otherwise: the inner L4 checksum is completed here (at most
  :data:`CSUM_MAX` bytes, written like the kernel's ``skb_checksum_help``: a sum
  folding to 0 is stored as 0xFFFF), then ``CHECKSUM_UNNECESSARY``.
* C: ``CHECKSUM_UNNECESSARY``; no flag: ``CHECKSUM_NONE`` (the inner checksum is
  complete and unverified, the receiver checks it).  The outer verdict is never
  carried over to the inner header.
* inner-partial: csum_start at the inner L4 header is after the stripped headers,
  so the skb stays ``CHECKSUM_PARTIAL`` with the seed in the field and the device
  or ``skb_checksum_help`` fills it (a final value written here would be summed
  over again and replaced by the seed).  Had csum_start been in the stripped
  headers, the strip made the skb NONE: the final value (computed before the
  strip, 0 written as 0xFFFF) is stored and the skb made UNNECESSARY.
* a non-GSO inner packet in a GSO outer skb is linearised and its GSO state reset
  with ``bpf_skb_change_tail(skb, len, 0)``.

Helper numbers, ``__sk_buff`` offsets and flag values are from
``include/uapi/linux/bpf.h``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sttun.io.ebpf import emit
from sttun.io.ebpf.asm import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Asm, Reg
from sttun.io.ebpf.emit import (
    BPF_F_ADJ_ROOM_FIXED_GSO,
    BPF_F_INGRESS,
    CSUM_LEVEL,
    CSUM_LEVEL_INC,
    CSUM_LEVEL_QUERY,
    CSUM_LEVEL_RESET,
    CSUM_UPDATE,
    REDIRECT,
    SKB_CHANGE_TAIL,
    SKB_DATA,
    SKB_DATA_END,
    SKB_GSO_SIZE,
    SKB_LEN,
    SKB_LOAD_BYTES,
    SKB_PROTOCOL,
    SKB_PULL_DATA,
    SKB_STORE_BYTES,
    SKB_VLAN_PRESENT,
)
from sttun.io.order_counter import RX_ORDER_BUCKETS

#: Most bytes the program sums for one checksum: an inner L4 segment (inner L4
#: header + payload) it completes, or an outer TCP segment (TCP header + STT frame)
#: it verifies.  Longer ones go to Python.  Covers a 1500-byte underlay (outer
#: segments of at most 1480 bytes) and inner MTUs up to ~2000 bytes; the verifier
#: walks the summing loop once per 8 bytes.
CSUM_MAX = 2048
#: Largest |STT MSS - outer gso_size| the program adjusts (adjust_room moves at most
#: 0xfff bytes per call, and the strip itself is up to 92).
MAX_GSO_DELTA = 2048

#: Map layouts, shared with the Python side (:mod:`sttun.io.rx_fastpath`).
TUNNEL_KEY_SIZE = 48  # remote[16] local[16] context id[8] dport[2] family[1] pad[5]
TUNNEL_VALUE_SIZE = 16  # tap ifindex u32, counter slot u32, flags u32, pad u32
TUNNEL_FLAG_DSCP_UNIFORM = 1
COUNTER_VALUE_SIZE = 16  # packets u64, bytes u64 (per CPU)
PORT_KEY_SIZE = 2  # destination port, network order
SCRATCH_SIZE = CSUM_MAX + 8

# Stack slots (offsets from the frame pointer).
_KEY = -48
_ETH = -64
_S_IFINDEX = -72
_S_INDEX = -80
_S_FLAGS = -88
_S_L4OFF = -96
_S_MSS = -104
_S_INLEN = -112
_S_TOS = -120
_S_MODE = -128
_S_CSUMOFF = -136
_S_ET = -144
_S_DELTA = -152
_S_PORT = -160
_S_STATKEY = -168
_S_CSUM = -176
_S_ZERO = -184
_S_STRIP = -192
_S_NONE = -200  # 1: the skb is CHECKSUM_NONE
_S_OSUM = -208  # the outer TCP segment's folded sum, pseudo header included
_S_SEED = -216  # the inner pseudo-header sum (inner-partial rule)
_IIP = -256  # 40 bytes: the inner IP header (inner-partial rule)
_S_ORDER = -264  # the address of the packet's ordering pair (its bucket's)
_S_BUCKET = -272  # u32 key: the ordering bucket of the outer source port
_STACK_LOW = _S_BUCKET

# What the program does with the inner frame's checksum/GSO state.
_MODE_NONE = 0
_MODE_VALID = 1
_MODE_COMPLETE = 2
_MODE_GSO = 3
_MODE_GSO_CROSS = 4  # GSO, inner IP family not the outer one
_MODE_INNER_PARTIAL = 5  # no P, but the inner L4 checksum field holds its seed

# skb->protocol as the program reads it (a __be16 loaded little-endian).
_ETH_P_IP_RAW = emit.ETH_P_IP_RAW
_ETH_P_IPV6_RAW = emit.ETH_P_IPV6_RAW


class PassReason(enum.IntEnum):
    """Why the program left a packet to Python (index of the per-CPU counter)."""

    NOT_STT = 0  # not IP/TCP to an STT port of a tunnel (other traffic)
    PIECE = 1  # part of a frame (offset != 0 or shorter than the frame)
    UNKNOWN_TUNNEL = 2  # (remote, local, port, context id) is not in the map
    HEADER = 3  # IP options/fragment, lengths, data offset, version, L4 offset, C+P
    VLAN = 4  # the STT header carries a VLAN TCI
    MARKING = 5  # outer CE, or the uniform DSCP model would rewrite the inner header
    CHECKSUM = 6  # the outer checksum did not verify (or was too long to sum here)
    OFFLOAD = 7  # GSO/checksum combination the program does not do
    ERROR = 8  # a helper failed after the frame was changed: dropped (TC_ACT_SHOT)
    QUEUED = 9  # packets left to Python wait there: this one must not overtake them


@dataclass(frozen=True)
class MapFds:
    """File descriptors of the program's maps."""

    tunnels: int  # HASH tunnel key -> tunnel value
    ports: int  # HASH destination port -> unused u8
    reasons: int  # PERCPU_ARRAY PassReason -> counter
    tunnel_stats: int  # PERCPU_ARRAY counter slot -> counter
    scratch: int  # PERCPU_ARRAY [0] -> SCRATCH_SIZE bytes
    order: int  # ARRAY (mmapable) bucket -> passed u64, consumed u64


@dataclass(frozen=True)
class _Family:
    """Offsets of one outer IP family (from the start of the outer Ethernet header)."""

    version: int
    ip_len: int  # fixed header length
    len_min: int  # what bpf_skb_adjust_room keeps at least after the network header

    @property
    def tcp(self) -> int:
        return 14 + self.ip_len

    @property
    def stt(self) -> int:
        return self.tcp + 20

    @property
    def inner(self) -> int:
        return self.stt + 18

    @property
    def strip(self) -> int:
        """Bytes removed after the outer Ethernet header (IP + TCP + STT + inner Eth;
        the inner Ethernet header is then written over the outer one)."""
        return self.ip_len + 20 + 18 + 14


_V4 = _Family(4, 20, 20)
_V6 = _Family(6, 40, 40)


def build(
    maps: MapFds, *, max_linear_len: int, ordered: bool = False, invalid: bool = False
) -> bytes:
    """The program's bytecode for these maps.

    ``max_linear_len``: the largest inner frame that may be linearised out of a GSO
    skb (``bpf_skb_change_tail`` refuses more than the underlay's MTU + 14).
    ``ordered``: keep the order with the packets left to Python (the ``order`` map's
    pair, which the reader behind the underlay's sockets must keep up: the daemon
    does); without it every packet is judged on its own.
    ``invalid`` builds a program the verifier must refuse (for fallback tests).
    """
    a = Asm()
    if invalid:
        a.exit()  # R0 never written: "R0 !read_ok"
        return a.assemble()
    _Builder(a, maps, max_linear_len, ordered).emit()
    return a.assemble()


class _Builder:
    def __init__(self, a: Asm, maps: MapFds, max_linear_len: int, ordered: bool) -> None:
        self.ordered = ordered
        self.a = a
        self.maps = maps
        self.max_linear_len = max_linear_len

    # -- the program ------------------------------------------------------------------
    def emit(self) -> None:
        a = self.a
        a.mov(R6, R1)
        for off in range(_STACK_LOW, 0, 8):
            a.st("dw", FP, off, 0)
        a.ldx("w", R1, R6, SKB_VLAN_PRESENT)
        a.jne(R1, 0, "not_stt")
        a.ldx("w", R1, R6, SKB_PROTOCOL)
        a.jeq(R1, _ETH_P_IP_RAW, "ip4")
        a.jeq(R1, _ETH_P_IPV6_RAW, "ip6")
        a.ja("not_stt")
        for fam in (_V4, _V6):
            a.label(f"ip{fam.version}")
            self.family(fam)
        self.commit()
        self.exits()

    def reload(self) -> None:
        """R7 = data, R8 = data_end."""
        self.a.ldx("w", R7, R6, SKB_DATA)
        self.a.ldx("w", R8, R6, SKB_DATA_END)

    def bound(self, n: int, fail: str) -> None:
        """Go to ``fail`` unless ``n`` bytes from data are in the linear area (uses R0)."""
        a = self.a
        a.mov(R0, R7)
        a.add(R0, n)
        a.jgt(R0, R8, fail)

    def lookup(self, fd: int, key_slot: int) -> None:
        """R0 = map_lookup_elem(fd, fp + key_slot)."""
        emit.lookup(self.a, fd, key_slot)

    def family(self, f: _Family) -> None:
        a = self.a
        v = f.version
        ip, tcp, stt, inner = 14, f.tcp, f.stt, f.inner
        # -- outer headers, linear -----------------------------------------------
        self.reload()
        ok = a.fresh("hdr_ok")
        a.mov(R1, R7)
        a.add(R1, tcp + 20)
        a.jle(R1, R8, ok)
        a.ldx("w", R1, R6, SKB_LEN)
        a.jlt(R1, tcp + 20, "not_stt")
        a.mov(R1, R6)
        a.mov(R2, tcp + 20)
        a.call(SKB_PULL_DATA)
        a.jne(R0, 0, "not_stt")
        self.reload()
        self.bound(tcp + 20, "not_stt")
        a.label(ok)
        # -- IP protocol and STT port ------------------------------------------------
        if v == 4:
            a.ldx("b", R1, R7, ip + 9)
        else:
            a.ldx("b", R1, R7, ip + 6)
        a.jne(R1, 6, "not_stt")
        a.ldx("h", R1, R7, tcp + 2)
        a.stx("h", FP, _S_PORT, R1)
        self.lookup(self.maps.ports, _S_PORT)
        a.jeq(R0, 0, "not_stt")
        # -- from here every packet passed on is counted for the order, in the bucket
        # of its outer source port (the sender's inner-flow hash): while Python has
        # not handled all of a bucket's (a frame in pieces, say), the next ones go
        # behind them (a frame redirected now would overtake them)
        if self.ordered:
            a.ldx("h", R1, R7, tcp)  # the outer source port: the flow's bucket
            a.be16(R1)
            a.and_(R1, RX_ORDER_BUCKETS - 1)
            a.stx("w", FP, _S_BUCKET, R1)
            self.lookup(self.maps.order, _S_BUCKET)
            unordered = a.fresh("unordered")
            a.jeq(R0, 0, unordered)
            a.stx("dw", FP, _S_ORDER, R0)
            emit.order_wait(a, _S_ORDER, "queued")
            a.label(unordered)
        # -- outer IP checks -------------------------------------------------------
        a.ldx("w", R2, R6, SKB_LEN)
        if v == 4:
            a.ldx("b", R1, R7, ip)
            a.jne(R1, 0x45, "header")  # IPv4, no options
            a.ldx("h", R1, R7, ip + 6)
            a.and_(R1, 0xFF3F)  # MF | fragment offset (network order 0x3FFF)
            a.jne(R1, 0, "header")
            a.ldx("h", R1, R7, ip + 2)
            a.be16(R1)  # total length
            a.mov(R3, R1)
            a.add(R3, 14)
            a.sub(R1, 40)  # STT payload bytes
        else:
            a.ldx("b", R1, R7, ip)
            a.rsh(R1, 4)
            a.jne(R1, 6, "header")
            a.ldx("h", R1, R7, ip + 4)
            a.be16(R1)  # payload length
            a.mov(R3, R1)
            a.add(R3, 14 + 40)
            a.sub(R1, 20)
        a.jne(R3, R2, "header")  # the skb is exactly the IP packet
        a.ldx("b", R2, R7, tcp + 12)
        a.rsh(R2, 4)
        a.jne(R2, 5, "header")  # data offset 5
        # -- a whole frame ---------------------------------------------------------
        a.ldx("h", R2, R7, tcp + 6)
        a.jne(R2, 0, "piece")  # offset
        a.ldx("h", R2, R7, tcp + 4)
        a.be16(R2)  # frame length
        a.jne(R2, R1, "piece")
        a.jlt(R1, 32, "header")  # shorter than STT header + Ethernet
        a.sub(R1, 18)
        a.stx("dw", FP, _S_INLEN, R1)
        a.jlt(R1, 14 + f.len_min, "offload")  # adjust_room keeps >= len_min after L3
        # -- outer TOS and the tunnel key's addresses --------------------------------
        if v == 4:
            a.ldx("b", R1, R7, ip + 1)
            a.stx("dw", FP, _S_TOS, R1)
            a.ldx("w", R1, R7, ip + 12)
            a.stx("w", FP, _KEY, R1)  # remote = outer source
            a.ldx("w", R1, R7, ip + 16)
            a.stx("w", FP, _KEY + 16, R1)  # local = outer destination
        else:
            a.ldx("b", R1, R7, ip)
            a.and_(R1, 0x0F)
            a.lsh(R1, 4)
            a.ldx("b", R2, R7, ip + 1)
            a.rsh(R2, 4)
            a.or_(R1, R2)
            a.stx("dw", FP, _S_TOS, R1)
            for k in range(0, 32, 8):
                a.ldx("dw", R1, R7, ip + 8 + k)
                a.stx("dw", FP, _KEY + k, R1)
        a.ldx("h", R1, R7, tcp + 2)
        a.stx("h", FP, _KEY + 40, R1)
        a.st("b", FP, _KEY + 42, v)
        # -- STT header and inner Ethernet header, linear ----------------------------
        need = inner + 16
        lin = a.fresh("lin_ok")
        pull = a.fresh("pull")
        a.mov(R1, R7)
        a.add(R1, need)
        a.jle(R1, R8, lin)
        a.ldx("w", R2, R6, SKB_LEN)
        a.jle(R2, need, pull)
        a.mov(R2, need)
        a.label(pull)
        a.mov(R1, R6)
        a.call(SKB_PULL_DATA)
        a.jne(R0, 0, "header")
        self.reload()
        a.label(lin)
        self.bound(inner + 14, "header")
        a.ldx("b", R1, R7, stt)
        a.jne(R1, 0, "header")  # version
        a.ldx("h", R1, R7, stt + 6)
        a.jne(R1, 0, "vlan")  # TCI
        a.ldx("dw", R1, R7, stt + 8)
        a.stx("dw", FP, _KEY + 32, R1)  # context id
        a.ldx("b", R1, R7, stt + 1)
        a.stx("dw", FP, _S_FLAGS, R1)
        a.ldx("b", R1, R7, stt + 2)
        a.stx("dw", FP, _S_L4OFF, R1)
        a.ldx("h", R1, R7, stt + 4)
        a.be16(R1)
        a.stx("dw", FP, _S_MSS, R1)
        a.ldx("dw", R1, R7, inner)
        a.stx("dw", FP, _ETH, R1)
        a.ldx("w", R1, R7, inner + 8)
        a.stx("w", FP, _ETH + 8, R1)
        a.ldx("h", R1, R7, inner + 12)
        a.stx("h", FP, _ETH + 12, R1)
        a.stx("dw", FP, _S_ET, R1)
        # -- the tunnel ----------------------------------------------------------------
        self.lookup(self.maps.tunnels, _KEY)
        a.jeq(R0, 0, "unknown")
        a.ldx("w", R1, R0, 0)
        a.stx("dw", FP, _S_IFINDEX, R1)
        a.ldx("w", R1, R0, 4)
        a.stx("dw", FP, _S_INDEX, R1)
        a.ldx("w", R9, R0, 8)
        self.marking(f)
        self.checksum_state(f)
        self.flags(f)
        self.strip_plan(f)
        a.ja("commit")

    def marking(self, f: _Family) -> None:
        """Outer CE, or a DSCP the uniform model would copy in: Python's job."""
        a = self.a
        inner = f.inner
        done = a.fresh("dscp_done")
        d4 = a.fresh("dscp4")
        d6 = a.fresh("dscp6")
        a.ldx("dw", R1, FP, _S_TOS)
        a.mov(R2, R1)
        a.and_(R2, 3)
        a.jeq(R2, 3, "marking")
        uniform = a.fresh("uniform")
        a.jset(R9, TUNNEL_FLAG_DSCP_UNIFORM, uniform)
        a.ja(done)
        a.label(uniform)
        a.rsh(R1, 2)  # outer DSCP
        a.ldx("dw", R2, FP, _S_ET)
        a.ldx("dw", R3, FP, _S_INLEN)
        a.jeq(R2, _ETH_P_IP_RAW, d4)
        a.jeq(R2, _ETH_P_IPV6_RAW, d6)
        a.ja(done)
        a.label(d4)
        a.jlt(R3, 34, done)
        self.bound(inner + 16, "header")
        a.ldx("b", R4, R7, inner + 15)
        a.rsh(R4, 2)
        a.jne(R4, R1, "marking")
        a.ja(done)
        a.label(d6)
        a.jlt(R3, 54, done)
        self.bound(inner + 16, "header")
        a.ldx("b", R4, R7, inner + 14)
        a.and_(R4, 0x0F)
        a.lsh(R4, 4)
        a.ldx("b", R5, R7, inner + 15)
        a.rsh(R5, 4)
        a.or_(R4, R5)
        a.rsh(R4, 2)
        a.jne(R4, R1, "marking")
        a.label(done)

    def flags(self, f: _Family) -> None:
        """Decide the mode (what happens to checksum/GSO) or pass the frame on."""
        a = self.a
        partial = a.fresh("partial")
        valid = a.fresh("valid")
        plain = a.fresh("plain")
        mode_set = a.fresh("mode_set")
        p_v4 = a.fresh("p_v4")
        p_l4 = a.fresh("p_l4")
        p_tcp = a.fresh("p_tcp")
        p_len = a.fresh("p_len")
        p_gso = a.fresh("p_gso")
        p_nogso = a.fresh("p_nogso")
        fam_ok = a.fresh("fam_ok")
        a.ldx("dw", R2, FP, _S_MODE)  # checksum_state() may have chosen it
        a.jeq(R2, _MODE_INNER_PARTIAL, mode_set)
        a.ldx("dw", R1, FP, _S_FLAGS)
        a.mov(R2, R1)
        a.and_(R2, 3)
        a.jeq(R2, 3, "header")  # C and P: Python counts csum_both_flags
        a.jset(R1, 2, partial)
        a.jset(R1, 1, valid)
        a.mov(R2, _MODE_NONE)
        a.ja(plain)
        a.label(valid)
        a.mov(R2, _MODE_VALID)
        a.ja(plain)
        # -- P: L4 offset rules of rx_vnet ------------------------------------------
        a.label(partial)
        a.ldx("dw", R3, FP, _S_L4OFF)
        a.ldx("dw", R4, FP, _S_INLEN)
        a.jset(R1, 4, p_v4)
        a.jlt(R3, 14 + 40, "header")
        a.ja(p_l4)
        a.label(p_v4)
        a.jlt(R3, 14 + 20, "header")
        a.label(p_l4)
        a.mov(R5, 8)
        a.mov(R0, 6)
        a.jset(R1, 8, p_tcp)
        a.ja(p_len)
        a.label(p_tcp)
        a.mov(R5, 20)
        a.mov(R0, 16)
        a.label(p_len)
        a.stx("dw", FP, _S_CSUMOFF, R0)
        a.mov(R2, R3)
        a.add(R2, R5)
        a.jgt(R2, R4, "header")  # the L4 header does not fit
        # GSO as the TAP write would make it: TCP, MSS != 0, payload > MSS.
        a.jset(R1, 8, p_gso)
        a.ja(p_nogso)
        a.label(p_gso)
        a.ldx("dw", R5, FP, _S_MSS)
        a.jeq(R5, 0, p_nogso)
        a.mov(R2, R4)
        a.sub(R2, R3)
        a.sub(R2, 20)
        a.jle(R2, R5, p_nogso)
        a.ldx("w", R2, R6, SKB_GSO_SIZE)
        a.jeq(R2, 0, "offload")  # the program cannot make a GSO skb
        # The inner packet must be of the family the V flag says (the TAP write's GSO
        # type follows V); across families the GSO type is switched at commit.
        g_v4 = a.fresh("g_v4")
        a.ldx("dw", R0, FP, _S_ET)
        a.jset(R1, 4, g_v4)
        a.jne(R0, _ETH_P_IPV6_RAW, "offload")
        a.mov(R3, _MODE_GSO if f.version == 6 else _MODE_GSO_CROSS)
        a.ja(fam_ok)
        a.label(g_v4)
        a.jne(R0, _ETH_P_IP_RAW, "offload")
        a.mov(R3, _MODE_GSO if f.version == 4 else _MODE_GSO_CROSS)
        a.label(fam_ok)
        a.mov(R0, R5)
        a.sub(R0, R2)
        a.stx("dw", FP, _S_DELTA, R0)
        a.add(R0, MAX_GSO_DELTA)
        a.jgt(R0, 2 * MAX_GSO_DELTA, "offload")
        a.mov(R2, R3)
        a.ja(mode_set)
        a.label(p_nogso)
        a.mov(R2, R4)
        a.sub(R2, R3)
        a.jgt(R2, CSUM_MAX, "offload")
        a.mov(R2, _MODE_COMPLETE)
        # -- a non-GSO result out of a GSO skb must be linearisable ----------------------
        a.label(plain)
        a.ldx("w", R3, R6, SKB_GSO_SIZE)
        a.jeq(R3, 0, mode_set)
        a.ldx("dw", R4, FP, _S_INLEN)
        a.jgt(R4, self.max_linear_len, "offload")
        a.label(mode_set)
        a.stx("dw", FP, _S_MODE, R2)

    def checksum_state(self, f: _Family) -> None:
        """Pass the frame on unless the outer checksum was (or will be) verified.

        Runs before flags() decides the mode: the summing loops then see few
        distinct verifier states (the verifier walks a loop once per state)."""
        a = self.a
        trusted = a.fresh("trusted")
        not_none = a.fresh("not_none")
        verify = a.fresh("verify")
        unverified = a.fresh("unverified")
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_QUERY)
        a.call(CSUM_LEVEL)
        a.jsge(R0, 0, trusted)  # CHECKSUM_UNNECESSARY
        # INC turns only CHECKSUM_NONE into UNNECESSARY: that is how NONE shows.
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_INC)
        a.call(CSUM_LEVEL)
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_QUERY)
        a.call(CSUM_LEVEL)
        a.jslt(R0, 0, not_none)
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_RESET)  # back to CHECKSUM_NONE
        a.call(CSUM_LEVEL)
        a.st("dw", FP, _S_NONE, 1)
        a.ja(verify)  # nobody checked: only the program's own sum counts
        a.label(not_none)
        # PARTIAL or COMPLETE.  GSO skbs are PARTIAL (GRO or a local sender).
        a.ldx("w", R1, R6, SKB_GSO_SIZE)
        a.jne(R1, 0, trusted)
        # A non-GSO PARTIAL skb's checksum field holds the pseudo-header sum.
        self.outer_pseudo(f)
        a.ldx("h", R3, R7, f.tcp + 16)
        a.jeq(R3, R2, trusted)  # Linux: sum includes the TCP length
        a.jeq(R3, R1, trusted)  # Windows LSO: without it
        a.label(verify)
        self.verify_outer(f, unverified)
        a.ja(trusted)
        a.label(unverified)
        a.ldx("dw", R1, FP, _S_NONE)
        a.jne(R1, 0, "checksum")
        self.inner_partial(f)
        a.label(trusted)

    def strip_plan(self, f: _Family) -> None:
        """R9 = the bytes commit() strips; GSO across families switches the GSO type."""
        a = self.a
        a.mov(R9, f.strip)
        same = a.fresh("same_family")
        a.ldx("dw", R1, FP, _S_MODE)
        a.jne(R1, _MODE_GSO_CROSS, same)
        # GSO across families: bpf_skb_change_proto switches SKB_GSO_TCPV4 and
        # SKB_GSO_TCPV6 (and adds/removes the 20 bytes the headers differ by, right
        # after the Ethernet header, where the strip removes them); gso_size stays.
        emit.change_proto(a, 6 if f.version == 4 else 4, "error")
        a.st("dw", FP, _S_MODE, _MODE_GSO)
        a.mov(R9, f.strip + 20 if f.version == 4 else f.strip - 20)
        a.label(same)

    def outer_pseudo(self, f: _Family) -> None:
        """R1 = the outer pseudo-header sum without the TCP length, R2 = with it,
        both folded to 16 bits as little-endian loads see them; R7 = data."""
        a = self.a
        ip = 14
        self.reload()
        self.bound(f.inner + 14, "header")
        a.mov(R1, 0x0600)  # protocol 6, as a little-endian load of the pair 0x00 0x06
        addrs = range(ip + 12, ip + 20, 2) if f.version == 4 else range(ip + 8, ip + 40, 2)
        for off in addrs:
            a.ldx("h", R2, R7, off)
            a.add(R1, R2)
        a.ldx("w", R3, R6, SKB_LEN)
        a.sub(R3, f.tcp)  # TCP length
        a.be16(R3)
        a.mov(R2, R1)
        a.add(R2, R3)
        self.fold(R1, 3)
        self.fold(R2, 3)

    def verify_outer(self, f: _Family, mismatch: str) -> None:
        """Sum the outer TCP segment with its pseudo header; go on if it verifies,
        to ``mismatch`` if not (the folded sum stays at _S_OSUM), to "checksum" if
        the segment is longer than :data:`CSUM_MAX`."""
        a = self.a
        self.outer_pseudo(f)
        a.stx("dw", FP, _S_OSUM, R2)
        a.ldx("w", R8, R6, SKB_LEN)
        a.sub(R8, f.tcp)
        a.mov(R7, f.tcp)
        self.sum_skb("checksum")
        a.ldx("dw", R1, FP, _S_OSUM)
        a.add(R2, R1)
        self.fold(R2, 2)
        a.stx("dw", FP, _S_OSUM, R2)
        a.jne(R2, 0xFFFF, mismatch)

    def inner_partial(self, f: _Family) -> None:
        """A non-GSO PARTIAL skb without P whose inner TCP/UDP checksum field holds
        the inner pseudo-header sum (a local sender's offload with csum_start at the
        inner L4 header), and whose outer checksum verifies with the field's final
        value in its place: mode _MODE_INNER_PARTIAL, the final value at _S_CSUM.
        Anything else goes to "checksum".  Needs _S_OSUM from verify_outer()."""
        a = self.a
        v4 = a.fresh("ip_v4")
        addrs_done = a.fresh("ip_addrs")
        tcp = a.fresh("ip_tcp")
        proto_ok = a.fresh("ip_proto")
        nonzero = a.fresh("ip_nonzero")
        # bpf_csum_update answers (adding 0) only for CHECKSUM_COMPLETE: a NIC's skb,
        # whose bytes crossed a wire; a seed in it is not a local offload.
        a.mov(R1, R6)
        a.mov(R2, 0)
        a.call(CSUM_UPDATE)
        a.jsge(R0, 0, "checksum")
        a.ldx("dw", R1, FP, _S_FLAGS)
        a.jset(R1, 2, "checksum")  # P: the sender said where its partial sum is
        a.ldx("dw", R1, FP, _S_ET)
        a.jeq(R1, _ETH_P_IP_RAW, v4)
        a.jne(R1, _ETH_P_IPV6_RAW, "checksum")
        # -- IPv6: next header TCP or UDP (no extension headers) ----------------------
        self.load_bytes(f.inner + 14, _IIP, 40, "checksum")
        a.ldx("b", R1, FP, _IIP)
        a.rsh(R1, 4)
        a.jne(R1, 6, "checksum")
        a.ldx("b", R5, FP, _IIP + 6)
        a.ldx("h", R8, FP, _IIP + 4)
        a.be16(R8)  # L4 length
        a.mov(R7, 14 + 40)  # L4 offset in the inner frame
        a.mov(R2, 0)
        for k in range(8, 40, 2):
            a.ldx("h", R1, FP, _IIP + k)
            a.add(R2, R1)
        a.ja(addrs_done)
        # -- IPv4: any header length, not a fragment ------------------------------------
        a.label(v4)
        self.load_bytes(f.inner + 14, _IIP, 20, "checksum")
        a.ldx("b", R1, FP, _IIP)
        a.mov(R3, R1)
        a.rsh(R3, 4)
        a.jne(R3, 4, "checksum")
        a.and_(R1, 0x0F)
        a.lsh(R1, 2)  # header length
        a.jlt(R1, 20, "checksum")
        a.ldx("h", R3, FP, _IIP + 6)
        a.and_(R3, 0xFF3F)  # MF | fragment offset
        a.jne(R3, 0, "checksum")
        a.ldx("b", R5, FP, _IIP + 9)
        a.ldx("h", R8, FP, _IIP + 2)
        a.be16(R8)  # total length
        a.jlt(R8, R1, "checksum")
        a.sub(R8, R1)  # L4 length
        a.mov(R7, R1)
        a.add(R7, 14)  # L4 offset in the inner frame
        a.mov(R2, 0)
        for k in range(12, 20, 2):
            a.ldx("h", R1, FP, _IIP + k)
            a.add(R2, R1)
        # -- R5 protocol, R7 L4 offset, R8 L4 length, R2 the addresses' sum -------------
        a.label(addrs_done)
        a.jeq(R5, 6, tcp)
        a.jne(R5, 17, "checksum")
        a.mov(R3, 6)  # UDP: checksum at 6, header 8
        a.mov(R4, 8)
        a.ja(proto_ok)
        a.label(tcp)
        a.mov(R3, 16)
        a.mov(R4, 20)
        a.label(proto_ok)
        a.jlt(R8, R4, "checksum")  # the L4 header does not fit the L4 length
        a.stx("dw", FP, _S_CSUMOFF, R3)
        a.stx("dw", FP, _S_L4OFF, R7)
        a.mov(R1, R7)
        a.add(R1, R8)
        a.ldx("dw", R4, FP, _S_INLEN)
        a.jgt(R1, R4, "checksum")  # the IP packet is longer than the frame
        a.lsh(R5, 8)  # the pair 0x00 protocol, loaded little-endian
        a.add(R2, R5)
        a.mov(R1, R8)
        a.be16(R1)
        a.add(R2, R1)
        self.fold(R2, 3)
        a.stx("dw", FP, _S_SEED, R2)
        # -- the field holds the seed (Linux: ~csum_tcpudp_magic / ~csum_ipv6_magic) -----
        a.mov(R1, R6)
        a.mov(R2, R7)
        a.add(R2, R3)
        a.add(R2, f.inner)
        a.mov(R3, FP)
        a.add(R3, _S_CSUM)
        a.mov(R4, 2)
        a.call(SKB_LOAD_BYTES)
        a.jne(R0, 0, "checksum")
        a.ldx("h", R1, FP, _S_CSUM)
        a.ldx("dw", R2, FP, _S_SEED)
        a.jne(R1, R2, "checksum")
        # -- the final value F = ~(sum from the L4 header to the end of the frame) --------
        a.ldx("dw", R8, FP, _S_INLEN)
        a.ldx("dw", R7, FP, _S_L4OFF)
        a.sub(R8, R7)
        a.add(R7, f.inner)
        self.sum_skb("checksum")
        a.xor(R2, 0xFFFF)
        # -- the outer checksum with F in place of the seed: S - seed + F ----------------
        a.ldx("dw", R3, FP, _S_SEED)
        a.xor(R3, 0xFFFF)
        a.add(R3, R2)
        a.ldx("dw", R1, FP, _S_OSUM)
        a.add(R3, R1)
        self.fold(R3, 2)
        a.jne(R3, 0xFFFF, "checksum")
        a.jne(R2, 0, nonzero)
        a.mov(R2, 0xFFFF)  # CSUM_MANGLED_0
        a.label(nonzero)
        a.stx("h", FP, _S_CSUM, R2)
        a.st("dw", FP, _S_MODE, _MODE_INNER_PARTIAL)

    def load_bytes(self, off: int, slot: int, n: int, fail: str) -> None:
        """Copy ``n`` bytes at skb offset ``off`` to the stack at ``slot``."""
        a = self.a
        a.mov(R1, R6)
        a.mov(R2, off)
        a.mov(R3, FP)
        a.add(R3, slot)
        a.mov(R4, n)
        a.call(SKB_LOAD_BYTES)
        a.jne(R0, 0, fail)

    def fold(self, reg: Reg, rounds: int) -> None:
        """Fold ``reg`` towards 16 bits, end-around carry (uses R4)."""
        emit.fold(self.a, reg, R4, rounds)

    def sum_skb(self, fail: str) -> None:
        """R2 = the ones' complement sum of the R8 bytes at skb offset R7, folded to
        16 bits as little-endian loads see it; ``fail`` unless 8 <= R8 <=
        :data:`CSUM_MAX` or if the bytes cannot be read.  The bytes are copied to
        the per-CPU scratch buffer and summed 8 at a time (an even R7 keeps the
        16-bit words of the packet).  Clobbers R0-R5 and R9."""
        a = self.a
        a.jlt(R8, 8, fail)
        a.jgt(R8, CSUM_MAX, fail)
        self.lookup(self.maps.scratch, _S_ZERO)
        a.jeq(R0, 0, fail)
        a.mov(R9, R0)
        # zero the 8 bytes the last partial word reads past the data
        a.mov(R1, R8)
        a.and_(R1, -8)
        a.add(R1, R9)
        a.st("dw", R1, 0, 0)
        a.mov(R1, R6)
        a.mov(R2, R7)
        a.mov(R3, R9)
        a.mov(R4, R8)
        a.call(SKB_LOAD_BYTES)
        a.jne(R0, 0, fail)
        a.mov(R3, R8)
        a.add(R3, 7)
        a.and_(R3, -8)
        a.mov(R1, 0)
        a.mov(R2, 0)
        emit.sum_words(a, R9)
        emit.fold64(a, R2, R4)

    def adjust(self, diff: int | Reg, flags: int) -> None:
        """bpf_skb_adjust_room(skb, diff, MAC, flags); a failure drops the frame."""
        emit.adjust_room(self.a, diff, flags, "error")

    def commit(self) -> None:
        """Strip, fix checksum/GSO state, count, redirect.  R9 = bytes to strip."""
        a = self.a
        fixed = BPF_F_ADJ_ROOM_FIXED_GSO
        a.label("commit")
        a.stx("dw", FP, _S_STRIP, R9)
        a.ldx("dw", R1, FP, _S_MODE)
        a.jeq(R1, _MODE_GSO, "gso")
        # -- non-GSO result ----------------------------------------------------------
        a.mov(R2, 0)
        a.sub(R2, R9)
        self.adjust(R2, fixed)
        a.ldx("w", R1, R6, SKB_GSO_SIZE)
        a.jeq(R1, 0, "stripped")
        a.mov(R1, R6)
        a.ldx("w", R2, R6, SKB_LEN)
        a.mov(R3, 0)
        a.call(SKB_CHANGE_TAIL)  # linearise, reset GSO
        a.jne(R0, 0, "error")
        a.ja("stripped")
        # -- GSO result: gso_size := STT MSS -----------------------------------------
        # A non-FIXED_GSO grow by g lowers gso_size by g, a shrink by s raises it by s.
        a.label("gso")
        a.ldx("dw", R1, FP, _S_DELTA)  # MSS - gso_size
        a.jslt(R1, 0, "gso_neg")
        a.jeq(R1, 0, "gso_zero")
        a.jmp("sgt", R1, R9, "gso_big")
        # 0 < delta <= strip: shrink delta (gso += delta), then the rest fixed.
        a.mov(R2, 0)
        a.sub(R2, R1)
        self.adjust(R2, 0)
        a.ldx("dw", R1, FP, _S_DELTA)
        a.ldx("dw", R2, FP, _S_STRIP)
        a.sub(R1, R2)  # delta - strip (<= 0)
        a.jeq(R1, 0, "stripped")
        self.adjust(R1, fixed)
        a.ja("stripped")
        a.label("gso_neg")  # grow -delta (gso -= -delta), shrink strip - delta fixed
        a.mov(R2, 0)
        a.sub(R2, R1)
        self.adjust(R2, 0)
        a.ldx("dw", R2, FP, _S_DELTA)
        a.ldx("dw", R1, FP, _S_STRIP)
        a.sub(R2, R1)  # delta - strip
        self.adjust(R2, fixed)
        a.ja("stripped")
        a.label("gso_zero")
        a.mov(R2, 0)
        a.sub(R2, R9)
        self.adjust(R2, fixed)
        a.ja("stripped")
        a.label("gso_big")  # grow delta - strip fixed, shrink delta (gso += delta)
        a.mov(R2, R1)
        a.sub(R2, R9)
        self.adjust(R2, fixed)
        a.ldx("dw", R1, FP, _S_DELTA)
        a.mov(R2, 0)
        a.sub(R2, R1)
        self.adjust(R2, 0)
        # -- the inner Ethernet header over the outer one ------------------------------
        a.label("stripped")
        a.mov(R1, R6)
        a.mov(R2, 0)
        a.mov(R3, FP)
        a.add(R3, _ETH)
        a.mov(R4, 14)
        a.mov(R5, 0)
        a.call(SKB_STORE_BYTES)
        a.jne(R0, 0, "error")
        a.ldx("dw", R1, FP, _S_MODE)
        a.jeq(R1, _MODE_NONE, "deliver")
        a.jeq(R1, _MODE_INNER_PARTIAL, "inner_partial")
        a.jne(R1, _MODE_COMPLETE, "mark_valid")
        self.complete_checksum()
        a.label("mark_valid")
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_INC)  # CHECKSUM_NONE -> UNNECESSARY
        a.call(CSUM_LEVEL)
        a.label("deliver")
        a.ldx("dw", R1, FP, _S_INDEX)
        a.stx("w", FP, _S_STATKEY, R1)
        self.count(self.maps.tunnel_stats)
        a.ldx("dw", R1, FP, _S_IFINDEX)
        a.mov(R2, BPF_F_INGRESS)
        a.call(REDIRECT)
        a.exit()
        # -- the inner checksum field holds its seed ---------------------------------------
        # csum_start at the inner L4 header (a local sender's offload) is after the
        # strip: the skb is still PARTIAL and the device or skb_checksum_help fills
        # the field, so it keeps its seed.  Had csum_start been in the stripped
        # headers, the strip made the skb NONE: the final value goes in here.
        a.label("inner_partial")
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_INC)  # NONE -> UNNECESSARY; PARTIAL stays
        a.call(CSUM_LEVEL)
        a.mov(R1, R6)
        a.mov(R2, CSUM_LEVEL_QUERY)
        a.call(CSUM_LEVEL)
        a.jslt(R0, 0, "deliver")
        self.store_l4_csum()
        a.ja("deliver")

    def complete_checksum(self) -> None:
        """Sum the inner L4 segment (P: its checksum field holds the pseudo-header
        sum) and store the folded complement, 0 written as 0xFFFF."""
        a = self.a
        a.ldx("dw", R8, FP, _S_INLEN)
        a.ldx("dw", R7, FP, _S_L4OFF)
        a.sub(R8, R7)  # L4 length
        self.sum_skb("error")
        a.xor(R2, 0xFFFF)
        a.jne(R2, 0, "csum_store")
        a.mov(R2, 0xFFFF)  # CSUM_MANGLED_0
        a.label("csum_store")
        a.stx("h", FP, _S_CSUM, R2)
        self.store_l4_csum()

    def store_l4_csum(self) -> None:
        """Write the 2 bytes at _S_CSUM into the inner frame's L4 checksum field."""
        a = self.a
        a.mov(R1, R6)
        a.ldx("dw", R2, FP, _S_L4OFF)
        a.ldx("dw", R3, FP, _S_CSUMOFF)
        a.add(R2, R3)
        a.mov(R3, FP)
        a.add(R3, _S_CSUM)
        a.mov(R4, 2)
        a.mov(R5, 0)
        a.call(SKB_STORE_BYTES)
        a.jne(R0, 0, "error")

    def count(self, fd: int) -> None:
        """Add one packet and skb->len bytes to ``fd``'s per-CPU slot at _S_STATKEY."""
        emit.count(self.a, fd, _S_STATKEY)

    def exits(self) -> None:
        a = self.a
        labels = {
            "not_stt": PassReason.NOT_STT,
            "piece": PassReason.PIECE,
            "unknown": PassReason.UNKNOWN_TUNNEL,
            "header": PassReason.HEADER,
            "vlan": PassReason.VLAN,
            "marking": PassReason.MARKING,
            "checksum": PassReason.CHECKSUM,
            "offload": PassReason.OFFLOAD,
        }
        if self.ordered:  # (an exit nothing jumps to is unreachable code: refused)
            labels["queued"] = PassReason.QUEUED
        hook = emit.order_count(a, _S_ORDER) if self.ordered else None
        emit.pass_exits(a, labels, self.maps.reasons, _S_STATKEY, hook)
        emit.drop_exit(a, "error", PassReason.ERROR, self.maps.reasons, _S_STATKEY)
