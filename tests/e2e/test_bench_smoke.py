"""``bench/throughput.py --quick`` runs and writes a complete results file.

A smoke test only: it asserts the shape of the JSON (every mode and variant, every
metric key, the machine), never a timing value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import need_root, need_tools

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "throughput.py"
MODES = {"veth", "vxlan", "sttun", "sttun-fast", "sttun-soft", "null-tunnel"}
VARIANTS = {"tso", "wire", "routed"}


def test_throughput_quick_writes_every_key(tmp_path: Path) -> None:
    need_root()
    need_tools("iperf3", "ping", "ethtool", "ip")
    out = tmp_path / "quick.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    print(res.stdout)  # the table: worth seeing with -s
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "throughput" and doc["quick"] is True
    for key in ("cpu", "cores", "kernel", "python", "sttun"):
        assert key in doc["machine"], key
    assert doc["date"]
    metrics = set(doc["metrics"])
    assert {"tcp1_gbps", "tcp4_gbps", "udp64_pps", "ping_p50_ms", "ping_p99_ms"} <= metrics
    assert "sttun_cpu_s_per_gb" in metrics
    assert set(doc["medians"]) == VARIANTS
    assert set(doc["runs"]) == VARIANTS
    for base in ("vs_vxlan", "vs_veth"):
        assert set(doc["ratios"][base]) == VARIANTS
    for variant in VARIANTS:
        assert set(doc["medians"][variant]) == MODES
        for mode in MODES:
            assert set(doc["medians"][variant][mode]) == metrics
            runs = doc["runs"][variant][mode]
            assert len(runs) == 1
            assert "error" not in runs[0], runs[0]
            for base in ("vs_vxlan", "vs_veth"):
                assert mode in doc["ratios"][base][variant]
    # sttun-fast's receiver took frames on the fast path, plain sttun's did not
    assert doc["runs"]["tso"]["sttun-fast"][0]["rx_frames_fastpath"] > 0
    assert doc["runs"]["tso"]["sttun"][0]["rx_frames_fastpath"] == 0
    assert out.with_suffix(".png").exists() or "matplotlib missing" in res.stdout
    assert "vxlan" in res.stdout and "sttun-soft" in res.stdout  # the table
    ours = {run["hosts"] for v in VARIANTS for m in MODES for run in doc["runs"][v][m]}
    assert len(ours) == len(VARIANTS) * len(MODES)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = {ln.split()[0][:-2] for ln in after.splitlines() if ln.strip()} & ours
    assert not left, f"benchmark namespaces left: {left}"
