"""sttun.io.netlink in a namespace: routes, links, neighbours, change events.

The namespaces come from :func:`tests.netns.make_two_hosts`: the veth is up and IPv6
is configured on both ends before a test starts (``wait_link_ready``), so the
first neighbour solicitation is answered.  Without that wait the IPv6 case failed
on a loaded machine: while the link-local address is tentative, or before the
kernel's link watch has marked the peer's link up, solicitations go unsent or
unanswered, the kernel's three probes (one a second) run out and the entry ends
FAILED.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import TypeVar

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
from sttun.tools.topology import TwoHosts
from tests.netns import link_mac

pytestmark = pytest.mark.netns

T = TypeVar("T")


def _wait(pred: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """Poll ``pred`` until it returns something truthy; AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _wait_event(w: NetlinkWatcher, kind: str, timeout: float = 10.0) -> None:
    """Wait until the watcher reports a change of ``kind`` (``"route"``, ``"neigh"``...)."""
    seen: set[str] = set()
    end = time.monotonic() + timeout
    while kind not in seen:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind!r} event within {timeout:g}s (saw {sorted(seen)})")
        select.select([w], [], [], left)
        seen |= w.read()


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
            mac = _wait(lambda: neighbour(idx, ip), f"the neighbour entry of {ip}")
            assert mac == link_mac(h.b, h.dev_b)
            _wait_event(w, "neigh")
        resolve(idx, ip)  # a valid entry is left alone
        assert neighbour(idx, ip) == mac


def test_watcher_reports_changes(two_hosts: TwoHosts) -> None:
    h = two_hosts
    with h.a.entered(), NetlinkWatcher() as w:
        assert w.drain() == set()  # nothing pending, does not block
        h.a.run(["ip", "route", "add", "198.19.2.0/24", "via", h.ip_b])
        _wait_event(w, "route")
        h.a.run(["ip", "link", "set", h.dev_a, "mtu", "1400"])
        _wait_event(w, "link")
        h.a.run(["ip", "addr", "add", "198.18.5.1/24", "dev", h.dev_a])
        _wait_event(w, "addr")


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
