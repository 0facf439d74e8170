"""A veth pair as a tunnel's overlay port: one end for a switch, one for sttun.

A TAP hands whatever sttun writes to the reader as it is: a 64 KB GSO frame with a
partial inner checksum stays one 64 KB frame with a partial checksum.  The Linux
stack copes, but a reader that does not understand offloads does not - Open
vSwitch's userspace datapath without ``other_config:userspace-tso-enable=true``
reads its system ports with plain ``AF_PACKET`` sockets, drops frames above the
port MTU ("Dropped packet: Too big. GRO/TSO enabled?") and forwards partial
checksums unfinished.

A :class:`VethPort` puts the kernel between sttun and such a reader::

    sttun ──AF_PACKET(PACKET_VNET_HDR) sendmsg──▶ [peer] ══veth══ [name] ──▶ OVS port
          ◀──────── recv (GRO-merged) ─────────

* **sttun → switch**: sttun sends each decapsulated frame, vnet header first, on
  an ``AF_PACKET`` socket bound to the peer end.  With ``offload=False`` the peer
  has TX checksum and TSO off, so the kernel's software GSO cuts a GSO frame into
  MTU-sized segments and completes every checksum, at C speed, on the way into the
  pair; the switch reads ordinary frames.  With ``offload=True`` GSO frames cross
  the pair whole, for readers that take vnet headers (OVS with userspace TSO).
* **switch → sttun**: frames the switch sends into ``name`` arrive at the peer,
  where GRO (turned on, which also turns on the veth's NAPI) merges a TCP flow's
  MTU-sized segments into 64 KB frames before sttun reads them, vnet header first
  (``NEEDS_CSUM`` + ``gso_type`` like a TSO frame from a TAP).

Neither end takes part in the host's IP stack: IPv6 is disabled on both (no
router solicitations or MLD reports of the host leak into the overlay), and
neither gets an address.

The pair outlives the process: ``name`` stays a port of the switch while sttun
restarts, and a new :class:`VethPort` of the same name adopts the pair (its peer is
found by the kernel's link, whatever its name).  ``close(remove=True)`` deletes it.

The interface matches :class:`sttun.io.tap.TapDevice` where the daemon uses it:
``fileno``, ``read_into`` (0 when nothing is pending), ``write``/``writev`` (vnet
header first; 0 when the socket buffer is full), ``set_mtu``, ``close(remove=)``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sttun.errors import SetupError
from sttun.io.ethtool import get_feature, set_feature
from sttun.io.packet_socket import PacketSocket
from sttun.io.tap import MTU_MAX, MTU_MIN, validate_ifname

GRO_FLUSH_TIMEOUT_NS = 50_000
"""How long GRO on sttun's end holds a flow's segments for more (``gro_flush_timeout``).

A switch sends one frame per ``sendmsg``; veth runs its peer's NAPI poll right
inside that call, so with the default 0 every poll sees one segment and GRO merges
nothing.  Measured here: 40 back-to-back 1448-byte TCP segments from an
``AF_PACKET`` sender arrived as 40 frames with 0, as one 57984-byte frame with
50 µs.  A segment with PSH still flushes at once (TCP GRO), so an interactive
flow does not wait."""

PORT_ALIAS = "sttun:port"
"""``ifalias`` of the switch-side end of every pair sttun makes (``ip link`` shows it
as ``alias``): :func:`sttun_ports` finds pairs left behind, e.g. when a port was
deleted from the switch while sttun was not running."""

PEER_SUFFIX = "-s"
"""A new pair's sttun end is called ``<name>-s`` (or ``s-<crc32>`` for long names)."""


def peer_name(name: str) -> str:
    """The name given to the sttun end of a new pair for port ``name``."""
    if len(name) + len(PEER_SUFFIX) <= 15:
        return name + PEER_SUFFIX
    return f"s-{zlib.crc32(name.encode()):08x}"


def set_gro_flush_timeout(ifname: str, nanoseconds: int) -> None:
    """Set ``gro_flush_timeout`` of ``ifname`` (sysfs is its only interface).

    sysfs shows the network namespace it was mounted in.  When ``/sys`` shows this
    thread's namespace (the daemon started with ``ip netns exec``, or in the host's
    own namespace) the file is written directly; otherwise (a thread that switched
    namespace with ``setns``) a short ``unshare --mount`` child mounts a sysfs of
    the current namespace and writes it there, as ``ip netns exec`` would.
    """
    if not 0 <= nanoseconds <= 2**32 - 1:
        raise SetupError(f"{ifname}: gro_flush_timeout must be 0..4294967295 ns")
    base = Path("/sys/class/net") / ifname
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError as e:
        raise SetupError(f"{ifname}: no such interface") from e
    try:
        same_ns = int((base / "ifindex").read_text()) == ifindex
    except (OSError, ValueError):
        same_ns = False
    try:
        if same_ns:
            (base / "gro_flush_timeout").write_text(f"{nanoseconds}\n")
            return
        script = 'mount -t sysfs sysfs /sys && echo "$2" > "/sys/class/net/$1/gro_flush_timeout"'
        res = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             ifname, str(nanoseconds)],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        raise SetupError(f"{ifname}: cannot set gro_flush_timeout: {e}") from e
    if res.returncode != 0:
        raise SetupError(f"{ifname}: cannot set gro_flush_timeout: {res.stderr.strip()}")


def get_gro_flush_timeout(ifname: str) -> int:
    """Read ``gro_flush_timeout`` of ``ifname`` (same namespace rules as the setter)."""
    base = Path("/sys/class/net") / ifname
    try:
        if int((base / "ifindex").read_text()) == socket.if_nametoindex(ifname):
            return int((base / "gro_flush_timeout").read_text())
    except (OSError, ValueError):
        pass
    script = 'mount -t sysfs sysfs /sys && cat "/sys/class/net/$1/gro_flush_timeout"'
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", ifname],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise SetupError(f"{ifname}: cannot read gro_flush_timeout: {res.stderr.strip()}")
    return int(res.stdout)


def disable_ipv6(ifname: str) -> None:
    """``net.ipv6.conf.IFNAME.disable_ipv6=1``: the host's own IPv6 (router
    solicitations, MLD reports, DAD) must not leak into the overlay through a port.

    ``/proc/sys/net`` shows the network namespace of the thread that opens it.
    A kernel without IPv6 has no such file: nothing to do then.
    """
    path = Path("/proc/sys/net/ipv6/conf") / ifname / "disable_ipv6"
    try:
        path.write_text("1\n")
    except FileNotFoundError:
        if Path("/proc/sys/net/ipv6").exists():
            raise SetupError(f"{ifname}: cannot disable IPv6: no {path}") from None
    except OSError as e:
        raise SetupError(f"{ifname}: cannot disable IPv6: {e.strerror}") from e


def sttun_ports() -> list[str]:
    """Names of the switch-side ends of every veth pair a :class:`VethPort` made
    (:data:`PORT_ALIAS`) in this network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if link.get_attr("IFLA_IFALIAS") == PORT_ALIAS and _link_kind(link) == "veth"
        )


def _link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


class VethPort:
    """The veth pair ``name`` (the switch's port) <-> peer (sttun's end); see module doc.

    ``name``: the switch-side device (an OVS Interface name), at most 15 characters.
    An existing veth of that name is adopted with its peer; anything else of that
    name is an error.  ``offload``: see the module docstring.  ``mtu``: both ends
    (68..65000); ``None`` keeps the current MTU.  ``up``: bring both ends up.
    ``gro_flush_timeout``: nanoseconds, see :data:`GRO_FLUSH_TIMEOUT_NS`.

    Raises :class:`SetupError` naming the device on any failure.
    """

    def __init__(
        self,
        name: str,
        *,
        offload: bool = False,
        mtu: int | None = None,
        up: bool = True,
        gro_flush_timeout: int = GRO_FLUSH_TIMEOUT_NS,
    ) -> None:
        validate_ifname(name)
        if mtu is not None and not (MTU_MIN <= mtu <= MTU_MAX):
            raise SetupError(f"veth {name}: MTU must be {MTU_MIN}..{MTU_MAX}, got {mtu}")
        self.name = name
        self._sock: PacketSocket | None = None
        self.existed, self.peer = self._adopt_or_create(name)
        try:
            for dev in (self.name, self.peer):
                disable_ipv6(dev)
            if mtu is not None:
                self.set_mtu(mtu)
            self.set_offload(offload)
            set_feature(self.peer, "generic-receive-offload", True)
            set_gro_flush_timeout(self.peer, gro_flush_timeout)
            if up:
                self.set_up(True)
            self._sock = PacketSocket(self.peer, ports=None, vnet_hdr=True)
        except BaseException:
            self.close(remove=not self.existed)
            raise
        self._recv = self._sock.recv_into
        self._send = self._sock.send

    # -- set-up ---------------------------------------------------------------------
    @staticmethod
    def _adopt_or_create(name: str) -> tuple[bool, str]:
        from pyroute2 import IPRoute  # imported lazily: only set-up needs it

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                link = ipr.link("get", index=idx[0])[0]
                kind = _link_kind(link)
                peer_idx = link.get_attr("IFLA_LINK")
                if kind != "veth":
                    raise SetupError(
                        f"veth {name}: an interface of that name exists and is a "
                        f"{kind or 'device of unknown kind'}, not a veth"
                    )
                peers = ipr.link("get", index=peer_idx) if peer_idx else []
                if not peers or link.get_attr("IFLA_LINK_NETNSID") is not None:
                    raise SetupError(f"veth {name}: its peer is not in this network namespace")
                return True, str(peers[0].get_attr("IFLA_IFNAME"))
            peer = peer_name(name)
            if ipr.link_lookup(ifname=peer):
                raise SetupError(f"veth {name}: the peer name {peer} is taken by another device")
            try:
                ipr.link("add", ifname=name, kind="veth", peer=peer)
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], ifalias=PORT_ALIAS)
            except Exception as e:
                raise SetupError(f"veth {name}: cannot create the pair: {e}") from e
            return False, peer

    def set_offload(self, offload: bool) -> None:
        """Checksum + TSO on sttun's end on (frames cross whole) or off (kernel segments).

        The switch's end always has TSO off: veth hands a frame to its peer's GRO
        only when the sending end has no TSO (``veth_skb_is_eligible_for_gro``),
        and a GSO frame from a packet socket is segmented on the way into a veth
        or TAP anyway (seen with OVS's userspace TSO), so GRO is what merges it
        back.  Frames from sttun to the switch depend on sttun's end only.
        """
        if offload:
            for feature in ("tx-checksumming", "scatter-gather", "tcp-segmentation-offload"):
                set_feature(self.peer, feature, True)
        else:
            set_feature(self.peer, "tx-checksumming", False)  # takes TSO with it
            if get_feature(self.peer, "tcp-segmentation-offload"):
                set_feature(self.peer, "tcp-segmentation-offload", False)
        if get_feature(self.name, "tcp-segmentation-offload"):
            set_feature(self.name, "tcp-segmentation-offload", False)
        self.offload = offload

    def set_mtu(self, mtu: int) -> None:
        """Set the MTU of both ends (68..65000)."""
        if not (MTU_MIN <= mtu <= MTU_MAX):
            raise SetupError(f"veth {self.name}: MTU must be {MTU_MIN}..{MTU_MAX}, got {mtu}")
        self._set_links(mtu=mtu)

    def set_up(self, up: bool = True) -> None:
        """Bring both ends up (or down)."""
        self._set_links(state="up" if up else "down")

    def _set_links(self, **attrs: Any) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for dev in (self.peer, self.name):
                idx = ipr.link_lookup(ifname=dev)
                if not idx:
                    raise SetupError(f"veth {self.name}: {dev} does not exist")
                try:
                    ipr.link("set", index=idx[0], **attrs)
                except Exception as e:
                    raise SetupError(f"veth {self.name}: cannot set {attrs} on {dev}: {e}") from e

    # -- properties ---------------------------------------------------------------
    @property
    def ifindex(self) -> int:
        """Interface index of the switch-side end ``name``."""
        return socket.if_nametoindex(self.name)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._sock is None

    def fileno(self) -> int:
        """The non-blocking packet socket on sttun's end (for select/poll/epoll)."""
        return -1 if self._sock is None else self._sock.fileno()

    # -- data path -------------------------------------------------------------------
    def read_into(self, buf: bytearray | memoryview) -> int:
        """Receive one frame the switch sent (10-byte vnet header + Ethernet frame).

        Returns the number of bytes, or **0 if nothing is pending**.  GRO-merged
        frames reach 64 KB: size ``buf`` with :data:`sttun.io.tap.TAP_READ_SIZE`.
        """
        return self._recv(buf)

    def write(
        self, vnet_hdr: bytes | bytearray | memoryview, frame: bytes | bytearray | memoryview
    ) -> int:
        """Send one frame behind its 10-byte vnet header towards the switch.

        Returns the bytes accepted, 0 if the socket buffer is full.  Raises
        ``OSError`` when the kernel rejects the frame (``EINVAL``: inconsistent vnet
        header; ``EMSGSIZE``: a non-GSO frame above the MTU).
        """
        return self._send((vnet_hdr, frame))

    def writev(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Like :meth:`write` for a frame in several parts; ``parts[0]`` is the vnet header."""
        return self._send(parts)

    def close(self, remove: bool = False) -> None:
        """Close the socket; with ``remove`` also delete the pair (both ends go)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if remove:
            from pyroute2 import IPRoute

            with IPRoute() as ipr, contextlib.suppress(Exception):
                idx = ipr.link_lookup(ifname=self.name)
                if idx:
                    ipr.link("del", index=idx[0])

    def __enter__(self) -> VethPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VethPort({self.name!r}, peer={self.peer!r}, offload={self.offload})"
