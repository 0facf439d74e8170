"""OVS type=stt options -> OvsTunnel / RowError (sttun.daemon.ovs_tunnel)."""

from __future__ import annotations

import ipaddress

import pytest

from sttun.daemon.ovs_tunnel import (
    FLOW_HINT,
    OvsTunnel,
    RowError,
    parse_c_ulong,
    resolve_clashes,
    translate,
)

R = "198.18.0.2"
L = "198.18.0.1"


def ok(options: dict[str, str], **kw: object) -> OvsTunnel:
    res = translate("stt0", options, is_local=lambda a: a == L, **kw)  # type: ignore[arg-type]
    assert isinstance(res, OvsTunnel), res
    return res


def err(options: dict[str, str]) -> str:
    res = translate("stt0", options, is_local=lambda a: a == L)
    assert isinstance(res, RowError), res
    assert res.name == "stt0"
    return res.message


def test_the_old_command_gives_ovs_defaults() -> None:
    t = ok({"remote_ip": R, "key": "42"})
    assert t == OvsTunnel(
        name="stt0",
        remote_ip=ipaddress.ip_address(R),
        local_ip=None,
        in_key=42,
        out_key=42,
        dst_port=7471,
        tos=0,
        ttl=64,
        df=True,
        mtu=None,
        offload=False,
    )
    assert t.dev == "stt0"


def test_key_defaults_to_zero() -> None:
    t = ok({"remote_ip": R})
    assert (t.in_key, t.out_key) == (0, 0)


@pytest.mark.parametrize(
    ("options", "keys"),
    [
        ({"key": "7"}, (7, 7)),
        ({"in_key": "1", "out_key": "2"}, (1, 2)),
        ({"key": "5", "in_key": "1"}, (1, 5)),
        ({"key": "5", "out_key": "9"}, (5, 9)),
        ({"key": "0x10"}, (16, 16)),
        ({"key": "010"}, (8, 8)),  # strtoull base 0: leading 0 is octal
        ({"key": str(2**64 - 1)}, (2**64 - 1, 2**64 - 1)),
    ],
)
def test_keys_as_ovs_reads_them(options: dict[str, str], keys: tuple[int, int]) -> None:
    t = ok({"remote_ip": R, **options})
    assert (t.in_key, t.out_key) == keys


@pytest.mark.parametrize(
    ("options", "field", "value"),
    [
        ({"local_ip": L}, "local_ip", ipaddress.ip_address(L)),
        ({"dst_port": "8000"}, "dst_port", 8000),
        ({"tos": "0x28"}, "tos", 10),  # ToS byte -> DSCP
        ({"tos": "inherit"}, "tos", "inherit"),
        ({"ttl": "32"}, "ttl", 32),
        ({"ttl": "0"}, "ttl", 64),  # OVS: 0 means the default
        ({"ttl": "inherit"}, "ttl", "inherit"),
        ({"df_default": "false"}, "df", False),
        ({"df_default": "true"}, "df", True),
        ({"df_default": "no"}, "df", True),  # only "false" clears DF in OVS
        ({"csum": "true"}, "df", True),  # accepted, nothing changes
        ({"packet_type": "legacy_l2"}, "dst_port", 7471),
    ],
)
def test_options(options: dict[str, str], field: str, value: object) -> None:
    assert getattr(ok({"remote_ip": R, **options}), field) == value


def test_mtu_request_and_offload_come_from_outside_the_options() -> None:
    t = ok({"remote_ip": R}, mtu_request=9000, userspace_tso=True)
    assert (t.mtu, t.offload) == (9000, True)


def test_unknown_options_are_ignored_and_listed() -> None:
    t = ok({"remote_ip": R, "frobnicate": "1", "csum": "true"})
    assert t.ignored == ("frobnicate",)


def test_ipv6() -> None:
    t = ok({"remote_ip": "2001:db8:0:1::2"})
    assert t.remote_ip == ipaddress.ip_address("2001:db8:0:1::2")


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({}, "remote_ip is required"),
        ({"remote_ip": "flow"}, f"remote_ip=flow is not supported: {FLOW_HINT}"),
        ({"remote_ip": R, "key": "flow"}, f"key=flow is not supported: {FLOW_HINT}"),
        ({"remote_ip": R, "in_key": "flow"}, "in_key=flow is not supported"),
        ({"remote_ip": R, "out_key": "flow"}, "out_key=flow is not supported"),
        ({"remote_ip": R, "local_ip": "flow"}, "local_ip=flow is not supported"),
        ({"remote_ip": R, "local_ip": "198.18.0.9"}, "local_ip 198.18.0.9 is not an address"),
        ({"remote_ip": R, "local_ip": "2001:db8:0:1::1"}, "same address family"),
        ({"remote_ip": "host.example"}, "remote_ip: expected an IPv4 or IPv6 address"),
        ({"remote_ip": "224.0.0.1"}, "expected a unicast address"),
        ({"remote_ip": R, "key": "12abc"}, "key: expected a key 0..18446744073709551615"),
        ({"remote_ip": R, "key": str(2**64)}, "key: expected a key"),
        ({"remote_ip": R, "key": "-1"}, "key: expected a key"),
        ({"remote_ip": R, "dst_port": "0"}, "dst_port: expected a port 1..65535"),
        ({"remote_ip": R, "dst_port": "70000"}, "dst_port: expected a port"),
        ({"remote_ip": R, "tos": "0x29"}, "tos: expected a ToS byte with the ECN bits zero"),
        ({"remote_ip": R, "ttl": "300"}, "ttl: expected 0..255"),
        ({"remote_ip": R, "packet_type": "ptap"}, "packet_type=ptap is not supported"),
        ({"remote_ip": R, "psk": "secret"}, "psk is not supported: IPsec"),
        ({"remote_ip": R, "egress_pkt_mark": "5"}, "egress_pkt_mark is not supported"),
    ],
)
def test_rows_sttun_cannot_serve(options: dict[str, str], expect: str) -> None:
    assert expect in err(options)


def test_every_problem_of_a_row_is_named() -> None:
    msg = err({"key": "flow", "dst_port": "x"})
    assert "remote_ip is required" in msg
    assert "key=flow" in msg
    assert "dst_port" in msg


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("42", 42), (" 42 ", 42), ("+3", 3), ("0x1F", 31), ("017", 15),
     ("", None), ("0x", None), ("08", None), ("1e3", None), ("-1", None), ("flow", None)],
)  # fmt: skip
def test_parse_c_ulong(text: str, value: int | None) -> None:
    assert parse_c_ulong(text) == value


def _t(name: str, key: int, local: str | None = None, remote: str = R) -> OvsTunnel:
    return OvsTunnel(
        name=name,
        remote_ip=ipaddress.ip_address(remote),
        local_ip=ipaddress.ip_address(local) if local else None,
        in_key=key,
        out_key=key,
    )


def test_clash_first_name_wins_and_served_tunnels_keep_their_place() -> None:
    a, b = _t("stt-a", 1), _t("stt-b", 1)
    kept, errors = resolve_clashes([b, a], {})
    assert list(kept) == ["stt-a"]
    assert [e.name for e in errors] == ["stt-b"]
    assert "key clash with interface stt-a" in errors[0].message
    kept, errors = resolve_clashes([a, b], {"stt-b": b})
    assert list(kept) == ["stt-b"]
    assert [e.name for e in errors] == ["stt-a"]


@pytest.mark.parametrize(
    ("x", "y", "clash"),
    [
        (_t("a", 1), _t("b", 2), False),
        (_t("a", 1), _t("b", 1, remote="198.18.0.3"), False),
        (_t("a", 1, local=L), _t("b", 1, local="198.18.0.5"), False),
        (_t("a", 1, local=L), _t("b", 1, local=L), True),
        (_t("a", 1, local=L), _t("b", 1), True),  # no local_ip: receives on every address
    ],
)
def test_what_clashes(x: OvsTunnel, y: OvsTunnel, clash: bool) -> None:
    assert x.clashes_with(y) is clash
    assert y.clashes_with(x) is clash
