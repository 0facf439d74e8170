"""Helpers shared by the benchmarks: the machine, medians, ratios, CPU time, results files.

Every benchmark writes one JSON document with :func:`write_results`, which adds the
machine description (:func:`machine_info`) and the date, so a number is never
separated from where and when it was measured.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' if absent)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, core count, kernel, Python and sttun versions."""
    try:
        from sttun import __version__ as sttun_version
    except ImportError:  # pragma: no cover - run from a checkout without the package
        sttun_version = "unknown"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "sttun": sttun_version,
    }


def now_iso() -> str:
    """The current UTC time, ISO 8601, seconds precision."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None if there are none."""
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing or ``base`` is zero."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def system_cpu() -> tuple[float, float]:
    """(busy, softirq) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / _CLK_TCK, softirq / _CLK_TCK


def process_cpu(pid: int) -> float:
    """utime + stime (seconds) of process ``pid``, all threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def write_results(path: Path, benchmark: str, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``data`` with the benchmark name, the date and the machine to ``path``."""
    doc = {"benchmark": benchmark, "date": now_iso(), "machine": machine_info(), **data}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table; '-' for None."""
    return "-" if value is None else f"{value:.{digits}f}"
