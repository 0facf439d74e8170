"""``sttun decap``: crafted captures, every drop reason, bad input files, outputs.

Segments are built here byte by byte with the independent helpers of
``tests/netns.py`` (not with sttun's codecs), written with sttun's pcap writer, and
the CLI is run as a subprocess: ``python -m sttun decap ... --json``.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.netns import ipv4_header, ipv6_header, ones_sum, pseudo_sum

from sttun.io.pcap import CaptureReader, PcapWriter

SRC, DST = "198.18.0.1", "198.18.0.2"
SRC6, DST6 = "2001:db8:0:1::1", "2001:db8:0:1::2"
OUTER_ETH = bytes.fromhex("020000000002020000000001")
TS0 = 1_700_000_000 * 10**9


# ----------------------------------------------------------------------- builders
def stt_header(ctx: int, *, flags: int = 0, l4: int = 0, mss: int = 0, tci: int = 0,
               version: int = 0) -> bytes:  # fmt: skip
    """The 18-byte STT frame header."""
    return struct.pack("!BBBBHHQH", version, flags, l4, 0, mss, tci, ctx, 0)


def inner_udp(n: int, fill: int = 0x41, *, src: str = "192.0.2.1", dst: str = "192.0.2.2") -> bytes:
    """An Ethernet/IPv4/UDP frame of ``n`` bytes with valid checksums."""
    payload = bytes([fill]) * (n - 42)
    ip = ipv4_header(src, dst, 8 + len(payload), proto=17)
    udp = bytearray(struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0))
    ph = ones_sum(ip[12:20] + struct.pack("!BBH", 0, 17, len(udp) + len(payload)))
    c = ~ones_sum(bytes(udp) + payload, ph) & 0xFFFF
    struct.pack_into("!H", udp, 6, c or 0xFFFF)
    return bytes.fromhex("02000000000b02000000000a0800") + ip + bytes(udp) + payload


def segment(
    payload: bytes,
    *,
    length: int,
    offset: int = 0,
    ack: int = 1,
    src: str = SRC,
    dst: str = DST,
    sport: int = 40000,
    dport: int = 7471,
    doff: int = 5,
    flags: int = 0x18,
    corrupt: bool = False,
    partial: bool = False,
    l2: bytes | None = None,
) -> bytes:
    """One outer packet: Ethernet (or ``l2``) + IPv4/IPv6 + TCP-like header + payload."""
    v6 = ":" in src
    options = b"\0" * (4 * (doff - 5)) if doff > 5 else b""
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH", sport, dport, (length << 16) | offset, ack, doff << 4, flags, 0, 0, 0
        )
        + options
    )
    tcp_len = len(tcp) + len(payload)
    if partial:
        struct.pack_into("!H", tcp, 16, pseudo_sum(src, dst, tcp_len))
    else:
        c = ~ones_sum(bytes(tcp) + payload, pseudo_sum(src, dst, tcp_len)) & 0xFFFF
        struct.pack_into("!H", tcp, 16, c ^ (0x0101 if corrupt else 0))
    ip = ipv6_header(src, dst, tcp_len) if v6 else ipv4_header(src, dst, tcp_len)
    if l2 is None:
        l2 = OUTER_ETH + (b"\x86\xdd" if v6 else b"\x08\x00")
    return l2 + ip + bytes(tcp) + payload


def segments_of(frame: bytes, *, ack: int = 1, size: int = 1460, **kw: Any) -> list[bytes]:
    """The segments of an STT frame (header + inner), ``size`` payload bytes each."""
    return [
        segment(frame[off : off + size], length=len(frame), offset=off, ack=ack, **kw)
        for off in range(0, len(frame), size)
    ]


def write_pcap(path: Path, packets: list[bytes | tuple[int, bytes]], linktype: int = 1,
               snaplen: int = 262144) -> Path:  # fmt: skip
    """Packets (or (ts_ns, packet) pairs) 1 µs apart into a classic pcap."""
    with PcapWriter(path, linktype=linktype, nanosecond=True, snaplen=snaplen) as w:
        for i, p in enumerate(packets):
            if isinstance(p, tuple):
                w.write(p[0], p[1])
            else:
                w.write(TS0 + i * 1000, p)
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m sttun ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "sttun", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def decap_json(cap: Path, tmp: Path, *extra: str | Path) -> dict[str, Any]:
    """Run ``sttun decap CAP -o tmp/out.pcap --json``; the parsed summary."""
    p = run("decap", cap, "-o", tmp / "out.pcap", "--json", *extra)
    assert p.returncode == 0, p.stderr
    data: dict[str, Any] = json.loads(p.stdout)
    return data


def frames_of(path: Path) -> list[tuple[int, bytes]]:
    """(timestamp, bytes) of every packet of a capture."""
    with CaptureReader(path, strict=True) as r:
        return [(ts, bytes(d)) for ts, _lt, d, _o in r]


# ----------------------------------------------------------------------- basics
def test_multi_segment_frames_come_back_with_completing_timestamp(tmp_path: Path) -> None:
    inner1, inner2 = inner_udp(4000, 0x31), inner_udp(60, 0x32)
    segs1 = segments_of(stt_header(7) + inner1, ack=10)
    segs2 = segments_of(stt_header(7) + inner2, ack=11)
    pkts = [(TS0 + i * 5000, p) for i, p in enumerate(segs1 + segs2)]
    cap = write_pcap(tmp_path / "in.pcap", pkts)  # type: ignore[arg-type]
    s = decap_json(cap, tmp_path)
    assert (s["segments"], s["frames"], s["written"]) == (4, 2, 2)
    assert s["contexts"] == [{"context_id": 7, "hex": "0x7", "frames": 2,
                              "bytes": len(inner1) + len(inner2)}]  # fmt: skip
    assert s["drops"] == {} and s["checksums"]["verified"] == 4
    out = frames_of(tmp_path / "out.pcap")
    assert out == [(TS0 + 2 * 5000, inner1), (TS0 + 3 * 5000, inner2)]


def test_interleaved_and_reordered_segments(tmp_path: Path) -> None:
    a = segments_of(stt_header(1) + inner_udp(3000, 1), ack=1)
    b = segments_of(stt_header(2) + inner_udp(3000, 2), ack=2)
    order = [a[2], b[0], a[0], b[2], b[1], a[1]]
    s = decap_json(write_pcap(tmp_path / "in.pcap", order), tmp_path)  # type: ignore[arg-type]
    assert s["written"] == 2 and s["drops"] == {}
    got = {f[1] for f in frames_of(tmp_path / "out.pcap")}
    assert got == {inner_udp(3000, 1), inner_udp(3000, 2)}


def test_ipv6_outer_vlan_tagged_outer_and_other_traffic(tmp_path: Path) -> None:
    inner = inner_udp(2000)
    v6 = segments_of(stt_header(3) + inner, src=SRC6, dst=DST6)
    tagged_l2 = OUTER_ETH + b"\x81\x00\x00\x0a\x08\x00"  # outer 802.1Q VLAN 10
    tagged = segments_of(stt_header(4) + inner, ack=2, l2=tagged_l2)
    other_port = segment(b"x" * 30, length=30, dport=80)
    arp = OUTER_ETH + b"\x08\x06" + b"\0" * 28
    udp = OUTER_ETH + b"\x08\x00" + ipv4_header(SRC, DST, 8, proto=17) + b"\0" * 8
    cap = write_pcap(tmp_path / "in.pcap", [*v6, other_port, arp, udp, *tagged])
    s = decap_json(cap, tmp_path)
    assert s["skipped"] == {"not_ip": 1, "not_tcp": 1, "other_port": 1}
    assert [c["context_id"] for c in s["contexts"]] == [3, 4]
    assert [f[1] for f in frames_of(tmp_path / "out.pcap")] == [inner, inner]


@pytest.mark.parametrize("linktype", [113, 276, 101, 228])
def test_cooked_and_raw_link_types(tmp_path: Path, linktype: int) -> None:
    inner = inner_udp(1800)
    pkts = []
    for p in segments_of(stt_header(9) + inner):
        ip = p[14:]
        if linktype == 113:  # SLL: type, arphrd, addr len, addr(8), protocol
            ip = struct.pack("!HHH8sH", 0, 1, 6, b"\2" * 6 + b"\0\0", 0x0800) + ip
        elif linktype == 276:  # SLL2: protocol, reserved, ifindex, arphrd, type, len, addr
            ip = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\2" * 6 + b"\0\0") + ip
        pkts.append(ip)
    s = decap_json(write_pcap(tmp_path / "in.pcap", pkts, linktype=linktype), tmp_path)
    assert s["written"] == 1 and s["drops"] == {}
    assert frames_of(tmp_path / "out.pcap")[0][1] == inner


def test_vlan_from_header_reinserted_and_partial_checksum_completed(tmp_path: Path) -> None:
    inner = bytearray(inner_udp(300))
    # P set (IPv4, UDP), L4 offset 34: the UDP checksum field holds the pseudo sum.
    good = bytes(inner)
    struct.pack_into("!H", inner, 40, pseudo_sum("192.0.2.1", "192.0.2.2", 300 - 34))
    hdr = stt_header(5, flags=0x02 | 0x04, l4=34, tci=0x1000 | (3 << 13) | 100)
    cap = write_pcap(tmp_path / "in.pcap", [segment(hdr + bytes(inner), length=318)])
    s = decap_json(cap, tmp_path)
    assert s["partial_checksums_completed"] == 1
    out = frames_of(tmp_path / "out.pcap")[0][1]
    assert out == good[:12] + struct.pack("!HH", 0x8100, (3 << 13) | 100) + good[12:]


def test_context_filter_and_split(tmp_path: Path) -> None:
    pkts = []
    for i, ctx in enumerate([0x10, 0x20, 0x10, 0xABCDEF0123456789]):
        pkts += segments_of(stt_header(ctx) + inner_udp(100 + i), ack=i)
    cap = write_pcap(tmp_path / "in.pcap", pkts)
    split = tmp_path / "split"
    s = decap_json(cap, tmp_path, "--context-id", "0x10", "--split-by-context", split)
    assert (s["written"], s["filtered_out"]) == (2, 2)
    assert sorted(p.name for p in split.iterdir()) == ["ctx-10.pcap"]
    assert [f[1] for f in frames_of(split / "ctx-10.pcap")] == [inner_udp(100), inner_udp(102)]
    s = decap_json(cap, tmp_path, "--split-by-context", split)
    assert sorted(p.name for p in split.iterdir()) == [
        "ctx-10.pcap", "ctx-20.pcap", "ctx-abcdef0123456789.pcap",
    ]  # fmt: skip
    assert len(frames_of(tmp_path / "out.pcap")) == 4


def test_other_port_and_several_ports(tmp_path: Path) -> None:
    a = segments_of(stt_header(1) + inner_udp(100), dport=7472)
    b = segments_of(stt_header(2) + inner_udp(100), dport=7471, ack=2)
    cap = write_pcap(tmp_path / "in.pcap", a + b)
    assert decap_json(cap, tmp_path)["written"] == 1
    assert decap_json(cap, tmp_path, "--port", "7471", "--port", "7472")["written"] == 2


def test_offloaded_checksums_from_a_sending_host_are_accepted(tmp_path: Path) -> None:
    inner = inner_udp(3000)
    frame = stt_header(1) + inner
    partial = segments_of(frame, partial=True)
    gso = segment(frame, length=len(frame), ack=2, corrupt=True)  # 3 KB super-packet
    s = decap_json(write_pcap(tmp_path / "in.pcap", [*partial, gso]), tmp_path)
    assert s["checksums"] == {"verified": 0, "offloaded": 4, "inner_partial": 0, "unchecked": 0}
    assert s["written"] == 2 and s["drops"] == {}


def test_human_summary(tmp_path: Path) -> None:
    cap = write_pcap(tmp_path / "in.pcap", segments_of(stt_header(0x42) + inner_udp(100)))
    p = run("decap", cap, "-o", tmp_path / "o.pcap")
    assert p.returncode == 0
    assert "0x42" in p.stdout and "1 frames reassembled" in p.stdout
    assert "drops\n(none)" in p.stdout


def _bench_offline() -> Any:
    """``bench/offline.py`` as a module (its capture generators)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "offline.py"
    spec = importlib.util.spec_from_file_location("bench_offline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [7, 8])
def test_mixed_capture_frames_come_back_byte_identical_per_context(
    tmp_path: Path, seed: int
) -> None:
    """The benchmark's mixed capture (five context ids, frames of 90 B to 64 KB in
    random order across flows, some frames' segments interleaved with others'): every
    inner frame comes back byte for byte, in completion order, in its context id."""
    bench = _bench_offline()
    cap = tmp_path / "mixed.pcap"
    shape, expected = bench.build_mixed_capture(cap, 3000, seed=seed)
    split = tmp_path / "split"
    s = decap_json(cap, tmp_path, "--split-by-context", split)
    assert (s["segments"], s["frames"], s["written"]) == (shape["segments"], shape["frames"],
                                                          shape["frames"])  # fmt: skip
    assert s["drops"] == {} and s["checksums"]["verified"] == shape["segments"]
    assert [f[1] for f in frames_of(tmp_path / "out.pcap")] == [f for _c, f in expected]
    contexts = sorted({c for c, _f in expected})
    assert contexts == sorted(ctx for ctx, _src, _dst in bench.MIXED_FLOWS)
    assert sorted(p.name for p in split.iterdir()) == sorted(f"ctx-{c:x}.pcap" for c in contexts)
    for ctx in contexts:
        got = [f[1] for f in frames_of(split / f"ctx-{ctx:x}.pcap")]
        assert got == [f for c, f in expected if c == ctx]
    assert {len(f) for _c, f in expected} == set(bench.MIXED_SIZES)


# ----------------------------------------------------------------------- drops
def _drop_capture() -> list[bytes | tuple[int, bytes]]:
    f = stt_header(1) + inner_udp(282)  # L = 300
    pkts: list[bytes | tuple[int, bytes]] = [
        # bad version: a complete one-segment frame with version 1
        segment(stt_header(1, version=1) + inner_udp(100), length=118, ack=1),
        # overlap conflict: [0,100) then [50,150) with other bytes
        segment(f[:100], length=300, ack=2),
        segment(b"\xee" * 100, length=300, offset=50, ack=2),
        # length mismatch: [0,100) of L=300 then [100,200) claiming L=400
        segment(f[:100], length=300, ack=3),
        segment(f[100:200], length=400, offset=100, ack=3),
        # segment past end: [200,400) of L=300
        segment(f[:200], length=300, offset=200, ack=4),
        # bad TCP checksum, bad data offset
        segment(f, length=300, ack=5, corrupt=True),
        segment(f, length=300, ack=6, doff=6),
        # duplicate: [0,100) twice (the frame stays incomplete)
        segment(f[:100], length=300, ack=7),
        segment(f[:100], length=300, ack=7),
        # empty segment, zero-length frame, frame too short
        segment(b"", length=300, ack=8),
        segment(b"abc", length=0, ack=9),
        segment(stt_header(1)[:10], length=10, ack=10),
        # bad L4 offset: P set with an L4 offset inside the Ethernet header
        segment(stt_header(1, flags=0x0E, l4=10) + inner_udp(100), length=118, ack=11),
        # a complete frame, then a late copy of its first segment
        *segments_of(f, ack=12, size=200),
        segment(f[:200], length=300, ack=12),
        # outer IPv4 first fragment
        segment(f, length=300, ack=13)[:20] + b"\x20\x00" + segment(f, length=300, ack=13)[22:],
    ]
    # reassembly timeout: first half, then 31 s later another frame's segment
    pkts.append((TS0 + 10**9, segment(f[:100], length=300, ack=14)))
    pkts.append((TS0 + 32 * 10**9, segment(f[:100], length=300, ack=15)))  # incomplete at EOF
    return pkts


def test_every_drop_reason_in_json(tmp_path: Path) -> None:
    cap = write_pcap(tmp_path / "in.pcap", _drop_capture())
    s = decap_json(cap, tmp_path)
    assert s["drops"] == {
        "bad_version": 1,
        "overlap_conflict": 1,
        "length_mismatch": 1,
        "segment_past_end": 1,
        "bad_tcp_checksum": 1,
        "bad_data_offset": 1,
        "duplicate_segment": 1,
        "empty_segment": 1,
        "zero_length_frame": 1,
        "frame_too_short": 1,
        "bad_l4_offset": 1,
        "late_segment": 1,
        "outer_fragment": 1,
        "reassembly_timeout": 2,  # the partial frames 7 (duplicate) and 14
        "incomplete_at_eof": 1,
    }


def test_snaplen_cut_segment_is_outer_truncated(tmp_path: Path) -> None:
    full = segment(stt_header(1) + inner_udp(1000), length=1018)
    cap = write_pcap(tmp_path / "in.pcap", [full], snaplen=200)
    s = decap_json(cap, tmp_path)
    assert s["drops"] == {"outer_truncated": 1} and s["segments"] == 1


# ----------------------------------------------------------------------- bad input
def _pcap_header(linktype: int = 1) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "byte 0: empty file (0 bytes), not a capture file"),
        (b"hello, world\n", "byte 0: unknown magic 0x68656c6c: not a pcap or pcapng file"),
        (_pcap_header()[:10], "byte 0: truncated pcap file header: need 24 bytes, have 10"),
        (_pcap_header(147), "byte 20: file has unsupported link type 147"),
        (_pcap_header() + struct.pack("<IIII", 0, 0, 1 << 30, 1 << 30) + b"\0" * 40,
         "byte 24: record length 1073741824 exceeds 262140 (4 * max(snaplen 65535, 65535))"),
        (b"\x0a\x0d\x0d\x0a" + struct.pack("<I", 13) + b"\x4d\x3c\x2b\x1a" + b"\0" * 20,
         "byte 4: corrupt block length 13 (block type 0x0a0d0d0a): must be a multiple of 4"
         " between 12 and 67108864"),
    ],
)  # fmt: skip
def test_bad_input_one_line_exit_2(tmp_path: Path, content: bytes, message: str) -> None:
    cap = tmp_path / "bad.pcap"
    cap.write_bytes(content)
    for tool in ("decap", "inspect"):
        extra = ["-o", str(tmp_path / "o.pcap")] if tool == "decap" else []
        p = run(tool, cap, *extra)
        assert p.returncode == 2
        assert p.stderr == f"sttun {tool}: {cap}: {message}\n"
        assert p.stdout == ""


def test_missing_input(tmp_path: Path) -> None:
    p = run("decap", tmp_path / "nope.pcap", "-o", tmp_path / "o.pcap")
    assert p.returncode == 2
    assert (
        p.stderr
        == f"sttun decap: {tmp_path / 'nope.pcap'}: cannot open: No such file or directory\n"
    )


def test_cut_last_record_is_a_note_not_an_error(tmp_path: Path) -> None:
    segs = segments_of(stt_header(1) + inner_udp(100))
    cap = write_pcap(tmp_path / "in.pcap", [*segs, segs[0]])
    data = cap.read_bytes()
    cap.write_bytes(data[:-30])
    s = decap_json(cap, tmp_path)
    assert s["written"] == 1
    assert s["truncated"] == (
        f"{cap}: byte {len(data) - len(segs[0]) - 16}: last record cut off"
        f" ({len(segs[0]) - 30} of {len(segs[0])} data bytes)"
    )
    # the output is a valid capture
    assert frames_of(tmp_path / "out.pcap")[0][1] == inner_udp(100)
