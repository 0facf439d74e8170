"""Routing, link and neighbour information from rtnetlink, and a change watcher.

Everything here works in the *current* network namespace (the daemon is started
inside one with ``ip netns exec``).  Queries use pyroute2's ``IPRoute``; the
:class:`NetlinkWatcher` uses a plain ``AF_NETLINK`` socket from the standard library
(only message types are read from it, so no decoder is needed, and its fd is a real,
non-blocking socket that any select loop can poll).

Neighbour resolution (:func:`resolve`) uses the kernel's own machinery: an
``RTM_NEWNEIGH`` request with ``NTF_USE`` (what ``ip neigh ... use`` would do) marks
the entry as wanted, creating it if needed, and the kernel sends one ARP request or
IPv6 neighbour solicitation to the address - exactly what a first packet would have
triggered.  No probe traffic of our own is sent and the call never blocks.  An entry
that is already valid is not disturbed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from sttun.errors import SetupError

# <linux/neighbour.h>
NTF_USE = 0x01
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_VALID = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY
"""States in which the entry's link-layer address may be used (kernel's NUD_VALID)."""

# <linux/rtnetlink.h>
RTN_LOCAL = 2
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
IFF_UP = 0x1

EVENT_KINDS: dict[int, str] = {
    16: "link",
    17: "link",  # RTM_NEWLINK, RTM_DELLINK
    20: "addr",
    21: "addr",  # RTM_NEWADDR, RTM_DELADDR
    24: "route",
    25: "route",  # RTM_NEWROUTE, RTM_DELROUTE
    28: "neigh",
    29: "neigh",  # RTM_NEWNEIGH, RTM_DELNEIGH
}
"""rtnetlink message type -> the kind of change reported by :class:`NetlinkWatcher`."""

ALL_KINDS = frozenset(EVENT_KINDS.values())
NLMSG_OVERRUN = 4

_NLMSGHDR = struct.Struct("=IHHII")


@dataclass(frozen=True)
class Route:
    """Result of a route lookup: how packets to a remote address leave this host."""

    ifname: str
    ifindex: int
    src_ip: str
    """The source address the kernel would pick (``RTA_PREFSRC``)."""
    gateway: str | None
    """Next-hop router, or ``None`` when the destination is on-link."""
    mtu: int
    """Route MTU (``RTAX_MTU``) if set, else the interface MTU."""

    @property
    def next_hop(self) -> str | None:
        """The address whose link-layer address frames must go to (gateway or None)."""
        return self.gateway


class LinkInfo(NamedTuple):
    """Basic facts about one interface; unpacks as ``(ifindex, mac, mtu, up)``."""

    ifindex: int
    mac: str
    mtu: int
    up: bool


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _check_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip)
    except ValueError as e:
        raise SetupError(f"{ip!r} is not an IP address") from e


def _family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def _link_msg(ipr: Any, ifindex: int) -> Any:
    try:
        msgs = ipr.link("get", index=ifindex)
    except Exception as e:
        raise SetupError(f"no interface with index {ifindex}: {e}") from e
    return msgs[0]


def route_lookup(remote_ip: str) -> Route:
    """Ask the kernel how it would reach ``remote_ip`` (``ip route get``).

    Raises :class:`SetupError` when there is no route or the address is local.
    """
    ip = _check_ip(remote_ip)
    with _ipr() as ipr:
        try:
            msgs = ipr.route("get", dst=str(ip))
        except Exception as e:
            code = getattr(e, "code", None)
            why = os.strerror(code) if isinstance(code, int) else str(e)
            raise SetupError(f"no route to {ip} ({why})") from e
        if not msgs:
            raise SetupError(f"no route to {ip}")
        m = msgs[0]
        if m.get("type") == RTN_LOCAL:
            raise SetupError(f"{ip} is a local address of this host, not a remote one")
        oif = m.get_attr("RTA_OIF")
        if oif is None:
            raise SetupError(f"route to {ip} has no output interface")
        src = m.get_attr("RTA_PREFSRC")
        if src is None:
            raise SetupError(f"route to {ip} has no source address (add one to the interface)")
        gw = m.get_attr("RTA_GATEWAY")
        link = _link_msg(ipr, oif)
        mtu = int(link.get_attr("IFLA_MTU"))
        metrics = m.get_attr("RTA_METRICS")
        if metrics is not None:
            rmtu = metrics.get_attr("RTAX_MTU")
            if rmtu:
                mtu = int(rmtu)
        return Route(
            str(link.get_attr("IFLA_IFNAME")), int(oif), str(src), str(gw) if gw else None, mtu
        )


def link_info(ifname: str) -> LinkInfo:
    """Index, MAC, MTU and admin state of ``ifname``; :class:`SetupError` if missing."""
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise SetupError(f"no interface {ifname!r}")
        link = _link_msg(ipr, idx[0])
        return LinkInfo(
            int(idx[0]),
            str(link.get_attr("IFLA_ADDRESS")),
            int(link.get_attr("IFLA_MTU")),
            bool(link["flags"] & IFF_UP),
        )


def set_gso_max_size(ifname: str, size: int) -> None:
    """Set the largest GSO packet the stack builds for ``ifname`` (``gso_max_size``).

    A TAP limited to e.g. 65000 hands over overlay super-frames that still fit a 64 KB
    STT frame once the STT and outer headers are added.
    """
    if not 1 <= size <= 65536:
        raise SetupError(f"gso_max_size for {ifname}: expected 1..65536, got {size}")
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise SetupError(f"no interface {ifname!r}")
        try:
            ipr.link("set", index=idx[0], gso_max_size=size)
        except Exception as e:
            raise SetupError(f"cannot set gso_max_size {size} on {ifname}: {e}") from e


def neighbour(ifindex: int, ip: str) -> str | None:
    """The MAC address of ``ip`` on ``ifindex`` if the kernel knows a usable one."""
    addr = _check_ip(ip)
    with _ipr() as ipr:
        for n in ipr.neigh("dump", ifindex=ifindex, family=_family(addr)):
            dst = n.get_attr("NDA_DST")
            if dst is None or ipaddress.ip_address(dst) != addr:
                continue
            lladdr = n.get_attr("NDA_LLADDR")
            if n["state"] & NUD_VALID and lladdr:
                return str(lladdr)
            return None
    return None


def resolve(ifindex: int, ip: str) -> None:
    """Start neighbour resolution of ``ip`` on ``ifindex``; returns at once.

    Uses ``RTM_NEWNEIGH`` with ``NTF_USE`` (see module docstring).  Poll
    :func:`neighbour` or watch ``"neigh"`` events for the result.
    """
    addr = _check_ip(ip)
    with _ipr() as ipr:
        try:
            ipr.neigh(
                "replace",
                dst=str(addr),
                ifindex=ifindex,
                family=_family(addr),
                flags=NTF_USE,
                state=0,
            )
        except Exception as e:
            raise SetupError(f"cannot resolve {addr} on ifindex {ifindex}: {e}") from e


def is_local_address(ip: str) -> bool:
    """True if ``ip`` is an address of this host (a ``local`` route exists for it)."""
    addr = _check_ip(ip)
    with _ipr() as ipr:
        try:
            msgs = ipr.route("get", dst=str(addr))
        except Exception:
            return False
        return bool(msgs) and msgs[0].get("type") == RTN_LOCAL


class NetlinkWatcher:
    """Reports which kinds of routing state changed, for cache invalidation.

    Subscribes to link, address, IPv4/IPv6 route and neighbour notifications.  Poll
    :meth:`fileno` for readability, then call :meth:`read` for the set of kinds
    (``"link"``, ``"addr"``, ``"route"``, ``"neigh"``) seen since the last call.  If
    the kernel had to drop notifications (receive buffer overrun), every kind is
    reported, since anything may have changed.
    """

    GROUPS = (
        RTMGRP_LINK
        | RTMGRP_NEIGH
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_ROUTE
    )
    RCVBUF = 1 << 20

    def __init__(self, groups: int = GROUPS) -> None:
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            )
        except OSError as e:
            raise SetupError(f"netlink watcher: {e.strerror}") from e
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
            sock.bind((0, groups))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise SetupError(f"netlink watcher: {e.strerror}") from e
        self._sock = sock
        self._buf = bytearray(1 << 16)

    def fileno(self) -> int:
        """The netlink socket's fd (readable when events are pending)."""
        return self._sock.fileno()

    def read(self) -> set[str]:
        """Drain pending notifications; return the kinds of change they report
        (empty if nothing was pending; never blocks)."""
        kinds: set[str] = set()
        buf = self._buf
        while True:
            try:
                n = self._sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # we missed notifications
                    kinds |= ALL_KINDS
                    continue
                raise
            off = 0
            while off + _NLMSGHDR.size <= n:
                length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, off)
                if length < _NLMSGHDR.size:
                    break
                kind = EVENT_KINDS.get(mtype)
                if kind is not None:
                    kinds.add(kind)
                elif mtype == NLMSG_OVERRUN:
                    kinds |= ALL_KINDS
                off += (length + 3) & ~3
        return kinds

    drain = read
    """Alias of :meth:`read`."""

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> NetlinkWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "LinkInfo",
    "NetlinkWatcher",
    "Route",
    "is_local_address",
    "link_info",
    "neighbour",
    "resolve",
    "route_lookup",
    "set_gso_max_size",
]
