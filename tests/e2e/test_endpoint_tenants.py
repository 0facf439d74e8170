"""Two tunnels with different keys between the same two hosts (one daemon each side):
each carries its own traffic, neither ever sees the other's, counters are per tunnel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sttun.tools.capture import Capture
from tests.e2e.sttun_hosts import (
    ConfigPair,
    TenantSpec,
    config_pair,
    ping,
    tcp_transfer,
    wait_until,
)
from tests.netns import need_root, need_tools

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
T1 = TenantSpec("ten1", 0x1001, "192.0.2.1/24", "192.0.2.2/24")
T2 = TenantSpec("ten2", 0x2002, "203.0.113.1/24", "203.0.113.2/24")
NET = {"ten1": "192.0.2.0/24", "ten2": "203.0.113.0/24"}
PEER_B = {"ten1": "192.0.2.2", "ten2": "203.0.113.2"}


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()
    need_tools("tcpdump")


def _stats(p: ConfigPair) -> tuple[dict[str, Any], dict[str, Any]]:
    """(A's, B's) tunnels by name; B is read first so A's counters are never behind."""
    b = {t["name"]: t for t in p.b.show()["tunnels"]}
    a = {t["name"]: t for t in p.a.show()["tunnels"]}
    return a, b


def _yields_to_capture(show: dict[str, Any], name: str) -> bool:
    """The daemon sends ``name``'s frames through Python (or has no transmit program)."""
    tx = show.get("tx_fastpath") or {}
    return tx.get("state") != "on" or name in (tx.get("yielding") or {})


def _traffic_only_on(p: ConfigPair, busy: str, idle: str, tmp: Path) -> None:
    """Ping and a transfer on ``busy``; tcpdump on both ends of ``idle`` sees none of it.

    After the busy traffic, one ping on ``idle`` itself: both captures must show it
    (so they were working all along) and nothing of ``busy``'s network.
    """
    h = p.hosts
    caps = [
        Capture(h.a, idle, tmp / f"{idle}-a.pcap", immediate=True),
        Capture(h.b, idle, tmp / f"{idle}-b.pcap", immediate=True),
    ]
    try:
        for c in caps:
            c.start()
        # A frame the transmit fast path sends never passes the TAP's taps: each
        # daemon lets a captured TAP's frames through Python (within a fraction of a
        # second; `sttun show` says so), so the capture sees them all.
        for ep in (p.a, p.b):
            wait_until(lambda ep=ep: _yields_to_capture(ep.show(), idle), 5, what="capture seen")
        before_a, before_b = _stats(p)
        ping(h.a, PEER_B[busy], count=5)
        tcp_transfer(h.a, h.b, PEER_B[busy], 20 * MiB, port=5201 if busy == "ten1" else 5202)
        after_a, after_b = _stats(p)
        ping(h.a, PEER_B[idle], count=1)  # request and reply cross both idle TAPs
    finally:
        for c in caps:
            c.stop()
    for c in caps:
        leaked = c.count(f"net {NET[busy]}")
        assert leaked == 0, f"{leaked} packets of {busy} seen on {idle} in {c.host.name}"
        own = c.count(f"icmp and net {NET[idle]}")
        assert own == 2, f"{c.host.name}: the capture on {idle} saw {own} of its 2 ping packets"

    def delta(s1: dict[str, Any], s0: dict[str, Any], name: str, way: str, what: str) -> int:
        return int(s1[name][way][what]) - int(s0[name][way][what])

    # the busy tunnel carried the transfer, both ways (data one way, ACKs back)
    assert delta(after_b, before_b, busy, "rx", "bytes") >= 20 * MiB
    assert delta(after_a, before_a, busy, "tx", "bytes") >= 20 * MiB
    assert delta(after_a, before_a, busy, "rx", "frames") > 0
    # rx never exceeds what the other side sent on the same tunnel
    for name in (busy, idle):
        assert after_b[name]["rx"]["frames"] <= after_a[name]["tx"]["frames"], name
        assert after_b[name]["rx"]["bytes"] <= after_a[name]["tx"]["bytes"], name
    # the idle tunnel carried at most a few control frames of its own (ND, MLD)
    for s1, s0 in ((after_a, before_a), (after_b, before_b)):
        for way in ("tx", "rx"):
            assert delta(s1, s0, idle, way, "bytes") < 64 * 1024, (idle, way, s1[idle])


def test_two_keys_isolated(tmp_path: Path) -> None:
    with config_pair(tmp_path, [T1, T2]) as p:
        a, _b = _stats(p)
        assert {n: t["in_key"] for n, t in a.items()} == {"ten1": 0x1001, "ten2": 0x2002}
        ping(p.hosts.a, PEER_B["ten1"])
        ping(p.hosts.a, PEER_B["ten2"])
        # the two overlays cannot reach each other: 203.0.113.2 is not on ten1's link
        _traffic_only_on(p, "ten1", "ten2", tmp_path)
        _traffic_only_on(p, "ten2", "ten1", tmp_path)


def test_per_tunnel_segment_counters(tmp_path: Path) -> None:
    """``rx.segments`` is per tunnel: the idle tunnel's does not grow with the other's
    traffic (and never exceeds what its peer sent on that tunnel)."""
    with config_pair(tmp_path, [T1, T2]) as p:
        ping(p.hosts.a, PEER_B["ten2"], count=2)
        _, before_b = _stats(p)
        tcp_transfer(p.hosts.a, p.hosts.b, PEER_B["ten1"], 10 * MiB)
        after_a, after_b = _stats(p)
        grew = after_b["ten2"]["rx"]["segments"] - before_b["ten2"]["rx"]["segments"]
        assert grew < 100, f"ten2 rx.segments grew by {grew} with traffic on ten1 only"
        assert after_b["ten2"]["rx"]["segments"] <= after_a["ten2"]["tx"]["segments"]
