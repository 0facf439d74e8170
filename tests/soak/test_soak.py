"""Soak (issue #7): 10 minutes of mixed traffic through two real endpoints.

Bulk TCP (iperf3, paced), small UDP datagrams (iperf3 -u, 64-byte payloads) and a
ping run at the same time A -> B for ``STTUN_SOAK_SECONDS`` (default 600).  Every
10 s the RSS (``/proc/PID/status`` VmRSS) and open descriptors (``/proc/PID/fd``) of
both daemons are sampled.  After a one-minute warm-up neither may grow: RSS by at
most 10%, descriptors not at all.  At the end the counters must add up: the frames B
received plus what B counted as dropped equal the frames A sent, and the other way.

``make soak`` runs it (``pytest -m slow``); ``make test`` skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sttun.tools.topology import Host
from tests.e2e.impair import OVERLAY_B, Pair, start_pair
from tests.e2e.sttun_hosts import drops_of, ping, wait_until
from tests.netns import make_two_hosts, need_root, need_tools

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SECONDS = int(os.environ.get("STTUN_SOAK_SECONDS", "600"))
WARMUP = min(60, SECONDS // 4)
SAMPLE_EVERY = 10.0
TIMEOUT = 2.0
UDP_ARGS = ("-u", "-b", "2M", "-l", "64", "-i", "0")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rx_drops(d: dict[str, int]) -> int:
    """Receive-side drops: every reason except the transmit ones, plus tx_error (a
    failed TAP write is counted as tx_error of the tunnel)."""
    return sum(v for k, v in d.items() if not k.startswith("tx_") or k == "tx_error")


def _skmem(ns: Host) -> str:
    out = ns.run(["ss", "-0", "-m", "-n", "-a"], check=False).stdout
    return " ".join(w for w in out.split() if w.startswith("skmem:"))


def _veth_drops(ns: Host, dev: str) -> tuple[int, int]:
    st = json.loads(ns.run(["ip", "-j", "-s", "link", "show", dev]).stdout)[0]["stats64"]
    return int(st["tx"]["dropped"]), int(st["rx"]["dropped"])


def _books(p: Pair) -> tuple[int, int, int, int, int, int]:
    """(A tx frames, A rx frames, A rx drops, B tx, B rx, B rx drops)."""
    out: list[int] = []
    for ep in (p.a, p.b):
        t = ep.tunnel("stt0")
        out += [t["tx"]["frames"], t["rx"]["frames"], _rx_drops(drops_of(ep))]
    return out[0], out[1], out[2], out[3], out[4], out[5]


def _settled_books(p: Pair, a: Host) -> tuple[int, int, int, int, int, int]:
    """:func:`_books` once every frame sent so far is accounted for: one ping A -> B
    and back goes through the tunnel behind them (each daemon sends and receives in
    order), and nothing else talks on the idle tunnel (IPv6 is off on the TAPs)."""
    ping(a, OVERLAY_B, count=1)
    return _books(p)


def _iperf3_server(b: Host, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    """``iperf3 -s`` on ``port`` in ``b``, returned once it is listening."""
    log = tmp / f"iperf3-server-{port}.log"
    argv = ["iperf3", "-s", "-B", OVERLAY_B, "-p", str(port), "--forceflush"]
    proc = b.popen([*argv, "--logfile", str(log)], stdout=subprocess.DEVNULL)
    wait_until(
        lambda: proc.poll() is not None or (log.exists() and "listening" in log.read_text()),
        30,
        what=f"iperf3 server on port {port}",
    )
    assert proc.poll() is None, f"iperf3 -s exited: {log.read_text()}"
    return proc


@pytest.mark.timeout(SECONDS + 300)
def test_soak_mixed_traffic(tmp_path: Path) -> None:
    need_root()
    need_tools("iperf3", "ping")
    with (
        make_two_hosts() as h,
        start_pair(h.a, h.b, h.ip_a, h.ip_b, tmp_path, daemon={"reassembly_timeout": TIMEOUT}) as p,
    ):
        pids = {"a": p.a.show()["pid"], "b": p.b.show()["pid"]}
        # No IPv6 chatter (MLD, RS) on the TAPs: the baseline below is read while the
        # tunnel is idle, so no frame is in flight between reading A and reading B.
        for ns in (h.a, h.b):
            ns.sysctl("net.ipv6.conf.stt0.disable_ipv6", "1")
        books0 = _settled_books(p, h.a)
        servers = [_iperf3_server(h.b, port, tmp_path) for port in (5301, 5302)]
        t = str(SECONDS)
        clients = [
            h.a.popen(
                ["iperf3", "-c", OVERLAY_B, "-p", "5301", "-t", t, "-b", "200M", "-i", "0"],
                stdout=subprocess.PIPE,
                text=True,
            ),
            h.a.popen(
                [*("iperf3", "-c", OVERLAY_B, "-p", "5302", "-t", t), *UDP_ARGS],
                stdout=subprocess.PIPE,
                text=True,
            ),
            h.a.popen(
                ["ping", "-q", "-i", "0.2", "-w", t, OVERLAY_B],
                stdout=subprocess.PIPE,
                text=True,
            ),
        ]
        samples: list[tuple[float, dict[str, int], dict[str, int]]] = []
        start = time.monotonic()
        while time.monotonic() - start < SECONDS:
            elapsed = time.monotonic() - start
            samples.append(
                (
                    elapsed,
                    {k: _rss_kib(pid) for k, pid in pids.items()},
                    {k: _fds(pid) for k, pid in pids.items()},
                )
            )
            for c in clients:
                assert c.poll() in (None, 0), "a traffic generator died early"
            time.sleep(SAMPLE_EVERY)
        outs = [c.communicate(timeout=60)[0] for c in clients]
        for srv in servers:
            srv.terminate()
        samples.append(
            (
                time.monotonic() - start,
                {k: _rss_kib(pid) for k, pid in pids.items()},
                {k: _fds(pid) for k, pid in pids.items()},
            )
        )
        # let partial frames time out (each counted as a drop), then compare the books
        wait_until(
            lambda: all(ep.show()["reassembly"]["entries"] == 0 for ep in (p.a, p.b)),
            TIMEOUT + 10,
            what="no partial frames",
        )
        books = _settled_books(p, h.a)
        a_tx, a_rx, a_drops, b_tx, b_rx, b_drops = (
            x - y for x, y in zip(books, books0, strict=True)
        )
        sa, sb = p.a.tunnel("stt0"), p.b.tunnel("stt0")
        da, db = drops_of(p.a), drops_of(p.b)
        base = next(s for s in samples if s[0] >= WARMUP)
        end = samples[-1]
        report = [
            f"soak {SECONDS}s: RSS KiB start {samples[0][1]} warm {base[1]} end {end[1]}",
            f"fds start {samples[0][2]} warm {base[2]} end {end[2]}",
            f"A tx {sa['tx']} rx {sa['rx']} drops {da}",
            f"B tx {sb['tx']} rx {sb['rx']} drops {db}",
            *(o.strip().splitlines()[-4:][0] if o.strip() else "" for o in outs[:2]),
            outs[2].strip().splitlines()[-2] if outs[2].strip() else "",
            # kernel-side drops of the daemons' AF_PACKET sockets (skmem d<N>): losses
            # the daemon cannot count itself
            f"A packet sockets: {_skmem(h.a)}",
            f"B packet sockets: {_skmem(h.b)}",
            f"underlay veth drops (stats64 tx/rx dropped): A {_veth_drops(h.a, h.dev_a)} "
            f"B {_veth_drops(h.b, h.dev_b)}",
        ]
        print("\n".join(report))
        (tmp_path / "soak-report.txt").write_text("\n".join(report) + "\n")
        for k in pids:
            assert end[1][k] <= base[1][k] * 1.10, f"{k}: RSS grew {base[1][k]} -> {end[1][k]}"
            assert end[2][k] <= base[2][k], f"{k}: fds grew {base[2][k]} -> {end[2][k]}"
        assert b_rx + b_drops == a_tx, f"A -> B: sent {a_tx}, B got {b_rx} + {b_drops} dropped"
        assert a_rx + a_drops == b_tx, f"B -> A: sent {b_tx}, A got {a_rx} + {a_drops} dropped"
        assert " 0 received" not in outs[2], "no ping reply at all"
