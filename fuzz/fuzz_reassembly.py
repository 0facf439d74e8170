"""Fuzz target ``reassembly``: segment sequences through ``Endpoint.receive``.

The input is a program: byte 0 picks the reassembly limits (tight or default), then
each operation reads a few bytes:

* ``segment`` — source (a tunnel peer or a stranger), frame id (a few shared ids so
  segments meet), a slice ``[off, off + n)`` of that frame (often whole, often
  overlapping earlier ones, sometimes past the end, empty, or with a flipped byte),
  sometimes a different frame length; TOS/ECN, a right or wrong checksum,
  ``csum_ok``; received as it is, or (like the daemon) into a receive buffer offered
  as ``room``, which is scribbled over afterwards unless the result was
  ``Pending.KEPT`` (then the next one goes into a new buffer).  Each frame's bytes
  come from a template: a valid STT header with fuzz-chosen flags, L4 offset, MSS,
  TCI and a context id (a tunnel's or not), followed by an inner IPv4/TCP packet,
  so completed frames reach decapsulation;
* ``time`` — advance the clock (small steps, or past the timeout), sometimes back;
* ``timeout`` — ``handle_timeout(now)``.

Valid outer packets are built around the chosen fields, so the fuzzer spends its
time in reassembly and decap, not in the outer checks.

Invariants after every step: no exception; every result is read (see
``fuzz.netutil.receive_checked``): a returned drop reason is the one counter that
went up, a pending segment is in its partial frame, a delivered frame goes to the
tunnel of its remote, local address and context id and is made of the bytes sent —
the frame's template itself when every segment sent for its id carried template
bytes —, a receive buffer is held exactly when ``KEPT`` said so and comes back only
with the frame built in it; ``bytes_held`` never above ``high_water``, no source
above its budget, at most ``max_frames`` partial frames, nothing buffered for a
source no tunnel names.  At the end, ``handle_timeout(far future)`` leaves 0 entries
and 0 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fuzz.common import Input, Target, check, main
from fuzz.netutil import (
    ADDRS,
    KEYS,
    RX_HEAD,
    RX_SIZE,
    build_packet,
    check_decapsulated,
    check_limits,
    make_endpoint,
    receive_checked,
)
from sttun.core.endpoint import Delivered, Endpoint
from sttun.core.reassembly import Pending
from sttun.wire.stt import SttHeader

MAX_OPS = 400
MAX_SEGMENT = 9000
_LENGTHS = (32, 33, 64, 100, 1500, 2000, 9000, 65535)
_SCRIBBLE = b"\xa5" * RX_SIZE


@dataclass
class _Run:
    """One program's state."""

    ep: Endpoint
    #: (source index, id) -> the frame's template
    frames: dict[tuple[int, int], bytes] = field(default_factory=dict)
    #: ids a segment not of the current template was sent for (corrupted, another L,
    #: an earlier template): their frames need not be the template
    mixed: set[tuple[int, int]] = field(default_factory=set)
    #: the receive buffer in use, and those the reassembler said it kept
    rx: bytearray = field(default_factory=lambda: bytearray(RX_SIZE))
    held: list[bytearray] = field(default_factory=list)


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
    run = _Run(make_endpoint(small=not inp.u8() & 1))
    ep = run.ep
    now = 100.0
    for _ in range(MAX_OPS):
        if not len(inp):
            break
        op = inp.u8()
        kind = op & 7
        if kind <= 4:
            _segment(run, inp, now, op)
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
            run.mixed.update(run.frames)
            run.frames.clear()  # new templates for the same ids
    ep.handle_timeout(now + 1e9)
    r = ep.reassembler
    check(r.entries == 0, f"{r.entries} partial frames left after the final timeout")
    check(r.bytes_held == 0, f"{r.bytes_held} bytes held after the final timeout")
    check(not r.bytes_by_source, f"per-source bytes left: {r.bytes_by_source}")


def _segment(run: _Run, inp: Input, now: float, op: int) -> None:
    frames = run.frames
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
        run.mixed.add(key)
    if how & 0x18 == 0x18:  # lie about L
        seq_len = inp.u16()
        if seq_len != length:
            run.mixed.add(key)
    if how & 0xE0 == 0xE0:  # empty or past the end
        if op & 0x40:
            payload = payload[:0]
        else:
            payload += b"x"  # past the end, or a byte the template does not have
            run.mixed.add(key)
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
    rx = run.rx
    if op & 0x10:  # into the receive buffer, offered as room
        rx[RX_HEAD : RX_HEAD + len(pkt)] = pkt
        view = memoryview(rx)[RX_HEAD : RX_HEAD + len(pkt)]
        res = receive_checked(run.ep, view, now, csum_ok, room=(rx, RX_HEAD), held=run.held)
    else:
        res = receive_checked(run.ep, pkt, now, csum_ok, held=run.held)
    if isinstance(res, Delivered) and key not in run.mixed:
        # every segment sent for this id carried the template's bytes
        check(seq_len == length, "a frame of another length from template segments")
        check_decapsulated(res.frame, frame)
    if res is Pending.KEPT:
        run.rx = bytearray(RX_SIZE)  # rx is the reassembler's now
    elif op & 0x10:
        rx[:] = _SCRIBBLE  # the next packet overwrites it


def _op_segment(
    fid: int,
    off: int = 0,
    n: int | None = None,
    *,
    new: bool = False,
    room: bool = False,
    length_sel: int = 4,
) -> bytes:
    """The program bytes of one ``segment`` operation, as :func:`_segment` reads them:
    source 0 (a tunnel peer), frame id ``fid`` (0..3), ``[off, off + n)`` of the frame
    (the whole frame if ``n`` is None), TOS 0, right checksum, into a receive buffer if
    ``room``.  ``new``: the id's first segment, which also picks its template
    (``_LENGTHS[length_sel]`` bytes, flags 0, context id of tunnel a0)."""
    out = bytes((0x80 | (0x10 if room else 0), 0, fid))
    if new:
        # length; no TCI; version 0; flags (spare, pick 0); L4 offset (spare, pick 0);
        # MSS (spare u16, pick 0); context id KEYS[0]; inner ECN 0
        out += bytes((length_sel, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    if n is None:
        out += b"\x00"  # the whole frame
    else:
        out += b"\x40" + off.to_bytes(2, "big") + (n - 1).to_bytes(2, "big")  # a slice
    return out + b"\x00\x01"  # TOS 0, checksum right


def seeds() -> list[bytes]:
    """Whole frames, frames in pieces (offered as room or not, first piece first or
    last), an overlap, timeouts."""
    whole = b"".join(_op_segment(fid, new=True, length_sel=fid) for fid in range(4))
    # 1500-byte frames: the first piece kept in its buffer, then the tail
    kept = _op_segment(1, 0, 1000, new=True, room=True) + _op_segment(1, 1000, 500)
    # the tail first, then the first piece, which completes the frame in its buffer
    tail_first = _op_segment(2, 1000, 500, new=True) + _op_segment(2, 0, 1000, room=True)
    # the tail, the first piece (kept, a hole left), the piece in between
    hole = (
        _op_segment(3, 1200, 300, new=True)
        + _op_segment(3, 0, 1000, room=True)
        + _op_segment(3, 1000, 200, room=True)
    )
    halves = _op_segment(0, 0, 750, new=True) + _op_segment(0, 750, 750)
    return [
        b"\x00" + whole,
        b"\x01" + whole + b"".join(_op_segment(fid) for fid in range(4)),  # late copies
        b"\x01" + halves,
        b"\x00" + halves + b"\x05\xff\x05\xff\x06",
        b"\x01" + kept,
        b"\x01" + tail_first,
        b"\x00" + hole + kept,
        b"\x00" + b"\x80\x00\x00\x06\x80\x00\x00\x00" * 40 + b"\x05\xff" * 40 + b"\x06",
    ]


TARGET = Target("reassembly", one_input, seeds, max_len=4096)

if __name__ == "__main__":
    main(TARGET)
