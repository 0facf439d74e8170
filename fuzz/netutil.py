"""Test network for the endpoint targets: tunnels, packet builders, checked receive.

Addresses are from the underlay test ranges (docs: /work/shared/test-addresses.md);
nothing here touches a socket.
"""

from __future__ import annotations

import struct

from fuzz.common import check
from sttun.core.endpoint import Endpoint, Tunnel, TunnelSpec
from sttun.core.reassembly import Reassembler
from sttun.wire.checksum import ones_sum
from sttun.wire.ip import build_ipv4, build_ipv6, ip_bytes, pseudo_sum
from sttun.wire.stt import STT_PORT

__all__ = [
    "ADDRS",
    "KEYS",
    "LOCAL4",
    "LOCAL6",
    "PORTS",
    "build_packet",
    "check_limits",
    "covered",
    "make_endpoint",
    "receive_checked",
]

LOCAL4 = ip_bytes("198.18.0.2")
LOCAL6 = ip_bytes("2001:db8:0:1::2")
PEER4A = ip_bytes("198.18.0.1")
PEER4B = ip_bytes("198.18.0.3")
PEER6 = ip_bytes("2001:db8:0:1::1")
STRANGER4 = ip_bytes("198.18.0.9")
STRANGER6 = ip_bytes("2001:db8:0:1::9")

#: (remote, local) pairs a packet may come from: three tunnel peers, two strangers.
ADDRS: tuple[tuple[bytes, bytes], ...] = (
    (PEER4A, LOCAL4),
    (PEER4B, LOCAL4),
    (PEER6, LOCAL6),
    (STRANGER4, LOCAL4),
    (STRANGER6, LOCAL6),
)
#: Context ids: those of the tunnels, and some no tunnel uses.
KEYS: tuple[int, ...] = (0x10, 0x11, 0x20, 0x0, 0x12, 0xFFFFFFFFFFFFFFFF)
#: Destination ports: the two tunnel ports and others.
PORTS: tuple[int, ...] = (STT_PORT, 7472, 80, 0)

_TUNNELS = (
    ("a0", PEER4A, LOCAL4, 0x10, STT_PORT),
    ("a1", PEER4A, LOCAL4, 0x11, STT_PORT),
    ("b0", PEER4B, LOCAL4, 0x10, 7472),
    ("c0", PEER6, LOCAL6, 0x20, STT_PORT),
)

SMALL_LIMITS = {
    "timeout": 30.0,
    "high_water": 256 * 1024,
    "low_water": 192 * 1024,
    "source_budget": 160 * 1024,
    "max_frames": 16,
}


def make_endpoint(small: bool) -> Endpoint:
    """An endpoint with four tunnels; ``small`` uses tight reassembly limits."""
    reasm = Reassembler(**SMALL_LIMITS) if small else Reassembler()  # type: ignore[arg-type]
    ep = Endpoint(reassembler=reasm)
    for name, remote, local, key, port in _TUNNELS:
        ep.add_tunnel(
            TunnelSpec(
                name=name, local=local, remote=remote, in_key=key, out_key=key, dst_port=port
            )
        )
    return ep


def build_packet(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    seq: int,
    ack: int,
    dport: int = STT_PORT,
    sport: int = 49152,
    tos: int = 0,
    doff_byte: int = 0x50,
    tcp_flags: int = 0x18,
    csum_xor: int = 0,
    df: bool = True,
) -> bytes:
    """An outer IPv4/IPv6 + TCP-like segment with a correct checksum (xor ``csum_xor``)."""
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH",
            sport & 0xFFFF,
            dport & 0xFFFF,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            doff_byte & 0xFF,
            tcp_flags & 0xFF,
            0xFFFF,
            0,
            0,
        )
    )
    tcp += payload
    if len(src) == 4:
        ip = build_ipv4(src, dst, len(tcp), tos=tos & 0xFF, df=df)
    else:
        ip = build_ipv6(src, dst, len(tcp), tclass=tos & 0xFF)
    csum = ~ones_sum(tcp, pseudo_sum(src, dst, 6, len(tcp))) & 0xFFFF
    struct.pack_into("!H", tcp, 16, csum ^ (csum_xor & 0xFFFF))
    return ip + bytes(tcp)


def covered(ep: Endpoint) -> int:
    """Bytes stored by the endpoint's partial frames (reads reassembler internals)."""
    return sum(fr.covered for fr in ep.reassembler._frames.values())


def _drops(ep: Endpoint) -> int:
    return ep.drops.total() + ep.reassembler.drops.total()


def check_limits(ep: Endpoint) -> None:
    """The reassembler's memory limits and bookkeeping hold."""
    r = ep.reassembler
    check(r.bytes_held <= r.high_water, f"bytes_held {r.bytes_held} > high {r.high_water}")
    check(r.entries <= r.max_frames, f"{r.entries} partial frames > {r.max_frames}")
    charged = sum(fr.charge for fr in r._frames.values())
    check(charged == r.bytes_held, f"bytes_held {r.bytes_held} != charged {charged}")
    peers = {remote for remote, _local in ADDRS[:3]}
    for src, nbytes in r.bytes_by_source.items():
        check(nbytes <= r.source_budget, f"source {src!r} holds {nbytes} > budget")
        check(src in peers, f"bytes buffered for a source no tunnel names: {src!r}")


def receive_checked(
    ep: Endpoint, packet: bytes | bytearray | memoryview, now: float, csum_ok: bool
) -> tuple[Tunnel, object] | None:
    """``ep.receive`` plus its invariants: never silent loss, right tunnel, limits."""
    d0 = _drops(ep)
    c0 = covered(ep)
    res = ep.receive(packet, now, csum_ok=csum_ok)
    if res is None:
        check(
            _drops(ep) > d0 or covered(ep) > c0,
            "segment neither counted as a drop nor stored (silent loss)",
        )
    else:
        tunnel, dec = res
        raw = bytes(packet[:40])
        src, dst = (raw[12:16], raw[16:20]) if raw[0] >> 4 == 4 else (raw[8:24], raw[24:40])
        check(tunnel.spec.remote == src, "frame delivered to a tunnel of another remote")
        check(tunnel.spec.local == dst, "frame delivered to a tunnel of another local address")
        check(
            dec.header.context_id == tunnel.spec.in_key,
            f"frame with context {dec.header.context_id:#x} delivered to {tunnel.spec.name}",
        )
        check(dec.header.version == 0, "frame with STT version != 0 delivered")
        check(len(dec.inner) >= 14, "inner frame shorter than Ethernet delivered")
    check_limits(ep)
    return res
