"""Captured kernel-encapsulated frames whose inner checksum is still partial.

sttun's kernel transmit program (tc egress on the tunnel TAP) sends one whole STT
frame per segment (SEQ offset 0, flags 0 or C), with the outer TCP checksum
computed as if the inner TCP/UDP checksum field already held its final value.  If
the inner packet's checksum was partial, that field still holds the pseudo-header
seed until the NIC (or ``skb_checksum_help``) finishes it: a capture on a veth, or
on the sending host, shows the seed and an outer checksum that does not verify.

``sttun decap`` and ``sttun inspect`` must accept such a segment (counted as
``inner_partial`` under ``checksums``) when finishing the inner checksum makes the
outer one verify, write the inner frame with the finished checksum (as carried
with ``--keep-partial``), and still count everything else that fails as
``bad_tcp_checksum``.  Outer packets are built with the independent helpers of
``tests/netns.py`` (through ``tests/unit/test_tools_decap.py``), inner frames with
:func:`tests.packets.inner_l4_frame`.
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from tests.packets import inner_l4_frame
from tests.reference import naive_sum
from tests.unit.test_tools_decap import (
    DST,
    DST6,
    SRC,
    SRC6,
    decap_json,
    frames_of,
    inner_udp,
    run,
    segment,
    segments_of,
    stt_header,
    write_pcap,
)

from sttun.core.outer import tcp_checksum_ok
from sttun.core.rx_partial import finish_captured_seed, inner_seed_field
from sttun.wire.ip import IPPROTO_TCP, IPPROTO_UDP, ip_bytes
from sttun.wire.stt import STT_HEADER_LEN, TCP_HEADER_LEN

OUTERS = {4: (SRC, DST), 6: (SRC6, DST6)}
INNERS = {
    4: (ip_bytes("192.0.2.1"), ip_bytes("192.0.2.2")),
    6: (ip_bytes("2001:db8:1::1"), ip_bytes("2001:db8:1::2")),
}
PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
#: Every kind: inner TCP/UDP, inner IPv4/IPv6, outer IPv4/IPv6, STT flags 0 and C.
KINDS = list(itertools.product(PROTOS, (4, 6), (4, 6), (0, 0x01)))


def inner_pair(proto: str, inner_v: int, payload: bytes) -> tuple[bytes, bytes]:
    """(final, seeded): the same inner frame with its L4 checksum final / the seed."""
    isrc, idst = INNERS[inner_v]
    return (
        inner_l4_frame(isrc, idst, PROTOS[proto], payload, seeded=False),
        inner_l4_frame(isrc, idst, PROTOS[proto], payload, seeded=True),
    )


def kernel_segment(
    final: bytes, carried: bytes, *, outer_v: int = 4, flags: int = 0, ack: int = 1, ctx: int = 7
) -> bytes:
    """One whole-frame segment whose outer checksum covers ``final`` but which
    carries ``carried`` (same length) as its inner frame: a transmit program's
    segment, captured before the inner checksum was finished."""
    assert len(final) == len(carried)
    src, dst = OUTERS[outer_v]
    frame = stt_header(ctx, flags=flags) + final
    good = segment(frame, length=len(frame), ack=ack, src=src, dst=dst)
    return good[: len(good) - len(final)] + carried


def kind_segments() -> tuple[list[bytes], list[bytes], list[bytes]]:
    """A segment of every kind (and one longer than a 1500-byte MTU); their inner
    frames final and seeded, in the same order."""
    packets, finals, seeds = [], [], []
    for ack, (proto, inner_v, outer_v, flags) in enumerate(KINDS, start=1):
        final, seeded = inner_pair(proto, inner_v, bytes(range(ack, ack + 100)))
        packets.append(kernel_segment(final, seeded, outer_v=outer_v, flags=flags, ack=ack))
        finals.append(final)
        seeds.append(seeded)
    final, seeded = inner_pair("tcp", 4, bytes(3000))  # a 9000-byte-MTU underlay's segment
    packets.append(kernel_segment(final, seeded, ack=100))
    finals.append(final)
    seeds.append(seeded)
    return packets, finals, seeds


def test_seeded_frames_are_written_with_the_inner_checksum_finished(tmp_path: Path) -> None:
    packets, finals, seeds = kind_segments()
    assert all(f != s for f, s in zip(finals, seeds, strict=True))
    plain = segments_of(stt_header(9) + inner_udp(200), ack=500)  # verifies as captured
    cap = write_pcap(tmp_path / "in.pcap", [*packets, *plain])
    s = decap_json(cap, tmp_path)
    assert s["drops"] == {}
    assert s["checksums"] == {
        "verified": 1,
        "offloaded": 0,
        "inner_partial": len(packets),
        "unchecked": 0,
    }
    assert s["partial_checksums_completed"] == 0  # that is the P flag's count
    assert [f[1] for f in frames_of(tmp_path / "out.pcap")] == [*finals, inner_udp(200)]


def test_keep_partial_writes_the_seed_as_carried(tmp_path: Path) -> None:
    packets, _finals, seeds = kind_segments()
    cap = write_pcap(tmp_path / "in.pcap", packets)
    s = decap_json(cap, tmp_path, "--keep-partial")
    assert s["drops"] == {} and s["checksums"]["inner_partial"] == len(packets)
    assert [f[1] for f in frames_of(tmp_path / "out.pcap")] == seeds


def test_without_verification_frames_go_on_as_carried(tmp_path: Path) -> None:
    packets, _finals, seeds = kind_segments()
    cap = write_pcap(tmp_path / "in.pcap", packets)
    s = decap_json(cap, tmp_path, "--no-verify-checksum")
    assert s["checksums"]["unchecked"] == len(packets)
    assert s["checksums"]["inner_partial"] == 0
    assert [f[1] for f in frames_of(tmp_path / "out.pcap")] == seeds


def _with_field(frame: bytes, value: int) -> bytes:
    """An inner IPv4/TCP frame (no options) with its TCP checksum field set to ``value``."""
    b = bytearray(frame)
    struct.pack_into("!H", b, 14 + 20 + 16, value)
    return bytes(b)


def broken_segments() -> list[bytes]:
    """Segments like a transmit program's that must still be bad checksums (context
    id 0xbad, or one bit off that)."""
    final, seeded = inner_pair("tcp", 4, bytes(range(100)))
    seed = struct.unpack_from("!H", seeded, 14 + 20 + 16)[0]
    out = []
    # the outer checksum fails even once the inner one is finished
    pkt = bytearray(kernel_segment(final, seeded, ack=1, ctx=0xBAD))
    pkt[14 + 20 + 16] ^= 0x10
    out.append(bytes(pkt))
    # a corrupted STT header or inner Ethernet header: finishing does not help
    pkt = bytearray(kernel_segment(final, seeded, ack=2, ctx=0xBAD))
    pkt[14 + 20 + TCP_HEADER_LEN + 9] ^= 0x01  # context id
    out.append(bytes(pkt))
    pkt = bytearray(kernel_segment(final, seeded, ack=3, ctx=0xBAD))
    pkt[14 + 20 + TCP_HEADER_LEN + STT_HEADER_LEN + 1] ^= 0x01  # inner destination MAC
    out.append(bytes(pkt))
    # the inner field is not the Linux seed: one off either way, or the sum without
    # the L4 length (the Windows convention: not what a Linux kernel leaves)
    no_length = naive_sum(INNERS[4][0] + INNERS[4][1] + struct.pack("!HH", IPPROTO_TCP, 0))
    for ack, value in ((4, seed + 1), (5, seed - 1), (6, no_length)):
        carried = _with_field(seeded, value & 0xFFFF)
        out.append(kernel_segment(final, carried, ack=ack, ctx=0xBAD))
    # an inner IPv4 fragment (MF set) whose field holds the seed
    frag_final, frag_seeded = (bytearray(f) for f in (final, seeded))
    for f in (frag_final, frag_seeded):
        f[14 + 6] |= 0x20
    out.append(kernel_segment(bytes(frag_final), bytes(frag_seeded), ack=7, ctx=0xBAD))
    return out


def test_broken_frames_still_count_as_bad_checksums(tmp_path: Path) -> None:
    broken = broken_segments()
    cap = write_pcap(tmp_path / "in.pcap", broken)
    s = decap_json(cap, tmp_path)
    assert s["drops"] == {"bad_tcp_checksum": len(broken)}
    assert s["checksums"]["inner_partial"] == 0 and s["written"] == 0


def test_a_seeded_frame_in_two_segments_is_not_finished(tmp_path: Path) -> None:
    final, seeded = inner_pair("udp", 6, bytes(range(200)))
    frame = stt_header(3, flags=0x01) + final
    good = segments_of(frame, size=120)  # the inner UDP header is in the first
    n = len(good[0]) - 120
    first = good[0][:n] + (stt_header(3, flags=0x01) + seeded)[:120]
    cap = write_pcap(tmp_path / "in.pcap", [first, good[1]])
    s = decap_json(cap, tmp_path)
    assert s["drops"]["bad_tcp_checksum"] == 1
    assert s["checksums"] == {"verified": 1, "offloaded": 0, "inner_partial": 0, "unchecked": 0}


def test_inspect_counts_them_and_shows_no_errors(tmp_path: Path) -> None:
    packets, _finals, _seeds = kind_segments()
    broken = broken_segments()
    cap = write_pcap(tmp_path / "in.pcap", [*packets, *broken])
    p = run("inspect", cap, "--json")
    assert p.returncode == 0, p.stderr
    rep: dict[str, Any] = json.loads(p.stdout)
    assert rep["checksums"]["inner_partial"] == len(packets)
    assert rep["drops"] == {"bad_tcp_checksum": len(broken)}
    good_rows = [r for r in rep["rows"] if r["hex"] == "0x7"]
    assert sum(r["frames"] for r in good_rows) == len(packets)
    assert all(r["errors"] == 0 for r in good_rows)
    assert {f for r in good_rows for f in r["flags"]} == {"C", "-"}
    text = run("inspect", cap)
    assert f"{len(packets)} verified with the inner checksum finished" in text.stdout


@pytest.mark.parametrize(("proto", "inner_v", "outer_v", "flags"), KINDS)
def test_finish_captured_seed(proto: str, inner_v: int, outer_v: int, flags: int) -> None:
    final, seeded = inner_pair(proto, inner_v, b"payload" * 9)
    pkt = kernel_segment(final, seeded, outer_v=outer_v, flags=flags)
    l3 = 14
    l4 = l3 + (20 if outer_v == 4 else 40)
    assert not tcp_checksum_ok(pkt, l3, l4, len(pkt))
    fixed = finish_captured_seed(memoryview(pkt), l3, l4, len(pkt))
    assert fixed is not None and tcp_checksum_ok(fixed, l3, l4, len(pkt))
    assert bytes(fixed) == pkt[: len(pkt) - len(final)] + final
    # Ethernet padding after the outer IP packet is neither summed nor copied
    padded = pkt + bytes(20)
    assert finish_captured_seed(padded, l3, l4, len(pkt)) == fixed
    # the complete frame, or a frame whose outer checksum is right, is left alone
    whole = kernel_segment(final, final, outer_v=outer_v, flags=flags)
    assert finish_captured_seed(whole, l3, l4, len(whole)) is None


def test_udp_final_zero_is_written_as_all_ones() -> None:
    # payload chosen so that the UDP checksum comes out as 0 (sent as 0xFFFF)
    isrc, idst = INNERS[4]
    base = inner_l4_frame(isrc, idst, IPPROTO_UDP, bytes(40), seeded=True)
    pseudo = isrc + idst + struct.pack("!HH", IPPROTO_UDP, 48)
    udp = bytearray(base[34:])
    struct.pack_into("!H", udp, 6, 0)
    fill = 0xFFFF - naive_sum(pseudo + udp)  # makes the ones' sum 0xFFFF
    payload = bytes(38) + struct.pack("!H", fill)
    final, seeded = inner_pair("udp", 4, payload)
    assert struct.unpack_from("!H", final, 40)[0] == 0xFFFF
    pkt = kernel_segment(final, seeded)
    fixed = finish_captured_seed(pkt, 14, 34, len(pkt))
    assert fixed is not None and bytes(fixed[-len(final) :]) == final


def test_inner_seed_field_wants_the_linux_seed() -> None:
    final, seeded = inner_pair("tcp", 6, bytes(10))
    assert inner_seed_field(seeded, 0, len(seeded)) == (54, 16, len(seeded))
    assert inner_seed_field(final, 0, len(final)) is None
    assert inner_seed_field(seeded, 0, len(seeded) - 1) is None  # IP packet cut
    assert inner_seed_field(seeded[:30], 0, 30) is None
    # an IPv6 extension header before TCP is not followed
    other = bytearray(seeded)
    other[14 + 6] = 0
    assert inner_seed_field(other, 0, len(other)) is None
