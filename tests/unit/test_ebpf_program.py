"""The eBPF assembler's encoding, the generated program's shape, the map layouts."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from sttun.io.ebpf import program
from sttun.io.ebpf.asm import FP, R0, R1, R2, R6, Asm, AsmError
from sttun.io.rx_fastpath import FastPathTunnel

MAPS = program.MapFds(tunnels=3, ports=4, reasons=5, tunnel_stats=6, scratch=7, order=8)


def insns(code: bytes) -> list[tuple[int, int, int, int]]:
    return list(struct.iter_unpack("<BBhi", code))


def test_encodings_match_the_instruction_set() -> None:
    a = Asm()
    a.mov(R0, 0)  # b7: ALU64 | MOV | K
    a.mov(R6, R1)  # bf: ALU64 | MOV | X, dst 6 src 1
    a.ldx("w", R2, R1, 76)  # 61: LDX | MEM | W
    a.stx("dw", FP, -8, R1)  # 7b: STX | MEM | DW
    a.st("h", FP, -16, 0x1234)  # 6a: ST | MEM | H
    a.be16(R2)  # dc: ALU | END | TO_BE, imm 16
    a.call(23)  # 85
    a.exit()  # 95
    assert insns(a.assemble()) == [
        (0xB7, 0x00, 0, 0),
        (0xBF, 0x16, 0, 0),
        (0x61, 0x12, 76, 0),
        (0x7B, 0x1A, -8, 0),
        (0x6A, 0x0A, -16, 0x1234),
        (0xDC, 0x02, 0, 16),
        (0x85, 0x00, 0, 23),
        (0x95, 0x00, 0, 0),
    ]


def test_map_fd_load_is_a_two_slot_pseudo_instruction() -> None:
    a = Asm()
    a.ld_map_fd(R1, 9)
    assert insns(a.assemble()) == [(0x18, 0x11, 0, 9), (0, 0, 0, 0)]


def test_jumps_resolve_forward_and_backward() -> None:
    a = Asm()
    a.label("top")
    a.jeq(R1, 5, "out")  # 15: JMP | JEQ | K
    a.jgt(R1, R2, "top")  # 2d: JMP | JGT | X
    a.ja("out")
    a.label("out")
    a.exit()
    got = insns(a.assemble())
    assert got[0] == (0x15, 0x01, 2, 5)
    assert got[1] == (0x2D, 0x21, -2, 0)
    assert got[2] == (0x05, 0x00, 0, 0)


def test_bad_labels_and_immediates_are_errors() -> None:
    a = Asm()
    a.ja("nowhere")
    with pytest.raises(AsmError, match="nowhere"):
        a.assemble()
    a.label("x")
    with pytest.raises(AsmError, match="twice"):
        a.label("x")
    with pytest.raises(AsmError, match="32 bits"):
        a.mov(R0, 1 << 33)


def test_program_is_deterministic_and_ends_in_exits() -> None:
    code = program.build(MAPS, max_linear_len=1514)
    assert code == program.build(MAPS, max_linear_len=1514)
    assert len(code) % 8 == 0
    n = len(code) // 8
    assert 300 < n < 4096  # well inside the verifier's limits
    ops = [op for op, *_ in insns(code)]
    assert ops.count(0x95) >= 3  # redirect, pass, error
    # every map the program uses is referenced by its fd
    fds = {imm for op, regs, _off, imm in insns(code) if op == 0x18 and regs >> 4 == 1}
    assert fds == {3, 4, 5, 6, 7}
    # ordered (the daemon's): the order map too, and an atomic add on passing
    ordered = program.build(MAPS, max_linear_len=1514, ordered=True)
    fds = {imm for op, regs, _off, imm in insns(ordered) if op == 0x18 and regs >> 4 == 1}
    assert fds == {3, 4, 5, 6, 7, 8}
    assert any(op == 0xDB for op, *_ in insns(ordered))  # BPF_STX | BPF_ATOMIC | DW


def test_invalid_program_is_one_exit() -> None:
    assert insns(program.build(MAPS, max_linear_len=1514, invalid=True)) == [(0x95, 0, 0, 0)]


def test_pass_reasons_are_stable() -> None:
    # counter indexes are part of the map layout: append, never renumber
    assert [r.name for r in program.PassReason] == [
        "NOT_STT", "PIECE", "UNKNOWN_TUNNEL", "HEADER", "VLAN", "MARKING",
        "CHECKSUM", "OFFLOAD", "ERROR", "QUEUED",
    ]  # fmt: skip


def test_tunnel_key_layout() -> None:
    t = FastPathTunnel("t", "198.18.0.2", "198.18.0.1", 0x0102030405060708, 7)
    key = t.key()
    assert len(key) == program.TUNNEL_KEY_SIZE
    assert key[0:4] == ipaddress.ip_address("198.18.0.1").packed  # remote = outer source
    assert key[4:16] == bytes(12)
    assert key[16:20] == ipaddress.ip_address("198.18.0.2").packed
    assert key[32:40] == bytes.fromhex("0102030405060708")  # as on the wire
    assert key[40:42] == (7471).to_bytes(2, "big")
    assert key[42] == 4
    t6 = FastPathTunnel("t6", "2001:db8:0:1::2", "2001:db8:0:1::1", 1, 7, dst_port=9000)
    k6 = t6.key()
    assert k6[0:16] == ipaddress.ip_address("2001:db8:0:1::1").packed
    assert k6[40:42] == (9000).to_bytes(2, "big") and k6[42] == 6


def test_tunnel_key_rejects_mixed_families() -> None:
    with pytest.raises(ValueError, match="different families"):
        FastPathTunnel("t", "198.18.0.2", "2001:db8:0:1::1", 1, 7).key()
