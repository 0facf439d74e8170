"""Instruction sequences both tc programs use (receive and transmit fast path).

Each function appends to an :class:`~sttun.io.ebpf.asm.Asm`; the registers each one
reads and clobbers are in its docstring.  Ones' complement sums are kept as
little-endian loads see the packet's 16-bit words (summing and storing in that
byte order gives the right checksum bytes).  Helper numbers and ``__sk_buff``
offsets are from ``include/uapi/linux/bpf.h``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sttun.io.ebpf.asm import FP, R0, R1, R2, R3, R4, R5, R6, Asm, Reg

# Helpers (enum bpf_func_id).
MAP_LOOKUP_ELEM = 1
GET_SMP_PROCESSOR_ID = 8
SKB_STORE_BYTES = 9
REDIRECT = 23
SKB_LOAD_BYTES = 26
SKB_CHANGE_PROTO = 31
SKB_CHANGE_TAIL = 38
SKB_PULL_DATA = 39
CSUM_UPDATE = 40
SKB_ADJUST_ROOM = 50
CSUM_LEVEL = 135
# Helper arguments.
BPF_F_INGRESS = 1
BPF_ADJ_ROOM_MAC = 1
BPF_F_ADJ_ROOM_FIXED_GSO = 1
CSUM_LEVEL_QUERY = 0
CSUM_LEVEL_INC = 1
CSUM_LEVEL_RESET = 3
# tc verdicts.  Passing returns TC_ACT_UNSPEC (TCX_NEXT): programs and filters
# after this one still run, and without any the packet goes on its way.
TC_ACT_UNSPEC = -1
TC_ACT_SHOT = 2
# struct __sk_buff offsets.
SKB_LEN = 0
SKB_PROTOCOL = 16
SKB_VLAN_PRESENT = 20
SKB_IFINDEX = 40
SKB_DATA = 76
SKB_DATA_END = 80
SKB_GSO_SIZE = 176
# skb->protocol as a program reads it (a __be16 loaded little-endian).
ETH_P_IP_RAW = 0x0008
ETH_P_IPV6_RAW = 0xDD86


def lookup(a: Asm, fd: int, key_slot: int) -> None:
    """R0 = map_lookup_elem(fd, fp + key_slot) (clobbers R1-R5)."""
    a.ld_map_fd(R1, fd)
    a.mov(R2, FP)
    a.add(R2, key_slot)
    a.call(MAP_LOOKUP_ELEM)


def fold(a: Asm, reg: Reg, tmp: Reg, rounds: int = 4) -> None:
    """Fold the sum in ``reg`` towards 16 bits with end-around carry, ``rounds``
    times (three suffice below 2**34, four below 2**50); clobbers ``tmp``."""
    for _ in range(rounds):
        a.mov(tmp, reg)
        a.rsh(tmp, 16)
        a.and_(reg, 0xFFFF)
        a.add(reg, tmp)


def fold64(a: Asm, reg: Reg, tmp: Reg) -> None:
    """Fold a 64-bit sum in ``reg`` to 16 bits (its halves added, then three
    rounds); clobbers ``tmp``."""
    a.mov(tmp, reg)
    a.rsh(tmp, 32)
    a.alu32("mov", reg, reg)
    a.add(reg, tmp)
    fold(a, reg, tmp, 3)


def sum_words(a: Asm, base: Reg) -> None:
    """R2 += the 16-bit lanes of the 8-byte words at ``base`` + [R1, R3), R1
    stepping by 8 (64-bit, not folded).  R3 must bound R1 for the verifier and the
    bytes up to the next multiple of 8 must be readable (zero past the data).
    Clobbers R1, R4, R5."""
    loop = a.fresh("sum_loop")
    done = a.fresh("sum_done")
    a.label(loop)
    a.jge(R1, R3, done)
    a.mov(R4, base)
    a.add(R4, R1)
    a.ldx("dw", R5, R4, 0)
    a.mov(R4, R5)
    a.rsh(R4, 32)
    a.add(R2, R4)
    a.alu32("mov", R4, R5)
    a.add(R2, R4)
    a.add(R1, 8)
    a.ja(loop)
    a.label(done)


def count(a: Asm, fd: int, key_slot: int, length: Reg | None = None) -> None:
    """Add one packet and ``length`` bytes (a callee-saved register; None:
    ``skb->len`` of the skb in R6) to ``fd``'s per-CPU counter at the u32 key in
    ``key_slot``.  Clobbers R0-R5."""
    skip = a.fresh("count_skip")
    lookup(a, fd, key_slot)
    a.jeq(R0, 0, skip)
    a.ldx("dw", R1, R0, 0)
    a.add(R1, 1)
    a.stx("dw", R0, 0, R1)
    if length is None:
        a.ldx("w", R2, R6, SKB_LEN)
        length = R2
    a.ldx("dw", R1, R0, 8)
    a.add(R1, length)
    a.stx("dw", R0, 8, R1)
    a.label(skip)


def pass_exits(
    a: Asm,
    labels: Mapping[str, int],
    reasons_fd: int,
    key_slot: int,
    on_pass: Callable[[], None] | None = None,
) -> None:
    """For each ``label -> reason``: count the skb (``skb->len`` bytes) under that
    reason in ``reasons_fd``, run ``on_pass`` if given, and return ``TC_ACT_UNSPEC``
    (the packet goes on to the Python path).  Uses the u32 at ``key_slot``."""
    for name, reason in labels.items():
        a.label(name)
        a.mov(R0, int(reason))
        a.ja("pass")
    a.label("pass")
    a.stx("w", FP, key_slot, R0)
    count(a, reasons_fd, key_slot)
    if on_pass is not None:
        on_pass()
    a.mov(R0, TC_ACT_UNSPEC)
    a.exit()


def drop_exit(a: Asm, label: str, reason: int, reasons_fd: int, key_slot: int) -> None:
    """At ``label``: count the skb under ``reason`` and drop it (``TC_ACT_SHOT``)."""
    a.label(label)
    a.mov(R0, int(reason))
    a.stx("w", FP, key_slot, R0)
    count(a, reasons_fd, key_slot)
    a.mov(R0, TC_ACT_SHOT)
    a.exit()


def change_proto(a: Asm, version: int, fail: str) -> None:
    """bpf_skb_change_proto(skb, IPv4 or IPv6 by ``version``, 0), the skb in R6; to
    ``fail`` if it fails (clobbers R0-R5)."""
    a.mov(R1, R6)
    a.mov(R2, ETH_P_IP_RAW if version == 4 else ETH_P_IPV6_RAW)
    a.mov(R3, 0)
    a.call(SKB_CHANGE_PROTO)
    a.jne(R0, 0, fail)


def adjust_room(a: Asm, diff: int | Reg, flags: int, fail: str) -> None:
    """bpf_skb_adjust_room(skb, diff, BPF_ADJ_ROOM_MAC, flags), the skb in R6; to
    ``fail`` if it fails (clobbers R0-R5)."""
    if diff != R2:
        a.mov(R2, diff)
    a.mov(R1, R6)
    a.mov(R3, BPF_ADJ_ROOM_MAC)
    a.mov(R4, flags)
    a.call(SKB_ADJUST_ROOM)
    a.jne(R0, 0, fail)


# The ordering pair of a stream (an mmap()able array map's value): frames passed to
# Python, frames Python has handled (sttun.io.order_counter.OrderCounter).
ORDER_PASSED = 0
ORDER_CONSUMED = 8
ORDER_VALUE_SIZE = 16


def order_wait(a: Asm, ptr_slot: int, queued: str) -> None:
    """To ``queued`` while Python has not handled every frame passed to it (the
    pair's address in the u64 at ``ptr_slot``, not 0).  Clobbers R0-R2."""
    a.ldx("dw", R0, FP, ptr_slot)
    a.ldx("dw", R1, R0, ORDER_PASSED)
    a.ldx("dw", R2, R0, ORDER_CONSUMED)
    a.jne(R1, R2, queued)


def order_count(a: Asm, ptr_slot: int) -> Callable[[], None]:
    """The ``on_pass`` hook of :func:`pass_exits`: one more frame passed to Python,
    counted atomically in the pair whose address is at ``ptr_slot`` (0: none, the
    frame is not part of an ordered stream).  Clobbers R1, R2."""

    def hook() -> None:
        uncounted = a.fresh("uncounted")
        a.ldx("dw", R1, FP, ptr_slot)
        a.jeq(R1, 0, uncounted)
        a.mov(R2, 1)
        a.atomic_add("dw", R1, ORDER_PASSED, R2)
        a.label(uncounted)

    return hook
