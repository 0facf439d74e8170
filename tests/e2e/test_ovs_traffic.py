"""Traffic through Open vSwitch (netdev datapath) and ``sttun up --ovsdb``.

Two hypervisors (tests/e2e/ovs_hosts.py), each with its own ovsdb-server and
ovs-vswitchd and a VM namespace on ``br-int``; the STT port is declared with the old
command (``ovs-vsctl add-port br-int stt0 -- set interface stt0 type=stt
options:remote_ip=R options:key=K``) and served by ``sttun up --ovsdb`` on the
host - OVS's defaults (no userspace TSO) and userspace TSO both.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.ovs_hosts import (
    BRIDGE,
    STT_PORT_NAME,
    VM_A,
    VM_B,
    Hypervisor,
    OvsPair,
    add_stt_port,
    iperf3,
    ovs_pair,
    served,
    tcp_checksum_errors,
)
from tests.e2e.sttun_hosts import Endpoint, ping, start_endpoint, tcp_transfer, wait_for
from tests.e2e.test_pcap_tools_interop import TsharkCapture
from tests.netns import need_ovs, need_tools

pytestmark = pytest.mark.netns

KEY = 42
TAP = "sttap0"


@pytest.fixture(autouse=True)
def _ovs() -> None:
    need_ovs()
    need_tools("ethtool", "ping", "iperf3", "tshark")


def start_ovs_sttun(hv: Hypervisor, tmp: Path, *extra: str) -> Endpoint:
    """``sttun up --ovsdb <this host's OVSDB>`` in the host's namespace."""
    sub = tmp / hv.ns.name
    sub.mkdir(exist_ok=True)
    return start_endpoint(hv.ns, ["--ovsdb", hv.ovs.db_remote, *extra], [], sub)


@contextlib.contextmanager
def ovs_sttun(
    p: OvsPair, tmp: Path, *, ovs_sides: tuple[str, ...] = ("a", "b"), key: int = KEY
) -> Iterator[list[Endpoint]]:
    """sttun on both hosts: ``--ovsdb`` with the old ``type=stt`` command on the hosts in
    ``ovs_sides``; a plain ``sttun up`` whose TAP has the VM's address elsewhere."""
    eps: list[Endpoint] = []
    try:
        for role, me, peer in (("a", p.a, p.b), ("b", p.b, p.a)):
            if role in ovs_sides:
                add_stt_port(me, peer.underlay_ip, key)
                eps.append(start_ovs_sttun(me, tmp))
            else:
                args = ["--local-ip", me.underlay_ip, "--remote-ip", peer.underlay_ip,
                        "--key", str(key), "--dev", TAP]  # fmt: skip
                sub = tmp / me.ns.name
                sub.mkdir(exist_ok=True)
                eps.append(start_endpoint(me.ns, args, [TAP], sub))
                me.ns.run(["ip", "addr", "add", f"{me.vm_ip}/24", "dev", TAP])
        for role, me in (("a", p.a), ("b", p.b)):
            if role in ovs_sides:
                wait_for(lambda me=me: served(me), timeout=20, what=f"{me.ns.name} stt0 served")
        yield eps
    finally:
        for ep in eps:
            status = ep.stop()
            assert status == 0, f"sttun up exited {status}: {ep.log_text()}"


def stt_context_ids(hv: Hypervisor, dev: str, tmp: Path, traffic: object) -> set[str]:
    """The STT context ids tshark decodes on ``dev`` while ``traffic()`` runs."""
    pcap = tmp / f"{hv.ns.name}-underlay.pcapng"
    cap = TsharkCapture(hv.ns, dev, pcap)
    try:
        assert callable(traffic)
        traffic()
    finally:
        cap.stop()
    res = subprocess.run(
        ["tshark", "-r", str(pcap), "-o", "ip.try_heuristic_first:TRUE", "-Y", "stt",
         "-T", "fields", "-e", "stt.context_id"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return {line for line in res.stdout.split() if line}


@pytest.mark.parametrize("userspace_tso", [False, True], ids=["ovs-default", "userspace-tso"])
def test_vm_to_vm_through_ovs_and_sttun(tmp_path: Path, userspace_tso: bool) -> None:
    with ovs_pair(userspace_tso=userspace_tso) as p, ovs_sttun(p, tmp_path) as (ep_a, _ep_b):
        ids = stt_context_ids(p.a, p.hosts.dev_a, tmp_path, lambda: ping(p.a.vm, VM_B))
        assert ids == {f"0x{KEY:016x}"}
        tcp_transfer(p.a.vm, p.b.vm, VM_B, 50 * 1024 * 1024)
        tcp_transfer(p.b.vm, p.a.vm, VM_A, 10 * 1024 * 1024, port=5202)
        assert iperf3(p.a.vm, p.b.vm, VM_B, seconds=3) > 0
        assert iperf3(p.b.vm, p.a.vm, VM_A, seconds=3) > 0
        assert tcp_checksum_errors(p.a.vm) == 0
        assert tcp_checksum_errors(p.b.vm) == 0
        show = ep_a.show()
        (t,) = show["tunnels"]
        assert (t["name"], t["ovs_interface"], t["local_ip"]) == (
            STT_PORT_NAME,
            STT_PORT_NAME,
            p.a.underlay_ip,
        )
        assert show["ovsdb"]["userspace_tso"] is userspace_tso
        assert t["rx"]["frames"] > 0 and t["tx"]["frames"] > 0


def test_interop_with_a_host_without_ovs(tmp_path: Path) -> None:
    """Host b is a plain sttun host whose stack sends 64 KB TSO frames with partial
    checksums; they must reach VM a through OVS (no userspace TSO) as good frames."""
    with ovs_pair() as p, ovs_sttun(p, tmp_path, ovs_sides=("a",)):
        ping(p.a.vm, VM_B)
        tcp_transfer(p.b.ns, p.a.vm, VM_A, 50 * 1024 * 1024)
        tcp_transfer(p.a.vm, p.b.ns, VM_B, 10 * 1024 * 1024, port=5202)
        assert tcp_checksum_errors(p.a.vm) == 0


def test_the_tap_as_a_port_fails_tcp_from_an_offloading_peer(tmp_path: Path) -> None:
    """Why sttun serves OVS through a veth pair: a plain sttun TAP made an OVS port
    (docs/operations.md's old recipe) passes ping, but TCP from an offloading peer
    does not get through (partial checksums, 64 KB frames)."""
    with ovs_pair() as p:
        eps = []
        try:
            for me, peer in ((p.a, p.b), (p.b, p.a)):
                args = ["--local-ip", me.underlay_ip, "--remote-ip", peer.underlay_ip,
                        "--key", str(KEY), "--dev", TAP]  # fmt: skip
                sub = tmp_path / me.ns.name
                sub.mkdir()
                eps.append(start_endpoint(me.ns, args, [TAP], sub))
            p.a.ovs.vsctl("add-port", BRIDGE, TAP)
            p.b.ns.run(["ip", "addr", "add", f"{VM_B}/24", "dev", TAP])
            ping(p.a.vm, VM_B)
            with pytest.raises(Exception):  # noqa: B017 - whichever way the transfer fails
                tcp_transfer(p.b.ns, p.a.vm, VM_A, 1024 * 1024, io_timeout=5)
        finally:
            for ep in eps:
                ep.stop()
