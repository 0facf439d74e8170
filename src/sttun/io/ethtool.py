"""Device offload features through the ``SIOCETHTOOL`` ioctl (``ethtool -k`` / ``-K``).

Used by :class:`~sttun.io.veth_port.VethPort` (offloads of its pair) and by the
daemon's ``tx_ring = "auto"`` rule (:func:`tso_enabled`).  The single-feature
("legacy") ethtool commands: one ``struct ethtool_value`` per call.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

from sttun.errors import SetupError

__all__ = ["FEATURES", "get_feature", "set_feature", "tso_enabled"]

# <linux/sockios.h>, <linux/ethtool.h>: the single-feature ("legacy") commands.
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17
ETHTOOL_GSG = 0x18
ETHTOOL_SSG = 0x19
ETHTOOL_GTSO = 0x1E
ETHTOOL_STSO = 0x1F
ETHTOOL_GGRO = 0x2B
ETHTOOL_SGRO = 0x2C
_ETHTOOL_VALUE = struct.Struct("=II")
_IFREQ_PTR = struct.Struct("16sP8x")

FEATURES: dict[str, tuple[int, int]] = {
    # name (as ethtool -k shows it)   (get, set)
    "tx-checksumming": (ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM),
    "scatter-gather": (ETHTOOL_GSG, ETHTOOL_SSG),
    "tcp-segmentation-offload": (ETHTOOL_GTSO, ETHTOOL_STSO),
    "generic-receive-offload": (ETHTOOL_GGRO, ETHTOOL_SGRO),
}
"""The device features sttun reads and sets, by ethtool's names."""


def _ethtool(ifname: str, cmd: int, value: int = 0) -> int:
    buf = ctypes.create_string_buffer(_ETHTOOL_VALUE.pack(cmd, value), _ETHTOOL_VALUE.size)
    req = _IFREQ_PTR.pack(ifname.encode(), ctypes.addressof(buf))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, req)
    return int(_ETHTOOL_VALUE.unpack(buf.raw)[1])


def get_feature(ifname: str, feature: str) -> bool:
    """Whether ``feature`` (a key of :data:`FEATURES`) is on for ``ifname``."""
    try:
        return bool(_ethtool(ifname, FEATURES[feature][0]))
    except OSError as e:
        raise SetupError(f"{ifname}: cannot read {feature}: {e.strerror}") from e


def set_feature(ifname: str, feature: str, on: bool) -> None:
    """Turn ``feature`` (a key of :data:`FEATURES`) on or off for ``ifname``.

    Raises :class:`SetupError` if the kernel refuses or the feature did not change
    (a device may not support turning it on).
    """
    try:
        _ethtool(ifname, FEATURES[feature][1], int(on))
    except OSError as e:
        state = "on" if on else "off"
        raise SetupError(f"{ifname}: cannot set {feature} {state}: {e.strerror}") from e
    if get_feature(ifname, feature) != on:
        raise SetupError(f"{ifname}: {feature} stays {'off' if on else 'on'}")


def tso_enabled(ifname: str) -> bool | None:
    """Whether ``ifname`` (in this network namespace) has TCP segmentation offload on;
    None if the kernel does not say.  Without it, the kernel's software GSO cuts every
    GSO frame sent on it: where a TX ring makes the difference (:mod:`sttun.io.tx_ring`)."""
    try:
        return bool(_ethtool(ifname, ETHTOOL_GTSO))
    except OSError:
        return None
