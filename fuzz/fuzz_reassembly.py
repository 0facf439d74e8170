"""Fuzz target ``reassembly``: segment sequences through ``Endpoint.receive``.

The input is a program: byte 0 picks the reassembly limits (tight or default), then
each operation reads a few bytes:

* ``segment`` — source (a tunnel peer or a stranger), frame id (a few shared ids so
  segments meet), a slice ``[off, off + n)`` of that frame (often whole, often
  overlapping earlier ones, sometimes past the end, empty, or with a flipped byte),
  sometimes a different frame length; TOS/ECN, a right or wrong checksum,
  ``csum_ok``.  Each frame's bytes come from a template: a valid STT header with
  fuzz-chosen flags, L4 offset, MSS, TCI and a context id (a tunnel's or not),
  followed by an inner IPv4/TCP packet, so completed frames reach decapsulation;
* ``time`` — advance the clock (small steps, or past the timeout), sometimes back;
* ``timeout`` — ``handle_timeout(now)``.

Valid outer packets are built around the chosen fields, so the fuzzer spends its
time in reassembly and decap, not in the outer checks.

Invariants after every step: no exception; no silent loss (a ``None`` result is a
counted drop or stored bytes); delivered frames go to the tunnel of their remote,
local address and context id; ``bytes_held`` never above ``high_water``, no source
above its budget, at most ``max_frames`` partial frames, nothing buffered for a
source no tunnel names.  At the end, ``handle_timeout(far future)`` leaves 0 entries
and 0 bytes.
"""

from __future__ import annotations

import struct

from fuzz.common import Input, Target, check, main
from fuzz.netutil import ADDRS, KEYS, build_packet, check_limits, make_endpoint, receive_checked
from sttun.wire.stt import SttHeader

MAX_OPS = 400
MAX_SEGMENT = 9000
_LENGTHS = (32, 33, 64, 100, 1500, 2000, 9000, 65535)


def _template(inp: Input, length: int) -> bytes:
    """``length`` bytes of an STT frame: header (fuzz fields) + inner IPv4/TCP."""
    tci = inp.u16() if inp.below(4) == 0 else 0
    hdr = SttHeader(
        version=0 if inp.below(16) else 1,
        flags=inp.pick((0, 0x01, 0x0E, 0x0A, 0x06, 0x02, inp.u8())),
        l4_offset=inp.pick((34, 54, 38, 0, 14, inp.u8())),
        mss=inp.pick((0, 1448, 1, inp.u16())),
        vlan_tci=tci,
        context_id=inp.pick(KEYS),
    ).pack()
    ecn = inp.below(4)
    inner_len = max(length - len(hdr), 0)
    ip_total = max(inner_len - 14, 0) & 0xFFFF
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, ecn, ip_total, 1, 0x4000, 64, 6, 0, b"\xc0\0\2\1", b"\xc0\0\2\2"
    )
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, 0x50, 0x18, 512, 0, 0)
    body = bytes(12) + b"\x08\x00" + ip + tcp
    fill = bytes((i * 37 + length) & 0xFF for i in range(256))
    frame = (hdr + body + fill * (length // 256 + 1))[:length]
    return frame


def one_input(data: bytes) -> None:
    """See the module docstring."""
    inp = Input(data)
    ep = make_endpoint(small=not inp.u8() & 1)
    now = 100.0
    frames: dict[tuple[int, int], bytes] = {}  # (source index, id) -> template
    for _ in range(MAX_OPS):
        if not len(inp):
            break
        op = inp.u8()
        kind = op & 7
        if kind <= 4:
            _segment(ep, inp, frames, now, op)
        elif kind == 5:
            step = inp.u8()
            if step == 255:
                now -= 5.0  # the clock may step back; the reassembler must cope
            else:
                now += step * (0.25 if op & 8 else 1.0)
        elif kind == 6:
            ep.handle_timeout(now)
            check_limits(ep)
        else:
            frames.clear()  # new templates for the same ids
    ep.handle_timeout(now + 1e9)
    r = ep.reassembler
    check(r.entries == 0, f"{r.entries} partial frames left after the final timeout")
    check(r.bytes_held == 0, f"{r.bytes_held} bytes held after the final timeout")
    check(not r.bytes_by_source, f"per-source bytes left: {r.bytes_by_source}")


def _segment(
    ep: object, inp: Input, frames: dict[tuple[int, int], bytes], now: float, op: int
) -> None:
    si = inp.below(len(ADDRS))
    src, dst = ADDRS[si]
    fid = inp.below(4) if op & 0x80 else inp.u32()
    key = (si, fid)
    frame = frames.get(key)
    if frame is None:
        sel = inp.u8()
        length = _LENGTHS[sel & 7] if sel < 200 else max(inp.u16(), 1)
        frame = frames[key] = _template(inp, length)
    length = len(frame)
    how = inp.u8()
    if how < 64:  # whole frame
        off, n = 0, length
    else:
        off = inp.u16() % length
        n = 1 + inp.u16() % min(length - off, MAX_SEGMENT)
    n = min(n, 65535 - 60)  # an IPv6 header + TCP-like header still fit 64 KB
    payload = bytearray(frame[off : off + n])
    seq_len = length
    if how & 0x07 == 0x07 and payload:  # corrupt one byte: an overlap conflict
        payload[inp.u16() % len(payload)] ^= 0x5A
    if how & 0x18 == 0x18:  # lie about L
        seq_len = inp.u16()
    if how & 0xE0 == 0xE0:  # empty or past the end
        payload = payload[:0] if op & 0x40 else payload + b"x"
    tos = inp.pick((0, 2, 3, 1, 0xB8, 0xBB))
    csum_xor = 0 if inp.below(16) else 1
    csum_ok = bool(op & 0x20)
    pkt = build_packet(
        src,
        dst,
        bytes(payload),
        seq=(seq_len << 16) | off,
        ack=fid,
        dport=7472 if si == 1 else 7471,
        tos=tos,
        csum_xor=csum_xor,
    )
    receive_checked(ep, pkt, now, csum_ok)  # type: ignore[arg-type]


def seeds() -> list[bytes]:
    """Whole frames, a frame in two halves, an overlap, timeouts."""
    whole = b"\x80\x00\x00\x00\x00" + b"\x00" * 12
    halves = b"\x81" + b"\x80\x00\x02\x04" + bytes(10) + b"\x40\x00\x00\x00\xff"
    halves += b"\x80\x00\x02\x40\x00\xff\x00\x00" + bytes(4)
    return [
        b"\x00" + whole * 4,
        b"\x01" + whole * 4,
        halves,
        halves + b"\x05\xff\x05\xff\x06",
        b"\x00" + b"\x80\x00\x00\x06\x80\x00\x00\x00" * 40 + b"\x05\xff" * 40 + b"\x06",
    ]


TARGET = Target("reassembly", one_input, seeds, max_len=4096)

if __name__ == "__main__":
    main(TARGET)
