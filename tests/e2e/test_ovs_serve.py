"""``sttun up --ovsdb`` over time: live changes, restarts and errors.

Each case is asserted where an OVS user looks (the Interface row's ``type``,
``status:sttun_state`` and ``error``, the OpenFlow port number) and on traffic
between the two VMs (tests/e2e/ovs_hosts.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sttun.daemon.ovsdb import INSTALL_HINT
from tests.e2e.ovs_hosts import (
    BRIDGE,
    STT_PORT_NAME,
    VM_B,
    Hypervisor,
    add_stt_port,
    ofport,
    ovs_pair,
    row_error,
    row_state,
    served,
)
from tests.e2e.sttun_hosts import (
    Endpoint,
    config_toml,
    link_exists,
    ping,
    start_endpoint,
    wait_for,
)
from tests.e2e.test_ovs_traffic import KEY, ovs_sttun, start_ovs_sttun
from tests.netns import Netns, need_ovs, need_tools

pytestmark = pytest.mark.netns

#: sttun_state of a tunnel to an address nobody answers ARP for: served, but down.
UNRESOLVED = ("up", "down")


@pytest.fixture(autouse=True)
def _ovs() -> None:
    need_ovs()
    need_tools("ethtool", "ping", "iperf3", "tshark")


def no_ping(hv: Hypervisor, addr: str) -> bool:
    """True when two pings from ``hv``'s VM to ``addr`` both go unanswered."""
    res = hv.vm.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", addr], check=False, timeout=30)
    return res.returncode != 0


def tunnels_of(ep: Endpoint) -> dict[str, dict[str, object]]:
    """``sttun show --json`` tunnels by name."""
    return {t["name"]: t for t in ep.show()["tunnels"]}


def ifindex(hv: Hypervisor, dev: str) -> int:
    """Interface index of ``dev`` in the host namespace."""
    return int(hv.ns.run(["cat", f"/sys/class/net/{dev}/ifindex"]).stdout)


def test_live_changes(tmp_path: Path) -> None:
    with ovs_pair() as p, ovs_sttun(p, tmp_path) as (ep_a, ep_b):
        ping(p.a.vm, VM_B)
        port_before = ofport(p.a)
        # a new type=stt row becomes a tunnel of its own
        add_stt_port(p.a, "198.18.0.9", 7, "stt1")
        wait_for(lambda: served(p.a, "stt1", UNRESOLVED), what="stt1 a system port")
        assert tunnels_of(ep_a)["stt1"]["in_key"] == 7
        stt1_index = ifindex(p.a, "stt1")
        ping(p.a.vm, VM_B)
        # one side changes its key: that tunnel only is reconfigured, traffic stops
        p.a.ovs.vsctl("set", "interface", STT_PORT_NAME, "options:key=43")
        wait_for(lambda: tunnels_of(ep_a)[STT_PORT_NAME]["in_key"] == 43, what="key 43 on a")
        assert no_ping(p.a, VM_B)
        log = ep_a.log_text()
        assert f"[{STT_PORT_NAME} key=0x2a] tunnel stopped for a change" in log
        assert "[stt1 key=0x7] tunnel stopped" not in log
        assert ifindex(p.a, "stt1") == stt1_index
        # the other side follows: traffic again, OVS never lost the port
        p.b.ovs.vsctl("set", "interface", STT_PORT_NAME, "options:key=43")
        wait_for(lambda: tunnels_of(ep_b)[STT_PORT_NAME]["in_key"] == 43, what="key 43 on b")
        wait_for(lambda: served(p.b), what="b served again")
        ping(p.a.vm, VM_B)
        assert ofport(p.a) == port_before
        assert row_state(p.a) == ("system", "up", [])
        # del-port removes the tunnel and its veth pair, and nothing else
        p.a.ovs.vsctl("del-port", BRIDGE, "stt1")
        wait_for(lambda: "stt1" not in tunnels_of(ep_a), what="stt1 gone")
        wait_for(lambda: not link_exists(p.a.ns, "stt1"), what="veth stt1 deleted")
        assert set(tunnels_of(ep_a)) == {STT_PORT_NAME}
        ping(p.a.vm, VM_B)


def test_restarts_keep_the_port(tmp_path: Path) -> None:
    """sttun restarts: OVS keeps its port (the veth pair stays), the new sttun re-adopts
    the row and removes the pair of a row deleted while it was down; ovsdb-server
    restarts: sttun reconnects and follows changes made afterwards."""
    with ovs_pair() as p, ovs_sttun(p, tmp_path) as eps:
        add_stt_port(p.a, "198.18.0.9", 7, "stt1")
        wait_for(lambda: served(p.a, "stt1", UNRESOLVED), timeout=20, what="stt1 served")
        port_before, index_before = ofport(p.a), ifindex(p.a, STT_PORT_NAME)

        assert eps[0].stop() == 0
        assert link_exists(p.a.ns, STT_PORT_NAME)
        assert row_state(p.a)[0] == "system"
        p.a.ovs.vsctl("del-port", BRIDGE, "stt1")  # while sttun is away
        assert link_exists(p.a.ns, "stt1")

        eps[0] = start_ovs_sttun(p.a, tmp_path)
        wait_for(lambda: not link_exists(p.a.ns, "stt1"), timeout=20, what="leftover removed")
        wait_for(lambda: served(p.a), timeout=20, what="stt0 re-adopted")
        assert (ofport(p.a), ifindex(p.a, STT_PORT_NAME)) == (port_before, index_before)
        assert set(tunnels_of(eps[0])) == {STT_PORT_NAME}
        ping(p.a.vm, VM_B)

        p.a.ovs.stop_daemon("ovsdb-server")
        p.a.ovs.start_ovsdb_server()
        wait_for(lambda: eps[0].show()["ovsdb"]["connected"], timeout=30, what="reconnected")
        ping(p.a.vm, VM_B)
        p.a.ovs.vsctl("set", "interface", STT_PORT_NAME, "options:key=44")
        p.b.ovs.vsctl("set", "interface", STT_PORT_NAME, "options:key=44")
        wait_for(lambda: tunnels_of(eps[0])[STT_PORT_NAME]["in_key"] == 44, timeout=30, what="44")
        wait_for(lambda: served(p.a) and served(p.b), timeout=20, what="both served")
        ping(p.a.vm, VM_B)


def test_errors_go_into_the_row(tmp_path: Path) -> None:
    """Rows sttun cannot serve get an ``error`` and ``sttun_state=error``; nothing else
    is disturbed; fixing the row makes it a tunnel."""
    with ovs_pair() as p:
        add_stt_port(p.b, p.a.underlay_ip, KEY)
        ep_b = start_ovs_sttun(p.b, tmp_path)
        # host a: sttun with a static tunnel to b on key 42, and OVSDB
        static = config_toml(
            [{"name": "static0", "local_ip": p.a.underlay_ip, "remote_ip": p.b.underlay_ip,
              "key": KEY}],
            ovsdb=p.a.ovs.db_remote,
        )  # fmt: skip
        sub = tmp_path / p.a.ns.name
        sub.mkdir()
        ep_a = start_endpoint(p.a.ns, [], ["static0"], sub, config=static)
        try:
            add_stt_port(p.a, p.b.underlay_ip, KEY)  # clashes with static0
            p.a.ovs.vsctl("add-port", BRIDGE, "nor", "--", "set", "interface", "nor",
                          "type=stt", "options:key=1")  # fmt: skip
            add_stt_port(p.a, "flow", 1, "flw")
            add_stt_port(p.a, "198.18.0.7", "flow", "kfl")
            add_stt_port(p.a, "198.18.0.7", 3, "nl", "local_ip=198.18.0.99")
            add_stt_port(p.a, "198.18.0.8", 5, "cl1")
            add_stt_port(p.a, "198.18.0.8", 5, "cl2")
            expected = {
                STT_PORT_NAME: "static0",
                "nor": "remote_ip is required",
                "flw": "remote_ip=flow is not supported",
                "kfl": "key=flow is not supported",
                "nl": "local_ip 198.18.0.99 is not an address of this host",
                "cl2": "key clash with interface cl1",
            }
            for name, words in expected.items():
                wait_for(lambda n=name, w=words: w in row_error(p.a, n), timeout=20, what=name)
                assert row_state(p.a, name)[1] == "error", name
            wait_for(lambda: served(p.a, "cl1", UNRESOLVED), timeout=20, what="cl1 served")
            errors = ep_a.show()["ovsdb"]["errors"]
            assert set(errors) == set(expected)
            assert "same local address, remote address and in_key" in row_error(p.a)
            # the static tunnel works (b's OVS port is key 42 too)
            p.a.ns.run(["ip", "addr", "add", "192.0.2.1/24", "dev", "static0"])
            wait_for(lambda: served(p.b), timeout=20, what="b served")
            ping(p.a.ns, VM_B)
            # fix the clashing row: it becomes a tunnel, the error goes
            p.a.ovs.vsctl("set", "interface", STT_PORT_NAME, "options:key=43")
            wait_for(lambda: served(p.a), timeout=20, what="stt0 served after the fix")
            assert row_error(p.a) == ""
            assert set(tunnels_of(ep_a)) == {"static0", STT_PORT_NAME, "cl1"}
            ping(p.a.ns, VM_B)
        finally:
            for ep in (ep_a, ep_b):
                assert ep.stop() == 0, ep.log_text()


def test_without_the_ovs_package_up_says_what_to_install(tmp_path: Path) -> None:
    """``sttun up --ovsdb`` on a machine without PyPI ``ovs``: one clear line, exit
    status 1, and nothing left on the host (its nftables table is removed again)."""
    code = (
        "import sys; sys.modules['ovs'] = None\n"  # the import fails as if not installed
        "from sttun.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    with Netns("noovs") as ns:
        res = ns.run(
            [sys.executable, "-c", code, "up", "--ovsdb", "unix:/nonexistent/db.sock",
             "--instance", "noovs", "--control-socket", str(tmp_path / "s.sock")],
            check=False,
        )  # fmt: skip
        assert res.returncode == 1, res.stdout + res.stderr
        assert INSTALL_HINT in res.stderr and "Traceback" not in res.stderr
        assert "sttun_noovs" not in ns.run(["nft", "list", "tables"]).stdout
