"""``sttun.core.outer``: the one classifier of received outer packets, the one TCP check.

Packets are built here byte by byte with the independent helpers of
``tests/netns.py`` (``struct`` and a word-by-word ones'-complement sum), never with
sttun's codecs.  :func:`parse_segment` is checked for every outcome (IPv4 with and
without options, IPv6, each drop reason, fragments, truncation, Ethernet padding,
offsets), and :func:`tcp_checksum_ok` against a plain word-by-word sum for every
length class it treats differently, from both offsets its callers use (``l3 = 0``,
the endpoint; ``l3 = 14`` and more, the capture tools).
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.netns import ipv4_header, ipv6_header, ones_sum, pseudo_sum

from sttun.core.drops import DropReason
from sttun.core.outer import parse_outer, parse_segment, tcp_checksum_ok

SRC, DST = "198.18.0.1", "198.18.0.2"
SRC6, DST6 = "2001:db8:0:1::1", "2001:db8:0:1::2"


def tcp_segment(payload: bytes, *, src: str = SRC, dst: str = DST, sport: int = 40000,
                dport: int = 7471, seq: int = (300 << 16), ack: int = 9, doff: int = 5,
                corrupt: bool = False) -> bytes:  # fmt: skip
    """A TCP-like header (and options if ``doff > 5``) + payload, checksum filled in."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, 0x18,
                                0xFFFF, 0, 0))  # fmt: skip
    tcp += b"\x01" * (4 * (doff - 5))
    c = ~ones_sum(bytes(tcp) + payload, pseudo_sum(src, dst, len(tcp) + len(payload))) & 0xFFFF
    struct.pack_into("!H", tcp, 16, c ^ (0x0101 if corrupt else 0))
    return bytes(tcp) + payload


def ipv4_with_options(src: str, dst: str, payload_len: int, options: bytes) -> bytes:
    """An IPv4 header with ``options`` (a multiple of 4 bytes), header checksum set."""
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + payload_len, 1,
                                0x4000, 64, 6, 0, ipaddress.IPv4Address(src).packed,
                                ipaddress.IPv4Address(dst).packed) + options)  # fmt: skip
    struct.pack_into("!H", hdr, 10, ~ones_sum(bytes(hdr)) & 0xFFFF)
    return bytes(hdr)


def v4(payload: bytes = b"abc", **kw: object) -> bytes:
    seg = tcp_segment(payload, **kw)  # type: ignore[arg-type]
    return ipv4_header(SRC, DST, len(seg)) + seg


def v6(payload: bytes = b"abc", **kw: object) -> bytes:
    seg = tcp_segment(payload, src=SRC6, dst=DST6, **kw)  # type: ignore[arg-type]
    return ipv6_header(SRC6, DST6, len(seg)) + seg


def reference_ok(pkt: bytes, l3: int, l4: int, end: int) -> bool:
    """The TCP checksum checked word by word (pseudo-header from the IP header)."""
    if pkt[l3] >> 4 == 4:
        src, dst = pkt[l3 + 12 : l3 + 16], pkt[l3 + 16 : l3 + 20]
    else:
        src, dst = pkt[l3 + 8 : l3 + 24], pkt[l3 + 24 : l3 + 40]
    s = str(ipaddress.ip_address(src))
    d = str(ipaddress.ip_address(dst))
    return ones_sum(pkt[l4:end], pseudo_sum(s, d, end - l4)) == 0xFFFF


# ------------------------------------------------------------------ parse_segment
def test_ipv4_fields() -> None:
    pkt = bytearray(v4(b"x" * 10, sport=1234, seq=0x01000020, ack=0xDEADBEEF))
    pkt[1] = 0xB9  # TOS: DSCP 46, ECN CE
    assert parse_segment(pkt) == (
        bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2)), 0xB9, 1234, 7471, 0x01000020,
        0xDEADBEEF, 0x50, 20, 50,
    )  # fmt: skip


def test_ipv4_at_an_offset_with_padding_after_it() -> None:
    pkt = b"\xee" * 18 + v4(b"") + b"\0" * 6  # a VLAN-tagged frame's offset, padding
    seg = parse_segment(pkt, 18)
    assert not isinstance(seg, DropReason)
    assert seg[8:] == (38, 58)


def test_ipv4_options_take_the_general_path() -> None:
    body = tcp_segment(b"hello")
    pkt = ipv4_with_options(SRC, DST, len(body), b"\x94\x04\x00\x00") + body  # router alert
    seg = parse_segment(pkt)
    assert not isinstance(seg, DropReason)
    assert seg[:2] == (bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2)))
    assert (seg[4], seg[7], seg[8], seg[9]) == (7471, 0x50, 24, len(pkt))
    assert tcp_checksum_ok(pkt, 0, 24, len(pkt))


def test_ipv6_fields() -> None:
    pkt = bytearray(v6(b"y" * 7, ack=77))
    pkt[0:2] = bytes((0x6B, 0x90))  # traffic class 0xB9
    seg = parse_segment(pkt)
    assert not isinstance(seg, DropReason)
    assert seg[0] == ipaddress.IPv6Address(SRC6).packed
    assert seg[1] == ipaddress.IPv6Address(DST6).packed
    assert (seg[2], seg[6], seg[8], seg[9]) == (0xB9, 77, 40, len(pkt))


def test_fast_and_general_paths_agree() -> None:
    """IPv4 without options is decoded in one struct call; parse_outer agrees."""
    rnd = random.Random(5)
    for _ in range(200):
        pkt = b"\0" * 14 + v4(rnd.randbytes(rnd.randrange(0, 100)), sport=rnd.randrange(65536),
                               seq=rnd.getrandbits(32), ack=rnd.getrandbits(32),
                               doff=rnd.choice((5, 5, 6)))  # fmt: skip
        seg = parse_segment(pkt, 14)
        outer = parse_outer(pkt, 14)
        assert not isinstance(seg, DropReason) and not isinstance(outer, DropReason)
        assert (seg[0], seg[1], seg[2], seg[8], seg[9]) == outer
        assert seg[3:8] == struct.unpack_from("!HHIIB", pkt, outer[3])


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", DropReason.OUTER_TRUNCATED),
        (v4()[:19], DropReason.OUTER_TRUNCATED),  # less than an IPv4 header
        (v4()[:-1], DropReason.OUTER_TRUNCATED),  # total length past the end
        (ipv4_header(SRC, DST, 10) + b"\0" * 10, DropReason.OUTER_TRUNCATED),  # no TCP header
        (v6()[:39], DropReason.OUTER_TRUNCATED),  # less than an IPv6 header
        (v6()[:-1], DropReason.OUTER_TRUNCATED),  # payload length past the end
        (ipv6_header(SRC6, DST6, 8) + b"\0" * 8, DropReason.OUTER_TRUNCATED),
        (b"\x55" + v4()[1:], DropReason.OUTER_BAD_IP),  # version 5
        (b"\x00" * 40, DropReason.OUTER_BAD_IP),  # version 0
        (b"\x44" + v4()[1:], DropReason.OUTER_BAD_IP),  # IHL 4 words
        (v4()[:2] + b"\x00\x10" + v4()[4:], DropReason.OUTER_BAD_IP),  # total < header
        (ipv4_header(SRC, DST, 28, proto=17) + b"\0" * 28, DropReason.OUTER_NOT_TCP),
        (ipv6_header(SRC6, DST6, 28, nxt=17) + b"\0" * 28, DropReason.OUTER_NOT_TCP),
        (ipv6_header(SRC6, DST6, 28, nxt=0) + b"\0" * 28, DropReason.OUTER_NOT_TCP),  # ext hdr
    ],
)
def test_drop_reasons(packet: bytes, reason: DropReason) -> None:
    assert parse_segment(packet) is reason
    assert parse_segment(b"\xaa" * 14 + packet, 14) is reason


@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x3FFF, 0x00B9 | 0x4000])
def test_fragments_are_dropped(frag: int) -> None:
    pkt = bytearray(v4())
    struct.pack_into("!H", pkt, 6, frag)  # MF and/or a fragment offset
    assert parse_segment(pkt) is DropReason.OUTER_FRAGMENT


def test_dont_fragment_and_reserved_bit_are_no_fragment() -> None:
    for flags in (0x0000, 0x4000, 0x8000):
        pkt = bytearray(v4())
        struct.pack_into("!H", pkt, 6, flags)
        assert not isinstance(parse_segment(pkt), DropReason)


@given(st.binary(max_size=80), st.integers(0, 20))
@settings(max_examples=300, deadline=None)
def test_never_raises(data: bytes, offset: int) -> None:
    """Any bytes: a Segment inside the buffer, or a DropReason; never an exception."""
    seg = parse_segment(data, offset)
    if not isinstance(seg, DropReason):
        assert offset + 20 <= seg[8] and seg[8] + 20 <= seg[9] <= len(data)


# ------------------------------------------------------------------ tcp_checksum_ok
# Payload lengths around every switch of tcp_checksum_ok (for IPv4 the slice is 28
# bytes longer than the payload: addresses and TCP header): one read (up to 256
# bytes), two halves (more), folded at 1472 bits (more than 552 bytes), also at 2944
# (1104: a 1500-byte MTU's slice is 1488), also at 5888 (2208), folded by halves
# first (more than 2944: jumbo frames, GRO); odd and even lengths.
LENGTHS = [0, 1, 2, 227, 228, 229, 523, 524, 525, 1075, 1076, 1077, 1443, 1460, 1461,
           2179, 2180, 2181, 2915, 2916, 2917, 8960, 12261, 20000, 65475]  # fmt: skip


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("family", ["v4", "v6", "v4-options"])
def test_checksum_matches_reference(n: int, family: str) -> None:
    rnd = random.Random(n)
    payload = rnd.randbytes(n)
    if family == "v6":
        pkt = v6(payload)
        l4 = 40
    elif family == "v4":
        pkt = v4(payload)
        l4 = 20
    else:
        body = tcp_segment(payload)
        pkt = ipv4_with_options(SRC, DST, len(body), b"\x01\x01\x01\x00") + body
        l4 = 24
    end = len(pkt)
    assert reference_ok(pkt, 0, l4, end)
    for prefix in (b"", b"\0" * 14, b"\xff" * 15):  # the endpoint's l3 = 0, captures' 14, odd
        buf = prefix + pkt
        l3 = len(prefix)
        for kind in (bytes, bytearray, memoryview):
            assert tcp_checksum_ok(kind(buf), l3, l3 + l4, l3 + end)  # type: ignore[arg-type]
        for pos in {l3 + l4 + 16, l3 + l4 + 20, len(buf) - 1, l3 + l4 + (end - l4) // 2}:
            if pos < len(buf):
                bad = bytearray(buf)
                bad[pos] ^= 0x04
                assert not tcp_checksum_ok(bad, l3, l3 + l4, l3 + end), pos


def test_checksum_against_reference_random() -> None:
    rnd = random.Random(11)
    for _ in range(400):
        n = rnd.choice(
            (rnd.randrange(0, 300), rnd.randrange(300, 3000), rnd.randrange(3000, 70000))
        )
        n = min(n, 65475)
        six = rnd.random() < 0.3
        pkt = bytearray(v6(rnd.randbytes(n)) if six else v4(rnd.randbytes(n)))
        l4 = 40 if six else 20
        if rnd.random() < 0.5:
            pkt[rnd.randrange(l4, len(pkt))] ^= 1 << rnd.randrange(8)
        assert tcp_checksum_ok(pkt, 0, l4, len(pkt)) == reference_ok(bytes(pkt), 0, l4, len(pkt))


def test_stored_ffff_where_zero_is_right_is_accepted() -> None:
    """Linux writes 0xFFFF for a sum folding to zero (CSUM_MANGLED_0): both count good."""
    pkt = bytearray(v4(b"\0" * 40))
    struct.pack_into("!H", pkt, 36, 0)
    s = ones_sum(pkt[20:], pseudo_sum(SRC, DST, len(pkt) - 20))
    struct.pack_into("!H", pkt, len(pkt) - 2, 0xFFFF - s)  # the sum is now 0xFFFF
    assert reference_ok(bytes(pkt), 0, 20, len(pkt))  # so checksum 0x0000 is right
    assert tcp_checksum_ok(pkt, 0, 20, len(pkt))
    pkt[36:38] = b"\xff\xff"
    assert tcp_checksum_ok(pkt, 0, 20, len(pkt))
    pkt[36:38] = b"\xff\xfe"
    assert not tcp_checksum_ok(pkt, 0, 20, len(pkt))
