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

What each key accepts, its flag and the Open vSwitch option it mirrors are in one
table, :data:`sttun.daemon.config_keys.CONFIG_KEYS`; the defaults are the fields of
:class:`TunnelConfig` and :class:`DaemonConfig`.  This module adds the rules that tie
keys together and, last, :func:`validate_with_core`: the configuration is handed to
the protocol core exactly as ``sttun up`` will hand it over, so every rule the core
enforces (one tunnel per local address, remote address and ``in_key``; the underlay
MTU floor; the reassembly limits) is checked by ``sttun up --check``, by ``sttun up``
before it starts, and by a reload before it changes anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from sttun.core.decap import DscpModel
from sttun.core.encap import DEFAULT_TTL, DEFAULT_UNDERLAY_MTU, MIN_UNDERLAY_MTU
from sttun.core.endpoint import Endpoint, TunnelSpec
from sttun.core.keys import format_key
from sttun.core.reassembly import (
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    DEFAULT_SOURCE_BUDGET,
    DEFAULT_TIMEOUT,
    Reassembler,
)
from sttun.daemon.config_keys import (
    DAEMON_KEYS,
    DEFAULT_INSTANCE,
    INHERIT,
    MAX_UNDERLAY_MTU,
    OVS_OPTION_NAMES,
    TUNNEL_KEYS,
    ConfigKey,
    Inherit,
    Where,
    default_control_socket,
    parse_hostport,
    show_value,
)
from sttun.errors import ConfigError, EncodeError
from sttun.wire.stt import STT_PORT

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "DEFAULT_TUNNEL_NAME",
    "INHERIT",
    "MAX_UNDERLAY_MTU",
    "MIN_UNDERLAY_MTU",
    "OVS_OPTION_NAMES",
    "ConfigDiff",
    "DaemonConfig",
    "TunnelConfig",
    "changed_fields",
    "config_from_args",
    "core_endpoint",
    "default_control_socket",
    "describe_config",
    "diff_configs",
    "load_config",
    "parse_config",
    "parse_hostport",
    "reload_config",
    "tunnel_spec",
    "validate_with_core",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_MTU = 1500
# "inherit": the uniform DSCP model by default (issue 6, protocol.md §6): the outer
# header copies the inner DSCP and decapsulation copies the outer DSCP back in, so a
# re-marking in the underlay reaches the tenant.  Open vSwitch defaults to 0 (pipe).
DEFAULT_TOS: Inherit = INHERIT
DEFAULT_TUNNEL_NAME = "stt0"
"""The tunnel's name (and TAP device) when flags describe it and ``--dev`` is not given."""

_TOP_KEYS = ("daemon", "tunnel")
_KEY_FIELDS = ("key", "in_key", "out_key")
_FLAGS = {k.name: k.flag for k in (*TUNNEL_KEYS, *DAEMON_KEYS) if k.flag is not None}


@dataclass(frozen=True)
class TunnelConfig:
    """One STT tunnel: a TAP device joined to one remote endpoint by a context id.

    Two offload settings, for two different readers: ``offload`` is about the
    underlay (the kernel segments and checksums the outer packets, GSO), and
    ``port_offload`` about whoever reads the overlay device: ``True`` (a TAP, frames
    as they come: 64 KB GSO frames, partial checksums) suits the Linux stack and
    bridges; ``False`` makes the device a veth pair
    (:class:`~sttun.io.veth_port.VethPort`) through which the kernel hands the reader
    complete, MTU-sized frames (Open vSwitch without userspace TSO, packet capture
    tools, anything that does not understand offloads).
    """

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
    port_offload: bool = True
    persist: bool = False
    underlay_mtu: int | None = None

    def __post_init__(self) -> None:
        if not self.dev:
            object.__setattr__(self, "dev", self.name)

    @property
    def family(self) -> int:
        """4 or 6: the IP version of the outer (underlay) addresses."""
        return self.local_ip.version


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``sttun up`` needs: the daemon settings and its tunnels."""

    tunnels: tuple[TunnelConfig, ...]
    instance: str = DEFAULT_INSTANCE
    control_socket: str = ""  # "" means /run/sttun/<instance>.sock
    metrics: str | None = None  # "host:port", see parse_hostport()
    ovsdb: str | None = None  # an OVSDB remote: serve its type=stt interfaces
    log_level: str = "info"
    log_format: str = "text"
    firewall: bool = True
    fastpath: str = "auto"  # "auto" | "on" | "off": the kernel receive fast path
    tx_ring: str = "auto"  # "auto" | "on" | "off": underlay sends through a PACKET_TX_RING
    tx_fastpath: str = "auto"  # "auto" | "on" | "off": the kernel transmit fast path
    reassembly_timeout: float = DEFAULT_TIMEOUT
    reassembly_high_water: int = DEFAULT_HIGH_WATER
    reassembly_low_water: int = DEFAULT_LOW_WATER
    reassembly_source_budget: int | None = None  # None: see core_endpoint()
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


# --------------------------------------------------------------------------------
# the configuration as the core sees it


def tunnel_spec(cfg: TunnelConfig, route_mtu: int | None = None) -> TunnelSpec:
    """The core's :class:`~sttun.core.endpoint.TunnelSpec` for ``cfg``.

    The underlay MTU is ``cfg.underlay_mtu`` if set, else ``route_mtu`` (the MTU of
    the route to the remote, when the caller knows it), else 1500.
    """
    tos = None if cfg.tos == INHERIT else int(cfg.tos)
    ttl = None if cfg.ttl == INHERIT else int(cfg.ttl)
    return TunnelSpec(
        name=cfg.name,
        local=cfg.local_ip.packed,
        remote=cfg.remote_ip.packed,
        in_key=cfg.in_key,
        out_key=cfg.out_key,
        dst_port=cfg.dst_port,
        tos=tos,
        ttl=ttl,
        df=cfg.df,
        underlay_mtu=cfg.underlay_mtu or route_mtu or DEFAULT_UNDERLAY_MTU,
        dscp_model=DscpModel.UNIFORM if tos is None else DscpModel.PIPE,
    )


def core_endpoint(config: DaemonConfig) -> Endpoint:
    """A core :class:`~sttun.core.endpoint.Endpoint` with ``config``'s reassembly
    limits and no tunnels yet (add them with :func:`tunnel_spec`).

    Without ``reassembly_source_budget`` one source may hold the reassembler's
    default budget, or half the high water if that is less.
    """
    budget = config.reassembly_source_budget or min(
        DEFAULT_SOURCE_BUDGET, config.reassembly_high_water // 2
    )
    return Endpoint(
        reassembler=Reassembler(
            timeout=config.reassembly_timeout,
            high_water=config.reassembly_high_water,
            low_water=config.reassembly_low_water,
            source_budget=budget,
        )
    )


def validate_with_core(config: DaemonConfig) -> None:
    """Hand ``config`` to the protocol core as ``sttun up`` does, without any I/O.

    Builds the :func:`core_endpoint` and adds every tunnel's :func:`tunnel_spec`, so
    whatever the core refuses (two tunnels with the same local address, remote
    address and ``in_key``; an underlay MTU it cannot segment for; impossible
    reassembly limits) is a :class:`ConfigError` here, naming the file and tunnel.
    :func:`load_config`, :func:`parse_config` and :func:`config_from_args` call it
    last, so a configuration they return has passed it.
    """
    _validate_with_core(config, Where(config.config_path, {}, cli_strings=False))


def _validate_with_core(config: DaemonConfig, where: Where) -> None:
    try:
        core = core_endpoint(config)
    except ConfigError as e:
        raise where.error("daemon", str(e)) from None
    for i, t in enumerate(config.tunnels):
        try:
            core.add_tunnel(tunnel_spec(t))
        except (ConfigError, EncodeError) as e:
            raise where.error(f"tunnel[{i}]", str(e)) from None


# --------------------------------------------------------------------------------
# parsing


def _check_keys(
    table: Mapping[str, object], allowed: Sequence[str], prefix: str, where: Where
) -> None:
    for k in table:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise where.error(f"{prefix}{k}", f"unknown key{hint}")


def _values(
    raw: Mapping[str, object], keys: Sequence[ConfigKey], prefix: str, where: Where
) -> dict[str, Any]:
    """Every key of ``keys`` given in ``raw``, checked by its validator (in table order)."""
    return {
        k.name: k.check(raw[k.name], f"{prefix}{k.name}", where)
        for k in keys
        if raw.get(k.name) is not None
    }


def _parse_tunnel(raw: Mapping[str, object], p: str, where: Where) -> TunnelConfig:
    _check_keys(raw, [k.name for k in TUNNEL_KEYS], p, where)
    for req in ("name", "local_ip", "remote_ip"):
        if req not in raw:
            raise where.error(f"{p}{req}", "required key is missing")
    v = _values(raw, TUNNEL_KEYS, p, where)

    local_ip: IPAddress = v.pop("local_ip")
    remote_ip: IPAddress = v.pop("remote_ip")
    if remote_ip.version != local_ip.version:
        raise where.error(
            f"{p}remote_ip",
            f"expected an IPv{local_ip.version} address like local_ip ({local_ip}), "
            f"got {show_value(raw['remote_ip'])}",
        )
    if remote_ip == local_ip:
        raise where.error(
            f"{p}remote_ip", f"must differ from local_ip, got {show_value(raw['remote_ip'])}"
        )

    key = v.pop("key", None)
    in_key = v.pop("in_key", key)
    out_key = v.pop("out_key", key)
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
    if v.get("bridge") and v.get("port_offload") is False:
        raise where.error(
            f"{p}port_offload",
            "port_offload = false makes the device a veth pair, which is not put on a "
            "Linux bridge (bridge is set): a Linux bridge takes offloads, leave it true",
        )
    return TunnelConfig(local_ip=local_ip, remote_ip=remote_ip, in_key=in_key, out_key=out_key, **v)


def _check_tunnels(
    tunnels: Sequence[TunnelConfig], raws: Sequence[Mapping[str, object]], where: Where
) -> None:
    """Unique names and TAP devices.  (Whether the core can tell the tunnels apart
    on receive is its own rule: :func:`validate_with_core`.)"""
    names: dict[str, int] = {}
    devs: dict[str, int] = {}
    for i, t in enumerate(tunnels):
        if t.name in names:
            raise where.error(
                f"tunnel[{i}].name",
                f"duplicate name {show_value(t.name)} (also tunnel[{names[t.name]}])",
            )
        names[t.name] = i
        if t.dev in devs:
            j = devs[t.dev]
            key = "dev" if "dev" in raws[i] else "name"
            raise where.error(
                f"tunnel[{i}].{key}",
                f"TAP device {show_value(t.dev)} is already used by tunnel[{j}] "
                f"({show_value(tunnels[j].name)})",
            )
        devs[t.dev] = i


def _parse_daemon(raw: Mapping[str, object], where: Where) -> dict[str, Any]:
    p = "daemon."
    _check_keys(raw, [k.name for k in DAEMON_KEYS], p, where)
    kw = _values(raw, DAEMON_KEYS, p, where)
    if "control_socket" not in kw:
        kw["control_socket"] = default_control_socket(kw.get("instance", DEFAULT_INSTANCE))
    high = kw.get("reassembly_high_water", DEFAULT_HIGH_WATER)
    if "reassembly_low_water" in kw:
        low = kw["reassembly_low_water"]
        path = f"{p}reassembly_low_water"
    else:
        low = high * 3 // 4  # OVS ratio: 3 MiB low for 4 MiB high
        path = f"{p}reassembly_high_water"
    if low >= high:
        raise where.error(
            path, f"reassembly_low_water ({low}) must be below reassembly_high_water ({high})"
        )
    kw["reassembly_low_water"] = low
    budget = kw.get("reassembly_source_budget")
    if budget is not None and budget > high:
        raise where.error(
            f"{p}reassembly_source_budget",
            f"must not exceed reassembly_high_water ({high}), "
            f"got {show_value(raw['reassembly_source_budget'])}",
        )
    return kw


def _build(
    raw: Mapping[str, object],
    where: Where,
    config_path: str | None,
    overrides: Mapping[str, object],
) -> DaemonConfig:
    _check_keys(raw, _TOP_KEYS, "", where)
    daemon_raw = raw.get("daemon", {})
    if not isinstance(daemon_raw, dict):
        raise where.error("daemon", f"expected a table ([daemon]), got {show_value(daemon_raw)}")
    daemon_raw = {**daemon_raw, **overrides}
    tunnels_raw = raw.get("tunnel")
    if (tunnels_raw is None or tunnels_raw == []) and daemon_raw.get("ovsdb") is None:
        raise where.error(
            "", "no tunnels: add at least one [[tunnel]] table (or [daemon] ovsdb = ...)"
        )
    if tunnels_raw is None:
        tunnels_raw = []
    if not isinstance(tunnels_raw, list):
        raise where.error(
            "tunnel", f"expected an array of tables ([[tunnel]]), got {show_value(tunnels_raw)}"
        )
    tunnels = []
    for i, t in enumerate(tunnels_raw):
        if not isinstance(t, dict):
            raise where.error(f"tunnel[{i}]", f"expected a table, got {show_value(t)}")
        tunnels.append(_parse_tunnel(t, f"tunnel[{i}].", where))
    _check_tunnels(tunnels, tunnels_raw, where)
    config = DaemonConfig(
        tunnels=tuple(tunnels),
        config_path=config_path,
        overrides=tuple(sorted(overrides.items())),
        **_parse_daemon(daemon_raw, where),
    )
    _validate_with_core(config, where)
    return config


def _override_flags(overrides: Mapping[str, object]) -> dict[str, str]:
    """Error labels for ``[daemon]`` values that came from flags: the flag."""
    return {f"daemon.{k}": _FLAGS.get(k, k) for k in overrides}


# --------------------------------------------------------------------------------
# public entry points


def parse_config(
    raw: Mapping[str, object],
    source: str = "config",
    overrides: Mapping[str, object] | None = None,
) -> DaemonConfig:
    """Validate an already-parsed TOML document (and :func:`validate_with_core` it).

    ``source`` names it in error messages.  ``overrides`` replaces ``[daemon]`` keys
    (values from command-line flags; errors in them name the flag).
    """
    overrides = dict(overrides or {})
    where = Where(source, _override_flags(overrides), cli_strings=False)
    return _build(raw, where, None, overrides)


def load_config(
    path: str | os.PathLike[str], overrides: Mapping[str, object] | None = None
) -> DaemonConfig:
    """Read and validate a TOML configuration file (and :func:`validate_with_core` it).

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
    where = Where(source, _override_flags(overrides), cli_strings=False)
    return _build(raw, where, source, overrides)


def reload_config(old: DaemonConfig) -> DaemonConfig:
    """Read ``old``'s file again, with the same command-line overrides (for SIGHUP).

    The new configuration has passed :func:`validate_with_core`, like the first.
    Raises :class:`ConfigError` if it is invalid, or if ``old`` came from the command
    line only.
    """
    if old.config_path is None:
        raise ConfigError(
            "cannot reload: the configuration came from command-line flags, not a file"
        )
    return load_config(old.config_path, dict(old.overrides))


def config_from_args(ns: argparse.Namespace) -> DaemonConfig:
    """Build a :class:`DaemonConfig` from ``sttun up``'s parsed arguments.

    The flags are those of :data:`~sttun.daemon.config_keys.CONFIG_KEYS`; each lands
    in the attribute named like its key, None when not given.  With ``ns.config``
    set, the file is loaded and the daemon flags given (``--metrics``,
    ``--log-level``, ...) override its ``[daemon]`` table; tunnel flags are then
    refused.  Without it, the tunnel flags describe one tunnel, named after
    ``--dev`` (default ``stt0``); with ``--ovsdb`` and no tunnel flag there is no
    static tunnel (OVSDB's interfaces are the tunnels).  Values are strings as
    typed; errors name the flag (``--key: expected an integer ...``).
    """
    overrides = {
        k.name: getattr(ns, k.name)
        for k in DAEMON_KEYS
        if k.flag is not None and getattr(ns, k.name, None) is not None
    }
    tunnel = {
        k.name: getattr(ns, k.name)
        for k in TUNNEL_KEYS
        if k.flag is not None and getattr(ns, k.name, None) is not None
    }
    if getattr(ns, "config", None):
        if tunnel:
            raise ConfigError(
                f"{_FLAGS[next(iter(tunnel))]} cannot be combined with -c/--config: "
                "describe the tunnels in the file, or give no file"
            )
        return load_config(ns.config, overrides)

    flags = {f"tunnel[0].{k.name}": k.flag for k in TUNNEL_KEYS if k.flag is not None}
    flags.update({f"daemon.{k.name}": k.flag for k in DAEMON_KEYS if k.flag is not None})
    if not tunnel and overrides.get("ovsdb") is not None:  # OVSDB's interfaces only
        return _build({}, Where(None, flags, cli_strings=True), None, overrides)
    tunnel.setdefault("name", DEFAULT_TUNNEL_NAME)
    for req in ("local_ip", "remote_ip"):
        if req not in tunnel:
            raise ConfigError(f"{_FLAGS[req]} is required (or give a file with -c FILE.toml)")
    if not set(_KEY_FIELDS) & tunnel.keys():
        raise ConfigError("--key is required (or both --in-key and --out-key)")
    where = Where(None, flags, cli_strings=True)
    return _build({"tunnel": [tunnel]}, where, None, overrides)


def describe_config(config: DaemonConfig) -> str:
    """A few lines describing a validated configuration (``sttun up --check``)."""
    lines = [
        f"instance {config.instance}, control socket {config.control_socket}, "
        f"metrics {config.metrics or 'off'}, firewall {'on' if config.firewall else 'off'}, "
        f"fast path {config.fastpath}, log {config.log_level}/{config.log_format}"
    ]
    if config.ovsdb:
        lines.append(f"ovsdb {config.ovsdb}: serving its type=stt interfaces")
    for t in config.tunnels:
        dev = f" dev {t.dev}" if t.dev != t.name else ""
        bridge = f" bridge {t.bridge}" if t.bridge else ""
        lines.append(
            f"tunnel {t.name}{dev}: {t.local_ip} -> {t.remote_ip} port {t.dst_port} "
            f"key {format_key(t.in_key, t.out_key)} mtu {t.mtu}{bridge}"
        )
    n = len(config.tunnels)
    lines.append(f"configuration OK: {n} tunnel{'s' if n != 1 else ''}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------
# reload


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
