#!/usr/bin/env python3
"""VM to VM TCP through Open vSwitch + ``sttun up --ovsdb``, against OVS's own VXLAN.

The same two hypervisors (tests/e2e/ovs_hosts.py: a netdev ``br-int`` per host with
a VM namespace on it, a veth underlay between the hosts), per OVS mode (default, and
``userspace-tso-enable=true``):

* ``sttun``: the STT port declared with the old command (``ovs-vsctl add-port br-int
  stt0 -- set interface stt0 type=stt options:remote_ip=R options:key=K``) and
  served by ``sttun up --ovsdb`` on both hosts;
* ``ovs-vxlan``: OVS's own userspace VXLAN (native tunnelling: the underlay ``eth0``
  moved into a netdev bridge ``br-phy`` that holds the underlay address; VM MTU 1450);
* ``no-tunnel``: no tunnel at all, the underlay ``eth0`` a port of each ``br-int``
  (VM MTU 1500): OVS's own per-frame forwarding, the ceiling of any tunnel port
  OVS passes MTU-sized frames through.

iperf3, one TCP stream, ``--seconds`` each, both directions, median of ``--reps``.
For sttun also: the seconds from the old command to a served port, the bytes per
frame sttun read from OVS (after GRO on its end of the pair; the STT frames are the
same), and how many frames OVS received per sttun write (the kernel segments a frame
when OVS takes no offloads).  For both: the CPU share (CPU seconds per second of
the iperf3 runs) of each sttun and each ovs-vswitchd.  Never
pass/fail; results in ``bench/results/ovs_vm.json``.

    python bench/ovs_vm.py [--seconds 5] [--reps 3] [--modes default] [--ports sttun]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results
from tests.e2e.ovs_hosts import (
    BRIDGE,
    STT_PORT_NAME,
    Hypervisor,
    OvsPair,
    add_stt_port,
    iperf3,
    ovs_pair,
    served,
)
from tests.e2e.sttun_hosts import Endpoint, start_endpoint, wait_for

from sttun.tools.topology import process_cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "ovs_vm.json"
KEY = 42


def _cpu(p: OvsPair, eps: list[Endpoint]) -> list[float]:
    """CPU seconds so far of each sttun, then of each ovs-vswitchd."""
    vswitchd = [hv.ovs.pid("ovs-vswitchd") for hv in (p.a, p.b)]
    return [ep.cpu_seconds() for ep in eps] + [
        process_cpu_seconds(pid) if pid else 0.0 for pid in vswitchd
    ]


def _iperf_both(
    p: OvsPair,
    seconds: int,
    reps: int,
    eps: list[Endpoint] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cpu0, t0 = _cpu(p, list(eps)), time.monotonic()
    for label, src, dst in (("a->b", p.a, p.b), ("b->a", p.b, p.a)):
        runs = []
        for _ in range(reps):
            try:
                runs.append(iperf3(src.vm, dst.vm, dst.vm_ip, seconds=seconds))
            except Exception as exc:  # OVS 3.1's VXLAN with userspace TSO carries nothing
                print(f"  {label}: {str(exc).splitlines()[0][:100]}", flush=True)
                break
        out[label] = statistics.median(runs) if runs else None
    wall = time.monotonic() - t0
    used = [round((b - a) / wall, 2) for a, b in zip(cpu0, _cpu(p, list(eps)), strict=True)]
    if eps:
        out["sttun_cpu_share_a_b"] = used[:2]
    out["vswitchd_cpu_share_a_b"] = used[-2:]
    return out


def _rx_packets(hv: Hypervisor, dev: str) -> int:
    return int(hv.ns.run(["cat", f"/sys/class/net/{dev}/statistics/rx_packets"]).stdout)


def _tunnel(ep: Endpoint) -> dict[str, Any]:
    t: dict[str, Any] = ep.show()["tunnels"][0]
    return t


def run_sttun(p: OvsPair, tmp: Path, seconds: int, reps: int) -> dict[str, Any]:
    eps: list[Endpoint] = []
    try:
        for me, peer in ((p.a, p.b), (p.b, p.a)):
            add_stt_port(me, peer.underlay_ip, KEY)
            sub = tmp / me.ns.name
            sub.mkdir(exist_ok=True)
            eps.append(start_endpoint(me.ns, ["--ovsdb", me.ovs.db_remote], [], sub))
        t0 = time.monotonic()
        for hv in (p.a, p.b):
            wait_for(lambda hv=hv: served(hv), timeout=30, what="stt0 served")
        ready = time.monotonic() - t0
        before = [_tunnel(ep) for ep in eps]
        hvs = (p.a, p.b)
        ovs_rx = [_rx_packets(hv, STT_PORT_NAME) for hv in hvs]
        speeds = _iperf_both(p, seconds, reps, eps)
        after = [_tunnel(ep) for ep in eps]
        ovs_rx = [_rx_packets(hv, STT_PORT_NAME) - n for hv, n in zip(hvs, ovs_rx, strict=True)]
        pairs = list(zip(after, before, strict=True))
        tx_f = sum(x["tx"]["frames"] - y["tx"]["frames"] for x, y in pairs)
        tx_b = sum(x["tx"]["bytes"] - y["tx"]["bytes"] for x, y in pairs)
        rx_f = sum(x["rx"]["frames"] - y["rx"]["frames"] for x, y in pairs)
        return {
            **speeds,
            "ports_ready_s": round(ready, 2),
            # STT frames are 1:1 with what sttun read from OVS (after GRO on its end)
            "bytes_per_frame_from_ovs": round(tx_b / tx_f) if tx_f else None,
            "ovs_frames_per_sttun_write": round(sum(ovs_rx) / rx_f, 2) if rx_f else None,
        }
    finally:
        for ep in eps:
            ep.stop()
        for hv in (p.a, p.b):
            hv.ovs.vsctl("--if-exists", "del-port", BRIDGE, STT_PORT_NAME)
            hv.ns.run(["ip", "link", "del", STT_PORT_NAME], check=False)


def run_vxlan(p: OvsPair, seconds: int, reps: int) -> dict[str, Any]:
    dev = "eth0"
    for hv, peer in ((p.a, p.b), (p.b, p.a)):
        ovs, ns = hv.ovs, hv.ns
        ovs.add_bridge("br-phy")
        ovs.vsctl("add-port", "br-phy", dev)
        ns.run(["ip", "addr", "flush", "dev", dev])
        ns.run(["ip", "addr", "add", f"{hv.underlay_ip}/24", "dev", "br-phy"])
        ns.run(["ip", "link", "set", "br-phy", "up"])
        ovs.vsctl("add-port", BRIDGE, "vx0", "--", "set", "interface", "vx0", "type=vxlan",
                  f"options:remote_ip={peer.underlay_ip}", f"options:key={KEY}")  # fmt: skip
        hv.vm.run(["ip", "link", "set", "eth0", "mtu", "1450"])
    for hv, peer in ((p.a, p.b), (p.b, p.a)):  # OVS resolves the peer by ARP itself
        hv.vm.run(["ping", "-c", "3", "-i", "0.3", "-W", "2", peer.vm_ip], check=False)
    return _iperf_both(p, seconds, reps)


def run_no_tunnel(p: OvsPair, seconds: int, reps: int) -> dict[str, Any]:
    """No tunnel at all: the underlay veth a port of each ``br-int``, VM MTU 1500.

    What two OVS userspace datapaths forward VM to VM with nothing but their own
    per-frame work (a port in, a port out, on each host): the ceiling for any
    tunnel port OVS forwards MTU-sized frames through, in the same mode.
    """
    dev = "eth0"
    for hv in (p.a, p.b):
        hv.ns.run(["ip", "addr", "flush", "dev", dev])
        hv.ovs.vsctl("add-port", BRIDGE, dev)
    for hv, peer in ((p.a, p.b), (p.b, p.a)):
        hv.vm.run(["ping", "-c", "3", "-i", "0.3", "-W", "2", peer.vm_ip], check=False)
    return _iperf_both(p, seconds, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tmp", default="/tmp/sttun-bench-ovs-vm")
    ap.add_argument("--modes", default="default,userspace-tso", help="OVS modes to run")
    ap.add_argument("--ports", default="sttun,ovs-vxlan,no-tunnel", help="port kinds to run")
    ap.add_argument(
        "--rmem-default",
        type=int,
        help="net.core.rmem_default (host-wide: a network namespace cannot set its "
        "own) during the run, restored after: the receive buffer of OVS's AF_PACKET "
        "sockets (default: leave it)",
    )
    args = ap.parse_args()
    if args.rmem_default is not None:
        knob = Path("/proc/sys/net/core/rmem_default")
        before = knob.read_text()
        knob.write_text(f"{args.rmem_default}\n")
        try:
            run(args)
        finally:
            knob.write_text(before)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    """The benchmark with the parsed ``args``."""
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    modes = args.modes.split(",")
    ports = args.ports.split(",")
    for mode, tso in (("default", False), ("userspace-tso", True)):
        if mode not in modes:
            continue
        with ovs_pair(userspace_tso=tso) as p:
            if "sttun" in ports:
                print(f"{mode}: OVS + sttun", flush=True)
                results[f"{mode}/sttun"] = run_sttun(p, tmp, args.seconds, args.reps)
                print(f"  {results[f'{mode}/sttun']}", flush=True)
            if "ovs-vxlan" in ports:
                print(f"{mode}: OVS VXLAN", flush=True)
                results[f"{mode}/ovs-vxlan"] = run_vxlan(p, args.seconds, args.reps)
                print(f"  {results[f'{mode}/ovs-vxlan']}", flush=True)
        if "no-tunnel" in ports:  # hosts of its own: the underlay becomes a br-int port
            with ovs_pair(userspace_tso=tso) as p:
                print(f"{mode}: OVS without a tunnel (underlay veth in br-int)", flush=True)
                results[f"{mode}/no-tunnel"] = run_no_tunnel(p, args.seconds, args.reps)
                print(f"  {results[f'{mode}/no-tunnel']}", flush=True)
    print()
    print(f"{'OVS mode / port':28} {'a->b Gbit/s':>12} {'b->a Gbit/s':>12}  notes")
    for name, r in results.items():
        cells = [f"{r[d]:.2f}" if r.get(d) is not None else "no traffic" for d in ("a->b", "b->a")]
        notes = "; ".join(f"{k} {v}" for k, v in r.items() if k not in ("a->b", "b->a"))
        print(f"{name:28} {cells[0]:>12} {cells[1]:>12}  {notes}")
    write_results(
        RESULTS,
        "ovs_vm",
        {"seconds": args.seconds, "reps": args.reps, "rmem_default": args.rmem_default, **results},
    )


if __name__ == "__main__":
    main()
