#!/usr/bin/env python3
"""How sttun hands a 64 KB GSO frame to a switch port that takes no offloads.

Open vSwitch's userspace datapath without ``userspace-tso-enable`` reads its system
ports frame by frame with plain ``AF_PACKET`` sockets: a GSO frame must reach it as
MTU-sized frames with complete checksums.  Measured here, per mechanism, on one
namespace, with ``tcpdump -w /dev/null`` reading the switch side (a C-speed reader
standing in for ovs-vswitchd):

* ``tap-gso``: the frame written to a TAP as it is (what sttun does today; OVS drops
  it as too big - the cost floor, not a usable option);
* ``tap-python``: :func:`sttun.core.softpath.complete` segments and checksums in
  Python, one TAP write per segment;
* ``veth-kernel``: :class:`sttun.io.veth_port.VethPort` (offload off): one
  ``sendmsg`` of the GSO frame, the kernel's software GSO segments and checksums;
* ``veth-offload``: the same with offload on (frames cross whole; for OVS with
  userspace TSO);
* ``tap-mirred``: the frame written to a TAP as it is, and a tc ingress filter
  on the TAP redirecting it (``mirred egress redirect``) into a veth with
  checksum and TSO off whose peer the switch reads: kernel GSO without changing
  how sttun writes.

Prints Gbit/s of inner TCP payload the sender pushes and its CPU seconds per GB
(medians of ``--reps`` runs of ``--frames`` frames).  Never pass/fail.

    python bench/ovs_port.py [--frames 3000] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netns import Netns, tcp_frame

from sttun.core.softpath import complete
from sttun.io.tap import TapDevice
from sttun.io.veth_port import VethPort
from sttun.wire.vnet import VNET_NONE, VnetHdr

MSS = 1448
PAYLOAD = 64 * 1024 - 14 - 20 - 20 - 600  # an inner frame well inside one STT frame


@contextlib.contextmanager
def reader(ns: Netns, dev: str) -> Iterator[None]:
    proc = ns.popen(
        ["tcpdump", "-i", dev, "-n", "-w", "/dev/null", "-B", "65536"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if b"listening" not in line:
        raise RuntimeError(f"tcpdump did not start: {line!r}")
    try:
        yield
    finally:
        proc.terminate()
        proc.wait()


def run_one(write: Callable[[], object], frames: int) -> tuple[float, float]:
    """(Gbit/s of payload, CPU s per GB) for ``frames`` calls of ``write``."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(frames):
        write()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    nbytes = frames * PAYLOAD
    return nbytes * 8 / wall / 1e9, cpu / (nbytes / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    vnet_b, frame = tcp_frame(
        "02:00:00:00:00:01", "02:00:00:00:00:02", "192.0.2.1", "192.0.2.2",
        bytes(PAYLOAD), gso_size=MSS,
    )  # fmt: skip
    vnet = VnetHdr.unpack(vnet_b)
    results: dict[str, list[tuple[float, float]]] = {}
    with Netns("bench") as ns, ns.entered():
        tap = TapDevice("swtap0", offload=True, mtu=1500)
        ns.run(["ip", "tuntap", "add", "dev", "swtap2", "mode", "tap"])
        tap2 = TapDevice("swtap2", offload=True, mtu=1500)
        ns.run(["ip", "link", "add", "swm0", "type", "veth", "peer", "name", "swm1"])
        ns.run(["ethtool", "-K", "swm0", "tx", "off", "tso", "off"])
        for dev in ("swm0", "swm1"):
            ns.run(["ip", "link", "set", dev, "up"])
        ns.run(["tc", "qdisc", "add", "dev", "swtap2", "clsact"])
        ns.run(["tc", "filter", "add", "dev", "swtap2", "ingress", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev",
                "swm0"])  # fmt: skip
        ports = {
            "veth-kernel": VethPort("swv0", offload=False, mtu=1500),
            "veth-offload": VethPort("swv1", offload=True, mtu=1500),
        }

        def tap_gso() -> None:
            tap.write(vnet_b, frame)

        def tap_python() -> None:
            for piece in complete(frame, vnet):
                tap.write(VNET_NONE, piece)

        cases: dict[str, tuple[str, Callable[[], object]]] = {
            "tap-gso": ("swtap0", tap_gso),
            "tap-python": ("swtap0", tap_python),
            "veth-kernel": ("swv0", lambda: ports["veth-kernel"].write(vnet_b, frame)),
            "veth-offload": ("swv1", lambda: ports["veth-offload"].write(vnet_b, frame)),
            "tap-mirred": ("swm1", lambda: tap2.write(vnet_b, frame)),
        }
        try:
            for _ in range(args.reps):
                for name, (dev, write) in cases.items():
                    with reader(ns, dev):
                        results.setdefault(name, []).append(run_one(write, args.frames))
        finally:
            tap.close()
            tap2.close(remove=True)
            for p in ports.values():
                p.close(remove=True)
    print(f"{'mechanism':<14} {'Gbit/s':>8} {'CPU s/GB':>9}   ({args.reps} x {args.frames} frames)")
    for name, runs in results.items():
        gbps = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{name:<14} {gbps:8.2f} {cpu:9.2f}")


if __name__ == "__main__":
    main()
