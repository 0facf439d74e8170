"""Run the fuzz targets and tabulate executions, coverage and findings.

``make fuzz`` runs every target for 60 s, two at a time, with atheris when it is
installed and the built-in random/mutational engine otherwise::

    .venv/bin/python fuzz/run.py                       # all targets, 60 s each
    .venv/bin/python fuzz/run.py --seconds 1200 --targets outer,reassembly
    .venv/bin/python fuzz/run.py --table               # only print the table so far

A target that finds a crash is restarted (its corpus is kept) until its time is
used up, so one run reports every distinct finding.  Every run appends to
``fuzz/corpus-work/results.json``; the table sums all runs per target (``--reset``
starts over).  Logs go to ``fuzz/corpus-work/logs/``, crashing inputs to
``fuzz/corpus-crashes/``; replay one with
``python -m fuzz.fuzz_<target> --replay FILE``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "fuzz" / "corpus-work"
RESULTS = WORK / "results.json"
TARGETS = ("stt_header", "outer", "reassembly", "config", "pcap", "softpath")

_COV = re.compile(r"cov: (\d+) ft: (\d+)")
_EXECS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_PULSE = re.compile(r"^#(\d+)\s", re.M)
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_PY_EXC = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Finding|Hang)\b.*)$", re.M)


def _parse_atheris(log: str) -> dict[str, Any]:
    covs = _COV.findall(log)
    execs = _EXECS.findall(log)
    pulses = _PULSE.findall(log)
    n = int(execs[-1]) if execs else (int(pulses[-1]) if pulses else 0)
    artifacts = _ARTIFACT.findall(log)
    crash = "Uncaught Python exception" in log or "ERROR: libFuzzer" in log or bool(artifacts)
    what = ""
    if crash:
        # atheris prints the exception on the line after this banner; later lines
        # may hold interpreter-shutdown noise.
        m = re.search(r"=== Uncaught Python exception: ===\n(.*)", log)
        excs = _PY_EXC.findall(log)
        if m:
            what = m.group(1).strip()
        else:
            what = excs[0] if excs else ("timeout" if "timeout" in log else "crash")
    done = _DONE.findall(log)
    return {
        "execs": n,
        "fuzz_seconds": float(done[-1][1]) if done else None,
        "cov": int(covs[-1][0]) if covs else 0,
        "ft": int(covs[-1][1]) if covs else 0,
        "crash": crash,
        "what": what,
        "artifacts": artifacts,
    }


def _parse_random(log: str) -> dict[str, Any]:
    stats = {"execs": 0, "findings": 0}
    for line in log.splitlines():
        if line.startswith("{"):
            stats = json.loads(line)
    finds = re.findall(r"^FINDING (\S+) -> (\S+)", log, re.M)
    return {
        "execs": stats["execs"],
        "fuzz_seconds": stats.get("seconds"),
        "cov": 0,
        "ft": 0,
        "crash": bool(finds),
        "what": "; ".join(f[0] for f in finds),
        "artifacts": [f[1] for f in finds],
    }


def run_target(target: str, seconds: float, engine: str, nice: int) -> dict[str, Any]:
    """Fuzz one target for ``seconds`` in total, restarting after each crash."""
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    total: dict[str, Any] = {
        "target": target,
        "engine": engine,
        "seconds": 0.0,
        "fuzz_seconds": 0.0,
        "execs": 0,
        "cov": 0,
        "ft": 0,
    }
    findings: list[dict[str, Any]] = []
    restarts = 0
    while True:
        left = seconds - (time.monotonic() - start)
        if left < 5 or restarts > 50:
            break
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log_path = logs / f"{target}-{stamp}-{restarts}.log"
        cmd = [
            "nice",
            "-n",
            str(nice),
            sys.executable,
            "-m",
            f"fuzz.fuzz_{target}",
            "--engine",
            engine,
            "--seconds",
            str(int(left)),
        ]
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
        took = time.monotonic() - t0
        text = log_path.read_text(errors="replace")
        res = _parse_atheris(text) if engine == "atheris" else _parse_random(text)
        total["seconds"] += took
        total["fuzz_seconds"] += res["fuzz_seconds"] or took
        total["execs"] += res["execs"]
        total["cov"] = max(total["cov"], res["cov"])
        total["ft"] = max(total["ft"], res["ft"])
        if res["crash"]:
            findings.append(
                {"what": res["what"], "artifacts": res["artifacts"], "log": str(log_path)}
            )
            restarts += 1
            if engine == "random":
                break  # the random engine keeps going by itself
        else:
            break
    total["findings"] = findings
    total["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return total


def _load() -> list[dict[str, Any]]:
    if RESULTS.exists():
        return list(json.loads(RESULTS.read_text()))
    return []


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown table: per target, summed over runs."""
    rows = [
        "| target | engine | fuzz min | executions | exec/s | coverage (cov/ft) | findings |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for target in TARGETS:
        mine = [r for r in runs if r["target"] == target]
        if not mine:
            continue
        secs = sum(float(r.get("fuzz_seconds") or r["seconds"]) for r in mine)
        execs = sum(int(r["execs"]) for r in mine)
        cov = max(int(r["cov"]) for r in mine)
        ft = max(int(r["ft"]) for r in mine)
        engines = "+".join(sorted({str(r["engine"]) for r in mine}))
        finds = [str(f["what"]) for r in mine for f in r["findings"]]
        kinds = "; ".join(f"{n}x {w}" for w, n in Counter(finds).items())
        rows.append(
            f"| {target} | {engines} | {secs / 60:.1f} | {execs:,} | {execs / max(secs, 1):,.0f}"
            f" | {cov}/{ft} | {len(finds)}{': ' + kinds if finds else ''} |"
        )
    return "\n".join(rows)


def main() -> None:
    """Command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seconds", type=float, default=60.0, help="per target")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--nice", type=int, default=10)
    default_engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    ap.add_argument("--engine", choices=("atheris", "random"), default=default_engine)
    ap.add_argument("--table", action="store_true", help="print the table and exit")
    ap.add_argument("--reset", action="store_true", help="forget earlier runs")
    ns = ap.parse_args()
    runs = [] if ns.reset else _load()
    found = False
    if not ns.table:
        targets = [t for t in ns.targets.split(",") if t]
        for t in targets:
            if t not in TARGETS:
                ap.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
        print(f"fuzzing {', '.join(targets)}: {ns.seconds:.0f} s each, engine {ns.engine}")
        with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
            futures = [pool.submit(run_target, t, ns.seconds, ns.engine, ns.nice) for t in targets]
            for fut in futures:
                res = fut.result()
                print(
                    f"{res['target']}: {res['execs']:,} executions in {res['seconds']:.0f} s, "
                    f"{len(res['findings'])} finding(s)",
                    flush=True,
                )
                found = found or bool(res["findings"])
                runs.append(res)
                WORK.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(runs, indent=1))
    print(table(runs))
    if found:
        sys.exit(1)


if __name__ == "__main__":
    main()
