"""``sttun up`` with the kernel receive fast path (``[daemon] fastpath``), end to end.

Two namespaces on a veth, ``sttun up`` in each.  Checks that the daemon attaches
the program and binds its sockets per protocol (ping: no DUP replies), that the
program's counters reach ``sttun show``, that a TCP transfer completes with the
fast path carrying its share, that the tunnel map follows SIGHUP reloads, that a
program the verifier refuses falls back (``auto``) or stops the start (``on``), and
that a SIGKILLed daemon leaves no program on the interface.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sttun.io.ebpf.attach import tcx_ingress_programs
from sttun.io.rx_fastpath import FORCE_INVALID_ENV
from tests.e2e.sttun_hosts import (
    OVERLAY6_B,
    OVERLAY_A,
    OVERLAY_B,
    Endpoint,
    config_toml,
    start_endpoint,
    tunnel_pair,
    wait_until,
)
from tests.netns import TwoHosts, make_two_hosts, need_fastpath, need_tools

pytestmark = pytest.mark.netns

KEY = 42
OTHER_KEY = 43
OTHER_A, OTHER_B = "198.51.100.1", "198.51.100.2"


@pytest.fixture(autouse=True)
def _supported() -> None:
    need_fastpath()


def _underlay(ep: Endpoint) -> dict[str, Any]:
    (u,) = ep.show()["underlays"]
    assert isinstance(u, dict)
    return u


def _ping(ns: Any, addr: str, count: int = 20) -> tuple[str, list[float]]:
    res = ns.run(["ping", "-c", str(count), "-i", "0.05", "-W", "2", addr], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    rtts = [float(x.split("=")[1]) for x in res.stdout.split() if x.startswith("time=")]
    return res.stdout, rtts


@pytest.mark.parametrize("underlay", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_ping_without_duplicates_and_counters_by_path(
    tmp_path: Path, mode: str, underlay: int
) -> None:
    with tunnel_pair(tmp_path, ipv6_underlay=underlay == 6, extra=["--fastpath", mode]) as t:
        _ping(t.hosts.a, OVERLAY_B, count=2)  # neighbours resolved: RTTs below are the path's
        out4, rtts = _ping(t.hosts.a, OVERLAY_B)
        out6, _ = _ping(t.hosts.a, OVERLAY6_B, count=5)
        # an ETH_P_ALL socket would also see the redirected frames: DUP! replies
        assert "DUP!" not in out4 + out6
        assert len(rtts) == 20
        ub = _underlay(t.b)
        sb = t.b.tunnel("stt0")
        fast, python = sb["rx_fastpath"], sb["rx_python"]
        assert sb["rx"]["frames"] == fast["frames"] + python["frames"]
        assert sb["rx"]["bytes"] == fast["bytes"] + python["bytes"]
        if mode == "on":
            assert ub["fastpath"]["state"] == "on" and ub["fastpath"]["attach"] == "tcx"
            assert ub["sockets"] == [f"ipv{underlay}"]
            assert fast["frames"] >= 25  # every echo request arrived whole
            assert ub["fastpath"]["errors"]["packets"] == 0
            assert t.a.tunnel("stt0")["rx_fastpath"]["frames"] >= 25  # and every reply
        else:
            assert ub["fastpath"]["state"] == "off"
            assert ub["fastpath"]["reason"] == "fastpath = off in the configuration"
            assert ub["sockets"] == ["all"]
            assert fast == {"frames": 0, "bytes": 0} and python["frames"] >= 25
        print(
            f"fastpath {mode}, IPv{underlay} underlay: ping p50 "
            f"{statistics.median(rtts):.3f} ms over {len(rtts)}; B rx fast {fast['frames']} "
            f"python {python['frames']}"
        )


@pytest.mark.parametrize("veth_tso", [True, False], ids=["tso", "wire"])
def test_iperf3_tcp_through_the_fast_path(tmp_path: Path, veth_tso: bool) -> None:
    need_tools("iperf3")
    with tunnel_pair(tmp_path, veth_tso=veth_tso, extra=["--fastpath", "on"]) as t:
        server = t.hosts.b.popen(
            ["iperf3", "-s", "-1", "--forceflush", "-B", OVERLAY_B, "-p", "5211"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert server.stdout is not None
        line = server.stdout.readline()  # blocks until iperf3 says it listens (or exits)
        assert "listening" in line.lower() or "---" in line, line
        res = t.hosts.a.run(
            ["iperf3", "-c", OVERLAY_B, "-p", "5211", "-t", "3", "-J"], check=False, timeout=120
        )
        server.wait(timeout=30)
        data = json.loads(res.stdout)
        assert "error" not in data, data["error"]
        received = data["end"]["sum_received"]
        retransmits = data["end"]["sum_sent"].get("retransmits")
        assert received["bytes"] > 0
        sb = t.b.tunnel("stt0")
        fast, python = sb["rx_fastpath"]["frames"], sb["rx_python"]["frames"]
        share = fast / (fast + python)
        assert fast > 0
        if veth_tso:
            # GSO frames cross the veth whole: the program takes (nearly) all of them
            assert share > 0.5
        passed = _underlay(t.b)["fastpath"]["passed"]
        print(
            f"{'tso' if veth_tso else 'wire'}: {received['bits_per_second'] / 1e9:.2f} Gbit/s, "
            f"retransmits {retransmits}; B rx frames fast {fast} python {python} "
            f"(fast share {share:.1%}); passed {_nonzero(passed)}"
        )


def _nonzero(passed: dict[str, dict[str, int]]) -> dict[str, int]:
    return {r: c["packets"] for r, c in passed.items() if c["packets"]}


def _start_pair(
    h: TwoHosts, tmp: Path, mode_b: str, env_b: dict[str, str] | None = None
) -> tuple[Endpoint, Endpoint]:
    common = ["--key", str(KEY), "--dev", "stt0"]
    a = start_endpoint(
        h.a, ["--local-ip", h.ip_a, "--remote-ip", h.ip_b, "--fastpath", "off", *common],
        ["stt0"], tmp,
    )  # fmt: skip
    b = start_endpoint(
        h.b, ["--local-ip", h.ip_b, "--remote-ip", h.ip_a, "--fastpath", mode_b, *common],
        ["stt0"], tmp, env=env_b,
    )  # fmt: skip
    for ns, addr in ((h.a, OVERLAY_A), (h.b, OVERLAY_B)):
        ns.run(["ip", "addr", "add", f"{addr}/24", "dev", "stt0"])
    return a, b


def test_forced_verifier_rejection_with_auto_falls_back(tmp_path: Path) -> None:
    with make_two_hosts() as h:
        a, b = _start_pair(h, tmp_path, "auto", {FORCE_INVALID_ENV: "1"})
        try:
            out, _ = _ping(h.a, OVERLAY_B, count=10)
            assert "DUP!" not in out
            u = _underlay(b)
            assert u["fastpath"]["state"] == "off" and u["sockets"] == ["all"]
            assert "verifier rejected" in u["fastpath"]["reason"]
            tb = b.tunnel("stt0")
            assert tb["rx_python"]["frames"] >= 10 and tb["rx_fastpath"]["frames"] == 0
            lines = [ln for ln in b.log_text().splitlines() if "verifier rejected" in ln]
            assert len(lines) == 1 and "WARNING" in lines[0], b.log_text()
            assert "receiving on" in lines[0] and "in Python" in lines[0]
        finally:
            assert b.stop() == 0, b.log_text()
            assert a.stop() == 0, a.log_text()


def test_forced_verifier_rejection_with_on_stops_the_start(tmp_path: Path) -> None:
    with make_two_hosts() as h:
        argv = [
            sys.executable, "-m", "sttun", "up", "--local-ip", h.ip_b, "--remote-ip", h.ip_a,
            "--key", str(KEY), "--dev", "stt0", "--fastpath", "on", "--instance", "fpon",
            "--control-socket", str(tmp_path / "b.sock"),
        ]  # fmt: skip
        proc = h.b.popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, FORCE_INVALID_ENV: "1"},
        )
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("sttun: error:")]
        assert "fastpath = on" in line and "verifier rejected" in line, err
        # nothing left behind: no TAP, no nftables table, no program
        assert h.b.run(["ip", "link", "show", "stt0"], check=False).returncode != 0
        assert "sttun_fpon" not in h.b.run(["nft", "list", "tables"]).stdout
        with h.b.entered():
            assert tcx_ingress_programs(socket.if_nametoindex(h.dev_b)) == []


def test_sigkill_leaves_no_program_attached(tmp_path: Path) -> None:
    with make_two_hosts() as h:
        a, b = _start_pair(h, tmp_path, "on")
        try:
            prog_id = _underlay(b)["fastpath"]["program_id"]
            with h.b.entered():
                index = socket.if_nametoindex(h.dev_b)
                assert tcx_ingress_programs(index) == [prog_id]
                b.proc.send_signal(signal.SIGKILL)
                b.proc.wait(timeout=10)
                # the TCX link goes with the daemon's last descriptor (freed just after
                # the process is reaped)
                wait_until(lambda: tcx_ingress_programs(index) == [], what="link released")
            # a new daemon attaches again on the same interface (the killed one's TAP
            # went with its descriptor)
            again = tmp_path / "again"
            again.mkdir()
            b = start_endpoint(
                h.b,
                ["--local-ip", h.ip_b, "--remote-ip", h.ip_a, "--key", str(KEY),
                 "--dev", "stt0", "--fastpath", "on"],
                ["stt0"], again,
            )  # fmt: skip
            with h.b.entered():
                assert tcx_ingress_programs(index) == [_underlay(b)["fastpath"]["program_id"]]
        finally:
            b.stop()
            assert a.stop() == 0, a.log_text()


def test_tunnel_map_follows_reloads(tmp_path: Path) -> None:
    """SIGHUP adds a tunnel (the program delivers it), changes one (served again),
    removes one (its frames go to Python, which counts unknown_context)."""
    with make_two_hosts() as h:
        t1 = {"name": "stt0", "key": KEY}
        t2 = {"name": "stt1", "key": OTHER_KEY}
        a_cfg = config_toml(
            [{**t, "local_ip": h.ip_a, "remote_ip": h.ip_b} for t in (t1, t2)], fastpath="off"
        )
        b_tunnels = [{**t1, "local_ip": h.ip_b, "remote_ip": h.ip_a}]
        a = start_endpoint(h.a, [], ["stt0", "stt1"], tmp_path, config=a_cfg)
        b = start_endpoint(
            h.b, [], ["stt0"], tmp_path, config=config_toml(b_tunnels, fastpath="on")
        )
        b_file = tmp_path / f"{h.b.name}.toml"
        try:
            for ns, x in ((h.a, OVERLAY_A), (h.b, OVERLAY_B)):
                ns.run(["ip", "addr", "add", f"{x}/24", "dev", "stt0"])
            h.a.run(["ip", "addr", "add", f"{OTHER_A}/24", "dev", "stt1"])

            def reload(tunnels: list[dict[str, Any]], devs: list[str]) -> None:
                before = b.log_text().count("configuration reloaded")
                b_file.write_text(config_toml(tunnels, fastpath="on"))
                b.proc.send_signal(signal.SIGHUP)
                wait_until(
                    lambda: b.log_text().count("configuration reloaded") > before,
                    what="reload",
                )
                assert sorted(t["name"] for t in b.show()["tunnels"]) == devs

            # added
            b_tunnels.append({**t2, "local_ip": h.ip_b, "remote_ip": h.ip_a})
            reload(b_tunnels, ["stt0", "stt1"])
            h.b.run(["ip", "addr", "add", f"{OTHER_B}/24", "dev", "stt1"])
            _ping(h.a, OTHER_B, count=5)
            assert b.tunnel("stt1")["rx_fastpath"]["frames"] >= 5
            # changed (pipe DSCP model): served by the program again
            b_tunnels[1] = {**b_tunnels[1], "tos": 0}
            reload(b_tunnels, ["stt0", "stt1"])
            before = b.tunnel("stt1")["rx_fastpath"]["frames"]  # (IPv6 ND/MLD may arrive)
            _ping(h.a, OTHER_B, count=5)
            assert b.tunnel("stt1")["rx_fastpath"]["frames"] >= before + 5
            # removed: its frames are no tunnel's for the program; Python counts them
            del b_tunnels[1]
            reload(b_tunnels, ["stt0"])
            passed0 = _underlay(b)["fastpath"]["passed"]["unknown_tunnel"]["packets"]
            h.a.run(["ping", "-c", "3", "-i", "0.05", "-W", "1", OTHER_B], check=False)
            wait_until(
                lambda: b.show()["drops"].get("unknown_context", 0) >= 3,
                what="unknown_context drops",
            )
            passed1 = _underlay(b)["fastpath"]["passed"]["unknown_tunnel"]["packets"]
            assert passed1 >= passed0 + 3
            # the remaining tunnel still works through the program
            _ping(h.a, OVERLAY_B, count=5)
            assert b.tunnel("stt0")["rx_fastpath"]["frames"] >= 5
        finally:
            assert b.stop() == 0, b.log_text()
            assert a.stop() == 0, a.log_text()
