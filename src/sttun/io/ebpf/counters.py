"""The per-CPU counter maps both fast-path programs keep, read from user space.

Each program counts into two ``PERCPU_ARRAY`` maps of (packets u64, bytes u64): one
slot per tunnel, and one per reason it left a packet to Python (the last reason,
``ERROR``, counting packets it dropped).  :func:`program_counters` sums them over
the CPUs into the JSON-ready shape ``sttun show`` reports.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import Any

from sttun.io.ebpf import syscall as bpf

#: One CPU's counter: packets, bytes.
COUNTER = struct.Struct("<QQ")
_U32 = struct.Struct("<I")


def zero_counter(fd: int, index: int, ncpus: int) -> None:
    """Reset slot ``index`` of a per-CPU counter map on every CPU."""
    bpf.map_update(fd, _U32.pack(index), bytes(COUNTER.size * ncpus))


def percpu_sum(fd: int, index: int, ncpus: int) -> tuple[int, int]:
    """(packets, bytes) of slot ``index``, summed over the CPUs (0, 0 if absent)."""
    raw = bpf.map_lookup(fd, _U32.pack(index), COUNTER.size * ncpus)
    if raw is None:
        return 0, 0
    packets = octets = 0
    for p, b in COUNTER.iter_unpack(raw):
        packets += p
        octets += b
    return packets, octets


def program_counters(
    tunnel_stats: int,
    reasons: int,
    slots: Mapping[str, int],
    reason_enum: type[enum.IntEnum],
    ncpus: int,
) -> dict[str, Any]:
    """``{"tunnels": {name: {"frames", "bytes"}}, "passed": {reason: {"packets",
    "bytes"}}, "errors": {"packets", "bytes"}}`` of one program; reasons are the
    enum's names in lower case, its ``ERROR`` member is ``errors``."""
    tunnels = {}
    for name, slot in slots.items():
        frames, octets = percpu_sum(tunnel_stats, slot, ncpus)
        tunnels[name] = {"frames": frames, "bytes": octets}
    passed = {}
    errors = {"packets": 0, "bytes": 0}
    for reason in reason_enum:
        packets, octets = percpu_sum(reasons, reason, ncpus)
        if reason.name == "ERROR":
            errors = {"packets": packets, "bytes": octets}
        else:
            passed[reason.name.lower()] = {"packets": packets, "bytes": octets}
    return {"tunnels": tunnels, "passed": passed, "errors": errors}


def tracked_map(
    fds: list[int], kind: int, key: int, value: int, entries: int, name: str, flags: int = 0
) -> int:
    """Create a map and append its descriptor to ``fds`` (closed together on failure)."""
    fd = bpf.map_create(kind, key, value, entries, name, flags)
    fds.append(fd)
    return fd
