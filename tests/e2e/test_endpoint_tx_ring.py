"""``sttun up --tx-ring on`` with the receive fast path over a TSO-off veth (``wire``).

Both daemons send through a PACKET_TX_RING.  Software GSO at the sender cuts each
64 KB STT frame; the receiver's GRO merges the segments back into one skb (they
have no socket owner), so the receiver's fast path takes the data frames that
``sendmsg`` would have delivered in two pieces to Python.  Checks: the log says the
ring is used, ping works without duplicates, a TCP transfer arrives intact (sha256)
and the fast path carries most of its frames; ``tx_ring = off`` logs no ring, and
``auto`` uses it only where the underlay has no TSO.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.sttun_hosts import OVERLAY_B, ping, tcp_transfer, tunnel_pair
from tests.netns import need_fastpath

pytestmark = pytest.mark.netns

RING_LOG = "sending through a TX ring"


@pytest.fixture(autouse=True)
def _supported() -> None:
    need_fastpath()


@pytest.mark.parametrize("underlay", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_wire_with_tx_ring_delivers_whole_frames_to_the_fast_path(
    tmp_path: Path, underlay: int
) -> None:
    extra = ["--fastpath", "on", "--tx-ring", "on"]
    with tunnel_pair(tmp_path, ipv6_underlay=underlay == 6, veth_tso=False, extra=extra) as t:
        for ep in (t.a, t.b):
            assert RING_LOG in ep.log_text(), ep.log_text()
        out = ping(t.hosts.a, OVERLAY_B, count=5)
        assert "DUP!" not in out
        before = t.b.tunnel("stt0")
        tcp_transfer(t.hosts.a, t.hosts.b, OVERLAY_B, 32 * 1024 * 1024)
        after = t.b.tunnel("stt0")
        fast = after["rx_fastpath"]["frames"] - before["rx_fastpath"]["frames"]
        python = after["rx_python"]["frames"] - before["rx_python"]["frames"]
        fast_bytes = after["rx_fastpath"]["bytes"] - before["rx_fastpath"]["bytes"]
        # with sendmsg every multi-segment frame would arrive in two pieces, for Python
        assert fast_bytes > 16 * 1024 * 1024, (fast, python, fast_bytes)
        assert fast > python, (fast, python)
        assert t.a.tunnel("stt0")["drops"].get("tx_error", 0) == 0
        print(f"wire + tx ring: B rx frames fast {fast}, python {python}")


def test_tx_ring_off_sends_with_sendmsg(tmp_path: Path) -> None:
    with tunnel_pair(tmp_path, veth_tso=False, extra=["--tx-ring", "off"]) as t:
        ping(t.hosts.a, OVERLAY_B, count=2)
        for ep in (t.a, t.b):
            assert "AF_PACKET socket open" in ep.log_text()
            assert RING_LOG not in ep.log_text()


@pytest.mark.parametrize("veth_tso", [True, False], ids=["tso", "wire"])
def test_tx_ring_auto_follows_the_underlay_tso(tmp_path: Path, veth_tso: bool) -> None:
    """``auto`` sends through the ring where the underlay has no TSO (the kernel cuts
    GSO frames in software there), with sendmsg where it has."""
    with tunnel_pair(tmp_path, veth_tso=veth_tso, extra=["--tx-ring", "auto"]) as t:
        ping(t.hosts.a, OVERLAY_B, count=2)
        for ep in (t.a, t.b):
            assert (RING_LOG in ep.log_text()) is not veth_tso, ep.log_text()
