"""The Internet checksum (RFC 1071) at C speed from pure Python.

The ones'-complement sum of a buffer equals the buffer read as one big integer,
modulo 0xFFFF, because 2**16 ≡ 1 (mod 0xFFFF).  ``int.from_bytes`` and the
big-integer modulo run in C.  The modulo divides once per 30-bit digit, so large
buffers are read in even-sized chunks whose values are added (an even byte offset
is a multiple of 2**16, ≡ 1) and the total is folded in halves at 16-bit
boundaries before the one small modulo: a 64 KB buffer takes about 55 µs.  The buffer is
read little-endian (CPython converts that order faster) and the 16-bit result is
byte-swapped at the end: the ones'-complement sum is byte-order independent
(RFC 1071 §2(B)).  Zero padding of an odd-length buffer at its end does not change
a little-endian value, so odd lengths need no special case.

Terminology used throughout sttun:

* a *sum* is the folded 16-bit ones'-complement sum, not complemented, in
  ``0..0xFFFF`` (0 only when every byte is zero);
* a *checksum* is the complemented sum, the value stored in a header.
"""

from __future__ import annotations

from collections.abc import Iterable

Buffer = bytes | bytearray | memoryview


_CHUNK = 4096  # bytes per int.from_bytes call for large buffers (fastest measured)
_SPLIT = 1024  # above this, two half-size reads and one add beat one read
_FOLD_TO = 512  # fold a large total in halves until it has about this many bits


def little_endian_value(data: Buffer) -> int:
    """An integer congruent (mod 0xFFFF) to ``data`` read as one little-endian number.

    Its residue modulo 0xFFFF is the byte-swapped ones'-complement sum of ``data``.
    """
    n = len(data)
    if n <= _SPLIT:
        return int.from_bytes(data, "little")
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if n <= 6 * _SPLIT:
        h = (n >> 2) << 1  # even split point: the second half's weight is 2**(16k)
        return int.from_bytes(mv[:h], "little") + int.from_bytes(mv[h:], "little")
    v = 0
    fb = int.from_bytes
    for i in range(0, n, _CHUNK):
        v += fb(mv[i : i + _CHUNK], "little")
    k = v.bit_length() >> 1
    while k > _FOLD_TO:
        k &= ~15
        v = (v & ((1 << k) - 1)) + (v >> k)
        k = v.bit_length() >> 1
    return v


def ones_sum(data: Buffer, initial: int = 0) -> int:
    """Return the folded ones'-complement sum of ``data`` plus ``initial``.

    An odd-length buffer is summed as if padded with one zero byte.
    """
    return _sum_of_le(little_endian_value(data), initial)


def ones_sum_parts(parts: Iterable[Buffer], initial: int = 0) -> int:
    """Sum of the concatenation of ``parts`` without joining them.

    A part that starts at an odd position of the concatenation contributes its
    byte-swapped sum, which modulo 0xFFFF is a multiplication by 256.
    """
    total = 0
    odd = False
    for p in parts:
        n = len(p)
        if not n:
            continue
        v = little_endian_value(p)
        total += v << 8 if odd else v
        if n & 1:
            odd = not odd
    return _sum_of_le(total, initial)


def _sum_of_le(value: int, initial: int) -> int:
    """The sum of bytes whose :func:`little_endian_value` is ``value``, plus ``initial``."""
    if initial:
        value += ((initial & 0xFF) << 8) | (initial >> 8)
    s = fold(value)
    return ((s & 0xFF) << 8) | (s >> 8)


def fold(s: int) -> int:
    """Fold a non-negative integer sum of 16-bit words to a 16-bit sum.

    The same as adding the carries back until none is left, since 2**16 ≡ 1
    (mod 0xFFFF): 0 stays 0, any other sum folds to 1..0xFFFF (never to 0).
    """
    if s > 0xFFFF:
        return s % 0xFFFF or 0xFFFF
    return s


def add(a: int, b: int) -> int:
    """Ones'-complement addition of two 16-bit sums."""
    return fold(a + b)


def checksum(data: Buffer, initial: int = 0) -> int:
    """The Internet checksum of ``data`` (complemented sum), ``initial`` pre-added."""
    return ~ones_sum(data, initial) & 0xFFFF


def update16(old_checksum: int, old_word: int, new_word: int) -> int:
    """RFC 1624 eqn. 3 incremental update: HC' = ~(~HC + ~m + m').

    Returns the new checksum after one 16-bit word of the covered data changed
    from ``old_word`` to ``new_word``.
    """
    s = add(add(~old_checksum & 0xFFFF, ~old_word & 0xFFFF), new_word)
    return ~s & 0xFFFF
