#!/usr/bin/env python3
"""What one 64 KB GSO ``sendmsg`` costs: the daemon's send path into a veth, as root.

Two namespaces on a veth (``sttun.tools.topology.TwoHosts``), TSO off on the sending
end so that the kernel segments in software, and an ``AF_PACKET`` socket with vnet
headers (``sttun.io.packet_socket.PacketSocket``) sending the same 64 KB TCP
super-packet (45 segments of 1448 bytes) again and again.  Prints the median and
90th percentile of the time one ``send`` takes and writes
``bench/results/gso_send.json``.  Never pass/fail: the segments' correctness is
checked by ``tests/e2e/test_io_packet_socket.py``.

    python bench/gso_send.py            # 2000 sends
    python bench/gso_send.py --quick    # 200 sends
"""

from __future__ import annotations

import argparse
import ipaddress
import select
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, percentile, write_results

from sttun.io.packet_socket import PacketSocket
from sttun.tools.topology import TwoHosts, check_support

MSS = 1448
NSEG = 45
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1
RESULTS = RESULTS_DIR / "gso_send.json"


def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return _fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def super_packet(src_mac: str, dst_mac: str, src: str, dst: str) -> list[bytes]:
    """``[vnet header, headers, payload]`` of a TCPV4 GSO super-packet of 45 MSS."""
    payload = bytes(i & 0xFF for i in range(MSS * NSEG))
    tcp_len = 20 + len(payload)
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, s, d))
    struct.pack_into("!H", ip, 10, ~_sum16(bytes(ip)) & 0xFFFF)
    pseudo = _sum16(s + d + struct.pack("!BBH", 0, 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 50000, 7471, 1000, 1, 5 << 4, 0x18, 65535, pseudo, 0)
    eth = bytes.fromhex(dst_mac.replace(":", "") + src_mac.replace(":", "")) + b"\x08\x00"
    l4 = len(eth) + len(ip)
    vnet = struct.pack(
        "<BBHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, l4 + 20, MSS, l4, 16
    )
    return [vnet, eth + bytes(ip) + tcp, payload]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 sends instead of 2000")
    args = p.parse_args(argv)
    problem = check_support()
    if problem:
        print(f"gso_send: {problem}", file=sys.stderr)
        return 2
    sends = 200 if args.quick else 2000
    costs: list[float] = []
    backpressure = 0
    with TwoHosts(prefix="sttun-gsob") as h:
        h.a.ethtool(h.dev_a, tso=False)
        parts = super_packet(h.a.link_mac(h.dev_a), h.b.link_mac(h.dev_b), h.ip_a, h.ip_b)
        clock = time.perf_counter
        with h.a.entered(), PacketSocket(h.dev_a, ports=None) as tx:
            while len(costs) < sends:
                t0 = clock()
                ok = tx.send(parts)
                t1 = clock()
                if ok:
                    costs.append(t1 - t0)
                else:
                    backpressure += 1
                    select.select([], [tx], [], 0.1)
    median_us = (percentile(costs, 50) or 0.0) * 1e6
    p90_us = (percentile(costs, 90) or 0.0) * 1e6
    print(
        f"64 KB GSO sendmsg (software GSO into {NSEG} segments, veth): median "
        f"{median_us:.1f} us, p90 {p90_us:.1f} us over {len(costs)} sends "
        f"({backpressure} times the socket was full)"
    )
    write_results(
        RESULTS,
        "gso_send",
        {"sends": len(costs), "median_us": median_us, "p90_us": p90_us, "full": backpressure},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
