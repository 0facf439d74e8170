"""``port_offload = false``: the tunnel's device is a veth pair whose reader gets
complete, MTU-sized frames (for readers that do not understand offloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sttun.tools.topology import Host
from tests.e2e.sttun_hosts import link_exists, start_endpoint, tcp_transfer
from tests.netns import make_two_hosts, need_root, need_tools

pytestmark = pytest.mark.netns

DEV = "stt0"


def _stats(ns: Host, dev: str) -> tuple[int, int]:
    """(rx_packets, rx_bytes) of ``dev``."""
    base = f"/sys/class/net/{dev}/statistics"
    packets = int(ns.run(["cat", f"{base}/rx_packets"]).stdout)
    return packets, int(ns.run(["cat", f"{base}/rx_bytes"]).stdout)


def test_no_port_offload_hands_over_mtu_sized_frames(tmp_path: Path) -> None:
    need_root()
    need_tools("ethtool")
    with make_two_hosts() as h:
        for sub in ("a", "b"):
            (tmp_path / sub).mkdir()
        a = start_endpoint(
            h.a, ["--local-ip", h.ip_a, "--remote-ip", h.ip_b, "--key", "7", "--dev", DEV,
                  "--no-port-offload"], [DEV], tmp_path / "a",
        )  # fmt: skip
        b = start_endpoint(
            h.b, ["--local-ip", h.ip_b, "--remote-ip", h.ip_a, "--key", "7", "--dev", DEV],
            [DEV], tmp_path / "b",
        )  # fmt: skip
        try:
            kind = h.a.run(["ip", "-d", "-o", "link", "show", DEV]).stdout
            assert " veth " in kind
            h.a.run(["ip", "addr", "add", "192.0.2.1/24", "dev", DEV])
            h.b.run(["ip", "addr", "add", "192.0.2.2/24", "dev", DEV])
            before = _stats(h.a, DEV)
            # b's stack sends 64 KB TSO frames with partial checksums
            tcp_transfer(h.b, h.a, "192.0.2.1", 20 * 1024 * 1024)
            packets, nbytes = (x - y for x, y in zip(_stats(h.a, DEV), before, strict=True))
            assert packets > 0 and nbytes / packets <= 1514  # segmented by the kernel
            tcp_transfer(h.a, h.b, "192.0.2.2", 5 * 1024 * 1024, port=5202)
        finally:
            assert a.stop() == 0 and b.stop() == 0
        assert not link_exists(h.a, DEV)  # not persistent: the pair goes with sttun
