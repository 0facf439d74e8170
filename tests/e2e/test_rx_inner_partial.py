"""A kernel-side sender's frames with the *inner* checksum partial, received by Python.

sttun's tc-egress transmit program sends a small frame as one STT segment whose
inner TCP/UDP checksum field still holds the pseudo-header seed (the skb stays
``CHECKSUM_PARTIAL`` with ``csum_start`` at the inner L4 header) and whose outer TCP
checksum is computed as if that field were final.  Over a veth nobody finishes the
inner sum, so B's underlay socket reads ``NEEDS_CSUM`` with ``csum_start`` inside
the STT frame.  Here A sends exactly such packets from an ``AF_PACKET`` socket with a
vnet header to B, where ``sttun up --fastpath off`` receives them: the inner frames
that reach B's bridge (captured on the VM's side) must carry correct checksums, and
one packet whose partial checksum starts inside the STT header is counted as
``bad_partial_checksum``.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sttun.io.packet_socket import PacketSocket
from sttun.wire.stt import STT_HEADER_LEN, TCP_HEADER_LEN
from sttun.wire.vnet import VnetFlag, VnetHdr
from tests.e2e.fastpath_env import (
    KEY,
    SENTINEL_PORT,
    FastPathHosts,
    daemon_on_b,
    fastpath_encapsulator,
    fastpath_hosts,
    inner_frame,
    l4_sport,
    read_pcap,
    sentinel,
    vm_capture,
)
from tests.netns import need_root, need_tools
from tests.reference import naive_sum

pytestmark = pytest.mark.netns


def crafted(
    h: FastPathHosts, outer: int, inner: int, l4: str, flags: str, sport: int
) -> tuple[list[bytes], bytes]:
    """(vnet header + packet as the transmit program leaves it, the final inner frame)."""
    body = bytes((sport + i) & 0xFF for i in range(300))
    final = inner_frame(inner, l4, body, sport=sport, partial=False)
    seeded = inner_frame(inner, l4, body, sport=sport, partial=True)
    assert final != seeded
    enc = fastpath_encapsulator(h, outer)
    vnet = VnetHdr(flags=VnetFlag.DATA_VALID) if flags == "C" else None
    (parts,) = enc.encap(final, vnet, gso=False)  # one segment, every checksum final
    packet = b"".join(bytes(p) for p in parts)
    assert packet.endswith(final)
    outer_l4 = 14 + (20 if outer == 4 else 40)
    csum_start = outer_l4 + TCP_HEADER_LEN + STT_HEADER_LEN + 14 + (20 if inner == 4 else 40)
    hdr = VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, csum_start, 16 if l4 == "tcp" else 6)
    return [hdr.pack(), packet[: -len(final)], seeded], final


def inner_checksum_ok(frame: bytes) -> bool:
    """The captured inner frame's TCP/UDP checksum verifies (independent sum)."""
    if frame[12:14] == b"\x08\x00":
        ihl = (frame[14] & 0x0F) * 4
        proto, end = frame[23], 14 + struct.unpack_from("!H", frame, 16)[0]
        addrs, l4 = frame[26:34], 14 + ihl
    else:
        proto, end = frame[20], 54 + struct.unpack_from("!H", frame, 18)[0]
        addrs, l4 = frame[22:54], 54
    seg = frame[l4:end]
    return naive_sum(addrs + struct.pack("!HH", proto, len(seg)) + seg) == 0xFFFF


def show(h: FastPathHosts, sock: str) -> dict[str, Any]:
    res = h.b.run([sys.executable, "-m", "sttun", "show", "--json", "--control-socket", sock])
    data: dict[str, Any] = json.loads(res.stdout)
    return data


@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_inner_partial_checksums_are_finished_before_the_tap(tmp_path: Path, outer: int) -> None:
    need_root()
    need_tools("tcpdump")
    with fastpath_hosts() as h:
        local, remote = (h.ip_b, h.ip_a) if outer == 4 else (h.ip6_b, h.ip6_a)
        args = [
            "--local-ip", local, "--remote-ip", remote, "--key", str(KEY), "--dev", h.tap,
            "--mtu", "1500", "--instance", "rxpartial", "--fastpath", "off",
        ]  # fmt: skip
        with daemon_on_b(h, tmp_path, *args) as sock:
            expected: dict[int, bytes] = {}
            packets: list[list[bytes]] = []
            sport = 31000
            for inner in (4, 6):
                for l4 in ("tcp", "udp"):
                    for flags in ("none", "C"):
                        sport += 1
                        pkt, final = crafted(h, outer, inner, l4, flags, sport)
                        packets.append(pkt)
                        expected[sport] = final
            # a partial checksum starting in the STT header: cannot be finished
            bad, _final = crafted(h, outer, 4, "udp", "none", 31999)
            hdr = VnetHdr.unpack(bad[0])
            bad_start = 14 + (20 if outer == 4 else 40) + TCP_HEADER_LEN + 4
            packets.insert(2, [hdr._replace(csum_start=bad_start).pack(), *bad[1:]])
            end = sentinel(h, outer)
            packets.extend(end.packets)

            pcap = tmp_path / "vm.pcap"
            with vm_capture(h, pcap) as cap:
                with h.a.entered():
                    tx = PacketSocket(h.dev_a, None, vnet_hdr=True, ignore_outgoing=True)
                with tx:
                    for p in packets:
                        assert tx.send(p), "the sender's socket buffer is full"
                deadline = time.monotonic() + 30
                while not any(l4_sport(f) == SENTINEL_PORT for f in read_pcap(pcap)):
                    assert time.monotonic() < deadline, "the sentinel frame never arrived"
                    time.sleep(0.05)
            assert cap.dropped == 0
            stats = show(h, sock)

    frames = {l4_sport(f): f for f in read_pcap(pcap)}
    for sp, final in expected.items():
        got = frames.get(sp)
        assert got is not None, f"inner frame from port {sp} not delivered"
        assert inner_checksum_ok(got), f"port {sp}: bad inner checksum: {got.hex()}"
        assert got == final
    assert 31999 not in frames
    (tunnel,) = stats["tunnels"]
    assert tunnel["rx"]["frames"] == len(expected) + 1  # and the sentinel
    assert stats["drops"] == {"bad_partial_checksum": 1}
    assert tunnel["drops"] == {}
