"""Independent reference implementations the tests check sttun's code against.

Deliberately slow and literal (one 16-bit word at a time), so they share nothing
with the int.from_bytes-based code in :mod:`sttun.wire.checksum`.
"""

from __future__ import annotations


def naive_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 ones'-complement sum: big-endian 16-bit words, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    s = initial
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s
