"""``sttun demo``: two hosts, an STT tunnel between them, traffic, a wire check, a report.

Builds two network namespaces on a veth underlay (:mod:`sttun.tools.topology`),
starts ``sttun up`` in each and then, one step at a time with a live display:

1. pings across the tunnel (RTT);
2. a bulk TCP transfer: iperf3 if installed, else a built-in Python transfer;
3. a wire check: a second transfer (sha256 compared end to end) while tcpdump
   captures the underlay, with the underlay's offloads off so that the capture holds
   real MTU-sized segments with final checksums; the capture is decoded by
   ``sttun inspect`` and, where installed, by tshark (context id, segment sizes,
   outer TCP checksums, no RST from the STT port);
4. the endpoints' own counters.

Then a one-screen report, and everything is removed again (also on Ctrl-C, SIGTERM
or a failure).  ``--keep`` leaves the hosts running and prints how to enter and
remove them; ``--down`` removes what ``--keep`` runs left.  ``--ovs`` runs the Open
vSwitch variant instead (:mod:`sttun.tools.demo_ovs`: OVS's old ``type=stt`` port
served by ``sttun up --ovsdb``, VM to VM).

The pieces live in their own modules: the test bed in :mod:`sttun.tools.topology`,
the traffic in :mod:`sttun.tools.traffic`, the capture in :mod:`sttun.tools.capture`,
its decoding in :mod:`sttun.tools.wire_check`, the display and report in
:mod:`sttun.tools.demo_report`; this module runs the steps in order.

Output: rich on a terminal, plain lines otherwise (CI logs).  Exit status 0 when
every check passed, 1 when one failed or the set-up broke, 2 when the machine
cannot run the demo (not root, no TAP support), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from sttun import __version__
from sttun.errors import SetupError
from sttun.tools.capture import Capture
from sttun.tools.demo_report import Display, Report
from sttun.tools.report import human_bytes
from sttun.tools.topology import (
    STT_DEV,
    UNDERLAY_DEV,
    Endpoint,
    TwoHosts,
    check_support,
    remove_stale,
)
from sttun.tools.traffic import (
    IPERF_SECONDS,
    Transfer,
    gbits,
    iperf3_bulk,
    ping_rtts,
    python_transfer,
)
from sttun.tools.wire_check import inspect_capture, tshark_capture
from sttun.wire.stt import STT_PORT

#: Namespaces of the demo are called ``sttun-demo-<suffix>-a`` / ``-b``.
PREFIX = "sttun-demo"
#: The tunnel's context id.
KEY = 0x5747
PYTHON_BULK_BYTES = 256 * 1024 * 1024
CHECK_BYTES = 4 * 1024 * 1024
PING_COUNT = 10

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNSUPPORTED = 2
EXIT_INTERRUPTED = 130


def _counter_row(label: str, data: dict[str, Any]) -> list[str]:
    tx: dict[str, int] = {"frames": 0, "bytes": 0, "segments": 0}
    rx = dict(tx)
    drops = sum((data.get("drops") or {}).values())
    for t in data.get("tunnels") or []:
        for total, part in ((tx, t.get("tx") or {}), (rx, t.get("rx") or {})):
            for k in total:
                total[k] += int(part.get(k, 0))
        drops += sum((t.get("drops") or {}).values())
    return [
        label,
        str(tx["frames"]),
        human_bytes(tx["bytes"]),
        str(tx["segments"]),
        str(rx["frames"]),
        human_bytes(rx["bytes"]),
        str(rx["segments"]),
        str(drops),
    ]


# ------------------------------------------------------------------------ the demo


class Demo:
    """One run of the demo (the steps, in order)."""

    def __init__(self, args: argparse.Namespace, display: Display) -> None:
        self.args = args
        self.ui = display
        self.hosts = TwoHosts(prefix=PREFIX, ipv6=bool(args.ipv6))
        self.report = Report(
            f"sttun {__version__} demo: {'IPv6' if args.ipv6 else 'IPv4'} underlay, "
            f"overlay MTU {args.mtu}, offloads {'on' if args.offload else 'off'}"
        )
        self.a: Endpoint | None = None
        self.b: Endpoint | None = None

    def _check(self, name: str, ok: bool | None, detail: str) -> None:
        self.ui.done(self.report.add(name, ok, detail))

    def run(self) -> None:
        """Every step; raises :class:`SetupError` when the set-up itself breaks."""
        h = self.hosts
        ua, ub, _ = h.underlay
        with self.ui.step("build two hosts"):
            h.build()
        self._check(
            "hosts",
            True,
            f"{h.a.name} ({ua}) <-> {h.b.name} ({ub}) on a veth pair, MTU {h.underlay_mtu}",
        )
        with self.ui.step("start an sttun endpoint in each host"):
            self.a, self.b = h.start_sttun(
                key=KEY, mtu=self.args.mtu, offload=self.args.offload, detach=self.args.keep,
                instance="demo",
            )  # fmt: skip
        oa, ob, _ = h.overlay
        self._check(
            "tunnel",
            True,
            f"{STT_DEV}: {oa} <-> {ob}, context id {KEY:#x}, port {STT_PORT}, "
            f"pids {self.a.pid}/{self.b.pid}",
        )
        self.ping()
        self.bulk()
        self.wire_check()
        self.counters()

    def ping(self) -> None:
        """Ping b's overlay address from a."""
        h = self.hosts
        ob = h.overlay[1]
        with self.ui.step(f"ping {ob} across the tunnel") as update:
            # the first packet waits for ARP over the tunnel: give it a few tries
            for _ in range(10):
                warm = h.a.run(["ping", "-c", "1", "-W", "1", ob], check=False, timeout=10)
                if warm.returncode == 0:
                    break
            update(f"{PING_COUNT} pings")
            res = h.a.run(
                ["ping", "-c", str(PING_COUNT), "-i", "0.1", "-W", "2", ob], check=False, timeout=60
            )
        rtts = ping_rtts(res.stdout)
        if not rtts:
            self._check("ping", False, f"no replies from {ob}")
            return
        self._check(
            "ping",
            len(rtts) == PING_COUNT,
            f"{len(rtts)}/{PING_COUNT} replies, RTT min/median/max "
            f"{min(rtts):.3f}/{statistics.median(rtts):.3f}/{max(rtts):.3f} ms",
        )

    def bulk(self) -> None:
        """Bulk TCP a -> b: iperf3, or the built-in transfer."""
        assert self.a is not None
        if shutil.which("iperf3"):
            with self.ui.step(f"bulk TCP with iperf3 for {IPERF_SECONDS} s") as update:
                result = iperf3_bulk(self.hosts, self.a, update)
            end = result.get("end", {})
            rx = end.get("sum_received", {})
            retr = end.get("sum_sent", {}).get("retransmits", 0)
            bps = float(rx.get("bits_per_second", 0.0))
            self._check(
                "bulk TCP",
                bps > 0,
                f"iperf3 {IPERF_SECONDS} s: {gbits(bps)}, {human_bytes(rx.get('bytes', 0))} "
                f"received, {retr} retransmits",
            )
            return
        with self.ui.step(
            f"bulk TCP: {human_bytes(PYTHON_BULK_BYTES)} (iperf3 not installed)"
        ) as u:
            t = python_transfer(self.hosts, PYTHON_BULK_BYTES, self.a, u)
        self._check(
            "bulk TCP",
            t.match and t.received == t.sent,
            f"built-in transfer {human_bytes(t.sent)} in {t.seconds:.2f} s: "
            f"{gbits(t.sent * 8 / max(t.seconds, 1e-9))}, sha256 "
            f"{'match' if t.match else 'MISMATCH'}",
        )

    def wire_check(self) -> None:
        """Capture the underlay during a transfer; decode with sttun inspect and tshark."""
        h = self.hosts
        assert self.a is not None
        if not shutil.which("tcpdump"):
            with self.ui.step(f"transfer {human_bytes(CHECK_BYTES)} with sha256") as update:
                t = python_transfer(h, CHECK_BYTES, self.a, update)
            self._transfer_check(t)
            self._check("wire check", None, "tcpdump is not installed: no capture")
            return
        pcap = h.state_dir / "underlay.pcap"
        with self.ui.step(
            f"capture the underlay while sending {human_bytes(CHECK_BYTES)} (sha256)"
        ) as update:
            # real segments with final checksums on the wire: no TSO, no checksum
            # offload on either veth end, no GRO merging at the receiver
            for host in h.hosts:
                h.set_underlay_offloads(host, tx=False, tso=False, gso=False, gro=False)
            try:
                with Capture(h.b, UNDERLAY_DEV, pcap, f"tcp port {STT_PORT}"):
                    t = python_transfer(h, CHECK_BYTES, self.a, update)
                    h.a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", h.overlay[1]], check=False)
            finally:
                for host in h.hosts:
                    h.set_underlay_offloads(host, tx=True, tso=True, gso=True)
        self._transfer_check(t)
        self._inspect(pcap)
        self._tshark(pcap)

    def _transfer_check(self, t: Transfer) -> None:
        self._check(
            "integrity",
            t.match and t.sent == t.received,
            f"{human_bytes(t.sent)} sent, {human_bytes(t.received)} received, sha256 "
            f"{'match' if t.match else 'MISMATCH'} ({t.digest[:16]}…)",
        )

    def _inspect(self, pcap: Path) -> None:
        with self.ui.step("decode the capture with sttun inspect"):
            data = inspect_capture(pcap)
        if isinstance(data, str):
            self._check("sttun inspect", None, data)
            return
        rows = data.get("rows") or []
        ctxs = sorted({str(r.get("hex", r.get("context_id"))) for r in rows})
        errors = sum(int(r.get("errors", 0)) for r in rows)
        sums = data.get("checksums") or {}
        ok = ctxs == [f"{KEY:#x}"] and errors == 0 and int(data.get("frames", 0)) > 0
        self._check(
            "sttun inspect",
            ok,
            f"context id {', '.join(ctxs) or 'none'}: {data.get('frames', 0)} frames in "
            f"{data.get('segments', 0)} segments, {errors} errors, checksums "
            f"{sums.get('verified', '?')} verified / {sums.get('offloaded', '?')} offloaded",
        )

    def _tshark(self, pcap: Path) -> None:
        if not shutil.which("tshark"):
            self._check("tshark", None, "tshark is not installed")
            return
        with self.ui.step("decode the capture with tshark"):
            v = tshark_capture(pcap)
        ctxs = sorted(v.contexts)
        sizes = v.sizes or [0]
        bad = v.checksums.get("bad", 0)
        good = v.checksums.get("good", 0)
        ok = ctxs == [f"{KEY:#x}"] and bad == 0 and good > 0 and v.rsts == 0
        self._check(
            "tshark",
            ok,
            f"context id {', '.join(ctxs) or 'none'}: {v.frames} STT frames in {v.packets} "
            f"segments of {min(sizes)}-{max(sizes)} bytes; TCP checksums {good} good, "
            f"{bad} bad; {v.rsts} RST from port {STT_PORT}",
        )

    def counters(self) -> None:
        """The endpoints' own counters."""
        assert self.a is not None and self.b is not None
        with self.ui.step("read the endpoints' counters"):
            data = [
                (host.name[-1:], ep.show())
                for host, ep in zip(self.hosts.hosts, (self.a, self.b), strict=True)
            ]
        self.report.counters = [_counter_row(f"host {n}", d) for n, d in data]
        reasons: Counter[str] = Counter()
        for _, d in data:
            reasons.update(d.get("drops") or {})
            for t in d.get("tunnels") or []:
                reasons.update(t.get("drops") or {})
        why = ", ".join(f"{r} {n}" for r, n in reasons.most_common())
        alive = self.a.alive() and self.b.alive()
        self._check(
            "endpoints",
            alive,
            f"both running; {sum(reasons.values())} drop(s) counted{f' ({why})' if why else ''}"
            if alive
            else "an endpoint stopped during the demo",
        )

    def keep(self) -> None:
        """Leave the hosts running; print how to use and remove them."""
        self.hosts.keep()
        self.ui.line("")
        self.ui.line("The hosts keep running.  Enter them with:")
        for cmd in self.hosts.enter_commands():
            self.ui.line(f"  {cmd}")
        oa, ob, _ = self.hosts.overlay
        self.ui.line(f"  ip netns exec {self.hosts.a.name} ping {ob}")
        for host, ep in zip(self.hosts.hosts, (self.a, self.b), strict=True):
            if ep is not None:
                self.ui.line(
                    f"  {sys.executable} -m sttun show --control-socket {ep.control_socket}"
                    f"   # {host.name}"
                )
        self.ui.line("Remove them with:")
        self.ui.line("  sttun demo --down")
        _ = oa

    def close(self) -> None:
        """Remove everything (quietly reports a failure to remove)."""
        try:
            self.hosts.close()
        except SetupError as e:
            print(f"sttun demo: cleaning up: {e}", file=sys.stderr)


def _unsupported() -> bool:
    """True (and the reason said on stderr) if this machine cannot run the demo."""
    problem = check_support()
    if problem:
        print(f"sttun demo: {problem}", file=sys.stderr)
    return bool(problem)


def _down(display: Display) -> int:
    if _unsupported():
        return EXIT_UNSUPPORTED
    removed = remove_stale(PREFIX)
    if removed:
        display.line(f"removed {len(removed)} namespace(s): {', '.join(removed)}")
    else:
        display.line("no demo hosts to remove")
    return EXIT_OK


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _want_rich() -> bool:
    try:
        return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def main(args: argparse.Namespace) -> int:
    """Run ``sttun demo`` with parsed ``args`` (keep, down, ipv6, mtu, offload, ovs)."""
    display = Display(_want_rich())
    if getattr(args, "down", False):
        return _down(display)
    if _unsupported():
        return EXIT_UNSUPPORTED
    for tool in ("ping", "ethtool"):
        if shutil.which(tool) is None:
            print(f"sttun demo: the '{tool}' command is needed (apt install "
                  f"{'iputils-ping' if tool == 'ping' else tool})", file=sys.stderr)  # fmt: skip
            return EXIT_UNSUPPORTED
    demo: Any
    if getattr(args, "ovs", False):
        from sttun.tools.ovs_host import check_support as ovs_problem

        problem = ovs_problem() or ("--keep is not offered with --ovs" if args.keep else None)
        if problem:
            print(f"sttun demo --ovs: {problem}", file=sys.stderr)
            return EXIT_UNSUPPORTED
        from sttun.tools.demo_ovs import OvsDemo

        demo = OvsDemo(args, display)
    else:
        demo = Demo(args, display)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    kept = False
    status = EXIT_FAILED
    try:
        demo.run()
        display.report(demo.report)
        status = EXIT_OK if demo.report.passed else EXIT_FAILED
        if args.keep:
            demo.keep()
            kept = True
    except KeyboardInterrupt:
        display.line("interrupted: cleaning up")
        status = EXIT_INTERRUPTED
    except (SetupError, OSError) as e:
        display.line(f"sttun demo: {e}")
        if demo.report.checks:
            display.report(demo.report)
        status = EXIT_FAILED
    finally:
        # nothing may interrupt the clean-up
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if not kept:
                demo.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    return status
