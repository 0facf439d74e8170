"""Open vSwitch ``type=stt`` Interface rows -> the tunnels sttun should run.

Pure translation, no I/O: :func:`translate` turns one row's ``options`` (plus the
row's ``mtu_request`` and the switch's userspace-TSO setting) into an
:class:`OvsTunnel` or a :class:`RowError` whose message goes into the row's
``error`` column; :func:`resolve_clashes` settles rows that would receive the same
frames.  :mod:`sttun.daemon.ovsdb` feeds it from the database.

The option names and their semantics are Open vSwitch's (``vswitchd/vswitch.xml``,
"Tunnel Options", and ``lib/netdev-vport.c``'s parser in OVS 3.1):

=================  ==========================================================
option             meaning (OVS), and what sttun does with it
=================  ==========================================================
``remote_ip``      required; an IPv4/IPv6 unicast address.  ``flow`` (any
                   remote, ``tun_dst`` set per packet): not servable.
``local_ip``       optional; absent = follow the route to ``remote_ip``.  Must
                   be an address of this host.  ``flow``: not servable.
``key``            sets ``in_key`` and ``out_key``; default 0.  A number as C's
                   ``strtoull(s, NULL, 0)`` reads it (decimal, ``0x`` hex,
                   leading-0 octal), 64 bits for STT.  ``flow``: not servable.
``in_key``         the key received frames must carry (default: ``key``).
``out_key``        the key put on sent frames (default: ``key``).
``dst_port``       the TCP destination port; default 7471.
``tos``            the outer ToS byte (DSCP << 2, ECN bits must be 0) or
                   ``inherit``; default 0.  sttun's ``tos`` is the DSCP.
``ttl``            the outer TTL or ``inherit``; default (and 0) 64.
``df_default``     ``false`` clears DF on the outer header; anything else or
                   absent keeps it set.
``csum``           accepted and ignored: STT always carries a TCP checksum.
``packet_type``    only ``legacy_l2`` (the default): STT carries Ethernet.
``egress_pkt_mark``, ``psk``, ``remote_cert``, ``remote_name``: not servable
                   (sttun sends on an ``AF_PACKET`` socket, where no route or
                   packet mark applies, and has no IPsec: refusing beats
                   sending in clear what was meant to be encrypted).
=================  ==========================================================

Other options are ignored, as OVS ignores them (it only logs a warning);
:attr:`OvsTunnel.ignored` lists them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Inherit = Literal["inherit"]
INHERIT: Inherit = "inherit"

STT_PORT = 7471  # OVS STT_DST_PORT
OVS_DEFAULT_TTL = 64  # OVS DEFAULT_TTL (lib/netdev-vport.h); ttl=0 means this too
OVS_DEFAULT_TOS = 0  # vswitch.xml: "Default is 0."
MAX_KEY = 2**64 - 1  # STT keys are 64 bits (vswitch.xml: in_key/out_key)
IP_DSCP_MASK = 0xFC  # OVS: the ECN part of tos must be zero

IGNORED_OPTIONS = frozenset({"csum"})
"""Options OVS accepts for STT that change nothing for sttun."""

REFUSED_OPTIONS: Mapping[str, str] = {
    "egress_pkt_mark": "sttun sends on an AF_PACKET socket: no packet mark can apply",
    "psk": "IPsec is not available with sttun; the tunnel would carry the traffic unencrypted",
    "remote_cert": "IPsec is not available with sttun; "
    "the tunnel would carry the traffic unencrypted",
    "remote_name": "IPsec is not available with sttun; "
    "the tunnel would carry the traffic unencrypted",
}
"""Options sttun cannot honour, with the reason the row's ``error`` column gets."""

FLOW_HINT = (
    "a port served by sttun carries no per-packet tunnel metadata (no tun_id/tun_dst "
    "from OpenFlow): give each remote and key its own port with fixed values, e.g. "
    "options:remote_ip=198.18.0.2 options:key=42"
)


@dataclass(frozen=True)
class OvsTunnel:
    """The tunnel one OVSDB Interface row asks for, in sttun's own terms.

    Field names follow :class:`sttun.daemon.config.TunnelConfig`.  ``local_ip`` is
    ``None`` when the row has none (use the source address of the route to
    ``remote_ip``); ``mtu`` is ``None`` when the row sets no ``mtu_request``;
    ``tos`` is the DSCP (0..63) or ``"inherit"``.  ``offload``: the switch takes
    GSO frames (``other_config:userspace-tso-enable=true``).
    """

    name: str
    remote_ip: IPAddress
    local_ip: IPAddress | None = None
    in_key: int = 0
    out_key: int = 0
    dst_port: int = STT_PORT
    tos: int | Inherit = OVS_DEFAULT_TOS
    ttl: int | Inherit = OVS_DEFAULT_TTL
    df: bool = True
    mtu: int | None = None
    offload: bool = False
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @property
    def dev(self) -> str:
        """The device OVS opens for this port: the Interface name."""
        return self.name

    def clashes_with(self, other: OvsTunnel) -> bool:
        """True when a received frame could belong to both tunnels.

        Receive demux is by (local_ip, remote_ip, in_key, dst_port); a tunnel
        without ``local_ip`` receives on every local address, so it clashes with
        any tunnel that matches the rest.
        """
        if (self.remote_ip, self.in_key, self.dst_port) != (
            other.remote_ip,
            other.in_key,
            other.dst_port,
        ):
            return False
        return self.local_ip is None or other.local_ip is None or self.local_ip == other.local_ip


@dataclass(frozen=True)
class RowError:
    """Why a row cannot be served; ``message`` is written to its ``error`` column."""

    name: str
    message: str


_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def parse_c_ulong(text: str) -> int | None:
    """An unsigned number the way ``strtoull(s, NULL, 0)`` reads a whole string.

    Decimal, ``0x``/``0X`` hex or leading-``0`` octal, surrounding blanks allowed;
    returns None unless the whole string is such a number (OVS would silently read
    ``"12abc"`` as 12: sttun refuses it instead).
    """
    s = text.strip()
    if s.startswith("+"):
        s = s[1:]
    base = 10
    digits = s
    if s[:2] in ("0x", "0X"):
        base, digits = 16, s[2:]
    elif len(s) > 1 and s[0] == "0":
        base, digits = 8, s[1:]
    if not digits or not all(c in _DIGITS[base] for c in digits):
        return None
    return int(digits, base)


def _key(options: Mapping[str, str], which: str) -> tuple[int | None, str | None]:
    """OVS's ``parse_key``: ``which`` or else ``key``; 0 when neither is set."""
    raw = options.get(which, options.get("key"))
    if raw is None:
        return 0, None
    src = which if which in options else "key"
    if raw.strip() == "flow":
        return None, f"{src}=flow is not supported: {FLOW_HINT}"
    n = parse_c_ulong(raw)
    if n is None or n > MAX_KEY:
        return None, f"{src}: expected a key 0..{MAX_KEY}, got {raw!r}"
    return n, None


def _address(raw: str, what: str) -> tuple[IPAddress | None, str | None]:
    if raw.strip() == "flow":
        return None, f"{what}=flow is not supported: {FLOW_HINT}"
    try:
        addr = ipaddress.ip_address(raw.strip())
    except ValueError:
        return None, f"{what}: expected an IPv4 or IPv6 address, got {raw!r}"
    if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address("255.255.255.255"):
        return None, f"{what}: expected a unicast address, got {raw!r}"
    return addr, None


def translate(
    name: str,
    options: Mapping[str, str],
    *,
    mtu_request: int | None = None,
    userspace_tso: bool = False,
    is_local: Callable[[str], bool] | None = None,
) -> OvsTunnel | RowError:
    """One Interface row -> :class:`OvsTunnel`, or :class:`RowError` (see module doc).

    ``is_local(addr)`` says whether an address belongs to this host (the daemon
    passes :func:`sttun.io.netlink.is_local_address`); ``None`` skips that check.
    """
    errors: list[str] = []

    def fail(msg: str | None) -> None:
        if msg:
            errors.append(msg)

    for opt, why in REFUSED_OPTIONS.items():
        if opt in options:
            fail(f"{opt} is not supported: {why}")
    ptype = options.get("packet_type", "legacy_l2")
    if ptype != "legacy_l2":
        fail(f"packet_type={ptype} is not supported: STT carries Ethernet frames (legacy_l2)")

    remote: IPAddress | None = None
    if "remote_ip" not in options:
        fail("remote_ip is required (the STT peer's address, e.g. options:remote_ip=198.18.0.2)")
    else:
        remote, msg = _address(options["remote_ip"], "remote_ip")
        fail(msg)
    local: IPAddress | None = None
    if "local_ip" in options:
        local, msg = _address(options["local_ip"], "local_ip")
        fail(msg)
        if local is not None and remote is not None and local.version != remote.version:
            fail(f"local_ip {local} and remote_ip {remote} have to be of the same address family")
            local = None
        elif local is not None and local == remote:
            fail(f"local_ip and remote_ip must differ, both are {local}")
        elif local is not None and is_local is not None and not is_local(str(local)):
            fail(f"local_ip {local} is not an address of this host")

    in_key, msg = _key(options, "in_key")
    fail(msg)
    out_key, msg2 = _key(options, "out_key")
    if msg2 != msg:
        fail(msg2)

    dst_port = STT_PORT
    if "dst_port" in options:
        n = parse_c_ulong(options["dst_port"])
        if n is None or not 1 <= n <= 65535:
            fail(f"dst_port: expected a port 1..65535, got {options['dst_port']!r}")
        else:
            dst_port = n

    tos: int | Inherit = OVS_DEFAULT_TOS
    if "tos" in options:
        raw = options["tos"].strip()
        if raw == INHERIT:
            tos = INHERIT
        else:
            n = parse_c_ulong(raw)
            if n is None or n != n & IP_DSCP_MASK:
                fail(
                    f"tos: expected a ToS byte with the ECN bits zero (DSCP x 4, e.g. "
                    f'0x28 for DSCP 10) or "inherit", got {options["tos"]!r}'
                )
            else:
                tos = n >> 2

    ttl: int | Inherit = OVS_DEFAULT_TTL
    if "ttl" in options:
        raw = options["ttl"].strip()
        if raw == INHERIT:
            ttl = INHERIT
        else:
            n = parse_c_ulong(raw)
            if n is None or n > 255:
                fail(f'ttl: expected 0..255 or "inherit", got {options["ttl"]!r}')
            else:
                ttl = n or OVS_DEFAULT_TTL

    df = options.get("df_default", "true") != "false"

    mtu: int | None = None
    if mtu_request is not None:
        mtu = mtu_request

    if errors:
        return RowError(name, "; ".join(errors))
    assert remote is not None and in_key is not None and out_key is not None
    known = {
        "remote_ip", "local_ip", "key", "in_key", "out_key", "dst_port", "tos", "ttl",
        "df_default", "packet_type", *IGNORED_OPTIONS, *REFUSED_OPTIONS,
    }  # fmt: skip
    ignored = tuple(sorted(k for k in options if k not in known))
    return OvsTunnel(
        name=name,
        remote_ip=remote,
        local_ip=local,
        in_key=in_key,
        out_key=out_key,
        dst_port=dst_port,
        tos=tos,
        ttl=ttl,
        df=df,
        mtu=mtu,
        offload=userspace_tso,
        ignored=ignored,
    )


def resolve_clashes(
    wanted: Iterable[OvsTunnel], served: Mapping[str, OvsTunnel]
) -> tuple[dict[str, OvsTunnel], list[RowError]]:
    """Keep the tunnels that can be told apart on receive; the others become errors.

    A tunnel already ``served`` keeps its place; among new ones the name that sorts
    first wins.  Returns (name -> tunnel kept, errors for the rest).
    """
    items = sorted(wanted, key=lambda t: (t.name not in served, t.name))
    kept: dict[str, OvsTunnel] = {}
    errors: list[RowError] = []
    for t in items:
        other = next((k for k in kept.values() if k.clashes_with(t)), None)
        if other is None:
            kept[t.name] = t
            continue
        where = f"local_ip {t.local_ip}" if t.local_ip else "any local address"
        errors.append(
            RowError(
                t.name,
                f"key clash with interface {other.name}: both receive remote_ip "
                f"{t.remote_ip}, in_key {t.in_key}, dst_port {t.dst_port} on {where}; "
                "give one of them another key",
            )
        )
    return kept, errors
