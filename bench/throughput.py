"""Throughput, CPU cost, small packets and latency: sttun against the kernel's VXLAN.

Two namespaces on a veth underlay (``sttun.tools.topology``),
and on top of it one of four overlays:

* ``veth``       — no tunnel, the overlay address on the veth itself (the ceiling);
* ``vxlan``      — the kernel's VXLAN device (dstport 4789, MTU 1450);
* ``sttun``      — sttun endpoints, TAP offloads on (TAP MTU 1500), the pure-Python
  receive path (``--fastpath off``) and send path (``--tx-fastpath off``);
* ``sttun-fast`` — the same with the kernel fast paths: receive (``--fastpath on``: the
  eBPF program decapsulates whole frames into the TAP) and transmit (the default
  ``--tx-fastpath auto``: a program at the TAP's egress encapsulates non-GSO frames);
* ``sttun-rx-fast`` — ``sttun-fast`` without the transmit program
  (``--tx-fastpath off``; not in the default set of modes);
* ``sttun-fast-ring`` — ``sttun-fast`` sending through a ``PACKET_TX_RING`` on every
  underlay (``--tx-ring on``; not in the default set of modes; the other sttun
  modes run with the default ``--tx-ring auto``: the ring where the sender's
  underlay has no TSO, i.e. in ``wire``);
* ``sttun-soft`` — sttun with ``--no-offload`` (segmentation and checksums in Python,
  ``--fastpath off``);
* ``null-tunnel`` — ``bench/null_tunnel.py``: sttun's data path (TAP, ``AF_PACKET``,
  GSO/GRO, one Python process per host) with no STT work at all, the ceiling of
  the design on this machine;

each in three underlay variants:

* ``tso``  — veth defaults: TSO on, 64 KB packets cross the veth unsegmented;
* ``wire`` — TSO off on the sender's veth, GRO on at the receiver: MTU-sized
  segments on the wire, merged again on receipt, as with a physical NIC;
* ``routed`` — a router namespace forwarding between the hosts (``TwoHosts(routed=
  True)``), TSO off on its link to b and GRO on at b: forwarding orphans the
  packets as a NIC's receive path would, so b's GRO merges each frame whole.

Workloads, client in host a, server in host b: ``iperf3 -t T`` single stream and
``-P 4`` (received Gbit/s); CPU seconds per GB carried during the single stream
(the two sttun processes from /proc/PID/stat, and the whole machine's busy and softirq
time from /proc/stat, which is what the kernel tunnel costs); ``iperf3 -u -l 64 -b 0``
(packets per second received); ``ping -c 200 -i 0.01`` (p50/p99 RTT).

Every (variant, mode) point builds fresh hosts and removes them afterwards; points
are interleaved (veth vxlan sttun sttun-fast sttun-soft null-tunnel, veth vxlan ...) for
every repetition,
and the medians over repetitions are compared as ratios against vxlan and veth from
the same run.  Writes ``bench/results/latest.json`` and ``latest.png`` (``--quick``:
``quick.json``/``quick.png``, 1 s per point, 1 repetition) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    RESULTS_DIR,
    fmt,
    median,
    percentile,
    process_cpu,
    ratio,
    system_cpu,
    write_results,
)

from sttun.errors import SetupError, SttError
from sttun.tools.topology import ROUTER_DEV_B, Endpoint, TwoHosts, check_support

MODES = ("veth", "vxlan", "sttun", "sttun-fast", "sttun-soft", "null-tunnel")
#: Modes run only when named with ``--modes``.
EXTRA_MODES = ("sttun-fast-ring", "sttun-rx-fast")
NULL_TUNNEL = Path(__file__).resolve().parent / "null_tunnel.py"
NULL_DEV = "nul0"
OVERLAY_MTU = {"veth": 1500, "vxlan": 1450, "sttun": 1500, "sttun-fast": 1500,
               "sttun-fast-ring": 1500, "sttun-rx-fast": 1500, "sttun-soft": 1500,
               "null-tunnel": 1500}  # fmt: skip
#: ``--fastpath`` of each sttun mode.
FASTPATH = {"sttun": "off", "sttun-fast": "on", "sttun-fast-ring": "on", "sttun-rx-fast": "on",
            "sttun-soft": "off"}  # fmt: skip
#: ``--tx-fastpath`` of each sttun mode (the others: the default, ``auto``).
TX_FASTPATH = {"sttun": "off", "sttun-rx-fast": "off", "sttun-soft": "off"}
#: ``--tx-ring`` of each sttun mode (the others: the default, ``auto``).
TX_RING = {"sttun-fast-ring": "on"}
#: Seconds the null tunnel gets to create its TAP.
NULL_START_TIMEOUT = 10.0
VARIANTS = ("tso", "wire", "routed")
BASELINES = ("vxlan", "veth")
IPERF_PORT = 5201
STT_KEY = 0x5747

#: metric -> (unit, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "tcp1_gbps": ("Gbit/s", True),
    "tcp4_gbps": ("Gbit/s", True),
    "udp64_pps": ("packets/s", True),
    "ping_p50_ms": ("ms", False),
    "ping_p99_ms": ("ms", False),
    "sttun_cpu_s_per_gb": ("CPU s/GB", False),
    "cpu_total_s_per_gb": ("CPU s/GB", False),
    "softirq_s_per_gb": ("CPU s/GB", False),
}


class Point:
    """One (variant, mode) set-up: hosts, overlay, an iperf3 server in host b."""

    def __init__(self, mode: str, variant: str) -> None:
        self.mode, self.variant = mode, variant
        self.hosts = TwoHosts(prefix="sttun-bench", routed=variant == "routed")
        self.endpoints: tuple[Endpoint, ...] = ()
        self.null_procs: list[subprocess.Popen[bytes]] = []
        self.server: subprocess.Popen[str] | None = None

    def __enter__(self) -> Point:
        h = self.hosts.build()
        try:
            if self.variant == "wire":
                h.set_underlay_offloads(h.a, tso=False, gso=True)
                h.set_underlay_offloads(h.b, gro=True)
            elif self.variant == "routed":
                assert h.router is not None
                h.router.ethtool(ROUTER_DEV_B, tso=False, gso=True)  # segments to b
                h.set_underlay_offloads(h.b, gro=True)  # merged again by b's GRO
            if self.mode == "veth":
                h.add_overlay_on_underlay()
            elif self.mode == "vxlan":
                h.add_vxlan()
            elif self.mode == "null-tunnel":
                self.start_null_tunnel()
            else:
                self.endpoints = h.start_sttun(
                    key=STT_KEY,
                    offload=self.mode != "sttun-soft",
                    instance="bench",
                    extra=[
                        *("--fastpath", FASTPATH[self.mode]),
                        *("--tx-ring", TX_RING.get(self.mode, "auto")),
                        *("--tx-fastpath", TX_FASTPATH.get(self.mode, "auto")),
                    ],
                )
            self.server = h.b.popen(
                ["iperf3", "-s", "--forceflush", "-B", self.addr, "-p", str(IPERF_PORT)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert self.server.stdout is not None
            line = self.server.stdout.readline()
            if "listening" not in line.lower() and "---" not in line:
                raise SetupError(f"iperf3 server did not start: {line.strip()}")
            # the first packets resolve neighbours (and the tunnel's); not measured
            h.a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", self.addr], check=False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_null_tunnel(self) -> None:
        """``bench/null_tunnel.py`` in both hosts, the overlay addresses on its TAP."""
        h = self.hosts
        addr_a, addr_b, _ = h.underlay
        h.a.run(["ping", "-c", "1", "-W", "2", addr_b])  # both neighbour entries
        for host, local, remote in ((h.a, addr_a, addr_b), (h.b, addr_b, addr_a)):
            argv = [sys.executable, str(NULL_TUNNEL), "--local-ip", local, "--remote-ip",
                    remote, "--dev", NULL_DEV]  # fmt: skip
            proc = host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.null_procs.append(proc)
            deadline = time.monotonic() + NULL_START_TIMEOUT
            while host.run(["ip", "link", "show", NULL_DEV], check=False).returncode:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise SetupError(f"null tunnel in {host.name} did not start: {err.strip()}")
                time.sleep(0.05)
        h.add_overlay(NULL_DEV)

    def close(self) -> None:
        """Stop the server and the endpoints, delete the hosts."""
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        for proc in self.null_procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.hosts.close()

    @property
    def addr(self) -> str:
        """Host b's overlay address."""
        return self.hosts.overlay[1]

    def sttun_cpu(self) -> float | None:
        """CPU seconds used so far by the sttun (or null tunnel) processes; None
        for the kernel's devices."""
        pids = [ep.pid for ep in self.endpoints] + [p.pid for p in self.null_procs]
        if not pids:
            return None
        return sum(process_cpu(pid) for pid in pids)

    def iperf3(self, *args: str, timeout: float) -> dict[str, Any]:
        """``iperf3 -c b ARGS -J`` from host a; the JSON result (one retry if busy)."""
        argv = ["iperf3", "-c", self.addr, "-p", str(IPERF_PORT), "-J", *args]
        for attempt in range(3):
            res = self.hosts.a.run(argv, check=False, timeout=timeout)
            try:
                data: dict[str, Any] = json.loads(res.stdout)
            except json.JSONDecodeError:
                data = {"error": (res.stderr or res.stdout).strip()[:200] or "no output"}
            if "error" not in data:
                return data
            if "busy" not in str(data["error"]) or attempt == 2:
                raise SetupError(f"iperf3 {' '.join(args)}: {data['error']}")
            time.sleep(1.0)
        raise AssertionError("unreachable")


def measure(point: Point, seconds: float, udp_seconds: float, pings: int) -> dict[str, Any]:
    """Every workload on one set-up; a dict of metric -> value."""
    out: dict[str, Any] = {}
    t = str(seconds)
    cpu0, (busy0, soft0) = point.sttun_cpu(), system_cpu()
    tcp1 = point.iperf3("-t", t, timeout=seconds + 60)
    cpu1, (busy1, soft1) = point.sttun_cpu(), system_cpu()
    rx = tcp1["end"]["sum_received"]
    gb = rx["bytes"] / 1e9
    out["tcp1_gbps"] = rx["bits_per_second"] / 1e9
    out["tcp1_retransmits"] = tcp1["end"].get("sum_sent", {}).get("retransmits")
    out["bytes_carried"] = rx["bytes"]
    out["sttun_cpu_s_per_gb"] = (cpu1 - cpu0) / gb if cpu0 is not None and cpu1 and gb else None
    out["cpu_total_s_per_gb"] = (busy1 - busy0) / gb if gb else None
    out["softirq_s_per_gb"] = (soft1 - soft0) / gb if gb else None

    tcp4 = point.iperf3("-t", t, "-P", "4", timeout=seconds + 60)
    out["tcp4_gbps"] = tcp4["end"]["sum_received"]["bits_per_second"] / 1e9

    udp = point.iperf3(
        "-u", "-l", "64", "-b", "0", "-t", str(udp_seconds), timeout=udp_seconds + 60
    )
    end = udp["end"]
    got = end["sum_received"]
    received = got["packets"] - got.get("lost_packets", 0)
    duration = end.get("sum_sent", {}).get("seconds") or udp_seconds
    out["udp64_pps"] = received / duration if duration else None
    out["udp64_sent_pps"] = end.get("sum_sent", {}).get("packets", 0) / duration

    res = point.hosts.a.run(
        ["ping", "-c", str(pings), "-i", "0.01", "-W", "2", point.addr],
        check=False,
        timeout=pings * 0.05 + 30,
    )
    rtts = [float(x.split("=")[1]) for x in res.stdout.split() if x.startswith("time=")]
    out["ping_replies"] = len(rtts)
    out["ping_p50_ms"] = percentile(rtts, 50)
    out["ping_p99_ms"] = percentile(rtts, 99)
    out.update(fastpath_share(point))
    return out


def fastpath_share(point: Point) -> dict[str, Any]:
    """The receiving endpoint's (b's) frames by receive path over the whole point."""
    if len(point.endpoints) < 2:
        return {}
    try:
        (t,) = point.endpoints[1].show()["tunnels"]
    except (SttError, OSError, ValueError):
        return {}
    fast = (t.get("rx_fastpath") or {}).get("frames", 0)
    total = (t.get("rx") or {}).get("frames", 0)
    fast_bytes = (t.get("rx_fastpath") or {}).get("bytes", 0)
    total_bytes = (t.get("rx") or {}).get("bytes", 0)
    tx_fast = sum(
        ((ep_t.get("tx_fastpath") or {}).get("frames", 0) for ep_t in _both_tunnels(point)), 0
    )
    tx_total = sum(((ep_t.get("tx") or {}).get("frames", 0) for ep_t in _both_tunnels(point)), 0)
    return {
        "tx_frames_fastpath": tx_fast,
        "tx_frames_total": tx_total,
        "tx_fastpath_share": tx_fast / tx_total if tx_total else None,
        "rx_frames_fastpath": fast,
        "rx_frames_total": total,
        "fastpath_share": fast / total if total else None,
        # bytes: the TCP data's share (the frames' is mostly the UDP test's)
        "fastpath_byte_share": fast_bytes / total_bytes if total_bytes else None,
    }


def _both_tunnels(point: Point) -> list[dict[str, Any]]:
    """The tunnel of each endpoint as ``sttun show`` reports it (empty on failure)."""
    out = []
    for ep in point.endpoints:
        try:
            (t,) = ep.show()["tunnels"]
        except (SttError, OSError, ValueError):
            continue
        out.append(t)
    return out


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """All repetitions of all points; the raw runs by variant and mode."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        v: {m: [] for m in args.modes} for v in args.variants
    }
    total = args.reps * len(args.variants) * len(args.modes)
    n = 0
    for rep in range(args.reps):
        for variant in args.variants:
            for mode in args.modes:
                n += 1
                t0 = time.monotonic()
                point = Point(mode, variant)
                try:
                    with point:
                        result = measure(point, args.seconds, args.udp_seconds, args.pings)
                except SetupError as e:
                    result = {"error": str(e)}
                result["repetition"] = rep
                result["hosts"] = f"{point.hosts.prefix}-{point.hosts.suffix}"
                runs[variant][mode].append(result)
                what = (
                    f"error: {result['error']}"
                    if "error" in result
                    else f"tcp1 {fmt(result['tcp1_gbps'])} tcp4 {fmt(result['tcp4_gbps'])} "
                    f"Gbit/s, udp64 {fmt(result['udp64_pps'], 0)} pps, "
                    f"ping p50 {fmt(result['ping_p50_ms'], 3)} ms, "
                    f"retransmits {result.get('tcp1_retransmits')}"
                    + (
                        f", fast path share rx {fmt(result['fastpath_share'])}"
                        f" tx {fmt(result.get('tx_fastpath_share'))}"
                        if result.get("fastpath_share") is not None
                        else ""
                    )
                )
                log(f"[{n}/{total}] rep {rep + 1} {variant:4} {mode:10} {result['hosts']} {what} "
                    f"({time.monotonic() - t0:.1f}s)")  # fmt: skip
    return runs


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians per metric, and ratios against each baseline of the same variant."""
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for variant, modes in runs.items():
        medians[variant] = {
            mode: {m: median(r.get(m) for r in rs) for m in METRICS} for mode, rs in modes.items()
        }
    ratios: dict[str, Any] = {}
    for base in BASELINES:
        ratios[f"vs_{base}"] = {
            variant: {
                mode: {
                    m: ratio(vals[m], ms[base][m]) if base in ms else None
                    for m in METRICS
                    if m != "sttun_cpu_s_per_gb"
                }
                for mode, vals in ms.items()
            }
            for variant, ms in medians.items()
        }
    return {"medians": medians, "ratios": ratios}


def table(summary: dict[str, Any]) -> str:
    """The results as an aligned text table."""
    med = summary["medians"]
    vsx = summary["ratios"]["vs_vxlan"]
    heads = ["variant", "mode", "TCPx1 Gb/s", "/vxlan", "TCPx4 Gb/s", "/vxlan", "UDP64 kpps",
             "/vxlan", "ping p50/p99 ms", "sttun s/GB", "host s/GB"]  # fmt: skip
    rows = []
    for variant, modes in med.items():
        for mode, v in modes.items():
            r = vsx[variant][mode]
            pps = v["udp64_pps"]
            rows.append(
                [
                    variant,
                    mode,
                    fmt(v["tcp1_gbps"]),
                    fmt(r["tcp1_gbps"]),
                    fmt(v["tcp4_gbps"]),
                    fmt(r["tcp4_gbps"]),
                    fmt(pps / 1000 if pps is not None else None, 1),
                    fmt(r["udp64_pps"]),
                    f"{fmt(v['ping_p50_ms'], 3)}/{fmt(v['ping_p99_ms'], 3)}",
                    fmt(v["sttun_cpu_s_per_gb"]),
                    fmt(v["cpu_total_s_per_gb"]),
                ]
            )
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *rows, strict=False)]
    lines = []
    for row in [heads, *rows]:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def chart(summary: dict[str, Any], path: Path, title: str) -> bool:
    """A bar chart of the ratios to vxlan (higher is better everywhere); False if
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [
        ("tcp1_gbps", "TCP x1"),
        ("tcp4_gbps", "TCP x4"),
        ("udp64_pps", "UDP 64 B pps"),
        ("ping_p50_ms", "1 / ping p50"),
    ]
    ratios = summary["ratios"]["vs_vxlan"]
    variants = list(ratios)
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.2), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        modes = list(ratios[variant])
        width = 0.8 / max(len(modes), 1)
        for i, mode in enumerate(modes):
            vals = []
            for key, _ in shown:
                r = ratios[variant][mode].get(key)
                if r is not None and not METRICS[key][1]:
                    r = 1 / r if r else None  # lower is better: plot the inverse
                vals.append(r or 0.0)
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(shown))]
            bars = ax.bar(xs, vals, width, label=mode)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(shown)), [label for _, label in shown])
        ax.set_title(f"underlay {variant}")
        ax.set_ylabel("ratio to kernel VXLAN (higher is better)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 s per point, 1 repetition (smoke)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--seconds", type=float, help="seconds per TCP test (default 5, quick 1)")
    p.add_argument("--modes", nargs="+", choices=MODES + EXTRA_MODES, default=list(MODES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/latest.json)")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.seconds = args.seconds or (1.0 if args.quick else 5.0)
    args.udp_seconds = 1.0 if args.quick else 3.0
    args.pings = 20 if args.quick else 200
    if args.out is None:
        args.out = RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 2 when the machine cannot run it."""
    args = parse_args(argv)
    problem = check_support()
    if problem is None:
        missing = [t for t in ("iperf3", "ping", "ethtool") if shutil.which(t) is None]
        if missing:
            problem = f"needs {', '.join(missing)}"
    if problem:
        print(f"bench/throughput.py: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(
        f"throughput: {args.reps} repetition(s) x {len(args.variants)} variant(s) x "
        f"{len(args.modes)} mode(s), {args.seconds:g} s per TCP test",
        flush=True,
    )
    runs = run(args, lambda line: print(line, flush=True))
    summary = summarise(runs)
    doc = write_results(
        args.out,
        "throughput",
        {
            "quick": args.quick,
            "repetitions": args.reps,
            "seconds_per_tcp_test": args.seconds,
            "seconds_per_udp_test": args.udp_seconds,
            "pings": args.pings,
            "modes": args.modes,
            "variants": args.variants,
            "metrics": {m: {"unit": u, "higher_is_better": h} for m, (u, h) in METRICS.items()},
            "overlay_mtu": OVERLAY_MTU,
            "wall_seconds": round(time.monotonic() - started, 1),
            **summary,
            "runs": runs,
        },
    )
    png = args.out.with_suffix(".png")
    m = doc["machine"]
    title = (
        f"sttun {m['sttun']} vs kernel VXLAN — {doc['date'][:10]}, {m['cpu']}, "
        f"{m['cores']} cores, Linux {m['kernel']}"
    )
    drew = chart(summary, png, title)
    print()
    print(f"{title} (medians of {args.reps}; /vxlan = ratio to vxlan in the same variant)")
    print(table(summary))
    print()
    print(f"wrote {args.out}" + (f" and {png}" if drew else " (no chart: matplotlib missing)"))
    print(f"took {doc['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
