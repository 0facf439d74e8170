#!/usr/bin/env python3
"""Offline benchmark: ``sttun decap`` vs tshark on one STT capture (bench-method.md).

Builds a capture of ~100 000 STT segments (mixed inner frame sizes from 60 bytes to
64 KB, underlay MTU 1500, i.e. 1460-byte segments, IPv4, valid checksums) with
sttun's own encapsulator, then times, interleaved (sttun, tshark, sttun, ...), the
wall time of the whole commands, start-up included:

* ``sttun decap IN -o OUT`` (a subprocess, TCP checksums verified, output written
  to a new file: the previous run's OUT is deleted before the timer starts);
* ``tshark -r IN -o ip.try_heuristic_first:TRUE -T fields -e stt.context_id``
  (STT dissection and reassembly on, output to /dev/null).

The median of ``--runs`` (default 3) is quoted for each, with segments/s, Gbit/s of
capture data and the ratio.  Python byte-code is cached in a temporary directory
(``PYTHONPYCACHEPREFIX``) and one untimed warm-up run is made, as an installed
package would have its byte-code compiled.  Writes ``bench/results/offline.json``
and prints a table.  Never pass/fail.

    python bench/offline.py            # 100 000 segments, 3 runs each
    python bench/offline.py --quick    # 5 000 segments, 1 run: a CI smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sttun import __version__  # noqa: E402
from sttun.core.encap import Encapsulator  # noqa: E402
from sttun.io.pcap import PcapWriter  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "offline.json"
SIZES = (60, 100, 200, 576, 1000, 1514, 3000, 9014, 16000, 32000, 64000)
TSHARK_ARGS = ["-o", "ip.try_heuristic_first:TRUE", "-T", "fields", "-e", "stt.context_id"]


def inner_frame(rnd: random.Random, n: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``n`` bytes (192.0.2.1 -> 192.0.2.2)."""
    eth = bytes.fromhex("02000000000b02000000000a0800")
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, n - 14, 1, 0x4000, 64, 17, 0, bytes((192, 0, 2, 1)),
        bytes((192, 0, 2, 2)),
    )  # fmt: skip
    udp = struct.pack("!HHHH", 10000, 20000, n - 34, 0)
    return eth + ip + udp + rnd.randbytes(n - 42)


def build_capture(path: Path, segments: int, seed: int = 1) -> dict[str, int]:
    """Write a capture of at least ``segments`` STT segments; return its shape."""
    rnd = random.Random(seed)
    pool = [inner_frame(rnd, n) for n in SIZES]
    l2 = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    enc = Encapsulator(bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2)), 0x5, l2=l2, first_frame_id=1)
    ts = 1_700_000_000 * 10**9
    count = 0
    with PcapWriter(path) as w:
        while count < segments:
            for parts in enc.encap(rnd.choice(pool), None, gso=False):
                w.write(ts, b"".join(parts))
                count += 1
                ts += 10_000
    return {"segments": count, "frames": enc.frames, "bytes": path.stat().st_size}


#: The mixed case: inner frame sizes (one of each is equally likely), five context
#: ids over three outer address pairs (two directions), as ``(context id, src, dst)``.
MIXED_SIZES = (90, 1514, 9000, 64000)
MIXED_FLOWS = (
    (0x1, bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2))),
    (0x2A, bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2))),
    (0x7471, bytes((198, 18, 0, 3)), bytes((198, 18, 0, 2))),
    (0xC0FFEE, bytes((198, 18, 0, 2)), bytes((198, 18, 0, 1))),
    (0xFEDC_BA98_7654_3210, bytes((198, 18, 0, 2)), bytes((198, 18, 0, 1))),
)
#: Share of frames sent as part of a group of 2-3 frames whose segments interleave.
MIXED_INTERLEAVED = 0.25


def build_mixed_capture(
    path: Path, segments: int, seed: int = 7
) -> tuple[dict[str, int], list[tuple[int, bytes]]]:
    """Write a capture unlike :func:`build_capture`'s; return its shape and frames.

    At least ``segments`` IPv4 segments of up to 1460 payload bytes: inner frames of
    :data:`MIXED_SIZES` bytes, equally likely, each frame's flow (context id) picked
    at random among :data:`MIXED_FLOWS`; about :data:`MIXED_INTERLEAVED` of the
    frames come in groups of two or three (from any flows) whose segments are
    randomly interleaved, each frame's own segments staying in order.  Every inner
    frame is distinct (a serial number in its UDP payload).

    The frames are returned as ``(context id, inner frame)`` in the order a decoder
    completes them: by the position of each frame's last segment.
    """
    rnd = random.Random(seed)
    l2_fwd = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    l2_rev = bytes.fromhex("020000000001020000000002") + b"\x08\x00"
    encs = [
        Encapsulator(
            src,
            dst,
            ctx,
            l2=l2_fwd if src[3] != 2 else l2_rev,
            first_frame_id=rnd.getrandbits(32),
            first_ip_ident=rnd.getrandbits(16),
        )  # fmt: skip
        for ctx, src, dst in MIXED_FLOWS
    ]
    pools = [[bytearray(inner_frame(rnd, n)) for n in MIXED_SIZES] for _ in encs]
    ts = 1_700_000_000 * 10**9
    count = serial = 0
    done: list[tuple[int, int, bytes]] = []  # (index of the last segment, ctx, frame)

    def frame_segments() -> tuple[int, bytes, list[bytes]]:
        nonlocal serial
        flow = rnd.randrange(len(encs))
        inner = pools[flow][rnd.randrange(len(MIXED_SIZES))]
        serial += 1
        inner[42:50] = serial.to_bytes(8, "big")
        frame = bytes(inner)
        enc = encs[flow]
        return enc.context_id, frame, [b"".join(p) for p in enc.encap(frame, None, gso=False)]

    with PcapWriter(path) as w:
        while count < segments:
            group = 1
            if rnd.random() < MIXED_INTERLEAVED / 2.5:  # groups hold 2.5 frames on average
                group = rnd.choice((2, 3))
            frames = [frame_segments() for _ in range(group)]
            # Interleave: each next segment comes from a frame chosen in proportion to
            # the segments it has left (a uniformly random merge of the sequences).
            left = [len(segs) for _, _, segs in frames]
            nxt = [0] * group
            while any(left):
                k = rnd.choices(range(group), weights=left)[0]
                w.write(ts, frames[k][2][nxt[k]])
                nxt[k] += 1
                left[k] -= 1
                if not left[k]:
                    done.append((count, frames[k][0], frames[k][1]))
                count += 1
                ts += rnd.randrange(2_000, 20_000)
    done.sort()
    shape = {"segments": count, "frames": len(done), "bytes": path.stat().st_size}
    return shape, [(ctx, frame) for _, ctx, frame in done]


def timed(argv: list[str], env: dict[str, str], fresh: Path | None = None) -> float:
    """Wall time of one command (output discarded); raises if it fails.

    ``fresh``: a file the command writes, removed (untimed) first, so the command
    creates it anew instead of paying for truncating the previous run's output
    (about 25 ms for 140 MB here, freeing its page cache).
    """
    if fresh is not None:
        fresh.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (5000 segments, 1 run)")
    ap.add_argument("--segments", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    segments, runs = (5000, 1) if args.quick else (args.segments, args.runs)
    tshark = shutil.which("tshark")

    with tempfile.TemporaryDirectory(prefix="sttun-bench-") as tmp:
        cap = Path(tmp) / "stt.pcap"
        out = Path(tmp) / "inner.pcap"
        shape = build_capture(cap, segments)
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        env["PYTHONPATH"] = str(ROOT / "src")
        sttun_cmd = [sys.executable, "-m", "sttun", "decap", str(cap), "-o", str(out)]
        tshark_cmd = [tshark, "-r", str(cap), *TSHARK_ARGS] if tshark else None
        timed(sttun_cmd, env, out)  # warm-up: byte-code cache, page cache
        if tshark_cmd:
            timed(tshark_cmd, env)
        t_sttun: list[float] = []
        t_tshark: list[float] = []
        for _ in range(runs):
            t_sttun.append(timed(sttun_cmd, env, out))
            if tshark_cmd:
                t_tshark.append(timed(tshark_cmd, env))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-X", "importtime", "-m", "sttun", "decap", "--help"],
                       capture_output=True, env=env, check=True)  # fmt: skip
        help_time = time.perf_counter() - t0

    def rates(secs: list[float]) -> dict[str, Any]:
        med = statistics.median(secs)
        return {
            "runs_s": [round(s, 4) for s in secs],
            "median_s": round(med, 4),
            "segments_per_s": round(shape["segments"] / med),
            "gbit_per_s": round(shape["bytes"] * 8 / med / 1e9, 3),
        }

    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "sttun_version": __version__,
        "quick": args.quick,
        "capture": shape,
        "sttun_decap": rates(t_sttun),
        "cli_help_s": round(help_time, 4),
    }
    if t_tshark:
        result["tshark"] = rates(t_tshark)
        result["speedup"] = round(statistics.median(t_tshark) / statistics.median(t_sttun), 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"capture: {shape['segments']} segments, {shape['frames']} frames, "
          f"{shape['bytes'] / 1e6:.1f} MB; median of {runs} interleaved run(s)")  # fmt: skip
    print(f"{'command':<14}{'median s':>10}{'segments/s':>13}{'Gbit/s':>9}")
    rows = [("sttun decap", result["sttun_decap"])]
    if "tshark" in result:
        rows.append(("tshark", result["tshark"]))
    for name, r in rows:
        print(f"{name:<14}{r['median_s']:>10.3f}{r['segments_per_s']:>13,}{r['gbit_per_s']:>9.2f}")
    if "speedup" in result:
        print(f"sttun decap is {result['speedup']}x faster than tshark")
    else:
        print("tshark not installed: no comparison")
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
