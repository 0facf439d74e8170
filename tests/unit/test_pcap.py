"""Unit tests of sttun.io.pcap: hand-built capture files, every error path, round trips."""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sttun.errors import CaptureError, EncodeError
from sttun.io.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    CaptureReader,
    PcapWriter,
    l3_offset,
    read_packets,
)

T0 = 1_700_000_000  # seconds

# --- builders (hand-written encoders, independent of the code under test) ---------


def pcap_file(
    bo: str,
    records: list[tuple[int, int, bytes, int]],
    *,
    nano: bool = False,
    linktype: int = 1,
    snaplen: int = 262144,
) -> bytes:
    """Classic pcap: records are (sec, frac, data, orig_len)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(bo + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for sec, frac, data, orig in records:
        out += struct.pack(bo + "IIII", sec, frac, len(data), orig) + data
    return out


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def block(bo: str, btype: int, body: bytes) -> bytes:
    body = pad4(body)
    blen = 12 + len(body)
    return struct.pack(bo + "II", btype, blen) + body + struct.pack(bo + "I", blen)


def shb(bo: str, major: int = 1) -> bytes:
    return block(bo, 0x0A0D0D0A, struct.pack(bo + "IHHq", 0x1A2B3C4D, major, 0, -1))


def opt(bo: str, code: int, value: bytes) -> bytes:
    return struct.pack(bo + "HH", code, len(value)) + pad4(value)


def idb(bo: str, linktype: int, snaplen: int = 0, opts: bytes = b"") -> bytes:
    if opts:
        opts += opt(bo, 0, b"")
    return block(bo, 1, struct.pack(bo + "HHI", linktype, 0, snaplen) + opts)


def epb(bo: str, ifid: int, ts: int, data: bytes, orig: int | None = None) -> bytes:
    orig = len(data) if orig is None else orig
    hdr = struct.pack(bo + "IIIII", ifid, ts >> 32, ts & 0xFFFFFFFF, len(data), orig)
    return block(bo, 6, hdr + data)


def spb(bo: str, data: bytes, orig: int | None = None) -> bytes:
    orig = len(data) if orig is None else orig
    return block(bo, 3, struct.pack(bo + "I", orig) + data)


def obsolete_pb(bo: str, ifid: int, ts: int, data: bytes) -> bytes:
    hdr = struct.pack(bo + "HHIIII", ifid, 0, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data))
    return block(bo, 2, hdr + data)


def read_all(data: bytes, **kw: object) -> tuple[list[tuple[int, int, bytes, int]], CaptureReader]:
    reader = CaptureReader(io.BytesIO(data), **kw)  # type: ignore[arg-type]
    out = [(ts, lt, bytes(d), orig) for ts, lt, d, orig in reader]
    return out, reader


def write_file(tmp_path: Path, data: bytes, name: str = "capture.pcap") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


FRAME = bytes(range(60))

# --- classic pcap --------------------------------------------------------------------


def test_classic_literal_little_endian_vector() -> None:
    raw = bytes.fromhex(
        "d4c3b2a1 0200 0400 00000000 00000000 ffff0000 01000000"  # header, snaplen 65535
        "01000000 02000000 03000000 05000000 aabbcc"  # 1 s 2 us, incl 3, orig 5
    )
    pkts, reader = read_all(raw)
    assert pkts == [(1_000_002_000, 1, b"\xaa\xbb\xcc", 5)]
    assert reader.format == "pcap" and reader.snaplen == 65535 and not reader.nanosecond
    assert reader.truncated is None


@pytest.mark.parametrize("bo", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_classic_byte_orders_and_resolutions(bo: str, nano: bool) -> None:
    recs = [(T0, 123456, FRAME, 60), (T0 + 1, 999999, b"\x01" * 1514, 9000), (T0 + 2, 0, b"", 0)]
    pkts, reader = read_all(pcap_file(bo, recs, nano=nano))
    unit = 1 if nano else 1000
    assert pkts == [(s * 10**9 + f * unit, 1, d, o) for s, f, d, o in recs]
    assert reader.nanosecond is nano
    assert reader.linktype == 1


def test_classic_fcs_bits_are_masked_off_the_link_type() -> None:
    pkts, reader = read_all(pcap_file("<", [(T0, 0, FRAME, 60)], linktype=0x1000_0001))
    assert reader.linktype == 1 and pkts[0][1] == 1


def test_classic_many_records_across_small_chunks_and_a_record_bigger_than_a_chunk() -> None:
    recs = [(T0, i, bytes([i % 256]) * (i * 37 % 3000), 3000) for i in range(500)]
    recs.insert(250, (T0, 7, b"\x55" * 20000, 20000))
    pkts, _ = read_all(pcap_file("<", recs), chunk_size=4096)
    assert [(p[2], p[3]) for p in pkts] == [(d, o) for _, _, d, o in recs]


def test_views_are_read_only_and_stay_valid_after_refills() -> None:
    recs = [(T0, i, bytes([i]) * 1000, 1000) for i in range(50)]
    reader = CaptureReader(io.BytesIO(pcap_file("<", recs)), chunk_size=4096)
    views = [d for _, _, d, _ in reader]
    assert [bytes(v) for v in views] == [d for _, _, d, _ in recs]
    assert views[0].readonly
    with pytest.raises(TypeError):
        views[0][0] = 1  # type: ignore[index]


def test_reader_from_path_closes_its_file(tmp_path: Path) -> None:
    path = write_file(tmp_path, pcap_file("<", [(T0, 0, FRAME, 60)]))
    with CaptureReader(path) as reader:
        assert [bytes(p[2]) for p in reader] == [FRAME]
    assert reader._file.closed  # type: ignore[attr-defined]
    assert [bytes(p[2]) for p in read_packets(str(path))] == [FRAME]


def test_reader_iterates_once() -> None:
    reader = CaptureReader(io.BytesIO(pcap_file("<", [])))
    assert list(reader) == []
    with pytest.raises(RuntimeError):
        iter(reader)


# --- pcapng --------------------------------------------------------------------------


def test_pcapng_literal_little_endian_vector() -> None:
    raw = bytes.fromhex(
        # SHB: type, len 28, BOM, v1.0, section length -1, len
        "0a0d0d0a 1c000000 4d3c2b1a 0100 0000 ffffffffffffffff 1c000000"
        # IDB: type 1, len 20, linktype 1, reserved, snaplen 0, len
        "01000000 14000000 0100 0000 00000000 14000000"
        # EPB: type 6, len 36, if 0, ts hi 0, ts lo 1000001, cap 3, orig 4, data+pad, len
        "06000000 24000000 00000000 00000000 41420f00 03000000 04000000 010203 00 24000000"
    )
    pkts, reader = read_all(raw)
    assert pkts == [(1_000_001_000, 1, b"\x01\x02\x03", 4)]
    assert reader.format == "pcapng" and reader.linktype == 1 and reader.truncated is None


@pytest.mark.parametrize("bo", ["<", ">"])
def test_pcapng_byte_orders_default_resolution_is_microseconds(bo: str) -> None:
    ts = T0 * 10**6 + 654321
    raw = shb(bo) + idb(bo, 1) + epb(bo, 0, ts, FRAME, 1500) + epb(bo, 0, ts + 1, b"xyz")
    pkts, _ = read_all(raw)
    assert pkts == [(ts * 1000, 1, FRAME, 1500), ((ts + 1) * 1000, 1, b"xyz", 3)]


@pytest.mark.parametrize(
    ("tsresol", "raw_ts", "ns"),
    [
        (9, 1_234_567_891, 1_234_567_891),  # 10^-9
        (3, 1500, 1_500_000_000),  # 10^-3
        (0, 7, 7_000_000_000),  # 10^0
        (12, 1_234_567_891_999, 1_234_567_891),  # 10^-12: picoseconds, floored
        (0x80 | 20, 3 << 20, 3_000_000_000),  # 2^-20
        (0x80 | 10, 1, 976562),  # 2^-10 s = 976562.5 ns, floored
        (0x80 | 0, 2, 2_000_000_000),  # 2^0
    ],
)
@pytest.mark.parametrize("bo", ["<", ">"])
def test_pcapng_if_tsresol(bo: str, tsresol: int, raw_ts: int, ns: int) -> None:
    opts = opt(bo, 2, b"veth0") + opt(bo, 9, bytes([tsresol]))  # if_name before if_tsresol
    pkts, _ = read_all(shb(bo) + idb(bo, 1, opts=opts) + epb(bo, 0, raw_ts, FRAME))
    assert pkts[0][0] == ns


def test_pcapng_if_tsoffset_adds_seconds() -> None:
    opts = opt("<", 14, struct.pack("<q", 100)) + opt("<", 9, b"\x09")
    pkts, _ = read_all(shb("<") + idb("<", 1, opts=opts) + epb("<", 0, 5, FRAME))
    assert pkts[0][0] == 100 * 10**9 + 5


@pytest.mark.parametrize("bo", ["<", ">"])
def test_pcapng_simple_packet_blocks(bo: str) -> None:
    raw = (
        shb(bo)
        + idb(bo, LINKTYPE_RAW, snaplen=4)
        + spb(bo, b"\x45\x00\x00", orig=3)  # padded to 4
        + spb(bo, b"\x45\x00\x00\x99", orig=1500)  # cut by the snaplen
    )
    pkts, _ = read_all(raw)
    assert pkts == [(0, 101, b"\x45\x00\x00", 3), (0, 101, b"\x45\x00\x00\x99", 1500)]


def test_pcapng_simple_packet_block_without_snaplen_uses_orig_len() -> None:
    pkts, _ = read_all(shb("<") + idb("<", 1) + spb("<", b"abcde", orig=5))
    assert pkts == [(0, 1, b"abcde", 5)]


@pytest.mark.parametrize("bo", ["<", ">"])
def test_pcapng_obsolete_packet_block(bo: str) -> None:
    pkts, _ = read_all(shb(bo) + idb(bo, 1) + obsolete_pb(bo, 0, 2_000_000, FRAME))
    assert pkts == [(2_000_000_000, 1, FRAME, 60)]


def test_pcapng_several_interfaces_with_different_link_types() -> None:
    raw = (
        shb("<")
        + idb("<", LINKTYPE_ETHERNET)
        + idb("<", LINKTYPE_LINUX_SLL, opts=opt("<", 9, b"\x09"))
        + epb("<", 1, 5, b"sll")
        + idb("<", LINKTYPE_LINUX_SLL2)
        + epb("<", 0, 5, b"eth")
        + epb("<", 2, 5, b"sll2")
    )
    pkts, reader = read_all(raw)
    assert pkts == [(5, 113, b"sll", 3), (5000, 1, b"eth", 3), (5000, 276, b"sll2", 4)]
    assert reader.linktype == 1


def test_pcapng_unknown_blocks_are_skipped() -> None:
    raw = (
        shb("<")
        + block("<", 0x00000004, b"\x00" * 8)  # name resolution block
        + idb("<", 1)
        + block("<", 0x00000005, b"\x00" * 12)  # interface statistics
        + block("<", 0x40000BAD, b"custom!")  # custom block, padded
        + epb("<", 0, 1, FRAME)
        + block("<", 0x12345678, b"")  # empty unknown block (12 bytes)
    )
    pkts, _ = read_all(raw)
    assert [p[2] for p in pkts] == [FRAME]


def test_pcapng_several_sections_in_both_byte_orders_reset_interfaces() -> None:
    raw = (
        shb("<")
        + idb("<", 1)
        + idb("<", 113)
        + epb("<", 1, 1, b"a")
        + shb(">")
        + idb(">", 276)
        + epb(">", 0, 2, b"b")
        + shb("<")
        + idb("<", 101)
        + epb("<", 0, 3, b"c")
    )
    pkts, _ = read_all(raw)
    assert pkts == [(1000, 113, b"a", 1), (2000, 276, b"b", 1), (3000, 101, b"c", 1)]


def test_pcapng_big_endian_section_whose_length_looks_small_in_little_endian() -> None:
    # A 256-byte block swapped reads as 65536: the SHB must be parsed from its BOM.
    raw = shb("<") + idb("<", 1) + epb("<", 0, 1, b"a")
    raw += block(">", 0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1) + b"\0" * 228)
    raw += idb(">", 1) + epb(">", 0, 2, b"b")
    pkts, _ = read_all(raw)
    assert [p[2] for p in pkts] == [b"a", b"b"]


def test_pcapng_many_blocks_across_small_chunks() -> None:
    datas = [bytes([i % 256]) * (i * 53 % 2500) for i in range(400)]
    datas.insert(200, b"\x77" * 30000)
    raw = shb("<") + idb("<", 1)
    raw += b"".join(epb("<", 0, i, d, len(d) + i) for i, d in enumerate(datas))
    pkts, _ = read_all(raw, chunk_size=4096)
    assert pkts == [(i * 1000, 1, d, len(d) + i) for i, d in enumerate(datas)]


# --- errors --------------------------------------------------------------------------


def check_error(tmp_path: Path, data: bytes, message: str, **kw: object) -> None:
    path = write_file(tmp_path, data)
    with pytest.raises(CaptureError) as err:
        list(CaptureReader(path, **kw))  # type: ignore[arg-type]
    assert str(err.value) == f"{path}: {message}"


def test_empty_file(tmp_path: Path) -> None:
    check_error(tmp_path, b"", "byte 0: empty file (0 bytes), not a capture file")


def test_unknown_magic(tmp_path: Path) -> None:
    check_error(
        tmp_path,
        b"\x1f\x8b\x08\x00rest",
        "byte 0: unknown magic 0x1f8b0800: not a pcap or pcapng file",
    )
    check_error(tmp_path, b"ab", "byte 0: unknown magic 0x6162: not a pcap or pcapng file")


def test_modified_pcap_magic(tmp_path: Path) -> None:
    check_error(
        tmp_path,
        b"\x34\xcd\xb2\xa1" + b"\0" * 20,
        "byte 0: unsupported capture format (Kuznetzov modified pcap)",
    )


def test_truncated_pcap_header(tmp_path: Path) -> None:
    check_error(
        tmp_path,
        pcap_file("<", [])[:10],
        "byte 0: truncated pcap file header: need 24 bytes, have 10",
    )


def test_record_length_exceeding_the_limit(tmp_path: Path) -> None:
    raw = pcap_file("<", [(T0, 0, FRAME, 60)])
    bad = raw + struct.pack("<IIII", T0, 0, 0xFFFFFFFF, 60) + b"x" * 100
    check_error(
        tmp_path,
        bad,
        "byte 100: record length 4294967295 exceeds 1048576 (4 * max(snaplen 262144, 65535))",
    )
    # a small snaplen still allows 4 * 65535, a huge one is capped at 64 MiB
    small = pcap_file("<", [], snaplen=96) + struct.pack("<IIII", T0, 0, 262141, 1) + b"x"
    check_error(
        tmp_path, small, "byte 24: record length 262141 exceeds 262140 (4 * max(snaplen 96, 65535))"
    )
    huge = pcap_file(">", [], snaplen=0xFFFFFFFF) + struct.pack(">IIII", T0, 0, 1 << 27, 1)
    check_error(
        tmp_path,
        huge,
        "byte 24: record length 134217728 exceeds 67108864 (4 * max(snaplen 4294967295, 65535))",
    )


def test_unsupported_link_type_in_pcap(tmp_path: Path) -> None:
    raw = pcap_file("<", [(T0, 0, FRAME, 60)], linktype=105)
    check_error(tmp_path, raw, "byte 20: file has unsupported link type 105")
    pkts, _ = read_all(raw, linktypes=None)
    assert pkts[0][1] == 105


def test_cut_last_record_is_flagged_not_raised(tmp_path: Path) -> None:
    raw = pcap_file("<", [(T0, 0, FRAME, 60), (T0, 1, FRAME, 60)])
    path = write_file(tmp_path, raw[:-10])
    reader = CaptureReader(path)
    assert [bytes(p[2]) for p in reader] == [FRAME]
    assert str(reader.truncated) == f"{path}: byte 100: last record cut off (50 of 60 data bytes)"
    with pytest.raises(CaptureError) as err:
        list(CaptureReader(path, strict=True))
    assert str(err.value) == str(reader.truncated)
    # read_packets is strict, but yields the whole packets first
    got = []
    with pytest.raises(CaptureError):
        for pkt in read_packets(path):
            got.append(bytes(pkt[2]))
    assert got == [FRAME]


def test_cut_last_record_header(tmp_path: Path) -> None:
    raw = pcap_file(">", [(T0, 0, FRAME, 60)]) + b"\0" * 7
    path = write_file(tmp_path, raw)
    reader = CaptureReader(path)
    assert len(list(reader)) == 1
    assert str(reader.truncated) == f"{path}: byte 100: last record header cut off (7 of 16 bytes)"


def test_pcapng_errors(tmp_path: Path) -> None:
    head = shb("<") + idb("<", 1)  # 48 bytes
    good = epb("<", 0, 1, FRAME)
    # length not a multiple of 4
    bad_len = bytearray(good)
    bad_len[4:8] = struct.pack("<I", 30)
    check_error(
        tmp_path,
        head + bad_len,
        "byte 52: corrupt block length 30 (block type 0x00000006):"
        " must be a multiple of 4 between 12 and 67108864",
    )
    # length below 12
    check_error(
        tmp_path,
        head + struct.pack("<II", 6, 8) + b"\0" * 8,
        "byte 52: corrupt block length 8 (block type 0x00000006):"
        " must be a multiple of 4 between 12 and 67108864",
    )
    # absurd length
    check_error(
        tmp_path,
        head + struct.pack("<II", 6, 0xFFFFFFFC),
        "byte 52: corrupt block length 4294967292 (block type 0x00000006):"
        " must be a multiple of 4 between 12 and 67108864",
    )
    # trailing length differs from the leading one
    bad_trailer = bytearray(good)
    bad_trailer[-4:] = struct.pack("<I", 12)
    check_error(
        tmp_path,
        head + good + bad_trailer,
        f"byte {48 + 2 * len(good) - 4}: corrupt block: trailing length 12"
        f" != leading length {len(good)} (block type 0x00000006)",
    )
    # captured length past the block
    bad_cap = bytearray(good)
    bad_cap[20:24] = struct.pack("<I", 61)
    check_error(
        tmp_path, head + bad_cap, "byte 68: captured length 61 exceeds the block (92 bytes)"
    )
    # packet on an interface never described
    check_error(
        tmp_path,
        head + epb("<", 3, 1, FRAME),
        "byte 56: packet on interface 3 but only 1 interface(s) described",
    )
    # simple packet block with no interface
    check_error(
        tmp_path, shb("<") + spb("<", FRAME), "byte 28: simple packet block before any interface"
    )
    # bad byte-order magic in a later section
    bad_shb = bytearray(shb("<"))
    bad_shb[8:12] = b"\x11\x22\x33\x44"
    check_error(tmp_path, head + bad_shb, "byte 56: bad section header byte-order magic 0x11223344")
    check_error(tmp_path, shb(">", major=2), "byte 12: unsupported pcapng major version 2")
    # unsupported link type on an interface
    check_error(
        tmp_path,
        shb("<") + idb("<", 1) + idb("<", 147),
        "byte 56: interface 1 has unsupported link type 147",
    )
    # option running past the block
    bad_opt = bytearray(idb("<", 1, opts=opt("<", 9, b"\x09")))
    bad_opt[18:20] = struct.pack("<H", 200)
    check_error(
        tmp_path, shb("<") + bad_opt, "byte 44: interface 0 option 9 length 200 runs past the block"
    )
    check_error(
        tmp_path,
        shb("<") + idb("<", 1, opts=opt("<", 9, b"\x7f")),
        "byte 28: interface 0 if_tsresol 127 out of range",
    )


def test_pcapng_cut_section_header(tmp_path: Path) -> None:
    check_error(
        tmp_path, shb("<")[:11], "byte 0: truncated pcapng section header: need 12 bytes, have 11"
    )
    raw = shb("<") + idb("<", 1) + epb("<", 0, 1, FRAME)
    path = write_file(tmp_path, raw + shb(">")[:10])
    reader = CaptureReader(path)
    assert len(list(reader)) == 1
    assert str(reader.truncated) == f"{path}: byte 140: last block header cut off (10 of 12 bytes)"
    path = write_file(tmp_path, raw + shb(">")[:20])
    reader = CaptureReader(path)
    assert len(list(reader)) == 1
    assert str(reader.truncated) == (
        f"{path}: byte 140: last block cut off (20 of 28 bytes, block type 0x0a0d0d0a)"
    )


def test_pcapng_cut_last_block(tmp_path: Path) -> None:
    raw = shb("<") + idb("<", 1) + epb("<", 0, 1, FRAME) + epb("<", 0, 2, FRAME)
    path = write_file(tmp_path, raw[:-1], "capture.pcapng")
    reader = CaptureReader(path)
    assert [p[0] for p in reader] == [1000]
    assert str(reader.truncated) == (
        f"{path}: byte 140: last block cut off (91 of 92 bytes, block type 0x00000006)"
    )
    path = write_file(tmp_path, raw[:-90], "capture.pcapng")
    reader = CaptureReader(path)
    assert len(list(reader)) == 1
    assert str(reader.truncated) == f"{path}: byte 140: last block header cut off (2 of 8 bytes)"
    with pytest.raises(CaptureError, match="last block header cut off"):
        list(CaptureReader(path, strict=True))


def test_epb_with_bad_trailer_in_fast_path_is_not_silently_accepted(tmp_path: Path) -> None:
    good = epb("<", 0, 1, FRAME)
    bad = bytearray(good)
    bad[-4:] = b"\0\0\0\0"
    path = write_file(tmp_path, shb("<") + idb("<", 1) + good * 3 + bad + good)
    reader = CaptureReader(path)
    got = []
    with pytest.raises(CaptureError, match="trailing length 0 != leading length 92"):
        for pkt in reader:
            got.append(pkt)
    assert len(got) == 3


# --- l3_offset -----------------------------------------------------------------------

ETH = b"\x02" * 6 + b"\x04" * 6
IP4 = b"\x45" + b"\0" * 19
IP6 = b"\x60" + b"\0" * 39


@pytest.mark.parametrize(
    ("linktype", "data", "expected"),
    [
        (1, ETH + b"\x08\x00" + IP4, (0x0800, 14)),
        (1, ETH + b"\x86\xdd" + IP6, (0x86DD, 14)),
        (1, ETH + b"\x08\x06" + b"\0" * 28, (0x0806, 14)),  # ARP: caller decides
        (1, ETH + b"\x81\x00\x00\x05\x08\x00" + IP4, (0x0800, 18)),  # 802.1Q
        (1, ETH + b"\x88\xa8\x00\x05\x81\x00\x00\x06\x86\xdd" + IP6, (0x86DD, 22)),  # QinQ
        (1, ETH + b"\x91\x00\x00\x05\x08\x00" + IP4, (0x0800, 18)),
        (1, ETH + b"\x00\x2e" + b"\0" * 46, None),  # 802.3 length field
        (1, ETH + b"\x08\x00", None),  # nothing after the header
        (1, ETH[:10], None),
        (1, ETH + b"\x81\x00\x00\x05", None),  # tag with nothing inside
        (1, ETH + b"\x81\x00\x00\x05\x08\x00", None),
        (113, b"\0" * 14 + b"\x08\x00" + IP4, (0x0800, 16)),
        (113, b"\0" * 14 + b"\x81\x00\x00\x07\x86\xdd" + IP6, (0x86DD, 20)),
        (113, b"\0" * 14 + b"\x00\x04" + b"\0" * 20, None),  # SLL 802.2 pseudo-protocol
        (113, b"\0" * 15, None),
        (276, b"\x86\xdd" + b"\0" * 18 + IP6, (0x86DD, 20)),
        (276, b"\x81\x00" + b"\0" * 18 + b"\x00\x07\x08\x00" + IP4, (0x0800, 24)),
        (276, b"\x08\x00" + b"\0" * 17, None),
        (101, IP4, (0x0800, 0)),
        (101, IP6, (0x86DD, 0)),
        (101, b"\x50" + b"\0" * 19, None),
        (12, IP4, (0x0800, 0)),
        (14, IP6, (0x86DD, 0)),
        (228, IP4, (0x0800, 0)),
        (228, IP6, None),
        (229, IP6, (0x86DD, 0)),
        (229, IP4, None),
        (101, b"", None),
        (105, IP4, None),  # 802.11: not usable
    ],
)
def test_l3_offset(linktype: int, data: bytes, expected: tuple[int, int] | None) -> None:
    assert l3_offset(linktype, data) == expected
    assert l3_offset(linktype, memoryview(data)) == expected


# --- writer --------------------------------------------------------------------------


def test_writer_header_and_record_bytes(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    with PcapWriter(path) as w:
        w.write(1_000_002_999, b"\xaa\xbb\xcc", orig_len=5)
    assert path.read_bytes() == bytes.fromhex(
        "d4c3b2a1 0200 0400 00000000 00000000 00000400 01000000"
        "01000000 02000000 03000000 05000000 aabbcc"
    )
    assert w.packets == 1


def test_writer_nanosecond_and_link_type(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    with PcapWriter(path, nanosecond=True, linktype=LINKTYPE_RAW) as w:
        w.write(T0 * 10**9 + 123456789, memoryview(IP4))
    pkts = list(read_packets(path))
    assert [(p[0], p[1], bytes(p[2]), p[3]) for p in pkts] == [
        (T0 * 10**9 + 123456789, 101, IP4, 20)
    ]
    assert path.read_bytes()[:4] == b"\x4d\x3c\xb2\xa1"


def test_writer_cuts_data_to_the_snaplen(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    with PcapWriter(path, snaplen=100) as w:
        w.write(0, bytearray(b"\x01" * 150))
    (pkt,) = list(read_packets(path))
    assert bytes(pkt[2]) == b"\x01" * 100 and pkt[3] == 150


def test_writer_to_file_object_buffers_and_flushes() -> None:
    out = io.BytesIO()
    w = PcapWriter(out, buffer_size=1 << 20)
    w.write(0, FRAME)
    assert out.getvalue() == b""  # still buffered
    w.flush()
    assert len(out.getvalue()) == 24 + 16 + 60
    w.close()
    w.close()  # idempotent
    assert not out.closed  # caller's object left open
    with pytest.raises(ValueError, match="closed"):
        w.write(0, FRAME)


def test_writer_small_buffer_writes_whole_records() -> None:
    out = io.BytesIO()
    with PcapWriter(out, buffer_size=1) as w:
        for i in range(10):
            w.write(i * 1000, FRAME)
            assert (len(out.getvalue()) - 24) % 76 == 0
    pkts, _ = read_all(out.getvalue())
    assert len(pkts) == 10


def test_writer_rejects_bad_values(tmp_path: Path) -> None:
    w = PcapWriter(io.BytesIO())
    with pytest.raises(EncodeError, match="timestamp -1 ns out of range"):
        w.write(-1, FRAME)
    with pytest.raises(EncodeError, match="out of range"):
        w.write(2**32 * 10**9, FRAME)
    with pytest.raises(EncodeError, match="link type 70000"):
        PcapWriter(io.BytesIO(), linktype=70000)
    with pytest.raises(EncodeError, match="snaplen 0"):
        PcapWriter(io.BytesIO(), snaplen=0)


class NotABuffer:
    """Has a length but no buffer: appending it fails after the header went in."""

    def __len__(self) -> int:
        return 10


def test_failed_write_leaves_no_half_record() -> None:
    out = io.BytesIO()
    with PcapWriter(out) as w:
        w.write(0, FRAME)
        with pytest.raises(TypeError):
            w.write(1, NotABuffer())  # type: ignore[arg-type]
        w.write(2000, FRAME)
    pkts, reader = read_all(out.getvalue())
    assert [p[0] for p in pkts] == [0, 2000] and reader.truncated is None


def test_keyboard_interrupt_leaves_a_valid_capture(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    with pytest.raises(KeyboardInterrupt), PcapWriter(path) as w:
        for i in range(1000):
            w.write(i, FRAME)
            if i == 500:
                raise KeyboardInterrupt
    reader = CaptureReader(path, strict=True)
    assert len(list(reader)) == 501


# --- round trips -----------------------------------------------------------------------

packets = st.lists(
    st.tuples(st.integers(0, 2**32 * 10**9 - 1), st.binary(max_size=300)), max_size=30
)


@given(packets, st.booleans(), st.sampled_from([4096, 1 << 20]))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_writer_to_reader(pkts: list[tuple[int, bytes]], nano: bool, chunk: int) -> None:
    out = io.BytesIO()
    with PcapWriter(out, nanosecond=nano) as w:
        for ts, data in pkts:
            w.write(ts, data)
    got, reader = read_all(out.getvalue(), chunk_size=chunk)
    step = 1 if nano else 1000
    assert got == [(ts - ts % step, 1, data, len(data)) for ts, data in pkts]
    assert reader.truncated is None


@given(
    st.sampled_from(["<", ">"]),
    st.sampled_from([6, 9, 3, 0x80 | 30, 0x80 | 7]),
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=200)), max_size=20),
)
def test_round_trip_pcapng_vectors(bo: str, tsresol: int, pkts: list[tuple[int, bytes]]) -> None:
    raw = shb(bo) + idb(bo, 1, opts=opt(bo, 9, bytes([tsresol])))
    raw += b"".join(epb(bo, 0, ts, d) for ts, d in pkts)
    got, _ = read_all(raw, chunk_size=4096)
    if tsresol & 0x80:
        expect = [ts * 10**9 >> (tsresol & 0x7F) for ts, _ in pkts]
    else:
        expect = [ts * 10**9 // 10**tsresol for ts, _ in pkts]
    assert [g[0] for g in got] == expect
    assert [(g[1], g[2], g[3]) for g in got] == [(1, d, len(d)) for _, d in pkts]


@given(st.lists(st.binary(max_size=100), min_size=1, max_size=10), st.data())
def test_any_cut_yields_the_whole_records_before_it(pkts: list[bytes], data: st.DataObject) -> None:
    raw = pcap_file("<", [(T0, 0, d, len(d)) for d in pkts])
    cut = data.draw(st.integers(24, len(raw)))
    got, reader = read_all(raw[:cut])
    ends = [24]
    for d in pkts:
        ends.append(ends[-1] + 16 + len(d))
    whole = sum(1 for e in ends[1:] if e <= cut)
    assert [g[2] for g in got] == pkts[:whole]
    assert (reader.truncated is None) == (cut in ends)


@given(st.binary(max_size=400), st.sampled_from(["pcap", "pcapng"]))
def test_garbage_after_a_valid_header_only_raises_capture_error(body: bytes, fmt: str) -> None:
    head = pcap_file("<", []) if fmt == "pcap" else shb("<") + idb("<", 1)
    with contextlib.suppress(CaptureError):
        read_all(head + body, chunk_size=4096)
