"""Fuzz target ``stt_header``: the STT frame header codec and the TCP-like header reader.

Input: byte 0 picks an offset into the rest, bytes 1.. are the buffer (also tried as
a ``bytearray`` and a ``memoryview``).  The STT header: a decoded header, or
:class:`~sttun.errors.TruncatedError` exactly when fewer than 18 bytes remain, and
pack(unpack(b)) == b.  The TCP-like header is read the way the receive path reads it,
by :func:`~sttun.core.outer.parse_segment` behind an IPv4 and an IPv6 header:
``OUTER_TRUNCATED`` exactly when fewer than 20 bytes remain, otherwise the ports, SEQ,
ACK and data-offset byte as they stand.  The receive-path :class:`Decapsulator`
returns a frame or a :class:`DropReason` (``BAD_VERSION`` exactly when a frame long
enough to decode has a version other than 0), and the raising :func:`decapsulate`
only ``DecodeError``.
"""

from __future__ import annotations

import contextlib
import struct

from tests.packets import build_ipv4, build_ipv6

from fuzz.common import Target, check, main
from sttun.core.decap import Decapsulated, Decapsulator, decapsulate
from sttun.core.drops import DropReason
from sttun.core.outer import parse_segment
from sttun.errors import DecodeError, TruncatedError
from sttun.wire.ip import ip_bytes
from sttun.wire.stt import MIN_FRAME_LEN, STT_HEADER_LEN, TCP_HEADER_LEN, SttHeader

_A4, _B4 = ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2")
_A6, _B6 = ip_bytes("2001:db8:0:1::1"), ip_bytes("2001:db8:0:1::2")
_TCP_FIELDS = struct.Struct("!HHIIB")  # ports, SEQ, ACK, data-offset byte


def one_input(data: bytes) -> None:
    """Decode ``data`` with every header codec; see the module docstring."""
    if not data:
        return
    off = data[0] % 48
    buf = data[1:]
    for view in (buf, bytearray(buf), memoryview(buf)):
        _stt(view, off, buf)
    _tcp(buf[off:])
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
    # The properties never raise.
    _ = (hdr.vlan_present, hdr.vlan_id, hdr.pcp, hdr.csum_partial, hdr.csum_verified)


def _tcp(tcp: bytes) -> None:
    short = len(tcp) < TCP_HEADER_LEN
    for ip in (build_ipv4(_A4, _B4, len(tcp)), build_ipv6(_A6, _B6, len(tcp))):
        seg = parse_segment(ip + tcp)
        if isinstance(seg, DropReason):
            check(short, f"TCP-like header: {seg.value} with {len(tcp)} bytes")
            check(seg is DropReason.OUTER_TRUNCATED, f"TCP-like header: {seg.value} when short")
            continue
        check(not short, "TCP-like header read from a short segment")
        want = _TCP_FIELDS.unpack_from(tcp)
        check(seg[3:8] == want, f"TCP-like header: read {seg[3:8]}, stands {want}")
        check(seg[8:] == (len(ip), len(ip) + len(tcp)), f"TCP-like header at {seg[8:]}")


def _decap(frame: bytes) -> None:
    result = Decapsulator().decap(frame, frame[0] if frame else 0, len(frame) & 1 == 1)
    check(isinstance(result, (Decapsulated, DropReason)), f"decap returned {result!r}")
    if len(frame) >= MIN_FRAME_LEN:
        bad_version = frame[0] != 0
        check(
            (result is DropReason.BAD_VERSION) == bad_version,
            f"version {frame[0]}: decap returned {result!r}",
        )
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
