"""Hand-made STT segments for the reliability e2e tests, sent with an AF_PACKET socket.

The daemon's own encapsulator only ever produces well-formed segments; these
builders produce anything, so every field can be set (or broken) on purpose:

* :func:`stt_header` / :func:`stt_frame` - the 18-byte STT header and a frame;
* :func:`inner_udp4` - a small inner Ethernet + IPv4 + UDP frame with a marker;
* :func:`segment` - one outer IPv4 + TCP-like segment carrying a slice of a frame,
  every header field selectable, the TCP checksum correct unless told otherwise;
* :func:`split` - a frame cut into MSS-sized segments;
* :class:`Injector` - a raw socket on a device of a namespace that sends IP packets
  behind an Ethernet header.

Run as a script (``python stt_craft.py flood ...``) it floods first segments of
never-completing 64 KB frames with random ACKs (the reassembly flood of issue #7)
and prints how many it sent.  The script imports only ``sttun.wire`` so it can run
inside ``ip netns exec`` without the test package on the path.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Sequence

from sttun.wire.checksum import ones_sum

STT_PORT = 7471
ETH_P_IP = 0x0800
IPPROTO_TCP = 6
IPPROTO_UDP = 17
FLAG_C = 0x01  # checksum verified
FLAG_P = 0x02  # checksum partial
FLAG_V4 = 0x04  # inner IPv4
FLAG_T = 0x08  # inner TCP
TCP_ACK = 0x10
TCP_PSH = 0x08
IP_DF = 0x4000
IP_MF = 0x2000

_STT = struct.Struct("!BBBBHHQH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ETH = struct.Struct("!6s6sH")

MARKER = b"STTUN-E2E-MARKER"
"""Bytes every crafted inner frame carries, so captures can look for them."""


def _packed(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _fold_csum(s: int) -> int:
    """Checksum (complemented folded sum) from an unfolded sum."""
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_checksum(header: bytes | bytearray) -> int:
    """The IPv4 header checksum of ``header`` (its checksum field must be zero)."""
    return _fold_csum(ones_sum(header))


def stt_header(
    key: int,
    *,
    version: int = 0,
    flags: int = 0,
    l4_offset: int = 0,
    mss: int = 0,
    tci: int = 0,
) -> bytes:
    """The 18-byte STT header (reserved and pad zero)."""
    return _STT.pack(version, flags, l4_offset, 0, mss, tci, key, 0)


def stt_frame(inner: bytes, key: int, **header: int) -> bytes:
    """STT header + inner Ethernet frame; ``header`` goes to :func:`stt_header`."""
    return stt_header(key, **header) + inner


def inner_udp4(
    payload: bytes = MARKER,
    *,
    src: str = "192.0.2.101",
    dst: str = "192.0.2.102",
    tos: int = 0,
    src_mac: str = "02:00:00:00:00:01",
    dst_mac: str = "02:00:00:00:00:02",
) -> bytes:
    """Ethernet + IPv4 + UDP (port 9 -> 9) with a correct IP checksum, UDP sum 0."""
    udp = _UDP.pack(9, 9, 8 + len(payload), 0) + payload
    ip = bytearray(
        _IP4.pack(0x45, tos, 20 + len(udp), 1, 0, 64, IPPROTO_UDP, 0, _packed(src), _packed(dst))
    )
    struct.pack_into("!H", ip, 10, _fold_csum(ones_sum(ip)))
    return _ETH.pack(_mac(dst_mac), _mac(src_mac), ETH_P_IP) + bytes(ip) + udp


def segment(
    src: str,
    dst: str,
    payload: bytes,
    *,
    frame_len: int,
    offset: int = 0,
    ack: int = 1,
    sport: int = 0xC000,
    dport: int = STT_PORT,
    tos: int = 0,
    doff: int = 5,
    tcp_flags: int = TCP_ACK | TCP_PSH,
    frag: int = IP_DF,
    ident: int = 0,
    bad_csum: bool = False,
    ip_total: int | None = None,
) -> bytes:
    """One outer IPv4 packet: IP header + 20-byte TCP-like header + ``payload``.

    SEQ is ``frame_len << 16 | offset`` (both masked to 16 bits), ACK the frame id.
    ``doff`` is written as is (the header stays 20 bytes long whatever it says).
    The TCP checksum is correct over exactly these bytes unless ``bad_csum``; the IP
    total length is the real one unless ``ip_total`` overrides it.
    """
    seq = ((frame_len & 0xFFFF) << 16) | (offset & 0xFFFF)
    tcp = bytearray(_TCP.pack(sport, dport, seq, ack, (doff & 0xF) << 4, tcp_flags, 0, 0, 0))
    tcp_len = len(tcp) + len(payload)
    s, d = _packed(src), _packed(dst)
    pseudo = ones_sum(s + d) + IPPROTO_TCP + tcp_len
    csum = _fold_csum(ones_sum(payload, ones_sum(tcp, pseudo)))
    if bad_csum:
        csum ^= 0x5A5A
    struct.pack_into("!H", tcp, 16, csum)
    total = 20 + tcp_len if ip_total is None else ip_total
    ip = bytearray(_IP4.pack(0x45, tos, total, ident, frag, 64, IPPROTO_TCP, 0, s, d))
    struct.pack_into("!H", ip, 10, _fold_csum(ones_sum(ip)))
    return bytes(ip) + bytes(tcp) + payload


def split(
    src: str,
    dst: str,
    frame: bytes,
    *,
    ack: int,
    mss: int = 1400,
    order: Sequence[int] | None = None,
    **kw: object,
) -> list[bytes]:
    """``frame`` as segments of at most ``mss`` payload bytes (optionally reordered)."""
    segs = [
        segment(src, dst, frame[o : o + mss], frame_len=len(frame), offset=o, ack=ack, **kw)  # type: ignore[arg-type]
        for o in range(0, len(frame), mss)
    ]
    if order is not None:
        segs = [segs[i] for i in order]
    return segs


class Injector:
    """An AF_PACKET socket on ``dev`` (create it inside ``Netns.entered()`` for a peer).

    :meth:`send` puts ``dst_mac``/own MAC/IPv4 in front of an IP packet.
    """

    def __init__(self, dev: str, dst_mac: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.bind((dev, 0))
        src_mac = self.sock.getsockname()[4]
        self.eth = _ETH.pack(_mac(dst_mac), bytes(src_mac), ETH_P_IP)
        self.sent = 0

    def send(self, packet: bytes) -> None:
        """Send one IP packet behind the Ethernet header."""
        self.sock.send(self.eth + packet)
        self.sent += 1

    def send_all(self, packets: Sequence[bytes], gap: float = 0.0) -> None:
        """Send several packets, ``gap`` seconds apart."""
        for p in packets:
            self.send(p)
            if gap:
                time.sleep(gap)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def flood(
    inj: Injector,
    src: str,
    dst: str,
    *,
    seconds: float,
    frame_len: int = 0xFFFF,
    payload_len: int = 1400,
    pps: float = 0.0,
    stop_file: str | None = None,
) -> int:
    """Send first segments of ``frame_len``-byte frames with random ACKs; return the count.

    Each segment has a fresh random ACK, offset 0 and ``payload_len`` bytes, so none
    ever completes.  ``pps`` > 0 paces the sender; it stops after ``seconds`` or as
    soon as ``stop_file`` exists.
    """
    payload = bytes(random.getrandbits(8) for _ in range(payload_len))
    template = bytearray(inj.eth + segment(src, dst, payload, frame_len=frame_len, ack=0))
    tcp = len(inj.eth) + 20
    base = ~struct.unpack_from("!H", template, tcp + 16)[0] & 0xFFFF  # sum with ack = 0
    pack_ack = struct.Struct("!I").pack_into
    pack_csum = struct.Struct("!H").pack_into
    send = inj.sock.send
    rnd = random.getrandbits
    sent = 0
    start = time.monotonic()
    end = start + seconds
    next_check = start
    while True:
        ack = rnd(32)
        pack_ack(template, tcp + 8, ack)
        pack_csum(template, tcp + 16, _fold_csum(base + (ack >> 16) + (ack & 0xFFFF)))
        try:
            send(template)
        except BlockingIOError:
            continue
        sent += 1
        if pps > 0 and sent % 16 == 0:
            ahead = start + sent / pps - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        if sent % 256 == 0:
            now = time.monotonic()
            if now >= end:
                break
            if stop_file is not None and now >= next_check:
                next_check = now + 0.05
                if os.path.exists(stop_file):
                    break
    inj.sent += sent
    return sent


def main(argv: Sequence[str] | None = None) -> int:
    """``stt_craft.py flood --dev D --dst-mac M --src S --dst D --seconds T``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood", help="first segments of never-completing frames")
    f.add_argument("--dev", required=True)
    f.add_argument("--dst-mac", required=True)
    f.add_argument("--src", required=True)
    f.add_argument("--dst", required=True)
    f.add_argument("--seconds", type=float, default=10.0)
    f.add_argument("--frame-len", type=int, default=0xFFFF)
    f.add_argument("--payload-len", type=int, default=1400)
    f.add_argument("--pps", type=float, default=0.0)
    f.add_argument("--stop-file")
    a = p.parse_args(argv)
    with Injector(a.dev, a.dst_mac) as inj:
        print("ready", flush=True)
        n = flood(
            inj,
            a.src,
            a.dst,
            seconds=a.seconds,
            frame_len=a.frame_len,
            payload_len=a.payload_len,
            pps=a.pps,
            stop_file=a.stop_file,
        )
    print(n, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
