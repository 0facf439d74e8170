"""The receive fast path on real namespaces: crafted STT frames in, bridged frames out.

B's underlay carries the tc program (:class:`sttun.io.rx_fastpath.RxFastPath`) with
one IPv4 and one IPv6 tunnel into a TAP; the TAP is bridged to a "VM" namespace
where tcpdump captures.  No Python receive path runs here: frames the program
leaves to Python must not reach the VM, and the program's counters must say why.
"""

from __future__ import annotations

import collections
import contextlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sttun.io.ebpf.attach import tc_ingress_filter_names, tcx_ingress_programs
from sttun.io.packet_socket import RECV_SIZE, PacketSocket
from sttun.io.rx_fastpath import (
    FORCE_INVALID_ENV,
    FastPathError,
    FastPathTunnel,
    RxFastPath,
)
from sttun.io.tap import TapDevice
from sttun.tools.wire_check import tshark_checksum_verdict
from tests.e2e.fastpath_env import (
    KEY,
    Case,
    FastPathHosts,
    bridge_tap,
    cases,
    fastpath_hosts,
    inner_partial_cases,
    l4_header_len,
    l4_sport,
    read_pcap,
    send_cases,
    vm_capture,
    wait_for_frames,
)
from tests.netns import TwoHosts, need_fastpath

pytestmark = pytest.mark.netns


def tunnels(h: FastPathHosts, tap_ifindex: int) -> list[FastPathTunnel]:
    """The IPv4 and IPv6 tunnels from A into B's TAP."""
    return [
        FastPathTunnel("t4", h.ip_b, h.ip_a, KEY, tap_ifindex),
        FastPathTunnel("t6", h.ip6_b, h.ip6_a, KEY, tap_ifindex),
    ]


def tshark_checksums(pcap: Path) -> list[tuple[str, str]]:
    """(inner source port, verdict) per IP/TCP/UDP checksum tshark checks."""
    fields = [
        "ip.checksum.status",
        "tcp.srcport",
        "tcp.checksum.status",
        "tcp.checksum",
        "tcp.checksum_calculated",
        "udp.srcport",
        "udp.checksum.status",
        "icmp.ident",
        "icmp.checksum.status",
        "icmpv6.echo.identifier",
        "icmpv6.checksum.status",
    ]
    argv = [
        "tshark",
        "-r",
        str(pcap),
        "-o",
        "ip.check_checksum:TRUE",
        "-o",
        "tcp.check_checksum:TRUE",
        "-o",
        "udp.check_checksum:TRUE",
        "-T",
        "fields",
        "-E",
        "separator=/t",
    ]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    out = []
    for line in res.stdout.splitlines():
        ip_st, tsp, tst, tfield, tcalc, usp, ust, i4, i4st, i6, i6st = (
            line.split("\t") + [""] * 11
        )[:11]
        if ip_st:
            out.append((tsp or usp or i4, "good" if ip_st == "1" else "bad"))
        if tsp:
            out.append((tsp, tshark_checksum_verdict(tst, tfield, tcalc)))
        if usp:
            out.append((usp, "good" if ust == "1" else "bad"))
        for ident, status in ((i4, i4st), (i6, i6st)):
            if ident:
                out.append((str(int(ident, 0)), "good" if status == "1" else "bad"))
    return out


def check_far_side(frames: list[bytes], fast: list[Case]) -> None:
    """Every fast case arrived with its payload, in frames no larger than its MSS
    allows (1514 bytes without one), and nothing else arrived."""
    by_port: dict[int, list[bytes]] = collections.defaultdict(list)
    for f in frames:
        port = l4_sport(f)
        assert port is not None, f"unexpected frame {f[:64].hex()}"
        by_port[port].append(f)
    for c in fast:
        got = by_port.pop(c.sport, [])
        assert len(got) == c.frames, f"{c.name}: {len(got)} frames, expected {c.frames}"
        l4 = l4_header_len(c.l4)
        sizes = [
            len(f) - 14 - (4 * (f[14] & 0x0F) if c.inner_family == 4 else 40) - l4 for f in got
        ]
        assert sum(sizes) == c.payload, f"{c.name}: {sum(sizes)} payload bytes, not {c.payload}"
        if c.mss:
            assert max(sizes) == c.mss, f"{c.name}: segments {sizes}"
        else:
            assert max(len(f) for f in got) <= 1514, f"{c.name}: {[len(f) for f in got]}"
    assert not by_port, f"frames of cases that should not arrive: {sorted(by_port)}"


def expected_passes(all_cases: list[Case]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for c in all_cases:
        if c.expect != "fast":
            counts[c.expect] += len(c.packets)
    return dict(counts)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_fast_path_delivers_whole_frames_and_passes_the_rest(tmp_path: Path) -> None:
    with attached() as (h, fp, tap_ifindex):
        assert fp.mode == "tcx"
        fp.set_tunnels(tunnels(h, tap_ifindex))
        all_cases = cases(h) + inner_partial_cases(h)
        fast = [c for c in all_cases if c.expect == "fast"]
        pcap = tmp_path / "vm.pcap"
        with vm_capture(h, pcap) as cap:
            send_cases(h, all_cases)
            frames = wait_for_frames(pcap, sum(c.frames for c in fast))
        frames = read_pcap(pcap)
        counters = fp.counters()
        assert cap.dropped == 0, f"tcpdump lost {cap.dropped} frames"
        check_far_side(frames, fast)
        bad = [(p, v) for p, v in tshark_checksums(pcap) if v != "good"]
        assert not bad, f"checksums tshark calls bad: {bad[:10]}"
        per_tunnel = {"t4": 0, "t6": 0}
        for c in fast:
            per_tunnel[f"t{c.outer}"] += 1
        assert {k: v["frames"] for k, v in counters["tunnels"].items()} == per_tunnel
        passed = {
            k: v["packets"]
            for k, v in counters["passed"].items()
            if k != "not_stt" and v["packets"]
        }
        assert passed == expected_passes(all_cases)
        assert counters["errors"]["packets"] == 0


def settled(fp: RxFastPath, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The counters once ``done`` says so (softirq may run just after a send), or
    after 10 s (the caller's assertions then say what is missing)."""
    deadline = time.monotonic() + 10
    c = fp.counters()
    while not done(c) and time.monotonic() < deadline:
        time.sleep(0.02)
        c = fp.counters()
    return c


def receive_all(sock: PacketSocket) -> list[bytes]:
    """Frames on ``sock``: waits up to 10 s for the first, then takes what is queued."""
    select.select([sock], [], [], 10)
    buf = bytearray(RECV_SIZE)
    out = []
    while n := sock.recv_into(buf):
        out.append(bytes(buf[:n]))
    return out


@contextlib.contextmanager
def attached() -> Iterator[tuple[FastPathHosts, RxFastPath, int]]:
    """Hosts with B's TAP bridged to its VM and the program attached (TCX) to B's
    underlay; yields them with the TAP's ifindex.  Skips where it cannot load."""
    need_fastpath()
    with fastpath_hosts() as h:
        with h.b.entered():
            tap = TapDevice(h.tap, mtu=1500)
        with tap:
            bridge_tap(h, h.tap)
            with h.b.entered():
                fp = RxFastPath.attach(h.dev_b)
            with fp:
                yield h, fp, _ifindex(h, h.tap)


def _ifindex(h: FastPathHosts, dev: str) -> int:
    with h.b.entered():
        return socket.if_nametoindex(dev)


def test_tc_fallback_attaches_delivers_and_detaches(tmp_path: Path) -> None:
    need_fastpath()
    with fastpath_hosts() as h:
        with h.b.entered():
            tap = TapDevice(h.tap, mtu=1500)
        with tap:
            bridge_tap(h, h.tap)
            index = _ifindex(h, h.dev_b)
            with h.b.entered():
                fp = RxFastPath.attach(h.dev_b, mode="tc")
                assert fp.mode == "tc"
                assert tc_ingress_filter_names(index) == ["sttun_rx"]
                assert tcx_ingress_programs(index) == []
            fp.set_tunnels(tunnels(h, _ifindex(h, h.tap)))
            all_cases = cases(h)
            some = [c for c in all_cases if c.expect == "fast" and c.outer == 4][:6]
            vlan = next(c for c in all_cases if c.expect == "vlan" and c.outer == 4)
            with h.b.entered():  # what Python's receive socket would see
                rx = PacketSocket(h.dev_b, (7471,), vnet_hdr=False, protocol=0x0800)
            pcap = tmp_path / "vm.pcap"
            with rx, vm_capture(h, pcap) as cap:
                send_cases(h, [*some, vlan])  # the fallback last: it arrives after the rest
                wait_for_frames(pcap, sum(c.frames for c in some))
                seen = receive_all(rx)
            assert cap.dropped == 0, f"tcpdump lost {cap.dropped} frames"
            assert fp.counters()["tunnels"]["t4"]["frames"] == len(some)
            check_far_side(read_pcap(pcap), some)
            # the fallback reached the per-protocol socket, the redirected frames did not
            assert seen == [b"".join(vlan.packets[0][1:])]
            with h.b.entered():
                fp.close()
                assert tc_ingress_filter_names(index) == []


def test_verifier_rejection_is_a_clear_error(two_hosts: TwoHosts) -> None:
    need_fastpath()
    h = two_hosts
    with h.b.entered():
        with pytest.raises(FastPathError) as err:
            RxFastPath.attach(h.dev_b, invalid_program=True)
        assert tcx_ingress_programs(socket.if_nametoindex(h.dev_b)) == []
    assert err.value.reason.startswith("fast path: the verifier rejected the program: ")
    assert "\n" not in err.value.reason


def test_forced_rejection_by_environment(
    two_hosts: TwoHosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_fastpath()
    monkeypatch.setenv(FORCE_INVALID_ENV, "1")
    with two_hosts.b.entered(), pytest.raises(FastPathError, match="verifier rejected"):
        RxFastPath.attach(two_hosts.dev_b)


def test_sigkill_leaves_no_program_attached(two_hosts: TwoHosts) -> None:
    need_fastpath()
    h = two_hosts
    script = (
        "import sys\n"
        "from sttun.io.rx_fastpath import RxFastPath\n"
        f"fp = RxFastPath.attach({h.dev_b!r})\n"
        "print(fp.mode, fp.prog_id, flush=True)\n"
        "sys.stdin.read()\n"  # until killed
    )
    proc = h.b.popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    mode, prog_id = proc.stdout.readline().split()
    assert mode == "tcx"
    with h.b.entered():
        index = socket.if_nametoindex(h.dev_b)
        assert tcx_ingress_programs(index) == [int(prog_id)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # the link went with the process's last file descriptor (released when the
        # file is freed, which the kernel may finish just after the process is reaped)
        deadline = time.monotonic() + 10
        while tcx_ingress_programs(index) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tcx_ingress_programs(index) == []


def test_set_tunnels_reload_keeps_and_resets_counters(tmp_path: Path) -> None:
    with attached() as (h, fp, tap_ifindex):
        t4, t6 = tunnels(h, tap_ifindex)
        fp.set_tunnels([t4, t6])
        fast = [c for c in cases(h) if c.expect == "fast"]
        some4 = [c for c in fast if c.outer == 4][:3]
        some6 = [c for c in fast if c.outer == 6][:3]
        send_cases(h, some4 + some6)
        got = settled(fp, lambda c: c["tunnels"]["t6"]["frames"] == 3)["tunnels"]
        assert (got["t4"]["frames"], got["t6"]["frames"]) == (3, 3)
        # t4 removed: its frames go to Python, t6 keeps its count
        fp.set_tunnels([t6])
        send_cases(h, some4 + some6)
        c = settled(fp, lambda c: c["tunnels"]["t6"]["frames"] == 6)
        assert list(c["tunnels"]) == ["t6"] and c["tunnels"]["t6"]["frames"] == 6
        assert c["passed"]["unknown_tunnel"]["packets"] == 3
        # t4 back (under a new name): counted from zero
        fp.set_tunnels([t6, FastPathTunnel("t4b", t4.local, t4.remote, KEY, t4.tap_ifindex)])
        send_cases(h, some4)
        c = settled(fp, lambda c: c["tunnels"]["t4b"]["frames"] == 3)
        assert c["tunnels"]["t4b"]["frames"] == 3 and c["tunnels"]["t6"]["frames"] == 6


def test_missing_interface_is_a_fast_path_error() -> None:
    with pytest.raises(FastPathError, match="no interface"):
        RxFastPath.attach("sttun-nonexistent0")
