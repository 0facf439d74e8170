"""Mistakes a user can make with the real ``sttun up`` / ``sttun show`` processes: each
ends with one clear ``sttun: error: ...`` line (exact text asserted), a non-zero exit,
no traceback, and nothing left behind on the host (no TAP, no nft table, no socket)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sttun.tools.topology import Host, TwoHosts
from tests.e2e.sttun_hosts import link_exists, start_endpoint, tunnels_toml
from tests.netns import need_root, non_root_prefix

pytestmark = pytest.mark.netns

INSTANCE = "e2e"
TABLE = f"sttun_{INSTANCE}"


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def up(ns: Host, sock: Path, *args: str, prefix: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Run ``sttun up`` to completion in ``ns``; (exit status, stderr+stdout lines)."""
    argv = [*prefix, sys.executable, "-m", "sttun", "up"]
    argv += ["--instance", INSTANCE, "--control-socket", str(sock), *args]
    res = subprocess.run(
        ns.argv(argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        stdin=subprocess.DEVNULL,
    )
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    return res.returncode, [ln for ln in out.splitlines() if ln.strip()]


def error_line(lines: list[str]) -> str:
    """The one error line (log lines before it are allowed)."""
    errors = [ln for ln in lines if ln.startswith(("sttun: error:", "sttun up:"))]
    assert len(errors) == 1, lines
    assert lines[-1] == errors[0], lines  # the error comes last
    return errors[0]


def nft_tables(ns: Host) -> str:
    return ns.run(["nft", "list", "tables"]).stdout


def assert_nothing_left(ns: Host, sock: Path, dev: str = "stt0") -> None:
    assert not link_exists(ns, dev), f"TAP {dev} left behind"
    assert TABLE not in nft_tables(ns), "nft table left behind"
    assert not sock.exists(), "control socket left behind"


def tunnel_args(h: TwoHosts, *extra: str) -> list[str]:
    return ["--local-ip", h.ip_a, "--remote-ip", h.ip_b, "--key", "7", *extra]


# ------------------------------------------------------------------ configuration
BASE = {"name": "stt0", "local_ip": "198.18.0.1", "remote_ip": "198.18.0.2", "key": 7}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"remot_ip": "198.18.0.2"}, "tunnel[0].remot_ip: unknown key (did you mean remote_ip?)"),
        ({"key": -5}, "tunnel[0].key: expected an integer 0..18446744073709551615, got -5"),
        ({"mtu": 70000}, "tunnel[0].mtu: expected an integer 68..65000, got 70000"),
        ({"tos": "high"}, 'tunnel[0].tos: expected a DSCP value 0..63 or "inherit", got "high"'),
        (
            {"remote_ip": "2001:db8:0:1::2"},
            "tunnel[0].remote_ip: expected an IPv4 address "
            'like local_ip (198.18.0.1), got "2001:db8:0:1::2"',
        ),
    ],
    ids=["unknown-key", "negative-key", "mtu", "tos", "mixed-families"],
)
def test_bad_config_file(
    two_hosts: TwoHosts, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(tunnels_toml([{**BASE, **change}]))
    sock = tmp_path / "s.sock"
    status, lines = up(two_hosts.a, sock, "-c", str(cfg))
    assert status == 2
    assert lines == [f"sttun: error: {cfg}: {message}"]
    assert_nothing_left(two_hosts.a, sock)


def test_config_not_toml(two_hosts: TwoHosts, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[[tunnel]]\nname = stt0\n")
    status, lines = up(two_hosts.a, tmp_path / "s.sock", "-c", str(cfg))
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"sttun: error: {cfg}: invalid TOML: "), lines


def test_config_missing_file(two_hosts: TwoHosts, tmp_path: Path) -> None:
    cfg = tmp_path / "nope.toml"
    status, lines = up(two_hosts.a, tmp_path / "s.sock", "-c", str(cfg))
    assert status == 2
    assert lines == [f"sttun: error: {cfg}: cannot read: No such file or directory"]


def test_bad_flag_value(two_hosts: TwoHosts, tmp_path: Path) -> None:
    status, lines = up(two_hosts.a, tmp_path / "s.sock", *tunnel_args(two_hosts, "--ttl", "0"))
    assert status == 2
    assert lines == ['sttun: error: --ttl: expected an integer 1..255 or "inherit", got 0']


# ------------------------------------------------------------------ privileges
def test_not_root(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """Not root (no CAP_NET_ADMIN here): one line, exit 2, nothing made."""
    sock = tmp_path / "s.sock"
    prefix = tuple(non_root_prefix())
    status, lines = up(two_hosts.a, sock, *tunnel_args(two_hosts), prefix=prefix)
    assert status == 2
    assert lines == [
        "sttun: error: up must be run as root (CAP_NET_ADMIN needed for TAP and AF_PACKET)"
    ]
    assert_nothing_left(two_hosts.a, sock)


# ------------------------------------------------------------------ the host
def test_local_ip_not_local(two_hosts: TwoHosts, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    args = ["--local-ip", "198.18.0.5", "--remote-ip", two_hosts.ip_b, "--key", "7"]
    status, lines = up(two_hosts.a, sock, *args)
    assert status == 1
    line = error_line(lines)
    assert line == "sttun: error: tunnel stt0: local_ip 198.18.0.5 is not an address of this host"
    assert_nothing_left(two_hosts.a, sock)


def test_remote_not_routable(two_hosts: TwoHosts, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    args = ["--local-ip", two_hosts.ip_a, "--remote-ip", "198.19.0.2", "--key", "7"]
    status, lines = up(two_hosts.a, sock, *args)
    assert status == 1
    line = error_line(lines)
    assert line == (
        "sttun: error: tunnel stt0: remote_ip 198.19.0.2: no route to 198.19.0.2 "
        "(Network is unreachable)"
    ), line
    assert "Network is unreachable" in line
    assert_nothing_left(two_hosts.a, sock)


def test_remote_is_local(two_hosts: TwoHosts, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    two_hosts.a.run(["ip", "addr", "add", "198.18.0.7/32", "dev", "lo"])
    args = ["--local-ip", two_hosts.ip_a, "--remote-ip", "198.18.0.7", "--key", "7"]
    status, lines = up(two_hosts.a, sock, *args)
    assert status == 1
    line = error_line(lines)
    assert line == (
        "sttun: error: tunnel stt0: remote_ip 198.18.0.7: 198.18.0.7 is a local address "
        "of this host, not a remote one"
    )
    assert_nothing_left(two_hosts.a, sock)


def test_missing_bridge(two_hosts: TwoHosts, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    status, lines = up(two_hosts.a, sock, *tunnel_args(two_hosts, "--bridge", "nobr0"))
    assert status == 1
    assert error_line(lines) == "sttun: error: TAP stt0: bridge 'nobr0' does not exist"
    assert_nothing_left(two_hosts.a, sock)


def test_dev_name_taken(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """``--dev`` naming an existing non-TAP interface (here the underlay veth)."""
    sock = tmp_path / "s.sock"
    dev = two_hosts.dev_a
    status, lines = up(two_hosts.a, sock, *tunnel_args(two_hosts, "--dev", dev))
    assert status == 1
    assert error_line(lines) == (
        f"sttun: error: TAP {dev}: TUNSETIFF failed: Invalid argument "
        "(an interface of that name exists and is not a free TAP device)"
    )
    assert link_exists(two_hosts.a, dev)  # the veth is untouched
    assert TABLE not in nft_tables(two_hosts.a)


# ------------------------------------------------------------------ a second daemon
def test_second_up_same_config(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """The same ``sttun up`` twice: the second says another is running, and leaves the
    first one's TAP, nft table and control socket alone."""
    h = two_hosts
    first = start_endpoint(h.a, tunnel_args(h, "--dev", "stt0"), ["stt0"], tmp_path)
    try:
        sock = Path(first.sock)
        status, lines = up(h.a, sock, *tunnel_args(h, "--dev", "stt0"))
        assert status == 1
        assert error_line(lines) == (
            f"sttun: error: another sttun is running on {sock} (pid {first.proc.pid})"
        )
        assert first.proc.poll() is None
        assert link_exists(h.a, "stt0")
        assert first.tunnel("stt0")["state"] == "up"
        assert TABLE in nft_tables(h.a), "the first daemon's nft table was removed"
    finally:
        assert first.stop() == 0


def test_second_up_other_tunnel_same_socket(two_hosts: TwoHosts, tmp_path: Path) -> None:
    h = two_hosts
    first = start_endpoint(h.a, tunnel_args(h, "--dev", "stt0"), ["stt0"], tmp_path)
    try:
        sock = Path(first.sock)
        args = ["--local-ip", h.ip_a, "--remote-ip", h.ip_b, "--key", "8", "--dev", "stt1"]
        status, lines = up(h.a, sock, *args)
        assert status == 1
        assert error_line(lines) == (
            f"sttun: error: another sttun is running on {sock} (pid {first.proc.pid})"
        )
        assert not link_exists(h.a, "stt1")
        assert first.tunnel("stt0")["state"] == "up"
        assert TABLE in nft_tables(h.a), "the first daemon's nft table was removed"
    finally:
        assert first.stop() == 0


def test_show_without_daemon(two_hosts: TwoHosts, tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    argv = [sys.executable, "-m", "sttun", "show", "--control-socket", str(sock)]
    res = two_hosts.a.run(argv, check=False)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        f"sttun: error: no sttun daemon is listening on {sock}: is `sttun up` running?"
    ]


def test_show_stale_socket(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """A socket file left by a killed daemon: the same message, not a traceback."""
    first = start_endpoint(two_hosts.a, tunnel_args(two_hosts), ["stt0"], tmp_path)
    first.stop(sig=9)
    assert os.path.exists(first.sock)
    argv = [sys.executable, "-m", "sttun", "show", "--control-socket", first.sock]
    res = two_hosts.a.run(argv, check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"sttun: error: no sttun daemon is listening on {first.sock}: is `sttun up` running?"
    ]
