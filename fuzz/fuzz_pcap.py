"""Fuzz target ``pcap``: :class:`~sttun.io.pcap.CaptureReader` over any bytes.

Byte 0 picks the mode and reader options (strict or not, any link type or the
supported ones, short reads from a pipe-like source, the 4 KiB minimum chunk so
refills happen):

* raw — the rest of the input is the file;
* mutated — a valid capture (classic pcap in either byte order and resolution, or
  pcapng with two sections, interfaces with ``if_tsresol``/``if_tsoffset``, EPB,
  SPB and obsolete PB blocks) built by the harness, then fuzz-chosen overwrites,
  inserts and a cut applied to it.

Invariants: iteration yields ``(ts_ns, linktype, data, orig_len)`` tuples with
``data`` a read-only memoryview, or raises :class:`~sttun.errors.CaptureError`;
nothing else.  ``l3_offset`` on each packet returns None or an offset inside it.
"""

from __future__ import annotations

import io
import struct

from fuzz.common import Input, Target, check, main
from sttun.errors import CaptureError
from sttun.io.pcap import CaptureReader, PcapWriter, l3_offset

MAX_PACKETS = 2000


class _Trickle(io.RawIOBase):
    """A pipe-like reader: at most ``step`` bytes per ``readinto``."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step
        self.name = "<trickle>"

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._step, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def _pkt(i: int) -> bytes:
    eth = bytes(12) + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, i, 0, 64, 6, 0, bytes(4), bytes(4))
    return eth + ip + bytes(20)


def _classic(variant: int) -> bytes:
    out = io.BytesIO()
    linktype = (1, 101, 113, 276, 228)[variant % 5]
    w = PcapWriter(out, linktype=linktype, nanosecond=bool(variant & 8))
    for i in range(3):
        data = _pkt(i) if linktype == 1 else _pkt(i)[14:]
        if linktype in (113, 276):
            data = bytes(14 if linktype == 113 else 20) + data
        w.write(1_700_000_000_000_000_000 + i * 1000, data)
    w.flush()
    raw = out.getvalue()
    if variant & 16:  # big-endian file: swap the header and record fields
        raw = _swap_classic(raw)
    return raw


def _swap_classic(raw: bytes) -> bytes:
    magic, vmaj, vmin, zone, sig, snap, lt = struct.unpack_from("<IHHiIII", raw)
    out = bytearray(struct.pack(">IHHiIII", magic, vmaj, vmin, zone, sig, snap, lt))
    pos = 24
    while pos + 16 <= len(raw):
        sec, frac, incl, orig = struct.unpack_from("<IIII", raw, pos)
        out += struct.pack(">IIII", sec, frac, incl, orig) + raw[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
    return bytes(out)


def _block(bo: str, btype: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    blen = 12 + len(body)
    return struct.pack(bo + "II", btype, blen) + body + struct.pack(bo + "I", blen)


def _pcapng(variant: int) -> bytes:
    bo = ">" if variant & 1 else "<"
    out = bytearray()
    for section in range(2):
        shb = struct.pack(bo + "IHHq", 0x1A2B3C4D, 1, 0, -1)
        out += _block(bo, 0x0A0D0D0A, shb)
        opts = struct.pack(bo + "HH", 9, 1) + bytes((9 if section else 0x86,)) + bytes(3)
        opts += struct.pack(bo + "HHq", 14, 8, 100) + struct.pack(bo + "HH", 0, 0)
        out += _block(bo, 1, struct.pack(bo + "HHI", 1, 0, 65535) + opts)
        out += _block(bo, 1, struct.pack(bo + "HHI", 101, 0, 0))
        for i in range(2):
            data = _pkt(i)
            epb = struct.pack(bo + "IIIII", 0, 1, 2 + i, len(data), len(data)) + data
            out += _block(bo, 6, epb)
        raw_ip = _pkt(5)[14:]
        out += _block(bo, 6, struct.pack(bo + "IIIII", 1, 0, 7, len(raw_ip), 60) + raw_ip)
        out += _block(bo, 3, struct.pack(bo + "I", 54) + _pkt(3))
        out += _block(bo, 2, struct.pack(bo + "HHIIII", 0, 0, 0, 9, 54, 54) + _pkt(4))
        out += _block(bo, 0x0BAD, b"custom block")
    return bytes(out)


def _mutate(inp: Input, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(inp.below(6)):
        op = inp.u8()
        pos = inp.u16() % (len(buf) + 1)
        if op & 3 == 0:
            buf[pos : pos + 4] = inp.take(4)
        elif op & 3 == 1:
            buf[pos : pos + 1] = bytes((inp.u8(),))
        elif op & 3 == 2:
            buf[pos:pos] = inp.take(inp.below(16))
        else:
            del buf[pos : pos + inp.below(16) + 1]
    if inp.below(4) == 0:
        del buf[inp.u16() % (len(buf) + 1) :]
    return bytes(buf)


def one_input(data: bytes) -> None:
    """See the module docstring."""
    inp = Input(data)
    mode = inp.u8()
    opts = inp.u8()
    if mode & 1:
        base = _pcapng(mode >> 1) if mode & 2 else _classic(mode >> 2)
        raw = _mutate(inp, base)
    else:
        raw = inp.rest()
    source = _Trickle(raw, 1 + inp.u8() * 7) if opts & 1 else io.BytesIO(raw)
    strict = bool(opts & 2)
    linktypes = None if opts & 4 else frozenset({1, 101, 113, 228, 229, 276, 12, 14})
    try:
        reader = CaptureReader(source, strict=strict, linktypes=linktypes, chunk_size=4096)
    except CaptureError:
        return
    check(reader.format in ("pcap", "pcapng"), f"format {reader.format!r}")
    count = 0
    try:
        for ts, linktype, pkt, orig in reader:
            check(isinstance(ts, int) and isinstance(linktype, int), "packet tuple types")
            check(isinstance(pkt, memoryview) and pkt.readonly, "data is not a read-only view")
            check(isinstance(orig, int) and orig >= 0, f"orig_len {orig!r}")
            found = l3_offset(linktype, pkt)
            if found is not None:
                etype, off = found
                check(0 <= off <= len(pkt) and 0 <= etype <= 0xFFFF, f"l3_offset {found}")
            count += 1
            if count >= MAX_PACKETS:
                break
    except CaptureError:
        return
    finally:
        reader.close()
    if reader.truncated is not None:
        check(not strict, "truncated capture not raised in strict mode")
        check(isinstance(reader.truncated, CaptureError), "truncated is not a CaptureError")


def seeds() -> list[bytes]:
    """Unmutated valid captures of every kind, and their raw bytes."""
    out = [bytes((m, o)) for m in (1, 3, 5, 7, 9, 17, 33, 65) for o in (0, 1, 2, 4)]
    out += [b"\x00\x00" + _classic(v) for v in (0, 1, 2, 3, 4, 8, 16)]
    out += [b"\x00\x02" + _pcapng(v) for v in (0, 1)]
    return out


TARGET = Target("pcap", one_input, seeds, max_len=8192)

if __name__ == "__main__":
    main(TARGET)
