"""The kernel transmit fast path (:mod:`sttun.io.tx_fastpath`) on real namespaces.

Loader: the program loads and attaches at a TAP's TCX egress (or as a tc filter),
goes away on close and with a SIGKILLed holder, and a program the verifier refuses
is a one-line :class:`FastPathError`.  Daemon: ``--tx-fastpath on`` with a refused
program stops the start leaving nothing behind, ``auto`` falls back with one log
line.  Two daemons: pings and a TCP transfer through the program (both underlay
families), the counters of ``sttun show`` adding up, ``off`` sending nothing through
it, and every checksum of a capture on B's underlay good when A's underlay finishes
partial inner checksums in software (``tx off``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sttun.io.ebpf.attach import tcx_egress_programs
from sttun.io.pcap_write import PcapWriter
from sttun.io.rx_fastpath import FastPathError
from sttun.io.tap import TapDevice
from sttun.io.tx_fastpath import TX_FORCE_INVALID_ENV, TxFastPath
from sttun.tools.wire_check import tshark_checksum_verdict
from tests.e2e.fastpath_env import CHECKSUM_FIELDS, read_pcap, tshark_rows
from tests.e2e.sttun_hosts import (
    OVERLAY6_A,
    OVERLAY6_B,
    OVERLAY_A,
    OVERLAY_B,
    Endpoint,
    TenantSpec,
    Tunnelled,
    config_pair,
    config_path,
    config_toml,
    start_endpoint,
    tcp_transfer,
    tunnel_pair,
    wait_until,
)
from tests.netns import Capture, Netns, ifname, make_two_hosts, need_fastpath, need_tools
from tests.packets import build_ipv4

pytestmark = pytest.mark.netns

KEY = 42


@pytest.fixture(autouse=True)
def _supported() -> None:
    need_fastpath()


# --------------------------------------------------------------------------- loader
@contextlib.contextmanager
def tap_in_namespace() -> Iterator[tuple[Netns, TapDevice, int]]:
    """A namespace with one TAP (up); yields it with the TAP's ifindex."""
    with Netns("txl") as ns:
        name = ifname("txt")
        with ns.entered():
            tap = TapDevice(name, mtu=1500)
            index = socket.if_nametoindex(name)
        with tap:
            yield ns, tap, index


def _tc_egress_filters(ns: Netns, dev: str) -> str:
    return ns.run(["tc", "filter", "show", "dev", dev, "egress"], check=False).stdout


def test_attach_at_tcx_egress_and_close_removes_it() -> None:
    with tap_in_namespace() as (ns, _tap, index), ns.entered():
        tx = TxFastPath.load()
        try:
            assert tcx_egress_programs(index) == []  # loaded, not attached yet
            assert tx.attach(index) == "tcx"
            assert tx.attach(index) == "tcx"  # idempotent: still one program
            assert tcx_egress_programs(index) == [tx.prog_id]
            assert tx.attached() == [index]
            c = tx.counters()
            assert c["program_id"] == tx.prog_id and c["taps"] == 1
            assert c["errors"] == {"packets": 0, "bytes": 0}
        finally:
            tx.close()
        assert tcx_egress_programs(index) == []
        assert not tx.loaded
        tx.close()  # idempotent
        with pytest.raises(FastPathError, match="closed"):
            tx.attach(index)


def test_verifier_rejection_is_a_one_line_error() -> None:
    with pytest.raises(FastPathError) as err:
        TxFastPath.load(invalid_program=True)
    prefix = "transmit fast path: the verifier rejected the program: "
    assert err.value.reason.startswith(prefix) and len(err.value.reason) > len(prefix)
    assert "\n" not in err.value.reason


def test_forced_rejection_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TX_FORCE_INVALID_ENV, "1")
    with pytest.raises(FastPathError, match="verifier rejected"):
        TxFastPath.load()
    monkeypatch.setenv(TX_FORCE_INVALID_ENV, "0")
    TxFastPath.load().close()


def test_sigkill_leaves_no_program_on_the_tap() -> None:
    with tap_in_namespace() as (ns, tap, index):
        script = (
            "import socket, sys\n"
            "from sttun.io.tx_fastpath import TxFastPath\n"
            "tx = TxFastPath.load()\n"
            f"print(tx.attach(socket.if_nametoindex({tap.name!r})), tx.prog_id, flush=True)\n"
            "sys.stdin.read()\n"  # until killed
        )
        proc = ns.popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        mode, prog_id = proc.stdout.readline().split()
        assert mode == "tcx"
        with ns.entered():
            assert tcx_egress_programs(index) == [int(prog_id)]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            # the link goes with the last descriptor (freed just after the reaping)
            wait_until(lambda: tcx_egress_programs(index) == [], what="TCX link released")


def test_tc_fallback_attaches_and_detaches() -> None:
    with tap_in_namespace() as (ns, tap, index), ns.entered():
        with TxFastPath.load() as tx:
            assert tx.attach(index, mode="tc") == "tc"
            assert tcx_egress_programs(index) == []
            assert "sttun_tx" in _tc_egress_filters(ns, tap.name)
            tx.detach(index)
            assert "sttun_tx" not in _tc_egress_filters(ns, tap.name)
            assert tx.attached() == []
            # attached again and freed by close()
            assert tx.attach(index, mode="tc") == "tc"
            assert "sttun_tx" in _tc_egress_filters(ns, tap.name)
        assert "sttun_tx" not in _tc_egress_filters(ns, tap.name)


# --------------------------------------------------------------------------- daemon
def _ping(ns: Any, addr: str, count: int = 20) -> str:
    res = ns.run(["ping", "-c", str(count), "-i", "0.05", "-W", "2", addr], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{count} received" in res.stdout, res.stdout
    assert "DUP!" not in res.stdout, res.stdout
    out: str = res.stdout
    return out


def _tx_status(ep: Endpoint) -> dict[str, Any]:
    status: dict[str, Any] = ep.show()["tx_fastpath"]
    return status


def _nonzero(passed: dict[str, dict[str, int]]) -> dict[str, int]:
    return {r: c["packets"] for r, c in passed.items() if c["packets"]}


def test_on_with_a_refused_program_exits_1_leaving_nothing(tmp_path: Path) -> None:
    with make_two_hosts() as h:
        argv = [
            sys.executable, "-m", "sttun", "up", "--local-ip", h.ip_b, "--remote-ip", h.ip_a,
            "--key", str(KEY), "--dev", "stt0", "--fastpath", "off", "--tx-fastpath", "on",
            "--instance", "txon", "--control-socket", str(tmp_path / "b.sock"),
        ]  # fmt: skip
        proc = h.b.popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, TX_FORCE_INVALID_ENV: "1"},
        )
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("sttun: error:")]
        assert "tx_fastpath = on" in line and "verifier rejected" in line, err
        assert "Traceback" not in err
        # nothing left behind: no TAP, no nftables table, no control socket
        assert h.b.run(["ip", "link", "show", "stt0"], check=False).returncode != 0
        assert "sttun_txon" not in h.b.run(["nft", "list", "tables"]).stdout
        assert not (tmp_path / "b.sock").exists()


def test_auto_with_a_refused_program_logs_once_and_sends_in_python(tmp_path: Path) -> None:
    with make_two_hosts() as h:
        common = ["--key", str(KEY), "--dev", "stt0", "--fastpath", "off"]
        a = start_endpoint(
            h.a, ["--local-ip", h.ip_a, "--remote-ip", h.ip_b, "--tx-fastpath", "auto", *common],
            ["stt0"], tmp_path, env={TX_FORCE_INVALID_ENV: "1"},
        )  # fmt: skip
        try:
            b = start_endpoint(
                h.b, ["--local-ip", h.ip_b, "--remote-ip", h.ip_a, "--tx-fastpath", "off",
                      *common],
                ["stt0"], tmp_path,
            )  # fmt: skip
            try:
                for ns, addr in ((h.a, OVERLAY_A), (h.b, OVERLAY_B)):
                    ns.run(["ip", "addr", "add", f"{addr}/24", "dev", "stt0"])
                _ping(h.a, OVERLAY_B, count=10)
                st = _tx_status(a)
                assert st["setting"] == "auto" and st["state"] == "off"
                assert "verifier rejected" in st["reason"]
                assert st["program_id"] is None and st["taps"] == 0
                ta = a.tunnel("stt0")
                assert ta["tx_fastpath"] == {"frames": 0, "bytes": 0}
                assert ta["tx_python"]["frames"] >= 10
                lines = [ln for ln in a.log_text().splitlines() if "verifier rejected" in ln]
                assert len(lines) == 1, a.log_text()
                assert "WARNING" in lines[0] and "sending in Python" in lines[0]
                off = _tx_status(b)
                assert off["state"] == "off"
                assert off["reason"] == "tx_fastpath = off in the configuration"
            finally:
                assert b.stop() == 0, b.log_text()
        finally:
            assert a.stop() == 0, a.log_text()


def _check_tx_totals(t: dict[str, Any]) -> None:
    for k in ("frames", "bytes"):
        assert t["tx"][k] == t["tx_python"][k] + t["tx_fastpath"][k], t


def _overlay_b(family: int) -> str:
    return OVERLAY_B if family == 4 else OVERLAY6_B


@pytest.mark.parametrize("underlay", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_ping_through_the_transmit_program(tmp_path: Path, underlay: int) -> None:
    """The program takes inner frames of both IP families over either underlay family
    (across families it makes ``skb->protocol`` the outer one)."""
    extra = ["--tx-fastpath", "on", "--fastpath", "off"]
    other = 10 - underlay
    with tunnel_pair(tmp_path, ipv6_underlay=underlay == 6, extra=extra) as t:
        for family in (4, 6):  # next hops (outer and inner) resolved on both sides
            _ping(t.hosts.a, _overlay_b(family), count=2)
        before = {ep.pid: ep.show() for ep in (t.a, t.b)}
        _ping(t.hosts.a, _overlay_b(underlay), count=20)
        _ping(t.hosts.a, _overlay_b(other), count=5)
        for ep in (t.a, t.b):
            st = _tx_status(ep)
            assert st["state"] == "on" and st["taps"] == 1 and st["not_attached"] == {}
            assert st["program_id"] is not None
            assert st["errors"]["packets"] == 0, st
            tun = ep.tunnel("stt0")
            _check_tx_totals(tun)
            (tun0,) = before[ep.pid]["tunnels"]
            passed0 = before[ep.pid]["tx_fastpath"]["passed"]
            # the requests (A) and replies (B) of both families go through the
            # program, none to Python as another family's.  One may go through Python
            # behind a frame of the tunnel still queued for it (IPv6 neighbour and
            # multicast traffic on the TAP, partly left to Python, at the same moment)
            fast = tun["tx_fastpath"]["frames"] - tun0["tx_fastpath"]["frames"]
            not_ip = st["passed"]["not_ip"]["packets"] - passed0["not_ip"]["packets"]
            assert fast >= 24, (tun, st["passed"])
            assert not_ip == 0, st["passed"]
            print(
                f"IPv{underlay} underlay, {ep.host.name}: tx fast {tun['tx_fastpath']['frames']}"
                f" python {tun['tx_python']['frames']}; passed {_nonzero(st['passed'])}"
            )


def _iperf3(t: Tunnelled, addr: str, seconds: int = 2) -> dict[str, Any]:
    server = t.hosts.b.popen(
        ["iperf3", "-s", "-1", "--forceflush", "-B", addr, "-p", "5212"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()  # blocks until iperf3 says it listens (or exits)
    assert "listening" in line.lower() or "---" in line, line
    res = t.hosts.a.run(
        ["iperf3", "-c", addr, "-p", "5212", "-t", str(seconds), "-J"],
        check=False,
        timeout=120,
    )
    server.wait(timeout=30)
    data: dict[str, Any] = json.loads(res.stdout)
    assert "error" not in data, data["error"]
    return data


@pytest.mark.parametrize("underlay", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_iperf3_tcp_completes(tmp_path: Path, underlay: int) -> None:
    need_tools("iperf3")
    extra = ["--tx-fastpath", "on"]
    with tunnel_pair(tmp_path, ipv6_underlay=underlay == 6, extra=extra) as t:
        addr = _overlay_b(underlay)  # the program takes the underlay's family only
        _ping(t.hosts.a, addr, count=2)
        data = _iperf3(t, addr)
        received = data["end"]["sum_received"]
        assert received["bytes"] > 0
        retransmits = data["end"]["sum_sent"].get("retransmits")
        shares = []
        for ep in (t.a, t.b):
            tun = ep.tunnel("stt0")
            _check_tx_totals(tun)
            assert _tx_status(ep)["errors"]["packets"] == 0
            fast, total = tun["tx_fastpath"]["frames"], tun["tx"]["frames"]
            shares.append(f"{ep.host.name[-1]}: {fast}/{total} ({fast / max(total, 1):.1%})")
        # B mostly sends ACKs: the program takes them
        assert t.b.tunnel("stt0")["tx_fastpath"]["frames"] > 0
        # A's data, TCP GSO frames, too: the underlay veth has TSO (single full-size
        # segments, over one outer segment, and what queues behind them go to Python)
        a_tun = t.a.tunnel("stt0")
        a_passed = _nonzero(_tx_status(t.a)["passed"])
        assert "gso" not in a_passed, a_passed
        assert a_tun["tx_fastpath"]["bytes"] > 0.5 * a_tun["tx"]["bytes"], (a_tun, a_passed)
        print(
            f"IPv{underlay} underlay: {received['bits_per_second'] / 1e9:.2f} Gbit/s, "
            f"retransmits {retransmits}; tx fast path share {', '.join(shares)}; "
            f"A passed {_nonzero(_tx_status(t.a)['passed'])}, "
            f"B passed {_nonzero(_tx_status(t.b)['passed'])}"
        )


def test_tso_turned_off_sends_gso_frames_through_python(tmp_path: Path) -> None:
    """The program takes GSO frames only while the underlay has TSO: turned off at
    runtime, the daemon's next tick sends them through Python again (and back)."""
    extra = ["--tx-fastpath", "on"]
    with tunnel_pair(tmp_path, extra=extra) as t:
        h = t.hosts

        def gso_passed() -> int:
            n: int = _tx_status(t.a)["passed"]["gso"]["packets"]
            return n

        _ping(h.a, OVERLAY_B, count=2)
        before = t.a.tunnel("stt0")["tx_fastpath"]["bytes"]
        tcp_transfer(h.a, h.b, OVERLAY_B, 2_000_000, port=5215)
        assert t.a.tunnel("stt0")["tx_fastpath"]["bytes"] - before > 1_500_000
        assert gso_passed() == 0
        h.a.ethtool(h.dev_a, tso=False)
        time.sleep(1.5)  # the housekeeping tick rewrites the entry
        tcp_transfer(h.a, h.b, OVERLAY_B, 2_000_000, port=5216)
        off = gso_passed()
        assert off > 0
        h.a.ethtool(h.dev_a, tso=True)
        time.sleep(1.5)
        tcp_transfer(h.a, h.b, OVERLAY_B, 2_000_000, port=5217)
        assert gso_passed() == off


def test_off_sends_nothing_through_the_program(tmp_path: Path) -> None:
    with tunnel_pair(tmp_path, extra=["--tx-fastpath", "off"]) as t:
        _ping(t.hosts.a, OVERLAY_B, count=20)
        for ep in (t.a, t.b):
            st = _tx_status(ep)
            assert st["setting"] == "off" and st["state"] == "off"
            assert st["reason"] == "tx_fastpath = off in the configuration"
            assert st["program_id"] is None and st["taps"] == 0
            tun = ep.tunnel("stt0")
            assert tun["tx_fastpath"] == {"frames": 0, "bytes": 0}
            assert tun["tx_python"]["frames"] >= 20
            _check_tx_totals(tun)
            with ep.host.entered():
                assert tcx_egress_programs(socket.if_nametoindex("stt0")) == []


# --------------------------------------------------------------------------- wire checksums
_UDP_SENDER = """\
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(bytes((i + j) & 0xFF for j in range(16 + 37 * i)), (sys.argv[1], 9999))
"""

INNER_FIELDS = ["frame.number", "stt.pkt_id", "stt.flags", *CHECKSUM_FIELDS]
OUTER_FIELDS = ["frame.number", "tcp.checksum.status", "tcp.checksum", "tcp.checksum_calculated"]
STT_FLAG_PARTIAL = 0x02


def _at(values: list[str], i: int) -> str:
    return values[i] if i < len(values) else ""


def tcp_verdicts(row: dict[str, list[str]]) -> list[str]:
    """tshark's verdict on every TCP checksum of a frame, outer first."""
    return [
        tshark_checksum_verdict(
            st, _at(row["tcp.checksum"], i), _at(row["tcp.checksum_calculated"], i)
        )
        for i, st in enumerate(row["tcp.checksum.status"])
    ]


def outer_ipv6_as_ipv4(src: Path, dst: Path) -> None:
    """Copy a capture, each outer IPv6 header replaced by an IPv4 one (tshark's STT
    heuristic runs on IPv4 only; the TCP-like header, the STT header and the inner
    frame stay byte for byte)."""
    with PcapWriter(dst) as w:
        for i, f in enumerate(read_pcap(src)):
            if f[12:14] == b"\x86\xdd" and f[20] == 6:
                payload = f[54:]
                ip = build_ipv4(bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]), len(payload))
                f = f[:12] + b"\x08\x00" + ip + payload
            w.write(1_700_000_000 * 10**9 + i * 1000, f)


def checksum_problems(pcap: Path) -> tuple[list[str], list[dict[str, list[str]]]]:
    """What is not good in an underlay capture: every frame must have a good outer
    TCP checksum, a decoded STT frame, and, in an STT frame whose inner checksum is
    not partial (flag P), good inner IP/TCP/UDP/ICMP checksums (where tshark
    reassembled one); also the rows of the STT pass."""
    bad = []
    outer = tshark_rows(pcap, OUTER_FIELDS, stt=False)
    for r in outer:
        verdicts = tcp_verdicts(r)
        if verdicts[:1] != ["good"]:
            bad.append(f"frame {r['frame.number']}: outer TCP {verdicts} {r}")
    as_v4 = pcap.with_suffix(".v4.pcap")
    outer_ipv6_as_ipv4(pcap, as_v4)
    inner = tshark_rows(as_v4, INNER_FIELDS, stt=True)
    assert len(inner) == len(outer)
    for r in inner:
        n = r["frame.number"]
        if not r["stt.pkt_id"]:
            bad.append(f"frame {n}: no STT frame decoded")
            continue
        if r["stt.flags"] and int(r["stt.flags"][0], 16) & STT_FLAG_PARTIAL:
            continue  # Python's GSO frames: the receiver finishes the inner checksum
        if any(v != "good" for v in tcp_verdicts(r)):
            bad.append(f"frame {n}: inner TCP {r}")
        for f in (
            "ip.checksum.status",
            "udp.checksum.status",
            "icmp.checksum.status",
            "icmpv6.checksum.status",
        ):
            if any(v != "1" for v in r[f]):
                bad.append(f"frame {n}: {f} {r[f]}")
    return bad, inner


@pytest.mark.parametrize("underlay", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_wire_checksums_with_software_checksumming(tmp_path: Path, underlay: int) -> None:
    """A's underlay finishes partial checksums in software (``tx off``): what B's
    underlay receives from A carries only good checksums, outer and inner."""
    need_tools("tshark", "tcpdump")
    extra = ["--tx-fastpath", "on", "--fastpath", "off"]
    with tunnel_pair(tmp_path, ipv6_underlay=underlay == 6, extra=extra) as t:
        h = t.hosts
        h.a.ethtool(h.dev_a, tx=False)
        overlay_a = OVERLAY_A if underlay == 4 else OVERLAY6_A
        overlay_b = _overlay_b(underlay)  # the program takes the underlay's family only
        _ping(h.a, overlay_b, count=2)
        src = h.ip6_a if underlay == 6 else h.ip_a
        pcap = tmp_path / "b_underlay.pcap"
        before = t.a.tunnel("stt0")
        before_rx = t.b.tunnel("stt0")["rx"]["frames"]
        with Capture(h.b, h.dev_b, pcap, f"src host {src} and tcp port 7471") as cap:
            _ping(h.a, overlay_b, count=20)
            h.a.run([sys.executable, "-c", _UDP_SENDER, overlay_b, "20"])
            # short TCP transfers: from B, A's ACKs go through the program; to B, A's
            # data goes through Python (GSO)
            tcp_transfer(h.b, h.a, overlay_a, 300_000, port=5213)
            tcp_transfer(h.a, h.b, overlay_b, 100_000, port=5214)
            sent = t.a.tunnel("stt0")["tx"]["frames"] - before["tx"]["frames"]
            wait_until(
                lambda: t.b.tunnel("stt0")["rx"]["frames"] >= before_rx + sent,
                what="B received every frame A sent",
            )
        assert cap.dropped == 0
        after = t.a.tunnel("stt0")
        fast = after["tx_fastpath"]["frames"] - before["tx_fastpath"]["frames"]
        assert fast >= 40, after  # the echo requests and the datagrams at least
        # without TSO on the underlay (tx off takes it away) GSO frames go to Python
        assert _tx_status(t.a)["passed"]["gso"]["packets"] > 0
        problems, rows = checksum_problems(pcap)
        assert not problems, problems[:10]
        kernel_ids = [r for r in rows if r["stt.pkt_id"] and int(r["stt.pkt_id"][0], 16) >> 31]
        assert len(kernel_ids) >= fast  # the program's frames, with their ids' top bit
        # the program's frames carry a final inner checksum: flags 0 (C at most)
        flags = {r["stt.flags"][0] for r in kernel_ids}
        assert flags <= {"0x00", "0x01"}, flags
        print(
            f"IPv{underlay} underlay, A tx off: {len(rows)} packets captured, "
            f"{len(kernel_ids)} from the program; A tx fast {fast}"
        )


# --------------------------------------------------------------------------- daemon life
def test_no_offload_sends_every_frame_in_python(tmp_path: Path) -> None:
    """A tunnel without offloads has no entry the program could use (no_tunnel)."""
    extra = ["--tx-fastpath", "on", "--fastpath", "off"]
    with tunnel_pair(tmp_path, offload=False, extra=extra) as t:
        _ping(t.hosts.a, OVERLAY_B, count=20)
        st = _tx_status(t.a)
        assert st["state"] == "on" and st["taps"] == 1
        assert st["passed"]["no_tunnel"]["packets"] >= 20, st["passed"]
        tun = t.a.tunnel("stt0")
        assert tun["tx_fastpath"] == {"frames": 0, "bytes": 0}
        assert tun["tx_python"]["frames"] >= 20
        _check_tx_totals(tun)


def test_sigkill_of_the_daemon_leaves_no_program_on_a_persistent_tap(tmp_path: Path) -> None:
    """The TAP outlives the daemon (persist); the program goes with the daemon; a new
    daemon attaches again and sends through it."""
    with make_two_hosts() as h:
        common = ["--key", str(KEY), "--dev", "stt0", "--fastpath", "off"]
        b = start_endpoint(
            h.b, ["--local-ip", h.ip_b, "--remote-ip", h.ip_a, "--tx-fastpath", "off", *common],
            ["stt0"], tmp_path,
        )  # fmt: skip
        a_args = ["--local-ip", h.ip_a, "--remote-ip", h.ip_b, "--tx-fastpath", "on",
                  "--persist", *common]  # fmt: skip
        a = start_endpoint(h.a, a_args, ["stt0"], tmp_path)
        try:
            prog_id = _tx_status(a)["program_id"]
            with h.a.entered():
                index = socket.if_nametoindex("stt0")
                assert tcx_egress_programs(index) == [prog_id]
            assert a.proc is not None
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(timeout=10)
            with h.a.entered():
                assert socket.if_nametoindex("stt0") == index  # the TAP is still there
                wait_until(lambda: tcx_egress_programs(index) == [], what="link released")
            again = tmp_path / "again"
            again.mkdir()
            a = start_endpoint(h.a, a_args, ["stt0"], again)
            with h.a.entered():
                assert tcx_egress_programs(index) == [_tx_status(a)["program_id"]]
            for ns, addr in ((h.a, OVERLAY_A), (h.b, OVERLAY_B)):
                ns.run(["ip", "addr", "replace", f"{addr}/24", "dev", "stt0"])
            _ping(h.a, OVERLAY_B, count=2)
            _ping(h.a, OVERLAY_B, count=10)
            assert a.tunnel("stt0")["tx_fastpath"]["frames"] >= 10
        finally:
            a.stop()
            h.a.run(["ip", "link", "del", "stt0"], check=False)  # the persistent TAP
            assert b.stop() == 0, b.log_text()


def _program_packets(pcap: Path) -> list[bytes]:
    """The outer IPv4 packets of a capture whose frame id has the top bit set."""
    return [p for p in read_pcap(pcap) if int.from_bytes(p[42:46], "big") >> 31]


def test_reload_updates_the_program_entry(tmp_path: Path) -> None:
    """SIGHUP with a new outer DSCP, TTL and DF: the program's packets follow."""
    need_tools("tcpdump")
    with make_two_hosts() as h:
        tunnel_a = {"name": "stt0", "key": KEY, "local_ip": h.ip_a, "remote_ip": h.ip_b}
        tunnel_b = {"name": "stt0", "key": KEY, "local_ip": h.ip_b, "remote_ip": h.ip_a}
        daemon = {"fastpath": "off", "tx_fastpath": "on"}
        a = start_endpoint(h.a, [], ["stt0"], tmp_path, config=config_toml([tunnel_a], **daemon))
        b = start_endpoint(h.b, [], ["stt0"], tmp_path, config=config_toml([tunnel_b], **daemon))
        try:
            for ns, addr in ((h.a, OVERLAY_A), (h.b, OVERLAY_B)):
                ns.run(["ip", "addr", "add", f"{addr}/24", "dev", "stt0"])
            _ping(h.a, OVERLAY_B, count=2)
            filt = f"src host {h.ip_a} and tcp port 7471"

            def ping_captured(name: str) -> list[bytes]:
                pcap = tmp_path / name
                with Capture(h.b, h.dev_b, pcap, filt):
                    # inner DSCP 8 (TOS 0x20), TTL 64
                    res = h.a.run(["ping", "-c", "10", "-i", "0.05", "-Q", "0x20", OVERLAY_B])
                    assert "10 received" in res.stdout, res.stdout
                packets = _program_packets(pcap)
                assert len(packets) >= 10
                return packets

            before = ping_captured("before.pcap")  # inherit: DSCP copied, TTL 64, DF
            assert {(p[15], p[22], p[20] & 0x40) for p in before} == {(0x20, 64, 0x40)}
            reloaded = a.log_text().count("configuration reloaded")
            config_path(a).write_text(
                config_toml([{**tunnel_a, "tos": 10, "ttl": 9, "df": False}], **daemon)
            )
            assert a.proc is not None
            a.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: a.log_text().count("configuration reloaded") > reloaded, what="reload"
            )
            _ping(h.a, OVERLAY_B, count=2)  # (a changed tunnel may resolve again)
            after = ping_captured("after.pcap")
            assert {(p[15], p[22], p[20] & 0x40) for p in after} == {(10 << 2, 9, 0)}
            assert _tx_status(a)["errors"]["packets"] == 0
        finally:
            assert b.stop() == 0, b.log_text()
            assert a.stop() == 0, a.log_text()


def test_two_tunnels_count_apart(tmp_path: Path) -> None:
    """One program on two TAPs: each tunnel's frames are counted for it."""
    tenants = [
        TenantSpec("stt0", 42, "192.0.2.1/24", "192.0.2.2/24"),
        TenantSpec("stt1", 43, "198.51.100.1/24", "198.51.100.2/24"),
    ]
    with config_pair(tmp_path, tenants) as p:
        for ep in (p.a, p.b):  # the daemon's default: auto
            assert _tx_status(ep)["taps"] == 2
        _ping(p.hosts.a, "192.0.2.2", count=2)
        _ping(p.hosts.a, "198.51.100.2", count=2)
        _ping(p.hosts.a, "192.0.2.2", count=20)
        _ping(p.hosts.a, "198.51.100.2", count=5)
        tunnels = p.a.show()["tunnels"]
        fast = {t["name"]: t["tx_fastpath"]["frames"] for t in tunnels}
        total = {t["name"]: t["tx"]["frames"] for t in tunnels}
        # Every echo request is sent once, by one path or the other: a frame that
        # follows one left to Python (an ARP probe) is queued behind it, legitimately.
        assert total["stt0"] >= 22 and 7 <= total["stt1"] < 20, (fast, total)
        # Most go through the program, and none of one tunnel's is counted for the other.
        assert fast["stt0"] >= 16 and 5 <= fast["stt1"] < 16, (fast, total)
        assert all(fast[n] <= total[n] for n in fast), (fast, total)


def _underlay_mtu_is(ep: Endpoint, mtu: int) -> Callable[[], bool]:
    return lambda: bool(ep.tunnel("stt0")["underlay_mtu"] == mtu)


def test_underlay_mtu_change_moves_the_programs_limit(tmp_path: Path) -> None:
    """The underlay MTU shrinks to 1400 on both sides: the program's limit follows
    (an echo whose inner frame fits one 1400-byte segment exactly goes through it,
    one byte more goes to Python), and every ping is answered."""
    extra = ["--tx-fastpath", "on", "--fastpath", "off"]
    with tunnel_pair(tmp_path, extra=extra) as t:
        h = t.hosts
        _ping(h.a, OVERLAY_B, count=2)
        for ns, dev in ((h.a, h.dev_a), (h.b, h.dev_b)):
            ns.ip("link", "set", dev, "mtu", "1400")
        for ep in (t.a, t.b):
            wait_until(_underlay_mtu_is(ep, 1400), what=f"{ep.host.name} sees MTU 1400")
        top = 1400 - 20 - 20 - 18  # largest inner frame in one segment
        icmp_data = top - 14 - 20 - 8
        for size, taken in ((icmp_data, True), (icmp_data + 1, False)):
            before = t.a.show()
            res = h.a.run(
                ["ping", "-c", "5", "-i", "0.05", "-W", "2", "-s", str(size), OVERLAY_B],
                check=False,
            )
            assert "5 received" in res.stdout, res.stdout + res.stderr
            after = t.a.show()
            fast = (
                after["tunnels"][0]["tx_fastpath"]["frames"]
                - before["tunnels"][0]["tx_fastpath"]["frames"]
            )
            passed = {
                r: after["tx_fastpath"]["passed"][r]["packets"]
                - before["tx_fastpath"]["passed"][r]["packets"]
                for r in ("too_big", "queued")
            }
            too_big = passed["too_big"]
            if taken:
                assert fast >= 5 and too_big == 0, (size, fast, passed)
            else:
                # (one may go behind a frame left to Python just before: "queued")
                assert fast == 0 and too_big + passed["queued"] >= 5, (size, fast, passed)
                assert too_big >= 3, (size, fast, passed)
        assert _tx_status(t.a)["errors"]["packets"] == 0


def _state_is(ep: Endpoint, state: str) -> Callable[[], bool]:
    return lambda: bool(ep.tunnel("stt0")["state"] == state)


def test_route_loss_disables_the_entry_and_its_return_enables_it(tmp_path: Path) -> None:
    """Without a route the tunnel is down: its frames reach Python (no_tunnel), which
    counts them; with the route back the program sends again."""
    extra = ["--tx-fastpath", "on", "--fastpath", "off"]
    with tunnel_pair(tmp_path, extra=extra) as t:
        h = t.hosts
        _ping(h.a, OVERLAY_B, count=2)
        h.a.ip("route", "del", "198.18.0.0/24", "dev", h.dev_a)
        wait_until(_state_is(t.a, "down"), what="A's tunnel down")
        before = t.a.show()
        res = h.a.run(["ping", "-c", "3", "-i", "0.05", "-W", "1", OVERLAY_B], check=False)
        assert res.returncode != 0
        after = t.a.show()
        (t0,), (t1,) = before["tunnels"], after["tunnels"]
        assert t1["tx_fastpath"] == t0["tx_fastpath"]
        no_tunnel = (
            after["tx_fastpath"]["passed"]["no_tunnel"]["packets"]
            - before["tx_fastpath"]["passed"]["no_tunnel"]["packets"]
        )
        assert no_tunnel >= 3, after["tx_fastpath"]["passed"]
        assert t1["drops"].get("tx_no_route", 0) >= 3, t1["drops"]
        h.a.ip("route", "add", "198.18.0.0/24", "dev", h.dev_a)
        wait_until(_state_is(t.a, "up"), what="A's tunnel up again")
        _ping(h.a, OVERLAY_B, count=10)
        fast = t.a.tunnel("stt0")["tx_fastpath"]["frames"] - t1["tx_fastpath"]["frames"]
        assert fast >= 10, t.a.tunnel("stt0")
        assert _tx_status(t.a)["errors"]["packets"] == 0
