"""``sttun up`` data paths beyond the basic IPv4 case: IPv6 underlay, jumbo overlay MTU,
and the one 200 MB transfer over MTU-sized segments on the wire."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.sttun_hosts import (
    OVERLAY6_B,
    OVERLAY_B,
    Tunnelled,
    ping,
    tcp_transfer,
    tunnel_pair,
)
from tests.netns import need_root

pytestmark = pytest.mark.netns

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def _counters_agree(t: Tunnelled) -> None:
    """B received no more than A sent, and something arrived; both tunnels up."""
    sb = t.b.tunnel(t.dev)  # B first: A's counters can only grow meanwhile
    sa = t.a.tunnel(t.dev)
    assert sb["rx"]["frames"] > 0
    assert 0 < sb["rx"]["frames"] <= sa["tx"]["frames"]
    assert sb["rx"]["bytes"] <= sa["tx"]["bytes"]
    for ep in (sa, sb):
        assert ep["state"] == "up"


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "software"])
def test_ipv6_underlay(tmp_path: Path, offload: bool) -> None:
    with tunnel_pair(tmp_path, ipv6_underlay=True, offload=offload) as t:
        assert t.a.tunnel(t.dev)["local_ip"] == t.hosts.ip6_a
        ping(t.hosts.a, OVERLAY_B)
        ping(t.hosts.a, OVERLAY6_B)
        tcp_transfer(t.hosts.a, t.hosts.b, OVERLAY6_B, 30 * MiB)
        tcp_transfer(t.hosts.b, t.hosts.a, "192.0.2.1", 10 * MiB, port=5202)
        _counters_agree(t)


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "software"])
def test_overlay_mtu_9000(tmp_path: Path, offload: bool) -> None:
    with tunnel_pair(tmp_path, overlay_mtu=9000, offload=offload) as t:
        for ns in (t.hosts.a, t.hosts.b):
            assert "mtu 9000" in ns.ip("link", "show", t.dev)
        # an 8028-byte IPv4 packet, DF set: one inner frame, many outer segments
        out = t.hosts.a.run(
            ["ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "8000", "-M", "do", OVERLAY_B],
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "8008 bytes from" in out.stdout
        # the same over the IPv6 overlay
        ping(t.hosts.b, "2001:db8:1::1")
        tcp_transfer(t.hosts.a, t.hosts.b, OVERLAY_B, 30 * MiB)
        _counters_agree(t)


def test_200mb_wire_segments(tmp_path: Path) -> None:
    """The issue's 200 MB transfer, veth TSO off: real MTU-sized segments on the wire."""
    with tunnel_pair(tmp_path, veth_tso=False, offload=True) as t:
        feats = t.hosts.a.run(["ethtool", "-k", t.hosts.dev_a]).stdout
        assert "tcp-segmentation-offload: off" in feats
        ping(t.hosts.a, OVERLAY_B)
        tcp_transfer(t.hosts.a, t.hosts.b, OVERLAY_B, 200 * MiB)
        _counters_agree(t)
        sa = t.a.tunnel(t.dev)
        # 200 MB cannot have crossed in fewer than ~200e6/1448 MTU-sized segments
        assert sa["tx"]["segments"] >= 200 * MiB // 1500
        sb = t.b.tunnel(t.dev)
        assert sum(sb["drops"].values()) == 0, sb["drops"]
