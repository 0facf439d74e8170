"""Configuration: validation messages, defaults, the flags form and reload diffs."""

# ruff: noqa: E501  (the tables of bad inputs read best one case per line)

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from pathlib import Path

import pytest

from sttun.cli import build_parser
from sttun.core import encap
from sttun.core.decap import DscpModel
from sttun.core.reassembly import DEFAULT_SOURCE_BUDGET
from sttun.daemon.config import (
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    INHERIT,
    MAX_UNDERLAY_MTU,
    MIN_UNDERLAY_MTU,
    OVS_OPTION_NAMES,
    DaemonConfig,
    TunnelConfig,
    changed_fields,
    config_from_args,
    core_endpoint,
    describe_config,
    diff_configs,
    load_config,
    parse_config,
    parse_hostport,
    reload_config,
    tunnel_spec,
    validate_with_core,
)
from sttun.daemon.config_keys import CONFIG_KEYS, DAEMON_KEYS, TUNNEL_KEYS
from sttun.errors import ConfigError

T0 = """
[[tunnel]]
name = "t0"
local_ip = "198.18.0.1"
remote_ip = "198.18.0.2"
key = 1
"""

T1 = """
[[tunnel]]
name = "t1"
local_ip = "198.18.0.1"
remote_ip = "198.18.0.3"
key = 2
"""


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write TOML text to ./sttun.toml (so messages start with "sttun.toml: ")."""
    monkeypatch.chdir(tmp_path)

    def _write(text: str, name: str = "sttun.toml") -> str:
        (tmp_path / name).write_text(text)
        return name

    return _write


def _tunnel(extra: str, **replace: str) -> str:
    """T0 with keys replaced (value "" deletes the key) and ``extra`` lines added."""
    lines = []
    for line in T0.strip().splitlines():
        k = line.split("=")[0].strip()
        if k in replace:
            if replace[k]:
                lines.append(f"{k} = {replace[k]}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n" + extra + "\n"


CLASH = (
    "tunnel[1]: tunnels 't0' and 't1' have the same local address, remote address and "
    "in_key (0x1): received frames could not be told apart (dst_port is not part of the match)"
)

BAD = [
    # (file text, expected message)
    (T0 + _tunnel("", name='"t1"', key="-5"), "tunnel[1].key: expected an integer 0..18446744073709551615, got -5"),
    (_tunnel("remot_ip = \"198.18.0.9\""), "tunnel[0].remot_ip: unknown key (did you mean remote_ip?)"),
    (_tunnel("zzz = 1"), "tunnel[0].zzz: unknown key"),
    (_tunnel("", key="18446744073709551616"), "tunnel[0].key: expected an integer 0..18446744073709551615, got 18446744073709551616"),
    (_tunnel("", key='"0x1_0000_0000_0000_0000"'), 'tunnel[0].key: expected an integer 0..18446744073709551615, got "0x1_0000_0000_0000_0000"'),
    (_tunnel("", key='"flow"'), 'tunnel[0].key: expected an integer 0..18446744073709551615, got "flow" (flow-based keys are not supported)'),
    (_tunnel("", key='"12abc"'), 'tunnel[0].key: expected an integer 0..18446744073709551615, got "12abc"'),
    (_tunnel("", key="true"), "tunnel[0].key: expected an integer 0..18446744073709551615, got true"),
    (_tunnel("", key="1.5"), "tunnel[0].key: expected an integer 0..18446744073709551615, got 1.5"),
    (_tunnel("", key=""), "tunnel[0].key: required key is missing (give key, or in_key and out_key)"),
    (_tunnel("in_key = 3", key=""), "tunnel[0].out_key: required key is missing (give key, or out_key as well as in_key)"),
    (_tunnel("out_key = 3", key=""), "tunnel[0].in_key: required key is missing (give key, or in_key as well as out_key)"),
    (_tunnel("", local_ip=""), "tunnel[0].local_ip: required key is missing"),
    (_tunnel("", name=""), "tunnel[0].name: required key is missing"),
    (_tunnel("", local_ip='"198.18.0.300"'), 'tunnel[0].local_ip: expected an IPv4 or IPv6 address, got "198.18.0.300"'),
    (_tunnel("", local_ip="7"), "tunnel[0].local_ip: expected an IPv4 or IPv6 address, got 7"),
    (_tunnel("", remote_ip='"224.0.0.1"'), 'tunnel[0].remote_ip: expected a unicast address, got "224.0.0.1" (multicast)'),
    (_tunnel("", remote_ip='"0.0.0.0"'), 'tunnel[0].remote_ip: expected a unicast address, got "0.0.0.0" (unspecified)'),
    (_tunnel("", remote_ip='"255.255.255.255"'), 'tunnel[0].remote_ip: expected a unicast address, got "255.255.255.255" (broadcast)'),
    (_tunnel("", remote_ip='"2001:db8:0:1::2"'), 'tunnel[0].remote_ip: expected an IPv4 address like local_ip (198.18.0.1), got "2001:db8:0:1::2"'),
    (_tunnel("", remote_ip='"198.18.0.1"'), 'tunnel[0].remote_ip: must differ from local_ip, got "198.18.0.1"'),
    (_tunnel("", name='"abcdefghijklmnop"'), 'tunnel[0].name: expected an interface name of 1..15 characters from A-Z a-z 0-9 . _ -, got "abcdefghijklmnop"'),
    (_tunnel("", name='"a/b"'), 'tunnel[0].name: expected an interface name of 1..15 characters from A-Z a-z 0-9 . _ -, got "a/b"'),
    (_tunnel("", name='".."'), 'tunnel[0].name: expected an interface name of 1..15 characters from A-Z a-z 0-9 . _ -, got ".."'),
    (_tunnel('dev = "with space"'), 'tunnel[0].dev: expected an interface name of 1..15 characters from A-Z a-z 0-9 . _ -, got "with space"'),
    (_tunnel("bridge = 5"), "tunnel[0].bridge: expected an interface name of 1..15 characters from A-Z a-z 0-9 . _ -, got 5"),
    (_tunnel("dst_port = 0"), "tunnel[0].dst_port: expected an integer 1..65535, got 0"),
    (_tunnel("dst_port = 65536"), "tunnel[0].dst_port: expected an integer 1..65535, got 65536"),
    (_tunnel('dst_port = "7471"'), 'tunnel[0].dst_port: expected an integer 1..65535, got "7471"'),
    (_tunnel("mtu = 67"), "tunnel[0].mtu: expected an integer 68..65000, got 67"),
    (_tunnel("mtu = 65001"), "tunnel[0].mtu: expected an integer 68..65000, got 65001"),
    (_tunnel("tos = 64"), 'tunnel[0].tos: expected a DSCP value 0..63 or "inherit", got 64'),
    (_tunnel('tos = "copy"'), 'tunnel[0].tos: expected a DSCP value 0..63 or "inherit", got "copy"'),
    (_tunnel("ttl = 0"), 'tunnel[0].ttl: expected an integer 1..255 or "inherit", got 0'),
    (_tunnel("ttl = 256"), 'tunnel[0].ttl: expected an integer 1..255 or "inherit", got 256'),
    (_tunnel('df = "yes"'), 'tunnel[0].df: expected true or false, got "yes"'),
    (_tunnel("offload = 1"), "tunnel[0].offload: expected true or false, got 1"),
    (_tunnel("persist = []"), "tunnel[0].persist: expected true or false, got an array"),
    (_tunnel("underlay_mtu = 300"), "tunnel[0].underlay_mtu: expected an integer 576..65535, got 300"),
    (_tunnel("underlay_mtu = 575"), "tunnel[0].underlay_mtu: expected an integer 576..65535, got 575"),
    (_tunnel("underlay_mtu = 65536"), "tunnel[0].underlay_mtu: expected an integer 576..65535, got 65536"),
    (
        _tunnel("underlay_mtu = 300", local_ip='"2001:db8:0:1::1"', remote_ip='"2001:db8:0:1::2"'),
        "tunnel[0].underlay_mtu: expected an integer 576..65535, got 300",
    ),
    (T0 + T0, 'tunnel[1].name: duplicate name "t0" (also tunnel[0])'),
    (T0 + _tunnel("", name='"t1"', remote_ip='"198.18.0.3"') + 'dev = "t0"\n', 'tunnel[1].dev: TAP device "t0" is already used by tunnel[0] ("t0")'),
    (_tunnel('dev = "x"') + T1.replace('name = "t1"', 'name = "x"'), 'tunnel[1].name: TAP device "x" is already used by tunnel[0] ("t0")'),
    (T0 + _tunnel("", name='"t1"'), CLASH),
    (T0 + _tunnel("in_key = 1\nout_key = 9", name='"t1"', key=""), CLASH),
    # the regression of issue #12: dst_port is not part of the receive match
    (T0 + _tunnel("dst_port = 7472", name='"t1"'), CLASH),
    ("", "no tunnels: add at least one [[tunnel]] table (or [daemon] ovsdb = ...)"),
    ("tunnel = []", "no tunnels: add at least one [[tunnel]] table (or [daemon] ovsdb = ...)"),
    ('[tunnel]\nname = "t0"', "tunnel: expected an array of tables ([[tunnel]]), got a table"),
    ("tunnel = [1]", "tunnel[0]: expected a table, got 1"),
    ("[deamon]\n" + T0, "deamon: unknown key (did you mean daemon?)"),
    ("daemon = 1\n" + T0, "daemon: expected a table ([daemon]), got 1"),
    ('[daemon]\nmetric = "x:1"\n' + T0, "daemon.metric: unknown key (did you mean metrics?)"),
    ('[daemon]\nmetrics = "localhost"\n' + T0, 'daemon.metrics: expected "host:port" (IPv6 as "[::1]:9100"), got "localhost"'),
    ('[daemon]\nmetrics = "::1:9100"\n' + T0, 'daemon.metrics: expected "host:port" (IPv6 as "[::1]:9100"), got "::1:9100"'),
    ('[daemon]\nmetrics = "[::1]:0"\n' + T0, 'daemon.metrics: expected a port 1..65535 after the colon, got "[::1]:0"'),
    ('[daemon]\nmetrics = "[nope]:9100"\n' + T0, 'daemon.metrics: expected an IPv6 address in brackets, got "[nope]:9100"'),
    ('[daemon]\nlog_level = "verbose"\n' + T0, 'daemon.log_level: expected one of "debug", "info", "warning", "error", "critical", got "verbose"'),
    ('[daemon]\nlog_format = "xml"\n' + T0, 'daemon.log_format: expected one of "text", "json", got "xml"'),
    ('[daemon]\nfirewall = "off"\n' + T0, 'daemon.firewall: expected true or false, got "off"'),
    ('[daemon]\ninstance = "1abc"\n' + T0, 'daemon.instance: expected a name of 1..32 characters from A-Z a-z 0-9 _ -, starting with a letter, got "1abc"'),
    ('[daemon]\ncontrol_socket = ""\n' + T0, 'daemon.control_socket: expected a non-empty string, got ""'),
    (
        f'[daemon]\ncontrol_socket = "/{"x" * 107}"\n' + T0,
        f'daemon.control_socket: expected a socket path of at most 107 bytes, got "/{"x" * 107}"',
    ),
    ("[daemon]\nreassembly_timeout = 0\n" + T0, "daemon.reassembly_timeout: expected a number of seconds > 0 and <= 3600, got 0"),
    ('[daemon]\nreassembly_timeout = "30"\n' + T0, 'daemon.reassembly_timeout: expected a number of seconds > 0 and <= 3600, got "30"'),
    (
        '[daemon]\nreassembly_high_water = "4 MB"\n' + T0,
        'daemon.reassembly_high_water: expected a size in bytes >= 65536 (an integer, or a string like "4MiB"), got "4 MB"',
    ),
    (
        "[daemon]\nreassembly_high_water = 1000\n" + T0,
        'daemon.reassembly_high_water: expected a size in bytes >= 65536 (an integer, or a string like "4MiB"), got 1000',
    ),
    (
        '[daemon]\nreassembly_low_water = "4MiB"\n' + T0,
        "daemon.reassembly_low_water: reassembly_low_water (4194304) must be below reassembly_high_water (4194304)",
    ),
    (
        '[daemon]\nreassembly_source_budget = "8MiB"\n' + T0,
        'daemon.reassembly_source_budget: must not exceed reassembly_high_water (4194304), got "8MiB"',
    ),
    ("[[tunnel]\n", None),  # invalid TOML: message checked separately
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [b for b in BAD if b[1] is not None])
def test_bad_config_messages(write, text: str, message: str) -> None:
    path = write(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"sttun.toml: {message}"


def test_invalid_toml(write) -> None:
    with pytest.raises(ConfigError, match=r"^sttun\.toml: invalid TOML: .*line 1"):
        load_config(write("[[tunnel]\n"))


def test_missing_file(write) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("nope.toml")
    assert str(exc.value) == "nope.toml: cannot read: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: (not UTF-8|invalid TOML)"):
        load_config(p)


def test_defaults(write) -> None:
    cfg = load_config(write(T0))
    assert cfg == DaemonConfig(
        tunnels=(
            TunnelConfig(
                name="t0",
                local_ip=ipaddress.IPv4Address("198.18.0.1"),
                remote_ip=ipaddress.IPv4Address("198.18.0.2"),
                in_key=1,
                out_key=1,
            ),
        ),
        config_path="sttun.toml",
    )
    t = cfg.tunnels[0]
    assert (t.dev, t.dst_port, t.mtu, t.tos, t.ttl, t.df, t.offload, t.persist) == (
        "t0", 7471, 1500, "inherit", 64, True, True, False,
    )  # fmt: skip
    assert t.bridge is None and t.underlay_mtu is None and t.family == 4
    assert cfg.instance == "sttun"
    assert cfg.control_socket == "/run/sttun/sttun.sock"
    assert cfg.metrics is None and cfg.firewall is True
    assert (cfg.log_level, cfg.log_format) == ("info", "text")
    assert cfg.reassembly_timeout == 30.0
    assert cfg.reassembly_high_water == DEFAULT_HIGH_WATER == 4 * 1024 * 1024
    assert cfg.reassembly_low_water == DEFAULT_LOW_WATER == 3 * 1024 * 1024
    assert cfg.reassembly_source_budget is None


FULL = """
[daemon]
instance = "tenant2"
metrics = "[::1]:9100"
log_level = "DEBUG"
log_format = "json"
firewall = false
reassembly_timeout = 10
reassembly_high_water = "8MiB"
reassembly_low_water = 1048576
reassembly_source_budget = "2 MiB"

[[tunnel]]
name = "a"
dev = "tap-a"
local_ip = "2001:db8:0:1::1"
remote_ip = "2001:db8:0:1::2"
key = "0xffffffffffffffff"
out_key = 7
dst_port = 7472
mtu = 9000
bridge = "br0"
tos = "inherit"
ttl = "inherit"
df = false
offload = false
persist = true
underlay_mtu = 9000

[[tunnel]]
name = "b"
local_ip = "198.18.0.1"
remote_ip = "198.18.0.2"
in_key = 0
out_key = 0o17
tos = 46
ttl = 1
"""


def test_full_file(write) -> None:
    cfg = load_config(write(FULL))
    assert cfg.instance == "tenant2"
    assert cfg.control_socket == "/run/sttun/tenant2.sock"  # follows the instance
    assert cfg.metrics == "[::1]:9100"
    assert (cfg.log_level, cfg.log_format, cfg.firewall) == ("debug", "json", False)
    assert cfg.reassembly_timeout == 10.0 and isinstance(cfg.reassembly_timeout, float)
    assert cfg.reassembly_high_water == 8 * 2**20
    assert cfg.reassembly_low_water == 2**20
    assert cfg.reassembly_source_budget == 2 * 2**20
    a, b = cfg.tunnels
    assert a.dev == "tap-a" and a.family == 6
    assert (a.in_key, a.out_key) == (2**64 - 1, 7)  # key sets both, out_key overrides
    assert (a.dst_port, a.mtu, a.bridge, a.tos, a.ttl) == (7472, 9000, "br0", INHERIT, INHERIT)
    assert (a.df, a.offload, a.persist, a.underlay_mtu) == (False, False, True, 9000)
    assert (b.in_key, b.out_key, b.tos, b.ttl, b.dev) == (0, 15, 46, 1, "b")
    assert cfg.tunnel("b") is b
    with pytest.raises(KeyError):
        cfg.tunnel("c")


def test_default_low_water_follows_high_water(write) -> None:
    cfg = load_config(write('[daemon]\nreassembly_high_water = "8MiB"\n' + T0))
    assert cfg.reassembly_low_water == 6 * 2**20


def test_same_key_allowed_to_another_remote_or_from_another_local(write) -> None:
    other_remote = T0 + _tunnel("", name='"t1"', remote_ip='"198.18.0.3"')
    other_local = T0 + _tunnel("", name='"t1"', local_ip='"198.18.0.9"')
    other_in_key = T0 + _tunnel("in_key = 2\nout_key = 1", name='"t1"', key="")
    for text in (other_remote, other_local, other_in_key):
        assert len(load_config(write(text)).tunnels) == 2


def test_underlay_mtu_floor_is_the_cores() -> None:
    assert MIN_UNDERLAY_MTU == encap.MIN_UNDERLAY_MTU == 576
    assert MAX_UNDERLAY_MTU == 65535


def test_underlay_mtu_limits_accepted(write) -> None:
    for mtu in (MIN_UNDERLAY_MTU, 1280, 9000, MAX_UNDERLAY_MTU):
        cfg = load_config(write(_tunnel(f"underlay_mtu = {mtu}")))
        assert cfg.tunnels[0].underlay_mtu == mtu
        assert tunnel_spec(cfg.tunnels[0], route_mtu=1400).underlay_mtu == mtu


# --- the core's view: tunnel_spec, core_endpoint, validate_with_core ---------------


def test_tunnel_spec(write) -> None:
    a, b = load_config(write(FULL)).tunnels
    sa = tunnel_spec(a)
    assert (sa.name, sa.local, sa.remote) == ("a", a.local_ip.packed, a.remote_ip.packed)
    assert (sa.in_key, sa.out_key, sa.dst_port, sa.df) == (2**64 - 1, 7, 7472, False)
    assert (sa.tos, sa.ttl, sa.dscp_model, sa.underlay_mtu) == (None, None, DscpModel.UNIFORM, 9000)
    sb = tunnel_spec(b)
    assert (sb.tos, sb.ttl, sb.dscp_model) == (46, 1, DscpModel.PIPE)
    assert sb.underlay_mtu == 1500  # no underlay_mtu, no route known
    assert tunnel_spec(b, route_mtu=1400).underlay_mtu == 1400  # the route's MTU


def test_core_endpoint_limits(write) -> None:
    cfg = load_config(write(FULL))
    r = core_endpoint(cfg).reassembler
    assert (r.timeout, r.high_water, r.low_water, r.source_budget) == (
        10.0, 8 * 2**20, 2**20, 2 * 2**20,
    )  # fmt: skip
    small = load_config(write("[daemon]\nreassembly_high_water = 1000000\n" + T0))
    assert core_endpoint(small).reassembler.source_budget == 500000  # half the high water
    assert core_endpoint(load_config(write(T0))).reassembler.source_budget == (
        DEFAULT_SOURCE_BUDGET
    )


def test_validate_with_core_names_file_and_tunnel(write) -> None:
    ok = load_config(write(T0 + T1))
    validate_with_core(ok)  # what load_config returns has passed it
    clash = dataclasses.replace(
        ok,
        tunnels=(
            ok.tunnels[0],
            dataclasses.replace(ok.tunnels[0], name="t1", dev="t1", dst_port=7472),
        ),
    )
    with pytest.raises(ConfigError) as exc:
        validate_with_core(clash)
    assert str(exc.value) == f"sttun.toml: {CLASH}"
    # a value the core refuses that the file's checks did not see (built directly)
    low = dataclasses.replace(ok, tunnels=(dataclasses.replace(ok.tunnels[0], underlay_mtu=300),))
    with pytest.raises(ConfigError) as exc:
        validate_with_core(low)
    assert str(exc.value) == "sttun.toml: tunnel[0]: underlay MTU: expected >= 576, got 300"
    flags_only = dataclasses.replace(low, config_path=None)
    with pytest.raises(ConfigError, match=r"^tunnel\[0\]: underlay MTU"):
        validate_with_core(flags_only)


def test_configs_are_frozen_and_hashable(write) -> None:
    cfg = load_config(write(T0 + T1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tunnels[0].mtu = 9000  # type: ignore[misc]
    assert len({cfg, load_config("sttun.toml")}) == 1


def test_ovs_option_names_cover_every_tunnel_key() -> None:
    fields = {f.name for f in dataclasses.fields(TunnelConfig)}
    assert set(OVS_OPTION_NAMES) - {"key"} == fields
    assert OVS_OPTION_NAMES["df"] == "df_default"
    assert OVS_OPTION_NAMES["remote_ip"] == "remote_ip"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:9100", ("::1", 9100)),
        (":9100", ("", 9100)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["9100", "host:", "host:x", "::1:9100", "[::1]9100", "a b:1"])
def test_parse_hostport_bad(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_hostport(text)


# --- the flags form ------------------------------------------------------------


def _args(*argv: str):
    return build_parser().parse_args(["up", *argv])


BASE = ("--local-ip", "198.18.0.1", "--remote-ip", "198.18.0.2", "--key", "0x10")


def test_from_args_defaults() -> None:
    cfg = config_from_args(_args(*BASE))
    (t,) = cfg.tunnels
    assert (t.name, t.dev, t.in_key, t.out_key, t.mtu, t.df, t.offload) == (
        "stt0", "stt0", 16, 16, 1500, True, True,
    )  # fmt: skip
    assert cfg.config_path is None and cfg.control_socket == "/run/sttun/sttun.sock"


def test_from_args_everything() -> None:
    cfg = config_from_args(
        _args(
            *BASE,
            "--in-key", "5", "--dev", "tap9", "--dst-port", "7000", "--mtu", "9000",
            "--bridge", "br0", "--tos", "inherit", "--ttl", "9", "--no-df", "--no-offload",
            "--persist", "--underlay-mtu", "1400", "--metrics", ":9100", "--log-level", "debug",
            "--log-format", "json", "--no-firewall", "--instance", "x1",
        )
    )  # fmt: skip
    (t,) = cfg.tunnels
    assert (t.name, t.in_key, t.out_key, t.dst_port, t.mtu, t.bridge) == (
        "tap9", 5, 16, 7000, 9000, "br0",
    )  # fmt: skip
    assert (t.tos, t.ttl, t.df, t.offload, t.persist, t.underlay_mtu) == (
        "inherit", 9, False, False, True, 1400,
    )  # fmt: skip
    assert (cfg.metrics, cfg.log_level, cfg.log_format, cfg.firewall, cfg.instance) == (
        ":9100", "debug", "json", False, "x1",
    )  # fmt: skip
    assert cfg.control_socket == "/run/sttun/x1.sock"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--key", "-5"), '--key: expected an integer 0..18446744073709551615, got "-5"'),
        (("--key", "x"), '--key: expected an integer 0..18446744073709551615, got "x"'),
        (("--mtu", "70000"), "--mtu: expected an integer 68..65000, got 70000"),
        (("--mtu", "big"), '--mtu: expected an integer 68..65000, got "big"'),
        (("--dst-port", "0"), "--dst-port: expected an integer 1..65535, got 0"),
        (("--tos", "99"), '--tos: expected a DSCP value 0..63 or "inherit", got 99'),
        (("--ttl", "x"), '--ttl: expected an integer 1..255 or "inherit", got "x"'),
        (
            ("--dev", "much-too-long-name"),
            "--dev: expected an interface name of 1..15 characters from A-Z a-z 0-9 . _ -, "
            'got "much-too-long-name"',
        ),
        (("--remote-ip", "2001:db8::1"), '--remote-ip: expected an IPv4 address like '
         'local_ip (198.18.0.1), got "2001:db8::1"'),
        (("--metrics", "9100"), '--metrics: expected "host:port" (IPv6 as "[::1]:9100"), got "9100"'),
        (("--instance=-x",), "--instance: expected a name of 1..32 characters from A-Z a-z "
         '0-9 _ -, starting with a letter, got "-x"'),
        (("--underlay-mtu", "10"), "--underlay-mtu: expected an integer 576..65535, got 10"),
        (("--underlay-mtu", "300", "--local-ip", "2001:db8::1", "--remote-ip", "2001:db8::2"),
         "--underlay-mtu: expected an integer 576..65535, got 300"),
    ],
)  # fmt: skip
def test_from_args_bad(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_args(_args(*BASE, *argv))
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--remote-ip", "198.18.0.2", "--key", "1"), "--local-ip is required (or give a file with -c FILE.toml)"),
        (("--local-ip", "198.18.0.1", "--key", "1"), "--remote-ip is required (or give a file with -c FILE.toml)"),
        (("--local-ip", "198.18.0.1", "--remote-ip", "198.18.0.2"), "--key is required (or both --in-key and --out-key)"),
        (("--local-ip", "198.18.0.1", "--remote-ip", "198.18.0.2", "--in-key", "1"),
         "--out-key: required key is missing (give key, or out_key as well as in_key)"),
    ],
)  # fmt: skip
def test_from_args_missing(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_args(_args(*argv))
    assert str(exc.value) == message


def test_file_with_daemon_overrides(write) -> None:
    path = write('[daemon]\nlog_level = "warning"\nmetrics = "127.0.0.1:1"\n' + T0)
    cfg = config_from_args(_args("-c", path, "--metrics", "[::1]:9200", "--instance", "o2"))
    assert cfg.metrics == "[::1]:9200"
    assert cfg.log_level == "warning"  # not overridden: from the file
    assert cfg.control_socket == "/run/sttun/o2.sock"
    assert cfg.config_path == "sttun.toml"
    # a bad override names the flag, not the file
    with pytest.raises(ConfigError) as exc:
        config_from_args(_args("-c", path, "--metrics", "nope"))
    assert str(exc.value) == '--metrics: expected "host:port" (IPv6 as "[::1]:9100"), got "nope"'
    # while a bad file value still names the file
    path = write('[daemon]\nlog_level = "loud"\n' + T0)
    with pytest.raises(ConfigError, match=r"^sttun\.toml: daemon\.log_level: "):
        config_from_args(_args("-c", path, "--metrics", ":1"))


@pytest.mark.parametrize("flag", [("--local-ip", "198.18.0.1"), ("--no-df",), ("--persist",)])
def test_file_refuses_tunnel_flags(write, flag: tuple[str, ...]) -> None:
    path = write(T0)
    with pytest.raises(ConfigError) as exc:
        config_from_args(_args("-c", path, *flag))
    assert str(exc.value) == (
        f"{flag[0]} cannot be combined with -c/--config: "
        "describe the tunnels in the file, or give no file"
    )


# --- reload ------------------------------------------------------------------------


def test_diff_configs(write) -> None:
    t2 = T1.replace('"t1"', '"t2"').replace("198.18.0.3", "198.18.0.4")
    t3 = T1.replace('"t1"', '"t3"').replace("198.18.0.3", "198.18.0.5")
    old = load_config(write(T0 + T1 + t2))
    new = load_config(write(t3 + T1.replace("key = 2", "key = 2\nmtu = 9000") + t2))
    added, removed, changed = diff_configs(old, new)
    assert [t.name for t in added] == ["t3"]
    assert [t.name for t in removed] == ["t0"]
    assert [(o.name, o.mtu, n.mtu) for o, n in changed] == [("t1", 1500, 9000)]
    assert changed_fields(*changed[0]) == ("mtu",)
    assert diff_configs(old, old) == ((), (), ())


def test_diff_rename_is_remove_plus_add(write) -> None:
    old = load_config(write(T0))
    new = load_config(write(T0.replace('"t0"', '"t9"')))
    d = diff_configs(old, new)
    assert [t.name for t in d.added] == ["t9"] and [t.name for t in d.removed] == ["t0"]
    assert d.changed == ()


def test_daemon_changed_fields(write) -> None:
    old = load_config(write(T0))
    new = load_config(write('[daemon]\nlog_level = "debug"\n' + T0 + T1))
    assert changed_fields(old, new) == ("log_level",)


def test_reload_keeps_overrides(write) -> None:
    path = write(T0)
    cfg = config_from_args(_args("-c", path, "--log-level", "error"))
    write(T0 + T1)
    again = reload_config(cfg)
    assert again.log_level == "error"
    assert [t.name for t in again.tunnels] == ["t0", "t1"]
    write(T0.replace('"t0"', "5"))
    with pytest.raises(ConfigError, match=r"^sttun\.toml: tunnel\[0\]\.name"):
        reload_config(cfg)


def test_reload_without_file() -> None:
    cfg = config_from_args(_args(*BASE))
    with pytest.raises(ConfigError, match="command-line flags"):
        reload_config(cfg)


def test_reload_refuses_what_the_core_refuses(write) -> None:
    """SIGHUP's reload_config runs validate_with_core: a clash is a ConfigError."""
    cfg = load_config(write(T0))
    write(T0 + _tunnel("dst_port = 7472", name='"t1"'))
    with pytest.raises(ConfigError) as exc:
        reload_config(cfg)
    assert str(exc.value) == f"sttun.toml: {CLASH}"
    write(_tunnel("underlay_mtu = 300"))
    with pytest.raises(ConfigError, match=r"underlay_mtu: expected an integer 576\.\.65535"):
        reload_config(cfg)


def test_parse_config_runs_the_core_checks() -> None:
    t = {"name": "a", "local_ip": "198.18.0.1", "remote_ip": "198.18.0.2", "key": 1}
    doc = {"tunnel": [t, {**t, "name": "b", "dst_port": 7000}]}
    with pytest.raises(ConfigError, match=r"^doc: tunnel\[1\]: tunnels 'a' and 'b' have the same"):
        parse_config(doc, source="doc")


# --- the key table -------------------------------------------------------------------


def test_key_table_is_complete_and_unique() -> None:
    names = [(k.section, k.name) for k in CONFIG_KEYS]
    assert len(set(names)) == len(names)
    flags = [k.flag for k in CONFIG_KEYS if k.flag]
    assert len(set(flags)) == len(flags)
    tunnel_fields = {f.name for f in dataclasses.fields(TunnelConfig)}
    assert {k.name for k in TUNNEL_KEYS} == tunnel_fields - {"in_key", "out_key"} | {
        "key", "in_key", "out_key",
    }  # fmt: skip
    daemon_fields = {f.name for f in dataclasses.fields(DaemonConfig)}
    assert {k.name for k in DAEMON_KEYS} == daemon_fields - {"tunnels", "config_path", "overrides"}
    assert {k.name: k.ovs for k in TUNNEL_KEYS} == OVS_OPTION_NAMES


def test_every_flag_of_the_table_is_a_flag_of_up() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    up = sub.choices["up"]
    by_flag = {s: a for a in up._actions for s in a.option_strings}
    for k in CONFIG_KEYS:
        if k.flag is None:
            continue
        action = by_flag[k.flag]
        assert action.dest == k.name, k
        assert action.default is None, k  # "not given" is None for every flag
        assert action.help == k.help and k.help, k
        if k.const is not None:
            assert action.const is k.const and action.nargs == 0, k


def test_switches_store_their_value() -> None:
    ns = _args(*BASE, "--no-df", "--no-offload", "--persist", "--no-firewall")
    assert (ns.df, ns.offload, ns.persist, ns.firewall) == (False, False, True, False)
    ns = _args(*BASE)
    assert (ns.df, ns.offload, ns.persist, ns.firewall) == (None, None, None, None)


def test_describe_config(write) -> None:
    text = describe_config(load_config(write(FULL)))
    assert text.splitlines() == [
        "instance tenant2, control socket /run/sttun/tenant2.sock, metrics [::1]:9100, "
        "firewall off, fast path auto, log debug/json",
        "tunnel a dev tap-a: 2001:db8:0:1::1 -> 2001:db8:0:1::2 port 7472 "
        "key 0xffffffffffffffff/0x7 mtu 9000 bridge br0",
        "tunnel b: 198.18.0.1 -> 198.18.0.2 port 7471 key 0x0/0xf mtu 1500",
        "configuration OK: 2 tunnels",
    ]
