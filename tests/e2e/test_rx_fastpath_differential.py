"""Differential: the same crafted frames through ``sttun up`` with and without the fast path.

Run 1: ``sttun up --fastpath off`` (pure Python receive path).  Run 2: ``sttun up
--fastpath on``: the daemon attaches the program to B's underlay, binds its sockets
per protocol and fills the program's tunnel map with its TAP; what the program
leaves to Python reaches the daemon's socket.  The TAP is bridged to a VM namespace
in both runs, and the frames captured there must be the same bytes (order aside:
the two paths interleave differently), with the same totals in ``sttun show``.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sttun.io.ebpf.attach import tcx_ingress_programs
from tests.e2e.fastpath_env import (
    KEY,
    SENTINEL_PORT,
    VNET_NONE,
    Case,
    FastPathHosts,
    cases,
    daemon_on_b,
    fastpath_encapsulator,
    fastpath_hosts,
    inner_frame,
    l4_sport,
    read_pcap,
    send_cases,
    sentinel,
    vm_capture,
)
from tests.netns import need_fastpath

pytestmark = pytest.mark.netns


@dataclass
class Run:
    """What one run produced."""

    frames: list[bytes]
    daemon: dict[str, Any]  # the tunnel's entry of `sttun show --json`
    underlay: dict[str, Any]  # the underlay's entry of `sttun show --json`
    drops: dict[str, Any]  # drops before a tunnel was known (`sttun show --json`)


def _show(h: FastPathHosts, sock: str) -> dict[str, Any]:
    res = h.b.run([sys.executable, "-m", "sttun", "show", "--json", "--control-socket", sock])
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def _tunnel(show: dict[str, Any]) -> dict[str, Any]:
    (t,) = show["tunnels"]
    assert isinstance(t, dict)
    return t


def _frames_of_sentinel(path: Path) -> bool:
    return any(l4_sport(f) == SENTINEL_PORT for f in read_pcap(path) if len(f) > 40)


def run_once(h: FastPathHosts, tmp: Path, all_cases: list[Case], outer: int, fast: bool) -> Run:
    tmp.mkdir()
    local, remote = (h.ip_b, h.ip_a) if outer == 4 else (h.ip6_b, h.ip6_a)
    args = [
        "--local-ip", local, "--remote-ip", remote, "--key", str(KEY), "--dev", h.tap,
        "--mtu", "1500", "--instance", "fpdiff", "--fastpath", "on" if fast else "off",
    ]  # fmt: skip
    with daemon_on_b(h, tmp, *args) as sock:
        pcap = tmp / "vm.pcap"
        with vm_capture(h, pcap) as cap:
            send_cases(h, all_cases)
            deadline = time.monotonic() + 30
            while not _frames_of_sentinel(pcap) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert cap.dropped == 0, f"tcpdump lost {cap.dropped} frames"
        frames = read_pcap(pcap)
        show = _show(h, sock)
    (underlay,) = show["underlays"]
    assert underlay["fastpath"]["state"] == ("on" if fast else "off"), underlay
    if fast:
        with h.b.entered():  # the program went with the daemon
            assert tcx_ingress_programs(socket.if_nametoindex(h.dev_b)) == []
    return Run(frames, _tunnel(show), underlay, show["drops"])


def _describe(frames: Counter[bytes]) -> list[str]:
    return [f"port {l4_sport(f)} len {len(f)} x{n}: {f[:80].hex()}" for f, n in frames.items()]


@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
@pytest.mark.parametrize("routed", [False, True], ids=["veth", "routed"])
def test_fast_path_gives_the_python_paths_frames(tmp_path: Path, outer: int, routed: bool) -> None:
    need_fastpath()
    with fastpath_hosts(routed=routed) as h:
        # the frames the program takes first: a packet left to Python holds the ones
        # after it back until the daemon has handled it ("queued"), which in a burst
        # like this one is every later packet
        mine = [c for c in cases(h) if c.outer == outer]
        all_cases = [c for c in mine if c.expect == "fast"] + [
            c for c in mine if c.expect != "fast"
        ]
        all_cases.append(sentinel(h, outer))
        python = run_once(h, tmp_path / "python", all_cases, outer, fast=False)
        fast = run_once(h, tmp_path / "fast", all_cases, outer, fast=True)
    # the fast path took the whole frames; routed, B's GRO also makes whole frames of
    # the pieces (which may then wait behind a packet left to Python: "queued")
    fast_frames = fast.daemon["rx_fastpath"]["frames"]
    queued = fast.underlay["fastpath"]["passed"]["queued"]["packets"]
    assert python.daemon["rx_fastpath"]["frames"] == 0
    assert fast.underlay["sockets"] == [f"ipv{outer}"] and python.underlay["sockets"] == ["all"]
    expected_fast = sum(1 for c in all_cases if c.expect == "fast")
    if routed:
        assert fast_frames + queued >= expected_fast
    else:
        assert fast_frames == expected_fast, json.dumps(fast.underlay["fastpath"]["passed"])
    assert fast.underlay["fastpath"]["errors"]["packets"] == 0
    # the same bytes on the far side: every fast case's frames, and Python's deliveries
    assert len(python.frames) >= sum(c.frames for c in all_cases if c.expect == "fast")
    assert fast.daemon["rx_python"]["frames"] > 0
    a, b = Counter(python.frames), Counter(fast.frames)
    only_python, only_fast = a - b, b - a
    assert not only_python and not only_fast, (
        f"only via Python: {_describe(only_python)[:5]}\n"
        f"only via the fast path: {_describe(only_fast)[:5]}"
    )
    # the same totals: frames and bytes received (both paths), drops
    assert python.daemon["rx"]["frames"] == fast.daemon["rx"]["frames"]
    assert python.daemon["rx"]["bytes"] == fast.daemon["rx"]["bytes"]
    rx_python, rx_fast = fast.daemon["rx_python"], fast.daemon["rx_fastpath"]
    assert fast.daemon["rx"]["frames"] == rx_python["frames"] + rx_fast["frames"]
    assert fast.daemon["rx"]["bytes"] == rx_python["bytes"] + rx_fast["bytes"]
    assert python.daemon["drops"] == fast.daemon["drops"]
    assert python.drops == fast.drops
    # frames with a wrong outer checksum: passed on by the program, dropped by Python
    bad = sum(len(c.packets) for c in all_cases if c.expect == "checksum")
    assert bad > 0 and fast.drops.get("bad_tcp_checksum") == bad, fast.drops
    passed = {
        r: c["packets"] for r, c in fast.underlay["fastpath"]["passed"].items() if c["packets"]
    }
    print(
        f"{len(python.frames)} frames on the far side; fast path {fast_frames} frames, "
        f"Python {rx_python['frames']}; passed {passed}"
    )


@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_whole_frames_wait_behind_pieces_left_to_python(tmp_path: Path, outer: int) -> None:
    """Frames sent in pieces (the program leaves them to Python, which reassembles)
    alternate with whole frames (which the program could deliver at once): on the
    far side every frame arrives in the order sent, because a whole frame that
    comes while pieces wait in Python goes behind them ("queued")."""
    need_fastpath()
    with fastpath_hosts() as h:
        enc = fastpath_encapsulator(h, outer)
        all_cases: list[Case] = []
        ports = list(range(31000, 31060))
        for i, sport in enumerate(ports):
            if i % 2 == 0:  # 2000 bytes of UDP: two outer segments, sent apart
                frame = inner_frame(4, "udp", bytes(2000), sport=sport, partial=False)
                packets = [
                    [VNET_NONE, *(bytes(x) for x in p)] for p in enc.encap(frame, None, gso=False)
                ]
                assert len(packets) == 2
                all_cases.append(Case(f"pieces-{i}", outer, packets, "piece", sport=sport))
            else:
                frame = inner_frame(4, "udp", b"w" * 100, sport=sport, partial=False)
                packets = [[bytes(x) for x in p] for p in enc.encap(frame, None)]
                all_cases.append(Case(f"whole-{i}", outer, packets, "fast", sport=sport))
        all_cases.append(sentinel(h, outer))
        run = run_once(h, tmp_path / "fast", all_cases, outer, fast=True)
    seen = [p for p in (l4_sport(f) for f in run.frames) if p in ports]
    assert seen == ports, seen
    passed = run.underlay["fastpath"]["passed"]
    assert passed["piece"]["packets"] + passed["queued"]["packets"] >= len(ports)
    assert run.underlay["fastpath"]["errors"]["packets"] == 0
    print(
        f"IPv{outer} underlay: {len(ports)} frames in order; fast path "
        f"{run.daemon['rx_fastpath']['frames']}, pieces {passed['piece']['packets']}, "
        f"queued {passed['queued']['packets']}"
    )
