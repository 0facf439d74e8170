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
remove them; ``--down`` removes what ``--keep`` runs left.

Output: rich on a terminal, plain lines otherwise (CI logs).  Exit status 0 when
every check passed, 1 when one failed or the set-up broke, 2 when the machine
cannot run the demo (not root, no TAP support), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sttun import __version__
from sttun.errors import SetupError
from sttun.tools.report import human_bytes
from sttun.tools.topology import (
    STT_DEV,
    UNDERLAY_DEV,
    Endpoint,
    Host,
    TwoHosts,
    check_support,
    remove_stale,
)
from sttun.wire.stt import STT_PORT

#: Namespaces of the demo are called ``sttun-demo-<suffix>-a`` / ``-b``.
PREFIX = "sttun-demo"
#: The tunnel's context id.
KEY = 0x5747
TRANSFER_PORT = 5301
IPERF_PORT = 5302
IPERF_SECONDS = 3
PYTHON_BULK_BYTES = 256 * 1024 * 1024
CHECK_BYTES = 4 * 1024 * 1024
PING_COUNT = 10

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNSUPPORTED = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------ results


@dataclass
class Check:
    """One line of the final report."""

    name: str
    ok: bool | None  # None: skipped / informational
    detail: str


@dataclass
class Report:
    """Everything the demo found out."""

    title: str
    checks: list[Check] = field(default_factory=list)
    counters: list[list[str]] = field(default_factory=list)

    def add(self, name: str, ok: bool | None, detail: str) -> Check:
        """Record a check and return it."""
        check = Check(name, ok, detail)
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        """True when no check failed."""
        return all(c.ok is not False for c in self.checks)


# ------------------------------------------------------------------------ display


class Display:
    """Step-by-step progress: a rich spinner per step on a terminal, plain lines else."""

    def __init__(self, rich: bool) -> None:
        self.rich = rich
        self._console: Any = None
        self._n = 0
        if rich:
            from rich.console import Console

            self._console = Console(highlight=False)

    def line(self, text: str) -> None:
        """A line of text."""
        if self._console is not None:
            self._console.print(text, markup=False)
        else:
            print(text, flush=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        """Run a step; yields ``update(text)`` to show live progress under the title.

        The step's outcome line is printed by :meth:`done` (or ``failed`` when the
        block raises).
        """
        self._n += 1
        label = f"[{self._n}] {title}"
        if self._console is None:
            print(f"{label} ...", flush=True)
            yield lambda text: None
            return
        with self._console.status(label) as status:

            def update(text: str) -> None:
                status.update(f"{label} — {text}")

            try:
                yield update
            except BaseException:
                self._console.print(f"[red]✗[/red] {label}")
                raise

    def done(self, check: Check) -> None:
        """Show a step's result."""
        mark = {True: "ok", False: "FAIL", None: "skip"}[check.ok]
        if self._console is not None:
            colour = {True: "green", False: "red", None: "yellow"}[check.ok]
            sym = {True: "✓", False: "✗", None: "–"}[check.ok]
            self._console.print(f"[{colour}]{sym}[/{colour}] {check.name}: {_escape(check.detail)}")
        else:
            print(f"    {mark}: {check.name}: {check.detail}", flush=True)

    def report(self, report: Report) -> None:
        """The one-screen final report."""
        verdict = "PASS" if report.passed else "FAIL"
        if self._console is not None:
            from rich.panel import Panel
            from rich.table import Table

            table = Table.grid(padding=(0, 2))
            table.add_column(style="bold", no_wrap=True)
            table.add_column(no_wrap=True)
            table.add_column()
            for c in report.checks:
                mark = {
                    True: "[green]ok[/green]",
                    False: "[red]FAIL[/red]",
                    None: "[yellow]–[/yellow]",
                }[c.ok]
                table.add_row(c.name, mark, _escape(c.detail))
            counters = Table(box=None, padding=(0, 2), show_edge=False)
            for i, h in enumerate(_COUNTER_HEADINGS):
                counters.add_column(h, justify="right" if i else "left")
            for row in report.counters:
                counters.add_row(*row)
            colour = "green" if report.passed else "red"
            body = Table.grid()
            body.add_row(table)
            if report.counters:
                body.add_row("")
                body.add_row(counters)
            self._console.print(
                Panel(
                    body,
                    title=f"{report.title} — [{colour}]{verdict}[/{colour}]",
                    title_align="left",
                )
            )
            return
        print("", flush=True)
        print(f"=== {report.title}: {verdict} ===")
        width = max(len(c.name) for c in report.checks) if report.checks else 0
        for c in report.checks:
            mark = {True: "ok", False: "FAIL", None: "-"}[c.ok]
            print(f"{c.name.ljust(width)}  {mark.ljust(4)}  {c.detail}")
        if report.counters:
            print("")
            print(_plain_table(list(_COUNTER_HEADINGS), report.counters))
        print(f"result: {verdict}", flush=True)


_COUNTER_HEADINGS = (
    "endpoint",
    "tx frames",
    "tx bytes",
    "tx segs",
    "rx frames",
    "rx bytes",
    "rx segs",
    "drops",
)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _plain_table(headings: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headings, *rows]) for i in range(len(headings))]
    lines = []
    for row in [headings, *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------ helpers


def gbits(bits_per_second: float) -> str:
    """``3.2e9`` → ``"3.20 Gbit/s"`` (Mbit/s below 1 Gbit/s)."""
    if bits_per_second >= 1e9:
        return f"{bits_per_second / 1e9:.2f} Gbit/s"
    return f"{bits_per_second / 1e6:.1f} Mbit/s"


_RTT_LINE = re.compile(r"time=([\d.]+) ms")


def ping_rtts(output: str) -> list[float]:
    """The per-reply RTTs (ms) in ``ping`` output."""
    return [float(m) for m in _RTT_LINE.findall(output)]


def _tx_bytes(ep: Endpoint) -> int:
    try:
        tunnels = ep.show(timeout=1.0).get("tunnels") or []
    except Exception:
        return 0
    return sum(int((t.get("tx") or {}).get("bytes", 0)) for t in tunnels)


def _watch(
    proc: subprocess.Popen[Any], ep: Endpoint, update: Callable[[str], None], timeout: float
) -> None:
    """Wait for ``proc``, showing the tunnel's live transmit rate from ``ep``'s counters."""
    deadline = time.monotonic() + timeout
    last_t, last_b = time.monotonic(), _tx_bytes(ep)
    total = 0
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SetupError(f"the transfer did not finish in {timeout:g}s")
        time.sleep(0.25)
        now, b = time.monotonic(), _tx_bytes(ep)
        if b >= last_b and now > last_t:
            total += b - last_b
            rate = gbits((b - last_b) * 8 / (now - last_t))
            update(f"{rate} through the tunnel, {human_bytes(total)}")
        last_t, last_b = now, b


# The built-in transfer: a receiver that hashes what it gets, and a sender.
_RECEIVER = """\
import hashlib, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); print('ready', flush=True)
s.settimeout(60); c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    h.update(d); n += len(d)
c.sendall(b'k'); c.close()
print(n, h.hexdigest(), flush=True)
"""

_SENDER = """\
import hashlib, os, socket, sys, time
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(1 << 20); h = hashlib.sha256(); sent = 0
s = socket.create_connection((addr, port), timeout=60)
t0 = time.monotonic()
while sent < total:
    b = block[: total - sent]
    s.sendall(b); h.update(b); sent += len(b)
    block = block[1:] + block[:1]
s.shutdown(socket.SHUT_WR); s.recv(1); dt = time.monotonic() - t0
print(sent, h.hexdigest(), dt, flush=True)
"""


@dataclass
class Transfer:
    """Result of the built-in transfer."""

    sent: int
    received: int
    match: bool
    seconds: float
    digest: str


def python_transfer(
    hosts: TwoHosts,
    nbytes: int,
    ep: Endpoint,
    update: Callable[[str], None],
    port: int = TRANSFER_PORT,
) -> Transfer:
    """Send ``nbytes`` random bytes from a to b over TCP; compare sha256 at both ends."""
    addr = hosts.overlay[1]
    rx = hosts.b.popen(
        [sys.executable, "-c", _RECEIVER, addr, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert rx.stdout is not None
        if rx.stdout.readline().strip() != "ready":
            raise SetupError(f"transfer receiver did not start: {_read_err(rx)}")
        tx = hosts.a.popen(
            [sys.executable, "-c", _SENDER, addr, str(port), str(nbytes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _watch(tx, ep, update, timeout=300)
            out, err = tx.communicate()
        finally:
            if tx.poll() is None:
                tx.kill()
                tx.wait()
        if tx.returncode != 0:
            raise SetupError(f"transfer sender failed: {err.strip().splitlines()[-1:]}")
        sent, digest, seconds = out.split()
        rout, _ = rx.communicate(timeout=60)
        got = rout.split()
        received = int(got[0]) if got else 0
        return Transfer(int(sent), received, got[1:2] == [digest], float(seconds), digest)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


def _read_err(proc: subprocess.Popen[str]) -> str:
    with contextlib.suppress(Exception):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        return (err or "").strip()[-200:]
    return ""


def iperf3_bulk(
    hosts: TwoHosts, ep: Endpoint, update: Callable[[str], None], seconds: int = IPERF_SECONDS
) -> dict[str, Any]:
    """iperf3 from a to b over the tunnel for ``seconds``; the client's JSON result."""
    addr = hosts.overlay[1]
    server = hosts.b.popen(
        ["iperf3", "-s", "-1", "--forceflush", "-B", addr, "-p", str(IPERF_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if "listening" not in line.lower() and "----" not in line:
            raise SetupError(f"iperf3 server did not start: {line.strip()}")
        client = hosts.a.popen(
            ["iperf3", "-c", addr, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _watch(client, ep, update, timeout=seconds + 30)
            out, err = client.communicate()
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        try:
            result: dict[str, Any] = json.loads(out)
        except json.JSONDecodeError as e:
            raise SetupError(f"iperf3 gave no result: {err.strip() or out.strip()[:200]}") from e
        if "error" in result:
            raise SetupError(f"iperf3: {result['error']}")
        return result
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


class Capture:
    """tcpdump on the underlay of one host, written to ``path``."""

    def __init__(self, host: Host, path: Path, bpf: str) -> None:
        self.host, self.path = host, path
        self.proc = host.popen(
            ["tcpdump", "-i", UNDERLAY_DEV, "-n", "-U", "-Z", "root", "-s", "0",
             "-B", "16384", "-w", str(path), *bpf.split()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if b"listening on" not in line:
            self.stop()
            raise SetupError(f"tcpdump did not start: {line.decode(errors='replace').strip()}")

    def stop(self) -> None:
        """Stop tcpdump (SIGINT) and wait for the file to be complete."""
        if self.proc.poll() is None:
            time.sleep(0.3)  # let the last packets reach the capture socket
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def inspect_capture(path: Path) -> dict[str, Any] | str:
    """``sttun inspect --json`` of the capture, or a one-line reason it is unavailable."""
    try:
        import sttun.tools.inspect  # noqa: F401
    except ImportError:
        return "sttun inspect is not available in this installation"
    res = subprocess.run(
        [sys.executable, "-m", "sttun", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        err = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        return f"sttun inspect failed: {err}"
    return data


def _tshark(path: Path, prefs: list[str], fields: list[str]) -> list[list[str]]:
    argv = ["tshark", "-n", "-r", str(path)]
    for p in prefs:
        argv += ["-o", p]
    argv += ["-T", "fields", "-E", "separator=\t"]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise SetupError(f"tshark failed: {res.stderr.strip().splitlines()[-1:]}")
    return [ln.split("\t") for ln in res.stdout.splitlines() if ln.strip()]


@dataclass
class TsharkView:
    """What tshark makes of the capture."""

    packets: int
    contexts: Counter[str]
    frames: int
    sizes: list[int]
    checksums: Counter[str]
    rsts: int


def tshark_capture(path: Path) -> TsharkView:
    """Decode the capture twice with tshark: STT dissection on, and TCP checksum checks.

    With ``ip.try_heuristic_first`` (``ipv6.`` for an IPv6 underlay) tshark dissects
    the segments as STT (context id, frame length, reassembly); the ``tcp.*`` fields
    then describe the *inner* TCP, so
    the outer TCP-like checksums are checked in a second pass with plain TCP
    dissection and ``tcp.check_checksum``.
    """
    rows = _tshark(
        path,
        ["ip.try_heuristic_first:TRUE", "ipv6.try_heuristic_first:TRUE"],
        ["frame.len", "stt.context_id", "stt.pkt_len"],
    )
    contexts: Counter[str] = Counter()
    frames = 0
    sizes = []
    for r in rows:
        r += [""] * (3 - len(r))
        sizes.append(int(r[0]))
        if r[1]:
            for ctx in r[1].split(","):
                contexts[f"{int(ctx, 16):#x}"] += 1
            frames += 1
    rows = _tshark(
        path,
        ["tcp.check_checksum:TRUE"],
        [*TSHARK_CHECKSUM_FIELDS, "tcp.srcport", "tcp.flags.reset"],
    )
    checksums: Counter[str] = Counter()
    rsts = 0
    for r in rows:
        r += [""] * (5 - len(r))
        first = [x.split(",")[0] for x in r]
        checksums[tshark_checksum_verdict(*first[:3])] += 1
        if first[3] == str(STT_PORT) and first[4] in ("1", "True"):
            rsts += 1
    return TsharkView(len(rows), contexts, frames, sizes, checksums, rsts)


#: The tshark fields :func:`tshark_checksum_verdict` reads, in its argument order.
TSHARK_CHECKSUM_FIELDS = ("tcp.checksum.status", "tcp.checksum", "tcp.checksum_calculated")


def tshark_checksum_verdict(status: str, field: str, calculated: str) -> str:
    """``good``, ``bad`` or ``unverified`` for one segment, from tshark's fields.

    A segment whose checksum should be 0x0000 may carry 0xffff: the same number in
    ones' complement, and what Linux writes when it completes a checksum in software
    (``skb_checksum_help``: a sum folding to 0 is stored as ``CSUM_MANGLED_0``),
    about one segment in 65536.  Receivers accept both; tshark calls 0xffff bad
    (RFC 1624).  That one case counts as good here, every other mismatch as bad.
    """
    if status == "1":
        return "good"
    if status == "0":
        mangled_zero = field.lower() == "0xffff" and calculated.lower() == "0x0000"
        return "good" if mangled_zero else "bad"
    return "unverified"


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
                cap = Capture(h.b, pcap, f"tcp port {STT_PORT}")
                try:
                    t = python_transfer(h, CHECK_BYTES, self.a, update)
                    h.a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", h.overlay[1]], check=False)
                finally:
                    cap.stop()
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


def _down(display: Display) -> int:
    problem = check_support()
    if problem:
        print(f"sttun demo: {problem}", file=sys.stderr)
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
    """Run ``sttun demo`` with parsed ``args`` (keep, down, ipv6, mtu, offload)."""
    display = Display(_want_rich())
    if getattr(args, "down", False):
        return _down(display)
    problem = check_support()
    if problem:
        print(f"sttun demo: {problem}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    for tool in ("ping", "ethtool"):
        if shutil.which(tool) is None:
            print(f"sttun demo: the '{tool}' command is needed (apt install "
                  f"{'iputils-ping' if tool == 'ping' else tool})", file=sys.stderr)  # fmt: skip
            return EXIT_UNSUPPORTED
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
