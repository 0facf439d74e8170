"""``sttun demo`` end to end: the report, and nothing left behind.

The demo is run as a user runs it (``python -m sttun demo``, stdout not a terminal,
so plain lines).  Each test compares what exists outside the demo's namespaces
(namespaces, root-namespace links, nftables tables, demo processes) before and after.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import need_root, need_tools, non_root_prefix

pytestmark = pytest.mark.netns

DEMO = [sys.executable, "-m", "sttun", "demo"]
NS_RE = re.compile(r"sttun-demo-[0-9a-f]+-[ab]")
STATE_ROOT = Path("/run/sttun/hosts")


def _run(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _namespaces() -> set[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def _root_links() -> set[str]:
    out = _run(["ip", "-o", "link", "show"]).stdout
    return {ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ":" in ln}


def _nft_tables() -> set[str]:
    return {ln.strip() for ln in _run(["nft", "list", "tables"]).stdout.splitlines() if ln.strip()}


def _demo_pids(names: set[str]) -> list[int]:
    """Processes whose command line mentions one of the demo's namespaces."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(n[:-2] in cmd for n in names):
            pids.append(int(entry))
    return pids


class Snapshot:
    """What exists outside the demo before it runs."""

    def __init__(self) -> None:
        self.links = _root_links()
        self.tables = _nft_tables()

    def assert_clean(self, names: set[str]) -> None:
        """The demo's namespaces, processes and state are gone; root ns unchanged."""
        assert names, "the demo output names no namespaces"
        assert not names & _namespaces(), f"namespaces left: {names & _namespaces()}"
        assert _root_links() - self.links == set(), "links left in the root namespace"
        assert _nft_tables() - self.tables == set(), "nftables tables left"
        assert not _demo_pids(names), "demo processes left running"
        for n in names:
            assert not (STATE_ROOT / n[:-2]).exists(), f"state directory of {n} left"


def _need() -> None:
    need_root()
    need_tools("ip", "ping", "ethtool", "nft")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")


def test_demo_reports_and_cleans_up() -> None:
    _need()
    before = Snapshot()
    res = _run(DEMO)
    out = res.stdout
    names = set(NS_RE.findall(out))
    assert res.returncode == 0, f"{out}\n{res.stderr}"
    assert "result: PASS" in out
    report = out[out.index("=== sttun") :]
    for label in ("hosts", "tunnel", "ping", "bulk TCP", "integrity", "endpoints"):
        assert re.search(rf"^{label}\s+ok\s", report, re.M), f"{label} not ok:\n{report}"
    assert "sha256 match" in report
    assert re.search(r"^endpoint\s+tx frames", report, re.M)
    if shutil.which("tcpdump"):
        assert re.search(r"^sttun inspect\s+ok\s", report, re.M), report
    if shutil.which("tcpdump") and shutil.which("tshark"):
        line = re.search(r"^tshark\s+ok\s+(.*)$", report, re.M)
        assert line is not None, report
        assert "context id 0x5747" in line.group(1)
        assert " 0 bad" in line.group(1) and "0 RST from port 7471" in line.group(1)
    before.assert_clean(names)


def test_demo_ipv6_no_offload() -> None:
    _need()
    before = Snapshot()
    res = _run([*DEMO, "--ipv6", "--no-offload", "--mtu", "9000"])
    names = set(NS_RE.findall(res.stdout))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "IPv6 underlay, overlay MTU 9000, offloads off: PASS" in res.stdout
    assert "2001:db8:0:1::1" in res.stdout
    before.assert_clean(names)


def test_demo_keep_then_down() -> None:
    _need()
    before = Snapshot()
    res = _run([*DEMO, "--keep"])
    names = set(NS_RE.findall(res.stdout))
    try:
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        assert "sttun demo --down" in res.stdout
        assert len(names) == 2 and names <= _namespaces(), res.stdout
        for n in names:
            assert f"ip netns exec {n}" in res.stdout
            pids = _run(["ip", "netns", "pids", n]).stdout.split()
            assert pids, f"no endpoint left running in {n}"
        # the kept tunnel still carries traffic
        a = sorted(names)[0]
        ping = _run(["ip", "netns", "exec", a, "ping", "-c", "2", "-i", "0.2", "192.0.2.2"])
        assert ping.returncode == 0, ping.stdout
    finally:
        down = _run([*DEMO, "--down"])
    assert down.returncode == 0, down.stderr
    for n in names:
        assert n in down.stdout
    before.assert_clean(names)
    again = _run([*DEMO, "--down"])
    assert again.returncode == 0
    assert not any(n in again.stdout for n in names)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_sender(host: str, demo: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Wait until the bulk transfer's sender (iperf3 client or the built-in sender)
    runs in namespace ``host``; AssertionError if it never does or the demo ends."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in _run(["ip", "netns", "pids", host]).stdout.split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            iperf3_client = b"iperf3" in argv[0] and b"-c" in argv
            if iperf3_client or b"s.sendall(b)" in b" ".join(argv):
                return
        assert demo.poll() is None, "the demo ended before its bulk transfer started"
        assert time.monotonic() < deadline, f"no transfer started in {host} in {timeout:g}s"
        time.sleep(0.05)


def test_demo_interrupted_cleans_up() -> None:
    _need()
    before = Snapshot()
    # A shell without job control starts background commands with SIGINT ignored,
    # and Python keeps it ignored: give the demo the default disposition, as a
    # terminal user's Ctrl-C would find it.
    proc = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # fmt: skip
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("[4]"):  # the bulk transfer step has begun
            host_a = sorted(set(NS_RE.findall("".join(seen))))[0]
            _wait_for_sender(host_a, proc)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    text = "".join(seen) + out
    assert proc.returncode == 130, f"{text}\n{err}"
    assert "interrupted: cleaning up" in text
    before.assert_clean(set(NS_RE.findall(text)))


def test_demo_not_root_is_one_line() -> None:
    need_root()
    res = _run([*non_root_prefix(), *DEMO])
    assert res.returncode == 2, f"{res.stdout}\n{res.stderr}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "root" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_demo_down_when_nothing_is_kept() -> None:
    _need()
    res = _run([*DEMO, "--down"])
    assert res.returncode == 0
    assert "Traceback" not in res.stderr
