"""``sttun demo --ovs``: Open vSwitch's old ``type=stt`` port, served by sttun.

Two hosts on a veth underlay (:class:`sttun.tools.topology.TwoHosts`), each with its
own Open vSwitch (:class:`sttun.tools.ovs_host.OvsHost`: ovsdb-server + ovs-vswitchd,
a netdev bridge ``br-int``) and a "VM" namespace attached to ``br-int`` by a veth.
Then, step by step:

1. ``sttun up --ovsdb`` on each host;
2. the old command on each host: ``ovs-vsctl add-port br-int stt0 -- set interface
   stt0 type=stt options:remote_ip=PEER options:key=42``, and the time until the row
   is a port OVS forwards through (``type=system``, ``status:sttun_state=up``);
3. the row as ``ovs-vsctl`` shows it;
4. ping and iperf3 (if installed) from VM a to VM b;
5. a live change: ``options:key=43`` on both hosts, ping again;
6. the endpoints' counters.

Everything is removed at the end (also on a failure or Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from sttun import __version__
from sttun.errors import SetupError
from sttun.tools.demo_report import Display, Report
from sttun.tools.ovs_host import OvsHost
from sttun.tools.topology import (
    Endpoint,
    Host,
    TwoHosts,
    create_namespace,
    delete_namespace,
    launch_sttun,
)
from sttun.tools.traffic import gbits, ping_rtts

PREFIX = "sttun-demo"
BRIDGE = "br-int"
PORT = "stt0"
KEY = 42
NEW_KEY = 43
READY_TIMEOUT = 30.0
IPERF_SECONDS = 5


class OvsDemo:
    """One run of ``sttun demo --ovs`` (the steps, in order)."""

    def __init__(self, args: argparse.Namespace, display: Display) -> None:
        self.args = args
        self.ui = display
        self.hosts = TwoHosts(prefix=PREFIX)
        self.report = Report(f"sttun {__version__} demo: Open vSwitch type=stt ports")
        self.ovs: list[OvsHost] = []
        self.vms: list[Host] = []
        self.eps: list[Endpoint] = []

    def _check(self, name: str, ok: bool | None, detail: str) -> None:
        self.ui.done(self.report.add(name, ok, detail))

    def run(self) -> None:
        """Every step; raises :class:`SetupError` when the set-up itself breaks."""
        h = self.hosts
        oa, ob, plen = h.overlay
        with self.ui.step("build two hosts, each with Open vSwitch and a VM"):
            h.build()
            for host, vm_ip in ((h.a, oa), (h.b, ob)):
                self._hypervisor(host, f"{vm_ip}/{plen}")
        self._check(
            "hosts",
            True,
            f"{h.a.name} / {h.b.name}: ovs-vswitchd (netdev {BRIDGE}) + VM {oa} / {ob}",
        )
        with self.ui.step("start sttun up --ovsdb on each host"):
            for host, ovs in zip(h.hosts, self.ovs, strict=True):
                self.eps.append(self._sttun(host, ovs))
        self._check("sttun", True, f"pids {self.eps[0].pid}/{self.eps[1].pid}, no tunnel yet")
        self.declare()
        self.traffic()
        self.live_change()
        self.counters()

    def _hypervisor(self, host: Host, vm_cidr: str) -> None:
        ovs = OvsHost(netns=host.name)
        self.ovs.append(ovs)
        ovs.start()
        ovs.add_bridge(BRIDGE)
        vm = Host(f"{host.name}-vm")
        create_namespace(vm.name)
        self.vms.append(vm)
        host.ip("link", "add", "vmport", "type", "veth", "peer", "name", "eth0", "netns", vm.name)
        vm.ip("addr", "add", vm_cidr, "dev", "eth0")
        vm.run(["ethtool", "-K", "eth0", "tx", "off"])  # OVS's advice for veth ports
        vm.ip("link", "set", "eth0", "up")
        host.ip("link", "set", "vmport", "up")
        ovs.vsctl("add-port", BRIDGE, "vmport")

    def _sttun(self, host: Host, ovs: OvsHost) -> Endpoint:
        sock = str(self.hosts.state_dir / f"{host.name}.sock")
        log = self.hosts.state_dir / f"{host.name}.log"
        argv = [sys.executable, "-m", "sttun", "up", "--ovsdb", ovs.db_remote,
                "--instance", "demo", "--control-socket", sock]  # fmt: skip
        proc = launch_sttun(host, argv, sock=sock, log=log, devs=[])
        ep = Endpoint(host, proc.pid, sock, log, proc)
        self.hosts.endpoints.append(ep)
        return ep

    def declare(self) -> None:
        """The old command on both hosts; wait until OVS forwards through the port."""
        h = self.hosts
        ua, ub, _ = h.underlay
        took = []
        with self.ui.step(f"ovs-vsctl add-port {BRIDGE} {PORT} ... type=stt on both hosts"):
            for ovs, peer in zip(self.ovs, (ub, ua), strict=True):
                t0 = time.monotonic()
                ovs.vsctl(
                    "add-port", BRIDGE, PORT, "--", "set", "interface", PORT, "type=stt",
                    f"options:remote_ip={peer}", f"options:key={KEY}",
                )  # fmt: skip
                self._wait_served(ovs)
                took.append(time.monotonic() - t0)
        self._check(
            "type=stt port",
            True,
            f"served {took[0]:.2f} s / {took[1]:.2f} s after ovs-vsctl add-port",
        )
        row = self._row(self.ovs[0])
        self._check(
            "OVSDB row",
            row.get("type") == "system" and row.get("error") in ([], None),
            f"type {row.get('type')}, options {row.get('options')}, "
            f"status sttun_state={row.get('status', {}).get('sttun_state')} "
            f"egress {row.get('status', {}).get('tunnel_egress_iface')}, error none",
        )

    def _wait_served(self, ovs: OvsHost) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            row = self._row(ovs)
            if row.get("type") == "system" and row.get("status", {}).get("sttun_state") == "up":
                return
            if time.monotonic() > deadline:
                raise SetupError(f"{PORT} not served in {READY_TIMEOUT:g} s: {row}")
            time.sleep(0.05)

    @staticmethod
    def _row(ovs: OvsHost) -> dict[str, Any]:
        out = json.loads(ovs.vsctl("--format=json", "list", "Interface", PORT, wait=False))
        return {k: _value(v) for k, v in zip(out["headings"], out["data"][0], strict=True)}

    def traffic(self) -> None:
        """Ping and iperf3 from VM a to VM b."""
        ob = self.hosts.overlay[1]
        va, vb = self.vms
        with self.ui.step(f"ping {ob} from VM a"):
            res = va.run(["ping", "-c", "10", "-i", "0.1", "-W", "2", ob], check=False, timeout=60)
        rtts = ping_rtts(res.stdout)
        self._check(
            "ping VM a -> VM b",
            len(rtts) == 10,
            f"{len(rtts)}/10 replies"
            + (f", RTT median {statistics.median(rtts):.3f} ms" if rtts else ""),
        )
        if not shutil.which("iperf3"):
            self._check("iperf3", None, "iperf3 is not installed")
            return
        with self.ui.step(f"iperf3 VM a -> VM b for {IPERF_SECONDS} s"):
            srv = vb.popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
            try:
                for _ in range(50):  # until the server listens
                    if "5201" in vb.run(["ss", "-ltn"], check=False).stdout:
                        break
                    time.sleep(0.1)
                out = va.run(["iperf3", "-c", ob, "-t", str(IPERF_SECONDS), "-J"], check=False,
                             timeout=IPERF_SECONDS + 30)  # fmt: skip
            finally:
                srv.kill()
                srv.wait()
        try:
            bps = float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])
        except (ValueError, KeyError):
            bps = 0.0
        self._check("iperf3 VM a -> VM b", bps > 0, gbits(bps))

    def live_change(self) -> None:
        """options:key=43 on both hosts: the tunnels follow, OVS keeps its port."""
        before = [self._row(ovs).get("ofport") for ovs in self.ovs]
        with self.ui.step(f"ovs-vsctl set interface {PORT} options:key={NEW_KEY} on both"):
            for ovs in self.ovs:
                ovs.vsctl("set", "interface", PORT, f"options:key={NEW_KEY}")
            deadline = time.monotonic() + READY_TIMEOUT
            while not all(
                t.get("in_key") == NEW_KEY for ep in self.eps for t in ep.show()["tunnels"]
            ):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            res = self.vms[0].run(
                ["ping", "-c", "3", "-i", "0.2", "-W", "2", self.hosts.overlay[1]], check=False
            )
        after = [self._row(ovs).get("ofport") for ovs in self.ovs]
        self._check(
            "live change",
            res.returncode == 0 and before == after,
            f"key {NEW_KEY} on both; ping {'ok' if res.returncode == 0 else 'FAILED'}; "
            f"OpenFlow ports {'unchanged' if before == after else 'CHANGED'}",
        )

    def counters(self) -> None:
        """What ``sttun show`` says on both hosts."""
        for host, ep in zip(self.hosts.hosts, self.eps, strict=True):
            data = ep.show()
            t = (data.get("tunnels") or [{}])[0]
            link = "connected" if data["ovsdb"]["connected"] else "NOT connected"
            self._check(
                f"sttun show {host.name[-1:]}",
                t.get("ovs_interface") == PORT and t.get("state") == "up",
                f"{t.get('name')} (ovs) {t.get('local_ip')} -> {t.get('remote_ip')}: "
                f"tx {t.get('tx', {}).get('frames')} / rx {t.get('rx', {}).get('frames')} "
                f"frames since the key change; ovsdb {link}",
            )

    def keep(self) -> None:
        """Not offered for the OVS demo (``main`` refuses ``--keep --ovs``)."""
        raise SetupError("sttun demo --ovs does not support --keep")

    def close(self) -> None:
        """Stop sttun and Open vSwitch, delete the VMs and hosts (veth pairs go too)."""
        for ep in self.eps:
            ep.stop()
        for ovs in self.ovs:
            try:
                ovs.stop()
            except SetupError as e:
                print(f"sttun demo: stopping Open vSwitch: {e}")
        for vm in self.vms:
            try:
                delete_namespace(vm.name)
            except SetupError as e:
                print(f"sttun demo: {e}")
        try:
            self.hosts.close()
        except SetupError as e:
            print(f"sttun demo: cleaning up: {e}")


def _value(v: object) -> object:
    """OVSDB JSON (``["map", ...]``, ``["set", ...]``) to Python values."""
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
        kind, body = v
        if kind == "map":
            return {k: _value(x) for k, x in body}
        if kind == "set":
            return [_value(x) for x in body]
        if kind == "uuid":
            return body
    return v
