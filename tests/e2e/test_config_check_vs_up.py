"""``sttun up --check`` agrees with ``sttun up`` (issue #12), reloads refuse what both
refuse, and ``sttun show`` gives each tunnel its own peer's reassembly numbers.

* The differential test writes configuration files, valid and invalid (among them
  the two that used to pass ``--check`` and fail at start: two tunnels with the same
  remote and key on different ``dst_port``s, and ``underlay_mtu = 300``), and
  compares ``sttun up -c F --check``'s verdict with ``sttun up -c F`` really started
  in a namespace whose underlay addresses exist: started means it logged "running"
  and its control socket answers (then SIGTERM stops it, status 0); refused means
  status 2 with the same one-line error ``--check`` printed.
* A SIGHUP with either of those files logs one "reload failed" line and the daemon
  keeps serving its running configuration (it used to die on the first).
* A hub with tunnels to two peers holds partial frames from both: each tunnel shows
  the numbers of its own remote address.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sttun.core.reassembly import ENTRY_OVERHEAD
from tests.e2e import stt_craft as sc
from tests.e2e.sttun_hosts import (
    TenantSpec,
    config_pair,
    config_path,
    config_toml,
    make_star,
    ping,
    start_endpoint,
    tunnels_toml,
    wait_for,
    wait_until,
)
from tests.netns import Netns, TwoHosts, link_mac, make_two_hosts, need_root

pytestmark = pytest.mark.netns

STTUN = [sys.executable, "-m", "sttun"]
A4, B4, C4 = "198.18.0.1", "198.18.0.2", "198.18.0.3"  # C4: on-link, nobody there
A6, B6 = "2001:db8:0:1::1", "2001:db8:0:1::2"
START_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def _tunnel(name: str, local: str, remote: str, key: int, **extra: object) -> dict[str, object]:
    return {"name": name, "local_ip": local, "remote_ip": remote, "key": key, **extra}


# (case id, tunnels, the verdict both must reach: 0 started, 2 refused)
CASES: list[tuple[str, list[dict[str, object]], int]] = [
    ("one-v4", [_tunnel("c0", A4, B4, 1)], 0),
    ("one-v6", [_tunnel("c0", A6, B6, 1)], 0),
    ("several", [
        _tunnel("c0", A4, B4, 1),
        _tunnel("c1", A4, B4, 2, dst_port=7472),
        _tunnel("c2", A6, B6, 1),
        _tunnel("c3", A4, C4, 1),  # the same key to another remote
    ], 0),
    ("in-key-differs", [_tunnel("c0", A4, B4, 1), {**_tunnel("c1", A4, B4, 1), "in_key": 2}], 0),
    ("underlay-mtu-576", [_tunnel("c0", A4, B4, 1, underlay_mtu=576)], 0),
    ("underlay-mtu-576-v6", [_tunnel("c0", A6, B6, 1, underlay_mtu=576)], 0),
    # the two of issue #12: --check said "configuration OK", up failed
    ("same-key-other-port", [_tunnel("c0", A4, B4, 5), _tunnel("c1", A4, B4, 5, dst_port=7472)], 2),
    ("underlay-mtu-300", [_tunnel("c0", A4, B4, 1, underlay_mtu=300)], 2),
    # more refusals
    ("same-in-key-other-out-key",
     [_tunnel("c0", A4, B4, 5), {**_tunnel("c1", A4, B4, 5), "out_key": 6}], 2),
    ("underlay-mtu-575-v6", [_tunnel("c0", A6, B6, 1, underlay_mtu=575)], 2),
    ("duplicate-name", [_tunnel("c0", A4, B4, 1), _tunnel("c0", A4, C4, 2)], 2),
    ("bad-key", [_tunnel("c0", A4, B4, "0xzz")], 2),  # type: ignore[arg-type]
]  # fmt: skip


@dataclass
class Verdict:
    """How one command ended: its exit status and stderr."""

    status: int
    stderr: str


def _check(path: Path, sock: Path, instance: str) -> Verdict:
    """``sttun up -c F --check``."""
    argv = [*STTUN, "up", "-c", str(path), "--check"]
    res = subprocess.run(
        [*argv, "--control-socket", str(sock), "--instance", instance],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Verdict(res.returncode, res.stderr)


def _read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> tuple[bool, str]:
    """Read ``proc``'s stderr until it contains ``marker`` (True) or ends because the
    process exited (False); returns what was read.  Reads the pipe itself (no
    buffered readline, whose buffer ``select`` cannot see)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"neither {marker!r} nor an exit in {timeout}s: {seen.decode()}")
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:  # EOF: the process has exited
            return False, seen.decode()
        seen += chunk
    return True, seen.decode()


def _up(ns: Netns, path: Path, sock: Path, instance: str) -> Verdict:
    """``sttun up -c F`` in ``ns``: started (and stopped by SIGTERM) or refused."""
    proc = ns.popen(
        [*STTUN, "up", "-c", str(path), "--control-socket", str(sock), "--instance", instance],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        bufsize=0,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT shows where it hangs
    )
    try:
        try:
            running, log = _read_until(proc, f"sttun {instance} running:", START_TIMEOUT)
        except AssertionError as e:
            proc.send_signal(signal.SIGABRT)
            raise AssertionError(f"{e}\n{proc.communicate(timeout=30)[1].decode()}") from None
        if running:
            show = ns.run([*STTUN, "show", "--json", "--control-socket", str(sock)], check=False)
            assert show.returncode == 0, f"started but the control socket does not answer: {show}"
            proc.send_signal(signal.SIGTERM)
            rest = proc.communicate(timeout=30)[1].decode()
            assert proc.returncode == 0, f"stopped with {proc.returncode}: {log}{rest}"
            return Verdict(0, "")
        proc.wait(timeout=30)
        return Verdict(proc.returncode, log)  # everything: the stream has ended
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture(scope="module")
def hosts() -> Iterator[TwoHosts]:
    with make_two_hosts() as h:
        yield h


@pytest.mark.parametrize(("case", "tunnels", "verdict"), CASES, ids=[c[0] for c in CASES])
def test_check_verdict_equals_up_verdict(
    hosts: TwoHosts, tmp_path: Path, case: str, tunnels: list[dict[str, object]], verdict: int
) -> None:
    path = tmp_path / f"{case}.toml"
    path.write_text(config_toml(tunnels))
    sock = tmp_path / "ctl.sock"
    instance = "e2echeck"
    check = _check(path, sock, instance)
    up = _up(hosts.a, path, sock, instance)
    assert up.status == check.status, f"--check: {check}\nup: {up}"
    assert check.status == verdict, check
    if check.status == 2:
        # one line, the same in both, naming the file; no traceback
        assert check.stderr.startswith(f"sttun: error: {path}: ")
        assert check.stderr.count("\n") == 1, check.stderr
        assert up.stderr == check.stderr


# --------------------------------------------------------------------------- SIGHUP

T1 = TenantSpec("ten1", 0x1001, "192.0.2.1/24", "192.0.2.2/24")


def test_sighup_with_a_file_up_would_refuse_keeps_serving(tmp_path: Path) -> None:
    with config_pair(tmp_path, [T1]) as p:
        h = p.hosts
        ping(h.a, "192.0.2.2", count=1)
        running = p.config_for("a", [T1])
        clash = {**T1.table(p.local_a, p.local_b), "name": "ten2", "dst_port": 7472}
        bad_files = [
            running + tunnels_toml([clash]),  # same remote and key on another port
            running.replace("key = ", "underlay_mtu = 300\nkey = "),  # below the floor
        ]
        for n, text in enumerate(bad_files, start=1):
            config_path(p.a).write_text(text)
            p.a.proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda n=n: p.a.log_text().count("reload failed") == n,
                what=f"reload failure {n} logged",
            )
            assert p.a.proc.poll() is None, p.a.log_text()
            assert [t["name"] for t in p.a.show()["tunnels"]] == ["ten1"]
            ping(h.a, "192.0.2.2", count=2)  # still serving
        log = p.a.log_text()
        failures = [line for line in log.splitlines() if "reload failed" in line]
        assert len(failures) == 2
        assert "tunnels 'ten1' and 'ten2' have the same local address" in failures[0]
        assert "underlay_mtu: expected an integer 576..65535, got 300" in failures[1]
        assert "Traceback" not in log
        assert "configuration reloaded" not in log


# --------------------------------------------------------------------------- per peer

LONG = 300.0  # reassembly timeout: nothing expires during the test


def test_show_reassembly_is_per_peer(tmp_path: Path) -> None:
    """Partial frames from two peers: each tunnel shows its own remote's numbers,
    tunnels to the same remote the same ones, and the global line their sum."""
    with make_star(2) as s:
        tunnels = [
            _tunnel("to0", s.hub_ip(0), s.peer_ip(0), 7),
            _tunnel("to0b", s.hub_ip(0), s.peer_ip(0), 8),
            _tunnel("to1", s.hub_ip(1), s.peer_ip(1), 7),
        ]
        hub = start_endpoint(
            s.hub, [], ["to0", "to0b", "to1"], tmp_path,
            config=config_toml(tunnels, reassembly_timeout=LONG),
        )  # fmt: skip
        try:
            sent = {0: [1000, 2000], 1: [3000]}  # frame lengths whose first 100 bytes are sent
            for i, lengths in sent.items():
                with s.peers[i].entered():
                    inj = sc.Injector(s.peer_devs[i], link_mac(s.hub, s.hub_devs[i]))
                with inj:
                    for ack, length in enumerate(lengths, start=1):
                        inj.send(
                            sc.segment(s.peer_ip(i), s.hub_ip(i), bytes(100), frame_len=length,
                                       ack=ack)
                        )  # fmt: skip
            data = wait_until(
                lambda: (d := hub.show())["reassembly"]["entries"] == 3 and d,
                timeout=10,
                what="three partial frames held",
            )
            by_name = {t["name"]: t["peer_reassembly"] for t in data["tunnels"]}
            overhead = ENTRY_OVERHEAD  # charged per partial frame
            assert by_name["to0"] == {
                "peer": s.peer_ip(0), "entries": 2, "bytes": 3000 + 2 * overhead,
                "peak_bytes": 3000 + 2 * overhead, "evictions": 0, "timeouts": 0,
            }  # fmt: skip
            assert by_name["to1"] == {
                "peer": s.peer_ip(1), "entries": 1, "bytes": 3000 + overhead,
                "peak_bytes": 3000 + overhead, "evictions": 0, "timeouts": 0,
            }  # fmt: skip
            assert by_name["to0b"] == by_name["to0"]  # the same peer
            assert data["reassembly"]["bytes"] == by_name["to0"]["bytes"] + by_name["to1"]["bytes"]
            text = s.hub.run([*STTUN, "show", "--control-socket", hub.sock]).stdout
            assert f"reassembly from {s.peer_ip(0)} (tunnels to0, to0b): 2 partial frame(s)" in text
            assert f"reassembly from {s.peer_ip(1)} (tunnels to1): 1 partial frame(s)" in text
        finally:
            assert hub.stop() == 0, hub.log_text()
    assert not os.path.exists(hub.sock)
