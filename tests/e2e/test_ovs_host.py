"""The isolated Open vSwitch harness (sttun.tools.ovs_host) against the real daemons."""

from __future__ import annotations

import pytest

from sttun.errors import SetupError
from sttun.tools.ovs_host import OvsHost, process_running
from tests.netns import Netns, need_ovs

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _ovs() -> None:
    need_ovs()


def test_two_isolated_instances_start_forward_and_stop(netns_factory: object) -> None:
    make = netns_factory  # type: ignore[assignment]
    ns_a: Netns = make("oa")  # type: ignore[operator]
    ns_b: Netns = make("ob")  # type: ignore[operator]
    with OvsHost(netns=ns_a.name) as a, OvsHost(netns=ns_b.name) as b:
        assert a.dir != b.dir
        a.add_bridge("br-int")
        b.add_bridge("br-x")
        # Each switch knows only its own bridge, and its bridge device is in its namespace.
        assert a.vsctl("list-br").split() == ["br-int"]
        assert b.vsctl("list-br").split() == ["br-x"]
        assert a.vsctl("get", "bridge", "br-int", "datapath_type").strip() == "netdev"
        assert "br-int" in ns_a.ip("-br", "link")
        assert "br-int" not in ns_b.ip("-br", "link")
        assert "br-int" in a.appctl("ovs-vswitchd", "dpif/show")
        pids = [a.pid("ovsdb-server"), a.pid("ovs-vswitchd")]
        assert all(p is not None for p in pids)
        directory = a.dir
    assert directory is not None and not directory.exists()
    assert not any(process_running(p) for p in pids if p is not None)


def test_ovsdb_server_restart_keeps_the_database(netns_factory: object) -> None:
    ns: Netns = netns_factory("oc")  # type: ignore[operator]
    with OvsHost(netns=ns.name) as h:
        h.add_bridge("br-int")
        old = h.pid("ovsdb-server")
        h.stop_daemon("ovsdb-server")
        assert h.pid("ovsdb-server") is None
        h.start_ovsdb_server()
        assert h.pid("ovsdb-server") not in (None, old)
        # ovs-vswitchd reconnects by itself; a waiting command proves it applied the db.
        h.vsctl("add-port", "br-int", "p0", "--", "set", "interface", "p0", "type=internal")
        assert "p0" in h.vsctl("list-ports", "br-int").split()


def test_userspace_tso_is_set_before_vswitchd_starts(netns_factory: object) -> None:
    ns: Netns = netns_factory("od")  # type: ignore[operator]
    h = OvsHost(netns=ns.name)
    h.start(userspace_tso=True)
    try:
        got = h.vsctl("get", "Open_vSwitch", ".", "other_config:userspace-tso-enable")
        assert got.strip().strip('"') == "true"
        log = h.log_tail("ovs-vswitchd", 200).lower()
        assert "userspace tcp segmentation offloading support enabled" in log
    finally:
        h.stop()


def test_failing_command_says_what_ovs_vsctl_said(netns_factory: object) -> None:
    ns: Netns = netns_factory("oe")  # type: ignore[operator]
    with OvsHost(netns=ns.name) as h, pytest.raises(SetupError, match="no bridge named nope"):
        h.vsctl("add-port", "nope", "p1")
