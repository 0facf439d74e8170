"""docs/configuration.md (and the operations kit) checked against the code.

The reference cannot drift from the implementation:

* every ``[[tunnel]]`` and ``[daemon]`` key of the key table
  (:data:`sttun.daemon.config_keys.CONFIG_KEYS`) is a row of its table, no row
  names a key the code lacks, the OVS and flag columns match the key table, the
  default column shows the code's default (the fields of ``TunnelConfig`` /
  ``DaemonConfig``) and the underlay MTU range is the one the validator enforces;
* every flag of ``sttun`` and of every subcommand (found by walking the argparse
  parser of :func:`sttun.cli.build_parser`) is a row of that command's table, no
  row names a flag the parser lacks, and argparse defaults are the documented ones;
* the ``file key`` column of ``sttun up`` agrees with the key table;
* every ``toml`` example of the page and ``contrib/sttun.toml`` validate;
* ``contrib/systemd/sttun.service`` has the directives docs/operations.md promises;
* every metric the collector exports is named in docs/operations.md;
* every subcommand's help has examples and every flag a help text.

Table rows are recognised by a first cell holding code spans: ```` `key` ```` for
keys, ```` `-c`, `--config` FILE ```` for flags (tokens starting with ``-``), and
```` `IN` ```` for positional arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sttun import __version__
from sttun.cli import build_parser
from sttun.core.reassembly import DEFAULT_SOURCE_BUDGET
from sttun.daemon import config as cfg
from sttun.daemon.config_keys import CONFIG_KEYS, DAEMON_KEYS, TUNNEL_KEYS, Where
from sttun.daemon.metrics import SttunCollector
from sttun.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG_MD = REPO / "docs" / "configuration.md"
OPERATIONS_MD = REPO / "docs" / "operations.md"
EXAMPLE_TOML = REPO / "contrib" / "sttun.toml"
UNIT = REPO / "contrib" / "systemd" / "sttun.service"

TUNNEL_SECTION = "`[[tunnel]]` keys"
DAEMON_SECTION = "`[daemon]` keys"
_CODE = re.compile(r"`([^`]+)`")
_HEADING = re.compile(r"^(#{2,3})\s+(.*?)\s*$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def doc_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """Section heading → {name in the first cell → {column header → cell}}.

    A row's first cell may name several things (``-c``, ``--config``): each gets
    the row.  Separator rows and rows without a code span are skipped.
    """
    out: dict[str, dict[str, dict[str, str]]] = {}
    section = ""
    header: list[str] = []
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            section = m.group(2)
            out.setdefault(section, {})
            header = []
            continue
        if not line.startswith("|"):
            header = []
            continue
        cells = _cells(line)
        if not header:
            header = cells
            continue
        if set(cells[0]) <= set("-: "):
            continue
        row = dict(zip(header, cells, strict=False))
        for span in _CODE.findall(cells[0]):
            tokens = span.split()
            if not tokens:
                continue
            if tokens[0].startswith("-") or not section.startswith("`sttun"):
                names = [t for t in tokens if t.startswith("-")] or tokens[:1]
            else:
                names = tokens[:1]
            for name in names:
                out.setdefault(section, {})[name] = row
    return out


@pytest.fixture(scope="module")
def tables() -> dict[str, dict[str, dict[str, str]]]:
    return doc_tables(CONFIG_MD.read_text())


def _toml(value: object) -> str:
    """How a default looks in the doc's default column."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


# --------------------------------------------------------------------------------
# config keys


def test_tunnel_keys_match_the_code(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    documented = tables[TUNNEL_SECTION]
    code = {k.name for k in TUNNEL_KEYS}
    assert set(documented) == code, (
        f"missing from the doc: {sorted(code - set(documented))}; "
        f"not in the code: {sorted(set(documented) - code)}"
    )
    fields = {f.name for f in dataclasses.fields(cfg.TunnelConfig)}
    assert code - {"key"} <= fields


def test_tunnel_ovs_column(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    for key in TUNNEL_KEYS:
        cell = tables[TUNNEL_SECTION][key.name]["OVS"]
        if key.ovs is None:
            assert cell.startswith("—"), f"{key.name}: OVS column should be '—', is {cell!r}"
        else:
            assert _CODE.findall(cell)[:1] == [key.ovs], f"{key.name}: OVS {cell!r}, code {key.ovs}"


def test_tunnel_defaults(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    names = {k.name for k in TUNNEL_KEYS}
    for f in dataclasses.fields(cfg.TunnelConfig):
        if f.name not in names:
            continue
        cell = tables[TUNNEL_SECTION][f.name]["default"]
        if f.default is dataclasses.MISSING:
            assert "required" in cell or "value of" in cell, f"{f.name}: {cell!r}"
        elif f.default is None:
            assert cell.startswith("none"), f"{f.name}: default None documented as {cell!r}"
        elif f.name == "dev":
            assert "`name`" in cell
        else:
            assert f"`{_toml(f.default)}`" in cell, f"{f.name}: code {f.default!r}, doc {cell!r}"


def test_underlay_mtu_range(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    """One underlay MTU limit: the core's floor, documented as the validator enforces it."""
    lo, hi = cfg.MIN_UNDERLAY_MTU, cfg.MAX_UNDERLAY_MTU
    cell = tables[TUNNEL_SECTION]["underlay_mtu"]["type"]
    assert cell == f"integer {lo}..{hi}", cell
    check = next(k for k in TUNNEL_KEYS if k.name == "underlay_mtu").check
    where = Where("doc", {}, cli_strings=False)
    assert check(lo, "x", where) == lo and check(hi, "x", where) == hi
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ConfigError):
            check(bad, "x", where)


def test_daemon_keys_match_the_code(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    documented = tables[DAEMON_SECTION]
    code = {k.name for k in DAEMON_KEYS}
    fields = {f.name for f in dataclasses.fields(cfg.DaemonConfig)}
    assert code <= fields
    assert set(documented) == code, (
        f"missing from the doc: {sorted(code - set(documented))}; "
        f"not in the code: {sorted(set(documented) - code)}"
    )
    for key in DAEMON_KEYS:
        if key.flag is None:
            assert documented[key.name]["flag"].startswith("—"), key.name
        else:
            assert _CODE.findall(documented[key.name]["flag"]) == [key.flag], key.name


def test_daemon_defaults(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.DaemonConfig)}
    defaults["control_socket"] = cfg.default_control_socket("<instance>")
    defaults["reassembly_source_budget"] = DEFAULT_SOURCE_BUDGET
    for key in (k.name for k in DAEMON_KEYS):
        cell = tables[DAEMON_SECTION][key]["default"]
        value = defaults[key]
        if value is None:
            assert cell.startswith("none"), f"{key}: {cell!r}"
        else:
            assert f"`{_toml(value)}`" in cell, f"{key}: code {value!r}, doc {cell!r}"


# --------------------------------------------------------------------------------
# command-line flags


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    out = {"sttun": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"sttun {name}"] = sub
    return out


def _arguments(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if a.option_strings:
            for s in a.option_strings:
                out[s] = a
        else:
            out[str(a.metavar or a.dest)] = a
    return out


def test_every_command_has_a_section(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    documented = {s for s in tables if s.startswith("`sttun")}
    assert documented == {f"`{c}`" for c in _commands()}


@pytest.mark.parametrize("command", sorted(_commands()))
def test_flags_match_the_parser(command: str, tables: dict[str, dict[str, dict[str, str]]]) -> None:
    code = _arguments(_commands()[command])
    documented = tables[f"`{command}`"]
    assert set(documented) == set(code), (
        f"{command}: missing from the doc: {sorted(set(code) - set(documented))}; "
        f"not in the parser: {sorted(set(documented) - set(code))}"
    )
    for name, action in code.items():
        default = action.default
        if isinstance(action, argparse._StoreAction) and default is not None:
            cell = documented[name]["default"]
            assert f"`{_toml(default)}`" in cell, f"{command} {name}: {default!r} vs {cell!r}"


def test_up_file_key_column(tables: dict[str, dict[str, dict[str, str]]]) -> None:
    rows = tables["`sttun up`"]
    for key in CONFIG_KEYS:
        if key.flag is None:
            continue
        spans = _CODE.findall(rows[key.flag]["file key"])
        assert spans and spans[0].split()[0] == key.name, (
            f"{key.flag}: file key {spans}, code {key.name}"
        )
        if key.section == "tunnel":  # the OVS column of sttun up is the key table's too
            ovs = _CODE.findall(rows[key.flag]["OVS"])
            assert [o.split("=")[0] for o in ovs[:1]] == ([key.ovs] if key.ovs else []), key


def test_help_is_complete() -> None:
    for name, parser in _commands().items():
        if name != "sttun":
            assert parser.epilog and "examples:" in parser.epilog, f"{name}: no examples"
            assert parser.description, f"{name}: no description"
        for flag, action in _arguments(parser).items():
            if isinstance(action, argparse._VersionAction):
                continue
            assert action.help, f"{name} {flag}: no help text"


def test_python_m_sttun_and_version() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "sttun", "--version"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and res.stdout.strip() == f"sttun {__version__}"
    res = subprocess.run(
        [sys.executable, "-m", "sttun", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0
    for command in _commands():
        assert command.removeprefix("sttun ").strip() in res.stdout


# --------------------------------------------------------------------------------
# examples and the operations kit


def _toml_blocks(text: str) -> list[str]:
    return re.findall(r"^```toml[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def test_toml_examples_validate() -> None:
    blocks = _toml_blocks(CONFIG_MD.read_text()) + _toml_blocks(OPERATIONS_MD.read_text())
    assert blocks
    for block in blocks:
        cfg.parse_config(tomllib.loads(block), source="docs example")


def test_example_file_validates() -> None:
    config = cfg.load_config(EXAMPLE_TOML)
    assert config.tunnels
    text = EXAMPLE_TOML.read_text()
    # every key is at least mentioned (commented out if not set)
    for key in (*(k.name for k in TUNNEL_KEYS), "metrics", "log_level", "log_format", "firewall"):
        assert re.search(rf"^#? ?{key} = ", text, flags=re.M), f"{key} not in the example"


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_systemd_unit() -> None:
    unit = _unit()
    assert unit["Type"] == ["simple"]
    assert unit["ExecStart"] == ["/usr/local/bin/sttun up -c /etc/sttun/sttun.toml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["After"] == ["network-online.target"]
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert set(unit[key][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    ops = OPERATIONS_MD.read_text()
    assert UNIT.read_text() in ops, "docs/operations.md should show the unit as shipped"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    sttun = Path(sys.executable).parent / "sttun"
    unit = tmp_path / "sttun.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sttun", str(sttun)))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        if str(unit) in line or "sttun" in line
    ]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


def test_metric_names_documented() -> None:
    data = {
        "pid": 1,
        "instance": "sttun",
        "started": 0.0,
        "tunnels": [
            {
                "name": "stt0", "dev": "stt0", "local_ip": "198.18.0.1",
                "remote_ip": "198.18.0.2", "in_key": 1, "out_key": 1, "dst_port": 7471,
                "state": "up", "offload": True,
                "tx": {"frames": 1, "bytes": 1, "segments": 1},
                "rx": {"frames": 1, "bytes": 1, "segments": 1},
                "drops": {"bad_version": 1},
                "peer_reassembly": {"peer": "198.18.0.2", "entries": 0, "bytes": 0,
                                    "peak_bytes": 0, "evictions": 0, "timeouts": 0},
            }
        ],
        "drops": {"unknown_source": 1},
        "reassembly": {"entries": 0, "bytes": 0, "peak_bytes": 0, "evictions": 0, "timeouts": 0},
        "underlays": [
            {"name": "eth0", "sockets": ["ipv4"], "tunnels": ["stt0"],
             "fastpath": {"state": "on", "reason": None, "attach": "tcx", "program_id": 7,
                          "passed": {"piece": {"packets": 1, "bytes": 9}},
                          "errors": {"packets": 0, "bytes": 0}}},
        ],
    }  # fmt: skip
    data["tunnels"][0]["rx_fastpath"] = {"frames": 1, "bytes": 1}  # type: ignore[index]
    names = set()
    for family in SttunCollector(lambda: data).collect():  # type: ignore[arg-type,return-value]
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    assert len(names) > 10
    ops = OPERATIONS_MD.read_text()
    missing = sorted(n for n in names if f"`{n}`" not in ops)
    assert not missing, f"metrics not described in docs/operations.md: {missing}"


def test_drop_reasons_documented() -> None:
    from sttun.core.drops import DropReason

    table = doc_tables(OPERATIONS_MD.read_text())["Drop reasons"]
    assert set(table) == {r.value for r in DropReason}, (
        f"missing: {sorted({r.value for r in DropReason} - set(table))}; "
        f"not in the code: {sorted(set(table) - {r.value for r in DropReason})}"
    )
