"""Network-namespace helpers for sttun's end-to-end tests.

Every e2e test builds its own little world out of namespaces and veth pairs, runs
commands in it and tears it down again, even when the test fails.  The pieces:

* :func:`need_root` - skip the test unless we are root and ``ip netns`` works.
* :func:`unique_suffix` - a short per-process, per-call suffix for names
  (interface names are limited to 15 characters).
* :class:`Netns` - ``ip netns add`` / ``ip netns exec`` / ``ip netns del`` as an object
  and context manager; :meth:`Netns.entered` switches *this thread* into the
  namespace so that sockets, TAP devices and netlink handles created inside the block
  live there (they stay there after the block ends).
* :func:`veth_pair` - a veth pair between two namespaces with addresses, up.
* :class:`Capture` - tcpdump in a namespace, started and stopped reliably.
* :func:`leftover_namespaces` - namespaces this process created that still exist,
  for a cleanliness assertion at the end of a test.
* pytest fixtures :func:`two_hosts` (two namespaces joined by a veth pair, underlay
  addresses from test-addresses.md) and :func:`netns_factory` (make any number of
  namespaces, all deleted at teardown).  ``tests/conftest.py`` re-exports them.

Addresses: tests use only the ranges in ``/work/shared/test-addresses.md``
(underlay 198.18.0.0/15 and 2001:db8:0:1::/64).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

NS_PREFIX = "sttun-"
"""Every namespace made here starts with this prefix."""

CLONE_NEWNET = 0x40000000

_counter = itertools.count()
_created: set[str] = set()
_libc = ctypes.CDLL(None, use_errno=True)

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


def need_tools(*tools: str) -> None:
    """Skip the calling test unless every named program is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        list(argv),
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and res.returncode != 0:
        raise CommandError(res.returncode, list(argv), output=res.stdout, stderr=res.stderr)
    return res


class CommandError(subprocess.CalledProcessError):
    """A command failed; ``str()`` includes its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}: {str(self.stderr or '').strip()}"


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leftover_namespaces() -> list[str]:
    """Namespaces created by this process through :class:`Netns` that still exist."""
    existing = set(list_namespaces())
    return sorted(_created & existing)


class Netns:
    """A named network namespace that deletes itself on :meth:`close`.

    ``Netns()`` picks a unique name ``sttun-<role>-<suffix>``.  ``lo`` is brought up.
    Processes started with :meth:`popen` are killed on close.
    """

    def __init__(self, role: str = "ns", name: str | None = None) -> None:
        self.name = name or f"{NS_PREFIX}{role}-{unique_suffix()}"
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        _run(["ip", "netns", "add", self.name])
        _created.add(self.name)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise

    # -- running things ------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec NAME``."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace; text output captured."""
        return _run(self.argv(argv), check=check, timeout=timeout, input=input)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is killed on :meth:`close`."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kwargs)
        self._procs.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[Netns]:
        """Switch the calling thread into this namespace for the ``with`` block.

        Sockets, TAP devices and netlink sockets created inside the block belong to
        this namespace for their whole life.  Subprocesses started inside the block
        also run in it.  (``/sys`` is *not* remounted, unlike ``ip netns exec``.)
        """
        old = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        new = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(new)
            try:
                yield self
            finally:
                _setns(old)
        finally:
            os.close(new)
            os.close(old)

    # -- small conveniences --------------------------------------------------
    def ip(self, *args: str) -> str:
        """Run ``ip ARGS`` in the namespace and return its stdout."""
        return self.run(["ip", *args]).stdout

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl inside the namespace."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def ethtool_k(self, dev: str, **features: bool | str) -> None:
        """``ethtool -K dev feature on|off ...``; values True/False or "on"/"off"
        (underscores in names become dashes)."""
        args: list[str] = []
        for k, v in features.items():
            if isinstance(v, str):
                if v not in ("on", "off"):
                    raise ValueError(f"ethtool feature {k}: expected on/off, got {v!r}")
                val = v
            else:
                val = "on" if v else "off"
            args += [k.replace("_", "-"), val]
        self.run(["ethtool", "-K", dev, *args])

    def close(self) -> None:
        """Kill our processes and delete the namespace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        # "ip netns del" can fail transiently while processes still exit.
        for _ in range(20):
            if _run(["ip", "netns", "del", self.name], check=False).returncode == 0:
                break
            if self.name not in list_namespaces():
                break
            time.sleep(0.1)
        if self.name not in list_namespaces():
            _created.discard(self.name)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _with_prefix(addr: str) -> str:
    if "/" in addr:
        return addr
    ip = ipaddress.ip_address(addr)
    return f"{addr}/{24 if ip.version == 4 else 64}"


def add_address(ns: Netns, dev: str, addr: str) -> None:
    """Add ``addr`` (default prefix /24 or /64) to ``dev``; IPv6 without DAD."""
    cidr = _with_prefix(addr)
    extra = ["nodad"] if ":" in cidr else []
    ns.run(["ip", "addr", "add", cidr, "dev", dev, *extra])


def veth_pair(
    ns_a: Netns,
    ns_b: Netns,
    name_a: str,
    name_b: str,
    addr_a: str | Sequence[str] | None = None,
    addr_b: str | Sequence[str] | None = None,
    mtu: int = 1500,
) -> None:
    """A veth pair ``name_a`` (in ``ns_a``) <-> ``name_b`` (in ``ns_b``), both up.

    Addresses may be a string or a list of strings, each with or without prefix
    length (default /24 for IPv4, /64 for IPv6; IPv6 is added with ``nodad`` so it is
    usable at once).
    """
    ns_a.run(
        [
            "ip",
            "link",
            "add",
            name_a,
            "mtu",
            str(mtu),
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            ns_b.name,
            "mtu",
            str(mtu),
        ]
    )
    for ns, dev, addrs in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        if addrs is None:
            addrs = []
        elif isinstance(addrs, str):
            addrs = [addrs]
        for a in addrs:
            add_address(ns, dev, a)
        ns.run(["ip", "link", "set", dev, "up"])


class Capture:
    """tcpdump writing a pcap inside a namespace; use as a context manager.

    ``__enter__`` returns once tcpdump reports it is listening, ``__exit__`` stops it
    with SIGINT and waits for the file to be complete.
    """

    def __init__(
        self, ns: Netns, dev: str, path: str | Path, bpf: str = "", snaplen: int = 262144
    ) -> None:
        self.ns, self.dev, self.path, self.bpf, self.snaplen = ns, dev, Path(path), bpf, snaplen
        self.proc: subprocess.Popen[bytes] | None = None
        #: packets tcpdump reported "dropped by kernel" (known after stop; None if unknown)
        self.dropped: int | None = None

    def __enter__(self) -> Capture:
        argv = [
            "tcpdump",
            "-i",
            self.dev,
            "-n",
            "-U",
            "--immediate-mode",
            "-B",
            "32768",
            "-s",
            str(self.snaplen),
            "-w",
            str(self.path),
        ]
        if self.bpf:
            argv += self.bpf.split()
        self.proc = self.ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        # tcpdump prints "listening on DEV ..." to stderr once the socket is ready.
        deadline = time.monotonic() + 10
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if b"listening on" in line or not line:
                break
        if b"listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"tcpdump did not start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop tcpdump and wait until the pcap is flushed."""
        if self.proc is None:
            return
        time.sleep(0.2)  # let packets in flight reach the capture socket
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            tail = self.proc.stderr.read().decode(errors="replace")
            self.proc.stderr.close()
            m = re.search(r"(\d+) packets? dropped by kernel", tail)
            self.dropped = int(m.group(1)) if m else None
        self.proc = None

    def count(self, display_filter: str = "") -> int:
        """Packets in the pcap matching a tcpdump (BPF) filter expression."""
        argv = ["tcpdump", "-n", "-r", str(self.path)]
        if display_filter:
            argv += display_filter.split()
        res = _run(argv, check=True)
        return len([ln for ln in res.stdout.splitlines() if ln.strip()])


# --------------------------------------------------------------------------- fixtures
@dataclass
class TwoHosts:
    """Two namespaces ``a`` and ``b`` joined by veth ``dev_a`` <-> ``dev_b``."""

    a: Netns
    b: Netns
    dev_a: str
    dev_b: str
    ip_a: str = "198.18.0.1"
    ip_b: str = "198.18.0.2"
    ip6_a: str = "2001:db8:0:1::1"
    ip6_b: str = "2001:db8:0:1::2"
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def make_two_hosts(mtu: int = 1500) -> Iterator[TwoHosts]:
    """Context manager behind the :func:`two_hosts` fixture (usable without pytest)."""
    sfx = unique_suffix()
    with Netns("a") as a, Netns("b") as b:
        h = TwoHosts(a, b, ifname("va", sfx), ifname("vb", sfx))
        veth_pair(
            a,
            b,
            h.dev_a,
            h.dev_b,
            [f"{h.ip_a}/24", f"{h.ip6_a}/64"],
            [f"{h.ip_b}/24", f"{h.ip6_b}/64"],
            mtu=mtu,
        )
        yield h


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Two fresh namespaces on a veth pair (198.18.0.1/.2, 2001:db8:0:1::1/::2)."""
    need_root()
    with make_two_hosts() as h:
        yield h


@pytest.fixture
def netns_factory() -> Iterator[Any]:
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
    pseudo-header sum over the full TCP length (design.md §1).  Without it the TCP
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


def link_mac(ns: Netns, dev: str) -> str:
    """MAC address of ``dev`` in ``ns``."""
    import json

    return str(json.loads(ns.run(["ip", "-j", "link", "show", dev]).stdout)[0]["address"])
