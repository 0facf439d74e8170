"""sttun.daemon.ovsdb against a real ovsdb-server + ovs-vswitchd (sttun.tools.ovs_host).

Every step is driven by the real ``ovs-vsctl`` commands an OVS user types; the
client is pumped through its ``fileno()``/``run()`` pair exactly as the daemon's
event loop will, and every assertion on the database reads it back with ovs-vsctl.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sttun.daemon.ovsdb import INSTALL_HINT, OvsdbClient, OvsEvent
from sttun.tools.ovs_host import OvsHost
from tests.e2e.ovs_hosts import interface_row
from tests.netns import Netns, need_ovs

pytestmark = pytest.mark.netns

REMOTE = "198.18.0.2"
LOCAL = "198.18.0.1"
OLD_COMMAND = (
    "add-port", "br-int", "stt0", "--", "set", "interface", "stt0", "type=stt",
    f"options:remote_ip={REMOTE}", "options:key=42",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _ovs() -> None:
    need_ovs()


class Pump:
    """Drives an :class:`OvsdbClient` the way an event loop does; collects its events."""

    def __init__(self, client: OvsdbClient) -> None:
        self.client = client
        self.events: list[OvsEvent] = []

    def until(self, cond: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
        """Wait on the client's fd and run it until ``cond()`` holds."""
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what or cond}; got {self.events}")
            select.select([self.client], [], [], left)
            self.events += self.client.run()

    def next_events(self, n: int = 1, timeout: float = 10.0) -> list[OvsEvent]:
        """The next ``n`` events (waiting for them)."""
        start = len(self.events)
        self.until(lambda: len(self.events) >= start + n, timeout, f"{n} event(s)")
        return self.events[start:]

    def row(self, ovs: OvsHost, name: str, cond: Callable[[dict[str, object]], bool]) -> dict:
        """Keep the client running until ovs-vsctl shows row ``name`` satisfying ``cond``."""
        got: dict[str, object] = {}

        def check() -> bool:
            nonlocal got
            got = interface_row(ovs, name)
            return cond(got)

        deadline = time.monotonic() + 10
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"row {name} never matched; last: {got}")
            select.select([self.client], [], [], 0.2)
            self.events += self.client.run()
        return got


@contextlib.contextmanager
def ovs_and_client(role: str) -> Iterator[tuple[Netns, OvsHost, Pump]]:
    """A namespace with OVS (br-int) and a synced client; the client checks local_ip
    against the namespace's real addresses."""
    with Netns(role) as ns:
        ns.run(["ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1"])
        ns.run(["ip", "addr", "add", f"{LOCAL}/24", "dev", "ul0"])
        ns.run(["ip", "link", "set", "ul0", "up"])
        ovs = OvsHost(netns=ns.name)
        ovs.start()
        try:
            ovs.add_bridge("br-int")
            with ns.entered():
                from sttun.io.netlink import is_local_address

                def is_local(addr: str) -> bool:
                    with ns.entered():
                        return is_local_address(addr)

                client = OvsdbClient(ovs.db_remote, is_local=is_local)
            pump = Pump(client)
            try:
                pump.until(lambda: client.synced, what="initial sync")
                yield ns, ovs, pump
            finally:
                client.close()
        finally:
            ovs.stop()


def serve(ns: Netns, pump: Pump, name: str) -> None:
    """What the daemon does for an "added" event: make the device, report it ready."""
    ns.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}-s"])
    pump.client.port_ready(name)
    pump.client.set_state(name, "up", egress_iface="ul0", carrier=True)


def test_add_change_delete_with_the_old_commands() -> None:
    with ovs_and_client("oa") as (ns, ovs, pump):
        assert pump.events == []  # nothing to serve yet
        ovs.vsctl(*OLD_COMMAND)
        (ev,) = pump.next_events()
        assert (ev.kind, ev.name) == ("added", "stt0")
        t = ev.tunnel
        assert t is not None
        assert t.remote_ip == ipaddress.ip_address(REMOTE)
        assert (t.local_ip, t.in_key, t.out_key, t.dst_port) == (None, 42, 42, 7471)
        assert (t.tos, t.ttl, t.df, t.mtu, t.offload) == (0, 64, True, None, False)
        assert pump.client.tunnels == {"stt0": t}

        serve(ns, pump, "stt0")
        row = pump.row(ovs, "stt0", lambda r: r["status"].get("sttun_state") == "up")  # type: ignore[attr-defined]
        assert row["type"] == "system"
        assert row["external_ids"] == {"sttun-type": "stt"}
        assert row["options"] == {"remote_ip": REMOTE, "key": "42"}  # still shown
        assert row["error"] == []
        assert row["status"]["tunnel_egress_iface"] == "ul0"  # type: ignore[index]
        assert row["ofport"] not in (-1, [])  # ovs-vswitchd opened the device
        assert "stt0" in ovs.vsctl("list-ports", "br-int").split()

        ovs.vsctl("set", "interface", "stt0", "options:key=43")
        (ev,) = pump.next_events()
        assert (ev.kind, ev.name) == ("changed", "stt0")
        assert ev.old is not None and ev.tunnel is not None
        assert (ev.old.in_key, ev.tunnel.in_key, ev.tunnel.out_key) == (42, 43, 43)

        ovs.vsctl("set", "interface", "stt0", "options:local_ip=198.18.0.1", "options:tos=0x28")
        (ev,) = pump.next_events()
        assert ev.kind == "changed" and ev.tunnel is not None
        assert (str(ev.tunnel.local_ip), ev.tunnel.tos) == (LOCAL, 10)

        ovs.vsctl("del-port", "stt0")
        (ev,) = pump.next_events()
        assert (ev.kind, ev.name, ev.port_gone) == ("removed", "stt0", True)
        assert pump.client.tunnels == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["options:key=42"], "remote_ip is required"),
        ([f"options:remote_ip={REMOTE}", "options:key=flow"], "key=flow is not supported"),
        (["options:remote_ip=flow", "options:key=1"], "remote_ip=flow is not supported"),
        (
            [f"options:remote_ip={REMOTE}", "options:local_ip=198.18.0.77"],
            "local_ip 198.18.0.77 is not an address of this host",
        ),
    ],
    ids=["no-remote", "key-flow", "remote-flow", "local-not-local"],
)
def test_rows_that_cannot_be_served_get_an_error(options: list[str], message: str) -> None:
    with ovs_and_client("ob") as (ns, ovs, pump):
        ovs.vsctl(*OLD_COMMAND)
        (ev,) = pump.next_events()
        serve(ns, pump, "stt0")
        pump.row(ovs, "stt0", lambda r: r["type"] == "system")
        before = interface_row(ovs, "stt0")

        ovs.vsctl("add-port", "br-int", "bad0", "--", "set", "interface", "bad0", "type=stt",
                  *options)  # fmt: skip
        row = pump.row(ovs, "bad0", lambda r: message in str(r["error"]))
        assert row["type"] == "stt"  # left as the user wrote it
        assert row["status"].get("sttun_state") == "error"  # type: ignore[attr-defined]
        assert "bad0" in pump.client.errors and "bad0" not in pump.client.tunnels
        # nothing else disturbed: no event, the served row unchanged
        assert [e for e in pump.events if e.name == "bad0" or e is not ev] == []
        after = interface_row(ovs, "stt0")
        for col in ("type", "options", "external_ids", "error", "ofport"):
            assert after[col] == before[col], col

        # ovs-vswitchd clears every error on reconfiguration; the message comes back
        ovs.vsctl("set", "interface", "stt0", "external_ids:note=x")
        pump.row(ovs, "bad0", lambda r: message in str(r["error"]))

        # fixing the row serves it and takes the message back
        ovs.vsctl("set", "interface", "bad0", f"options:remote_ip={REMOTE}", "options:key=7",
                  "--", "remove", "interface", "bad0", "options", "local_ip")  # fmt: skip
        (ev2,) = pump.next_events()
        assert (ev2.kind, ev2.name) == ("added", "bad0")
        pump.row(ovs, "bad0", lambda r: r["error"] == [])


def test_key_clash_keeps_the_first_and_reports_the_second() -> None:
    with ovs_and_client("oc") as (_ns, ovs, pump):
        ovs.vsctl(*OLD_COMMAND)
        pump.next_events()
        ovs.vsctl("add-port", "br-int", "stt1", "--", "set", "interface", "stt1", "type=stt",
                  f"options:remote_ip={REMOTE}", "options:key=42")  # fmt: skip
        row = pump.row(ovs, "stt1", lambda r: "key clash" in str(r["error"]))
        assert "interface stt0" in str(row["error"])
        assert list(pump.client.tunnels) == ["stt0"]
        # the first goes away: the second is served
        ovs.vsctl("del-port", "stt0")
        evs = pump.next_events(2)
        assert {(e.kind, e.name) for e in evs} == {("removed", "stt0"), ("added", "stt1")}


def test_a_served_row_that_becomes_invalid_is_removed_but_keeps_its_port() -> None:
    with ovs_and_client("od") as (ns, ovs, pump):
        ovs.vsctl(*OLD_COMMAND)
        pump.next_events()
        serve(ns, pump, "stt0")
        pump.row(ovs, "stt0", lambda r: r["type"] == "system")
        ovs.vsctl("set", "interface", "stt0", "options:key=flow")
        (ev,) = pump.next_events()
        assert (ev.kind, ev.port_gone) == ("removed", False)
        row = pump.row(ovs, "stt0", lambda r: "key=flow" in str(r["error"]))
        assert row["type"] == "system"
        ovs.vsctl("set", "interface", "stt0", "options:key=5")
        (ev,) = pump.next_events()
        assert ev.kind == "added" and ev.tunnel is not None and ev.tunnel.in_key == 5


def test_ovsdb_server_restart_is_survived_without_spurious_events() -> None:
    with ovs_and_client("oe") as (ns, ovs, pump):
        ovs.vsctl(*OLD_COMMAND)
        pump.next_events()
        serve(ns, pump, "stt0")
        pump.row(ovs, "stt0", lambda r: r["type"] == "system")
        seen = len(pump.events)

        ovs.stop_daemon("ovsdb-server")
        pump.until(lambda: not pump.client.connected, what="the client to notice")
        ovs.start_ovsdb_server()
        pump.until(lambda: pump.client.connected, timeout=30, what="reconnect")
        assert pump.events[seen:] == []  # a resync is not a change

        ovs.vsctl("set", "interface", "stt0", "options:key=44")
        (ev,) = pump.next_events()
        assert ev.kind == "changed" and ev.tunnel is not None and ev.tunnel.in_key == 44


def test_a_new_client_adopts_served_rows() -> None:
    """sttun restarting: rows it switched to system ports are served again, unchanged."""
    with ovs_and_client("of") as (ns, ovs, pump):
        ovs.vsctl(*OLD_COMMAND)
        pump.next_events()
        serve(ns, pump, "stt0")
        pump.row(ovs, "stt0", lambda r: r["type"] == "system")
        pump.client.close()

        with ns.entered():
            fresh = Pump(OvsdbClient(ovs.db_remote, is_local=lambda a: a == LOCAL))
        try:
            (ev,) = fresh.next_events()
            assert (ev.kind, ev.name) == ("added", "stt0")
            assert ev.tunnel is not None and ev.tunnel.in_key == 42
            row = interface_row(ovs, "stt0")
            assert row["type"] == "system" and row["ofport"] not in (-1, [])
        finally:
            fresh.client.close()


def test_userspace_tso_setting_reaches_every_tunnel() -> None:
    with ovs_and_client("og") as (_ns, ovs, pump):
        ovs.vsctl(*OLD_COMMAND)
        (ev,) = pump.next_events()
        assert ev.tunnel is not None and ev.tunnel.offload is False
        assert pump.client.userspace_tso is False
        ovs.set_userspace_tso(True)
        (ev,) = pump.next_events()
        assert ev.kind == "changed" and ev.tunnel is not None and ev.tunnel.offload is True
        assert pump.client.userspace_tso is True


def test_without_the_ovs_package_the_error_says_what_to_install(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from sttun.daemon.ovsdb import OvsdbClient\n"
        "from sttun.errors import SetupError\n"
        "try:\n    OvsdbClient('unix:/nonexistent')\n"
        "except SetupError as e:\n    print(e)\n"
    )
    # -S: no site-packages, as on a machine where the extra was not installed
    res = subprocess.run(
        [sys.executable, "-S", "-c", code, str(src)], capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == INSTALL_HINT


def test_a_client_started_before_ovsdb_server_connects_when_it_comes() -> None:
    with Netns("oh") as ns:
        ovs = OvsHost(netns=ns.name)
        ovs.start()
        try:
            ovs.add_bridge("br-int")
            ovs.vsctl(*OLD_COMMAND)
            ovs.stop_daemon("ovsdb-server")
            pump = Pump(OvsdbClient(ovs.db_remote, is_local=lambda a: a == LOCAL))
            try:
                pump.events += pump.client.run()  # tries to connect, fails, backs off
                assert not pump.client.synced and pump.events == []
                ovs.start_ovsdb_server()
                (ev,) = pump.next_events(timeout=30)
                assert (ev.kind, ev.name) == ("added", "stt0")
            finally:
                pump.client.close()
        finally:
            ovs.stop()
