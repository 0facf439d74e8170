"""What the demo's underlay capture says: ``sttun inspect`` and tshark decode it.

* :func:`inspect_capture` — ``sttun inspect --json`` of the capture;
* :func:`tshark_capture` — tshark's view (STT context ids, frames, segment sizes,
  outer TCP checksums, RSTs from the STT port), with
  :func:`tshark_checksum_verdict` deciding each segment's checksum (the tests use it
  too, so the demo and the tests judge checksums by one rule).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sttun.errors import SetupError
from sttun.wire.stt import STT_PORT


def inspect_capture(path: Path) -> dict[str, Any] | str:
    """``sttun inspect --json`` of the capture, or a one-line reason it is unavailable."""
    try:
        import sttun.tools.inspect  # noqa: F401
    except ImportError:
        return "sttun inspect is not available in this installation"
    res = subprocess.run(
        [sys.executable, "-m", "sttun", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        err = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        return f"sttun inspect failed: {err}"
    return data


def _tshark(path: Path, prefs: list[str], fields: list[str]) -> list[list[str]]:
    argv = ["tshark", "-n", "-r", str(path)]
    for p in prefs:
        argv += ["-o", p]
    argv += ["-T", "fields", "-E", "separator=\t"]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise SetupError(f"tshark failed: {res.stderr.strip().splitlines()[-1:]}")
    return [ln.split("\t") for ln in res.stdout.splitlines() if ln.strip()]


@dataclass
class TsharkView:
    """What tshark makes of the capture."""

    packets: int
    contexts: Counter[str]
    frames: int
    sizes: list[int]
    checksums: Counter[str]
    rsts: int


def tshark_capture(path: Path) -> TsharkView:
    """Decode the capture twice with tshark: STT dissection on, and TCP checksum checks.

    With ``ip.try_heuristic_first`` (``ipv6.`` for an IPv6 underlay) tshark dissects
    the segments as STT (context id, frame length, reassembly); the ``tcp.*`` fields
    then describe the *inner* TCP, so
    the outer TCP-like checksums are checked in a second pass with plain TCP
    dissection and ``tcp.check_checksum``.
    """
    rows = _tshark(
        path,
        ["ip.try_heuristic_first:TRUE", "ipv6.try_heuristic_first:TRUE"],
        ["frame.len", "stt.context_id", "stt.pkt_len"],
    )
    contexts: Counter[str] = Counter()
    frames = 0
    sizes = []
    for r in rows:
        r += [""] * (3 - len(r))
        sizes.append(int(r[0]))
        if r[1]:
            for ctx in r[1].split(","):
                contexts[f"{int(ctx, 16):#x}"] += 1
            frames += 1
    rows = _tshark(
        path,
        ["tcp.check_checksum:TRUE"],
        [*TSHARK_CHECKSUM_FIELDS, "tcp.srcport", "tcp.flags.reset"],
    )
    checksums: Counter[str] = Counter()
    rsts = 0
    for r in rows:
        r += [""] * (5 - len(r))
        first = [x.split(",")[0] for x in r]
        checksums[tshark_checksum_verdict(*first[:3])] += 1
        if first[3] == str(STT_PORT) and first[4] in ("1", "True"):
            rsts += 1
    return TsharkView(len(rows), contexts, frames, sizes, checksums, rsts)


#: The tshark fields :func:`tshark_checksum_verdict` reads, in its argument order.
TSHARK_CHECKSUM_FIELDS = ("tcp.checksum.status", "tcp.checksum", "tcp.checksum_calculated")


def tshark_checksum_verdict(status: str, field: str, calculated: str) -> str:
    """``good``, ``bad`` or ``unverified`` for one segment, from tshark's fields.

    A segment whose checksum should be 0x0000 may carry 0xffff: the same number in
    ones' complement, and what Linux writes when it completes a checksum in software
    (``skb_checksum_help``: a sum folding to 0 is stored as ``CSUM_MANGLED_0``),
    about one segment in 65536.  Receivers accept both; tshark calls 0xffff bad
    (RFC 1624).  That one case counts as good here, every other mismatch as bad.
    """
    if status == "1":
        return "good"
    if status == "0":
        mangled_zero = field.lower() == "0xffff" and calculated.lower() == "0x0000"
        return "good" if mangled_zero else "bad"
    return "unverified"
