"""Two hypervisors with Open vSwitch: the building block of the OVS e2e tests.

Each host namespace (``a``, ``b``, on the veth underlay of :func:`make_two_hosts`)
runs its own ovsdb-server + ovs-vswitchd (:class:`sttun.tools.ovs_host.OvsHost`) with
a netdev bridge ``br-int``, and has a "VM": a namespace whose ``eth0`` is a veth whose
other end (``vmport``) is a port of ``br-int``.  VM addresses: 192.0.2.1 (a) and
192.0.2.2 (b); the hosts keep their underlay addresses 198.18.0.1/.2.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from sttun.tools.ovs_host import OvsHost
from tests.netns import Netns, TwoHosts, add_address, make_two_hosts, unique_suffix

VM_A = "192.0.2.1"
VM_B = "192.0.2.2"
BRIDGE = "br-int"
VM_PORT = "vmport"


@dataclass
class Hypervisor:
    """One host namespace with its Open vSwitch and its VM namespace."""

    ns: Netns
    ovs: OvsHost
    vm: Netns
    vm_ip: str
    underlay_ip: str


@dataclass
class OvsPair:
    """Hosts ``a`` and ``b`` with OVS and a VM each, joined by the veth underlay."""

    hosts: TwoHosts
    a: Hypervisor
    b: Hypervisor


@contextlib.contextmanager
def ovs_pair(
    *, userspace_tso: bool = False, veth_tso: bool = True, vm_offload: bool | None = None
) -> Iterator[OvsPair]:
    """Build the two hypervisors; everything is stopped and deleted on exit.

    ``userspace_tso``: start both ovs-vswitchd with ``userspace-tso-enable=true``.
    ``vm_offload``: leave checksum/TSO offload on the VMs' ``eth0`` (default: only
    with ``userspace_tso``).  OVS's netdev ports without userspace TSO read frames
    as they are and do not finish a partial checksum, so a VM attached by a veth
    must send complete checksums (OVS's own advice: ``ethtool -K veth tx off``),
    as a virtio VM without negotiated offloads does.
    ``veth_tso``: leave TSO on the underlay veth (``False``: real MTU-sized segments).
    """
    with make_two_hosts() as h, contextlib.ExitStack() as stack:
        if not veth_tso:
            for ns, dev in ((h.a, h.dev_a), (h.b, h.dev_b)):
                ns.run(["ethtool", "-K", dev, "tso", "off", "gso", "on", "gro", "on"])
        sides = []
        for role, ns, vm_ip, ul in (("a", h.a, VM_A, h.ip_a), ("b", h.b, VM_B, h.ip_b)):
            vm = stack.enter_context(Netns(f"vm{role}"))
            ovs = OvsHost(netns=ns.name)
            stack.callback(ovs.stop)
            ovs.start(userspace_tso=userspace_tso)
            ovs.add_bridge(BRIDGE)
            ns.run(
                ["ip", "link", "add", VM_PORT, "type", "veth", "peer", "name", "eth0",
                 "netns", vm.name]
            )  # fmt: skip
            add_address(vm, "eth0", f"{vm_ip}/24")
            if not (userspace_tso if vm_offload is None else vm_offload):
                vm.run(["ethtool", "-K", "eth0", "tx", "off"])  # also turns TSO off
            vm.run(["ip", "link", "set", "eth0", "up"])
            ns.run(["ip", "link", "set", VM_PORT, "up"])
            ovs.vsctl("add-port", BRIDGE, VM_PORT)
            sides.append(Hypervisor(ns, ovs, vm, vm_ip, ul))
        yield OvsPair(h, sides[0], sides[1])


def tcp_checksum_errors(ns: Netns) -> int:
    """``Tcp: InCsumErrors`` of the namespace (/proc/net/snmp)."""
    lines = [ln.split() for ln in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    tcp = [ln for ln in lines if ln and ln[0] == "Tcp:"]
    return int(dict(zip(tcp[0], tcp[1], strict=True))["InCsumErrors"])


def interface_row(ovs: OvsHost, name: str) -> dict[str, object]:
    """The Interface row ``name`` as a dict of column -> value (``ovs-vsctl --format=json``)."""
    out = ovs.vsctl("--format=json", "list", "Interface", name, wait=False)
    data = json.loads(out)
    return dict(zip(data["headings"], (_ovsdb_value(v) for v in data["data"][0]), strict=True))


def _ovsdb_value(v: object) -> object:
    """OVSDB JSON (["map", [[k, v]...]], ["set", [...]], ["uuid", u]) to Python values."""
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
        kind, body = v
        if kind == "map":
            return {k: _ovsdb_value(x) for k, x in body}
        if kind == "set":
            return [_ovsdb_value(x) for x in body]
        if kind in ("uuid", "named-uuid"):
            return body
    return v


def iperf3(client: Netns, server: Netns, addr: str, seconds: int = 5) -> float:
    """Single-stream iperf3 TCP from ``client`` to ``addr`` (in ``server``); Gbit/s received."""
    port = str(5300 + int(unique_suffix()[-2:], 36) % 500)
    srv = server.popen(
        ["iperf3", "-s", "-1", "-p", port, "--forceflush"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert srv.stdout is not None
        for line in srv.stdout:  # iperf3 prints "Server listening on PORT" when ready
            if "listening" in line:
                break
        res = client.run(
            [
                "iperf3",
                "-c",
                addr,
                "-p",
                port,
                "-t",
                str(seconds),
                "-J",
                "--connect-timeout",
                "5000",
            ],
            timeout=seconds + 30,
        )
        data = json.loads(res.stdout)
        if "error" in data:
            raise AssertionError(f"iperf3 to {addr}: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


# --------------------------------------------------------------------------- sttun --ovsdb
STT_PORT_NAME = "stt0"


def add_stt_port(
    hv: Hypervisor, remote_ip: str, key: str | int, name: str = STT_PORT_NAME, *options: str
) -> None:
    """The old command: ``ovs-vsctl add-port br-int NAME -- set interface NAME type=stt
    options:remote_ip=R options:key=K`` (plus ``options``, each ``k=v``)."""
    hv.ovs.vsctl(
        "add-port", BRIDGE, name, "--", "set", "interface", name, "type=stt",
        f"options:remote_ip={remote_ip}", f"options:key={key}",
        *(f"options:{o}" for o in options),
    )  # fmt: skip


def row_state(hv: Hypervisor, name: str = STT_PORT_NAME) -> tuple[str, str | None, list[str]]:
    """(``type``, ``status:sttun_state``, ``error``) of the Interface row ``name``."""
    row = interface_row(hv.ovs, name)
    status = row["status"]
    error = row["error"]
    assert isinstance(status, dict)
    errors = [error] if isinstance(error, str) else list(error) if isinstance(error, list) else []
    return str(row["type"]), status.get("sttun_state"), [str(e) for e in errors]


def served(hv: Hypervisor, name: str = STT_PORT_NAME, states: tuple[str, ...] = ("up",)) -> bool:
    """True when sttun serves row ``name``: a system port, ``sttun_state`` in ``states``,
    no error, and ovs-vswitchd has opened the device (an OpenFlow port number)."""
    kind, state, error = row_state(hv, name)
    if kind != "system" or state not in states or error:
        return False
    return ofport(hv, name) not in ("-1", "[]", "")


def row_error(hv: Hypervisor, name: str = STT_PORT_NAME) -> str:
    """The ``error`` column of row ``name`` ("" when empty)."""
    error = row_state(hv, name)[2]
    return str(error[0]) if error else ""


def ofport(hv: Hypervisor, name: str = STT_PORT_NAME) -> str:
    """The OpenFlow port number OVS gave interface ``name``."""
    return hv.ovs.vsctl("get", "interface", name, "ofport", wait=False).strip()
