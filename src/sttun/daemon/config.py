"""Endpoint configuration: a TOML file for many tunnels, or command-line flags for one.

Everything is validated before anything on the host is touched.  Every error is a
:class:`~sttun.errors.ConfigError` whose message names the file, the key path and the
bad value, e.g.::

    sttun.toml: tunnel[1].key: expected an integer 0..18446744073709551615, got -5
    sttun.toml: tunnel[0].remot_ip: unknown key (did you mean remote_ip?)

A file looks like this (every ``[daemon]`` key is optional)::

    [daemon]
    instance = "sttun"              # nft table and control socket names
    metrics = "127.0.0.1:9100"      # Prometheus endpoint; absent = off
    log_level = "info"
    log_format = "text"             # or "json"

    [[tunnel]]
    name = "stt0"                   # also the TAP device name unless dev is given
    local_ip = "198.18.0.1"
    remote_ip = "198.18.0.2"
    key = 0x1234                    # sets in_key and out_key; both can be overridden

The tunnel keys mirror the options of Open vSwitch STT ports
(:data:`OVS_OPTION_NAMES`).  Tunnels are matched on receive by
(local_ip, remote_ip, in_key, dst_port), so that tuple must be unique.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeAlias

from sttun.errors import ConfigError
from sttun.wire.stt import STT_PORT

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Inherit = Literal["inherit"]

INHERIT: Inherit = "inherit"
"""Value of ``tos`` / ``ttl`` that copies the inner packet's value."""

# --- limits and defaults (where each comes from) ---------------------------------
MAX_KEY = 2**64 - 1  # the STT context id is 64 bits (draft-davie-stt-08 §3.1)
IFNAMSIZ = 16  # Linux: interface names are at most 15 characters plus NUL
MIN_MTU = 68  # smallest IPv4 MTU (RFC 791)
MAX_OVERLAY_MTU = 65000  # inner frame + 18-byte STT header must fit a 64 KB frame
DEFAULT_MTU = 1500
MIN_UNDERLAY_MTU = {4: 68, 6: 1280}  # RFC 791 / RFC 8200 minimum link MTUs
MAX_UNDERLAY_MTU = 65535
# "inherit": the uniform DSCP model by default (issue 6, protocol.md §6): the outer
# header copies the inner DSCP and decapsulation copies the outer DSCP back in, so a
# re-marking in the underlay reaches the tenant.  Open vSwitch defaults to 0 (pipe).
DEFAULT_TOS: Inherit = "inherit"
DEFAULT_TTL = 64  # OVS DEFAULT_TTL
DEFAULT_INSTANCE = "sttun"
RUN_DIR = "/run/sttun"
UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
DEFAULT_REASSEMBLY_TIMEOUT = 30.0  # OVS FRAG_EXP_TIME (30 s)
MAX_REASSEMBLY_TIMEOUT = 3600.0
DEFAULT_HIGH_WATER = 4 * 1024 * 1024  # OVS REASM_HI_THRESH (4 MiB)
DEFAULT_LOW_WATER = 3 * 1024 * 1024  # OVS REASM_LO_THRESH (3 MiB)
MIN_HIGH_WATER = 65536  # must hold at least one maximal STT frame
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

OVS_OPTION_NAMES: Mapping[str, str | None] = {
    # our key        Open vSwitch (Interface type=stt); None: sttun only
    "name": None,  # the OVS Interface name
    "dev": None,
    "local_ip": "local_ip",
    "remote_ip": "remote_ip",
    "key": "key",
    "in_key": "in_key",
    "out_key": "out_key",
    "dst_port": "dst_port",
    "mtu": "mtu_request",  # an Interface column, not a tunnel option
    "bridge": None,  # OVS: the Bridge the port is on
    "tos": "tos",
    "ttl": "ttl",
    "df": "df_default",
    "offload": None,
    "persist": None,
    "underlay_mtu": None,
}
"""Each ``[[tunnel]]`` key and the Open vSwitch STT option it mirrors (for docs)."""

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,15}")
_INSTANCE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")  # nft table names: no "-"
_SIZE_RE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


@dataclass(frozen=True)
class TunnelConfig:
    """One STT tunnel: a TAP device joined to one remote endpoint by a context id."""

    name: str
    local_ip: IPAddress
    remote_ip: IPAddress
    in_key: int
    out_key: int
    dev: str = ""  # TAP device name; "" means the same as name
    dst_port: int = STT_PORT
    mtu: int = DEFAULT_MTU
    bridge: str | None = None
    tos: int | Inherit = DEFAULT_TOS
    ttl: int | Inherit = DEFAULT_TTL
    df: bool = True
    offload: bool = True
    persist: bool = False
    underlay_mtu: int | None = None

    def __post_init__(self) -> None:
        if not self.dev:
            object.__setattr__(self, "dev", self.name)

    @property
    def family(self) -> int:
        """4 or 6: the IP version of the outer (underlay) addresses."""
        return self.local_ip.version

    @property
    def demux_key(self) -> tuple[IPAddress, IPAddress, int, int]:
        """What a receiver matches a frame on: (local_ip, remote_ip, in_key, dst_port)."""
        return (self.local_ip, self.remote_ip, self.in_key, self.dst_port)


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``sttun up`` needs: the daemon settings and its tunnels."""

    tunnels: tuple[TunnelConfig, ...]
    instance: str = DEFAULT_INSTANCE
    control_socket: str = ""  # "" means /run/sttun/<instance>.sock
    metrics: str | None = None  # "host:port", see parse_hostport()
    log_level: str = "info"
    log_format: str = "text"
    firewall: bool = True
    reassembly_timeout: float = DEFAULT_REASSEMBLY_TIMEOUT
    reassembly_high_water: int = DEFAULT_HIGH_WATER
    reassembly_low_water: int = DEFAULT_LOW_WATER
    reassembly_source_budget: int | None = None  # None: the reassembler's default
    config_path: str | None = None  # the file it came from (None: command line)
    overrides: tuple[tuple[str, object], ...] = field(default=())  # CLI [daemon] overrides

    def __post_init__(self) -> None:
        if not self.control_socket:
            object.__setattr__(self, "control_socket", default_control_socket(self.instance))

    def tunnel(self, name: str) -> TunnelConfig:
        """The tunnel called ``name`` (KeyError if there is none)."""
        for t in self.tunnels:
            if t.name == name:
                return t
        raise KeyError(name)


def default_control_socket(instance: str = DEFAULT_INSTANCE) -> str:
    """The control socket path of ``instance``: ``/run/sttun/<instance>.sock``."""
    return f"{RUN_DIR}/{instance}.sock"


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:9100"`` for IPv6, ``":9100"`` for all addresses).

    Returns ``(host, port)``; host is ``""`` for all addresses.  Raises ValueError
    with a message that says what was expected.
    """
    expected = 'expected "host:port" (IPv6 as "[::1]:9100")'
    if not isinstance(text, str):
        raise ValueError(f"{expected}, got {_show(text)}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{expected}, got {_show(text)}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address in brackets, got {_show(text)}") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{expected}, got {_show(text)}")
        if host and not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
            raise ValueError(f"{expected}, got {_show(text)}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a port 1..65535 after the colon, got {_show(text)}")
    return host, int(port)


# --------------------------------------------------------------------------------
# value display and error construction


def _show(value: object) -> str:
    """Render a bad value the way it looks in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"


class _Where:
    """Turns a key path into the label an error message uses.

    ``source`` prefixes paths that came from the file; paths in ``flags`` came from
    the command line and are shown as the flag instead (``--key``).
    """

    def __init__(self, source: str | None, flags: Mapping[str, str], cli_strings: bool) -> None:
        self.source = source
        self.flags = flags
        self.cli_strings = cli_strings  # command-line values arrive as strings

    def error(self, path: str, message: str) -> ConfigError:
        if path in self.flags:
            return ConfigError(f"{self.flags[path]}: {message}")
        label = f"{path}: " if path else ""
        prefix = f"{self.source}: " if self.source else ""
        return ConfigError(f"{prefix}{label}{message}")


# --------------------------------------------------------------------------------
# value parsers: (value, path, where) -> parsed value, raising ConfigError


def _int(value: object, path: str, where: _Where, lo: int, hi: int, what: str = "") -> int:
    desc = what or f"an integer {lo}..{hi}"
    if isinstance(value, str) and where.cli_strings:
        try:
            value = int(value, 10)
        except ValueError:
            raise where.error(path, f"expected {desc}, got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise where.error(path, f"expected {desc}, got {_show(value)}")
    return value


def _key(value: object, path: str, where: _Where) -> int:
    desc = f"an integer 0..{MAX_KEY}"
    if isinstance(value, str):
        text = value
        try:
            number = int(text.strip(), 0)
        except ValueError:
            number = -1
        if not 0 <= number <= MAX_KEY:
            hint = " (flow-based keys are not supported)" if text.strip() == "flow" else ""
            raise where.error(path, f"expected {desc}, got {_show(text)}{hint}")
        return number
    return _int(value, path, where, 0, MAX_KEY, desc)


def _bool(value: object, path: str, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise where.error(path, f"expected true or false, got {_show(value)}")
    return value


def _str(value: object, path: str, where: _Where) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(path, f"expected a non-empty string, got {_show(value)}")
    return value


def _ifname(value: object, path: str, where: _Where) -> str:
    if not isinstance(value, str) or not _IFNAME_RE.fullmatch(value) or value in (".", ".."):
        raise where.error(
            path,
            f"expected an interface name of 1..{IFNAMSIZ - 1} characters "
            f"from A-Z a-z 0-9 . _ -, got {_show(value)}",
        )
    return value


def _address(value: object, path: str, where: _Where) -> IPAddress:
    if not isinstance(value, str):
        raise where.error(path, f"expected an IPv4 or IPv6 address, got {_show(value)}")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise where.error(path, f"expected an IPv4 or IPv6 address, got {_show(value)}") from None
    kind = None
    if addr.is_multicast:
        kind = "multicast"
    elif addr.is_unspecified:
        kind = "unspecified"
    elif addr == ipaddress.IPv4Address("255.255.255.255"):
        kind = "broadcast"
    if kind:
        raise where.error(path, f"expected a unicast address, got {_show(value)} ({kind})")
    return addr


def _tos(value: object, path: str, where: _Where) -> int | Inherit:
    if value == INHERIT:
        return INHERIT
    return _int(value, path, where, 0, 63, 'a DSCP value 0..63 or "inherit"')


def _ttl(value: object, path: str, where: _Where) -> int | Inherit:
    if value == INHERIT:
        return INHERIT
    return _int(value, path, where, 1, 255, 'an integer 1..255 or "inherit"')


def _size(value: object, path: str, where: _Where, lo: int) -> int:
    desc = f'a size in bytes >= {lo} (an integer, or a string like "4MiB")'
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise where.error(path, f"expected {desc}, got {_show(value)}")
        digits = m.group(1)
        # (> 4300 digits: int() raises ValueError; anything past 19 digits is too big)
        n = int(digits) * _SIZE_UNITS[m.group(2)] if len(digits) <= 19 else 2**63
        if not lo <= n <= 2**62:
            raise where.error(path, f"expected {desc}, got {_show(value)}")
        return n
    return _int(value, path, where, lo, 2**62, desc)


def _seconds(value: object, path: str, where: _Where) -> float:
    desc = f"a number of seconds > 0 and <= {MAX_REASSEMBLY_TIMEOUT:g}"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_REASSEMBLY_TIMEOUT
    ):
        raise where.error(path, f"expected {desc}, got {_show(value)}")
    return float(value)


def _choice(value: object, path: str, where: _Where, choices: Sequence[str]) -> str:
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    options = ", ".join(f'"{c}"' for c in choices)
    raise where.error(path, f"expected one of {options}, got {_show(value)}")


def _socket_path(value: object, path: str, where: _Where) -> str:
    text = _str(value, path, where)
    if "\0" in text or len(os.fsencode(text)) > UNIX_PATH_MAX:
        raise where.error(
            path, f"expected a socket path of at most {UNIX_PATH_MAX} bytes, got {_show(text)}"
        )
    return text


def _hostport(value: object, path: str, where: _Where) -> str:
    try:
        parse_hostport(value)  # type: ignore[arg-type]
    except ValueError as e:
        raise where.error(path, str(e)) from None
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------------
# tables


_TUNNEL_KEYS = tuple(OVS_OPTION_NAMES)
_DAEMON_KEYS = (
    "control_socket",
    "instance",
    "metrics",
    "log_level",
    "log_format",
    "firewall",
    "reassembly_timeout",
    "reassembly_high_water",
    "reassembly_low_water",
    "reassembly_source_budget",
)
_TOP_KEYS = ("daemon", "tunnel")

_TUNNEL_FLAGS = {
    "name": "--dev",
    "dev": "--dev",
    "local_ip": "--local-ip",
    "remote_ip": "--remote-ip",
    "key": "--key",
    "in_key": "--in-key",
    "out_key": "--out-key",
    "dst_port": "--dst-port",
    "mtu": "--mtu",
    "bridge": "--bridge",
    "tos": "--tos",
    "ttl": "--ttl",
    "df": "--no-df",
    "offload": "--no-offload",
    "persist": "--persist",
    "underlay_mtu": "--underlay-mtu",
}
"""The ``sttun up`` flag that sets each tunnel key (single-tunnel form)."""

DAEMON_FLAGS = {
    "control_socket": "--control-socket",
    "instance": "--instance",
    "metrics": "--metrics",
    "log_level": "--log-level",
    "log_format": "--log-format",
    "firewall": "--no-firewall",
}
"""The ``sttun up`` flag that overrides each ``[daemon]`` key."""

DEFAULT_TUNNEL_NAME = "stt0"


def _check_keys(
    table: Mapping[str, object], allowed: Sequence[str], prefix: str, where: _Where
) -> None:
    for k in table:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise where.error(f"{prefix}{k}", f"unknown key{hint}")


def _parse_tunnel(raw: Mapping[str, object], p: str, where: _Where) -> TunnelConfig:
    _check_keys(raw, _TUNNEL_KEYS, p, where)
    for req in ("name", "local_ip", "remote_ip"):
        if req not in raw:
            raise where.error(f"{p}{req}", "required key is missing")

    name = _ifname(raw["name"], f"{p}name", where)
    dev = _ifname(raw["dev"], f"{p}dev", where) if "dev" in raw else name
    local_ip = _address(raw["local_ip"], f"{p}local_ip", where)
    remote_ip = _address(raw["remote_ip"], f"{p}remote_ip", where)
    if remote_ip.version != local_ip.version:
        raise where.error(
            f"{p}remote_ip",
            f"expected an IPv{local_ip.version} address like local_ip ({local_ip}), "
            f"got {_show(raw['remote_ip'])}",
        )
    if remote_ip == local_ip:
        raise where.error(
            f"{p}remote_ip", f"must differ from local_ip, got {_show(raw['remote_ip'])}"
        )

    keys = {k: _key(raw[k], f"{p}{k}", where) for k in ("key", "in_key", "out_key") if k in raw}
    in_key = keys.get("in_key", keys.get("key"))
    out_key = keys.get("out_key", keys.get("key"))
    if in_key is None and out_key is None:
        raise where.error(f"{p}key", "required key is missing (give key, or in_key and out_key)")
    if in_key is None:
        raise where.error(
            f"{p}in_key", "required key is missing (give key, or in_key as well as out_key)"
        )
    if out_key is None:
        raise where.error(
            f"{p}out_key", "required key is missing (give key, or out_key as well as in_key)"
        )

    kw: dict[str, object] = {}
    if "dst_port" in raw:
        kw["dst_port"] = _int(raw["dst_port"], f"{p}dst_port", where, 1, 65535)
    if "mtu" in raw:
        kw["mtu"] = _int(raw["mtu"], f"{p}mtu", where, MIN_MTU, MAX_OVERLAY_MTU)
    if raw.get("bridge") is not None:
        kw["bridge"] = _ifname(raw["bridge"], f"{p}bridge", where)
    if "tos" in raw:
        kw["tos"] = _tos(raw["tos"], f"{p}tos", where)
    if "ttl" in raw:
        kw["ttl"] = _ttl(raw["ttl"], f"{p}ttl", where)
    for b in ("df", "offload", "persist"):
        if b in raw:
            kw[b] = _bool(raw[b], f"{p}{b}", where)
    if raw.get("underlay_mtu") is not None:
        lo = MIN_UNDERLAY_MTU[local_ip.version]
        kw["underlay_mtu"] = _int(
            raw["underlay_mtu"],
            f"{p}underlay_mtu",
            where,
            lo,
            MAX_UNDERLAY_MTU,
            f"an integer {lo}..{MAX_UNDERLAY_MTU} (IPv{local_ip.version} underlay)",
        )
    return TunnelConfig(
        name=name,
        dev=dev,
        local_ip=local_ip,
        remote_ip=remote_ip,
        in_key=in_key,
        out_key=out_key,
        **kw,  # type: ignore[arg-type]
    )


def _check_tunnels(
    tunnels: Sequence[TunnelConfig], raws: Sequence[Mapping[str, object]], where: _Where
) -> None:
    names: dict[str, int] = {}
    devs: dict[str, int] = {}
    demux: dict[tuple[IPAddress, IPAddress, int, int], int] = {}
    for i, t in enumerate(tunnels):
        if t.name in names:
            raise where.error(
                f"tunnel[{i}].name",
                f"duplicate name {_show(t.name)} (also tunnel[{names[t.name]}])",
            )
        names[t.name] = i
        if t.dev in devs:
            j = devs[t.dev]
            key = "dev" if "dev" in raws[i] else "name"
            raise where.error(
                f"tunnel[{i}].{key}",
                f"TAP device {_show(t.dev)} is already used by tunnel[{j}] "
                f"({_show(tunnels[j].name)})",
            )
        devs[t.dev] = i
        if t.demux_key in demux:
            j = demux[t.demux_key]
            raise where.error(
                f"tunnel[{i}]",
                f"same local_ip, remote_ip, in_key and dst_port as tunnel[{j}] "
                f"({_show(tunnels[j].name)}): received frames could not be told apart",
            )
        demux[t.demux_key] = i


def _parse_daemon(raw: Mapping[str, object], where: _Where) -> dict[str, object]:
    p = "daemon."
    _check_keys(raw, _DAEMON_KEYS, p, where)
    kw: dict[str, object] = {}
    if "instance" in raw:
        value = raw["instance"]
        if not isinstance(value, str) or not _INSTANCE_RE.fullmatch(value):
            raise where.error(
                f"{p}instance",
                "expected a name of 1..32 characters from A-Z a-z 0-9 _ -, starting with a "
                f"letter, got {_show(value)}",
            )
        kw["instance"] = value
    if "control_socket" in raw:
        kw["control_socket"] = _socket_path(raw["control_socket"], f"{p}control_socket", where)
    else:
        instance = kw.get("instance", DEFAULT_INSTANCE)
        assert isinstance(instance, str)
        kw["control_socket"] = default_control_socket(instance)
    if raw.get("metrics") is not None:
        kw["metrics"] = _hostport(raw["metrics"], f"{p}metrics", where)
    if "log_level" in raw:
        kw["log_level"] = _choice(raw["log_level"], f"{p}log_level", where, LOG_LEVELS)
    if "log_format" in raw:
        kw["log_format"] = _choice(raw["log_format"], f"{p}log_format", where, LOG_FORMATS)
    if "firewall" in raw:
        kw["firewall"] = _bool(raw["firewall"], f"{p}firewall", where)
    if "reassembly_timeout" in raw:
        kw["reassembly_timeout"] = _seconds(
            raw["reassembly_timeout"], f"{p}reassembly_timeout", where
        )
    high = DEFAULT_HIGH_WATER
    if "reassembly_high_water" in raw:
        high = _size(
            raw["reassembly_high_water"], f"{p}reassembly_high_water", where, MIN_HIGH_WATER
        )
        kw["reassembly_high_water"] = high
    if "reassembly_low_water" in raw:
        low = _size(raw["reassembly_low_water"], f"{p}reassembly_low_water", where, 0)
        path = f"{p}reassembly_low_water"
    else:
        low = high * 3 // 4  # OVS ratio: 3 MiB low for 4 MiB high
        path = f"{p}reassembly_high_water"
    if low >= high:
        raise where.error(
            path, f"reassembly_low_water ({low}) must be below reassembly_high_water ({high})"
        )
    kw["reassembly_low_water"] = low
    if raw.get("reassembly_source_budget") is not None:
        budget = _size(
            raw["reassembly_source_budget"], f"{p}reassembly_source_budget", where, MIN_HIGH_WATER
        )
        if budget > high:
            raise where.error(
                f"{p}reassembly_source_budget",
                f"must not exceed reassembly_high_water ({high}), "
                f"got {_show(raw['reassembly_source_budget'])}",
            )
        kw["reassembly_source_budget"] = budget
    return kw


def _build(
    raw: Mapping[str, object],
    where: _Where,
    config_path: str | None,
    overrides: Mapping[str, object],
) -> DaemonConfig:
    _check_keys(raw, _TOP_KEYS, "", where)
    daemon_raw = raw.get("daemon", {})
    if not isinstance(daemon_raw, dict):
        raise where.error("daemon", f"expected a table ([daemon]), got {_show(daemon_raw)}")
    daemon_raw = {**daemon_raw, **overrides}
    tunnels_raw = raw.get("tunnel")
    if tunnels_raw is None or tunnels_raw == []:
        raise where.error("", "no tunnels: add at least one [[tunnel]] table")
    if not isinstance(tunnels_raw, list):
        raise where.error(
            "tunnel", f"expected an array of tables ([[tunnel]]), got {_show(tunnels_raw)}"
        )
    tunnels = []
    for i, t in enumerate(tunnels_raw):
        if not isinstance(t, dict):
            raise where.error(f"tunnel[{i}]", f"expected a table, got {_show(t)}")
        tunnels.append(_parse_tunnel(t, f"tunnel[{i}].", where))
    _check_tunnels(tunnels, tunnels_raw, where)
    daemon_kw = _parse_daemon(daemon_raw, where)
    return DaemonConfig(
        tunnels=tuple(tunnels),
        config_path=config_path,
        overrides=tuple(sorted(overrides.items())),
        **daemon_kw,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------
# public entry points


def parse_config(
    raw: Mapping[str, object],
    source: str = "config",
    overrides: Mapping[str, object] | None = None,
) -> DaemonConfig:
    """Validate an already-parsed TOML document.

    ``source`` names it in error messages.  ``overrides`` replaces ``[daemon]`` keys
    (values from command-line flags; errors in them name the flag).
    """
    overrides = dict(overrides or {})
    flags = {f"daemon.{k}": DAEMON_FLAGS.get(k, k) for k in overrides}
    where = _Where(source, flags, cli_strings=False)
    return _build(raw, where, None, overrides)


def load_config(
    path: str | os.PathLike[str], overrides: Mapping[str, object] | None = None
) -> DaemonConfig:
    """Read and validate a TOML configuration file.

    ``overrides`` replaces ``[daemon]`` keys (from command-line flags).  Raises
    :class:`ConfigError` naming the file, the key path and the bad value.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per nested array / inline table
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deep") from None
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    overrides = dict(overrides or {})
    flags = {f"daemon.{k}": DAEMON_FLAGS.get(k, k) for k in overrides}
    where = _Where(source, flags, cli_strings=False)
    return _build(raw, where, source, overrides)


def reload_config(old: DaemonConfig) -> DaemonConfig:
    """Read ``old``'s file again, with the same command-line overrides (for SIGHUP).

    Raises :class:`ConfigError` if ``old`` came from the command line only.
    """
    if old.config_path is None:
        raise ConfigError(
            "cannot reload: the configuration came from command-line flags, not a file"
        )
    return load_config(old.config_path, dict(old.overrides))


def _daemon_overrides(ns: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in DAEMON_FLAGS:
        value = getattr(ns, key, None)
        if value is not None:
            out[key] = value
    return out


_TUNNEL_ARGS = (
    "local_ip", "remote_ip", "key", "in_key", "out_key", "dev", "dst_port", "mtu",
    "bridge", "tos", "ttl", "underlay_mtu",
)  # fmt: skip


def config_from_args(ns: argparse.Namespace) -> DaemonConfig:
    """Build a :class:`DaemonConfig` from ``sttun up``'s parsed arguments.

    With ``ns.config`` set, the file is loaded and the daemon flags given
    (``--metrics``, ``--log-level``, ``--log-format``, ``--no-firewall``,
    ``--instance``, ``--control-socket``) override its ``[daemon]`` table; tunnel
    flags are then refused.  Without it, the tunnel flags describe one tunnel, named
    after ``--dev`` (default ``stt0``).  Values are strings as typed; errors name
    the flag (``--key: expected an integer ...``).
    """
    overrides = _daemon_overrides(ns)
    if getattr(ns, "config", None):
        given = [_TUNNEL_FLAGS[a] for a in _TUNNEL_ARGS if getattr(ns, a, None) is not None] + [
            _TUNNEL_FLAGS[b]
            for b, default in (("df", True), ("offload", True), ("persist", False))
            if getattr(ns, b, default) != default
        ]
        if given:
            raise ConfigError(
                f"{given[0]} cannot be combined with -c/--config: "
                "describe the tunnels in the file, or give no file"
            )
        return load_config(ns.config, overrides)

    tunnel: dict[str, object] = {}
    for a in _TUNNEL_ARGS:
        value = getattr(ns, a, None)
        if value is not None:
            tunnel[a] = value
    for b, default in (("df", True), ("offload", True), ("persist", False)):
        tunnel[b] = getattr(ns, b, default)
    tunnel["name"] = tunnel.pop("dev", DEFAULT_TUNNEL_NAME)
    for req in ("local_ip", "remote_ip"):
        if req not in tunnel:
            raise ConfigError(
                f"{_TUNNEL_FLAGS[req]} is required (or give a file with -c FILE.toml)"
            )
    if not {"key", "in_key", "out_key"} & tunnel.keys():
        raise ConfigError("--key is required (or both --in-key and --out-key)")
    flags = {f"tunnel[0].{k}": f for k, f in _TUNNEL_FLAGS.items()}
    flags.update({f"daemon.{k}": f for k, f in DAEMON_FLAGS.items()})
    where = _Where(None, flags, cli_strings=True)
    return _build({"tunnel": [tunnel]}, where, None, overrides)


class ConfigDiff(NamedTuple):
    """What a reload changes, by tunnel name."""

    added: tuple[TunnelConfig, ...]  # in new only
    removed: tuple[TunnelConfig, ...]  # in old only
    changed: tuple[tuple[TunnelConfig, TunnelConfig], ...]  # (old, new), same name


def diff_configs(old: DaemonConfig, new: DaemonConfig) -> ConfigDiff:
    """Compare two configurations tunnel by tunnel (matched by name), in ``new``'s order."""
    old_by = {t.name: t for t in old.tunnels}
    new_by = {t.name: t for t in new.tunnels}
    added = tuple(t for t in new.tunnels if t.name not in old_by)
    removed = tuple(t for t in old.tunnels if t.name not in new_by)
    changed = tuple(
        (old_by[t.name], t) for t in new.tunnels if t.name in old_by and old_by[t.name] != t
    )
    return ConfigDiff(added, removed, changed)


def changed_fields(old: object, new: object) -> tuple[str, ...]:
    """Names of the dataclass fields that differ between ``old`` and ``new``.

    For a :class:`DaemonConfig` pair the ``tunnels`` field is left out (use
    :func:`diff_configs`); works for :class:`TunnelConfig` pairs too.
    """
    assert dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new)
    return tuple(
        f.name
        for f in dataclasses.fields(old)
        if f.name != "tunnels" and getattr(old, f.name) != getattr(new, f.name)
    )
