"""Every configuration key once: its file name, validator, ``sttun up`` flag and OVS name.

One :class:`ConfigKey` row per key of the file's ``[[tunnel]]`` and ``[daemon]``
tables (:data:`CONFIG_KEYS`) says what the code knows about the key: the validator
that turns a TOML (or command-line) value into the configured one, the ``sttun up``
flag that sets it with that flag's help text, and the Open vSwitch option it
mirrors.  Its default is the field of the same name of
:class:`~sttun.daemon.config.TunnelConfig` / :class:`~sttun.daemon.config.DaemonConfig`.
The file parser (:mod:`sttun.daemon.config`), ``sttun up``'s argument parser
(:mod:`sttun.cli`), :data:`OVS_OPTION_NAMES` and ``tests/unit/test_docs_config.py``
all read this table; rules that tie keys together (``remote_ip`` of the family of
``local_ip``, the low water below the high water, ...) are in the parser.

Every ``sttun`` command builds the argument parser, so this module stays cheap to
import: no dataclasses, no TOML, no protocol core; the validators import what they
need (ipaddress, json, the core's underlay MTU floor) when they run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

from sttun.errors import ConfigError

if TYPE_CHECKING:
    import argparse
    import ipaddress

    IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

Inherit = Literal["inherit"]
Section = Literal["tunnel", "daemon"]

INHERIT: Inherit = "inherit"
"""Value of ``tos`` / ``ttl`` that copies the inner packet's value."""

# --- limits (where each comes from) ------------------------------------------------
MAX_KEY = 2**64 - 1  # the STT context id is 64 bits (draft-davie-stt-08 §3.1)
IFNAMSIZ = 16  # Linux: interface names are at most 15 characters plus NUL
MIN_MTU = 68  # smallest IPv4 MTU (RFC 791)
MAX_OVERLAY_MTU = 65000  # inner frame + 18-byte STT header must fit a 64 KB frame
MAX_UNDERLAY_MTU = 65535  # the largest IPv4 packet; the floor is the core's MIN_UNDERLAY_MTU
UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
MAX_REASSEMBLY_TIMEOUT = 3600.0
MIN_HIGH_WATER = 65536  # must hold at least one maximal STT frame
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
FASTPATH_SETTINGS = ("auto", "on", "off")  # the kernel receive fast path (eBPF)
TX_RING_SETTINGS = ("auto", "on", "off")  # underlay sends through a PACKET_TX_RING
TX_FASTPATH_SETTINGS = ("auto", "on", "off")  # the kernel transmit fast path (eBPF)
DEFAULT_INSTANCE = "sttun"
RUN_DIR = "/run/sttun"

# (compiled on first use, by re's cache: not at import)
_IFNAME_RE = r"[A-Za-z0-9_.\-]{1,15}"
_INSTANCE_RE = r"[A-Za-z][A-Za-z0-9_]{0,31}"  # nft table names: no "-"
_SIZE_RE = r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*"
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def default_control_socket(instance: str = DEFAULT_INSTANCE) -> str:
    """The control socket path of ``instance``: ``/run/sttun/<instance>.sock``."""
    return f"{RUN_DIR}/{instance}.sock"


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:9100"`` for IPv6, ``":9100"`` for all addresses).

    Returns ``(host, port)``; host is ``""`` for all addresses.  Raises ValueError
    with a message that says what was expected.
    """
    import ipaddress

    expected = 'expected "host:port" (IPv6 as "[::1]:9100")'
    if not isinstance(text, str):
        raise ValueError(f"{expected}, got {show_value(text)}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{expected}, got {show_value(text)}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"expected an IPv6 address in brackets, got {show_value(text)}"
            ) from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{expected}, got {show_value(text)}")
        if host and not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
            raise ValueError(f"{expected}, got {show_value(text)}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a port 1..65535 after the colon, got {show_value(text)}")
    return host, int(port)


# --------------------------------------------------------------------------------
# value display and error construction


def show_value(value: object) -> str:
    """Render a bad value the way it looks in TOML (for error messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        import json  # a JSON string is a TOML basic string

        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"


class Where:
    """Turns a key path (``tunnel[1].key``) into the label an error message uses.

    ``source`` (the file name) prefixes paths that came from the file; paths in
    ``flags`` came from the command line and are shown as the flag (``--key``).
    ``cli_strings``: values are strings as typed on the command line.
    """

    def __init__(self, source: str | None, flags: Mapping[str, str], cli_strings: bool) -> None:
        self.source = source
        self.flags = flags
        self.cli_strings = cli_strings

    def error(self, path: str, message: str) -> ConfigError:
        """A :class:`ConfigError` for ``message`` about the value at ``path``."""
        if path in self.flags:
            return ConfigError(f"{self.flags[path]}: {message}")
        label = f"{path}: " if path else ""
        prefix = f"{self.source}: " if self.source else ""
        return ConfigError(f"{prefix}{label}{message}")


# --------------------------------------------------------------------------------
# validators: (value, path, where) -> the configured value, or raise ConfigError

Validator: TypeAlias = Callable[[object, str, Where], Any]


def _int(value: object, path: str, where: Where, lo: int, hi: int, what: str = "") -> int:
    desc = what or f"an integer {lo}..{hi}"
    if isinstance(value, str) and where.cli_strings:
        try:
            value = int(value, 10)
        except ValueError:
            raise where.error(path, f"expected {desc}, got {show_value(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise where.error(path, f"expected {desc}, got {show_value(value)}")
    return value


def integer(lo: int, hi: int) -> Validator:
    """An integer ``lo..hi``."""

    def check(value: object, path: str, where: Where) -> int:
        return _int(value, path, where, lo, hi)

    return check


def underlay_mtu(value: object, path: str, where: Where) -> int:
    """An underlay MTU: the core's floor (:data:`sttun.core.encap.MIN_UNDERLAY_MTU`)
    up to :data:`MAX_UNDERLAY_MTU`, for either address family."""
    from sttun.core.encap import MIN_UNDERLAY_MTU

    return _int(value, path, where, MIN_UNDERLAY_MTU, MAX_UNDERLAY_MTU)


def context_id(value: object, path: str, where: Where) -> int:
    """A 64-bit key: an integer, or a string in any base Python reads (``"0x2a"``)."""
    desc = f"an integer 0..{MAX_KEY}"
    if isinstance(value, str):
        text = value
        try:
            number = int(text.strip(), 0)
        except ValueError:
            number = -1
        if not 0 <= number <= MAX_KEY:
            hint = " (flow-based keys are not supported)" if text.strip() == "flow" else ""
            raise where.error(path, f"expected {desc}, got {show_value(text)}{hint}")
        return number
    return _int(value, path, where, 0, MAX_KEY, desc)


def boolean(value: object, path: str, where: Where) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise where.error(path, f"expected true or false, got {show_value(value)}")
    return value


def non_empty(value: object, path: str, where: Where) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise where.error(path, f"expected a non-empty string, got {show_value(value)}")
    return value


def ifname(value: object, path: str, where: Where) -> str:
    """A Linux interface name."""
    if not isinstance(value, str) or not re.fullmatch(_IFNAME_RE, value) or value in (".", ".."):
        raise where.error(
            path,
            f"expected an interface name of 1..{IFNAMSIZ - 1} characters "
            f"from A-Z a-z 0-9 . _ -, got {show_value(value)}",
        )
    return value


def address(value: object, path: str, where: Where) -> IPAddress:
    """A unicast IPv4 or IPv6 address."""
    import ipaddress

    if not isinstance(value, str):
        raise where.error(path, f"expected an IPv4 or IPv6 address, got {show_value(value)}")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise where.error(
            path, f"expected an IPv4 or IPv6 address, got {show_value(value)}"
        ) from None
    kind = None
    if addr.is_multicast:
        kind = "multicast"
    elif addr.is_unspecified:
        kind = "unspecified"
    elif addr == ipaddress.IPv4Address("255.255.255.255"):
        kind = "broadcast"
    if kind:
        raise where.error(path, f"expected a unicast address, got {show_value(value)} ({kind})")
    return addr


def dscp(value: object, path: str, where: Where) -> int | Inherit:
    """An outer DSCP 0..63, or ``"inherit"``."""
    if value == INHERIT:
        return INHERIT
    return _int(value, path, where, 0, 63, 'a DSCP value 0..63 or "inherit"')


def ttl(value: object, path: str, where: Where) -> int | Inherit:
    """An outer TTL 1..255, or ``"inherit"``."""
    if value == INHERIT:
        return INHERIT
    return _int(value, path, where, 1, 255, 'an integer 1..255 or "inherit"')


def size(lo: int) -> Validator:
    """A size in bytes >= ``lo``: an integer or a string like ``"4MiB"``."""

    def check(value: object, path: str, where: Where) -> int:
        desc = f'a size in bytes >= {lo} (an integer, or a string like "4MiB")'
        if isinstance(value, str):
            m = re.fullmatch(_SIZE_RE, value)
            if not m:
                raise where.error(path, f"expected {desc}, got {show_value(value)}")
            digits = m.group(1)
            # (> 4300 digits: int() raises ValueError; anything past 19 digits is too big)
            n = int(digits) * _SIZE_UNITS[m.group(2)] if len(digits) <= 19 else 2**63
            if not lo <= n <= 2**62:
                raise where.error(path, f"expected {desc}, got {show_value(value)}")
            return n
        return _int(value, path, where, lo, 2**62, desc)

    return check


def seconds(value: object, path: str, where: Where) -> float:
    """A number of seconds > 0 and <= :data:`MAX_REASSEMBLY_TIMEOUT`."""
    desc = f"a number of seconds > 0 and <= {MAX_REASSEMBLY_TIMEOUT:g}"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_REASSEMBLY_TIMEOUT
    ):
        raise where.error(path, f"expected {desc}, got {show_value(value)}")
    return float(value)


def choice(choices: tuple[str, ...]) -> Validator:
    """One of ``choices`` (any case)."""

    def check(value: object, path: str, where: Where) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        options = ", ".join(f'"{c}"' for c in choices)
        raise where.error(path, f"expected one of {options}, got {show_value(value)}")

    return check


def instance_name(value: object, path: str, where: Where) -> str:
    """An instance name (it becomes part of an nftables table name)."""
    if not isinstance(value, str) or not re.fullmatch(_INSTANCE_RE, value):
        raise where.error(
            path,
            "expected a name of 1..32 characters from A-Z a-z 0-9 _ -, starting with a "
            f"letter, got {show_value(value)}",
        )
    return value


def socket_path(value: object, path: str, where: Where) -> str:
    """A Unix socket path that fits ``sockaddr_un``."""
    text = non_empty(value, path, where)
    if "\0" in text or len(os.fsencode(text)) > UNIX_PATH_MAX:
        raise where.error(
            path,
            f"expected a socket path of at most {UNIX_PATH_MAX} bytes, got {show_value(text)}",
        )
    return text


OVSDB_METHODS = ("unix:", "tcp:", "ssl:")
"""How an OVSDB remote starts (OVS's ``ovsdb-client`` syntax; active connections only)."""


def ovsdb_remote(value: object, path: str, where: Where) -> str:
    """An OVSDB remote: ``unix:PATH``, ``tcp:HOST:PORT`` or ``ssl:HOST:PORT``; several
    separated by commas (tried in turn, as OVS does)."""
    text = non_empty(value, path, where)
    for part in text.split(","):
        part = part.strip()
        if not part.startswith(OVSDB_METHODS) or not part.partition(":")[2]:
            raise where.error(
                path,
                'expected an OVSDB remote like "unix:/var/run/openvswitch/db.sock" or '
                f'"tcp:127.0.0.1:6640", got {show_value(text)}',
            )
    return text


def hostport(value: object, path: str, where: Where) -> str:
    """A ``host:port`` listening address (see :func:`parse_hostport`)."""
    try:
        parse_hostport(value)  # type: ignore[arg-type]
    except ValueError as e:
        raise where.error(path, str(e)) from None
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------------
# the table


class ConfigKey(NamedTuple):
    """One configuration key: everything the code knows about it but its default.

    ``flag`` is the ``sttun up`` option that sets it (None: only in the file);
    a flag with a ``const`` is a switch that stores that value, any other takes an
    argument (``metavar``, or one of ``choices``).  ``ovs`` is the Open vSwitch
    option (``Interface type=stt``) it mirrors, None if OVS has none.
    """

    name: str
    section: Section
    check: Validator
    flag: str | None = None
    metavar: str | None = None
    const: bool | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""
    ovs: str | None = None

    def add_flag(self, group: argparse._ActionsContainer) -> None:
        """Add this key's flag to an argparse parser or group (if it has one).

        The parsed value lands in the attribute named like the key and is None
        when the flag was not given.
        """
        if self.flag is None:
            return
        if self.const is not None:
            group.add_argument(
                self.flag,
                dest=self.name,
                action="store_const",
                const=self.const,
                default=None,
                help=self.help,
            )
        else:
            group.add_argument(
                self.flag,
                dest=self.name,
                metavar=self.metavar,
                choices=self.choices,
                help=self.help,
            )


def _t(name: str, check: Validator, flag: str | None = None, **kw: Any) -> ConfigKey:
    return ConfigKey(name, "tunnel", check, flag, **kw)


def _d(name: str, check: Validator, flag: str | None = None, **kw: Any) -> ConfigKey:
    return ConfigKey(name, "daemon", check, flag, **kw)


CONFIG_KEYS: tuple[ConfigKey, ...] = (
    # -- [[tunnel]] ----------------------------------------------------------------
    _t("name", ifname, "--dev", metavar="NAME",
       help="TAP device and tunnel name (default: stt0)"),  # OVS: the Interface name
    _t("dev", ifname),
    _t("local_ip", address, "--local-ip", metavar="ADDR", ovs="local_ip",
       help="this end's underlay address (required)"),
    _t("remote_ip", address, "--remote-ip", metavar="ADDR", ovs="remote_ip",
       help="the other end's address (required)"),
    _t("key", context_id, "--key", metavar="K", ovs="key",
       help="64-bit context id for both directions (0x.. accepted)"),
    _t("in_key", context_id, "--in-key", metavar="K", ovs="in_key",
       help="context id expected on receive (default: --key)"),
    _t("out_key", context_id, "--out-key", metavar="K", ovs="out_key",
       help="context id sent (default: --key)"),
    _t("dst_port", integer(1, 65535), "--dst-port", metavar="P", ovs="dst_port",
       help="STT destination port (default: 7471)"),
    _t("mtu", integer(MIN_MTU, MAX_OVERLAY_MTU), "--mtu", metavar="N",
       ovs="mtu_request",  # an Interface column, not a tunnel option
       help=f"TAP (overlay) MTU, {MIN_MTU}..{MAX_OVERLAY_MTU} (default: 1500)"),
    _t("bridge", ifname, "--bridge", metavar="BR",  # OVS: the Bridge the port is on
       help="add the TAP device to this Linux bridge"),
    _t("tos", dscp, "--tos", metavar="T", ovs="tos",
       help="outer DSCP 0..63 or 'inherit' (default: inherit; ECN always copied)"),
    _t("ttl", ttl, "--ttl", metavar="T", ovs="ttl",
       help="outer TTL 1..255 or 'inherit' (default: 64)"),
    _t("df", boolean, "--no-df", const=False, ovs="df_default",
       help="do not set DF on outer IPv4 packets"),
    _t("offload", boolean, "--no-offload", const=False,
       help="segment and checksum outer packets in Python instead of kernel GSO "
       "(slower; for debugging)"),
    _t("port_offload", boolean, "--no-port-offload", const=False,
       help="the TAP's reader takes no offloads: hand it complete, MTU-sized frames "
       "(the kernel segments and checksums them through a veth pair)"),
    _t("persist", boolean, "--persist", const=True,
       help="keep the TAP device when the daemon exits"),
    _t("underlay_mtu", underlay_mtu, "--underlay-mtu", metavar="N",
       help="segment for this MTU instead of the route's MTU"),
    # -- [daemon] ------------------------------------------------------------------
    _d("instance", instance_name, "--instance", metavar="NAME",
       help="names the nft table and control socket (default: sttun)"),
    _d("control_socket", socket_path, "--control-socket", metavar="PATH",
       help="default: /run/sttun/<instance>.sock"),
    _d("metrics", hostport, "--metrics", metavar="ADDR",
       help="serve Prometheus metrics on host:port"),
    _d("log_level", choice(LOG_LEVELS), "--log-level", choices=LOG_LEVELS,
       help="default: info"),
    _d("log_format", choice(LOG_FORMATS), "--log-format", choices=LOG_FORMATS,
       help="default: text"),
    _d("firewall", boolean, "--no-firewall", const=False,
       help="do not install the nftables rule that stops the host answering with RSTs"),
    _d("fastpath", choice(FASTPATH_SETTINGS), "--fastpath", choices=FASTPATH_SETTINGS,
       help="kernel receive fast path (eBPF at the underlay's tc ingress): auto = use it "
       "when it loads, on = refuse to start without it, off = never (default: auto)"),
    _d("tx_ring", choice(TX_RING_SETTINGS), "--tx-ring", choices=TX_RING_SETTINGS,
       help="send GSO frames on the underlay through a PACKET_TX_RING (they reach a GRO "
       "receiver whole after software GSO): auto = on underlays without TSO, on = on "
       "every underlay or refuse to start, off = sendmsg (default: auto)"),
    _d("tx_fastpath", choice(TX_FASTPATH_SETTINGS), "--tx-fastpath",
       choices=TX_FASTPATH_SETTINGS,
       help="kernel transmit fast path (eBPF at each TAP's tc egress encapsulates "
       "frames that need no GSO: ACKs, pings, small packets): auto = use it when it "
       "loads, on = refuse to start without it, off = never (default: auto)"),
    _d("ovsdb", ovsdb_remote, "--ovsdb", metavar="REMOTE",
       help="serve Open vSwitch's type=stt interfaces of this OVSDB "
       "(e.g. unix:/var/run/openvswitch/db.sock)"),
    _d("reassembly_timeout", seconds),
    _d("reassembly_high_water", size(MIN_HIGH_WATER)),
    _d("reassembly_low_water", size(0)),
    _d("reassembly_source_budget", size(MIN_HIGH_WATER)),
)  # fmt: skip
"""Every key of the file, ``[[tunnel]]`` keys first, in the order the docs list them."""

TUNNEL_KEYS: tuple[ConfigKey, ...] = tuple(k for k in CONFIG_KEYS if k.section == "tunnel")
"""The ``[[tunnel]]`` keys."""

DAEMON_KEYS: tuple[ConfigKey, ...] = tuple(k for k in CONFIG_KEYS if k.section == "daemon")
"""The ``[daemon]`` keys."""

OVS_OPTION_NAMES: Mapping[str, str | None] = {k.name: k.ovs for k in TUNNEL_KEYS}
"""Each ``[[tunnel]]`` key and the Open vSwitch STT option it mirrors (None: sttun only)."""
