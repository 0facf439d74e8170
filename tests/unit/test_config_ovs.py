"""The configuration side of ``sttun up --ovsdb``: the ``ovsdb`` and ``port_offload``
keys, a configuration without static tunnels, the OVS row -> TunnelConfig mapping,
and what ``sttun show`` prints about OVSDB."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from sttun.cli import build_parser
from sttun.daemon.config import DEFAULT_MTU, config_from_args, describe_config, parse_config
from sttun.daemon.ovs_serve import tunnel_config
from sttun.daemon.ovs_tunnel import OvsTunnel
from sttun.errors import ConfigError
from sttun.tools.show import format_show_text

REMOTE = "unix:/var/run/openvswitch/db.sock"
TUNNEL = {"name": "t0", "local_ip": "198.18.0.1", "remote_ip": "198.18.0.2", "key": 1}


def up(*argv: str) -> Any:
    return config_from_args(build_parser().parse_args(["up", *argv]))


def test_ovsdb_alone_needs_no_tunnel() -> None:
    from_flags = up("--ovsdb", REMOTE)
    from_file = parse_config({"daemon": {"ovsdb": REMOTE}})
    for cfg in (from_flags, from_file):
        assert cfg.ovsdb == REMOTE and cfg.tunnels == ()
    assert "ovsdb unix:/var/run/openvswitch/db.sock" in describe_config(from_flags)
    assert "configuration OK: 0 tunnels" in describe_config(from_flags)


def test_ovsdb_with_static_tunnels() -> None:
    cfg = parse_config({"daemon": {"ovsdb": "tcp:127.0.0.1:6640"}, "tunnel": [TUNNEL]})
    assert [t.name for t in cfg.tunnels] == ["t0"]
    flags = up("--ovsdb", REMOTE, "--local-ip", "198.18.0.1", "--remote-ip", "198.18.0.2",
               "--key", "1")  # fmt: skip
    assert flags.ovsdb == REMOTE and len(flags.tunnels) == 1


@pytest.mark.parametrize("bad", ["", "/var/run/db.sock", "http://x", "unix:", 5])
def test_bad_ovsdb_remote(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"daemon\.ovsdb: expected|daemon\.ovsdb: expected a non"):
        parse_config({"daemon": {"ovsdb": bad}}, source="f")


def test_bad_ovsdb_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--ovsdb: expected an OVSDB remote"):
        up("--ovsdb", "db.sock")


def test_without_ovsdb_a_tunnel_is_still_required() -> None:
    with pytest.raises(ConfigError, match="no tunnels"):
        parse_config({"daemon": {}})
    with pytest.raises(ConfigError, match="--local-ip is required"):
        up("--key", "1")


def test_port_offload_key_and_flag() -> None:
    cfg = parse_config({"tunnel": [{**TUNNEL, "port_offload": False}]})
    assert cfg.tunnels[0].port_offload is False and cfg.tunnels[0].offload is True
    assert up("--local-ip", "198.18.0.1", "--remote-ip", "198.18.0.2", "--key", "1",
              "--no-port-offload").tunnels[0].port_offload is False  # fmt: skip
    assert parse_config({"tunnel": [TUNNEL]}).tunnels[0].port_offload is True


def test_port_offload_off_is_not_for_a_bridge() -> None:
    with pytest.raises(ConfigError, match=r"tunnel\[0\]\.port_offload: port_offload = false"):
        parse_config({"tunnel": [{**TUNNEL, "port_offload": False, "bridge": "br0"}]}, "f")


def test_tunnel_config_of_an_ovs_row() -> None:
    t = OvsTunnel(
        name="stt0",
        remote_ip=ipaddress.ip_address("198.18.0.2"),
        in_key=5,
        out_key=6,
        tos=10,
        ttl="inherit",
        df=False,
        offload=True,
    )
    cfg = tunnel_config(t, "198.18.0.1")  # no local_ip in the row: the route's source
    assert (str(cfg.local_ip), cfg.in_key, cfg.out_key, cfg.tos, cfg.ttl, cfg.df) == (
        "198.18.0.1", 5, 6, 10, "inherit", False,
    )  # fmt: skip
    # OVS's userspace TSO is about the port; the underlay keeps kernel GSO
    assert (cfg.port_offload, cfg.offload, cfg.persist, cfg.mtu, cfg.dev) == (
        True, True, True, DEFAULT_MTU, "stt0",
    )  # fmt: skip
    own = OvsTunnel(
        name="stt1",
        remote_ip=ipaddress.ip_address("198.18.0.2"),
        local_ip=ipaddress.ip_address("198.18.0.3"),
        mtu=9000,
    )
    cfg = tunnel_config(own, "198.18.0.1")
    assert (str(cfg.local_ip), cfg.mtu, cfg.port_offload) == ("198.18.0.3", 9000, False)


def test_show_text_lists_ovs_interfaces() -> None:
    data: Any = {
        "pid": 1,
        "instance": "sttun",
        "started": 0.0,
        "tunnels": [
            {
                "name": "stt0",
                "dev": "stt0",
                "local_ip": "198.18.0.1",
                "remote_ip": "198.18.0.2",
                "in_key": 42,
                "out_key": 42,
                "dst_port": 7471,
                "state": "up",
                "ovs_interface": "stt0",
            },
            {
                "name": "t0",
                "dev": "t0",
                "local_ip": "198.18.0.1",
                "remote_ip": "198.18.0.3",
                "in_key": 1,
                "out_key": 1,
                "dst_port": 7471,
                "state": "up",
                "ovs_interface": None,
            },
        ],
        "drops": {},
        "reassembly": {},
        "ovsdb": {
            "remote": REMOTE,
            "connected": True,
            "userspace_tso": False,
            "interfaces": ["bad0", "stt0"],
            "errors": {"bad0": "remote_ip is required"},
        },
    }
    text = format_show_text(data, now=10.0)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("stt0", "t0"))}
    assert rows["stt0"].split()[1] == "(ovs)" and rows["t0"].split()[1] == "t0"
    assert f"ovsdb {REMOTE}: connected, userspace TSO off, type=stt interfaces: bad0, stt0" in text
    assert "ovs interface bad0 not served: remote_ip is required" in text
