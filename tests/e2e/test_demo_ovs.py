"""``sttun demo --ovs`` end to end: every check passes and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sttun.tools.ovs_host import check_support
from tests.netns import need_root, need_tools

pytestmark = pytest.mark.netns


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def _ovs_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "sttun-ovs-"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_demo_ovs_passes_and_cleans_up() -> None:
    need_root()
    need_tools("ethtool", "ping", "iperf3")
    reason = check_support()
    if reason:
        pytest.skip(reason)
    before, ovs_before = _namespaces(), _ovs_processes()
    res = subprocess.run(
        [sys.executable, "-m", "sttun", "demo", "--ovs"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for check in ("type=stt port", "OVSDB row", "ping VM a -> VM b", "iperf3 VM a -> VM b",
                  "live change", "sttun show a", "sttun show b"):  # fmt: skip
        assert any(ln.startswith(check) and " ok " in ln for ln in res.stdout.splitlines()), check
    assert "result: PASS" in res.stdout
    assert _namespaces() <= before
    assert _ovs_processes() <= ovs_before


def test_demo_ovs_refuses_keep() -> None:
    need_root()
    if check_support():
        pytest.skip("no Open vSwitch")
    res = subprocess.run(
        [sys.executable, "-m", "sttun", "demo", "--ovs", "--keep"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "--keep is not offered with --ovs" in res.stderr
