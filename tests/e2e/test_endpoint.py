"""``sttun up`` between two namespaces: real TAPs, AF_PACKET, kernel GSO/GRO."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.sttun_hosts import OVERLAY6_B, OVERLAY_B, ping, tcp_transfer, tunnel_pair
from tests.netns import need_root

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "software"])
@pytest.mark.parametrize("veth_tso", [True, False], ids=["tso", "wire"])
def test_ping_and_transfer_ipv4(tmp_path: Path, offload: bool, veth_tso: bool) -> None:
    with tunnel_pair(tmp_path, offload=offload, veth_tso=veth_tso) as t:
        ping(t.hosts.a, OVERLAY_B)
        ping(t.hosts.a, OVERLAY6_B)
        tcp_transfer(t.hosts.a, t.hosts.b, OVERLAY_B, 50 * 1024 * 1024)
        sb = t.b.tunnel("stt0")  # B first: A's counters can only grow meanwhile
        sa = t.a.tunnel("stt0")
        assert sa["tx"]["frames"] > 0 and sb["rx"]["frames"] > 0
        assert sb["rx"]["frames"] <= sa["tx"]["frames"]
