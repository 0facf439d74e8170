"""A route whose MTU drops below what STT can segment into, learned while running:
the tunnel goes down with one log line and counts its frames as ``tx_underlay_mtu``,
and comes back by itself when the route's MTU grows again."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.sttun_hosts import OVERLAY_B, ping, tunnel_pair, wait_until
from tests.netns import need_root

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def test_route_mtu_below_the_floor_takes_the_tunnel_down_and_back(tmp_path: Path) -> None:
    with tunnel_pair(tmp_path) as t:
        h = t.hosts
        ping(h.a, OVERLAY_B, count=1)
        # a host route to the remote with an MTU STT cannot use
        h.a.run(["ip", "route", "add", f"{h.ip_b}/32", "dev", h.dev_a, "mtu", "300"])
        wait_until(lambda: t.a.tunnel(t.dev)["state"] == "down", timeout=15, what="tunnel down")
        before = t.a.tunnel(t.dev)["drops"].get("tx_underlay_mtu", 0)
        res = h.a.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", OVERLAY_B], check=False)
        assert res.returncode != 0, "a tunnel with an unusable underlay MTU carried a ping"
        wait_until(
            lambda: t.a.tunnel(t.dev)["drops"].get("tx_underlay_mtu", 0) > before,
            what="tx_underlay_mtu counted",
        )
        assert t.a.proc.poll() is None, t.a.log_text()
        assert "below 576" in t.a.log_text()
        # the route goes away: the link's MTU applies again and the tunnel is back
        h.a.run(["ip", "route", "del", f"{h.ip_b}/32", "dev", h.dev_a])
        wait_until(lambda: t.a.tunnel(t.dev)["state"] == "up", timeout=15, what="tunnel up")
        assert t.a.tunnel(t.dev)["underlay_mtu"] == 1500
        ping(h.a, OVERLAY_B, count=2)
        assert "usable again" in t.a.log_text()
        assert "Traceback" not in t.a.log_text()
