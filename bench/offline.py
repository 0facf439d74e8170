#!/usr/bin/env python3
"""Offline benchmark: ``sttun decap`` vs tshark on two STT captures (README, "Performance").

Builds two captures of ~100 000 IPv4 STT segments each (underlay MTU 1500, i.e.
1460-byte segments, valid checksums) with sttun's own encapsulator:

* *uniform* (the bench's own): one tunnel, inner frames of 11 sizes from 60 bytes
  to 64 KB, each frame's segments back to back;
* *mixed* (:func:`build_mixed_capture`, a capture the code was not tuned on):
  inner frames of 90, 1514, 9000 and 64000 bytes in five context ids over three
  outer address pairs, frames in random order across the flows, a quarter of them
  with their segments interleaved with one or two other frames'.

Then it times, interleaved (sttun and tshark on one capture, then on the other,
round after round), the whole commands, start-up included:

* ``sttun decap IN -o OUT`` (a subprocess, TCP checksums verified, output written
  to a new file: the previous run's OUT is deleted before the timer starts), as
  run by default (with two CPUs: most checksums verified in a second process,
  ``sttun.tools.checksum_ahead``) and with ``-j 1`` (everything in one process);
* ``tshark -r IN -o ip.try_heuristic_first:TRUE -T fields -e stt.context_id``
  (STT dissection and reassembly on, output discarded).

The median of ``--runs`` (default 3) wall times is quoted for each, with the CPU
time (user + system: steadier than wall time on a shared machine), segments/s,
Gbit/s of capture data and the ratios; the 1-minute load average after each round
is recorded.  Python byte-code is cached in a temporary directory
(``PYTHONPYCACHEPREFIX``) and one untimed warm-up run is made, as an installed
package would have its byte-code compiled.  Writes ``bench/results/offline.json``
(the uniform case at the top level, the mixed one under ``"mixed"``) and prints a
table.  Never pass/fail.

    python bench/offline.py            # 100 000 segments per capture, 3 runs each
    python bench/offline.py --quick    # 5 000 segments, 1 run: a CI smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
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
        )
        for ctx, src, dst in MIXED_FLOWS
    ]
    pools = [[bytearray(inner_frame(rnd, n)) for n in MIXED_SIZES] for _ in encs]
    ts = 1_700_000_000 * 10**9
    count = serial = 0
    done: list[tuple[int, int, bytes]] = []  # (index of the last segment, ctx, frame)
    # a group holds 2.5 frames on average: start one so that MIXED_INTERLEAVED of the
    # frames are in groups (p * 2.5 / (p * 2.5 + 1 - p) == MIXED_INTERLEAVED)
    group_start = MIXED_INTERLEAVED / (2.5 - 1.5 * MIXED_INTERLEAVED)

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
            if rnd.random() < group_start:
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


def timed(argv: list[str], env: dict[str, str], fresh: Path | None = None) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one command; raises if it fails.

    Output is discarded.  ``fresh``: a file the command writes, removed (untimed)
    first, so the command creates it anew instead of paying for truncating the
    previous run's output (about 25 ms for 140 MB here, freeing its page cache).
    """
    if fresh is not None:
        fresh.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def rates(runs: list[tuple[float, float]], shape: dict[str, int]) -> dict[str, Any]:
    """Medians of (wall, cpu) runs, with segments/s and Gbit/s of capture (wall)."""
    med = statistics.median(w for w, _ in runs)
    return {
        "runs_s": [round(w, 4) for w, _ in runs],
        "median_s": round(med, 4),
        "cpu_runs_s": [round(c, 4) for _, c in runs],
        "cpu_median_s": round(statistics.median(c for _, c in runs), 4),
        "segments_per_s": round(shape["segments"] / med),
        "gbit_per_s": round(shape["bytes"] * 8 / med / 1e9, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (5000 segments, 1 run)")
    ap.add_argument("--segments", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    segments, runs = (5000, 1) if args.quick else (args.segments, args.runs)
    tshark = shutil.which("tshark")
    cases = ("uniform", "mixed")

    with tempfile.TemporaryDirectory(prefix="sttun-bench-") as tmp:
        caps = {case: Path(tmp) / f"stt-{case}.pcap" for case in cases}
        out = Path(tmp) / "inner.pcap"
        shapes = {
            "uniform": build_capture(caps["uniform"], segments),
            "mixed": build_mixed_capture(caps["mixed"], segments)[0],
        }
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        env["PYTHONPATH"] = str(ROOT / "src")
        commands: list[tuple[str, str, list[str], Path | None]] = []
        for case in cases:
            decap = [sys.executable, "-m", "sttun", "decap", str(caps[case]), "-o", str(out)]
            commands.append((case, "sttun", decap, out))
            commands.append((case, "sttun-j1", [*decap, "-j", "1"], out))
            if tshark:
                commands.append((case, "tshark", [tshark, "-r", str(caps[case]), *TSHARK_ARGS],
                                 None))  # fmt: skip
        for _case, _tool, argv, fresh in commands:  # warm-up: byte-code cache, page cache
            timed(argv, env, fresh)
        times: dict[tuple[str, str], list[tuple[float, float]]] = {
            (case, tool): [] for case, tool, _a, _f in commands
        }
        loads: list[float] = []
        for _ in range(runs):
            for case, tool, argv, fresh in commands:
                times[case, tool].append(timed(argv, env, fresh))
            loads.append(round(os.getloadavg()[0], 2))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-X", "importtime", "-m", "sttun", "decap", "--help"],
                       capture_output=True, env=env, check=True)  # fmt: skip
        help_time = time.perf_counter() - t0

    def case_result(case: str) -> dict[str, Any]:
        shape = shapes[case]
        res: dict[str, Any] = {
            "capture": shape,
            "sttun_decap": rates(times[case, "sttun"], shape),
            "sttun_decap_one_process": rates(times[case, "sttun-j1"], shape),
        }
        if tshark:
            res["tshark"] = rates(times[case, "tshark"], shape)
            res["speedup"] = round(res["tshark"]["median_s"] / res["sttun_decap"]["median_s"], 2)
            res["cpu_speedup"] = round(
                res["tshark"]["cpu_median_s"] / res["sttun_decap"]["cpu_median_s"], 2
            )
            one = res["sttun_decap_one_process"]
            res["speedup_one_process"] = round(res["tshark"]["median_s"] / one["median_s"], 2)
            res["cpu_speedup_one_process"] = round(
                res["tshark"]["cpu_median_s"] / one["cpu_median_s"], 2
            )
        return res

    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "sttun_version": __version__,
        "quick": args.quick,
        # the bench's own capture (uniform) at the top level, as before
        **case_result("uniform"),
        "mixed": case_result("mixed"),
        "load1_per_round": loads,
        "cli_help_s": round(help_time, 4),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"median of {runs} interleaved round(s); 1-minute load average after each: {loads}")
    print(f"{'capture':<9}{'command':<13}{'median s':>9}{'cpu s':>8}{'segments/s':>12}"
          f"{'Gbit/s':>8}")  # fmt: skip
    for case, res in (("uniform", result), ("mixed", result["mixed"])):
        shape = res["capture"]
        print(f"{case}: {shape['segments']} segments, {shape['frames']} frames, "
              f"{shape['bytes'] / 1e6:.1f} MB")  # fmt: skip
        rows = [("sttun decap", res["sttun_decap"]),
                ("  ... -j 1", res["sttun_decap_one_process"])]  # fmt: skip
        if "tshark" in res:
            rows.append(("tshark", res["tshark"]))
        for name, r in rows:
            print(f"{'':<9}{name:<13}{r['median_s']:>9.3f}{r['cpu_median_s']:>8.3f}"
                  f"{r['segments_per_s']:>12,}{r['gbit_per_s']:>8.2f}")  # fmt: skip
        if "speedup" in res:
            print(f"{'':<9}sttun decap is {res['speedup']}x faster than tshark "
                  f"({res['cpu_speedup']}x in CPU time; with -j 1 "
                  f"{res['speedup_one_process']}x, {res['cpu_speedup_one_process']}x)")  # fmt: skip
    if not tshark:
        print("tshark not installed: no comparison")
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
