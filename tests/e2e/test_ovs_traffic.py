"""Traffic through Open vSwitch (netdev datapath) and today's ``sttun up``.

Two hypervisors (tests/e2e/ovs_hosts.py), each with its own ovsdb-server and
ovs-vswitchd, a VM namespace on ``br-int`` and a plain ``sttun up`` whose TAP is
joined to ``br-int`` as the system port ``stt0`` through a veth pair with the
kernel doing segmentation and checksums (``attach_tap_via_veth``) - the mechanism
of :class:`sttun.io.veth_port.VethPort`, here without touching the daemon.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sttun.tools.ovs_host import check_support
from tests.e2e.ovs_hosts import (
    BRIDGE,
    VM_A,
    VM_B,
    OvsPair,
    attach_tap_via_veth,
    ovs_pair,
    tcp_checksum_errors,
)
from tests.e2e.sttun_hosts import Endpoint, ping, start_endpoint, tcp_transfer
from tests.netns import need_root, need_tools

pytestmark = pytest.mark.netns

TAP = "sttap0"
PORT = "stt0"
KEY = "42"


@pytest.fixture(autouse=True)
def _ovs() -> None:
    need_root()
    need_tools("ethtool", "tc", "ping")
    reason = check_support()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def endpoints(
    p: OvsPair, tmp: Path, *, ovs_sides: tuple[str, ...], userspace_tso: bool, via_veth: bool = True
) -> Iterator[list[Endpoint]]:
    """``sttun up`` on both hosts; on the hosts named in ``ovs_sides`` its TAP becomes
    OVS port ``stt0``, elsewhere the TAP gets the VM's address (a host without OVS)."""
    eps: list[Endpoint] = []
    try:
        for role, me, peer in (("a", p.a, p.b), ("b", p.b, p.a)):
            args = ["--local-ip", me.underlay_ip, "--remote-ip", peer.underlay_ip,
                    "--key", KEY, "--dev", TAP]  # fmt: skip
            eps.append(start_endpoint(me.ns, args, [TAP], tmp))
            if role not in ovs_sides:
                me.ns.run(["ip", "addr", "add", f"{me.vm_ip}/24", "dev", TAP])
            elif via_veth:
                attach_tap_via_veth(me.ns, TAP, PORT, offload=userspace_tso)
                me.ovs.vsctl("add-port", BRIDGE, PORT)
            else:
                me.ovs.vsctl("add-port", BRIDGE, TAP)
        yield eps
    finally:
        for ep in eps:
            status = ep.stop()
            assert status == 0, f"sttun up exited {status}: {ep.log_text()}"


@pytest.mark.parametrize("userspace_tso", [False, True], ids=["ovs-default", "userspace-tso"])
def test_vm_to_vm_through_ovs_and_sttun(tmp_path: Path, userspace_tso: bool) -> None:
    with (
        ovs_pair(userspace_tso=userspace_tso) as p,
        endpoints(p, tmp_path, ovs_sides=("a", "b"), userspace_tso=userspace_tso),
    ):
        ping(p.a.vm, VM_B)
        tcp_transfer(p.a.vm, p.b.vm, VM_B, 50 * 1024 * 1024)
        tcp_transfer(p.b.vm, p.a.vm, VM_A, 10 * 1024 * 1024, port=5202)
        assert tcp_checksum_errors(p.a.vm) == 0
        assert tcp_checksum_errors(p.b.vm) == 0


def test_interop_with_a_host_without_ovs(tmp_path: Path) -> None:
    """Host b is a plain sttun host whose stack sends 64 KB TSO frames with partial
    checksums; they must reach VM a through OVS (no userspace TSO) as good frames."""
    with ovs_pair() as p, endpoints(p, tmp_path, ovs_sides=("a",), userspace_tso=False):
        ping(p.a.vm, VM_B)
        tcp_transfer(p.b.ns, p.a.vm, VM_A, 50 * 1024 * 1024)
        tcp_transfer(p.a.vm, p.b.ns, VM_B, 10 * 1024 * 1024, port=5202)
        assert tcp_checksum_errors(p.a.vm) == 0


def test_the_tap_as_a_port_fails_tcp_from_an_offloading_peer(tmp_path: Path) -> None:
    """Why the veth is there: the TAP itself as OVS's port (docs/operations.md's old
    recipe) passes ping, but TCP from an offloading peer does not get through."""
    with (
        ovs_pair() as p,
        endpoints(p, tmp_path, ovs_sides=("a",), userspace_tso=False, via_veth=False),
    ):
        ping(p.a.vm, VM_B)
        with pytest.raises(Exception):  # noqa: B017 - whichever way the transfer fails
            tcp_transfer(p.b.ns, p.a.vm, VM_A, 1024 * 1024, io_timeout=5)
