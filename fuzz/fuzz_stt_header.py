"""Fuzz target ``stt_header``: the STT frame header and the TCP-like header codecs.

Input: byte 0 picks an offset into the rest, bytes 1.. are the buffer (also tried as
a ``bytearray`` and a ``memoryview``).  Allowed outcome: a decoded header, or
:class:`~sttun.errors.TruncatedError` exactly when fewer than 18 / 20 bytes remain.
Invariants: pack(unpack(b)) == b; ``check_version`` raises ``DecodeError`` iff the
version is not 0; the receive-path :class:`Decapsulator` returns a frame or a
:class:`DropReason` and the raising :func:`decapsulate` only ``DecodeError``.
"""

from __future__ import annotations

import contextlib

from fuzz.common import Target, check, main
from sttun.core.decap import Decapsulated, Decapsulator, decapsulate
from sttun.core.drops import DropReason
from sttun.errors import DecodeError, TruncatedError
from sttun.wire.stt import (
    STT_HEADER_LEN,
    TCP_HEADER_LEN,
    SttHeader,
    TcpLikeHeader,
    check_version,
)


def one_input(data: bytes) -> None:
    """Decode ``data`` with every header codec; see the module docstring."""
    if not data:
        return
    off = data[0] % 48
    buf = data[1:]
    for view in (buf, bytearray(buf), memoryview(buf)):
        _stt(view, off, buf)
        _tcp(view, off, buf)
    _decap(buf)


def _stt(view: bytes | bytearray | memoryview, off: int, raw: bytes) -> None:
    short = len(raw) - off < STT_HEADER_LEN
    try:
        hdr = SttHeader.unpack(view, off)
    except TruncatedError:
        check(short, f"STT header: TruncatedError with {len(raw) - off} bytes")
        return
    check(not short, "STT header decoded from a short buffer")
    check(hdr.pack() == raw[off : off + STT_HEADER_LEN], "STT header: pack(unpack(b)) != b")
    try:
        check_version(hdr.version)
    except DecodeError:
        check(hdr.version != 0, "check_version rejected version 0")
    else:
        check(hdr.version == 0, f"check_version accepted version {hdr.version}")
    # The properties never raise.
    _ = (hdr.vlan_present, hdr.vlan_id, hdr.pcp, hdr.csum_partial, hdr.csum_verified)


def _tcp(view: bytes | bytearray | memoryview, off: int, raw: bytes) -> None:
    short = len(raw) - off < TCP_HEADER_LEN
    try:
        tcp = TcpLikeHeader.unpack(view, off)
    except TruncatedError:
        check(short, f"TCP-like header: TruncatedError with {len(raw) - off} bytes")
        return
    check(not short, "TCP-like header decoded from a short buffer")
    want = bytearray(raw[off : off + TCP_HEADER_LEN])
    want[12] &= 0xF0  # the 4 reserved bits after the data offset are not kept
    check(tcp.pack() == want, "TCP-like: pack(unpack(b)) != b")
    check(tcp.seq == int.from_bytes(raw[off + 4 : off + 8], "big"), "TCP-like: seq")


def _decap(frame: bytes) -> None:
    result = Decapsulator().decap(frame, frame[0] if frame else 0, len(frame) & 1 == 1)
    check(isinstance(result, (Decapsulated, DropReason)), f"decap returned {result!r}")
    with contextlib.suppress(DecodeError):
        decapsulate(frame)


def seeds() -> list[bytes]:
    """A valid header pair, version 1, a short buffer."""
    hdr = SttHeader.build(0x1234, flags=0x0E, l4_offset=34, mss=1448, vlan_id=7, pcp=3).pack()
    eth = bytes(12) + b"\x08\x00" + bytes(40)
    return [b"\0" + hdr + eth, b"\0\x01" + hdr[1:] + eth, b"\x05" + bytes(30), b"\0"]


TARGET = Target("stt_header", one_input, seeds, max_len=256)

if __name__ == "__main__":
    main(TARGET)
