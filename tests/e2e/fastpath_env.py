"""Test world and crafted frames for the receive fast path (sttun.io.rx_fastpath).

Topology (:func:`fastpath_hosts`)::

    A (sender) --veth-- B (receiver: underlay dev_b, TAP in bridge br) --veth-- VM

Frames sent from A through an AF_PACKET socket with virtio-net headers (GSO
super-packets stay GSO across the veth, as with a TSO sender) reach B's underlay
with GRO off, so every crafted skb arrives as sent.  Frames the TAP receives are
bridged to the VM namespace through a veth with checksum and segmentation offloads
off, so what the VM side captures is what a wire would carry: complete checksums,
MTU-sized segments.

:func:`cases` builds the crafted frames: every flag combination (none, C, P, P
with an MSS), TCP and UDP, IPv4/IPv6 inner and outer, several MSS values, sizes
around the MTU, and frames the program must leave to Python (VLAN, CE, a DSCP the
uniform model would copy, an unknown context id, pieces, a wrong outer checksum,
GSO across IP families); CHECKSUM_NONE frames (no offloads, the program verifies
the outer checksum).  :func:`inner_partial_cases`: frames whose inner checksum is
still partial, as an encapsulator at tc egress sends them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sttun.core.encap import Encapsulator
from sttun.io.packet_socket import PacketSocket
from sttun.wire.checksum import ones_sum
from sttun.wire.vnet import GsoType, VnetFlag, VnetHdr
from tests.netns import Capture, Netns, ifname, link_mac, unique_suffix, veth_pair

KEY = 42
SENTINEL_PORT = 19999
#: MTU of the veth from B's bridge to the VM (the TAP side stays 1500).
VM_MTU = 9000
OTHER_KEY = 43
INNER4 = ("192.0.2.1", "192.0.2.2")
INNER6 = ("2001:db8:1::1", "2001:db8:1::2")
INNER_SRC_MAC = bytes.fromhex("020000000001")
INNER_DST_MAC = bytes.fromhex("020000000002")
VNET_NONE = bytes(10)
#: Frame ids (ACK) for crafted frames: unique, since the Python path drops a second
#: whole frame with the same (source, destination, id) as a late duplicate.
_frame_ids = itertools.count(1)


@dataclass
class FastPathHosts:
    """A, B and VM; B's TAP ``tap`` is in bridge ``br`` with ``br_port`` -> ``vm_dev``.

    ``router``: with :func:`fastpath_hosts(routed=True)`, the namespace forwarding
    between A and B (its link to B segments in software, B's GRO merges the
    segments again, as a NIC's receive path would); ``nexthop_mac``: where A sends.
    """

    a: Netns
    b: Netns
    vm: Netns
    dev_a: str
    dev_b: str
    tap: str
    br: str
    br_port: str
    vm_dev: str
    nexthop_mac: bytes = b""
    router: Netns | None = None
    router_b: str = ""  # the router's link to B
    ip_a: str = "198.18.0.1"
    ip_b: str = "198.18.0.2"
    ip6_a: str = "2001:db8:0:1::1"
    ip6_b: str = "2001:db8:0:1::2"

    def underlay(self, outer: int) -> tuple[str, str]:
        """(A's address, B's address) of IP family ``outer``."""
        return (self.ip_a, self.ip_b) if outer == 4 else (self.ip6_a, self.ip6_b)


def _mac(ns: Netns, dev: str) -> bytes:
    return bytes.fromhex(link_mac(ns, dev).replace(":", ""))


@contextlib.contextmanager
def fastpath_hosts(routed: bool = False) -> Iterator[FastPathHosts]:
    """Namespaces A, B, VM (and a router between A and B if ``routed``); B has a
    bridge with a veth to VM; the TAP is added later (:func:`bridge_tap`).
    Everything is deleted at the end."""
    sfx = unique_suffix()
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(Netns("fa"))
        b = stack.enter_context(Netns("fb"))
        vm = stack.enter_context(Netns("fv"))
        h = FastPathHosts(
            a,
            b,
            vm,
            ifname("ua", sfx),
            ifname("ub", sfx),
            ifname("tp", sfx),
            ifname("br", sfx),
            ifname("bp", sfx),
            ifname("vm", sfx),
        )
        if not routed:
            veth_pair(
                a,
                b,
                h.dev_a,
                h.dev_b,
                [f"{h.ip_a}/24", f"{h.ip6_a}/64"],
                [f"{h.ip_b}/24", f"{h.ip6_b}/64"],
            )
            b.ethtool(h.dev_b, gro=False)  # each crafted skb arrives as sent
            h.nexthop_mac = _mac(b, h.dev_b)
        else:
            r = h.router = stack.enter_context(Netns("fr"))
            ra, rb = ifname("ra", sfx), ifname("rb", sfx)
            h.router_b = rb
            h.ip_b, h.ip6_b = "198.18.1.2", "2001:db8:0:1:1::2"
            veth_pair(
                a,
                r,
                h.dev_a,
                ra,
                [f"{h.ip_a}/24", f"{h.ip6_a}/80"],
                ["198.18.0.254/24", "2001:db8:0:1::fe/80"],
            )
            veth_pair(
                r,
                b,
                rb,
                h.dev_b,
                ["198.18.1.254/24", "2001:db8:0:1:1::fe/80"],
                [f"{h.ip_b}/24", f"{h.ip6_b}/80"],
            )
            r.sysctl("net.ipv4.ip_forward", "1")
            r.sysctl("net.ipv6.conf.all.forwarding", "1")
            a.ip("route", "add", "198.18.1.0/24", "via", "198.18.0.254")
            a.ip("-6", "route", "add", "2001:db8:0:1:1::/80", "via", "2001:db8:0:1::fe")
            b.ip("route", "add", "198.18.0.0/24", "via", "198.18.1.254")
            b.ip("-6", "route", "add", "2001:db8:0:1::/80", "via", "2001:db8:0:1:1::fe")
            r.ethtool(rb, tso=False, gso=True)  # segments on the wire to B
            b.ethtool(h.dev_b, gro=True)  # merged again by B's GRO
            for dst in (h.ip_b, h.ip6_b):  # resolve B's address on the router
                r.run(["ping", "-c", "1", "-W", "2", dst])
            h.nexthop_mac = _mac(r, ra)
        # jumbo towards the VM: inner MSS values above the underlay's reach it whole
        veth_pair(b, vm, h.br_port, h.vm_dev, mtu=VM_MTU)
        # complete checksums and segment in software on the way to the VM
        b.ethtool(h.br_port, tx=False, tso=False, gso=True)
        b.ip("link", "add", h.br, "type", "bridge")
        b.ip("link", "set", h.br_port, "master", h.br)
        b.ip("link", "set", h.br, "up")
        yield h


def bridge_tap(h: FastPathHosts, tap: str) -> None:
    """Put ``tap`` (in B) into B's bridge and bring it up."""
    h.b.ip("link", "set", tap, "master", h.br)
    h.b.ip("link", "set", tap, "up")


# --------------------------------------------------------------------------- inner frames
def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inner_frame(
    family: int,
    l4: str,
    payload: bytes,
    *,
    sport: int,
    dport: int = 5001,
    partial: bool,
    tos: int = 0,
    ident: int = 1,
    vlan: int | None = None,
    ip_options: bytes = b"",
) -> bytes:
    """Ethernet + IPv4/IPv6 + TCP/UDP/ICMP echo request (``sport``: its identifier).
    ``partial``: the TCP/UDP checksum field holds the pseudo-header sum (Linux
    CHECKSUM_PARTIAL), else the complete checksum.  ``ip_options``: IPv4 options
    (a multiple of 4 bytes)."""
    src, dst = INNER4 if family == 4 else INNER6
    s = ipaddress.ip_address(src).packed
    d = ipaddress.ip_address(dst).packed
    proto = {"tcp": 6, "udp": 17, "icmp": 1 if family == 4 else 58}[l4]
    if l4 == "tcp":
        hdr = bytearray(
            struct.pack("!HHIIBBHHH", sport, dport, 1000 * sport, 1, 0x50, 0x18, 65535, 0, 0)
        )
        coff = 16
    elif l4 == "udp":
        hdr = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0))
        coff = 6
    else:
        hdr = bytearray(struct.pack("!BBHHH", 8 if family == 4 else 128, 0, 0, sport, 1))
        coff = 2
    seg = hdr + payload
    pseudo = ones_sum(s + d) + proto + len(seg)
    if l4 == "icmp":
        c = ~_fold(ones_sum(seg, 0 if family == 4 else pseudo)) & 0xFFFF
        struct.pack_into("!H", seg, coff, c)
    elif partial:
        struct.pack_into("!H", seg, coff, _fold(pseudo))
    else:
        c = ~_fold(ones_sum(seg, pseudo)) & 0xFFFF
        struct.pack_into("!H", seg, coff, c or 0xFFFF)
    if family == 4:
        ihl = 5 + len(ip_options) // 4
        ip = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s",
                0x40 | ihl,
                tos,
                4 * ihl + len(seg),
                ident,
                0x4000,
                64,
                proto,
                0,
                s,
                d,
            )
            + ip_options
        )
        struct.pack_into("!H", ip, 10, ~_fold(ones_sum(ip)) & 0xFFFF)
        et = 0x0800
    else:
        first = (6 << 28) | (tos << 20)
        ip = bytearray(struct.pack("!IHBB16s16s", first, len(seg), proto, 64, s, d))
        et = 0x86DD
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return INNER_DST_MAC + INNER_SRC_MAC + tag + struct.pack("!H", et) + bytes(ip) + bytes(seg)


def l4_header_len(l4: str) -> int:
    """Bytes of the TCP/UDP/ICMP echo header :func:`inner_frame` writes."""
    return 20 if l4 == "tcp" else 8


def inner_vnet(family: int, l4: str, flags: str, mss: int = 0) -> VnetHdr | None:
    """The overlay stack's virtio-net header for a frame: ``flags`` none, C, P, GSO."""
    if flags == "none":
        return None
    if flags == "C":
        return VnetHdr(flags=VnetFlag.DATA_VALID)
    start = 14 + (20 if family == 4 else 40)
    coff = 16 if l4 == "tcp" else 6
    if flags == "P":
        return VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, start, coff)
    gso = GsoType.TCPV4 if family == 4 else GsoType.TCPV6
    return VnetHdr(VnetFlag.NEEDS_CSUM, gso, start + 20, mss, start, coff)


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """Crafted packets for one situation and what the program should do with them."""

    name: str
    outer: int
    packets: list[list[bytes]]  # each: vnet header, then the frame's parts
    expect: str  # "fast" or a PassReason name in lower case
    sport: int = 0  # inner L4 source port (identifies its frames on the far side)
    inner_family: int = 4
    l4: str = "udp"
    payload: int = 0  # inner L4 payload bytes
    mss: int = 0  # inner segments expected on the far side: ceil(payload / mss)
    frames: int = 1  # frames the VM should see (fast cases)
    extra: dict[str, object] = field(default_factory=dict)


def _encap(
    h: FastPathHosts, outer: int, mac_b: bytes, mac_a: bytes, key: int = KEY, tos: int | None = None
) -> Encapsulator:
    a, b = h.underlay(outer)
    l2 = mac_b + mac_a + struct.pack("!H", 0x0800 if outer == 4 else 0x86DD)
    return Encapsulator(
        ipaddress.ip_address(a).packed,
        ipaddress.ip_address(b).packed,
        key,
        tos=tos,
        l2=l2,
        first_frame_id=next(_frame_ids) * 1000,
        fixed_sport=0xC000,
    )


def fastpath_encapsulator(h: FastPathHosts, outer: int) -> Encapsulator:
    """An encapsulator for crafted frames from A to B over the ``outer`` underlay."""
    return _encap(h, outer, h.nexthop_mac, _mac(h.a, h.dev_a))


def _as_bytes(packet: list[object]) -> list[bytes]:
    return [bytes(p) for p in packet]  # type: ignore[call-overload]


def cases(h: FastPathHosts) -> list[Case]:
    """Every crafted case, fallbacks first (see the module doc)."""
    mac_a = _mac(h.a, h.dev_a)
    mac_b = h.nexthop_mac
    out: list[Case] = []
    port = iter(range(20000, 30000))

    def add(
        name: str, outer: int, frame: bytes, vnet: VnetHdr | None, expect: str, **kw: object
    ) -> Case:
        enc = _encap(h, outer, mac_b, mac_a, int(kw.pop("key", KEY)), kw.pop("tos", None))  # type: ignore[arg-type]
        gso = bool(kw.pop("gso", True))
        packets = [_as_bytes(p) for p in enc.encap(frame, vnet, gso=gso)]
        if not gso:
            packets = [[VNET_NONE, *p] for p in packets]
        c = Case(name, outer, packets, expect, **kw)  # type: ignore[arg-type]
        out.append(c)
        return c

    # -- what the program must leave to Python -----------------------------------------
    for outer in (4, 6):
        sp = next(port)
        add(
            f"o{outer}-vlan",
            outer,
            inner_frame(4, "udp", b"v" * 100, sport=sp, partial=False, vlan=0x0123),
            None,
            "vlan",
            sport=sp,
        )
        sp = next(port)
        add(
            f"o{outer}-unknown-key",
            outer,
            inner_frame(4, "udp", b"k" * 100, sport=sp, partial=False),
            None,
            "unknown_tunnel",
            sport=sp,
            key=OTHER_KEY,
        )
        sp = next(port)
        add(
            f"o{outer}-dscp",
            outer,
            inner_frame(4, "udp", b"d" * 100, sport=sp, partial=False),
            None,
            "marking",
            sport=sp,
            tos=10,
        )
        sp = next(port)
        c = add(
            f"o{outer}-ce",
            outer,
            inner_frame(4, "udp", b"c" * 100, sport=sp, partial=False, tos=1),
            None,
            "marking",
            sport=sp,
        )
        c.packets = [_with_outer_ce(p, outer) for p in c.packets]
        sp = next(port)
        c = add(
            f"o{outer}-pieces",
            outer,
            inner_frame(4, "udp", b"p" * 3000, sport=sp, partial=False),
            None,
            "piece",
            sport=sp,
            gso=False,
        )
        c.extra["count"] = len(c.packets)
        # CHECKSUM_NONE (no offloads) with a wrong outer checksum: Python drops it
        for l4 in ("tcp", "udp", "icmp"):
            sp = next(port)
            c = add(
                f"o{outer}-{l4}-none-bad-checksum",
                outer,
                inner_frame(4, l4, b"n" * 100, sport=sp, partial=False),
                None,
                "checksum",
                sport=sp,
                gso=False,
            )
            c.packets = [_with_bad_outer_checksum(p, outer) for p in c.packets]
        ifam = 6 if outer == 4 else 4
        sp = next(port)
        add(
            f"o{outer}-gso-i{ifam}",
            outer,
            inner_frame(ifam, "tcp", b"g" * 6000, sport=sp, partial=True),
            inner_vnet(ifam, "tcp", "GSO", 1000),
            "fast",
            sport=sp,
            inner_family=ifam,
            l4="tcp",
            payload=6000,
            mss=1000,
            frames=6,
        )
    # -- what the program delivers -------------------------------------------------------
    for outer in (4, 6):
        for ifam in (4, 6):
            l3 = 20 if ifam == 4 else 40
            for l4 in ("tcp", "udp"):
                l4h = 20 if l4 == "tcp" else 8
                full = 1500 - l3 - l4h  # inner frame of 1514 bytes
                # the STT frame filling one outer segment exactly (1460 / 1440 bytes)
                one = 1500 - (20 if outer == 4 else 40) - 20 - 18 - 14 - l3 - l4h
                for flags in ("none", "C", "P"):
                    for size in (100, one, one + 1, full):
                        sp = next(port)
                        body = bytes((sp + i) & 0xFF for i in range(size))
                        frame = inner_frame(ifam, l4, body, sport=sp, partial=flags == "P")
                        add(
                            f"o{outer}-i{ifam}-{l4}-{flags}-{size}",
                            outer,
                            frame,
                            inner_vnet(ifam, l4, flags),
                            "fast",
                            sport=sp,
                            inner_family=ifam,
                            l4=l4,
                            payload=size,
                        )
            # outer gso_size is 1460 (IPv4) / 1440 (IPv6): MSS below it, equal, a bit
            # above, and more above than the strip (each way of setting gso_size)
            for mss in (1448 if ifam == 4 else 1428, 1000, 536, 1460, 1600):
                for size in (mss + 1, 3 * mss, 20000):
                    sp = next(port)
                    body = bytes((sp * 7 + i) & 0xFF for i in range(size))
                    frame = inner_frame(ifam, "tcp", body, sport=sp, partial=True)
                    c = add(
                        f"o{outer}-i{ifam}-tcp-gso{mss}-{size}",
                        outer,
                        frame,
                        inner_vnet(ifam, "tcp", "GSO", mss),
                        "fast",
                        sport=sp,
                        inner_family=ifam,
                        l4="tcp",
                        payload=size,
                        mss=mss,
                        frames=-(-size // mss),
                    )
                    if c.packets[0][0][1] == 0:
                        # one outer segment: the program cannot make a GSO skb of it
                        c.expect = "offload"
            # CHECKSUM_NONE (sent without offloads, every checksum complete): the
            # program verifies the outer checksum itself
            for l4 in ("tcp", "udp", "icmp"):
                one = 1500 - (20 if outer == 4 else 40) - 20 - 18 - 14 - l3 - l4_header_len(l4)
                for flags, size in (("none", 0), ("none", 100), ("C", 100), ("none", one)):
                    sp = next(port)
                    body = bytes((sp * 3 + i) & 0xFF for i in range(size))
                    frame = inner_frame(ifam, l4, body, sport=sp, partial=False)
                    # adjust_room keeps at least 40 bytes after an IPv6 header
                    short = outer == 6 and len(frame) < 14 + 40
                    add(
                        f"o{outer}-i{ifam}-{l4}-csum-none-{flags}-{size}",
                        outer,
                        frame,
                        inner_vnet(ifam, l4, flags),
                        "offload" if short else "fast",
                        sport=sp,
                        inner_family=ifam,
                        l4=l4,
                        payload=size,
                        gso=False,
                    )
            # P with an MSS but payload within one MSS: not GSO (virtio_net_hdr_to_skb)
            sp = next(port)
            body = bytes(range(200))
            frame = inner_frame(ifam, "tcp", body, sport=sp, partial=True)
            add(
                f"o{outer}-i{ifam}-tcp-mss-small",
                outer,
                frame,
                inner_vnet(ifam, "tcp", "GSO", 1000),
                "fast",
                sport=sp,
                inner_family=ifam,
                l4="tcp",
                payload=200,
            )
    return out


def inner_partial_cases(h: FastPathHosts) -> list[Case]:
    """Whole frames as an encapsulator at the overlay's tc egress leaves them when
    the inner packet's checksum is still partial: STT flags 0, the inner TCP/UDP
    checksum field holding the pseudo-header sum, the outer checksum computed as
    if that field held its final value, and the skb CHECKSUM_PARTIAL with
    csum_start at the inner L4 header (over veth nobody finishes it).  The
    program takes them; the Python path does not yet (so not in :func:`cases`)."""
    mac_a = _mac(h.a, h.dev_a)
    mac_b = h.nexthop_mac
    out: list[Case] = []
    port = iter(range(30000, 40000))

    def add(
        name: str,
        outer: int,
        ifam: int,
        l4: str,
        size: int,
        expect: str,
        *,
        start: str = "inner",
        bad_seed: bool = False,
        bad_outer: bool = False,
        options: bytes = b"",
    ) -> None:
        sp = next(port)
        body = bytes((sp * 5 + i) & 0xFF for i in range(size))
        final = inner_frame(ifam, l4, body, sport=sp, partial=False, ip_options=options)
        seeded = bytearray(inner_frame(ifam, l4, body, sport=sp, partial=True, ip_options=options))
        l4_at = 14 + (20 + len(options) if ifam == 4 else 40)
        coff = 16 if l4 == "tcp" else 6
        if bad_seed:
            seeded[l4_at + coff] ^= 0x40
        (parts,) = _encap(h, outer, mac_b, mac_a).encap(final, None, gso=False)
        data = bytearray(b"".join(bytes(p) for p in parts))
        inner_at = len(data) - len(final)
        data[inner_at:] = seeded
        tcp = 14 + (20 if outer == 4 else 40)
        if bad_outer:
            data[tcp + 17] ^= 0x40
        if outer == 6 and len(final) < 14 + 40:
            expect = "offload"  # adjust_room keeps at least 40 bytes after IPv6
        if start == "inner":
            vnet = VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, inner_at + l4_at, coff)
        else:  # csum_start in the headers the program strips
            vnet = VnetHdr(VnetFlag.NEEDS_CSUM, 0, 0, 0, tcp, 16)
        out.append(
            Case(
                name,
                outer,
                [[vnet.pack(), bytes(data)]],
                expect,
                sport=sp,
                inner_family=ifam,
                l4=l4,
                payload=size,
            )
        )

    for outer in (4, 6):
        for ifam in (4, 6):
            l3 = 20 if ifam == 4 else 40
            for l4 in ("tcp", "udp"):
                one = 1500 - (20 if outer == 4 else 40) - 20 - 18 - 14 - l3 - l4_header_len(l4)
                for size in (0, 100, one):
                    add(
                        f"o{outer}-i{ifam}-{l4}-inner-partial-{size}", outer, ifam, l4, size, "fast"
                    )
        nop3 = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
        add(f"o{outer}-i4-tcp-inner-partial-options", outer, 4, "tcp", 100, "fast", options=nop3)
        add(f"o{outer}-i4-udp-inner-partial-options", outer, 4, "udp", 100, "fast", options=nop3)
        add(
            f"o{outer}-i4-tcp-inner-partial-outer-start",
            outer,
            4,
            "tcp",
            100,
            "fast",
            start="outer",
        )
        add(
            f"o{outer}-i6-udp-inner-partial-outer-start",
            outer,
            6,
            "udp",
            300,
            "fast",
            start="outer",
        )
        add(f"o{outer}-i4-tcp-not-seed", outer, 4, "tcp", 100, "checksum", bad_seed=True)
        add(f"o{outer}-i6-udp-not-seed", outer, 6, "udp", 100, "checksum", bad_seed=True)
        add(f"o{outer}-i4-udp-seed-bad-outer", outer, 4, "udp", 100, "checksum", bad_outer=True)
        add(f"o{outer}-i6-tcp-seed-bad-outer", outer, 6, "tcp", 100, "checksum", bad_outer=True)
    return out


def sentinel(h: FastPathHosts, outer: int) -> Case:
    """A last frame that takes the Python path (outer CE) and that Python delivers
    (the inner packet is ECT(1): it gets CE): when it shows on the far side,
    everything before it has."""
    mac_a = _mac(h.a, h.dev_a)
    mac_b = h.nexthop_mac
    frame = inner_frame(4, "udp", b"sentinel", sport=SENTINEL_PORT, partial=False, tos=1)
    enc = _encap(h, outer, mac_b, mac_a)
    packets = [_with_outer_ce(_joined(p), outer) for p in enc.encap(frame, None, gso=False)]
    return Case("sentinel", outer, packets, "marking", sport=SENTINEL_PORT, payload=8)


def _joined(parts: list[object]) -> list[bytes]:
    """A packet of finished segment parts as an all-zero vnet header and one buffer."""
    return [VNET_NONE, b"".join(_as_bytes(parts))]


def _with_bad_outer_checksum(packet: list[bytes], outer: int) -> list[bytes]:
    """The packet (vnet header, then its parts) with its outer TCP checksum wrong."""
    data = bytearray(b"".join(packet[1:]))
    data[14 + (20 if outer == 4 else 40) + 17] ^= 0x40
    return [packet[0], bytes(data)]


def _with_outer_ce(packet: list[bytes], outer: int) -> list[bytes]:
    """The packet with ECN CE in its outer IP header (IPv4 header checksum fixed)."""
    hdr = bytearray(packet[1])
    if outer == 4:
        hdr[15] |= 3
        struct.pack_into("!H", hdr, 24, 0)
        struct.pack_into("!H", hdr, 24, ~_fold(ones_sum(hdr[14:34])) & 0xFFFF)
    else:
        hdr[15] |= 0x30
    return [packet[0], bytes(hdr), *packet[2:]]


def send_cases(h: FastPathHosts, all_cases: list[Case]) -> None:
    """Send every case's packets from A, in order."""
    with h.a.entered():
        sock = PacketSocket(h.dev_a, None, vnet_hdr=True, ignore_outgoing=True)
    with sock:
        for c in all_cases:
            for p in c.packets:
                while not sock.send(p):
                    time.sleep(0.001)  # socket buffer full: let the kernel drain it


# --------------------------------------------------------------------------- captures
#: tcpdump filter for the crafted inner frames (tagged or not) on the VM side.
VM_FILTER = (
    "src host 192.0.2.1 or src host 2001:db8:1::1"
    " or (vlan and (src host 192.0.2.1 or src host 2001:db8:1::1))"
)


def vm_capture(h: FastPathHosts, path: Path) -> Capture:
    """tcpdump on the VM's side of the bridge.  The snap length is the VM link's MTU:
    tcpdump's ring has one slot per snap length, so the default (256 KB) leaves
    room for ~128 frames in its 32 MB and a burst overflows it."""
    return Capture(h.vm, h.vm_dev, path, VM_FILTER, snaplen=VM_MTU + 64)


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file (as tcpdump -w writes it)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    rec = struct.Struct(endian + "IIII")
    frames = []
    pos = 24
    while pos + 16 <= len(data):
        _s, _us, incl, _orig = rec.unpack_from(data, pos)
        pos += 16
        if pos + incl > len(data):
            break
        frames.append(data[pos : pos + incl])
        pos += incl
    return frames


def wait_for_frames(path: Path, count: int, timeout: float = 20.0) -> list[bytes]:
    """Poll the capture file until it holds ``count`` frames (or the timeout)."""
    deadline = time.monotonic() + timeout
    frames = read_pcap(path)
    while len(frames) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        frames = read_pcap(path)
    return frames


def l4_sport(frame: bytes) -> int | None:
    """The inner L4 source port of a captured frame, the identifier of an ICMP echo
    request (None if neither)."""
    et = struct.unpack_from("!H", frame, 12)[0]
    if et == 0x0800:
        off = 14 + (frame[14] & 0x0F) * 4
        proto = frame[23]
    elif et == 0x86DD:
        off, proto = 54, frame[20]
    else:
        return None
    if proto in (1, 58) and len(frame) >= off + 6 and frame[off] in (8, 128):
        return int(struct.unpack_from("!H", frame, off + 4)[0])
    if proto not in (6, 17) or len(frame) < off + 2:
        return None
    return int(struct.unpack_from("!H", frame, off)[0])


# --------------------------------------------------------------------------- B's daemon
@contextlib.contextmanager
def daemon_on_b(h: FastPathHosts, tmp: Path, *args: str) -> Iterator[str]:
    """``sttun up *args`` in B (control socket and log in ``tmp``), its TAP put into
    B's bridge once it is up; yields the control socket's path.  Stopped with
    SIGTERM at the end, and it must exit with status 0."""
    sock = str(tmp / "ctl.sock")
    argv = [sys.executable, "-m", "sttun", "up", *args, "--control-socket", sock]
    log = tmp / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    with open(log, "wb") as fh:
        proc = h.b.popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 20
        while not (
            os.path.exists(sock)
            and h.b.run(["ip", "link", "show", h.tap], check=False).returncode == 0
        ):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"daemon did not start: {log.read_text()}"
            time.sleep(0.05)
        bridge_tap(h, h.tap)
        yield sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
    assert proc.returncode == 0, log.read_text()


# --------------------------------------------------------------------------- tshark
#: The checksum fields tshark fills in with its checks on (tshark_rows).
CHECKSUM_FIELDS = [
    "ip.checksum.status",
    "tcp.checksum.status",
    "tcp.checksum",
    "tcp.checksum_calculated",
    "udp.checksum.status",
    "icmp.checksum.status",
    "icmpv6.checksum.status",
]


def tshark_rows(pcap: Path, fields: list[str], *, stt: bool) -> list[dict[str, list[str]]]:
    """Per frame, every value of ``fields`` (outer first), with tshark checking the IP,
    TCP and UDP checksums.  ``stt``: decode STT by heuristics (tshark then hands IP's
    payload to STT, and no outer TCP is decoded); without it only the outer headers
    are."""
    argv = ["tshark", "-r", str(pcap)]
    if stt:
        argv += ["-o", "ip.try_heuristic_first:TRUE"]
    for proto in ("ip", "tcp", "udp"):
        argv += ["-o", f"{proto}.check_checksum:TRUE"]
    argv += ["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    rows = []
    for line in res.stdout.splitlines():
        values = (line.split("\t") + [""] * len(fields))[: len(fields)]
        rows.append({f: v.split(",") if v else [] for f, v in zip(fields, values, strict=True)})
    return rows
