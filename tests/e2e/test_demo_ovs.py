"""``sttun demo --ovs`` end to end: every check passes and nothing is left behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import need_ovs, need_tools

pytestmark = pytest.mark.netns


def _demo_namespaces() -> set[str]:
    """The demo's namespaces (other sessions' tests may come and go meanwhile)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.startswith("sttun-demo-")}


def _netns_id(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _orphan_ovs_processes() -> set[int]:
    """ovs-vswitchd / ovsdb-server processes in a network namespace that has no name
    any more (its namespace was deleted under it) and not in this one."""
    named = {_netns_id(str(os.getpid()))}
    for ns in Path("/run/netns").glob("*"):
        with contextlib.suppress(OSError):
            named.add(f"net:[{os.stat(ns).st_ino}]")
    out = subprocess.run(["pgrep", "-x", "ovs-vswitchd|ovsdb-server"], capture_output=True,
                         text=True).stdout  # fmt: skip
    return {int(p) for p in out.split() if _netns_id(p) not in named and _netns_id(p)}


def test_demo_ovs_passes_and_cleans_up() -> None:
    need_ovs()
    need_tools("ethtool", "ping", "iperf3")
    before, orphans = _demo_namespaces(), _orphan_ovs_processes()
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
    assert _demo_namespaces() <= before
    assert _orphan_ovs_processes() <= orphans


def test_demo_ovs_refuses_keep() -> None:
    need_ovs()
    res = subprocess.run(
        [sys.executable, "-m", "sttun", "demo", "--ovs", "--keep"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "--keep is not offered with --ovs" in res.stderr
