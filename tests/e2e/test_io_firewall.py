"""sttun.io.firewall: the nftables table stops RSTs and survives re-installation."""

from __future__ import annotations

import json
import select
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sttun.errors import SetupError
from sttun.io.firewall import Firewall
from sttun.io.packet_socket import RECV_SIZE, PacketSocket
from sttun.tools.capture import Capture
from sttun.tools.topology import Host, TwoHosts
from tests.e2e.sttun_hosts import wait_until
from tests.netns import STT_PORT, link_mac, need_tools, tcp_frame

pytestmark = pytest.mark.netns

NSEND = 20


def _blast(h: TwoHosts, v6: bool = False) -> None:
    """Send NSEND STT-like segments (complete checksums, no GSO) from A to B:7471."""
    src, dst = (h.ip6_a, h.ip6_b) if v6 else (h.ip_a, h.ip_b)
    mac_a, mac_b = link_mac(h.a, h.dev_a), link_mac(h.b, h.dev_b)
    with h.a.entered(), PacketSocket(h.dev_a, ports=None, vnet_hdr=False) as tx:
        for i in range(NSEND):
            _, frame = tcp_frame(mac_a, mac_b, src, dst, bytes([i]) * 500, seq=(i << 16), ack=i + 1)
            assert tx.send([frame]) == len(frame)


def tcp_out_rsts(host: Host) -> int:
    """The host's ``Tcp: OutRsts`` counter (IPv4 and IPv6 share it)."""
    lines = [ln.split() for ln in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    tcp = [ln for ln in lines if ln and ln[0] == "Tcp:"]
    return int(tcp[1][tcp[0].index("OutRsts")])


def _rsts(h: TwoHosts, tmp_path: Path, name: str, v6: bool, handled: Callable[[], bool]) -> int:
    """RSTs B sends while NSEND segments arrive; counted once ``handled()`` says B has
    dealt with all of them (its RST counter, or the firewall's drop counter)."""
    pcap = tmp_path / f"{name}.pcap"
    with Capture(h.b, h.dev_b, pcap, "tcp", immediate=True) as cap:
        _blast(h, v6)
        wait_until(handled, 10, what=f"B to handle the {NSEND} segments ({name})")
    return cap.count("tcp[tcpflags] & tcp-rst != 0" if not v6 else "ip6 and ip6[53] & 4 != 0")


@pytest.mark.parametrize("v6", [False, True])
def test_firewall_stops_rsts(two_hosts: TwoHosts, tmp_path: Path, v6: bool) -> None:
    need_tools("nft", "tcpdump")
    h = two_hosts
    local = h.ip6_b if v6 else h.ip_b
    # without the firewall the host stack answers every segment with a RST
    base = tcp_out_rsts(h.b)
    assert _rsts(h, tmp_path, "open", v6, lambda: tcp_out_rsts(h.b) >= base + NSEND) == NSEND
    with h.b.entered():
        fw = Firewall("t")
        fw.install([h.ip_b, h.ip6_b], [STT_PORT])
        fw.install([local], [STT_PORT])  # idempotent: replaced, not duplicated
        rx = PacketSocket(h.dev_b, ports=(STT_PORT,), vnet_hdr=False)

    def dropped() -> bool:
        with h.b.entered():
            return fw.counters()["drop"] >= NSEND

    base = tcp_out_rsts(h.b)
    with rx:
        assert _rsts(h, tmp_path, "closed", v6, dropped) == 0
        assert tcp_out_rsts(h.b) == base
        # AF_PACKET still sees every segment (it receives before netfilter)
        buf = bytearray(RECV_SIZE)
        got = 0
        end = time.monotonic() + 5  # hang guard
        while got < NSEND and time.monotonic() < end:
            select.select([rx], [], [], 0.2)
            while rx.recv_into(buf) > 0:
                got += 1
        assert got == NSEND
    with h.b.entered():
        assert fw.counters() == {"notrack": NSEND, "drop": NSEND}
        listing = json.loads(h.b.run(["nft", "-j", "list", "ruleset"]).stdout)
        tables = [i["table"]["name"] for i in listing["nftables"] if "table" in i]
        assert tables == ["sttun_t"]
        fw.remove()
        assert not fw.is_installed()
        fw.remove()  # idempotent
    base = tcp_out_rsts(h.b)
    assert _rsts(h, tmp_path, "again", v6, lambda: tcp_out_rsts(h.b) >= base + NSEND) == NSEND


def test_firewall_replaces_leftovers(two_hosts: TwoHosts) -> None:
    """A table left by a crashed run (different rules) is replaced, not duplicated."""
    need_tools("nft")
    h = two_hosts
    h.b.run(
        [
            "nft",
            "add table inet sttun_x; add chain inet sttun_x junk; "
            "add rule inet sttun_x junk tcp dport 1 drop",
        ]
    )
    with h.b.entered():
        fw = Firewall("x")
        assert fw.is_installed()
        fw.install([h.ip_b], [STT_PORT])
        text = h.b.run(["nft", "list", "table", "inet", "sttun_x"]).stdout
        assert "junk" not in text and text.count("dport 7471") == 2
        fw.remove()


def test_firewall_errors(two_hosts: TwoHosts, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SetupError, match="instance name"):
        Firewall("bad name")
    fw = Firewall("e")
    with pytest.raises(SetupError, match="not an IP"):
        fw.install(["nope"], [STT_PORT])
    with pytest.raises(SetupError, match="port"):
        fw.install([], [70000])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SetupError, match="not installed"):
        fw.install([], [STT_PORT])


def test_firewall_refused(two_hosts: TwoHosts) -> None:
    """nft refusing the ruleset gives a SetupError quoting nft's message."""
    need_tools("nft")
    fw = Firewall("r")
    # inside a namespace with a huge priority collision? simplest refusal: an
    # address family mismatch is impossible via our API, so break the document.
    doc = fw.document([two_hosts.ip_b], [STT_PORT])
    doc["nftables"].append(
        {"add": {"chain": {"family": "inet", "table": "nonexistent_tbl", "name": "c"}}}
    )
    fw.document = lambda *a, **k: doc  # type: ignore[method-assign]
    with two_hosts.b.entered(), pytest.raises(SetupError, match="failed"):
        fw.install([two_hosts.ip_b], [STT_PORT])
    with two_hosts.b.entered():
        assert not fw.is_installed()  # the whole transaction was refused
