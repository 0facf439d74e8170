"""sttun.io.netlink in a namespace: routes, links, neighbours, change events."""

from __future__ import annotations

import select
import time

import pytest

from sttun.errors import SetupError
from sttun.io.netlink import (
    NetlinkWatcher,
    is_local_address,
    link_info,
    neighbour,
    resolve,
    route_lookup,
    set_gso_max_size,
)
from tests import netns
from tests.netns import TwoHosts, link_mac

two_hosts = netns.two_hosts  # fixture (until tests/conftest.py re-exports it)

pytestmark = pytest.mark.netns


def _wait(pred, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout  # hang guard only
    while time.monotonic() < end:
        val = pred()
        if val:
            return val
        time.sleep(0.05)
    return pred()


def test_route_and_link(two_hosts: TwoHosts) -> None:
    h = two_hosts
    h.a.run(["ip", "route", "add", "198.19.0.0/24", "via", h.ip_b])
    h.a.run(["ip", "route", "add", "198.19.1.0/24", "via", h.ip_b, "mtu", "1400"])
    with h.a.entered():
        r = route_lookup(h.ip_b)
        assert (r.ifname, r.src_ip, r.gateway, r.mtu) == (h.dev_a, h.ip_a, None, 1500)
        assert r.ifindex == link_info(h.dev_a).ifindex
        r6 = route_lookup(h.ip6_b)
        assert (r6.ifname, r6.src_ip, r6.gateway) == (h.dev_a, h.ip6_a, None)
        via = route_lookup("198.19.0.7")
        assert (via.gateway, via.src_ip, via.next_hop) == (h.ip_b, h.ip_a, h.ip_b)
        assert route_lookup("198.19.1.7").mtu == 1400
        li = link_info(h.dev_a)
        assert (li.mac, li.mtu, li.up) == (link_mac(h.a, h.dev_a), 1500, True)
        assert is_local_address(h.ip_a) and is_local_address(h.ip6_a)
        assert not is_local_address(h.ip_b)
        with pytest.raises(SetupError, match="local address"):
            route_lookup(h.ip_a)
        with pytest.raises(SetupError, match="no route"):
            route_lookup("203.0.113.9")
        with pytest.raises(SetupError, match="not an IP"):
            route_lookup("nonsense")
        with pytest.raises(SetupError, match="no interface"):
            link_info("sttun-nope")


@pytest.mark.parametrize("v6", [False, True])
def test_resolve_neighbour_without_blocking(two_hosts: TwoHosts, v6: bool) -> None:
    h = two_hosts
    ip = h.ip6_b if v6 else h.ip_b
    with h.a.entered():
        idx = link_info(h.dev_a).ifindex
        assert neighbour(idx, ip) is None
        with NetlinkWatcher() as w:
            resolve(idx, ip)  # returns immediately
            mac = _wait(lambda: neighbour(idx, ip))
            assert mac == link_mac(h.b, h.dev_b)
            select.select([w], [], [], 2)
            assert "neigh" in w.read()
        resolve(idx, ip)  # a valid entry is left alone
        assert neighbour(idx, ip) == mac


def test_watcher_reports_changes(two_hosts: TwoHosts) -> None:
    h = two_hosts
    with h.a.entered(), NetlinkWatcher() as w:
        assert w.drain() == set()  # nothing pending, does not block
        h.a.run(["ip", "route", "add", "198.19.2.0/24", "via", h.ip_b])
        select.select([w], [], [], 2)
        assert "route" in _wait(w.read)
        h.a.run(["ip", "link", "set", h.dev_a, "mtu", "1400"])
        select.select([w], [], [], 2)
        assert "link" in _wait(w.read)
        h.a.run(["ip", "addr", "add", "198.18.5.1/24", "dev", h.dev_a])
        select.select([w], [], [], 2)
        assert "addr" in _wait(w.read)


def test_link_info_unpacks_and_gso_max_size(two_hosts: TwoHosts) -> None:
    h = two_hosts
    with h.a.entered():
        _ifindex, mac, mtu, up = link_info(h.dev_a)
        assert (mac, mtu, up) == (link_mac(h.a, h.dev_a), 1500, True)
        set_gso_max_size(h.dev_a, 65000)
        with pytest.raises(SetupError, match="no interface"):
            set_gso_max_size("sttun-nope", 65000)
        with pytest.raises(SetupError, match=r"1\.\.65536"):
            set_gso_max_size(h.dev_a, 0)
    out = h.a.run(["ip", "-d", "link", "show", h.dev_a]).stdout
    assert "gso_max_size 65000 " in out
