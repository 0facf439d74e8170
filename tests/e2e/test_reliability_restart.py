"""Restart and hardening (issue #7): kill -9 mid-transfer, nftables required.

* ``kill -9`` of an endpoint whose TAP is persistent and enslaved to a bridge, in the
  middle of a TCP transfer, then ``sttun up`` again: the TAP kept its bridge (and the
  bridge its address), the TCP connection completes intact, and there is exactly one
  sttun nftables table afterwards.
* Without a working ``nft`` the daemon refuses to start (and touches nothing) unless
  ``--no-firewall`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sttun.tools.topology import Host
from tests.e2e.impair import OVERLAY_A, OVERLAY_B
from tests.e2e.sttun_hosts import (
    Endpoint,
    config_toml,
    ping,
    start_endpoint,
    tcp_transfer,
    wait_until,
)
from tests.netns import make_two_hosts, need_root, need_tools

pytestmark = pytest.mark.netns

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def _master(ns: Host, dev: str) -> str | None:
    info = json.loads(ns.run(["ip", "-j", "-d", "link", "show", dev]).stdout)[0]
    master: str | None = info.get("master")
    return master


def _sttun_tables(ns: Host) -> list[str]:
    out = ns.run(["nft", "list", "tables"]).stdout
    return [ln.strip() for ln in out.splitlines() if "sttun" in ln]


def test_kill9_restart_mid_transfer(tmp_path: Path) -> None:
    """B is killed with SIGKILL during a 30 MiB transfer A -> B and started again."""
    need_tools("nft")
    with make_two_hosts() as h:
        br = "brs" + h.dev_b[2:]
        h.b.run(["ip", "link", "add", br, "type", "bridge", "stp_state", "0"])
        h.b.run(["ip", "link", "set", br, "up"])
        h.b.run(["ip", "addr", "add", f"{OVERLAY_B}/24", "dev", br])
        t = {"name": "stt0", "key": 9, "persist": True}
        cfg_a = config_toml([{**t, "local_ip": h.ip_a, "remote_ip": h.ip_b}])
        cfg_b = config_toml([{**t, "local_ip": h.ip_b, "remote_ip": h.ip_a, "bridge": br}])
        a = start_endpoint(h.a, [], ["stt0"], tmp_path, config=cfg_a)
        b: Endpoint | None = None
        try:
            b = start_endpoint(h.b, [], ["stt0"], tmp_path, config=cfg_b)
            h.a.run(["ip", "addr", "add", f"{OVERLAY_A}/24", "dev", "stt0"])
            ping(h.a, OVERLAY_B)
            assert _master(h.b, "stt0") == br

            errors: list[BaseException] = []

            def transfer() -> None:
                try:
                    tcp_transfer(
                        h.a, h.b, OVERLAY_B, 30 * MiB, port=5202, io_timeout=120.0, rate=5 * MiB
                    )
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            th = threading.Thread(target=transfer)
            th.start()
            bb = b
            wait_until(lambda: bb.tunnel("stt0")["rx"]["bytes"] > 2 * MiB, 30, what="data")
            old_pid = b.proc.pid
            b.proc.kill()  # SIGKILL: no clean-up at all
            assert b.proc.wait(timeout=10) == -9
            # the outage is felt: A keeps sending (retransmissions) to nobody
            sent = a.tunnel("stt0")["tx"]["frames"]
            wait_until(lambda: a.tunnel("stt0")["tx"]["frames"] > sent, 30, what="A to resend")
            # the persistent TAP outlived the process, still in the bridge
            assert _master(h.b, "stt0") == br
            assert _sttun_tables(h.b) == ["table inet sttun_e2e"]
            b = start_endpoint(h.b, [], ["stt0"], tmp_path, config=cfg_b)
            nb = b
            # the killed run left its control socket file behind: wait for the new one
            wait_until(lambda: _pid(nb) not in (None, old_pid), 20, what="the new daemon")
            th.join(timeout=240)
            assert not th.is_alive(), "the transfer did not finish"
            assert not errors, f"transfer failed across the restart: {errors[0]}"
            assert _master(h.b, "stt0") == br
            addrs = h.b.run(["ip", "-4", "-o", "addr", "show", "dev", br]).stdout
            assert OVERLAY_B in addrs
            assert _sttun_tables(h.b) == ["table inet sttun_e2e"]
            rx_after = b.tunnel("stt0")["rx"]
            print(f"restart: B rx after restart {rx_after}")
            assert rx_after["bytes"] > 5 * MiB, "the kill did not happen mid-transfer"
            ping(h.a, OVERLAY_B)
        finally:
            for ep in (a, b):
                if ep is not None and ep.proc.poll() is None:
                    assert ep.stop() == 0, ep.log_text()
        # a clean stop removes the table, the persistent TAP stays
        assert _sttun_tables(h.b) == []
        assert h.b.run(["ip", "link", "show", "stt0"], check=False).returncode == 0


def _pid(ep: Endpoint) -> int | None:
    try:
        pid: int = ep.show()["pid"]
    except Exception:
        return None
    return pid


def _in_ns(ns: Host, argv: list[str]) -> list[str]:
    """``ip netns exec`` with ``ip`` by absolute path (PATH is changed for the child)."""
    full = ns.argv(argv)
    full[0] = shutil.which("ip") or "/usr/sbin/ip"
    return full


def _up_argv(h: object, tmp: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sttun",
        "up",
        "--local-ip",
        h.ip_a,  # type: ignore[attr-defined]
        "--remote-ip",
        h.ip_b,  # type: ignore[attr-defined]
        "--key",
        "5",
        "--dev",
        "stth0",
        "--instance",
        "e2e",
        "--control-socket",
        str(tmp / "hard.sock"),
        *extra,
    ]


def test_refuses_to_run_without_nft(tmp_path: Path) -> None:
    """``nft`` not on PATH: ``sttun up`` exits non-zero with a message naming nftables
    and leaves no TAP behind; with ``--no-firewall`` it runs (and warns)."""
    with make_two_hosts() as h:
        env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
        (tmp_path / "empty-bin").mkdir()
        res = subprocess.run(
            _in_ns(h.a, _up_argv(h, tmp_path)),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        print(f"without nft: exit {res.returncode}: {res.stderr.strip()[-300:]}")
        assert res.returncode != 0
        assert "nft" in res.stderr
        assert "Traceback" not in res.stderr
        assert h.a.run(["ip", "link", "show", "stth0"], check=False).returncode != 0
        assert not (tmp_path / "hard.sock").exists()

        proc = subprocess.Popen(
            _in_ns(h.a, _up_argv(h, tmp_path, "--no-firewall")),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_until(
                lambda: (
                    proc.poll() is not None
                    or h.a.run(["ip", "link", "show", "stth0"], check=False).returncode == 0
                ),
                20,
                what="sttun up --no-firewall",
            )
            assert proc.poll() is None, "sttun up --no-firewall exited"
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)
        print(f"--no-firewall: exit {proc.returncode}; log: {out.strip()[-300:]}")
        assert proc.returncode == 0
        assert "firewall disabled" in out


def test_refuses_to_run_when_nft_fails(tmp_path: Path) -> None:
    """An ``nft`` that exists but fails (a stand-in script exiting 1): refused too."""
    with make_two_hosts() as h:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        fake = bindir / "nft"
        fake.write_text(
            "#!/bin/sh\necho 'Error: Could not process rule: Operation not permitted' >&2\nexit 1\n"
        )
        fake.chmod(0o755)
        env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
        res = subprocess.run(
            _in_ns(h.a, _up_argv(h, tmp_path)), env=env, capture_output=True, text=True, timeout=60
        )
        print(f"failing nft: exit {res.returncode}: {res.stderr.strip()[-300:]}")
        assert res.returncode != 0
        assert "nftables" in res.stderr and "Traceback" not in res.stderr
        assert h.a.run(["ip", "link", "show", "stth0"], check=False).returncode != 0
