"""A small eBPF assembler: instructions as Python calls, labels resolved at the end.

Only what sttun's receive program needs, encoded as ``struct bpf_insn`` (8 bytes,
little-endian: opcode, ``dst_reg | src_reg << 4``, 16-bit offset, 32-bit immediate;
``Documentation/bpf/standardization/instruction-set.rst``).  Registers are
:class:`Reg` objects (``R0`` .. ``R10``) so that an ``int`` operand always means an
immediate.  Jumps name labels; :meth:`Asm.assemble` turns them into offsets.

    a = Asm()
    a.mov(R0, 0)
    a.jeq(R1, 5, "out")
    a.mov(R0, 1)
    a.label("out")
    a.exit()
    code = a.assemble()   # bytes for BPF_PROG_LOAD
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

# Instruction classes.
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_ALU64 = 0x07
# Sizes and modes (load/store classes).
SIZES = {"b": 0x10, "h": 0x08, "w": 0x00, "dw": 0x18}
BPF_IMM = 0x00
BPF_MEM = 0x60
BPF_ATOMIC = 0xC0
# Source operand (ALU/JMP classes).
BPF_K = 0x00
BPF_X = 0x08
# ALU operations.
ALU_OPS = {
    "add": 0x00,
    "sub": 0x10,
    "mul": 0x20,
    "or": 0x40,
    "and": 0x50,
    "lsh": 0x60,
    "rsh": 0x70,
    "neg": 0x80,
    "xor": 0xA0,
    "mov": 0xB0,
    "arsh": 0xC0,
}
BPF_END = 0xD0
BPF_TO_BE = 0x08
# Jump operations.
JMP_OPS = {
    "eq": 0x10,
    "gt": 0x20,
    "ge": 0x30,
    "set": 0x40,
    "ne": 0x50,
    "sgt": 0x60,
    "sge": 0x70,
    "lt": 0xA0,
    "le": 0xB0,
    "slt": 0xC0,
    "sle": 0xD0,
}
BPF_JA = 0x00
BPF_CALL = 0x80
BPF_EXIT = 0x90
#: ``src_reg`` of a 64-bit immediate load that names a map by file descriptor.
BPF_PSEUDO_MAP_FD = 1

INSN = struct.Struct("<BBhi")
INSN_LEN = INSN.size


@dataclass(frozen=True)
class Reg:
    """An eBPF register (``R0`` return value, ``R1``-``R5`` arguments, ``R6``-``R9``
    callee-saved, ``R10`` read-only frame pointer)."""

    n: int

    def __repr__(self) -> str:
        return f"R{self.n}"


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = (Reg(i) for i in range(11))
FP = R10

Operand = Reg | int


class AsmError(ValueError):
    """An instruction cannot be encoded (unknown label, offset out of range...)."""


class Asm:
    """Collects instructions; :meth:`assemble` returns the program bytes."""

    def __init__(self) -> None:
        # (code, dst, src, off, imm, label) - label set for jumps until resolved
        self._insns: list[tuple[int, int, int, int, int, str | None]] = []
        self._labels: dict[str, int] = {}
        self._fresh = itertools.count()

    def __len__(self) -> int:
        return len(self._insns)

    # -- plumbing ---------------------------------------------------------------------
    def raw(
        self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0, label: str = ""
    ) -> None:
        """Append one instruction as its fields (``label``: jump target to resolve)."""
        self._insns.append((code, dst, src, off, imm, label or None))

    def fresh(self, stem: str) -> str:
        """A label name not used before (for code emitted more than once)."""
        return f"{stem}.{next(self._fresh)}"

    def label(self, name: str) -> None:
        """Place ``name`` at the next instruction."""
        if name in self._labels:
            raise AsmError(f"label {name!r} placed twice")
        self._labels[name] = len(self._insns)

    # -- ALU ----------------------------------------------------------------------------
    def _alu(self, cls: int, op: str, dst: Reg, src: Operand) -> None:
        code = cls | ALU_OPS[op]
        if isinstance(src, Reg):
            self.raw(code | BPF_X, dst.n, src.n)
        else:
            self.raw(code | BPF_K, dst.n, 0, 0, _imm32(src))

    def alu(self, op: str, dst: Reg, src: Operand) -> None:
        """64-bit ``dst = dst OP src`` (``op`` one of :data:`ALU_OPS`)."""
        self._alu(BPF_ALU64, op, dst, src)

    def alu32(self, op: str, dst: Reg, src: Operand) -> None:
        """32-bit ``dst = (u32)(dst OP src)``, upper half zeroed."""
        self._alu(BPF_ALU, op, dst, src)

    def mov(self, dst: Reg, src: Operand) -> None:
        """``dst = src`` (64-bit; an immediate is sign-extended from 32 bits)."""
        self.alu("mov", dst, src)

    def add(self, dst: Reg, src: Operand) -> None:
        """``dst += src``."""
        self.alu("add", dst, src)

    def sub(self, dst: Reg, src: Operand) -> None:
        """``dst -= src``."""
        self.alu("sub", dst, src)

    def and_(self, dst: Reg, src: Operand) -> None:
        """``dst &= src``."""
        self.alu("and", dst, src)

    def or_(self, dst: Reg, src: Operand) -> None:
        """``dst |= src``."""
        self.alu("or", dst, src)

    def lsh(self, dst: Reg, src: Operand) -> None:
        """``dst <<= src``."""
        self.alu("lsh", dst, src)

    def rsh(self, dst: Reg, src: Operand) -> None:
        """``dst >>= src`` (logical)."""
        self.alu("rsh", dst, src)

    def xor(self, dst: Reg, src: Operand) -> None:
        """``dst ^= src``."""
        self.alu("xor", dst, src)

    def neg(self, dst: Reg) -> None:
        """``dst = -dst``."""
        self.raw(BPF_ALU64 | ALU_OPS["neg"], dst.n)

    def be16(self, dst: Reg) -> None:
        """Convert the low 16 bits between host (little-endian) and network order;
        the rest of ``dst`` is cleared."""
        self.raw(BPF_ALU | BPF_END | BPF_TO_BE, dst.n, 0, 0, 16)

    def be32(self, dst: Reg) -> None:
        """Convert the low 32 bits between host (little-endian) and network order;
        the rest of ``dst`` is cleared."""
        self.raw(BPF_ALU | BPF_END | BPF_TO_BE, dst.n, 0, 0, 32)

    # -- memory -------------------------------------------------------------------------
    def ldx(self, size: str, dst: Reg, src: Reg, off: int) -> None:
        """``dst = *(size *)(src + off)`` (``size``: b, h, w, dw)."""
        self.raw(BPF_LDX | BPF_MEM | SIZES[size], dst.n, src.n, _off16(off))

    def stx(self, size: str, dst: Reg, off: int, src: Reg) -> None:
        """``*(size *)(dst + off) = src``."""
        self.raw(BPF_STX | BPF_MEM | SIZES[size], dst.n, src.n, _off16(off))

    def st(self, size: str, dst: Reg, off: int, imm: int) -> None:
        """``*(size *)(dst + off) = imm``."""
        self.raw(BPF_ST | BPF_MEM | SIZES[size], dst.n, 0, _off16(off), _imm32(imm))

    def atomic_add(self, size: str, dst: Reg, off: int, src: Reg) -> None:
        """``lock *(size *)(dst + off) += src`` (``size``: w or dw)."""
        self.raw(BPF_STX | BPF_ATOMIC | SIZES[size], dst.n, src.n, _off16(off), 0)

    def ld_imm64(self, dst: Reg, imm: int, src: int = 0) -> None:
        """``dst = imm`` (64-bit immediate, two instruction slots)."""
        imm &= 0xFFFFFFFFFFFFFFFF
        lo, hi = imm & 0xFFFFFFFF, imm >> 32
        self.raw(BPF_LD | SIZES["dw"] | BPF_IMM, dst.n, src, 0, _imm32(lo, wrap=True))
        self.raw(0, 0, 0, 0, _imm32(hi, wrap=True))

    def ld_map_fd(self, dst: Reg, fd: int) -> None:
        """``dst`` = the map behind file descriptor ``fd`` (the kernel resolves it)."""
        self.ld_imm64(dst, fd, src=BPF_PSEUDO_MAP_FD)

    # -- control flow ---------------------------------------------------------------
    def jmp(self, op: str, dst: Reg, src: Operand, target: str) -> None:
        """``if dst OP src goto target`` (``op`` one of :data:`JMP_OPS`)."""
        code = BPF_JMP | JMP_OPS[op]
        if isinstance(src, Reg):
            self.raw(code | BPF_X, dst.n, src.n, label=target)
        else:
            self.raw(code | BPF_K, dst.n, 0, 0, _imm32(src), label=target)

    def jeq(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst == src goto target``."""
        self.jmp("eq", dst, src, target)

    def jne(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst != src goto target``."""
        self.jmp("ne", dst, src, target)

    def jgt(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst > src goto target`` (unsigned)."""
        self.jmp("gt", dst, src, target)

    def jge(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst >= src goto target`` (unsigned)."""
        self.jmp("ge", dst, src, target)

    def jlt(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst < src goto target`` (unsigned)."""
        self.jmp("lt", dst, src, target)

    def jle(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst <= src goto target`` (unsigned)."""
        self.jmp("le", dst, src, target)

    def jset(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst & src goto target``."""
        self.jmp("set", dst, src, target)

    def jslt(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst < src goto target`` (signed)."""
        self.jmp("slt", dst, src, target)

    def jsge(self, dst: Reg, src: Operand, target: str) -> None:
        """``if dst >= src goto target`` (signed)."""
        self.jmp("sge", dst, src, target)

    def ja(self, target: str) -> None:
        """``goto target``."""
        self.raw(BPF_JMP | BPF_JA, label=target)

    def call(self, helper: int) -> None:
        """Call kernel helper number ``helper`` (arguments R1-R5, result R0)."""
        self.raw(BPF_JMP | BPF_CALL, 0, 0, 0, helper)

    def exit(self) -> None:
        """Return R0."""
        self.raw(BPF_JMP | BPF_EXIT)

    # -- output -----------------------------------------------------------------------
    def assemble(self) -> bytes:
        """The program as bytes; raises :class:`AsmError` for unresolved labels."""
        out = bytearray()
        for pc, (code, dst, src, off, imm, label) in enumerate(self._insns):
            if label is not None:
                if label not in self._labels:
                    raise AsmError(f"jump to unknown label {label!r}")
                off = _off16(self._labels[label] - pc - 1)
            out += INSN.pack(code, (src << 4) | dst, off, imm)
        return bytes(out)


def _imm32(value: int, *, wrap: bool = False) -> int:
    """A signed 32-bit immediate; ``wrap`` accepts 0..2**32-1 as its bit pattern."""
    if wrap or 0x7FFFFFFF < value <= 0xFFFFFFFF:
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value & 0x80000000 else value
    if not -(1 << 31) <= value < (1 << 31):
        raise AsmError(f"immediate {value} does not fit 32 bits")
    return value


def _off16(value: int) -> int:
    if not -(1 << 15) <= value < (1 << 15):
        raise AsmError(f"offset {value} does not fit 16 bits")
    return value
