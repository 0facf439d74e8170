"""Faults on the underlay (issue #7): loss, reordering, duplication, link and MAC changes.

Every test runs two real ``sttun up`` endpoints (``impair.start_pair``) with a short
reassembly timeout, pushes a TCP transfer through the tunnel and checks it arrives
intact (sha256), then that the reassembly memory is back to zero.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from sttun.tools.topology import Host
from tests.e2e.impair import (
    OVERLAY_A,
    OVERLAY_B,
    make_line,
    start_pair,
    start_relay,
    stop_relay,
)
from tests.e2e.sttun_hosts import Endpoint, drops_of, ping, tcp_transfer, wait_until
from tests.netns import link_mac, make_two_hosts, need_root, need_tools

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
TIMEOUT = 2.0
DAEMON = {"reassembly_timeout": TIMEOUT}


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def _memory_back_to_zero(*eps: Endpoint) -> None:
    for ep in eps:
        wait_until(
            lambda ep=ep: (r := ep.show()["reassembly"])["entries"] == 0 and r["bytes"] == 0,
            TIMEOUT + 5,
            what="reassembly memory back to 0",
        )


@pytest.mark.parametrize(("percent", "size_mib"), [(1, 30), (5, 2)], ids=["1pct", "5pct"])
def test_loss(tmp_path: Path, percent: int, size_mib: int) -> None:
    """nftables drops ``percent``% of the underlay packets (both directions, in the
    router between the endpoints); a TCP transfer still completes intact.

    Loss hits whole STT frames: a 64 KB frame of 45 segments survives 5% segment loss
    with probability 0.95**45 = 10%, so the inner TCP gets ~100 KB/s there (measured
    with iperf3); the 5% case therefore moves 2 MiB, the 1% case 30 MiB."""
    need_tools("nft")
    with make_line(routed=True) as line:
        ruleset = (
            "table inet loss {\n chain filt {\n"
            "  type filter hook forward priority 0; policy accept;\n"
            f"  tcp dport 7471 numgen random mod 100 < {percent} counter drop\n"
            " }\n}\n"
        )
        line.r.run(["nft", "-f", "-"], input=ruleset.encode())
        with start_pair(line.a, line.b, line.ip_a, line.ip_b, tmp_path, daemon=DAEMON) as p:
            t0 = time.monotonic()
            # A lost tail is retransmitted after a timeout that doubles each time the
            # retransmission is lost too (a 64 KB one survives 5% loss 1 time in 10):
            # a socket call may wait minutes.
            tcp_transfer(line.a, line.b, OVERLAY_B, size_mib * MiB, io_timeout=240.0)
            elapsed = time.monotonic() - t0
            dropped = line.r.run(["nft", "list", "chain", "inet", "loss", "filt"]).stdout
            sb, sa = p.b.show(), p.a.show()
            print(
                f"loss {percent}%: {size_mib} MiB in {elapsed:.1f}s; nft: "
                f"{[ln.strip() for ln in dropped.splitlines() if 'counter' in ln]}; "
                f"B drops {sb['drops']} reasm {sb['reassembly']}; A drops {sa['drops']}"
            )
            assert "packets 0 " not in dropped, "the loss rule never dropped anything"
            assert sb["drops"].get("reassembly_timeout", 0) + sb["reassembly"]["entries"] > 0
            _memory_back_to_zero(p.a, p.b)


@pytest.mark.parametrize(("window", "dup"), [(8, 0.0), (8, 5.0)], ids=["reorder", "reorder+dup"])
def test_reorder_and_duplicate(tmp_path: Path, window: int, dup: float) -> None:
    """The relay reorders STT segments within ``window`` and duplicates ``dup``% of
    them: the transfer is intact, duplicates are counted, no frame is delivered twice."""
    with make_line(routed=False) as line:
        relay, stats_path = start_relay(line, tmp_path, window=window, dup=dup)
        with start_pair(line.a, line.b, line.ip_a, line.ip_b, tmp_path, daemon=DAEMON) as p:
            ping(line.a, OVERLAY_B, count=3)
            tcp_transfer(line.a, line.b, OVERLAY_B, 20 * MiB)
            ping(line.b, OVERLAY_A, count=3)
            # the relay is the only path: once it has stopped (flushing what it held),
            # nothing more reaches either side; receive counters are read before send
            # counters, so a frame still in flight cannot make rx exceed tx
            stats = stop_relay(relay, stats_path)
            sb_rx = p.b.tunnel("stt0")["rx"]
            sa_rx = p.a.tunnel("stt0")["rx"]
            sa_tx = p.a.tunnel("stt0")["tx"]
            sb_tx = p.b.tunnel("stt0")["tx"]
            db, da = drops_of(p.b), drops_of(p.a)
            print(
                f"relay {stats}; A tx {sa_tx} -> B rx {sb_rx}; B tx {sb_tx} -> A rx {sa_rx}; "
                f"B drops {db}; A drops {da}"
            )
            assert stats["reordered"] > 0
            # A whole frame in one segment has no reassembly state to recognise its
            # copy by (test_reliability_malformed.py::test_duplicate_whole_frame), so
            # those duplicates may be delivered; every other frame at most once.
            ab, ba = stats["dup_whole_left_to_right"], stats["dup_whole_right_to_left"]
            assert sb_rx["frames"] <= sa_tx["frames"] + ab, "B delivered a frame twice"
            assert sa_rx["frames"] <= sb_tx["frames"] + ba, "A delivered a frame twice"
            if dup:
                assert stats["duplicated"] > 0
                dups = sum(
                    d.get("duplicate_segment", 0) + d.get("late_segment", 0) for d in (da, db)
                )
                assert dups > 0
            _memory_back_to_zero(p.a, p.b)


@pytest.mark.parametrize("tso", [True, False], ids=["sendmsg", "tx-ring"])
def test_underlay_link_flap(tmp_path: Path, tso: bool) -> None:
    """The underlay link goes down and up: traffic resumes, same daemon processes.

    Without TSO on A's underlay, A sends GSO frames through its transmit ring
    (``tx_ring = "auto"``), which must recover from the link's absence too."""
    with contextlib.ExitStack() as stack:
        h = stack.enter_context(make_two_hosts())
        if not tso:
            h.a.run(["ethtool", "-K", h.dev_a, "tso", "off"])
        p = stack.enter_context(start_pair(h.a, h.b, h.ip_a, h.ip_b, tmp_path, daemon=DAEMON))
        assert ("sending through a TX ring" in p.a.log_text()) is not tso
        ping(h.a, OVERLAY_B)
        tcp_transfer(h.a, h.b, OVERLAY_B, 5 * MiB)  # GSO frames: through the ring if any
        pids = (p.a.show()["pid"], p.b.show()["pid"])
        h.a.run(["ip", "link", "set", h.dev_a, "down"])
        # the route to B goes with the link: A's daemon marks the tunnel down
        wait_until(lambda: p.a.tunnel("stt0")["state"] == "down", 15, what="A's tunnel down")
        h.a.run(["ip", "link", "set", h.dev_a, "up"])
        wait_until(lambda: _pings(h.a, OVERLAY_B), 15, what="ping after link flap")
        wait_until(lambda: _pings(h.b, OVERLAY_A), 15, what="ping back after link flap")
        tcp_transfer(h.a, h.b, OVERLAY_B, 5 * MiB)
        assert p.a.proc.poll() is None and p.b.proc.poll() is None
        assert (p.a.show()["pid"], p.b.show()["pid"]) == pids


def test_peer_mac_change(tmp_path: Path) -> None:
    """The peer's underlay MAC changes (its neighbour entry is replaced): traffic
    resumes in both directions without restarting either daemon."""
    with make_two_hosts() as h, start_pair(h.a, h.b, h.ip_a, h.ip_b, tmp_path, daemon=DAEMON) as p:
        ping(h.a, OVERLAY_B)
        pids = (p.a.show()["pid"], p.b.show()["pid"])
        old = link_mac(h.b, h.dev_b)
        h.b.run(["ip", "link", "set", h.dev_b, "address", "02:00:5e:10:00:99"])
        assert link_mac(h.b, h.dev_b) != old
        wait_until(lambda: _pings(h.a, OVERLAY_B), 15, what="ping after the MAC change")
        wait_until(lambda: _pings(h.b, OVERLAY_A), 15, what="ping back after the MAC change")
        tcp_transfer(h.a, h.b, OVERLAY_B, 5 * MiB)
        assert p.a.proc.poll() is None and p.b.proc.poll() is None
        assert (p.a.show()["pid"], p.b.show()["pid"]) == pids


def _pings(ns: Host, addr: str) -> bool:
    res = ns.run(["ping", "-c", "1", "-W", "1", addr], check=False)
    return bool(res.returncode == 0)
