"""``sttun up`` start, stop and reload: SIGTERM/SIGINT remove what the daemon created,
a persistent TAP survives a restart, SIGHUP adds and removes tunnels without
disturbing a running one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from sttun.tools.topology import Host
from tests.e2e.sttun_hosts import (
    OVERLAY_B,
    TenantSpec,
    config_pair,
    config_path,
    link_exists,
    ping,
    start_endpoint,
    tunnel_pair,
    wait_for,
)
from tests.netns import need_root

pytestmark = pytest.mark.netns

TABLE = "sttun_e2e"
T1 = TenantSpec("ten1", 0x1001, "192.0.2.1/24", "192.0.2.2/24")
T2 = TenantSpec("ten2", 0x2002, "203.0.113.1/24", "203.0.113.2/24")


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def nft_tables(ns: Host) -> str:
    return ns.run(["nft", "list", "tables"]).stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    with tunnel_pair(tmp_path) as t:
        ping(t.hosts.a, OVERLAY_B, count=1)
        ns = t.hosts.a
        assert TABLE in nft_tables(ns)
        assert os.path.exists(t.a.sock)
        assert t.a.stop(sig=sig) == 0, t.a.log_text()
        assert not link_exists(ns, t.dev), "non-persistent TAP left behind"
        assert TABLE not in nft_tables(ns), "nft table left behind"
        assert not os.path.exists(t.a.sock), "control socket left behind"
        assert "Traceback" not in t.a.log_text()
        # the other side is unaffected
        assert t.b.tunnel(t.dev)["state"] == "up"


def test_persistent_tap_survives_restart(tmp_path: Path) -> None:
    with tunnel_pair(tmp_path, extra=["--persist"]) as t:
        ns = t.hosts.a
        ping(ns, OVERLAY_B, count=1)
        assert t.a.stop() == 0
        assert link_exists(ns, t.dev), "--persist TAP removed at exit"
        assert "192.0.2.1/24" in ns.ip("addr", "show", t.dev), "address lost"
        assert TABLE not in nft_tables(ns)
        args = ["--local-ip", t.hosts.ip_a, "--remote-ip", t.hosts.ip_b, "--key", "42"]
        again = start_endpoint(ns, [*args, "--dev", t.dev, "--persist"], [t.dev], tmp_path)
        try:
            ping(ns, OVERLAY_B, count=2)
            assert again.tunnel(t.dev)["tx"]["frames"] > 0
        finally:
            assert again.stop() == 0
        assert link_exists(ns, t.dev)


def _background_ping(ns: Host, addr: str, count: int) -> subprocess.Popen[str]:
    return ns.popen(
        ["ping", "-c", str(count), "-i", "0.1", "-W", "2", addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _loss(proc: subprocess.Popen[str]) -> tuple[int, int, str]:
    out, _ = proc.communicate(timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), out


def test_sighup_adds_and_removes_a_tunnel(tmp_path: Path) -> None:
    with config_pair(tmp_path, [T1]) as p:
        h = p.hosts
        ping(h.a, "192.0.2.2", count=1)
        before = p.a.tunnel("ten1")
        pinger = _background_ping(h.a, "192.0.2.2", 60)  # about 6 s, spans the reloads
        try:
            # add ten2 on both sides
            for side, ep in (("a", p.a), ("b", p.b)):
                config_path(ep).write_text(p.config_for(side, [T1, T2]))
                ep.proc.send_signal(signal.SIGHUP)
            for ns in (h.a, h.b):
                wait_for(lambda ns=ns: link_exists(ns, "ten2"), what="ten2 to appear")
            h.a.run(["ip", "addr", "add", T2.addr_a, "dev", "ten2"])
            h.b.run(["ip", "addr", "add", T2.addr_b, "dev", "ten2"])
            ping(h.a, "203.0.113.2", count=2)
            assert p.b.tunnel("ten2")["in_key"] == T2.key
            # a broken file is refused, the running configuration stays
            config_path(p.a).write_text("[[tunnel]]\nname = 'ten1'\nkey = 'x'\n")
            p.a.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload failed" in p.a.log_text(), what="reload failure logged")
            assert link_exists(h.a, "ten2")
            # remove ten2 again
            for side, ep in (("a", p.a), ("b", p.b)):
                config_path(ep).write_text(p.config_for(side, [T1]))
                ep.proc.send_signal(signal.SIGHUP)
            for ns in (h.a, h.b):
                wait_for(lambda ns=ns: not link_exists(ns, "ten2"), what="ten2 to go")
        finally:
            sent, received, out = _loss(pinger)
        assert sent == 60 and received == 60, f"ping on ten1 disturbed by the reloads:\n{out}"
        after = p.a.tunnel("ten1")
        assert after["tx"]["frames"] >= before["tx"]["frames"] + 60  # counters kept
        assert [t["name"] for t in p.a.show()["tunnels"]] == ["ten1"]
        log = p.a.log_text()
        assert "configuration reloaded: 1 added, 0 removed, 0 changed" in log
        assert "configuration reloaded: 0 added, 1 removed, 0 changed" in log
        assert "reload failed, keeping the running configuration" in log
        assert "Traceback" not in log


def test_sighup_change_keeps_tap_addresses(tmp_path: Path) -> None:
    """Changing a tunnel's keys (both sides) by reload keeps its TAP and addresses:
    traffic flows with the new key without re-adding the overlay address."""
    with config_pair(tmp_path, [T1]) as p:
        h = p.hosts
        ping(h.a, "192.0.2.2", count=1)
        new = TenantSpec(T1.name, 0x1111, T1.addr_a, T1.addr_b)
        for side, ep in (("a", p.a), ("b", p.b)):
            config_path(ep).write_text(p.config_for(side, [new]))
            ep.proc.send_signal(signal.SIGHUP)
        for ep in (p.a, p.b):
            wait_for(
                lambda ep=ep: (
                    "configuration reloaded: 0 added, 0 removed, 1 changed" in ep.log_text()
                ),
                what="the reload",
            )
        assert p.a.tunnel("ten1")["out_key"] == 0x1111
        assert "192.0.2.1/24" in h.a.ip("addr", "show", "ten1"), "reload dropped the address"
        ping(h.a, "192.0.2.2", count=2)
