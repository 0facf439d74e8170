"""sttun.io.bpf: the STT-port filter program, checked with a reference interpreter
(no privileges needed) and once on a real socket."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sttun.errors import SetupError
from sttun.io.bpf import attach_filter, pack_program, reject_all, run_program, stt_filter
from tests.netns import ipv4_header, ipv6_header, tcp_frame

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"
PROG = stt_filter([7471])


def v4(dport: int = 7471, proto: int = 6, frag: int = 0x4000, ihl: int = 5) -> bytes:
    ip = bytearray(ipv4_header("198.18.0.1", "198.18.0.2", 28, proto=proto))
    struct.pack_into("!H", ip, 6, frag)
    opts = b"\x01" * (4 * (ihl - 5))
    ip[0] = 0x40 | ihl
    l4 = struct.pack("!HHIIBBHHH", 1234, dport, 0, 0, 0x50, 0x18, 0, 0, 0) + b"x" * 8
    return b"\2" * 12 + b"\x08\x00" + bytes(ip) + opts + l4


def v6(dport: int = 7471, nxt: int = 6) -> bytes:
    ip = ipv6_header("2001:db8:0:1::1", "2001:db8:0:1::2", 28, nxt=nxt)
    l4 = struct.pack("!HHIIBBHHH", 1234, dport, 0, 0, 0x50, 0x18, 0, 0, 0) + b"x" * 8
    return b"\2" * 12 + b"\x86\xdd" + ip + l4


CASES = [
    ("ipv4 tcp 7471", v4(), True),
    ("ipv4 tcp other port", v4(7472), False),
    ("ipv4 udp 7471", v4(proto=17), False),
    ("ipv4 first fragment (MF set)", v4(frag=0x2000), True),
    ("ipv4 later fragment", v4(frag=0x2000 | 100), False),
    ("ipv4 last fragment", v4(frag=3), False),
    ("ipv4 with options", v4(ihl=7), True),
    ("ipv4 options, other port", v4(7000, ihl=7), False),
    ("ipv6 tcp 7471", v6(), True),
    ("ipv6 tcp other port", v6(80), False),
    ("ipv6 hop-by-hop first", v6(nxt=0), False),
    ("arp", b"\xff" * 12 + b"\x08\x06" + b"\0" * 28, False),
    ("truncated ipv4", v4()[:30], False),
    ("truncated ipv6", v6()[:55], False),
    ("empty", b"", False),
    ("real tcp_frame", tcp_frame(MAC_A, MAC_B, "198.18.0.1", "198.18.0.2", b"p" * 100)[1], True),
]


@pytest.mark.parametrize(("name", "frame", "accept"), CASES, ids=[c[0] for c in CASES])
def test_filter_cases(name: str, frame: bytes, accept: bool) -> None:
    got = run_program(PROG, frame)
    assert (got > 0) is accept
    assert got in (0, len(frame))  # whole frame or nothing


def test_several_ports() -> None:
    prog = stt_filter([7471, 4000, 9999])
    for p, ok in [(7471, True), (4000, True), (9999, True), (4001, False)]:
        assert bool(run_program(prog, v4(p))) is ok
        assert bool(run_program(prog, v6(p))) is ok


def test_bad_ports() -> None:
    for bad in ([], [0], [65536], list(range(1, 200))):
        with pytest.raises(SetupError):
            stt_filter(bad)


def _reference(frame: bytes, ports: set[int]) -> bool:
    if len(frame) < 14:
        return False
    et = int.from_bytes(frame[12:14], "big")
    if et == 0x0800:
        if len(frame) < 34 or frame[23] != 6:
            return False
        if int.from_bytes(frame[20:22], "big") & 0x1FFF:
            return False
        off = 14 + (frame[14] & 0xF) * 4 + 2
        return len(frame) >= off + 2 and int.from_bytes(frame[off : off + 2], "big") in ports
    if et == 0x86DD:
        return len(frame) >= 58 and frame[20] == 6 and int.from_bytes(frame[56:58], "big") in ports
    return False


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([v4(), v6(), v4(ihl=6), v4(frag=0x2000)]),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4),
    st.integers(20, 90),
)
def test_matches_reference(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    """Mutated frames: the program agrees with a plain-Python statement of the rule."""
    b = bytearray(base)
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    frame = bytes(b[:cut])
    assert bool(run_program(PROG, frame)) is _reference(frame, {7471})


def test_packing() -> None:
    code = pack_program(PROG)
    assert len(code) == 8 * len(PROG)
    assert struct.unpack_from("HBBI", code, 0) == PROG[0]


@pytest.mark.netns
def test_attach_to_real_socket() -> None:
    """The kernel accepts the program (it validates jumps and opcodes)."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError:
        pytest.skip("needs CAP_NET_RAW")
    with s:
        attach_filter(s, stt_filter(range(1, 101)))
        attach_filter(s, reject_all())
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
        pytest.raises(SetupError, match="SO_ATTACH_FILTER"),
    ):
        attach_filter(u, [(0x15, 5, 5, 0)])  # jump past the end: rejected
