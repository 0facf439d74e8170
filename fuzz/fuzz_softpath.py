"""Fuzz target ``softpath``: ``sttun.core.softpath.complete`` with random vnet headers.

Byte 0 picks the mode:

* raw — the next 10 bytes are the ``virtio_net_hdr``, the rest is the frame;
* built — an inner frame assembled from fuzz choices: 0-2 VLAN tags, IPv4 (with
  options) or IPv6 (with extension headers), TCP (with options) or UDP, a payload,
  lengths usually right and sometimes wrong; and a vnet header whose flags, GSO
  type, ``gso_size``, ``csum_start`` and ``csum_offset`` are usually consistent
  with the frame and sometimes not.

Invariants: ``complete`` returns a list of new ``bytearray`` objects or raises
:class:`~sttun.errors.DecodeError`; the input frame is never modified.  Oracles:
a frame needing nothing comes back unchanged; a finished checksum sums to 0xFFFF
with the pseudo-header sum that was in the field; TSO and USO pieces carry at most
``gso_size`` payload bytes, together exactly the original payload, each with a
valid IPv4 header checksum and L4 checksum.
"""

from __future__ import annotations

import struct

from fuzz.common import FuzzFinding, Input, Target, check, main
from sttun.core.softpath import complete
from sttun.errors import DecodeError
from sttun.wire.checksum import ones_sum
from sttun.wire.ip import IPV6_EXT_HEADERS, pseudo_sum
from sttun.wire.vnet import GsoType, VnetFlag, VnetHdr

_TPIDS = (0x8100, 0x88A8)
_GSO = (0, 0, 1, 4, 5, 3, 0x81, 0x84, 0x83, 2, 0xFF)


def _build(inp: Input) -> tuple[bytes, VnetHdr]:
    knobs = inp.u16()
    v6 = bool(knobs & 1)
    udp = bool(knobs & 2)
    tags = (knobs >> 2) & 3 if knobs & 0x10 else 0
    lie = knobs & 0xE0 == 0xE0  # lengths may be wrong
    eth = bytes(12)
    for _ in range(min(tags, 2)):
        eth += struct.pack("!HH", _TPIDS[inp.below(2)], inp.u16())
    eth += b"\x86\xdd" if v6 else b"\x08\x00"
    proto = 17 if udp else 6
    opt_words = inp.below(4) if knobs & 0x100 else 0
    if udp:
        l4h = bytearray(struct.pack("!HHHH", 1000, 2000, 0, 0))
    else:
        doff = 5 + opt_words
        l4h = bytearray(
            struct.pack("!HHIIBBHHH", 1000, 2000, inp.u32(), 0, doff << 4, inp.u8(), 512, 0, 0)
        )
        l4h += b"\x01" * (4 * opt_words)
    plen = inp.u16() % 3000
    payload = bytes((i * 13 + plen) & 0xFF for i in range(plen))
    seg = l4h + payload
    if udp:
        struct.pack_into("!H", seg, 4, len(seg) & 0xFFFF)
    if v6:
        ext = b""
        nh = proto
        if knobs & 0x200:  # hop-by-hop + destination options
            ext = bytes((60, 0)) + bytes(6) + bytes((proto, 0)) + bytes(6)
            nh = 0
        l3 = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(seg), nh, 64,
                                   b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01",
                                   b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02"))  # fmt: skip
        l3 += ext
    else:
        ihl = 5 + (opt_words if knobs & 0x400 else 0)
        l3 = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 0, 7,
                                   0x4000 if not knobs & 0x800 else inp.u16(), 64, proto, 0,
                                   b"\xc0\0\2\1", b"\xc0\0\2\2"))  # fmt: skip
        l3 += b"\x01" * (4 * (ihl - 5))
        struct.pack_into("!H", l3, 2, (len(l3) + len(seg)) & 0xFFFF)
        struct.pack_into("!H", l3, 10, ~ones_sum(l3) & 0xFFFF)
    l4 = len(eth) + len(l3)
    csum_off = 6 if udp else 16
    # The checksum field holds the pseudo-header sum, as a partial checksum does.
    src, dst = (bytes(l3[8:24]), bytes(l3[24:40])) if v6 else (bytes(l3[12:16]), bytes(l3[16:20]))
    struct.pack_into("!H", seg, csum_off, pseudo_sum(src, dst, proto, len(seg)))
    frame = bytearray(eth + l3 + seg)
    if lie:
        pos = inp.u16() % (len(frame) + 1)
        frame[pos : pos + 2] = inp.take(2)
    if knobs & 0x1000:
        frame += bytes(inp.below(8))  # Ethernet padding
    if knobs & 0x2000:
        del frame[inp.u16() % (len(frame) + 1) :]
    gso_type = inp.pick(_GSO)
    if gso_type == 1 and (v6 or udp):
        gso_type = 5 if udp else 4
    gso_size = inp.pick((1448, 536, 1, 8, 9, 100, 0, inp.u16()))
    if gso_size and gso_size < 64 and plen > 1000:
        gso_size = 64  # keeps the piece count (and time per input) sane
    flags = inp.pick((1, 1, 1, 0, 2, 3, inp.u8()))
    cs_start = l4 if inp.below(8) else inp.u16()
    cs_off = csum_off if inp.below(8) else inp.u16()
    hdr_len = inp.u16() if knobs & 0x4000 else 0
    return bytes(frame), VnetHdr(flags, gso_type, hdr_len, gso_size, cs_start, cs_off)


def _locate(piece: bytes, verify: bool = True) -> tuple[bytes, bytes, int, int, int, bool] | None:
    """(src, dst, proto, l4, end, is_v4) of a piece, or None if not simple IP."""
    off = 14
    etype = int.from_bytes(piece[12:14], "big")
    while etype in _TPIDS:
        etype = int.from_bytes(piece[off + 2 : off + 4], "big")
        off += 4
    if etype == 0x0800:
        ihl = (piece[off] & 0x0F) * 4
        total = int.from_bytes(piece[off + 2 : off + 4], "big")
        if verify:
            check(ones_sum(piece[off : off + ihl]) == 0xFFFF, "piece: bad IPv4 header checksum")
        frag = int.from_bytes(piece[off + 6 : off + 8], "big")
        if frag & 0x3FFF:
            return None
        return (
            piece[off + 12 : off + 16],
            piece[off + 16 : off + 20],
            piece[off + 9],
            (off + ihl),
            off + total,
            True,
        )
    if etype == 0x86DD:
        nh = piece[off + 6]
        end = off + 40 + int.from_bytes(piece[off + 4 : off + 6], "big")
        pos = off + 40
        while nh in IPV6_EXT_HEADERS:  # the same set softpath steps over
            nh, pos = piece[pos], pos + (piece[pos + 1] + 1) * 8
        if nh == 44:
            return None
        return piece[off + 8 : off + 24], piece[off + 24 : off + 40], nh, pos, end, False
    return None


def _check_gso(frame: bytes, vnet: VnetHdr, out: list[bytearray]) -> None:
    base = vnet.gso_type & 0x7F
    try:  # pieces get valid IPv4 header checksums if the frame had one
        _locate(frame)
        verify = True
    except FuzzFinding:
        verify = False
    if base not in (GsoType.TCPV4, GsoType.TCPV6, GsoType.UDP_L4):
        for piece in out:
            _locate(bytes(piece), verify)  # IPv4 header checksums of UFO fragments
        return
    orig = _locate(frame, verify=False)
    check(orig is not None, "GSO accepted a frame that is not simple IP")
    assert orig is not None
    _s, _d, proto, l4, end, _v4 = orig
    hlen = l4 + ((frame[l4 + 12] >> 4) * 4 if proto == 6 else 8)
    payload = frame[hlen:end]
    got = bytearray()
    for piece in out:
        loc = _locate(bytes(piece), verify)
        check(loc is not None, "GSO piece is not simple IP")
        assert loc is not None
        src, dst, p, pl4, pend, _ = loc
        check(pend <= len(piece), "piece shorter than its IP length")
        seg = bytes(piece[pl4:pend])
        check(
            ones_sum(seg, pseudo_sum(bytes(src), bytes(dst), p, len(seg))) == 0xFFFF,
            "GSO piece: bad L4 checksum",
        )
        phl = pl4 + ((piece[pl4 + 12] >> 4) * 4 if p == 6 else 8)
        chunk = piece[phl:pend]
        check(len(chunk) <= vnet.gso_size or len(out) == 1, "piece payload > gso_size")
        got += chunk
    check(bytes(got) == payload, "GSO pieces do not add up to the original payload")


def one_input(data: bytes) -> None:
    """See the module docstring."""
    inp = Input(data)
    mode = inp.u8()
    if mode & 1:
        frame, vnet = _build(inp)
    else:
        vnet = VnetHdr.unpack(inp.take(10).ljust(10, b"\0"))
        frame = inp.rest()
    before = bytes(frame)
    buf: bytes | bytearray | memoryview = frame
    if mode & 2:
        buf = bytearray(frame)
    elif mode & 4:
        buf = memoryview(bytearray(frame))
    try:
        out = complete(buf, vnet)
    except DecodeError:
        check(bytes(buf) == before, "complete() modified its input (error path)")
        return
    check(bytes(buf) == before, "complete() modified its input")
    check(isinstance(out, list) and out, "complete() returned no pieces")
    check(all(type(p) is bytearray for p in out), "complete() returned a non-bytearray")
    if vnet.gso_type == 0:
        check(len(out) == 1, "no GSO but several pieces")
        if not vnet.flags & VnetFlag.NEEDS_CSUM:
            check(out[0] == before, "frame needing nothing was changed")
        elif not vnet.csum_offset & 1:
            cs, pos = vnet.csum_start, vnet.csum_start + vnet.csum_offset
            field = int.from_bytes(before[pos : pos + 2], "big")
            total = ones_sum(out[0][cs:], field)
            check(total in (0xFFFF, 0), f"finished checksum sums to {total:#x}")
            check(out[0][:pos] == before[:pos], "bytes before the checksum changed")
            check(out[0][pos + 2 :] == before[pos + 2 :], "bytes after the checksum changed")
    else:
        _check_gso(before, vnet, out)


def seeds() -> list[bytes]:
    """Built TSO/USO/UFO/checksum frames, raw vnet+frame inputs."""
    out = []
    for knobs in (0x0000, 0x0001, 0x0002, 0x0003, 0x0014, 0x0201, 0x0500, 0x1000):
        for gso in (0, 2, 3, 4, 5):
            out.append(b"\x01" + knobs.to_bytes(2, "big") + bytes(4) + b"\x10\x00" + bytes([gso]))
    frame = bytes(12) + b"\x08\x00" + bytes(40)
    out.append(b"\x00" + VnetHdr(1, 0, 0, 0, 34, 16).pack() + frame)
    out.append(b"\x00" + VnetHdr(1, 1, 54, 1448, 34, 16).pack() + frame)
    return out


TARGET = Target("softpath", one_input, seeds, max_len=4096)

if __name__ == "__main__":
    main(TARGET)
