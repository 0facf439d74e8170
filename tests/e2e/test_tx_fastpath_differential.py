"""Differential: crafted frames through A's TAP with the transmit program on and off.

Topology (the receive side is :func:`tests.e2e.fastpath_env.fastpath_hosts`)::

    VMa --veth-- [bridge brA | TAP] A --veth underlay-- B [TAP | bridge br] --veth-- VM

A "VM" namespace on A's bridge sends crafted inner frames through an ``AF_PACKET``
socket with a virtio-net header: a ``NEEDS_CSUM`` frame stays ``CHECKSUM_PARTIAL``
(the pseudo-header seed in its checksum field) across the veth and the bridge, a
GSO frame stays GSO, so each skb reaches the TAP's egress (and the program) as the
kernel hands over a guest's or a local stack's frame.  A runs ``sttun up
--tx-fastpath on``, then ``off``; B runs ``--fastpath off`` (Python receives and
finishes partial inner checksums).  On B's VM side the frames must be the same bytes
in both runs (order aside), equal to the frames with their checksums finished, every
checksum good for tshark (but the case sent with a bad one), and the program's pass
counters (``sttun show`` → ``tx_fastpath.passed``) must match the cases exactly.

IPv6 is off on the new links of A and B (``disable_ipv6``): no router or listener
solicitation of theirs crosses the tunnel, so the counters hold the cases only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sttun.io.ebpf.tx_program import TX_MAX_INNER
from sttun.io.packet_socket import PacketSocket
from sttun.tools.topology import add_veth, wait_link_ready
from sttun.tools.wire_check import tshark_checksum_verdict
from sttun.wire.checksum import ones_sum
from sttun.wire.vnet import GsoType, VnetFlag, VnetHdr
from tests.e2e.fastpath_env import (
    CHECKSUM_FIELDS,
    INNER4,
    INNER6,
    INNER_DST_MAC,
    INNER_SRC_MAC,
    FastPathHosts,
    bridge_tap,
    fastpath_hosts,
    l4_sport,
    read_pcap,
    tshark_rows,
)
from tests.e2e.sttun_hosts import Endpoint, start_endpoint, wait_until
from tests.netns import Capture, Netns, ifname, need_fastpath, unique_suffix

pytestmark = pytest.mark.netns

KEY = 42
UNDERLAY_MTU = 1500
JUMBO = 9000
#: Every crafted frame comes from this MAC (the capture filter on B's VM side).
SRC_MAC = ":".join(f"{b:02x}" for b in INNER_SRC_MAC)
VNET_NONE = VnetHdr()
FAST = "fast"


# --------------------------------------------------------------------------- frames
def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _addrs(family: int) -> tuple[bytes, bytes]:
    src, dst = INNER4 if family == 4 else INNER6
    return ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed


def _ipv4(
    proto: int,
    l4_len: int,
    ident: int,
    *,
    options: bytes = b"",
    frag: int = 0x4000,
    tos: int = 0,
    ttl: int = 64,
) -> bytes:
    s, d = _addrs(4)
    ihl = 5 + len(options) // 4
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl, tos, 4 * ihl + l4_len, ident, frag, ttl, proto, 0, s, d
        )
        + options
    )
    struct.pack_into("!H", hdr, 10, ~_fold(ones_sum(hdr)) & 0xFFFF)
    return bytes(hdr)


def _ipv6(proto: int, payload_len: int, *, tos: int = 0, ttl: int = 64) -> bytes:
    s, d = _addrs(6)
    return struct.pack("!IHBB16s16s", 6 << 28 | tos << 20, payload_len, proto, ttl, s, d)


def _l4(family: int, proto: int, sport: int, payload: bytes, *, seeded: bool) -> bytes:
    """A TCP/UDP segment: its checksum final, or the pseudo-header seed (``seeded``)."""
    if proto == 6:
        seg = bytearray(struct.pack("!HHIIBBHHH", sport, 5001, sport, 1, 0x50, 0x18, 512, 0, 0))
        coff = 16
    else:
        seg = bytearray(struct.pack("!HHHH", sport, 5001, 8 + len(payload), 0))
        coff = 6
    seg += payload
    s, d = _addrs(family)
    pseudo = ones_sum(s + d) + proto + len(seg)
    if seeded:
        struct.pack_into("!H", seg, coff, _fold(pseudo))
    else:
        struct.pack_into("!H", seg, coff, (~_fold(ones_sum(seg, pseudo)) & 0xFFFF) or 0xFFFF)
    return bytes(seg)


def _eth(ethertype: int, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return INNER_DST_MAC + INNER_SRC_MAC + tag + struct.pack("!H", ethertype)


def ip_frame(
    family: int,
    proto: int,
    sport: int,
    payload: bytes,
    *,
    seeded: bool = False,
    options: bytes = b"",
    vlan: int | None = None,
    tos: int = 0,
    ttl: int = 64,
) -> bytes:
    """Ethernet + IPv4/IPv6 + TCP/UDP (identified by its source port, also the IPv4 ID)."""
    seg = _l4(family, proto, sport, payload, seeded=seeded)
    if family == 4:
        return (
            _eth(0x0800, vlan)
            + _ipv4(proto, len(seg), sport, options=options, tos=tos, ttl=ttl)
            + seg
        )
    return _eth(0x86DD, vlan) + _ipv6(proto, len(seg), tos=tos, ttl=ttl) + seg


def icmp_echo(family: int, ident: int, payload: bytes) -> bytes:
    """An echo request with a complete checksum (ICMPv6: over the pseudo header)."""
    if family == 4:
        msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload)
        struct.pack_into("!H", msg, 2, ~_fold(ones_sum(msg)) & 0xFFFF)
        return _eth(0x0800) + _ipv4(1, len(msg), ident) + bytes(msg)
    msg = bytearray(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload)
    s, d = _addrs(6)
    c = ~_fold(ones_sum(msg, ones_sum(s + d) + 58 + len(msg))) & 0xFFFF
    struct.pack_into("!H", msg, 2, c)
    return _eth(0x86DD) + _ipv6(58, len(msg)) + bytes(msg)


def arp_request() -> bytes:
    s, d = _addrs(4)
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, INNER_SRC_MAC, s, bytes(6), d)
    return _eth(0x0806) + body + bytes(18)  # padded to 60 bytes, as on a wire


def partial_vnet(family: int, proto: int, options: int = 0) -> VnetHdr:
    """``NEEDS_CSUM`` at the L4 header (a ``CHECKSUM_PARTIAL`` skb)."""
    start = 14 + (20 + options if family == 4 else 40)
    return VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, start, 16 if proto == 6 else 6)


def finished(frame: bytes, vnet: VnetHdr) -> bytes:
    """The frame with a partial checksum finished (as the kernel or Python finishes it)."""
    if not vnet.flags & VnetFlag.NEEDS_CSUM:
        return frame
    out = bytearray(frame)
    field_at = vnet.csum_start + vnet.csum_offset
    c = ~_fold(ones_sum(out[vnet.csum_start :])) & 0xFFFF
    struct.pack_into("!H", out, field_at, c)
    return bytes(out)


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One crafted frame and what the program should do with it."""

    name: str
    frame: bytes
    vnet: VnetHdr
    expect: str  # FAST, or the TxPassReason name (lower case) it is passed with
    #: what B's VM should receive (None: segments of a GSO frame, compared across runs)
    delivered: bytes | None = None
    segments: int = 1
    bad_checksum: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def max_inner(outer: int, mtu: int = UNDERLAY_MTU) -> int:
    """The largest inner frame whose STT frame fits one outer segment."""
    return mtu - (20 if outer == 4 else 40) - 20 - 18


def cases(outer: int) -> list[Case]:
    """Every case for an underlay of family ``outer``: the fast ones first, then
    the ones the program passes to Python (see the module doc)."""
    fam = outer  # the program takes inner frames of the underlay's family only
    l3 = 20 if fam == 4 else 40
    top = max_inner(outer)
    out: list[Case] = []
    port = iter(range(41000, 42000))

    def add(name: str, frame: bytes, vnet: VnetHdr, expect: str, **kw: Any) -> None:
        if "delivered" not in kw:
            kw["delivered"] = finished(frame, vnet)
        out.append(Case(name, frame, vnet, expect, **kw))

    def body(n: int, seed: int) -> bytes:
        return bytes((seed + i) & 0xFF for i in range(n))

    # -- taken by the program ----------------------------------------------------------
    for proto, name, l4h in ((6, "tcp", 20), (17, "udp", 8)):
        smallest = max(60, 14 + l3 + l4h)
        for size in (smallest, smallest + 1, 200, 999, top - 1, top):
            for seeded in (True, False):
                sp = next(port)
                frame = ip_frame(fam, proto, sp, body(size - 14 - l3 - l4h, sp), seeded=seeded)
                assert len(frame) == size
                vnet = partial_vnet(fam, proto) if seeded else VNET_NONE
                kind = "partial" if seeded else "complete"
                add(f"{name}-{kind}-{size}", frame, vnet, FAST)
    sp = next(port)
    frame = ip_frame(fam, 6, sp, body(300, sp))
    add("tcp-complete-data-valid", frame, VnetHdr(flags=VnetFlag.DATA_VALID), FAST)
    sp = next(port)
    icmp = "icmp" if fam == 4 else "icmpv6"
    add(f"{icmp}-echo", icmp_echo(fam, sp, body(56, sp)), VNET_NONE, FAST)
    sp = next(port)
    add(f"{icmp}-echo-odd", icmp_echo(fam, sp, body(1001, sp)), VNET_NONE, FAST)
    # the outer TOS and TTL come from the inner ones (DSCP, ECN, CE; TTL 1 and 255)
    for tos, ttl in ((0xB8, 64), (0x02, 64), (0x03, 64), (0xB9, 1), (0x20, 255)):
        sp = next(port)
        frame = ip_frame(fam, 6, sp, body(80, sp), tos=tos, ttl=ttl)
        add(f"tcp-complete-tos{tos:#x}-ttl{ttl}", frame, VNET_NONE, FAST)
    if fam == 4:
        sp = next(port)
        udp0 = bytearray(ip_frame(4, 17, sp, body(100, sp)))
        struct.pack_into("!H", udp0, 14 + 20 + 6, 0)  # no UDP checksum (IPv4 allows it)
        add("udp-no-checksum", bytes(udp0), VNET_NONE, FAST)
        opts = b"\x94\x04\x00\x00"  # router alert: one 4-byte option
        for proto, name in ((6, "tcp"), (17, "udp")):
            sp = next(port)
            frame = ip_frame(4, proto, sp, body(150, sp), seeded=True, options=opts)
            add(f"{name}-partial-ipv4-options", frame, partial_vnet(4, proto, 4), FAST)
            sp = next(port)
            frame = ip_frame(4, proto, sp, body(150, sp), options=opts)
            add(f"{name}-complete-ipv4-options", frame, VNET_NONE, FAST)
    # -- passed to Python ------------------------------------------------------------
    sp = next(port)
    frame = ip_frame(fam, 6, sp, body(top + 1 - 14 - l3 - 20, sp), seeded=True)
    add("tcp-partial-too-big", frame, partial_vnet(fam, 6), "too_big")
    sp = next(port)
    frame = ip_frame(fam, 17, sp, body(top + 1 - 14 - l3 - 8, sp))
    add("udp-complete-too-big", frame, VNET_NONE, "too_big")
    sp = next(port)
    if fam == 4:  # a first fragment (MF), its UDP header and part of the data
        seg = _l4(4, 17, sp, body(400, sp), seeded=False)[:208]
        frame = _eth(0x0800) + _ipv4(17, len(seg), sp, frag=0x2000) + seg
    else:  # a fragment header before UDP
        seg = _l4(6, 17, sp, body(200, sp), seeded=False)
        frag = struct.pack("!BBHI", 17, 0, 0, sp)  # offset 0, last fragment
        frame = _eth(0x86DD) + _ipv6(44, len(frag) + len(seg)) + frag + seg
    add("fragment", frame, VNET_NONE, "l4")
    sp = next(port)
    short = bytearray(ip_frame(fam, 17, sp, body(100, sp)))
    at = 16 if fam == 4 else 18  # IPv4 total length / IPv6 payload length
    struct.pack_into("!H", short, at, struct.unpack_from("!H", short, at)[0] + 8)
    if fam == 4:  # (the header checksum made right again)
        struct.pack_into("!H", short, 24, 0)
        struct.pack_into("!H", short, 24, ~_fold(ones_sum(short[14:34])) & 0xFFFF)
    add("ip-length-beyond-the-frame", bytes(short), VNET_NONE, "l4")
    if fam == 6:  # a hop-by-hop options header before UDP
        sp = next(port)
        seg = _l4(6, 17, sp, body(100, sp), seeded=False)
        hbh = struct.pack("!BB6s", 17, 0, bytes([1, 4, 0, 0, 0, 0]))  # PadN
        frame = _eth(0x86DD) + _ipv6(0, len(hbh) + len(seg)) + hbh + seg
        add("ipv6-hop-by-hop", frame, VNET_NONE, "l4")
    sp = next(port)
    # Ethernet padding after the IP packet: the program passes it (the lengths
    # disagree); the Python path sends the frame as it is
    add("padded", ip_frame(fam, 17, sp, body(4, sp)) + bytes(12), VNET_NONE, "l4")
    sp = next(port)
    echo = bytearray(icmp_echo(fam, sp, body(57, sp)))
    if fam == 4:  # a partial ICMP checksum: seed 0 (Linux never makes one; Python can)
        struct.pack_into("!H", echo, 14 + 20 + 2, 0)
        add("icmp-partial", bytes(echo), VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, 34, 2), "checksum")
    else:  # UDP over IPv6 must carry a checksum: 0 is not a complete one
        sp = next(port)
        udp0 = bytearray(ip_frame(6, 17, sp, body(100, sp)))
        struct.pack_into("!H", udp0, 14 + 40 + 6, 0)
        add("udp6-zero-checksum", bytes(udp0), VNET_NONE, "checksum", bad_checksum=True)
    sp = next(port)
    bad = bytearray(ip_frame(fam, 17, sp, body(100, sp)))
    bad[-1] ^= 0xFF
    add("udp-bad-checksum", bytes(bad), VNET_NONE, "checksum", bad_checksum=True)
    add("arp", arp_request(), VNET_NONE, "not_ip")
    sp = next(port)
    add("vlan", ip_frame(4, 17, sp, body(100, sp), vlan=0x0064), VNET_NONE, "not_ip")
    sp = next(port)
    other = 10 - fam
    frame = ip_frame(other, 17, sp, body(100, sp), seeded=True)
    # the other IP family than the underlay's: taken too (skb->protocol becomes
    # the outer family's with bpf_skb_change_proto)
    add(f"other-family-ipv{other}", frame, partial_vnet(other, 17), FAST)
    sp = next(port)
    frame = ip_frame(other, 6, sp, body(300, sp), seeded=True)
    add(f"other-family-ipv{other}-tcp", frame, partial_vnet(other, 6), FAST)
    out += gso_cases(outer, UNDERLAY_MTU, port)
    return out


def gso_cases(outer: int, mtu: int, port: Iterator[int]) -> list[Case]:
    """TCP GSO frames, which the program takes where the underlay has TSO (as the
    veth here does): their gso_size grows or shrinks to the outer segment size
    (``mtu`` minus outer IP and TCP), across families too; CWR (ECN), a frame that
    fits one outer segment and an MSS too far below the outer one go to Python."""
    fam, other = outer, 10 - outer
    seg_payload = mtu - (20 if outer == 4 else 40) - 20
    biggest = {4: 1460, 6: 1440}  # the inner MSS whose segments fit B's VM link
    out = []
    for name, f, n, mss, expect, cwr in (
        ("tcp-gso", fam, 3000, 1000, FAST, False),
        ("tcp-gso-biggest-mss", fam, 9000, biggest[fam], FAST, False),
        ("tcp-gso-mss-near-segment", fam, 5000, seg_payload - 8, FAST, False),
        (f"tcp-gso-other-family-ipv{other}", other, 4000, 1200, FAST, False),
        (f"tcp-gso-other-family-ipv{other}-biggest", other, 6000, biggest[other], FAST, False),
        ("tcp-gso-cwr", fam, 3000, 1000, "gso", True),
        ("tcp-gso-one-outer-segment", fam, 1000, 600, "gso", False),
        ("tcp-gso-small-mss", fam, 2000, 300, "too_big", False),
    ):
        if mss > biggest[f]:
            continue
        sp = next(port)
        payload = bytes((sp + i) & 0xFF for i in range(n))
        frame = bytearray(ip_frame(f, 6, sp, payload, seeded=True))
        start = 14 + (20 if f == 4 else 40)
        if cwr:
            frame[start + 13] |= 0x80
        vnet = VnetHdr(
            VnetFlag.NEEDS_CSUM,
            GsoType.TCPV4 if f == 4 else GsoType.TCPV6,
            start + 20,
            mss,
            start,
            16,
        )
        out.append(Case(name, bytes(frame), vnet, expect, None, -(-n // mss), extra={"sport": sp}))
    return out


# --------------------------------------------------------------------------- world
@dataclass
class World:
    """:class:`FastPathHosts` plus A's bridge with a VM namespace on it."""

    h: FastPathHosts
    vma: Netns
    br_a: str
    tap_a: str
    vma_dev: str


@contextlib.contextmanager
def world(mtu: int = UNDERLAY_MTU, routed: bool = False) -> Iterator[World]:
    """The namespaces; ``mtu``: of the underlay and of A's bridge ports; ``routed``:
    a router between A and B whose link to B has no TSO (it cuts GSO packets)."""
    sfx = unique_suffix()
    with fastpath_hosts(routed=routed) as h, Netns("fw") as vma:
        if mtu != UNDERLAY_MTU:
            h.a.ip("link", "set", h.dev_a, "mtu", str(mtu))
            h.b.ip("link", "set", h.dev_b, "mtu", str(mtu))
        # no IPv6 on the links made from here on, no IGMP report for link-local
        # groups: nothing of A's own reaches its TAP (the counters hold the cases)
        for ns in (h.a, h.b):
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
            ns.sysctl("net.ipv4.igmp_link_local_mcast_reports", "0")
        vma.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        # the bridges hand frames over as they came (br_netfilter would trim the
        # Ethernet padding of IP frames and drop those whose IP length is too long)
        for ns in (h.a, h.b):
            for proto in ("iptables", "ip6tables", "arptables"):
                ns.run(["sysctl", "-q", "-w", f"net.bridge.bridge-nf-call-{proto}=0"], check=False)
        w = World(h, vma, ifname("bra", sfx), ifname("ta", sfx), ifname("va", sfx))
        port = ifname("pa", sfx)
        add_veth(vma, w.vma_dev, h.a, port, mtu=max(mtu, UNDERLAY_MTU))
        # no multicast snooping: the bridge joins no group of its own
        h.a.ip("link", "add", w.br_a, "type", "bridge", "mcast_snooping", "0")
        h.a.ip("link", "set", port, "master", w.br_a)
        for ns, dev in ((vma, w.vma_dev), (h.a, port), (h.a, w.br_a)):
            ns.ip("link", "set", dev, "up")
        for ns, dev in ((vma, w.vma_dev), (h.a, port)):
            wait_link_ready(ns, dev, ipv6=False)
        h.a.ethtool(port, gro=False)  # each crafted skb reaches the bridge as sent
        # both next hops known before the daemons start (resolved at once)
        h.a.run(["ping", "-c", "1", "-W", "2", h.ip_b])
        h.a.run(["ping", "-6", "-c", "1", "-W", "2", h.ip6_b])
        yield w


@dataclass
class Run:
    """What one run produced."""

    frames: list[bytes]
    pcap: Path
    show: dict[str, Any]  # A's `sttun show --json`
    outer: list[bytes]  # the packets from A on B's underlay


def _frames_sent(ep: Endpoint) -> int:
    (t,) = ep.show()["tunnels"]
    n: int = t["tx"]["frames"]
    return n


@contextlib.contextmanager
def daemons(
    w: World,
    tmp: Path,
    outer: int,
    tx_fast: str,
    mtu: int = UNDERLAY_MTU,
    extra_a: tuple[str, ...] = (),
) -> Iterator[Endpoint]:
    """B (``--fastpath off``, its TAP on B's bridge) and A (``--tx-fastpath tx_fast``,
    its TAP on A's bridge), A's next hop resolved; yields A.  Both must exit 0."""
    h = w.h
    tmp.mkdir()
    (la, lb) = h.underlay(outer)
    b = start_endpoint(
        h.b,
        ["--local-ip", lb, "--remote-ip", la, "--key", str(KEY), "--dev", h.tap,
         "--mtu", str(mtu), "--fastpath", "off", "--tx-fastpath", "off"],
        [h.tap], tmp,
    )  # fmt: skip
    try:
        bridge_tap(h, h.tap)
        a = start_endpoint(
            h.a,
            ["--local-ip", la, "--remote-ip", lb, "--key", str(KEY), "--dev", w.tap_a,
             "--mtu", str(mtu), "--bridge", w.br_a, "--fastpath", "off",
             "--tx-fastpath", tx_fast, *extra_a],
            [w.tap_a], tmp,
        )  # fmt: skip
        try:
            wait_until(lambda: "resolved" in a.log_text(), what="A's next hop resolved")
            show = a.show()  # (served after the tunnel's entry was written)
            (t,) = show["tunnels"]
            assert t["state"] == "up", t
            if tx_fast == "on":
                assert show["tx_fastpath"]["taps"] == 1, show["tx_fastpath"]
            yield a
        finally:
            assert a.stop() == 0, a.log_text()
    finally:
        assert b.stop() == 0, b.log_text()


def vm_b_capture(w: World, pcap: Path) -> Capture:
    """tcpdump on B's VM side, for the crafted frames only."""
    return Capture(w.h.vm, w.h.vm_dev, pcap, f"ether src {SRC_MAC}", snaplen=9100)


def run_once(
    w: World,
    tmp: Path,
    all_cases: list[Case],
    outer: int,
    tx_fast: str,
    mtu: int = UNDERLAY_MTU,
    extra_a: tuple[str, ...] = (),
) -> Run:
    h = w.h
    with daemons(w, tmp, outer, tx_fast, mtu, extra_a) as a:
        pcap, wire = tmp / "vm_b.pcap", tmp / "underlay_b.pcap"
        src = h.underlay(outer)[0]
        flt = f"src host {src} and tcp port 7471"
        wire_cap = Capture(h.b, h.dev_b, wire, flt)
        with contextlib.ExitStack() as caps:
            if h.router is not None:  # the segments the router sends to B
                caps.enter_context(Capture(h.router, h.router_b, tmp / "router.pcap", flt))
            caps.enter_context(wire_cap)
            cap = caps.enter_context(vm_b_capture(w, pcap))
            send_cases(w, a, all_cases)
            cap.wait_for(sum(c.segments for c in all_cases))
        assert cap.dropped == 0 and wire_cap.dropped == 0
        show = a.show()
    return Run(read_pcap(pcap), pcap, show, read_pcap(wire))


def _sent_at_least(a: Endpoint, n: int) -> Callable[[], bool]:
    return lambda: _frames_sent(a) >= n


def send_cases(w: World, a: Endpoint, all_cases: list[Case]) -> None:
    """Send the cases from VMa: the fast ones together, then each passed one after
    A's Python path sent the one before (a frame while Python still holds an earlier
    one of the tunnel is passed as ``queued``, whatever else it is)."""
    with w.vma.entered():
        sock = PacketSocket(w.vma_dev, None, vnet_hdr=True, ignore_outgoing=True)
    with sock:
        for c in all_cases:
            if c.expect == FAST:
                assert sock.send([c.vnet.pack(), c.frame]), c.name
        for c in all_cases:
            if c.expect != FAST:
                want = _frames_sent(a) + 1
                assert sock.send([c.vnet.pack(), c.frame]), c.name
                wait_until(_sent_at_least(a, want), what=f"A sent {c.name}")


# --------------------------------------------------------------------------- checks
def bad_checksums(pcap: Path, skip: set[int]) -> list[str]:
    """Frames (1-based numbers, ``skip`` excepted) with a checksum tshark calls bad."""
    bad = []
    for row in tshark_rows(pcap, ["frame.number", *CHECKSUM_FIELDS], stt=False):
        n, ip, tst, tfield, tcalc, udp, icmp, icmp6 = (
            v[0] if v else "" for v in row.values()
        )  # each field's first (outermost) value
        if int(n) in skip:
            continue
        verdicts = [
            "bad" if ip == "0" else "good",
            tshark_checksum_verdict(tst, tfield, tcalc) if tst else "good",
            "bad" if "0" in (udp, icmp, icmp6) else "good",
        ]
        if "bad" in verdicts:
            bad.append(" ".join(f"{k}={','.join(v)}" for k, v in row.items()))
    return bad


def outer_packet_of(packets: list[bytes], frame: bytes, outer: int) -> bytes:
    """The one outer packet that carries ``frame`` whole."""
    hdr = 14 + (20 if outer == 4 else 40) + 20 + 18
    (p,) = [p for p in packets if len(p) == hdr + len(frame) and p.endswith(frame)]
    return p


def frame_id(packet: bytes, outer: int) -> int:
    """The STT frame id (the TCP-like header's ACK field)."""
    return int(struct.unpack_from("!I", packet, 14 + (20 if outer == 4 else 40) + 8)[0])


def normalized(packet: bytes, outer: int) -> bytes:
    """The packet with the fields two senders may choose differently zeroed: the
    IPv4 ID and header checksum, the frame id and the TCP checksum."""
    p = bytearray(packet)
    tcp = 14 + (20 if outer == 4 else 40)
    if outer == 4:
        p[18:20] = p[24:26] = b"\0\0"
    p[tcp + 8 : tcp + 12] = bytes(4)
    p[tcp + 16 : tcp + 18] = bytes(2)
    return bytes(p)


def outer_checksum_ok(packet: bytes, outer: int) -> bool:
    """The outer TCP checksum verifies (and, IPv4, the header checksum)."""
    if outer == 4:
        if _fold(ones_sum(packet[14:34])) != 0xFFFF:
            return False
        addrs, tcp = packet[26:34], 34
    else:
        addrs, tcp = packet[22:54], 54
    seg = packet[tcp:]
    return _fold(ones_sum(seg, ones_sum(addrs) + 6 + len(seg))) == 0xFFFF


def _describe(frames: Counter[bytes]) -> list[str]:
    return [f"port {l4_sport(f)} len {len(f)} x{n}: {f[:80].hex()}" for f, n in frames.items()]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_program_and_python_deliver_the_same_frames(tmp_path: Path, outer: int) -> None:
    need_fastpath()
    all_cases = cases(outer)
    with world() as w:
        fast = run_once(w, tmp_path / "on", all_cases, outer, "on")
        python = run_once(w, tmp_path / "off", all_cases, outer, "off")
    compare(all_cases, fast, python, outer)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_gso_frames_over_a_smaller_underlay(tmp_path: Path, outer: int) -> None:
    """Over a 1400-byte underlay the GSO frames' gso_size must shrink (the inner MSS
    is above the outer segment size) as well as grow: the same segments reach B's
    VM, each outer segment fits the underlay."""
    need_fastpath()
    all_cases = gso_cases(outer, 1400, iter(range(43000, 44000)))
    assert any(c.vnet.gso_size > 1400 - 40 - (20 if outer == 4 else 40) for c in all_cases)
    with world(1400) as w:
        fast = run_once(w, tmp_path / "on", all_cases, outer, "on", 1400)
        python = run_once(w, tmp_path / "off", all_cases, outer, "off", 1400)
    compare(all_cases, fast, python, outer)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_gso_frames_cut_by_a_router(tmp_path: Path, outer: int) -> None:
    """A router between A and B cuts the program's GSO packets in software (its link
    to B has no TSO; A's has, so the program takes them): every segment fits the
    link, its outer checksums are good for tshark, B's GRO merges them again, and
    B's VM gets the same segments as from Python."""
    need_fastpath()
    all_cases = gso_cases(outer, UNDERLAY_MTU, iter(range(44000, 45000)))
    with world(routed=True) as w:
        assert w.h.router is not None
        # complete checksums in the segments, so the capture shows the final values
        w.h.router.ethtool(w.h.router_b, tx=False)
        fast = run_once(w, tmp_path / "on", all_cases, outer, "on")
        python = run_once(w, tmp_path / "off", all_cases, outer, "off")
    compare(all_cases, fast, python, outer)
    for run in ("on", "off"):
        cut = read_pcap(tmp_path / run / "router.pcap")
        assert len(cut) > sum(c.segments for c in all_cases if c.expect == FAST) // 2
        assert max(len(p) for p in cut) <= 14 + UNDERLAY_MTU, run
        assert bad_checksums(tmp_path / run / "router.pcap", set()) == [], run


def jumbo_cases(outer: int) -> list[Case]:
    """Inner frames around :data:`TX_MAX_INNER` on a 9000-byte underlay."""
    fam, l3 = outer, 20 if outer == 4 else 40
    out = []
    sp = 46000
    for proto, name, l4h in ((6, "tcp", 20), (17, "udp", 8)):
        for size in (TX_MAX_INNER - 1, TX_MAX_INNER, TX_MAX_INNER + 1):
            for seeded in (True, False):
                sp += 1
                frame = ip_frame(fam, proto, sp, bytes([sp & 0xFF]) * (size - 14 - l3 - l4h),
                                 seeded=seeded)  # fmt: skip
                vnet = partial_vnet(fam, proto) if seeded else VNET_NONE
                expect = FAST if size <= TX_MAX_INNER else "too_big"
                kind = "partial" if seeded else "complete"
                out.append(
                    Case(f"{name}-{kind}-{size}", frame, vnet, expect, finished(frame, vnet))
                )
    return out


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_jumbo_underlay_largest_inner_frame(tmp_path: Path, outer: int) -> None:
    """On a 9000-byte underlay the program takes inner frames up to TX_MAX_INNER
    bytes, and leaves larger ones (which fit one segment) to Python (the inner
    checksum loop reads up to 7 bytes of zero padding past the frame: its bound
    must allow that at TX_MAX_INNER)."""
    need_fastpath()
    all_cases = jumbo_cases(outer)
    with world(JUMBO) as w:
        fast = run_once(w, tmp_path / "on", all_cases, outer, "on", JUMBO)
        python = run_once(w, tmp_path / "off", all_cases, outer, "off", JUMBO)
    compare(all_cases, fast, python, outer)


def compare(all_cases: list[Case], fast: Run, python: Run, outer: int) -> None:
    """The checks of a differential run (see the module doc)."""
    # the same bytes on B's VM side, whichever path sent them
    a, b = Counter(python.frames), Counter(fast.frames)
    only_python, only_fast = a - b, b - a
    assert not only_python and not only_fast, (
        f"only via Python: {_describe(only_python)[:5]}\n"
        f"only via the program: {_describe(only_fast)[:5]}"
    )
    # ... and they are the frames sent, checksums finished (GSO: its segments)
    want = Counter(c.delivered for c in all_cases if c.delivered is not None)
    gso = [c for c in all_cases if c.delivered is None]
    got = Counter(fast.frames)
    missing = want - got
    assert not missing, "\n".join(
        f"{c.name}: not delivered as expected" for c in all_cases if c.delivered in missing
    )
    rest = got - want
    for c in gso:
        segs = [f for f in rest if l4_sport(f) == c.extra["sport"]]
        assert sum(rest[f] for f in segs) == c.segments, (c.name, _describe(rest))
        for f in segs:
            del rest[f]
    assert not rest, f"unexpected frames: {_describe(rest)}"
    # every checksum good but the one sent bad
    for run in (fast, python):
        skip = {
            i + 1
            for i, f in enumerate(run.frames)
            if any(c.bad_checksum and c.delivered == f for c in all_cases)
        }
        assert len(skip) == sum(c.bad_checksum for c in all_cases)
        assert bad_checksums(run.pcap, skip) == []
    # on the underlay: the program's packets are Python's but for the frame id (top
    # bit set) and what depends on it; flags 0 (or C), source port, TOS, TTL, STT
    # header and lengths the same (cases with a final inner checksum: Python sends
    # a partial one as a partial STT frame)
    for c in all_cases:
        if c.expect != FAST or c.vnet.flags & VnetFlag.NEEDS_CSUM:
            continue
        p_fast = outer_packet_of(fast.outer, c.frame, outer)
        p_python = outer_packet_of(python.outer, c.frame, outer)
        assert frame_id(p_fast, outer) >> 31 == 1, c.name
        assert frame_id(p_python, outer) >> 31 == 0, c.name
        assert outer_checksum_ok(p_fast, outer), f"{c.name}: {p_fast[:90].hex()}"
        assert normalized(p_fast, outer) == normalized(p_python, outer), (
            f"{c.name}:\nprogram {p_fast[:90].hex()}\nPython  {p_python[:90].hex()}"
        )
    # a partial inner checksum: the seed stays in the packet (veth: the receiver
    # finishes it), flags 0, and the outer checksum is right for the finished frame
    stt = 14 + (20 if outer == 4 else 40) + 20
    for c in all_cases:
        if c.expect != FAST or not c.vnet.flags & VnetFlag.NEEDS_CSUM or c.vnet.gso_type:
            continue
        assert c.delivered is not None
        p_fast = outer_packet_of(fast.outer, c.frame, outer)
        assert p_fast[stt + 1] == 0, f"{c.name}: STT flags {p_fast[stt + 1]:#x}"
        final = p_fast[: -len(c.frame)] + c.delivered
        assert outer_checksum_ok(final, outer), f"{c.name}: {p_fast[:90].hex()}"
    # a GSO frame: one outer GSO packet (the veth passes it whole) with the P flag,
    # the inner MSS and L4 offset, as Python sends it; IPv4 ID, frame id and the
    # checksum seed aside
    for c in all_cases:
        if c.expect != FAST or not c.vnet.gso_type:
            continue
        p_fast = outer_packet_of(fast.outer, c.frame, outer)
        p_python = outer_packet_of(python.outer, c.frame, outer)
        assert frame_id(p_fast, outer) >> 31 == 1, c.name
        inner_v4 = c.frame[12:14] == b"\x08\x00"
        assert p_fast[stt + 1] == 0x0A | (0x04 if inner_v4 else 0), c.name
        assert p_fast[stt + 2] == c.vnet.csum_start, c.name
        assert struct.unpack_from("!H", p_fast, stt + 4)[0] == c.vnet.gso_size, c.name
        assert normalized(p_fast, outer) == normalized(p_python, outer), (
            f"{c.name}:\nprogram {p_fast[:90].hex()}\nPython  {p_python[:90].hex()}"
        )
    # the program's counters: each case where it belongs
    tx = fast.show["tx_fastpath"]
    assert tx["state"] == "on" and tx["errors"]["packets"] == 0, tx
    passed = {r: c["packets"] for r, c in tx["passed"].items() if c["packets"]}
    expected = Counter(c.expect for c in all_cases if c.expect != FAST)
    assert passed == dict(expected), f"passed {passed}, expected {dict(expected)}"
    (t_fast,) = fast.show["tunnels"]
    (t_python,) = python.show["tunnels"]
    n_fast = sum(1 for c in all_cases if c.expect == FAST)
    assert t_fast["tx_fastpath"]["frames"] == n_fast
    assert t_fast["tx_fastpath"]["bytes"] == sum(
        len(c.frame) for c in all_cases if c.expect == FAST
    )
    assert t_python["tx_fastpath"] == {"frames": 0, "bytes": 0}
    assert python.show["tx_fastpath"]["state"] == "off"
    for t in (t_fast, t_python):
        for k in ("frames", "bytes"):
            assert t["tx"][k] == t["tx_python"][k] + t["tx_fastpath"][k], t
    # the same inner frames and bytes sent, whichever path
    assert t_fast["tx"]["frames"] == t_python["tx"]["frames"] == len(all_cases)
    assert t_fast["tx"]["bytes"] == t_python["tx"]["bytes"]
    print(
        f"IPv{outer} underlay: {len(all_cases)} cases, {n_fast} through the program, "
        f"passed {passed}; {len(fast.frames)} frames on B's VM side"
    )


def _burst(outer: int, first: int) -> list[tuple[int, VnetHdr, bytes]]:
    """100 pairs: a frame too big for one segment (Python), then a small one the
    program could take; (source port, vnet header, frame)."""
    fam, l3 = outer, 20 if outer == 4 else 40
    big_payload = max_inner(outer) + 1 - 14 - l3 - 8
    out = []
    for i in range(100):
        big = ip_frame(fam, 17, first + 2 * i, bytes([i]) * big_payload)
        small = ip_frame(fam, 17, first + 2 * i + 1, bytes([i]) * 100, seeded=True)
        out += [(first + 2 * i, VNET_NONE, big), (first + 2 * i + 1, partial_vnet(fam, 17), small)]
    return out


def _passed(a: Endpoint) -> tuple[dict[str, int], int]:
    """(the program's nonzero pass counters, the frames it sent)."""
    show = a.show()
    (t,) = show["tunnels"]
    passed = show["tx_fastpath"]["passed"]
    return {r: c["packets"] for r, c in passed.items() if c["packets"]}, t["tx_fastpath"]["frames"]


@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_no_frame_overtakes_one_queued_for_python(tmp_path: Path, outer: int) -> None:
    """Bursts alternating frames Python must send with frames the program could take
    reach B's VM in the order sent.  With A's daemon stopped (SIGSTOP) during the
    first burst every frame after the first big one waits for Python (``queued``);
    the second burst runs free; a last frame alone, after Python sent everything,
    goes through the program again."""
    need_fastpath()
    first, second = _burst(outer, 43000), _burst(outer, 45000)
    last = ip_frame(outer, 17, 47000, b"last" * 20, seeded=True)
    with world() as w, daemons(w, tmp_path / "on", outer, "on") as a:
        assert a.proc is not None
        pcap = tmp_path / "vm_b.pcap"
        with w.vma.entered():
            sock = PacketSocket(w.vma_dev, None, vnet_hdr=True, ignore_outgoing=True)
        with sock, vm_b_capture(w, pcap) as cap:

            def send(frames: list[tuple[int, VnetHdr, bytes]]) -> None:
                for _sport, vnet, frame in frames:
                    while not sock.send([vnet.pack(), frame]):
                        select.select([], [sock], [], 1)  # the socket buffer is full

            a.proc.send_signal(signal.SIGSTOP)
            try:
                send(first)
            finally:
                a.proc.send_signal(signal.SIGCONT)
            wait_until(_sent_at_least(a, 200), what="A sent the first burst")
            assert _passed(a) == ({"too_big": 1, "queued": 199}, 0)
            send(second)
            wait_until(_sent_at_least(a, 400), what="A sent the second burst")
            passed, fast = _passed(a)
            assert set(passed) <= {"too_big", "queued"}, passed
            assert fast + sum(passed.values()) == 400, (fast, passed)
            send([(47000, partial_vnet(outer, 17), last)])
            wait_until(_sent_at_least(a, 401), what="A sent the last frame")
            assert _passed(a) == (passed, fast + 1)  # queues resynced: the program's
            cap.wait_for(401)
        assert cap.dropped == 0
    order = [l4_sport(f) for f in read_pcap(pcap)]
    assert order == [sport for sport, _v, _f in first + second] + [47000]
    print(
        f"IPv{outer} underlay: free-running burst: {fast} of 100 small frames through "
        f"the program; passed {passed} (both bursts)"
    )


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("outer", [4, 6], ids=["ipv4-underlay", "ipv6-underlay"])
def test_underlay_mtu_setting_bounds_the_frames_taken(tmp_path: Path, outer: int) -> None:
    """``--underlay-mtu 1400``: the program's limit follows the tunnel's segment size."""
    need_fastpath()
    fam, l3 = outer, 20 if outer == 4 else 40
    top = max_inner(outer, 1400)
    all_cases = []
    for sp, size, expect in (
        (48001, top - 1, FAST),
        (48002, top, FAST),
        (48003, top + 1, "too_big"),
    ):
        frame = ip_frame(fam, 6, sp, bytes([sp & 0xFF]) * (size - 14 - l3 - 20), seeded=True)
        vnet = partial_vnet(fam, 6)
        all_cases.append(Case(f"tcp-partial-{size}", frame, vnet, expect, finished(frame, vnet)))
    extra = ("--underlay-mtu", "1400")
    with world() as w:
        fast = run_once(w, tmp_path / "on", all_cases, outer, "on", extra_a=extra)
        python = run_once(w, tmp_path / "off", all_cases, outer, "off", extra_a=extra)
    (t,) = fast.show["tunnels"]
    assert t["underlay_mtu"] == 1400
    compare(all_cases, fast, python, outer)


def _inner_sports(packets: list[bytes], outer: int) -> list[int]:
    """The inner UDP source port of each STT frame's first segment (outer packets of
    A's underlay; inner IPv4/IPv6 without options)."""
    tcp = 14 + (20 if outer == 4 else 40)
    sport_at = tcp + 20 + 18 + 14 + (20 if outer == 4 else 40)
    out = []
    for p in packets:
        if struct.unpack_from("!I", p, tcp + 4)[0] & 0xFFFF == 0:  # STT offset 0
            out.append(int(struct.unpack_from("!H", p, sport_at)[0]))
    return out


@pytest.mark.parametrize("outer", [4], ids=["ipv4-underlay"])
def test_no_frame_overtakes_in_a_paced_stream(tmp_path: Path, outer: int) -> None:
    """A stream of pairs (a frame too big for one segment, then a small one), paced
    so that the TAP reader keeps emptying the TAP: every small frame must leave A
    after the big one before it, whichever path sends it.  (A reader that forgave
    frames at the empty read itself let 1 to 11 of 3000 pairs be overtaken:
    ``OrderCounter.drained``.)"""
    need_fastpath()
    fam, l3 = outer, 20 if outer == 4 else 40
    big_payload = max_inner(outer) + 1 - 14 - l3 - 8
    n = 4000
    stream: list[tuple[int, bytes, bytes]] = []
    small_vnet = partial_vnet(fam, 17).pack()
    for i in range(n):
        big = ip_frame(fam, 17, 10000 + i, bytes([i & 0xFF]) * big_payload)
        small = ip_frame(fam, 17, 30000 + i, bytes([i & 0xFF]) * 100, seeded=True)
        stream += [(10000 + i, VNET_NONE.pack(), big), (30000 + i, small_vnet, small)]
    with world() as w, daemons(w, tmp_path / "on", outer, "on") as a:
        h = w.h
        pcap, wire = tmp_path / "vm_b.pcap", tmp_path / "underlay_a.pcap"
        src = h.underlay(outer)[0]
        with w.vma.entered():
            sock = PacketSocket(w.vma_dev, None, vnet_hdr=True, ignore_outgoing=True)
        wire_cap = Capture(h.a, h.dev_a, wire, f"src host {src} and tcp port 7471")
        with sock, wire_cap, vm_b_capture(w, pcap) as cap:
            for k, (_sport, vnet, frame) in enumerate(stream):
                while not sock.send([vnet, frame]):
                    select.select([], [sock], [], 1)  # the socket buffer is full
                if k % 2:  # pacing: ~100 us between pairs (not a wait for an event)
                    until = time.perf_counter() + 100e-6
                    while time.perf_counter() < until:
                        pass
            cap.wait_for(len(stream), timeout=60)
        assert cap.dropped == 0 and wire_cap.dropped == 0
        passed, fast = _passed(a)
    sent = [sport for sport, _v, _f in stream]
    left_a = _inner_sports(read_pcap(wire), outer)
    overtaken = [(i, x, y) for i, (x, y) in enumerate(zip(left_a, sent, strict=True)) if x != y]
    print(f"{fast} small frames through the program, passed {passed}; order {overtaken[:6]}")
    assert not overtaken, f"{len(overtaken) // 2} pairs left A out of order: {overtaken[:6]}"
    assert [l4_sport(f) for f in read_pcap(pcap)] == sent
