#!/usr/bin/env python3
"""Micro-benchmarks of sttun's software path (README, "Performance").

Measures, on one core, with ``time.perf_counter``: header encode/decode, the 64 KB
ones'-complement sum, software segmentation + checksums of a 64 KB frame, GSO
super-packet building (``encap_gso``, the daemon's send path, and the general
``encap(gso=True)``), and reassembly of 64 KB frames through ``Endpoint.receive``
from 45 shuffled MTU-sized segments and from 2 GRO-like pieces (with and without the
outer checksum check).  Every figure is the median of several repetitions.  Prints a
table and writes ``bench/results/micro.json``.  Never pass/fail.

    python bench/micro.py            # full run (~10 s)
    python bench/micro.py --quick    # ~1 s smoke run
    python bench/micro.py --only encap --output /tmp/encap.json   # one group
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sttun import __version__
from sttun.core.drops import DropReason
from sttun.core.encap import Encapsulator
from sttun.core.endpoint import Delivered, Endpoint, TunnelSpec
from sttun.core.outer import parse_segment
from sttun.core.reassembly import Completed, Reassembler
from sttun.wire.checksum import ones_sum
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import SttHeader
from sttun.wire.vnet import GsoType, VnetFlag, VnetHdr

LOCAL, REMOTE = ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2")
INNER_LEN = 65000  # a "64 KB" inner frame that fits every path (IPv4 limit 65477)
MTU = 1500
RESULTS = Path(__file__).resolve().parent / "results" / "micro.json"


def inner_frame(n: int = INNER_LEN) -> bytes:
    """An IPv4/TCP-looking inner Ethernet frame of ``n`` bytes (192.0.2.1 -> .2)."""
    rnd = random.Random(7)
    hdr = bytes.fromhex(
        "020000000002020000000001" "0800"  # Ethernet
        "45000000000140004006" "0000" "c0000201c0000202"  # IPv4 (lengths not fixed up)
        "03e807d00000000100000000501802000000" "0000"  # TCP
    )  # fmt: skip
    return hdr + rnd.randbytes(n - len(hdr))


def timeit(fn: Callable[[], object], loops: int, reps: int) -> list[float]:
    """Seconds per call of ``fn``, one value per repetition of ``loops`` calls."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        out.append((time.perf_counter() - t0) / loops)
    return out


def bench_headers(loops: int, reps: int) -> dict[str, list[float]]:
    h = SttHeader(flags=0x0E, l4_offset=34, mss=1448, vlan_tci=0x1064, context_id=0x42)
    raw = h.pack()
    unpack = SttHeader.unpack
    # One full-sized outer segment as the encapsulator sends it, read as the receive
    # path reads it (IPv4 + TCP-like header).
    enc = Encapsulator(LOCAL, REMOTE, 0x42, underlay_mtu=MTU, first_frame_id=1)
    segment = b"".join(enc.encap(inner_frame(), VnetHdr(), gso=False)[0])
    if isinstance(parse_segment(segment), DropReason):
        raise SystemExit("parse_segment refused the encapsulator's segment")
    return {
        "stt_header_pack": timeit(h.pack, loops, reps),
        "stt_header_unpack": timeit(lambda: unpack(raw), loops, reps),
        "parse_segment_v4": timeit(lambda: parse_segment(segment), loops, reps),
    }


def bench_checksum(loops: int, reps: int) -> dict[str, list[float]]:
    buf = random.Random(1).randbytes(65536)
    return {"ones_sum_64k": timeit(lambda: ones_sum(buf), loops, reps)}


def bench_encap(loops: int, reps: int) -> dict[str, list[float]]:
    frame = inner_frame()
    view = memoryview(frame)
    enc = Encapsulator(LOCAL, REMOTE, 0x42, underlay_mtu=MTU, first_frame_id=1)
    # A TSO frame as the overlay stack hands it to the TAP: checksum partial from the
    # TCP header (offset 34, field at +16), segment size 1448.
    tso = VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 66, 1448, 34, 16)
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = tso
    encap_gso = enc.encap_gso
    if encap_gso(view, flags, gso_type, gso_size, csum_start, csum_offset) is None:
        raise SystemExit("encap_gso did not take the benchmark's TSO frame")

    def software() -> None:
        # consume the scatter-gather lists as a sink would (no join)
        for pkt in enc.encap(frame, None, gso=False):
            for _buf in pkt:
                pass

    return {
        "encap_software_64k": timeit(software, loops, reps),
        "encap_gso_64k": timeit(
            lambda: encap_gso(view, flags, gso_type, gso_size, csum_start, csum_offset),
            loops * 20,
            reps,
        ),
        "encap_general_gso_64k": timeit(lambda: enc.encap(view, tso, gso=True), loops * 20, reps),
    }


def _packets(nframes: int) -> list[list[bytes]]:
    """``nframes`` 64 KB frames as lists of outer IPv4 segments, each list shuffled."""
    frame = inner_frame()
    enc = Encapsulator(LOCAL, REMOTE, 0x42, underlay_mtu=MTU, first_frame_id=1)
    rnd = random.Random(3)
    out = []
    for _ in range(nframes):
        segs = [b"".join(bytes(b) for b in p) for p in enc.encap(frame, None, gso=False)]
        rnd.shuffle(segs)
        out.append(segs)
    return out


def _gro(segs: list[bytes]) -> list[bytes]:
    """Merge in-order segments into two GRO-like pieces with valid TCP checksums."""
    segs = sorted(segs, key=lambda p: struct.unpack_from("!H", p, 26)[0])
    pieces = []
    for group in (segs[:-1], segs[-1:]):
        head = group[0]
        p = bytearray(head[:40] + b"".join(s[40:] for s in group))
        struct.pack_into("!H", p, 2, len(p))
        struct.pack_into("!H", p, 10, 0)
        struct.pack_into("!H", p, 10, ~ones_sum(p[:20]) & 0xFFFF)
        struct.pack_into("!H", p, 36, 0)
        pseudo = ones_sum(p[12:20] + bytes((0, 6)), len(p) - 20)
        struct.pack_into("!H", p, 36, ~ones_sum(p[20:], pseudo) & 0xFFFF)
        pieces.append(bytes(p))
    return pieces


def bench_reassembly(nframes: int, reps: int) -> dict[str, list[float]]:
    frames = _packets(nframes)
    gro = [_gro(segs) for segs in frames]
    out: dict[str, list[float]] = {}
    for name, data in (("segments45", frames), ("gro2", gro)):
        for csum_ok in (True, False):
            times = []
            for _ in range(reps):
                ep = Endpoint()
                ep.add_tunnel(TunnelSpec("t", REMOTE, LOCAL, 0x42, 0x42))
                recv = ep.receive
                got = 0
                t0 = time.perf_counter()
                for pkts in data:
                    for p in pkts:
                        if type(recv(p, 0.0, csum_ok=csum_ok)) is Delivered:
                            got += 1
                times.append((time.perf_counter() - t0) / len(data))
                if got != len(data):
                    raise SystemExit(f"reassembly {name}: {got}/{len(data)} frames completed")
            out[f"reasm_{name}_csum_{'ok' if csum_ok else 'verify'}"] = times
    out["reassembler_segments45"] = _reassembler_only(frames, reps)
    return out


def _reassembler_only(frames: list[list[bytes]], reps: int) -> list[float]:
    """``Reassembler.add`` alone on the same shuffled segments, headers pre-parsed
    (the cost of reassembly itself, without outer-header parsing and demux)."""
    parsed = [
        [
            (p[12:16], p[16:20], *struct.unpack_from("!II", p, 24)[::-1], memoryview(p)[40:])
            for p in pkts
        ]
        for pkts in frames
    ]
    times = []
    for _ in range(reps):
        add = Reassembler().add
        got = 0
        t0 = time.perf_counter()
        for segs in parsed:
            for src, dst, ack, seq, payload in segs:
                if type(add(src, dst, ack, seq, payload, 0.0)) is Completed:
                    got += 1
        times.append((time.perf_counter() - t0) / len(parsed))
        if got != len(parsed):
            raise SystemExit(f"reassembler alone: {got}/{len(parsed)} frames completed")
    return times


GROUPS = ("headers", "checksum", "encap", "reassembly")
UNITS: dict[str, tuple[str, str]] = {
    # name: (unit, description)
    "stt_header_pack": ("ns", "SttHeader.pack"),
    "stt_header_unpack": ("ns", "SttHeader.unpack"),
    "parse_segment_v4": ("ns", "parse_segment, IPv4 outer + TCP-like header"),
    "ones_sum_64k": ("us", "ones_sum of 64 KiB"),
    "encap_software_64k": ("Gbit/s", "encap 64 KB, software segments + checksums"),
    "encap_gso_64k": ("us", "Encapsulator.encap_gso, 64 KB TSO frame"),
    "encap_general_gso_64k": ("us", "Encapsulator.encap(gso=True), 64 KB TSO frame"),
    "reassembler_segments45": ("Gbit/s", "Reassembler.add alone, 45 shuffled segs"),
    "reasm_segments45_csum_ok": ("Gbit/s", "receive 64 KB from 45 shuffled segs, csum_ok"),
    "reasm_segments45_csum_verify": ("Gbit/s", "receive 64 KB from 45 shuffled segs, verify"),
    "reasm_gro2_csum_ok": ("Gbit/s", "receive 64 KB from 2 GRO pieces, csum_ok"),
    "reasm_gro2_csum_verify": ("Gbit/s", "receive 64 KB from 2 GRO pieces, verify"),
}


def convert(name: str, seconds: float) -> float:
    unit = UNITS[name][0]
    if unit == "ns":
        return seconds * 1e9
    if unit == "us":
        return seconds * 1e6
    return INNER_LEN * 8 / seconds / 1e9  # Gbit/s of inner frame bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~1 s smoke run")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median is reported)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="JSON output file")
    ap.add_argument(
        "--only", choices=GROUPS, action="append", help="run only this group (repeatable)"
    )
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 9)
    scale = 12 if args.quick else 50
    raw: dict[str, list[float]] = {}
    t_start = time.perf_counter()
    groups = args.only or list(GROUPS)
    if "headers" in groups:
        raw.update(bench_headers(2000 * scale, reps))
    if "checksum" in groups:
        raw.update(bench_checksum(20 * scale, reps))
    if "encap" in groups:
        raw.update(bench_encap(3 * scale, reps))
    if "reassembly" in groups:
        raw.update(bench_reassembly(3 * scale, reps))
    elapsed = time.perf_counter() - t_start

    results: dict[str, Any] = {}
    print(f"{'benchmark':<52} {'median':>10}  unit    (min..max)")
    for name, times in raw.items():
        vals = [convert(name, t) for t in times]
        med = statistics.median(vals)
        unit, desc = UNITS[name]
        results[name] = {
            "description": desc,
            "unit": unit,
            "median": round(med, 3),
            "values": [round(v, 3) for v in vals],
        }
        print(f"{desc:<52} {med:>10.2f}  {unit:<7} ({min(vals):.2f}..{max(vals):.2f})")
    print(f"({reps} repetitions, {elapsed:.1f} s)")
    report = {
        "benchmark": "micro",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repetitions": reps,
        "inner_frame_bytes": INNER_LEN,
        "underlay_mtu": MTU,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "python": platform.python_version(),
        "sttun": __version__,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
