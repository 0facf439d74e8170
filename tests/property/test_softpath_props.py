"""Property tests for sttun.core.softpath against a naive reference written here.

The reference segmenter below works one byte and one 16-bit word at a time, with
no code shared with sttun: every piece sttun produces must be byte-for-byte what
it builds, and every checksum must verify with the naive byte-loop sum.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.reference import naive_sum

from sttun.core.softpath import complete, finish_checksum, segment_gso
from sttun.errors import DecodeError
from sttun.wire.vnet import GSO_ECN, GsoType, VnetFlag, VnetHdr

SRC4, DST4 = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 7])
SRC6 = bytes.fromhex("20010db8000100000000000000000001")
DST6 = bytes.fromhex("20010db8000100000000000000000002")
MACS = bytes.fromhex("020000000002020000000001")
FIN, PSH, CWR = 0x01, 0x08, 0x80

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------- naive reference


def naive_csum(data: bytes) -> int:
    return 0xFFFF - naive_sum(data)


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, proto, length >> 8, length & 0xFF])
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


def put16(b: bytearray, off: int, v: int) -> None:
    b[off] = v >> 8
    b[off + 1] = v & 0xFF


def ref_segment(frame: bytes, l3: int, l4: int, mss: int, tcp: bool) -> list[bytes]:
    """Kernel-style TSO/USO, written the slow and obvious way."""
    v4 = frame[l3] >> 4 == 4
    if v4:
        end = l3 + int.from_bytes(frame[l3 + 2 : l3 + 4], "big")
        src, dst = frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20]
    else:
        end = l3 + 40 + int.from_bytes(frame[l3 + 4 : l3 + 6], "big")
        src, dst = frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40]
    hlen = l4 + ((frame[l4 + 12] >> 4) * 4 if tcp else 8)
    payload = frame[hlen:end]
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)] or [b""]
    seq0 = int.from_bytes(frame[l4 + 4 : l4 + 8], "big")
    ident0 = int.from_bytes(frame[l3 + 4 : l3 + 6], "big")
    out = []
    for i, chunk in enumerate(chunks):
        p = bytearray(frame[:hlen]) + chunk
        l4len = len(p) - l4
        if tcp:
            p[l4 + 4 : l4 + 8] = ((seq0 + i * mss) % 2**32).to_bytes(4, "big")
            if i > 0:
                p[l4 + 13] &= ~CWR
            if i < len(chunks) - 1:
                p[l4 + 13] &= ~(FIN | PSH)
            put16(p, l4 + 16, 0)
            put16(p, l4 + 16, naive_csum(pseudo(src, dst, 6, l4len) + p[l4:]))
        else:
            put16(p, l4 + 4, l4len)
            put16(p, l4 + 6, 0)
            put16(p, l4 + 6, naive_csum(pseudo(src, dst, 17, l4len) + p[l4:]) or 0xFFFF)
        if v4:
            put16(p, l3 + 2, len(p) - l3)
            put16(p, l3 + 4, (ident0 + i) % 65536)
            put16(p, l3 + 10, 0)
            put16(p, l3 + 10, naive_csum(p[l3:l4]))
        else:
            put16(p, l3 + 4, len(p) - l3 - 40)
        out.append(bytes(p))
    return out


# ----------------------------------------------------------------- generators
@st.composite
def frames(draw: st.DrawFn, tcp: bool) -> tuple[bytes, int, int, int]:
    """(frame, l3, l4, mss): a GSO super-packet with the partial checksum seeded."""
    v6 = draw(st.booleans())
    tags = draw(st.lists(st.sampled_from([0x8100, 0x88A8]), max_size=2))
    head = MACS
    for tpid in tags:
        head += struct.pack("!HH", tpid, draw(st.integers(0, 0xFFFF)))
    head += b"\x86\xdd" if v6 else b"\x08\x00"
    l3 = len(head)
    n = draw(st.one_of(st.integers(0, 64), st.integers(0, 5000)))
    payload = draw(
        st.one_of(st.binary(min_size=n, max_size=n), st.randoms().map(lambda r: r.randbytes(n)))
    )
    lo = max(1, n // 100)
    mss = draw(st.one_of(st.integers(lo, max(lo, n // 2)), st.integers(lo, 3000)))
    proto = 6 if tcp else 17
    if tcp:
        opts = draw(st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]))
        flags = draw(st.integers(0, 255))
        seq = draw(st.integers(0, 2**32 - 1))
        l4hdr = struct.pack(
            "!HHIIBBHHH", 40000, 5001, seq, 9, (5 + len(opts) // 4) << 4, flags, 512, 0, 0
        )
        l4hdr += opts
    else:
        l4hdr = struct.pack("!HHHH", 40000, 5001, 8 + len(payload), 0)
    l4len = len(l4hdr) + len(payload)
    if v6:
        exts = draw(st.lists(st.sampled_from([0, 60, 43]), max_size=3))
        chain, nh = b"", proto
        for t in reversed(exts):
            ln = draw(st.sampled_from([8, 16]))
            chain = bytes([nh, ln // 8 - 1]) + bytes(ln - 2) + chain
            nh = t
        l3hdr = struct.pack("!IHBB16s16s", 6 << 28, len(chain) + l4len, nh, 64, SRC6, DST6) + chain
        src, dst = SRC6, DST6
    else:
        ipopts = b"\x01" * (4 * draw(st.integers(0, 10)))
        ihl = 5 + len(ipopts) // 4
        ident = draw(st.integers(0, 0xFFFF))
        l3hdr = struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + l4len, ident, 0x4000, 64, proto, 0, SRC4, DST4
        )
        l3hdr += ipopts
        src, dst = SRC4, DST4
    l4 = l3 + len(l3hdr)
    seed = bytearray(l4hdr)
    off = 16 if tcp else 6
    put16(seed, off, naive_sum(pseudo(src, dst, proto, l4len)))
    return head + l3hdr + bytes(seed) + payload, l3, l4, mss


# ------------------------------------------------------------------ properties
@SETTINGS
@given(frames(tcp=True), st.booleans())
def test_tso_matches_naive_reference(case: tuple[bytes, int, int, int], ecn: bool) -> None:
    frame, l3, l4, mss = case
    v6 = frame[l3] >> 4 == 6
    gt = (GsoType.TCPV6 if v6 else GsoType.TCPV4) | (GSO_ECN if ecn else 0)
    pieces = segment_gso(frame, VnetHdr(VnetFlag.NEEDS_CSUM, gt, 0, mss, l4, 16))
    want = ref_segment(frame, l3, l4, mss, tcp=True)
    assert [bytes(p) for p in pieces] == want
    hlen = l4 + (frame[l4 + 12] >> 4) * 4
    assert b"".join(p[hlen:] for p in pieces) == frame[hlen:]
    for p in pieces:  # the reference's own checksums really verify
        src, dst = (p[l3 + 8 : l3 + 24], p[l3 + 24 : l3 + 40]) if v6 else (SRC4, DST4)
        assert naive_sum(pseudo(src, dst, 6, len(p) - l4) + p[l4:]) == 0xFFFF
        if not v6:
            assert naive_sum(p[l3:l4]) == 0xFFFF


@SETTINGS
@given(frames(tcp=False))
def test_uso_matches_naive_reference(case: tuple[bytes, int, int, int]) -> None:
    frame, l3, l4, mss = case
    pieces = segment_gso(frame, VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP_L4, 0, mss, l4, 6))
    assert [bytes(p) for p in pieces] == ref_segment(frame, l3, l4, mss, tcp=False)


@SETTINGS
@given(frames(tcp=False))
def test_ufo_reassembles_to_a_checksummed_datagram(case: tuple[bytes, int, int, int]) -> None:
    frame, l3, l4, size = case
    size = max(size, 8)
    pieces = segment_gso(frame, VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.UDP, 0, size, l4, 6))
    v6 = frame[l3] >> 4 == 6
    if len(pieces) == 1:
        dgram = bytes(pieces[0][l4:])
    else:
        parts: dict[int, bytes] = {}
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            if v6:
                # find the fragment header by walking the chain
                nh, pos = p[l3 + 6], l3 + 40
                while nh != 44:
                    nh, pos = p[pos], pos + (p[pos + 1] + 1) * 8
                fo = int.from_bytes(p[pos + 2 : pos + 4], "big")
                assert bool(fo & 1) != last
                assert int.from_bytes(p[l3 + 4 : l3 + 6], "big") == len(p) - l3 - 40
                parts[fo & 0xFFF8] = bytes(p[pos + 8 :])
                unfrag_end = pos
            else:
                assert naive_sum(p[l3:l4]) == 0xFFFF
                fo = int.from_bytes(p[l3 + 6 : l3 + 8], "big")
                assert bool(fo & 0x2000) != last
                assert int.from_bytes(p[l3 + 2 : l3 + 4], "big") == len(p) - l3
                parts[(fo & 0x1FFF) * 8] = bytes(p[l4:])
                unfrag_end = l4
            if not last:
                assert len(p) - unfrag_end - (8 if v6 else 0) == size // 8 * 8
        data = b""
        for off in sorted(parts):
            assert off == len(data)
            data += parts[off]
        # The fragmentable part may start with IPv6 extension headers; the datagram ends it.
        assert len(data) >= len(frame) - l4
        dgram = data[len(data) - (len(frame) - l4) :]
    assert dgram[8:] == frame[l4 + 8 :]
    src, dst = (frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40]) if v6 else (SRC4, DST4)
    assert dgram[6:8] != b"\0\0"
    assert naive_sum(pseudo(src, dst, 17, len(dgram)) + dgram) == 0xFFFF


@SETTINGS
@given(frames(tcp=True))
def test_finish_checksum_matches_naive(case: tuple[bytes, int, int, int]) -> None:
    frame, l3, l4, _ = case
    buf = bytearray(frame)
    finish_checksum(buf, l4, 16)
    v6 = frame[l3] >> 4 == 6
    src, dst = (frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40]) if v6 else (SRC4, DST4)
    assert naive_sum(pseudo(src, dst, 6, len(buf) - l4) + bytes(buf[l4:])) == 0xFFFF
    (c,) = complete(frame, VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, l4, 16))
    assert c == buf


vnets = st.builds(
    VnetHdr,
    st.integers(0, 255),
    st.one_of(st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x83, 0x80]), st.integers(0, 255)),
    st.integers(0, 0xFFFF),
    st.one_of(st.integers(0, 64), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 80), st.integers(0, 0xFFFF)),
    st.one_of(st.sampled_from([6, 16]), st.integers(0, 0xFFFF)),
)


def _only_decode_errors(frame: bytes, vnet: VnetHdr) -> None:
    try:
        out = complete(frame, vnet)
    except DecodeError:
        return
    assert out and all(isinstance(p, bytearray) for p in out)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), vnets)
def test_random_bytes_give_decode_error_or_result(frame: bytes, vnet: VnetHdr) -> None:
    _only_decode_errors(frame, vnet)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(frames(tcp=True), frames(tcp=False)),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.integers(0, 400),
    vnets,
    st.booleans(),
)
def test_mutated_frames_give_decode_error_or_result(
    case: tuple[bytes, int, int, int],
    flips: list[tuple[int, int]],
    cut: int,
    vnet: VnetHdr,
    keep_vnet: bool,
) -> None:
    frame, _l3, l4, mss = case
    b = bytearray(frame)
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    if cut:
        del b[max(0, len(b) - cut) :]
    if keep_vnet:
        gt = [GsoType.TCPV4, GsoType.TCPV6, GsoType.UDP, GsoType.UDP_L4][vnet.gso_type % 4]
        tcp = gt in (GsoType.TCPV4, GsoType.TCPV6)
        vnet = VnetHdr(VnetFlag.NEEDS_CSUM, gt, 0, mss, l4, 16 if tcp else 6)
    _only_decode_errors(bytes(b), vnet)
