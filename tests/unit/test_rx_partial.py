"""A partial checksum inside a received STT frame is finished before decapsulation.

What a kernel-side sender (sttun's tc-egress transmit program) leaves for the
receiver over a veth: one whole STT frame in one segment, the vnet header saying
``NEEDS_CSUM`` with ``csum_start`` at the *inner* TCP/UDP header, the inner field
holding the pseudo-header seed, and the outer TCP checksum computed as if the inner
field were final.  :func:`finish_inner_checksum` (and the data path around it) must
give the inner frame with its final checksum, or a counted drop.
"""

from __future__ import annotations

import struct

import pytest
from tests.packets import inner_l4_frame
from tests.reference import naive_sum
from tests.unit.test_datapath import KEY, L2, A, B, Host

from sttun.core.drops import DropReason
from sttun.core.encap import Encapsulator
from sttun.core.outer import tcp_checksum_ok
from sttun.core.rx_partial import OUTER_L4_AT, finish_inner_checksum
from sttun.wire.ip import IPPROTO_TCP, IPPROTO_UDP, ip_bytes
from sttun.wire.stt import STT_HEADER_LEN, TCP_HEADER_LEN
from sttun.wire.vnet import VNET_HDR, VnetFlag

OUTER = {
    4: (ip_bytes(A), ip_bytes(B)),
    6: (ip_bytes("2001:db8:0:1::1"), ip_bytes("2001:db8:0:1::2")),
}
INNER = {
    4: (ip_bytes("192.0.2.1"), ip_bytes("192.0.2.2")),
    6: (ip_bytes("2001:db8:1::1"), ip_bytes("2001:db8:1::2")),
}
PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
L2_6 = L2[:12] + b"\x86\xdd"


class Crafted:
    """The transmit program's packet (Ethernet frame) and what it must become."""

    def __init__(self, outer: int, inner: int, l4: str, payload: bytes = b"x" * 101) -> None:
        src, dst = INNER[inner]
        proto = PROTOS[l4]
        self.complete = inner_l4_frame(src, dst, proto, payload, seeded=False)
        seeded = inner_l4_frame(src, dst, proto, payload, seeded=True)
        enc = Encapsulator(
            *OUTER[outer], KEY, l2=L2 if outer == 4 else L2_6, first_frame_id=1 << 30
        )
        (parts,) = enc.encap(self.complete, None, gso=False)
        #: the packet with every checksum final (the outer one covers it)
        self.final = b"".join(bytes(p) for p in parts)
        self.outer_l4 = 14 + (20 if outer == 4 else 40)
        assert tcp_checksum_ok(self.final[14:], 0, self.outer_l4 - 14, len(self.final) - 14)
        #: inner L4 header offset from the outer Ethernet header
        self.csum_start = self.outer_l4 + TCP_HEADER_LEN + STT_HEADER_LEN + 14
        self.csum_start += 20 if inner == 4 else 40
        self.csum_offset = 16 if l4 == "tcp" else 6
        #: as sent: the inner field still holds the seed
        self.wire = self.final[: -len(seeded)] + seeded
        assert self.wire != self.final

    def vnet(self, csum_start: int | None = None, csum_offset: int | None = None) -> bytes:
        start = self.csum_start if csum_start is None else csum_start
        off = self.csum_offset if csum_offset is None else csum_offset
        return VNET_HDR.pack(int(VnetFlag.NEEDS_CSUM), 0, 0, 0, start, off)


@pytest.mark.parametrize("l4", ["tcp", "udp"])
@pytest.mark.parametrize("inner", [4, 6], ids=["inner4", "inner6"])
@pytest.mark.parametrize("outer", [4, 6], ids=["outer4", "outer6"])
def test_a_seeded_inner_checksum_is_finished_in_place(outer: int, inner: int, l4: str) -> None:
    c = Crafted(outer, inner, l4)
    buf = bytearray(c.wire)
    assert OUTER_L4_AT[buf[14]] == c.outer_l4 != c.csum_start
    assert finish_inner_checksum(memoryview(buf), c.csum_start, c.csum_offset) is None
    assert bytes(buf) == c.final
    # and the inner L4 checksum verifies on its own (independent sum)
    src, dst = INNER[inner]
    seg = bytes(buf[c.csum_start :])
    assert naive_sum(src + dst + struct.pack("!HH", PROTOS[l4], len(seg)) + seg) == 0xFFFF


def test_ethernet_padding_is_not_summed() -> None:
    c = Crafted(4, 4, "udp", b"p")
    buf = bytearray(c.wire + bytes(6))  # padded by a sender to a minimum size
    assert finish_inner_checksum(memoryview(buf), c.csum_start, c.csum_offset) is None
    assert bytes(buf) == c.final + bytes(6)


def test_the_outer_checksum_is_left_alone() -> None:
    c = Crafted(4, 4, "tcp")
    buf = bytearray(c.wire)
    assert finish_inner_checksum(memoryview(buf), c.outer_l4, 16) is None
    assert bytes(buf) == c.wire


def bad_cases() -> list[tuple[str, int, int]]:
    c = Crafted(4, 4, "tcp")
    payload = c.outer_l4 + TCP_HEADER_LEN
    return [
        ("in the outer IP header", 14, 10),
        ("in the TCP-like header", c.outer_l4 + 4, 0),
        ("in the STT header", payload + 4, 2),
        ("offset past the end", c.csum_start, len(c.wire)),
        ("start at the last byte", len(c.wire) - 1, 0),
        ("negative offset", c.csum_start, -2),
    ]


@pytest.mark.parametrize(("what", "start", "offset"), bad_cases(), ids=lambda v: str(v))
def test_a_checksum_that_cannot_be_finished_is_a_drop_reason(
    what: str, start: int, offset: int
) -> None:
    c = Crafted(4, 4, "tcp")
    buf = bytearray(c.wire)
    got = finish_inner_checksum(memoryview(buf), start, offset)
    assert got is DropReason.BAD_PARTIAL_CHECKSUM, what
    assert bytes(buf) == c.wire  # nothing written


@pytest.mark.parametrize("seq_change", ["offset", "length"])
def test_a_piece_of_a_frame_is_not_summed(seq_change: str) -> None:
    """A sum to the end of one piece would not cover the inner packet."""
    c = Crafted(4, 4, "udp")
    buf = bytearray(c.wire)
    seq_at = c.outer_l4 + 4
    (seq,) = struct.unpack_from("!I", buf, seq_at)
    struct.pack_into("!I", buf, seq_at, seq + (1 if seq_change == "offset" else 1 << 16))
    before = bytes(buf)
    got = finish_inner_checksum(memoryview(buf), c.csum_start, c.csum_offset)
    assert got is DropReason.BAD_PARTIAL_CHECKSUM
    assert bytes(buf) == before


def test_an_unusable_outer_packet_is_left_to_the_endpoint() -> None:
    c = Crafted(4, 4, "tcp")
    buf = bytearray(c.wire[:30])  # truncated inside the outer IP header
    assert finish_inner_checksum(memoryview(buf), c.csum_start, c.csum_offset) is None
    assert bytes(buf) == c.wire[:30]


def test_outer_l4_table() -> None:
    assert OUTER_L4_AT[0x45] == 34 and OUTER_L4_AT[0x4F] == 74
    assert OUTER_L4_AT[0x60] == OUTER_L4_AT[0x6F] == 54
    assert OUTER_L4_AT[0x44] == OUTER_L4_AT[0x00] == OUTER_L4_AT[0x55] == -1


# ------------------------------------------------------------------ through the data path


@pytest.mark.parametrize("l4", ["tcp", "udp"])
@pytest.mark.parametrize("inner", [4, 6], ids=["inner4", "inner6"])
def test_the_data_path_delivers_the_finished_inner_frame(inner: int, l4: str) -> None:
    b = Host(B, A)
    c = Crafted(4, inner, l4)
    b.sock.incoming.append(c.vnet() + c.wire)
    b.datapath.on_underlay(b.underlay)
    ((vnet, frame),) = b.tap.written
    assert frame == c.complete
    assert VNET_HDR.unpack(vnet)[0] == 0  # STT flags 0: nothing left to the overlay stack
    assert b.tunnel.rx.frames == 1 and b.core.drops.total() == 0


def test_the_data_path_leaves_a_partial_outer_checksum_alone() -> None:
    """csum_start at the outer TCP header: the common case, the frame as it came
    (here with a seeded inner field the data path must not touch)."""
    b = Host(B, A)
    c = Crafted(4, 4, "tcp")
    b.sock.incoming.append(c.vnet(c.outer_l4, 16) + c.wire)
    b.datapath.on_underlay(b.underlay)
    ((_vnet, frame),) = b.tap.written
    assert frame == c.wire[c.outer_l4 + TCP_HEADER_LEN + STT_HEADER_LEN :] != c.complete


def test_the_data_path_counts_a_checksum_it_cannot_finish_and_goes_on() -> None:
    b = Host(B, A)
    bad = Crafted(4, 4, "tcp")
    good = Crafted(4, 6, "udp")
    b.sock.incoming.extend(
        [
            bad.vnet(bad.outer_l4 + TCP_HEADER_LEN + 2) + bad.wire,  # in the STT header
            bad.vnet(csum_offset=4000) + bad.wire,  # past the end
            good.vnet() + good.wire,
        ]
    )
    b.datapath.on_underlay(b.underlay)
    assert b.core.drops[DropReason.BAD_PARTIAL_CHECKSUM] == 2
    assert b.core.drops.bytes[DropReason.BAD_PARTIAL_CHECKSUM] == 2 * (len(bad.wire) - 14)
    assert [f for _v, f in b.tap.written] == [good.complete]
    assert b.core.stats()["drops"] == {"bad_partial_checksum": 2}
