"""Unit tests for sttun.core.softpath: checksum completion and software GSO.

Frames are built by hand with ``struct`` and checked against a naive byte-loop
Internet checksum written here, independent of ``sttun.wire.checksum``.  A final
test has tshark verify every IP and TCP/UDP checksum of the produced pieces.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from tests.reference import naive_sum

from sttun.core.softpath import complete, finish_checksum, segment_gso
from sttun.errors import DecodeError, TruncatedError
from sttun.wire.vnet import GSO_ECN, GsoType, VnetFlag, VnetHdr

# Overlay addresses from test-addresses.md.
SRC4 = bytes([192, 0, 2, 1])
DST4 = bytes([192, 0, 2, 2])
SRC6 = bytes.fromhex("20010db8000100000000000000000001")
DST6 = bytes.fromhex("20010db8000100000000000000000002")
MACS = bytes.fromhex("020000000002020000000001")

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128


# --------------------------------------------------------------------- reference


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, proto]) + struct.pack("!H", length)
    return src + dst + struct.pack("!I", length) + bytes([0, 0, 0, proto])


def pseudo_partial(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """What a CHECKSUM_PARTIAL sender leaves in the L4 checksum field."""
    return naive_sum(pseudo(src, dst, proto, length))


# ------------------------------------------------------------------ frame maker
def l2(tags: tuple[tuple[int, int], ...], ethertype: int) -> bytes:
    b = MACS
    for tpid, tci in tags:
        b += struct.pack("!HH", tpid, tci)
    return b + struct.pack("!H", ethertype)


def tcp_header(seq: int, flags: int, opts: bytes = b"", csum: int = 0) -> bytes:
    doff = 5 + len(opts) // 4
    return struct.pack("!HHIIBBHHH", 40000, 5001, seq, 7, doff << 4, flags, 1000, csum, 0) + opts


def ipv4_header(
    plen: int, proto: int, ident: int = 0x1234, opts: bytes = b"", df: bool = True
) -> bytes:
    ihl = 5 + len(opts) // 4
    h = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            ihl * 4 + plen,
            ident,
            0x4000 if df else 0,
            64,
            proto,
            0,
            SRC4,
            DST4,
        )
        + opts
    )
    return h[:10] + struct.pack("!H", ~naive_sum(h) & 0xFFFF) + h[12:]


def ipv6_header(plen: int, nh: int) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, plen, nh, 64, SRC6, DST6)


def ext_header(nh: int, length: int = 8) -> bytes:
    """A HBH/dest-options header of ``length`` bytes padded with PadN."""
    return bytes([nh, length // 8 - 1, 1, length - 4]) + bytes(length - 4)


def tcp_frame(
    payload: bytes,
    *,
    v6: bool = False,
    flags: int = ACK | PSH,
    seq: int = 1000,
    opts: bytes = b"",
    tags: tuple[tuple[int, int], ...] = (),
    exts: tuple[int, ...] = (),
    ip_opts: bytes = b"",
) -> tuple[bytes, int]:
    """A TSO super-packet with the partial pseudo-header sum; returns (frame, l4)."""
    tcp_len = 20 + len(opts) + len(payload)
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    tcp = tcp_header(seq, flags, opts, pseudo_partial(src, dst, 6, tcp_len)) + payload
    if v6:
        chain = b""
        nh = 6
        for t in reversed(exts):
            chain = ext_header(nh) + chain
            nh = t
        l3 = ipv6_header(len(chain) + tcp_len, nh) + chain
        head = l2(tags, 0x86DD) + l3
    else:
        head = l2(tags, 0x0800) + ipv4_header(tcp_len, 6, opts=ip_opts)
    return head + tcp, len(head)


def udp_frame(payload: bytes, *, v6: bool = False, exts: tuple[int, ...] = ()) -> tuple[bytes, int]:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", 40000, 5001, ulen, pseudo_partial(src, dst, 17, ulen)) + payload
    if v6:
        chain = b""
        nh = 17
        for t in reversed(exts):
            chain = ext_header(nh) + chain
            nh = t
        head = l2((), 0x86DD) + ipv6_header(len(chain) + ulen, nh) + chain
    else:
        head = l2((), 0x0800) + ipv4_header(ulen, 17)
    return head + udp, len(head)


def tso(l4: int, mss: int, v6: bool = False, ecn: bool = False) -> VnetHdr:
    gt = (GsoType.TCPV6 if v6 else GsoType.TCPV4) | (GSO_ECN if ecn else 0)
    return VnetHdr(VnetFlag.NEEDS_CSUM, gt, l4 + 20, mss, l4, 16)


# --------------------------------------------------------------------- checkers
def l3_offset(frame: bytes) -> int:
    off = 12
    while struct.unpack_from("!H", frame, off)[0] in (0x8100, 0x88A8):
        off += 4
    return off + 2


def check_tcp_piece(piece: bytes, l4: int) -> tuple[int, int, bytes]:
    """Verify every checksum of one piece; returns (seq, flags, payload)."""
    l3 = l3_offset(piece)
    if piece[l3] >> 4 == 4:
        ihl = (piece[l3] & 15) * 4
        assert naive_sum(piece[l3 : l3 + ihl]) == 0xFFFF, "IPv4 header checksum"
        assert struct.unpack_from("!H", piece, l3 + 2)[0] == len(piece) - l3
        src, dst = piece[l3 + 12 : l3 + 16], piece[l3 + 16 : l3 + 20]
    else:
        assert struct.unpack_from("!H", piece, l3 + 4)[0] == len(piece) - l3 - 40
        src, dst = piece[l3 + 8 : l3 + 24], piece[l3 + 24 : l3 + 40]
    seg = piece[l4:]
    assert naive_sum(pseudo(src, dst, 6, len(seg)) + seg) == 0xFFFF, "TCP checksum"
    seq = struct.unpack_from("!I", seg, 4)[0]
    hlen = (seg[12] >> 4) * 4
    return seq, seg[13], seg[hlen:]


def check_udp_datagram(piece: bytes, l4: int) -> bytes:
    l3 = l3_offset(piece)
    if piece[l3] >> 4 == 4:
        assert naive_sum(piece[l3 : l3 + 20]) == 0xFFFF
        src, dst = piece[l3 + 12 : l3 + 16], piece[l3 + 16 : l3 + 20]
    else:
        src, dst = piece[l3 + 8 : l3 + 24], piece[l3 + 24 : l3 + 40]
    dg = piece[l4:]
    assert struct.unpack_from("!H", dg, 4)[0] == len(dg)
    assert struct.unpack_from("!H", dg, 6)[0] != 0
    assert naive_sum(pseudo(src, dst, 17, len(dg)) + dg) == 0xFFFF, "UDP checksum"
    return dg[8:]


# ------------------------------------------------------------ finish_checksum
def test_finish_checksum_tcp_ipv4() -> None:
    frame, l4 = tcp_frame(os.urandom(777))
    buf = bytearray(frame)
    finish_checksum(buf, l4, 16)
    check_tcp_piece(bytes(buf), l4)
    assert buf[:l4] == frame[:l4] and buf[l4 + 18 :] == frame[l4 + 18 :]


def test_finish_checksum_on_memoryview_odd_length() -> None:
    frame, l4 = tcp_frame(os.urandom(1001), v6=True)
    buf = bytearray(b"xx" + frame)
    finish_checksum(memoryview(buf)[2:], l4, 16)
    check_tcp_piece(bytes(buf[2:]), l4)


def _udp_with_zero_checksum(offset: int) -> bytearray:
    """A UDP (or TCP if offset 16) frame whose complete checksum is exactly 0."""
    if offset == 6:
        frame, l4 = udp_frame(bytes(64))
    else:
        frame, l4 = tcp_frame(bytes(64))
    buf = bytearray(frame)
    src, dst = SRC4, DST4
    proto = 17 if offset == 6 else 6
    seg = bytearray(buf[l4:])
    seg[offset : offset + 2] = b"\0\0"
    s = naive_sum(pseudo(src, dst, proto, len(seg)) + bytes(seg))
    # Set the last payload word so that the full sum is 0xFFFF -> checksum 0.
    struct.pack_into("!H", buf, len(buf) - 2, ~s & 0xFFFF)
    return buf


def test_finish_checksum_udp_zero_becomes_ffff() -> None:
    buf = _udp_with_zero_checksum(6)
    l4 = 34
    finish_checksum(buf, l4, 6)
    assert buf[l4 + 6 : l4 + 8] == b"\xff\xff"
    check_udp_datagram(bytes(buf), l4)


def test_finish_checksum_tcp_zero_stays_zero() -> None:
    buf = _udp_with_zero_checksum(16)
    finish_checksum(buf, 34, 16)
    assert buf[34 + 16 : 34 + 18] == b"\0\0"
    check_tcp_piece(bytes(buf), 34)


@pytest.mark.parametrize(
    ("start", "offset", "field"),
    [
        (-1, 16, "csum_start"),
        (100, 0, "csum_start"),
        (34, 65, "csum_offset"),
        (34, -2, "csum_offset"),
        (99, 0, "csum_start"),
        (98, 1, "csum_offset"),
    ],
)
def test_finish_checksum_out_of_range(start: int, offset: int, field: str) -> None:
    buf = bytearray(100)
    with pytest.raises(DecodeError) as ei:
        finish_checksum(buf, start, offset)
    assert ei.value.field == field
    assert buf == bytearray(100)


def test_finish_checksum_last_two_bytes() -> None:
    buf = bytearray(b"\x12\x34\x00\x00")
    finish_checksum(buf, 0, 2)
    assert naive_sum(bytes(buf)) == 0xFFFF


def _seeded(frame: bytes, l4: int, field: int, seed: int) -> bytearray:
    buf = bytearray(frame)
    struct.pack_into("!H", buf, l4 + field, seed)
    return buf


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("tags", [(), ((0x8100, 5),), ((0x88A8, 5), (0x8100, 6))])
def test_finish_checksum_pseudo_from_headers_tcp(
    v6: bool, tags: tuple[tuple[int, int], ...]
) -> None:
    """Another sender's seed is not trusted: whatever the field holds (the sum with
    or without the length, garbage), the checksum comes out right; Ethernet padding
    after the IP packet is not summed."""
    frame, l4 = tcp_frame(os.urandom(333), v6=v6, tags=tags)
    for seed in (0, 0x1234, 0xFFFF, struct.unpack_from("!H", frame, l4 + 16)[0]):
        buf = _seeded(frame, l4, 16, seed) + b"\x55" * 7  # padding
        finish_checksum(buf, l4, 16, pseudo_from_headers=True)
        check_tcp_piece(bytes(buf[:-7]), l4)
        assert buf[-7:] == b"\x55" * 7
        assert buf[: l4 + 16] == frame[: l4 + 16] and buf[l4 + 18 : -7] == frame[l4 + 18 :]


@pytest.mark.parametrize("v6", [False, True])
def test_finish_checksum_pseudo_from_headers_udp(v6: bool) -> None:
    frame, l4 = udp_frame(os.urandom(101), v6=v6)
    buf = _seeded(frame, l4, 6, 0xBEEF)
    finish_checksum(buf, l4, 6, pseudo_from_headers=True)
    check_udp_datagram(bytes(buf), l4)
    zero = _udp_with_zero_checksum(6)  # a complete UDP checksum of 0 is sent as 0xFFFF
    zero[34 + 6 : 34 + 8] = b"\x12\x34"
    finish_checksum(zero, 34, 6, pseudo_from_headers=True)
    assert zero[34 + 6 : 34 + 8] == b"\xff\xff"


def test_finish_checksum_pseudo_from_headers_falls_back_to_the_field() -> None:
    """No IP header to follow (not IP, cut short, or the field outside the IP packet):
    the field is taken as the pseudo-header sum, as without the option."""
    frame, l4 = tcp_frame(os.urandom(50))
    cases = [
        bytearray(frame[:12] + b"\x08\x06" + frame[14:]),  # not IP
        bytearray(frame[:12] + b"\x81\x00"),  # a tag cut off
    ]
    short_ip = bytearray(frame)
    struct.pack_into("!H", short_ip, 16, 20)  # IPv4 total length: header only
    cases.append(short_ip)
    for buf in cases:
        want = bytearray(buf)
        if len(buf) > l4 + 18:
            finish_checksum(want, l4, 16)
            finish_checksum(buf, l4, 16, pseudo_from_headers=True)
            assert buf == want
        else:
            with pytest.raises(DecodeError):
                finish_checksum(buf, l4, 16, pseudo_from_headers=True)


# -------------------------------------------------------------------- TSO
def _check_tso(
    frame: bytes, l4: int, pieces: list[bytearray], mss: int, seq0: int, flags: int
) -> None:
    payloads = []
    for i, p in enumerate(pieces):
        seq, f, data = check_tcp_piece(bytes(p), l4)
        assert p[:12] == frame[:12]
        assert seq == (seq0 + i * mss) & 0xFFFFFFFF
        want = flags
        if i:
            want &= ~CWR
        if i != len(pieces) - 1:
            want &= ~(FIN | PSH)
        assert f == want, (i, f, want)
        assert len(data) == mss or i == len(pieces) - 1
        payloads.append(data)
    hlen = l4 + (frame[l4 + 12] >> 4) * 4
    assert b"".join(payloads) == frame[hlen:]


def test_tso_ipv4_4000_bytes_three_pieces() -> None:
    """protocol.md §11 #4."""
    payload = os.urandom(4000)
    frame, l4 = tcp_frame(payload, flags=ACK | PSH | FIN | CWR, seq=0xFFFFF000)
    pieces = segment_gso(frame, tso(l4, 1448))
    assert [len(p) - l4 - 20 for p in pieces] == [1448, 1448, 1104]
    _check_tso(frame, l4, pieces, 1448, 0xFFFFF000, ACK | PSH | FIN | CWR)
    ids = [struct.unpack_from("!H", p, 18)[0] for p in pieces]
    assert ids == [0x1234, 0x1235, 0x1236]
    for p in pieces:  # everything else in the IPv4 header is copied (DF, TTL, TOS)
        assert p[14:16] == frame[14:16] and p[20:22] == frame[20:22] and p[22:24] == frame[22:24]


def test_tso_ipv4_id_wraps() -> None:
    frame = bytearray(tcp_frame(os.urandom(3000))[0])
    frame[18:20] = b"\xff\xff"
    frame[24:26] = b"\0\0"
    frame[24:26] = struct.pack("!H", ~naive_sum(bytes(frame[14:34])) & 0xFFFF)
    pieces = segment_gso(frame, tso(34, 1000))
    assert [struct.unpack_from("!H", p, 18)[0] for p in pieces] == [0xFFFF, 0, 1]
    _check_tso(bytes(frame), 34, pieces, 1000, 1000, ACK | PSH)


def test_tso_ipv4_with_ip_options() -> None:
    frame, l4 = tcp_frame(os.urandom(3000), ip_opts=b"\x01\x01\x01\x00")  # NOP NOP NOP EOL
    assert l4 == 38
    pieces = segment_gso(frame, tso(l4, 1448))
    assert len(pieces) == 3
    _check_tso(frame, l4, pieces, 1448, 1000, ACK | PSH)
    assert all(p[34:38] == b"\x01\x01\x01\x00" for p in pieces)


def test_tso_ipv6() -> None:
    """protocol.md §11 #5."""
    frame, l4 = tcp_frame(os.urandom(5000), v6=True, flags=ACK | FIN)
    assert l4 == 54
    pieces = segment_gso(frame, tso(l4, 1440, v6=True))
    assert len(pieces) == 4
    _check_tso(frame, l4, pieces, 1440, 1000, ACK | FIN)


def test_tso_ipv6_extension_headers() -> None:
    frame, l4 = tcp_frame(os.urandom(3001), v6=True, exts=(0, 60))  # hop-by-hop, dest options
    assert l4 == 54 + 16
    pieces = segment_gso(frame, tso(l4, 1000, v6=True))
    assert len(pieces) == 4
    _check_tso(frame, l4, pieces, 1000, 1000, ACK | PSH)
    for p in pieces:
        assert p[54:l4] == frame[54:l4]
        assert p[20] == 0  # IPv6 next header still names hop-by-hop


@pytest.mark.parametrize(
    "tags",
    [((0x8100, 0x0064),), ((0x88A8, 0x0010), (0x8100, 0xB064)), ((0x8100, 0x1000),)],
    ids=["802.1Q", "802.1ad+802.1Q", "priority-tag"],
)
@pytest.mark.parametrize("v6", [False, True])
def test_tso_vlan_tagged(tags: tuple[tuple[int, int], ...], v6: bool) -> None:
    frame, l4 = tcp_frame(os.urandom(2900), v6=v6, tags=tags)
    pieces = segment_gso(frame, tso(l4, 1448, v6=v6))
    assert len(pieces) == 3
    _check_tso(frame, l4, pieces, 1448, 1000, ACK | PSH)
    for p in pieces:
        assert p[: 14 + 4 * len(tags)] == frame[: 14 + 4 * len(tags)]


def test_tso_tcp_options_copied() -> None:
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321) + b"\x01\x01\x04\x02"
    frame, l4 = tcp_frame(os.urandom(4000), opts=opts)
    pieces = segment_gso(frame, tso(l4, 1436))
    assert len(pieces) == 3
    _check_tso(frame, l4, pieces, 1436, 1000, ACK | PSH)
    for p in pieces:
        assert p[l4 + 20 : l4 + 20 + len(opts)] == opts
        assert p[l4 + 12] == 0x90  # doff 9


def test_tso_flags_placement_and_ecn_bit() -> None:
    frame, l4 = tcp_frame(os.urandom(5000), flags=ACK | PSH | FIN | CWR | ECE | URG)
    pieces = segment_gso(frame, tso(l4, 1000, ecn=True))
    flags = [p[l4 + 13] for p in pieces]
    assert flags == [ACK | CWR | ECE | URG] + [ACK | ECE | URG] * 3 + [ACK | PSH | FIN | ECE | URG]


def test_tso_incoming_checksum_value_is_ignored() -> None:
    frame = bytearray(tcp_frame(os.urandom(3000))[0])
    frame[34 + 16 : 34 + 18] = b"\xde\xad"  # e.g. a Windows-style pseudo-header without length
    pieces = segment_gso(frame, tso(34, 1448))
    _check_tso(bytes(frame), 34, pieces, 1448, 1000, ACK | PSH)


def test_tso_payload_fits_in_one_piece() -> None:
    frame = bytearray(tcp_frame(os.urandom(500), flags=ACK | CWR | FIN)[0])
    pieces = segment_gso(frame, tso(34, 1448))
    assert len(pieces) == 1
    seq, f, data = check_tcp_piece(bytes(pieces[0]), 34)
    assert (seq, f, data) == (1000, ACK | CWR | FIN, bytes(frame[54:]))


def test_tso_exact_multiple_and_empty_payload() -> None:
    frame, l4 = tcp_frame(os.urandom(2896))
    assert [len(p) for p in segment_gso(frame, tso(l4, 1448))] == [l4 + 20 + 1448] * 2
    frame, l4 = tcp_frame(b"", flags=ACK)
    (p,) = segment_gso(frame, tso(l4, 1448))
    assert check_tcp_piece(bytes(p), l4) == (1000, ACK, b"")


def test_tso_ethernet_padding_dropped_and_input_untouched() -> None:
    frame, l4 = tcp_frame(os.urandom(3000))
    padded = bytearray(frame + b"\0" * 6)
    before = bytes(padded)
    pieces = segment_gso(padded, tso(l4, 1448))
    assert padded == before
    _check_tso(frame, l4, pieces, 1448, 1000, ACK | PSH)


def test_tso_accepts_memoryview_and_no_needs_csum() -> None:
    frame, l4 = tcp_frame(os.urandom(3000))
    v = VnetHdr(0, GsoType.TCPV4, 0, 1448, 0, 0)
    pieces = segment_gso(memoryview(frame), v)
    _check_tso(frame, l4, pieces, 1448, 1000, ACK | PSH)


# ------------------------------------------------------------------- UDP
@pytest.mark.parametrize("v6", [False, True])
def test_uso_splits_datagrams(v6: bool) -> None:
    payload = os.urandom(3001)
    frame, l4 = udp_frame(payload, v6=v6)
    v = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP_L4, l4 + 8, 1000, l4, 6)
    pieces = segment_gso(frame, v)
    assert len(pieces) == 4
    data = [check_udp_datagram(bytes(p), l4) for p in pieces]
    assert [len(d) for d in data] == [1000, 1000, 1000, 1]
    assert b"".join(data) == payload
    if not v6:
        assert [struct.unpack_from("!H", p, 18)[0] for p in pieces] == [
            0x1234 + i for i in range(4)
        ]


def _reassemble_v4(pieces: list[bytearray]) -> tuple[bytes, set[int]]:
    parts = {}
    ids = set()
    for i, p in enumerate(pieces):
        assert naive_sum(bytes(p[14:34])) == 0xFFFF
        tot, ident, fo = struct.unpack_from("!HHH", p, 16)
        ids.add(ident)
        assert tot == len(p) - 14
        assert bool(fo & 0x2000) == (i < len(pieces) - 1)
        assert not fo & 0x4000
        parts[(fo & 0x1FFF) * 8] = bytes(p[34:])
    out = b""
    for off in sorted(parts):
        assert off == len(out)
        out += parts[off]
    return out, ids


def test_ufo_ipv4_fragments() -> None:
    payload = os.urandom(4000)
    frame, l4 = udp_frame(payload)
    v = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP, l4 + 8, 1480, l4, 6)
    pieces = segment_gso(frame, v)
    assert [len(p) - 34 for p in pieces] == [1480, 1480, 1048]
    dg, ids = _reassemble_v4(pieces)
    assert ids == {0x1234}
    assert check_udp_datagram(frame[:34] + dg, 34) == payload


def test_ufo_gso_size_rounded_down_to_eight() -> None:
    frame, _l4 = udp_frame(os.urandom(100))
    pieces = segment_gso(frame, VnetHdr(0, GsoType.UDP, 0, 31, 0, 0))
    assert [len(p) - 34 for p in pieces] == [24, 24, 24, 24, 12]
    dg, _ = _reassemble_v4(pieces)
    check_udp_datagram(frame[:34] + dg, 34)
    with pytest.raises(DecodeError, match="gso_size"):
        segment_gso(frame, VnetHdr(0, GsoType.UDP, 0, 7, 0, 0))


def test_ufo_fits_in_one_packet() -> None:
    payload = os.urandom(200)
    frame, l4 = udp_frame(payload)
    (p,) = segment_gso(frame, VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP, 0, 1480, l4, 6))
    assert p[:34] == frame[:34]
    assert check_udp_datagram(bytes(p), l4) == payload


@pytest.mark.parametrize(
    ("exts", "n_unfrag"),
    # Kernel rule: the unfragmentable part is HBH, routing, and dest-opts before routing.
    [((), 0), ((0,), 1), ((0, 43, 60), 2), ((60,), 1), ((0, 60, 43), 3)],
)
def test_ufo_ipv6_fragment_header(exts: tuple[int, ...], n_unfrag: int) -> None:
    payload = os.urandom(3000)
    frame, l4 = udp_frame(payload, v6=True, exts=exts)
    pieces = segment_gso(frame, VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP, 0, 1232, l4, 6))
    assert len(pieces) == 3
    unfrag_end = 54 + 8 * n_unfrag
    frags = {}
    idents = set()
    for i, p in enumerate(pieces):
        assert struct.unpack_from("!H", p, 18)[0] == len(p) - 54
        nh_pos = 20 if n_unfrag == 0 else unfrag_end - 8
        assert p[nh_pos] == 44
        nh, _r, fo, ident = struct.unpack_from("!BBHI", p, unfrag_end)
        idents.add(ident)
        assert nh == (frame[20] if n_unfrag == 0 else frame[nh_pos])
        assert bool(fo & 1) == (i < len(pieces) - 1)
        frags[fo & 0xFFF8] = bytes(p[unfrag_end + 8 :])
        same = bytearray(p[:unfrag_end])
        same[18:20] = frame[18:20]  # only the payload length and one next header differ
        same[nh_pos] = frame[nh_pos]
        assert same == frame[:unfrag_end]
    assert len(idents) == 1
    assert [len(frags[k]) for k in sorted(frags)] == [1232, 1232, len(frame) - unfrag_end - 2464]
    rest = b"".join(frags[k] for k in sorted(frags))
    whole = frame[:unfrag_end] + rest
    assert check_udp_datagram(whole, l4) == payload


# -------------------------------------------------------------- no GSO
def test_no_gso_needs_csum_and_plain_copy() -> None:
    frame, l4 = tcp_frame(os.urandom(1000))
    v = VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, l4, 16)
    for fn in (complete, segment_gso):
        (p,) = fn(frame, v)
        check_tcp_piece(bytes(p), l4)
        (q,) = fn(frame, VnetHdr())
        assert q == frame and isinstance(q, bytearray)
    src = bytearray(frame)
    (r,) = complete(src, v)
    assert src == frame and r is not src


def test_complete_dispatches_gso() -> None:
    frame, l4 = tcp_frame(os.urandom(3000))
    assert len(complete(frame, tso(l4, 1448))) == 3


def test_complete_bad_csum_start() -> None:
    with pytest.raises(DecodeError, match="csum_offset"):
        complete(bytes(60), VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, 50, 16))


# ------------------------------------------------------------- malformed
def _bad(frame: bytes | bytearray, v: VnetHdr, field: str) -> None:
    with pytest.raises(DecodeError) as ei:
        segment_gso(frame, v)
    assert field in ei.value.field, str(ei.value)
    assert ei.value.expected is not None and ei.value.got is not None


def test_malformed_inputs() -> None:
    frame, l4 = tcp_frame(os.urandom(3000))
    v = tso(l4, 1448)
    _bad(frame[:10], v, "Ethernet")
    _bad(frame[:30], v, "IPv4 header")
    _bad(frame[:40], v, "IPv4 packet")
    _bad(frame, v._replace(gso_size=0), "gso_size")
    _bad(frame, v._replace(gso_type=2), "gso_type")
    _bad(frame, v._replace(gso_type=GsoType.UDP | GSO_ECN), "gso_type")
    _bad(frame, v._replace(gso_type=GsoType.TCPV6), "ethertype")
    _bad(frame, v._replace(csum_start=30), "csum_start")
    _bad(frame, v._replace(csum_offset=6), "csum_offset")
    _bad(frame, v._replace(gso_type=GsoType.UDP_L4), "protocol")
    f6, l6 = tcp_frame(os.urandom(3000), v6=True)
    _bad(f6, tso(l6, 1448), "ethertype")
    _bad(f6[:80], tso(l6, 1448, v6=True), "IPv6 packet")

    b = bytearray(frame)
    b[l4 + 12] = 0x40  # data offset 4
    _bad(b, v, "TCP data offset")
    b[l4 + 12] = 0xF0  # data offset 15 runs past a 40-byte TCP packet
    tiny = tcp_frame(b"")[0]
    t = bytearray(tiny)
    t[l4 + 12] = 0xF0
    _bad(t, v, "TCP header")
    _bad(tiny[:-4], v, "IPv4 packet")

    b = bytearray(frame)
    b[20] = 0x20  # MF
    _bad(b, v, "fragment")
    b = bytearray(frame)
    b[14] = 0x44  # IHL 4
    _bad(b, v, "IPv4 header length")
    b = bytearray(frame)
    b[16:18] = b"\0\x10"  # total length 16 < IHL
    _bad(b, v, "IPv4 total length")
    b = bytearray(frame)
    b[14] = 0x65
    _bad(b, v, "IP version")
    b = bytearray(frame)
    b[16:18] = b"\0\x1c"  # total length 28: TCP header does not fit
    _bad(b, v, "TCP header")

    g = bytearray(f6)
    g[18:20] = b"\0\0"
    _bad(g, tso(l6, 1448, v6=True), "IPv6 payload length")
    g = bytearray(f6)
    g[20] = 44  # fragment header
    _bad(g, tso(l6, 1448, v6=True), "IPv6 fragment header")
    g = bytearray(tcp_frame(os.urandom(100), v6=True)[0])
    g[20] = 0  # hop-by-hop announced; its length byte (in the TCP header) is huge
    g[55] = 0xFF
    _bad(g, tso(l6, 1448, v6=True), "IPv6 extension header")

    u, ul4 = udp_frame(os.urandom(100))
    w = bytearray(u)
    w[ul4 + 4 : ul4 + 6] = b"\0\x09"
    _bad(w, VnetHdr(0, GsoType.UDP, 0, 40, 0, 0), "UDP length")
    _bad(u[:38], VnetHdr(0, GsoType.UDP_L4, 0, 40, 0, 0), "IPv4 packet")
    arp = MACS + b"\x08\x06" + bytes(28)
    _bad(arp, VnetHdr(0, GsoType.UDP, 0, 40, 0, 0), "ethertype")
    vlan_cut = MACS + b"\x81\x00\x00"
    with pytest.raises(TruncatedError):
        segment_gso(vlan_cut, v)


# ---------------------------------------------------------- tshark cross-check
def write_pcap(path: Path, frames: list[bytes]) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", 1_700_000_000, i, len(fr), len(fr)))
            f.write(fr)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_says_every_checksum_is_good(tmp_path: Path) -> None:
    pieces: list[bytes] = []
    for v6 in (False, True):
        for tags in ((), ((0x8100, 100),), ((0x88A8, 10), (0x8100, 20))):
            frame, l4 = tcp_frame(
                os.urandom(64000),
                v6=v6,
                tags=tags,
                opts=b"\x01\x01\x08\x0a" + bytes(8),
                flags=ACK | PSH | FIN,
                exts=(0,) if v6 else (),
            )
            pieces += segment_gso(frame, tso(l4, 1448, v6=v6))
        frame, l4 = udp_frame(os.urandom(3000), v6=v6)
        pieces += segment_gso(frame, VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP_L4, 0, 1000, l4, 6))
    n_tcp = 2 * 3 * 45
    assert len(pieces) == n_tcp + 2 * 3
    pcap = tmp_path / "pieces.pcap"
    write_pcap(pcap, [bytes(p) for p in pieces])
    res = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-e",
            "ip.checksum.status",
            "-e",
            "tcp.checksum.status",
            "-e",
            "udp.checksum.status",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line.split(",") for line in res.stdout.splitlines()]
    assert len(rows) == len(pieces)
    for i, (ip_st, tcp_st, udp_st) in enumerate(rows):
        v6 = (i // (3 * 45 + 3)) == 1
        assert ip_st == ("" if v6 else "1"), (i, rows[i])
        assert (tcp_st or udp_st) == "1", (i, rows[i])


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_reassembles_ufo_fragments(tmp_path: Path) -> None:
    frames: list[bytes] = []
    for v6 in (False, True):
        frame, l4 = udp_frame(os.urandom(5000), v6=v6)
        frames += segment_gso(frame, VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP, 0, 1400, l4, 6))
    pcap = tmp_path / "frags.pcap"
    write_pcap(pcap, [bytes(p) for p in frames])
    res = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-o",
            "udp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-Y",
            "udp",
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-e",
            "udp.checksum.status",
            "-e",
            "udp.length",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert res.stdout.split() == ["1,5008", "1,5008"]
