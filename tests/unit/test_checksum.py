"""sttun.wire.checksum against a naive byte-loop reference (RFC 1071, RFC 1624)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.reference import naive_sum

from sttun.wire.checksum import (
    add,
    checksum,
    fold,
    ones_sum,
    ones_sum_parts,
    update16,
)


def naive_checksum(data: bytes, initial: int = 0) -> int:
    return ~naive_sum(data, initial) & 0xFFFF


def normal(s: int) -> int:
    """Map ones'-complement zero to one representation: 0xFFFF and 0 are both zero."""
    return 0 if s == 0xFFFF else s


words16 = st.integers(0, 0xFFFF)


@given(st.binary(max_size=3000), words16)
def test_ones_sum_matches_naive(data: bytes, initial: int) -> None:
    got = ones_sum(data, initial)
    assert 0 <= got <= 0xFFFF
    assert normal(got) == normal(naive_sum(data, initial))


@given(st.binary(max_size=3000))
def test_ones_sum_exact_representation(data: bytes) -> None:
    # The module promises 0 only for an all-zero buffer, otherwise the end-around
    # carry result, which is what the naive loop computes for a non-zero sum.
    got = ones_sum(data)
    if not any(data):
        assert got == 0
    else:
        assert got == (naive_sum(data) or 0xFFFF)


@given(st.binary(max_size=2000), words16)
def test_checksum_and_memoryview_and_bytearray(data: bytes, initial: int) -> None:
    want = naive_checksum(data, initial)
    for buf in (data, bytearray(data), memoryview(data)):
        assert normal(~checksum(buf, initial) & 0xFFFF) == normal(~want & 0xFFFF)


@given(st.lists(st.binary(max_size=300), max_size=8), words16)
def test_ones_sum_parts_any_split(parts: list[bytes], initial: int) -> None:
    joined = b"".join(parts)
    assert normal(ones_sum_parts(parts, initial)) == normal(naive_sum(joined, initial))
    assert normal(ones_sum_parts([memoryview(p) for p in parts], initial)) == normal(
        ones_sum(joined, initial)
    )


@given(st.binary(min_size=1, max_size=2000), st.data())
def test_odd_split_points(data: bytes, d: st.DataObject) -> None:
    cuts = sorted(d.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    parts, prev = [], 0
    for c in [*cuts, len(data)]:
        parts.append(data[prev:c])
        prev = c
    assert normal(ones_sum_parts(parts)) == normal(naive_sum(data))


@pytest.mark.parametrize("n", [1, 3, 5, 7, 63, 65, 1459, 65535])
def test_odd_lengths(n: int) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(n))
    assert normal(ones_sum(data)) == normal(naive_sum(data))
    # an odd buffer is summed as if padded with one zero byte
    assert ones_sum(data) == ones_sum(data + b"\0")


def test_all_ones_and_zero() -> None:
    assert ones_sum(b"") == 0
    assert ones_sum(bytes(100)) == 0
    assert ones_sum(b"\xff\xff" * 4) == 0xFFFF
    assert ones_sum(b"\xff\xff\x00\x01") == 0x0001
    assert checksum(b"") == 0xFFFF


def test_rfc1071_example() -> None:
    # RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_sum(data) == 0xDDF2
    assert checksum(data) == 0x220D


def test_rfc1624_eqn3_example() -> None:
    # RFC 1624 §4: m = 0x5555 -> m' = 0x3285, sum of the rest 0xCD7A, HC = 0xDD2F.
    # Eqn. 3 must give 0x0000 (recomputation also gives 0x0000; eqn. 2 gives 0xFFFF).
    assert update16(0xDD2F, 0x5555, 0x3285) == 0x0000
    rest = 0xCD7A
    assert ~add(rest, 0x5555) & 0xFFFF == 0xDD2F
    assert ~add(rest, 0x3285) & 0xFFFF == 0x0000


@given(st.lists(words16, min_size=2, max_size=40).map(lambda w: w if len(w) % 2 == 0 else w[:-1]))
def test_update16_matches_recompute(words: list[int]) -> None:
    data = b"".join(w.to_bytes(2, "big") for w in words)
    old_csum = naive_checksum(data)
    new_word = (words[0] * 31 + 7) & 0xFFFF
    new_data = new_word.to_bytes(2, "big") + data[2:]
    got = update16(old_csum, words[0], new_word)
    assert normal(~got & 0xFFFF) == normal(naive_sum(new_data))


@given(words16, words16)
def test_add(a: int, b: int) -> None:
    assert normal(add(a, b)) == normal(naive_sum(a.to_bytes(2, "big") + b.to_bytes(2, "big")))


@given(st.lists(words16, max_size=300))
def test_fold_is_the_end_around_carry_sum(words: list[int]) -> None:
    """fold(plain sum of words) is the carry-folded sum; 0 only for no bits set."""
    s = fold(sum(words))
    assert 0 <= s <= 0xFFFF and (s == 0) == (not any(words))
    assert s == naive_sum(b"".join(w.to_bytes(2, "big") for w in words))


# Sizes around the strategy changes of ones_sum (one read / two halves / 4 KB chunks
# folded in halves), odd and even, random bytes and the extremes.
_BOUNDARY_SIZES = [1023, 1024, 1025, 1026, 6143, 6144, 6145, 6146, 8191, 8192, 8193,
                   65535, 65536, 65538]  # fmt: skip


@pytest.mark.parametrize("n", _BOUNDARY_SIZES)
def test_ones_sum_large_buffers_match_naive(n: int) -> None:
    rnd = random.Random(n)
    for data in (rnd.randbytes(n), b"\xff" * n, bytes(n - 1) + b"\x01"):
        assert normal(ones_sum(data)) == normal(naive_sum(data))
        assert normal(ones_sum(memoryview(data), 0x1234)) == normal(naive_sum(data, 0x1234))
        half = n // 2 + 1  # an odd cut: the second part starts at an odd offset
        assert normal(ones_sum_parts([data[:half], data[half:]])) == normal(naive_sum(data))
    assert ones_sum(bytes(n)) == 0
