"""Classic BPF socket filter that lets only STT-port TCP frames into a packet socket.

:func:`stt_filter` builds a program (a list of ``(code, jt, jf, k)`` tuples) that
accepts an Ethernet frame when it is

* IPv4, not a non-first fragment (fragment offset 0; MF may be set), protocol TCP,
  TCP destination port in ``ports``; or
* IPv6 whose *fixed* header's next header is TCP (no extension headers) and TCP
  destination port in ``ports``;

and rejects everything else.  :func:`attach_filter` installs it with
``SO_ATTACH_FILTER``.  The program runs in the kernel on the frame as received (from
the Ethernet header on, the virtio-net header is not part of it).
"""

from __future__ import annotations

import ctypes
import operator
import socket
import struct
from collections.abc import Callable, Iterable, Sequence

from sttun.errors import SetupError
from sttun.wire.ether import ETH_HLEN
from sttun.wire.ether import ETH_P_IP as ETHERTYPE_IPV4
from sttun.wire.ether import ETH_P_IPV6 as ETHERTYPE_IPV6
from sttun.wire.ip import IPPROTO_TCP
from sttun.wire.stt import STT_PORT

# Instruction classes, sizes, modes and ops from <linux/filter.h> / <linux/bpf_common.h>.
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MSH = 0xA0
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_K = 0x00
BPF_A = 0x10

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_LOCK_FILTER = 44

ACCEPT_ALL = 0xFFFFFFFF
"""Return value of an accepting program: keep the whole packet."""

BPF_MAXINSNS = 4096
MAX_PORTS = 100
"""Upper bound on filter ports; keeps every jump offset within the 8-bit jt/jf range."""

Insn = tuple[int, int, int, int]
"""One classic BPF instruction ``(code, jt, jf, k)``."""

_SOCK_FILTER = struct.Struct("HBBI")


class _Asm:
    """A two-pass assembler: conditional jumps name labels, resolved at the end."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0) -> None:
        self.items.append((code, 0, 0, k))

    def jump(self, code: int, k: int, jt: str | int, jf: str | int) -> None:
        self.items.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.items)

    def assemble(self) -> list[Insn]:
        out: list[Insn] = []
        for pc, (code, jt, jf, k) in enumerate(self.items):
            offs = []
            for target in (jt, jf):
                if isinstance(target, int):
                    offs.append(target)
                    continue
                off = self.labels[target] - pc - 1
                if not 0 <= off <= 255:
                    raise ValueError(f"BPF jump to {target} out of range ({off})")
                offs.append(off)
            out.append((code, offs[0], offs[1], k))
        return out


def _check_ports(ports: Iterable[int]) -> list[int]:
    uniq = sorted(set(ports))
    if not uniq:
        raise SetupError("BPF filter: at least one port is needed")
    if len(uniq) > MAX_PORTS:
        raise SetupError(f"BPF filter: at most {MAX_PORTS} ports, got {len(uniq)}")
    for p in uniq:
        if not isinstance(p, int) or not 0 < p < 65536:
            raise SetupError(f"BPF filter: port must be 1..65535, got {p!r}")
    return uniq


def stt_filter(ports: Iterable[int] = (STT_PORT,)) -> list[Insn]:
    """The filter program for TCP to any of ``ports`` over IPv4 or IPv6 (see module doc)."""
    plist = _check_ports(ports)
    a = _Asm()
    a.op(BPF_LD | BPF_H | BPF_ABS, 12)  # ethertype
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, ETHERTYPE_IPV4, "ip4", 0)
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, ETHERTYPE_IPV6, "ip6", "reject")
    # IPv4
    a.label("ip4")
    a.op(BPF_LD | BPF_B | BPF_ABS, ETH_HLEN + 9)  # protocol
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_TCP, 0, "reject")
    a.op(BPF_LD | BPF_H | BPF_ABS, ETH_HLEN + 6)  # flags + fragment offset
    a.jump(BPF_JMP | BPF_JSET | BPF_K, 0x1FFF, "reject", 0)
    a.op(BPF_LDX | BPF_B | BPF_MSH, ETH_HLEN)  # X = 4 * IHL
    a.op(BPF_LD | BPF_H | BPF_IND, ETH_HLEN + 2)  # TCP destination port
    for p in plist:
        a.jump(BPF_JMP | BPF_JEQ | BPF_K, p, "accept", 0)
    a.op(BPF_RET | BPF_K, 0)
    # IPv6 (fixed header only)
    a.label("ip6")
    a.op(BPF_LD | BPF_B | BPF_ABS, ETH_HLEN + 6)  # next header
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_TCP, 0, "reject")
    a.op(BPF_LD | BPF_H | BPF_ABS, ETH_HLEN + 40 + 2)  # TCP destination port
    for p in plist:
        a.jump(BPF_JMP | BPF_JEQ | BPF_K, p, "accept", 0)
    a.label("reject")
    a.op(BPF_RET | BPF_K, 0)
    a.label("accept")
    a.op(BPF_RET | BPF_K, ACCEPT_ALL)
    prog = a.assemble()
    if len(prog) > BPF_MAXINSNS:  # pragma: no cover - MAX_PORTS keeps us far below
        raise SetupError(f"BPF filter: {len(prog)} instructions exceed {BPF_MAXINSNS}")
    return prog


def reject_all() -> list[Insn]:
    """A program that drops every packet."""
    return [(BPF_RET | BPF_K, 0, 0, 0)]


def pack_program(prog: Sequence[Insn]) -> bytes:
    """The program as an array of ``struct sock_filter``."""
    return b"".join(_SOCK_FILTER.pack(*insn) for insn in prog)


def attach_filter(sock: socket.socket, prog: Sequence[Insn]) -> None:
    """Attach ``prog`` to ``sock`` with ``SO_ATTACH_FILTER`` (``struct sock_fprog``)."""
    if not prog or len(prog) > BPF_MAXINSNS:
        raise SetupError(f"BPF filter: 1..{BPF_MAXINSNS} instructions, got {len(prog)}")
    code = pack_program(prog)
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (native
    # alignment puts the pointer at offset 8 on 64-bit).
    fprog = struct.pack("HP", len(prog), ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as e:
        raise SetupError(f"SO_ATTACH_FILTER failed: {e.strerror}") from e
    del buf  # the kernel copied the program; keep buf alive until here


def detach_filter(sock: socket.socket) -> None:
    """Remove the socket's filter."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


_ALU_OPS: dict[int, Callable[[int, int], int]] = {
    0x00: operator.add,
    0x10: operator.sub,
    0x20: operator.mul,
    0x40: operator.or_,
    0x50: operator.and_,
    0x60: operator.lshift,
    0x70: operator.rshift,
}


def run_program(prog: Sequence[Insn], pkt: bytes | bytearray | memoryview) -> int:
    """Interpret ``prog`` on ``pkt`` like the kernel does; returns the accepted length.

    A small reference interpreter for tests and debugging (supports the instructions
    this module emits plus the common ALU/jump set).  Out-of-bounds loads return 0,
    as in the kernel.
    """
    data = bytes(pkt)
    A = X = 0
    pc = 0
    mem = [0] * 16
    while pc < len(prog):
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls in (BPF_LD, BPF_LDX):
            size = {BPF_W: 4, BPF_H: 2, BPF_B: 1}[code & 0x18]
            mode = code & 0xE0
            if mode == BPF_MSH:
                if k >= len(data):
                    return 0
                X = (data[k] & 0x0F) * 4
                continue
            if mode == BPF_IMM:
                val = k
            elif mode in (BPF_ABS, BPF_IND):
                off = k + (X if mode == BPF_IND else 0)
                if off + size > len(data):
                    return 0
                val = int.from_bytes(data[off : off + size], "big")
            elif mode == 0x60:  # BPF_MEM
                val = mem[k]
            elif mode == 0x80:  # BPF_LEN
                val = len(data)
            else:
                raise ValueError(f"unsupported load mode {code:#x}")
            if cls == BPF_LD:
                A = val
            else:
                X = val
        elif cls == BPF_JMP:
            op = code & 0xF0
            src = X if code & 0x08 else k
            if op == BPF_JA:
                pc += k
                continue
            cond = {
                BPF_JEQ: src == A,
                BPF_JGT: src < A,
                BPF_JGE: src <= A,
                BPF_JSET: bool(A & src),
            }[op]
            pc += jt if cond else jf
        elif cls == BPF_RET:
            ret = A if (code & 0x18) == BPF_A else k
            return min(ret, len(data))
        elif cls == BPF_ALU:
            op = code & 0xF0
            src = X if code & 0x08 else k
            A = _ALU_OPS[op](A, src) & 0xFFFFFFFF
        elif cls == 0x07:  # BPF_MISC: tax / txa
            if (code & 0xF8) == 0x80:  # txa
                A = X
            else:
                X = A
        else:
            raise ValueError(f"unsupported instruction {code:#x}")
    raise ValueError("BPF program ran off its end")
