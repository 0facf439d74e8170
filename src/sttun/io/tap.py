"""TAP device with virtio-net headers: the overlay side of the data path.

Every frame read from or written to a :class:`TapDevice` is preceded by a 10-byte
``struct virtio_net_hdr`` (``IFF_VNET_HDR``, ``TUNSETVNETHDRSZ`` = 10).  This module
passes those bytes through untouched; :mod:`sttun.wire` decodes them.

With ``offload=True`` the device announces ``TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6``,
so the overlay stack hands over up to ~64 KB TCP super-frames with a partial
checksum (docs/architecture.md).  With ``offload=False`` nothing is announced and the kernel
hands over only complete, checksummed, MTU-sized frames, still behind a 10-byte
vnet header (all zero fields except possibly ``DATA_VALID``).

Reads: :meth:`TapDevice.read_into` returns **0 when nothing is pending** (the fd is
non-blocking); a real frame is never shorter than the 10-byte header plus 14 bytes.
Size receive buffers with :data:`TAP_READ_SIZE`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Sequence

from sttun.errors import SetupError
from sttun.wire.ether import ETH_HLEN, VLAN_HLEN
from sttun.wire.vnet import VNET_HDR_LEN

# ioctl numbers and flags from <linux/if_tun.h> (checked against the kernel headers).
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETIFF = 0x800454D2
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800

# <linux/sockios.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1

MTU_MIN = 68
"""Smallest MTU we accept: the IPv4 minimum (RFC 791)."""
MTU_MAX = 65000
"""Largest MTU we accept; leaves room under the 64 KB IP limit for outer headers."""

IFNAMSIZ = 16
"""Kernel interface-name buffer; names are at most 15 characters."""

TAP_READ_SIZE = VNET_HDR_LEN + 65535 + ETH_HLEN + VLAN_HLEN + 64
"""A receive buffer this large holds any frame the TAP can hand over (64 KB IP
packet + Ethernet + one VLAN tag + slack)."""

_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INT = struct.Struct("16si20x")


def validate_ifname(name: str) -> bytes:
    """Return ``name`` encoded for ``struct ifreq``; raise :class:`SetupError` if invalid."""
    if not isinstance(name, str) or not name:
        raise SetupError(f"interface name: expected a non-empty string, got {name!r}")
    raw = name.encode("ascii", "replace")
    if len(raw) > IFNAMSIZ - 1:
        raise SetupError(
            f"interface name {name!r}: at most {IFNAMSIZ - 1} characters, got {len(raw)}"
        )
    if name in (".", "..") or any(c in name for c in "/ \t\n:%") or not name.isprintable():
        raise SetupError(f"interface name {name!r}: contains characters Linux does not allow")
    return raw


def _ifreq_ioctl(req: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), req, data)


def _if_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class TapDevice:
    """A TAP interface opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``.

    ``name``: at most 15 characters.  If a persistent TAP of that name exists it is
    reopened and keeps its addresses and bridge membership.
    ``offload``: announce checksum/TSO offload (see module docstring).
    ``persist``: make the device outlive this object (``TUNSETPERSIST``).
    ``mtu``: set the MTU (68..65000); ``None`` leaves it as is.
    ``bridge``: enslave the device to this existing Linux bridge.
    ``up``: bring the link up.

    Raises :class:`SetupError` with a message naming the device on any failure.
    """

    def __init__(
        self,
        name: str,
        *,
        offload: bool = True,
        persist: bool = False,
        mtu: int | None = None,
        bridge: str | None = None,
        up: bool = True,
    ) -> None:
        raw = validate_ifname(name)
        if mtu is not None and not (MTU_MIN <= mtu <= MTU_MAX):
            raise SetupError(f"TAP {name}: MTU must be {MTU_MIN}..{MTU_MAX}, got {mtu}")
        self._fd = -1
        self.name = name
        self.offload = offload
        self.existed = _if_exists(name)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise SetupError(f"TAP {name}: cannot open /dev/net/tun: {e.strerror}") from e
        self._fd = fd
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            try:
                res = fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(raw, flags))
            except OSError as e:
                hint = ""
                if self.existed:
                    hint = " (an interface of that name exists and is not a free TAP device)"
                raise SetupError(f"TAP {name}: TUNSETIFF failed: {e.strerror}{hint}") from e
            self.name = _IFREQ_FLAGS.unpack(res)[0].rstrip(b"\0").decode()
            self._ioctl_int(TUNSETVNETHDRSZ, VNET_HDR_LEN, "TUNSETVNETHDRSZ", by_ref=True)
            offl = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) if offload else 0
            self._ioctl_int(TUNSETOFFLOAD, offl, "TUNSETOFFLOAD")
            if persist:
                self._ioctl_int(TUNSETPERSIST, 1, "TUNSETPERSIST")
            self.persistent = persist or self._is_persistent()
            if mtu is not None:
                self.set_mtu(mtu)
            if bridge is not None:
                self.set_bridge(bridge)
            if up:
                self.set_up(True)
        except BaseException:
            self.close(remove=not self.existed and persist)
            raise

    # -- ioctl helpers -----------------------------------------------------------
    def _ioctl_int(self, req: int, value: int, what: str, *, by_ref: bool = False) -> None:
        """ioctl with an int argument; ``by_ref`` passes a pointer to it instead."""
        try:
            fcntl.ioctl(self._fd, req, struct.pack("i", value) if by_ref else value)
        except OSError as e:
            raise SetupError(f"TAP {self.name}: {what} failed: {e.strerror}") from e

    def _is_persistent(self) -> bool:
        res = fcntl.ioctl(self._fd, TUNGETIFF, _IFREQ_FLAGS.pack(b"", 0))
        return bool(_IFREQ_FLAGS.unpack(res)[1] & IFF_PERSIST)

    # -- link configuration --------------------------------------------------------
    def set_mtu(self, mtu: int) -> None:
        """Set the device MTU (68..65000)."""
        if not (MTU_MIN <= mtu <= MTU_MAX):
            raise SetupError(f"TAP {self.name}: MTU must be {MTU_MIN}..{MTU_MAX}, got {mtu}")
        try:
            _ifreq_ioctl(SIOCSIFMTU, _IFREQ_INT.pack(self.name.encode(), mtu))
        except OSError as e:
            raise SetupError(f"TAP {self.name}: cannot set MTU {mtu}: {e.strerror}") from e

    def set_up(self, up: bool = True) -> None:
        """Bring the link up (or down)."""
        raw = self.name.encode()
        try:
            cur = _IFREQ_FLAGS.unpack(_ifreq_ioctl(SIOCGIFFLAGS, _IFREQ_FLAGS.pack(raw, 0)))[1]
            new = (cur | IFF_UP) if up else (cur & ~IFF_UP)
            _ifreq_ioctl(SIOCSIFFLAGS, _IFREQ_FLAGS.pack(raw, new & 0xFFFF))
        except OSError as e:
            raise SetupError(f"TAP {self.name}: cannot set link up={up}: {e.strerror}") from e

    def set_bridge(self, bridge: str) -> None:
        """Enslave the device to the existing Linux bridge ``bridge``."""
        from pyroute2 import IPRoute  # imported lazily: only set-up needs it

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=bridge)
            if not idx:
                raise SetupError(f"TAP {self.name}: bridge {bridge!r} does not exist")
            links = ipr.link("get", index=idx[0])
            kind = None
            info = links[0].get_attr("IFLA_LINKINFO") if links else None
            if info is not None:
                kind = info.get_attr("IFLA_INFO_KIND")
            if kind != "bridge":
                raise SetupError(f"TAP {self.name}: {bridge!r} is not a bridge (kind {kind})")
            try:
                ipr.link("set", index=self.ifindex, master=idx[0])
            except Exception as e:
                raise SetupError(f"TAP {self.name}: cannot join bridge {bridge!r}: {e}") from e

    # -- properties ------------------------------------------------------------------
    @property
    def ifindex(self) -> int:
        """Interface index."""
        return socket.if_nametoindex(self.name)

    @property
    def mac(self) -> str:
        """The device's MAC address as ``aa:bb:cc:dd:ee:ff``."""
        res = _ifreq_ioctl(SIOCGIFHWADDR, struct.pack("16s16x", self.name.encode()))
        return res[18:24].hex(":")

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd < 0

    def fileno(self) -> int:
        """The non-blocking TAP file descriptor (for select/poll)."""
        return self._fd

    # -- data path ---------------------------------------------------------------------
    def read_into(self, buf: bytearray | memoryview) -> int:
        """Read one frame (10-byte vnet header + Ethernet frame) into ``buf``.

        Returns the number of bytes, or **0 if no frame is pending**.  A buffer
        shorter than the frame truncates it; use :data:`TAP_READ_SIZE`.
        """
        try:
            return os.readv(self._fd, (buf,))
        except BlockingIOError:
            return 0

    def write(
        self, vnet_hdr: bytes | bytearray | memoryview, frame: bytes | bytearray | memoryview
    ) -> int:
        """Write one frame behind its 10-byte vnet header (``writev``, no join).

        Returns the bytes written (header included), 0 if the device would block.
        Raises ``OSError`` when the kernel rejects the frame (e.g. ``EINVAL`` for an
        inconsistent vnet header).
        """
        try:
            return os.writev(self._fd, (vnet_hdr, frame))
        except BlockingIOError:
            return 0

    def writev(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Like :meth:`write` for a frame in several parts; ``parts[0]`` is the vnet header."""
        try:
            return os.writev(self._fd, parts)
        except BlockingIOError:
            return 0

    def close(self, remove: bool = False) -> None:
        """Close the fd.  A non-persistent TAP disappears with it; a persistent one is
        deleted only when ``remove`` is true."""
        if self._fd < 0:
            return
        try:
            if remove:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self._fd, TUNSETPERSIST, 0)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TapDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TapDevice({getattr(self, 'name', '?')!r}, fd={self._fd})"
