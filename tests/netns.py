"""Test-side fixtures over :mod:`sttun.tools.topology` and :mod:`sttun.tools.capture`.

The e2e tests build their worlds with the same helpers as ``sttun demo`` and the
benchmarks; this module only adds what tests need around them:

* :func:`need_root` / :func:`need_tools` - skip a test that cannot run here;
* :func:`unique_suffix` / :func:`ifname` - names unique to this process and call
  (interface names are limited to 15 characters);
* :class:`Netns` - a :class:`~sttun.tools.topology.Host` with a unique name
  ``sttun-<role>-<suffix>``, deleted (its processes stopped) on :meth:`Netns.close`,
  also as a context manager and even when the test fails;
* :func:`veth_pair` - a veth pair between two namespaces with addresses, up and
  ready (IPv6 included) when it returns;
* :func:`make_two_hosts` and the pytest fixture :func:`two_hosts` - a
  :class:`~sttun.tools.topology.TwoHosts` with a unique name, always removed;
  :func:`netns_factory` - any number of namespaces, all deleted at teardown
  (``tests/conftest.py`` re-exports both fixtures);
* :func:`leftover_namespaces` - namespaces this process made that still exist;
* :func:`non_root_prefix` - an argv prefix that runs a command as a user without
  root's privileges, from any checkout;
* raw frame builders for io-level tests (independent of ``sttun.wire``).

``TwoHosts`` and ``Capture`` are the project's own classes, re-exported here for
convenience.  Addresses: only the documentation ranges listed in docs/architecture.md ("Tests")
(underlay 198.18.0.0/15 and 2001:db8:0:1::/64).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence

import pytest

from sttun.tools.capture import Capture
from sttun.tools.topology import (
    Host,
    TwoHosts,
    add_address,
    add_veth,
    create_namespace,
    list_namespaces,
    wait_link_ready,
)

__all__ = [
    "Capture",
    "Host",
    "Netns",
    "TwoHosts",
    "add_address",
    "ifname",
    "leftover_namespaces",
    "link_mac",
    "list_namespaces",
    "make_two_hosts",
    "need_root",
    "need_tools",
    "netns_factory",
    "non_root_prefix",
    "two_hosts",
    "unique_suffix",
    "veth_pair",
]

NS_PREFIX = "sttun-"
"""Every namespace made here starts with this prefix."""
TWO_HOSTS_PREFIX = "sttun-t"
"""Prefix of the :func:`make_two_hosts` pairs: ``sttun-t-<suffix>-a`` / ``-b``."""

_counter = itertools.count()
_created: set[str] = set()

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _B36[r] + out
        if n == 0:
            return out


def unique_suffix() -> str:
    """A short name suffix unique to this process and call: pid, counter, random.

    At most 9 characters: the pid in base 36 (<= 5 digits for pid <= 4194304), the
    call counter as exactly 3 base-36 digits (unique for 46656 calls, and fixed width
    so that no two (pid, counter) pairs run together into the same text), and one
    random character against leftovers of an earlier process with the same pid.
    ``"v" + role + suffix`` with a role of up to 5 characters fits 15 characters.
    """
    pid = _base36(os.getpid())
    ctr = _base36(next(_counter) % 46656).rjust(3, "0")
    return f"{pid}{ctr}{random.choice(_B36)}"


def ifname(role: str, suffix: str | None = None) -> str:
    """An interface name ``<role><suffix>``; fails loudly if it exceeds 15 chars."""
    name = f"{role}{suffix if suffix is not None else unique_suffix()}"
    if len(name) > 15:
        raise ValueError(f"interface name {name!r} is longer than 15 characters")
    return name


def have_root() -> bool:
    """True when we are root and the ``ip`` tool exists."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def need_root() -> None:
    """Skip the calling test unless we are root and network namespaces work."""
    if not have_root():
        pytest.skip("needs root and iproute2 (network namespaces)")


def need_fastpath() -> None:
    """Skip the calling test unless we are root and the kernel fast path can load."""
    need_root()
    from sttun.io.rx_fastpath import fastpath_support

    why = fastpath_support()
    if why is not None:
        pytest.skip(f"the fast path cannot run here: {why}")


def need_ovs() -> None:
    """Skip the calling test unless we are root and Open vSwitch can run here."""
    need_root()
    from sttun.tools.ovs_host import check_support

    reason = check_support()
    if reason:
        pytest.skip(reason)


def need_tools(*tools: str) -> None:
    """Skip the calling test unless every named program is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def leftover_namespaces() -> list[str]:
    """Namespaces created by this process (:class:`Netns`, :func:`make_two_hosts`)
    that still exist."""
    existing = set(list_namespaces())
    return sorted(_created & existing)


class Netns(Host):
    """A network namespace with a unique name that deletes itself on :meth:`close`.

    ``Netns(role)`` makes ``sttun-<role>-<suffix>`` (``lo`` up, IPv6 DAD off: see
    :func:`~sttun.tools.topology.create_namespace`).  Processes started with
    :meth:`popen` are stopped on close, and so is anything else left running in it.
    """

    def __init__(self, role: str = "ns", name: str | None = None) -> None:
        super().__init__(name or f"{NS_PREFIX}{role}-{unique_suffix()}")
        self._closed = False
        create_namespace(self.name)
        _created.add(self.name)

    def close(self) -> None:
        """Stop our processes and delete the namespace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.delete()
        _created.discard(self.name)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def _with_prefix(addr: str) -> str:
    if "/" in addr:
        return addr
    ip = ipaddress.ip_address(addr)
    return f"{addr}/{24 if ip.version == 4 else 64}"


def veth_pair(
    ns_a: Host,
    ns_b: Host,
    name_a: str,
    name_b: str,
    addr_a: str | Sequence[str] | None = None,
    addr_b: str | Sequence[str] | None = None,
    mtu: int = 1500,
) -> None:
    """A veth pair ``name_a`` (in ``ns_a``) <-> ``name_b`` (in ``ns_b``), up and ready.

    Addresses may be a string or a list of strings, each with or without prefix
    length (default /24 for IPv4, /64 for IPv6; IPv6 is added with ``nodad`` so it is
    usable at once).  Returns once both ends are operationally up with IPv6
    configured (:func:`~sttun.tools.topology.wait_link_ready`).
    """
    add_veth(ns_a, name_a, ns_b, name_b, mtu)
    for ns, dev, addrs in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        if addrs is None:
            addrs = []
        elif isinstance(addrs, str):
            addrs = [addrs]
        for a in addrs:
            add_address(ns, dev, _with_prefix(a))
        ns.ip("link", "set", dev, "up")
    for ns, dev in ((ns_a, name_a), (ns_b, name_b)):
        wait_link_ready(ns, dev)


def link_mac(ns: Host, dev: str) -> str:
    """MAC address of ``dev`` in ``ns``."""
    return ns.link_mac(dev)


# --------------------------------------------------------------------------- fixtures
@contextlib.contextmanager
def make_two_hosts(mtu: int = 1500) -> Iterator[TwoHosts]:
    """A built :class:`~sttun.tools.topology.TwoHosts` with a unique name, always removed.

    Namespaces ``sttun-t-<suffix>-a`` / ``-b``; the veth is ``eth0`` on both sides
    (``h.dev_a`` / ``h.dev_b``) with 198.18.0.1/.2 and 2001:db8:0:1::1/::2
    (``h.ip_a``, ``h.ip_b``, ``h.ip6_a``, ``h.ip6_b``).
    """
    hosts = TwoHosts(prefix=TWO_HOSTS_PREFIX, suffix=unique_suffix(), underlay_mtu=mtu)
    names = [h.name for h in hosts.hosts]
    _created.update(names)
    try:
        hosts.build()
        yield hosts
    finally:
        hosts.close()
        _created.difference_update(set(names) - set(list_namespaces()))


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Two fresh namespaces on a veth pair (198.18.0.1/.2, 2001:db8:0:1::1/::2)."""
    need_root()
    with make_two_hosts() as h:
        yield h


@pytest.fixture
def netns_factory() -> Iterator[Callable[[str], Netns]]:
    """A callable ``make(role) -> Netns``; every namespace is deleted at teardown."""
    need_root()
    made: list[Netns] = []

    def make(role: str = "ns") -> Netns:
        ns = Netns(role)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()


# --------------------------------------------------------------------------- privileges
def non_root_prefix() -> list[str]:
    """An argv prefix that runs a command without root's privileges, from any checkout.

    ``unshare --user`` without a uid map: inside, ``geteuid()`` is the overflow uid
    (65534), and there is no capability in this machine's namespaces (no
    CAP_NET_ADMIN), but files are still opened with the caller's credentials - so a
    checkout inside a directory only root may enter (``mktemp -d``, ``/root``) stays
    readable, which ``setpriv --reuid=65534`` cannot offer.  Falls back to
    ``setpriv`` when user namespaces are unavailable and this Python is usable by
    nobody; skips the test otherwise.
    """
    probe = [sys.executable, "-c", "import os, sttun; assert os.geteuid() != 0"]
    candidates = [
        ["unshare", "--user"],
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
    ]
    for prefix in candidates:
        if shutil.which(prefix[0]) is None:
            continue
        res = subprocess.run(
            [*prefix, *probe], capture_output=True, timeout=60, check=False, cwd="/"
        )
        if res.returncode == 0:
            return prefix
    pytest.skip("no way to run this Python without root here (unshare --user, setpriv)")


# --------------------------------------------------------------------------- raw frames
# Minimal byte builders for io-level tests (the real codecs live in sttun.wire; these
# are deliberately independent of them so io tests do not depend on the codec).

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VNET_HDR = struct.Struct("<BBHHHH")
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (little-endian, x86)."""

STT_PORT = 7471


def ones_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Ones'-complement sum of ``data`` (16-bit big-endian words), folded, not inverted."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    s = start + sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def mac_bytes(mac: str) -> bytes:
    """``"aa:bb:..."`` -> 6 bytes."""
    return bytes.fromhex(mac.replace(":", ""))


def ipv4_header(src: str, dst: str, payload_len: int, proto: int = 6, ident: int = 1) -> bytes:
    """A 20-byte IPv4 header (DF set, TTL 64) with a correct header checksum."""
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + payload_len,
            ident,
            0x4000,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
    )
    struct.pack_into("!H", hdr, 10, ~ones_sum(hdr) & 0xFFFF)
    return bytes(hdr)


def ipv6_header(src: str, dst: str, payload_len: int, nxt: int = 6) -> bytes:
    """A 40-byte IPv6 header (hop limit 64)."""
    return struct.pack(
        "!IHBB16s16s",
        6 << 28,
        payload_len,
        nxt,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )


def pseudo_sum(src: str, dst: str, tcp_len: int) -> int:
    """Folded, *un-complemented* TCP pseudo-header sum (IPv4 or IPv6)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        ph = s.packed + d.packed + struct.pack("!BBH", 0, 6, tcp_len)
    else:
        ph = s.packed + d.packed + struct.pack("!IxxxB", tcp_len, 6)
    return ones_sum(ph)


def tcp_frame(
    src_mac: str,
    dst_mac: str,
    src_ip: str,
    dst_ip: str,
    payload: bytes,
    *,
    sport: int = 50000,
    dport: int = STT_PORT,
    seq: int = 0,
    ack: int = 1,
    flags: int = 0x18,
    gso_size: int | None = None,
) -> tuple[bytes, bytes]:
    """``(vnet_hdr, frame)`` for one Ethernet+IP+TCP frame carrying ``payload``.

    With ``gso_size`` the frame is a GSO super-packet: vnet header ``NEEDS_CSUM`` +
    ``TCPV4``/``TCPV6``, ``hdr_len`` = all headers, ``csum_start`` = L4 offset,
    ``csum_offset`` = 16, and the TCP checksum field holds the un-complemented
    pseudo-header sum over the full TCP length (docs/architecture.md).  Without it the TCP
    checksum is complete and the vnet header is all zero.
    """
    v6 = ":" in src_ip
    tcp_len = 20 + len(payload)
    eth = mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", 0x86DD if v6 else 0x0800)
    ip = ipv6_header(src_ip, dst_ip, tcp_len) if v6 else ipv4_header(src_ip, dst_ip, tcp_len)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0))
    l4 = 14 + len(ip)
    if gso_size is not None:
        struct.pack_into("!H", tcp, 16, pseudo_sum(src_ip, dst_ip, tcp_len))
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
        vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, l4 + 20, gso_size, l4, 16)
    else:
        c = ones_sum(payload, ones_sum(tcp, pseudo_sum(src_ip, dst_ip, tcp_len)))
        struct.pack_into("!H", tcp, 16, ~c & 0xFFFF)
        vnet = VNET_HDR.pack(0, 0, 0, 0, 0, 0)
    return vnet, eth + ip + bytes(tcp) + payload
