"""The sttun command: help, version, dispatch, exit codes and error lines."""

from __future__ import annotations

import copy
import json
import os
import select
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sttun import __version__, cli
from sttun.daemon.control import ControlServer
from sttun.errors import CaptureError, ConfigError
from sttun.tools.report import human_bytes
from sttun.tools.show import format_show_text, human_duration

COMMANDS = ("up", "show", "decap", "encap", "inspect", "demo")
UP = ("up", "--local-ip", "198.18.0.1", "--remote-ip", "198.18.0.2", "--key", "0x1234")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sttun", *argv], capture_output=True, text=True, timeout=60
    )


# --- subprocess: the real entry point ------------------------------------------------


def test_version() -> None:
    p = run("--version")
    assert (p.returncode, p.stdout, p.stderr) == (0, f"sttun {__version__}\n", "")


def test_help() -> None:
    p = run("--help")
    assert p.returncode == 0
    for c in COMMANDS:
        assert f"\n    {c} " in p.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_examples(command: str) -> None:
    p = run(command, "--help")
    assert p.returncode == 0, p.stderr
    assert "examples:\n" in p.stdout
    assert f"  sttun {command}" in p.stdout


def test_config_error_is_one_line() -> None:
    p = run(*UP[:-1], "-5")
    assert p.returncode == 2
    assert (
        p.stderr == 'sttun: error: --key: expected an integer 0..18446744073709551615, got "-5"\n'
    )


def test_usage_error_exit_2() -> None:
    p = run("encap", "in.pcap")
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1].startswith("sttun encap: error: the following arguments")
    p = run()
    assert p.returncode == 2
    assert "Traceback" not in p.stderr


def test_show_without_daemon(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    p = run("show", "--control-socket", str(sock))
    assert p.returncode == 1
    assert p.stderr == (
        f"sttun: error: no sttun daemon is listening on {sock}: is `sttun up` running?\n"
    )


def test_import_is_light() -> None:
    code = (
        "import sys, sttun.cli\n"
        "try:\n"
        "    sttun.cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('pyroute2', 'prometheus_client', 'rich')]\n"
        "print(heavy)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("[]")


# --- in process ----------------------------------------------------------------------


def test_up_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*UP, "--check", "--mtu", "9000"]) == 0
    out = capsys.readouterr().out
    assert "tunnel stt0: 198.18.0.1 -> 198.18.0.2 port 7471 key 0x1234 mtu 9000" in out
    assert out.endswith("configuration OK: 1 tunnel\n")


def test_up_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[[tunnel]]\nname = "a"\nlocal_ip = "198.18.0.1"\nremot_ip = "x"\n')
    assert cli.main(["up", "-c", str(f)]) == 2
    err = capsys.readouterr().err
    assert err == f"sttun: error: {f}: tunnel[0].remot_ip: unknown key (did you mean remote_ip?)\n"


def test_up_not_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setitem(sys.modules, "sttun.daemon.endpoint", None)  # must not be reached
    assert cli.main(list(UP)) == 2
    assert capsys.readouterr().err == (
        "sttun: error: up must be run as root (CAP_NET_ADMIN needed for TAP and AF_PACKET)\n"
    )


def test_demo_not_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err.startswith("sttun: error: demo must be run as root (")


def test_up_without_endpoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(sys.modules, "sttun.daemon.endpoint", None)
    assert cli.main(list(UP)) == 1
    err = capsys.readouterr().err
    assert err.startswith("sttun: error: the endpoint is not available in this installation (")
    assert err.count("\n") == 1


def test_up_runs_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("sttun.daemon.endpoint")
    fake.run = lambda config: seen.append(config) or 7  # type: ignore[attr-defined]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(sys.modules, "sttun.daemon.endpoint", fake)
    assert cli.main([*UP, "--metrics", ":9100"]) == 7
    (config,) = seen
    assert config.tunnels[0].in_key == 0x1234 and config.metrics == ":9100"


@pytest.fixture
def fake_tool(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[Any], dict[str, Any]]]:
    """Install fake sttun.tools.* modules; returns (calls, behaviour)."""
    calls: list[Any] = []
    behaviour: dict[str, Any] = {"result": 0}

    def main(ns: Any) -> int:
        calls.append(ns)
        if "raise" in behaviour:
            raise behaviour["raise"]
        return int(behaviour["result"])

    for name in ("decap", "encap", "inspect", "demo"):
        mod = types.ModuleType(f"sttun.tools.{name}")
        mod.main = main  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, f"sttun.tools.{name}", mod)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    yield calls, behaviour


def test_tool_arguments(fake_tool: tuple[list[Any], dict[str, Any]]) -> None:
    calls, behaviour = fake_tool
    behaviour["result"] = 3
    assert cli.main(["decap", "in.pcap", "-o", "out.pcap", "--context-id", "0x10",
                     "--context-id", "7", "--port", "7472", "--json"]) == 3  # fmt: skip
    ns = calls[-1]
    assert (ns.command, ns.input, ns.output, ns.context_id, ns.port) == (
        "decap", "in.pcap", "out.pcap", [16, 7], [7472],
    )  # fmt: skip
    assert ns.json is True and ns.split_by_context is None

    assert cli.main(["encap", "i", "-o", "o", "--src", "198.18.0.1", "--dst", "198.18.0.2",
                     "--context-id", "0xffffffffffffffff", "--sport", "1234"]) == 3  # fmt: skip
    ns = calls[-1]
    assert (ns.src, ns.dst, ns.context_id, ns.mtu, ns.ipv6, ns.sport, ns.sport_hash) == (
        "198.18.0.1", "198.18.0.2", 2**64 - 1, 1500, False, 1234, False,
    )  # fmt: skip
    assert ns.dst_port == 7471

    assert cli.main(["inspect", "cap.pcapng"]) == 3
    assert (calls[-1].input, calls[-1].json, calls[-1].port) == ("cap.pcapng", False, None)

    assert cli.main(["demo", "--keep", "--ipv6", "--mtu", "9000", "--no-offload"]) == 3
    ns = calls[-1]
    assert (ns.keep, ns.down, ns.ipv6, ns.mtu, ns.offload) == (True, False, True, 9000, False)


@pytest.mark.parametrize(
    ("argv", "last_line"),
    [
        (["decap", "in.pcap"], "sttun: error: decap needs -o OUT or --split-by-context DIR"),
        (["decap", "i", "-o", "o", "--context-id", "zz"],
         "sttun decap: error: argument --context-id: expected an integer "
         "0..18446744073709551615, got 'zz'"),
        (["decap", "i", "-o", "o", "--port", "0"],
         "sttun decap: error: argument --port: expected an integer 1..65535, got '0'"),
        (["encap", "i", "-o", "o", "--src", "a", "--dst", "b", "--context-id", "1",
          "--sport", "1", "--sport-hash"],
         "sttun encap: error: argument --sport-hash: not allowed with argument --sport"),
        (["show", "--instance", "a", "--control-socket", "b"],
         "sttun show: error: argument --control-socket: not allowed with argument --instance"),
    ],
)  # fmt: skip
def test_usage_errors(
    fake_tool: tuple[list[Any], dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    last_line: str,
) -> None:
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == last_line
    assert fake_tool[0] == []


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (KeyboardInterrupt(), 130, ""),
        (ConfigError("x.toml: bad"), 2, "sttun: error: x.toml: bad\n"),
        (CaptureError("in.pcap: byte 24: truncated record"), 1,
         "sttun: error: in.pcap: byte 24: truncated record\n"),
        (FileNotFoundError(2, "No such file or directory", "in.pcap"), 1,
         "sttun: error: in.pcap: No such file or directory\n"),
        (RuntimeError("oops"), 1,
         "sttun: error: internal error: RuntimeError: oops (run with --debug for a traceback)\n"),
    ],
)  # fmt: skip
def test_errors_from_tools(
    fake_tool: tuple[list[Any], dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    status: int,
    message: str,
) -> None:
    fake_tool[1]["raise"] = exc
    assert cli.main(["inspect", "in.pcap"]) == status
    captured = capsys.readouterr()
    assert captured.err == message
    assert captured.out == ""


def test_debug_shows_internal_errors(fake_tool: tuple[list[Any], dict[str, Any]]) -> None:
    fake_tool[1]["raise"] = RuntimeError("oops")
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "inspect", "in.pcap"])


def test_missing_tool(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "sttun.tools.inspect", None)
    assert cli.main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sttun: error: `sttun inspect` is not available in this installation (")
    assert err.count("\n") == 1


def test_help_and_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"sttun {__version__}\n"
    assert cli.main(["up", "--help"]) == 0
    assert "--underlay-mtu" in capsys.readouterr().out


# --- sttun show ----------------------------------------------------------------------

SHOW: dict[str, Any] = {
    "pid": 99,
    "instance": "sttun",
    "started": 1000.0,
    "tunnels": [
        {
            "name": "stt0", "dev": "stt0", "local_ip": "198.18.0.1", "remote_ip": "198.18.0.2",
            "in_key": 0x1234, "out_key": 0x1234, "dst_port": 7471, "state": "up", "offload": True,
            "tx": {"frames": 10, "bytes": 2048, "segments": 12},
            "rx": {"frames": 5, "bytes": 100, "segments": 5},
            "drops": {"late_segment": 1, "bad_tcp_checksum": 3},
            "peer_reassembly": {"peer": "198.18.0.2", "entries": 1, "bytes": 1500,
                                "peak_bytes": 3000, "evictions": 0, "timeouts": 2},
        },
        {
            "name": "long-name", "dev": "tap7", "local_ip": "2001:db8:0:1::1",
            "remote_ip": "2001:db8:0:1::2", "in_key": 1, "out_key": 2, "dst_port": 7472,
            "state": "down", "offload": False,
            "tx": {"frames": 0, "bytes": 0, "segments": 0},
            "rx": {"frames": 0, "bytes": 0, "segments": 0},
            "drops": {},
            "peer_reassembly": {"peer": "2001:db8:0:1::2", "entries": 0, "bytes": 0,
                                "peak_bytes": 0, "evictions": 0, "timeouts": 0},
        },
        {
            "name": "t2", "dev": "t2", "local_ip": "198.18.0.1", "remote_ip": "198.18.0.2",
            "in_key": 0x99, "out_key": 0x99, "dst_port": 7471, "state": "up", "offload": True,
            "tx": {"frames": 0, "bytes": 0, "segments": 0},
            "rx": {"frames": 0, "bytes": 0, "segments": 0},
            "drops": {},
            "peer_reassembly": {"peer": "198.18.0.2", "entries": 1, "bytes": 1500,
                                "peak_bytes": 3000, "evictions": 0, "timeouts": 2},
        },
    ],
    "drops": {"wrong_port": 4},
    "reassembly": {"entries": 1, "bytes": 1500, "peak_bytes": 3000, "evictions": 0, "timeouts": 2},
}  # fmt: skip

SHOW_TEXT = """\
sttun instance sttun, pid 99, up 1h02m, 3 tunnel(s)

TUNNEL     DEV   LOCAL            REMOTE           KEY      PORT  STATE              TX FRAMES  TX BYTES  RX FRAMES  RX BYTES  DROPS  PEER REASM
stt0       stt0  198.18.0.1       198.18.0.2       0x1234   7471  up                        10   2.0 KiB          5     100 B      4   1/1.5 KiB
long-name  tap7  2001:db8:0:1::1  2001:db8:0:1::2  0x1/0x2  7472  down (no offload)          0       0 B          0       0 B      0       0/0 B
t2         t2    198.18.0.1       198.18.0.2       0x99     7471  up                         0       0 B          0       0 B      0   1/1.5 KiB

drops stt0: bad_tcp_checksum 3, late_segment 1
drops (no tunnel): wrong_port 4
reassembly from 198.18.0.2 (tunnels stt0, t2): 1 partial frame(s), 1.5 KiB (peak 2.9 KiB), 0 evicted, 2 timed out
reassembly: 1 partial frame(s), 1.5 KiB (peak 2.9 KiB), 0 evicted, 2 timed out"""  # noqa: E501


def test_format_show_text() -> None:
    assert format_show_text(SHOW, now=1000.0 + 3725) == SHOW_TEXT  # type: ignore[arg-type]


def test_show_text_reassembly_is_per_peer() -> None:
    """Two peers with different partial-frame state get different rows and lines."""
    data = copy.deepcopy(SHOW)
    data["tunnels"][1]["peer_reassembly"].update(entries=3, bytes=4096, peak_bytes=8192)
    text = format_show_text(data, now=1000.0)  # type: ignore[arg-type]
    rows = {line.split()[0]: line.split()[-2:] for line in text.splitlines()[3:6]}
    assert rows == {
        "stt0": ["1/1.5", "KiB"], "long-name": ["3/4.0", "KiB"], "t2": ["1/1.5", "KiB"],
    }  # fmt: skip
    assert (
        "reassembly from 2001:db8:0:1::2 (tunnels long-name): 3 partial frame(s), 4.0 KiB "
        "(peak 8.0 KiB), 0 evicted, 0 timed out"
    ) in text.splitlines()


def test_show_text_fast_path_lines() -> None:
    """Per underlay: on (how, what was left to Python) or off and why; per tunnel:
    received frames split between the paths."""
    data = copy.deepcopy(SHOW)
    data["tunnels"][0]["rx_fastpath"] = {"frames": 4, "bytes": 80}
    data["tunnels"][0]["rx_python"] = {"frames": 1, "bytes": 20, "segments": 1}
    passed = {"piece": {"packets": 2, "bytes": 3000}, "vlan": {"packets": 0, "bytes": 0}}
    data["underlays"] = [
        {"name": "eth0", "sockets": ["ipv4", "ipv6"], "tunnels": ["stt0", "t2"],
         "fastpath": {"state": "on", "reason": None, "attach": "tcx", "program_id": 97,
                      "passed": passed, "errors": {"packets": 0, "bytes": 0}}},
        {"name": "eth1", "sockets": ["all"], "tunnels": ["long-name"],
         "fastpath": {"state": "off", "reason": "fast path: not permitted", "attach": None,
                      "program_id": None, "passed": {}, "errors": {"packets": 0, "bytes": 0}}},
    ]  # fmt: skip
    lines = format_show_text(data, now=1000.0).splitlines()  # type: ignore[arg-type]
    assert (
        "underlay eth0 (sockets: ipv4, ipv6): fast path on (tcx, program 97), "
        "left to Python: piece 2"
    ) in lines
    assert "underlay eth1 (sockets: all): fast path off: fast path: not permitted" in lines
    assert "rx stt0: fast path 4 frame(s) (80 B), Python path 1 frame(s) (20 B)" in lines
    assert "rx long-name: fast path 0 frame(s) (0 B), Python path 0 frame(s) (0 B)" in lines


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB")]
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("s", "text"), [(5, "5s"), (65, "1m05s"), (3725, "1h02m"), (90000, "1d01h"), (-3, "0s")]
)
def test_human_duration(s: float, text: str) -> None:
    assert human_duration(s) == text


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "d.sock")
    server = ControlServer(path, {"show": lambda req: SHOW})
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if select.select([server], [], [], 0.02)[0]:
                server.handle_readable()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        t.join(5)
        server.close()


def test_show_json(daemon: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", "--json", "--control-socket", daemon]) == 0
    assert json.loads(capsys.readouterr().out) == SHOW


def test_show_text(daemon: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", "--control-socket", daemon]) == 0
    out = capsys.readouterr().out
    assert "TUNNEL     DEV   LOCAL" in out
    assert "drops stt0: bad_tcp_checksum 3, late_segment 1" in out


def test_show_rich(
    daemon: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main(["show", "--control-socket", daemon]) == 0
    out = capsys.readouterr().out
    assert "long-name" in out and "0x1/0x2" in out
    assert "drops (no tunnel): wrong_port 4" in out


def test_show_rich_missing_falls_back(
    daemon: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    assert cli.main(["show", "--control-socket", daemon]) == 0
    assert "TUNNEL     DEV   LOCAL" in capsys.readouterr().out


def test_show_instance_picks_socket(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["show", "--instance", "nosuchinstance"]) == 1
    assert "/run/sttun/nosuchinstance.sock" in capsys.readouterr().err


def test_format_show_tolerates_missing_sections() -> None:
    data = dict(SHOW, reassembly=None, drops=None)
    data["tunnels"] = [dict(SHOW["tunnels"][0], tx=None, drops=None, peer_reassembly=None)]
    text = format_show_text(data, now=1000.0)  # type: ignore[arg-type]
    assert "reassembly: 0 partial frame(s)" in text
    assert "reassembly from" not in text
    assert "drops" not in text.split("\n", 3)[3]
    assert "(no tunnels)" in format_show_text({"tunnels": None}, now=0.0)  # type: ignore[typeddict-item]


# --- up --check agrees with up (issue #12) ---------------------------------------------

CLASH_FILE = """\
[[tunnel]]
name = "s1"
local_ip = "198.18.0.1"
remote_ip = "198.18.0.2"
key = 5

[[tunnel]]
name = "s2"
local_ip = "198.18.0.1"
remote_ip = "198.18.0.2"
key = 5
dst_port = 7472
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CLASH_FILE, "tunnel[1]: tunnels 's1' and 's2' have the same local address, remote "
         "address and in_key (0x5): received frames could not be told apart (dst_port is not "
         "part of the match)"),
        (CLASH_FILE.split("\n\n")[0] + "\nunderlay_mtu = 300\n",
         "tunnel[0].underlay_mtu: expected an integer 576..65535, got 300"),
    ],
)  # fmt: skip
def test_up_check_refuses_what_up_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    """`--check` used to say "configuration OK" for these; `up` then failed."""
    f = tmp_path / "s.toml"
    f.write_text(text)
    assert cli.main(["up", "-c", str(f), "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"sttun: error: {f}: {message}\n"
    assert captured.out == ""


def test_up_refuses_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`up` gives the same one-line error as `--check`, before the endpoint is reached."""
    f = tmp_path / "s.toml"
    f.write_text(CLASH_FILE)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(sys.modules, "sttun.daemon.endpoint", None)  # must not be reached
    assert cli.main(["up", "-c", str(f)]) == 2
    assert capsys.readouterr().err.startswith(f"sttun: error: {f}: tunnel[1]: tunnels 's1'")


def test_up_check_flags_underlay_mtu(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*UP, "--underlay-mtu", "300", "--check"]) == 2
    assert capsys.readouterr().err == (
        "sttun: error: --underlay-mtu: expected an integer 576..65535, got 300\n"
    )
    assert cli.main([*UP, "--underlay-mtu", "576", "--check"]) == 0
