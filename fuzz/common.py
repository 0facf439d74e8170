"""Shared machinery of the fuzz targets: input decoding, invariants, engines.

Every target is a :class:`Target`: a name, a ``one_input(data: bytes) -> None``
function and a few seed inputs.  ``one_input`` runs the code under test on ``data``
and returns normally when the outcome is allowed: a normal result, a counted drop,
or one of the target's *typed* errors (:mod:`sttun.errors`).  Anything else — another
exception, a broken invariant (raised as :class:`FuzzFinding`) — propagates, and the
engine records the input as a crash.  A per-input time limit turns a hang into a
:class:`FuzzHang`.

Engines (see ``fuzz/run.py``):

* ``atheris`` — coverage-guided libFuzzer via the ``atheris`` package (installed
  with the ``dev`` extras); every loaded function is instrumented.
* ``random`` — no dependencies: random inputs and random mutations of the seeds
  and of earlier inputs, per-input time limit with ``SIGALRM``.

The hypothesis tests in ``tests/property/test_fuzz_*.py`` call the same
``one_input`` functions, so CI checks the same invariants.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

__all__ = [
    "FuzzFinding",
    "FuzzHang",
    "Input",
    "Target",
    "check",
    "main",
    "time_limit",
]

T = TypeVar("T")

#: Seconds one input may take before it counts as a hang.
DEFAULT_TIME_LIMIT = 10.0


class FuzzFinding(AssertionError):
    """An invariant of the code under test does not hold for this input."""


class FuzzHang(Exception):
    """One input ran longer than the per-input time limit."""


def check(cond: object, what: str) -> None:
    """Raise :class:`FuzzFinding` with ``what`` unless ``cond`` is true."""
    if not cond:
        raise FuzzFinding(what)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`FuzzHang` in the main thread if the body runs over ``seconds``."""

    def _alarm(_sig: int, _frame: FrameType | None) -> None:
        raise FuzzHang(f"input ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Input:
    """Reads structured values from fuzz bytes; returns zeros once they run out.

    A pure-Python stand-in for libFuzzer's ``FuzzedDataProvider`` so that every
    engine (atheris, random, hypothesis) decodes inputs the same way.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end)."""
        b = self.data[self.pos : self.pos + max(n, 0)]
        self.pos += len(b)
        return b

    def uint(self, nbytes: int) -> int:
        """A big-endian unsigned integer of ``nbytes`` bytes (missing bytes are 0)."""
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "big")

    def u8(self) -> int:
        """One byte."""
        return self.uint(1)

    def u16(self) -> int:
        """Two bytes."""
        return self.uint(2)

    def u32(self) -> int:
        """Four bytes."""
        return self.uint(4)

    def u64(self) -> int:
        """Eight bytes."""
        return self.uint(8)

    def boolean(self) -> bool:
        """One bit out of one byte."""
        return bool(self.u8() & 1)

    def below(self, n: int) -> int:
        """An integer in ``0 .. n - 1`` (``n`` must be at most 65536)."""
        return (self.u8() if n <= 256 else self.u16()) % n

    def pick(self, options: Sequence[T]) -> T:
        """One of ``options``."""
        return options[self.below(len(options))]

    def rest(self) -> bytes:
        """Everything not read yet."""
        return self.take(len(self))


@dataclass
class Target:
    """One fuzz target."""

    name: str
    one_input: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    #: libFuzzer ``-max_len``: longest input the engines generate.
    max_len: int = 4096
    #: seconds one input may take
    time_limit: float = DEFAULT_TIME_LIMIT
    extra_args: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------
# engines


def _write_seeds(target: Target, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in target.seeds():
        name = hashlib.sha1(seed).hexdigest()
        path = corpus / f"seed-{name}"
        if not path.exists():
            path.write_bytes(seed)


def _run_atheris(target: Target, args: list[str]) -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *args], target.one_input)
    atheris.Fuzz()


def _mutate(rng: random.Random, data: bytes, pool: Sequence[bytes], max_len: int) -> bytes:
    """One random mutation of ``data`` (byte flips, inserts, deletes, splices)."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # random byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, rng.randrange(64) + 1)))
        elif op == 3 and buf:  # delete a range
            del buf[pos : pos + rng.randrange(1, 16)]
        elif op == 4 and len(buf) >= 2:  # interesting integer
            v = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x8000, 0xFFFFFFFF, 0x7FFFFFFF))
            width = rng.choice((1, 2, 4))
            i = rng.randrange(max(len(buf) - width, 0) + 1)
            buf[i : i + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        elif op == 5 and pool:  # splice with another input
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        elif op == 6 and buf:  # duplicate a range
            j = rng.randrange(len(buf))
            buf[pos:pos] = buf[j : j + rng.randrange(1, 32)]
        else:  # truncate
            del buf[pos:]
    return bytes(buf[:max_len])


def _run_random(target: Target, seconds: float, crash_dir: Path, seed: int) -> int:
    """Random/mutational fuzzing for ``seconds``; returns the number of findings."""
    rng = random.Random(seed)
    pool = [s[: target.max_len] for s in target.seeds()] or [b""]
    start = last = time.monotonic()
    execs = findings = 0
    seen: set[str] = set()
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        r = rng.random()
        if r < 0.1:
            data = rng.randbytes(rng.randrange(target.max_len + 1))
        else:
            data = _mutate(rng, rng.choice(pool), pool, target.max_len)
        try:
            with time_limit(target.time_limit):
                target.one_input(data)
        except BaseException as exc:  # everything not allowed by the target
            if isinstance(exc, KeyboardInterrupt):
                raise
            sig = _signature(exc)
            if sig not in seen:
                seen.add(sig)
                findings += 1
                crash_dir.mkdir(parents=True, exist_ok=True)
                path = crash_dir / f"crash-{hashlib.sha1(data).hexdigest()}"
                path.write_bytes(data)
                print(f"FINDING {sig} -> {path}", flush=True)
                traceback.print_exception(exc)
        else:
            if len(pool) < 4096 and rng.random() < 0.02:
                pool.append(data)
        execs += 1
        if now - last >= 10:
            last = now
            print(f"#{execs}\tpulse\texec/s: {int(execs / (now - start))}", flush=True)
    elapsed = max(time.monotonic() - start, 1e-9)
    print(
        json.dumps({"engine": "random", "execs": execs, "seconds": elapsed, "findings": findings}),
        flush=True,
    )
    return findings


def _signature(exc: BaseException) -> str:
    """Exception type plus the innermost sttun frame: one entry per distinct bug."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = next(
        (f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "sttun" in f.filename),
        "?",
    )
    return f"{type(exc).__name__}@{where}"


def replay(target: Target, paths: Sequence[str]) -> int:
    """Run ``one_input`` on each file; print the outcome; return the number failing."""
    bad = 0
    for p in paths:
        data = Path(p).read_bytes()
        try:
            with time_limit(target.time_limit):
                target.one_input(data)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            bad += 1
            print(f"{p}: FAIL {_signature(exc)}")
            traceback.print_exception(exc)
        else:
            print(f"{p}: ok")
    return bad


def main(target: Target) -> None:
    """Command line of one target (``python -m fuzz.fuzz_<name> --help``)."""
    import argparse

    ap = argparse.ArgumentParser(description=f"fuzz target {target.name}")
    ap.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    ap.add_argument("--seconds", type=float, default=60.0, help="total run time")
    ap.add_argument("--corpus", default=f"fuzz/corpus-work/{target.name}")
    ap.add_argument("--crashes", default="fuzz/corpus-crashes/")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    ap.add_argument("--replay", nargs="*", help="run these input files once and exit")
    ns, rest = ap.parse_known_args()
    if ns.replay is not None:
        sys.exit(1 if replay(target, ns.replay) else 0)
    crash_dir = Path(ns.crashes)
    if ns.engine == "random":
        _run_random(target, ns.seconds, crash_dir / target.name, ns.seed)
        return
    corpus = Path(ns.corpus)
    _write_seeds(target, corpus)
    crash_dir.mkdir(parents=True, exist_ok=True)
    args = [
        f"-max_total_time={int(ns.seconds)}",
        f"-timeout={int(target.time_limit)}",
        f"-max_len={target.max_len}",
        f"-artifact_prefix={crash_dir}/{target.name}-",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-seed={ns.seed}",
        *target.extra_args,
        *rest,
        str(corpus),
    ]
    _run_atheris(target, args)
