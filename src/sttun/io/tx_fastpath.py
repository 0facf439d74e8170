"""The kernel transmit fast path: one program, attached at the egress of each TAP.

    tx = TxFastPath.load()                        # FastPathError(reason) if not
    tx.attach(tap_ifindex)
    tx.set_tunnel(TxTunnel("t1", tap_ifindex, underlay_ifindex, template, ...))
    tx.set_tunnel(None-equivalent: tx.remove_tunnel(tap_ifindex))
    tx.counters()   # {"tunnels": {"t1": {...}}, "passed": {...}, "errors": {...}}
    tx.close()

The program (:mod:`sttun.io.ebpf.tx_program`) encapsulates the single frames a TAP
transmits for a tunnel with an entry in its map, and its TCP GSO frames where the
entry has a segment size (the underlay has TSO), and redirects them to the
underlay; the rest goes on to sttun's TAP reader.  The daemon writes a tunnel's entry while
the tunnel can send (up, next hop resolved, offloads on) and removes it otherwise,
so everything the Python send path decides first (queueing while a neighbour
resolves, the drop counters) stays in Python.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sttun.io.ebpf import emit
from sttun.io.ebpf import syscall as bpf
from sttun.io.ebpf import tx_program as txp
from sttun.io.ebpf.attach import TcFilter, TcxLink, attach_auto
from sttun.io.ebpf.counters import program_counters, tracked_map, zero_counter
from sttun.io.order_counter import OrderCounter
from sttun.io.rx_fastpath import FastPathError, close_fds, explain_oserror

log = logging.getLogger(__name__)

#: Tunnels (TAPs) one program serves.
MAX_TUNNELS = 1024
#: Environment variable that makes :meth:`TxFastPath.load` load a program the
#: verifier refuses (to exercise the fallback; the receive program has its own).
TX_FORCE_INVALID_ENV = "STTUN_TX_FASTPATH_FORCE_INVALID"
_U32 = struct.Struct("<I")
# ifindex, slot, max inner, flags, sport, segment payload, max GSO inner
_VALUE_TAIL = struct.Struct("<IIIIHHI")


@dataclass(frozen=True)
class TxTunnel:
    """One tunnel as the transmit program sees it.

    ``template``: the outer headers as :meth:`~sttun.core.encap.Encapsulator.
    header_template` builds them (Ethernet + IP + TCP-like + STT, per-frame fields
    zero); ``tos_table``/``ttl_table``: the outer TOS and TTL for each inner value;
    ``max_inner``: the largest inner frame whose outer packet fits the underlay MTU;
    ``fixed_sport``: a fixed outer source port, or None for the flow hash;
    ``segment_payload``: the outer TCP payload per segment (0: GSO frames go to
    Python) and ``max_gso_inner``: the largest inner GSO frame that fits one STT frame.
    """

    name: str
    tap_ifindex: int
    underlay_ifindex: int
    template: bytes
    tos_table: bytes
    ttl_table: bytes
    max_inner: int
    ipv6: bool
    fixed_sport: int | None = None
    segment_payload: int = 0
    max_gso_inner: int = 0

    def value(self, slot: int) -> bytes:
        """The program's map value for this tunnel, counting into ``slot``."""
        want = txp.HDR_V6 if self.ipv6 else txp.HDR_V4
        if len(self.template) != want:
            raise ValueError(f"tunnel {self.name!r}: header template of {len(self.template)} bytes")
        if len(self.tos_table) != 256 or len(self.ttl_table) != 256:
            raise ValueError(f"tunnel {self.name!r}: TOS/TTL tables must have 256 entries")
        flags = txp.TX_FLAG_ENABLED | (txp.TX_FLAG_IPV6 if self.ipv6 else 0)
        sport = 0
        if self.fixed_sport is not None:
            flags |= txp.TX_FLAG_FIXED_SPORT
            sport = self.fixed_sport
        tail = _VALUE_TAIL.pack(
            self.underlay_ifindex,
            slot,
            max(0, min(self.max_inner, 0xFFFFFFFF)),
            flags,
            sport,
            self.segment_payload if 0 < self.segment_payload <= 0xFFFF else 0,
            max(0, min(self.max_gso_inner, 0xFFFFFFFF)),
        )
        value = self.template.ljust(txp.TPL_SIZE, b"\0") + tail
        assert len(value) == txp.VAL_TOS
        value += self.tos_table + self.ttl_table
        assert len(value) == txp.TX_VALUE_SIZE
        return value


class TxFastPath:
    """The transmit program of one daemon, attached to its TAPs (see the module doc)."""

    def __init__(self, maps: txp.TxMapFds, prog_fd: int) -> None:
        self._maps = maps
        self._prog_fd: int | None = prog_fd
        self._ncpus = bpf.possible_cpus()
        self._links: dict[int, TcxLink | TcFilter] = {}
        self._slots: dict[str, int] = {}
        self._entries: dict[int, tuple[str, bytes]] = {}  # tap ifindex -> (name, value)
        self._counters: dict[str, OrderCounter] = {}
        size = MAX_TUNNELS * emit.ORDER_VALUE_SIZE
        self._order_mmap = mmap.mmap(
            maps.order, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._order = memoryview(self._order_mmap).cast("Q")
        #: The kernel's id of the loaded program.
        self.prog_id = bpf.prog_id(prog_fd)

    # -- life cycle -------------------------------------------------------------------
    @classmethod
    def load(cls, *, invalid_program: bool | None = None) -> TxFastPath:
        """Create the maps and load the program (nothing attached yet).

        Raises :class:`FastPathError` with the reason when anything fails.
        """
        if invalid_program is None:
            invalid_program = os.environ.get(TX_FORCE_INVALID_ENV, "") not in ("", "0")
        fds: list[int] = []
        try:
            maps = _create_maps(fds)
            code = txp.build(maps, invalid=invalid_program)
            try:
                prog_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, code, name="sttun_tx")
            except bpf.VerifierError as e:
                why = f"transmit fast path: the verifier rejected the program: {e.summary}"
                raise FastPathError(why) from e
        except FastPathError:
            close_fds(fds)
            raise
        except OSError as e:
            close_fds(fds)
            raise FastPathError(f"transmit fast path: {explain_oserror(e)}") from e
        return cls(maps, prog_fd)

    @property
    def loaded(self) -> bool:
        """False once closed."""
        return self._prog_fd is not None

    def attach(self, tap_ifindex: int, *, mode: str = "auto") -> str:
        """Attach at the TAP's egress (idempotent); returns ``"tcx"`` or ``"tc"``.

        Raises :class:`FastPathError` when the kernel refuses.
        """
        if self._prog_fd is None:
            raise FastPathError("transmit fast path: closed")
        link = self._links.get(tap_ifindex)
        if link is not None:
            return link.mode
        try:
            link = attach_auto(self._prog_fd, tap_ifindex, mode, egress=True)
        except OSError as e:
            raise FastPathError(f"transmit fast path: {explain_oserror(e)}") from e
        self._links[tap_ifindex] = link
        return link.mode

    def detach(self, tap_ifindex: int) -> None:
        """Take the program off a TAP and forget its tunnel (idempotent)."""
        self.remove_tunnel(tap_ifindex)
        link = self._links.pop(tap_ifindex, None)
        if link is not None:
            link.detach()

    def attached(self) -> list[int]:
        """The TAP ifindexes the program is attached to."""
        return list(self._links)

    def close(self) -> None:
        """Detach from every TAP and free program and maps (idempotent)."""
        if self._prog_fd is None:
            return
        for link in self._links.values():
            with contextlib.suppress(Exception):
                link.detach()
        self._links.clear()
        m = self._maps
        self._order.release()
        with contextlib.suppress(BufferError):
            self._order_mmap.close()  # an OrderCounter still held keeps the mapping
        close_fds(
            [self._prog_fd, m.tunnels, m.reasons, m.tunnel_stats, m.scratch, m.crc_table, m.order]
        )
        self._prog_fd = None

    def __enter__(self) -> TxFastPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tunnels ----------------------------------------------------------------------
    def _slot(self, name: str) -> int:
        slot = self._slots.get(name)
        if slot is None:
            used = set(self._slots.values())
            free = next((i for i in range(MAX_TUNNELS) if i not in used), None)
            if free is None:
                raise ValueError(f"transmit fast path: at most {MAX_TUNNELS} tunnels")
            slot = self._slots[name] = free
            zero_counter(self._maps.tunnel_stats, slot, self._ncpus)
            self._order[2 * slot] = self._order[2 * slot + 1] = 0
        return slot

    def _write(self, tap_ifindex: int, name: str, value: bytes) -> None:
        if self._entries.get(tap_ifindex) == (name, value):
            return
        bpf.map_update(self._maps.tunnels, _U32.pack(tap_ifindex), value)
        self._entries[tap_ifindex] = (name, value)

    def set_tunnel(self, tunnel: TxTunnel) -> None:
        """Write ``tunnel``'s entry, enabled (only when it changed).  A name keeps its
        counters."""
        self._write(tunnel.tap_ifindex, tunnel.name, tunnel.value(self._slot(tunnel.name)))

    def disable(self, tap_ifindex: int, name: str) -> None:
        """Keep the TAP's entry but send every frame to Python (the tunnel cannot
        send now); its frames are still counted for ordering."""
        value = bytes(txp.VAL_IFINDEX) + _VALUE_TAIL.pack(0, self._slot(name), 0, 0, 0, 0, 0)
        self._write(tap_ifindex, name, value.ljust(txp.TX_VALUE_SIZE, b"\0"))

    def remove_tunnel(self, tap_ifindex: int) -> None:
        """Remove the entry of a TAP (idempotent)."""
        if self._entries.pop(tap_ifindex, None) is not None:
            bpf.map_delete(self._maps.tunnels, _U32.pack(tap_ifindex))

    def order_counter(self, name: str) -> OrderCounter:
        """The ordering counters of tunnel ``name`` (for its TAP reader; the same
        object while the name keeps its slot)."""
        slot = self._slot(name)
        oc = self._counters.get(name)
        if oc is None or oc._passed != 2 * slot:
            oc = self._counters[name] = OrderCounter(self._order, slot)
        return oc

    def tunnel_names(self) -> set[str]:
        """The names that have counters."""
        return set(self._slots)

    def forget(self, names: Iterable[str]) -> None:
        """Drop the counters of tunnels that are gone (their slots are reused)."""
        for name in names:
            self._slots.pop(name, None)
            self._counters.pop(name, None)

    # -- counters ---------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """Counters summed over CPUs, JSON-ready::

            {"program_id": 98, "taps": 2,
             "tunnels": {name: {"frames": n, "bytes": n}},   # sent by the program
             "passed": {reason: {"packets": n, "bytes": n}}, # left to Python
             "errors": {"packets": n, "bytes": n}}           # failed helpers

        ``bytes`` count inner frames (as the Python path's tx bytes do).
        """
        if self._prog_fd is None:
            return {"program_id": None, "taps": 0, "tunnels": {}, "passed": {}, "errors": {}}
        c = program_counters(
            self._maps.tunnel_stats, self._maps.reasons, self._slots, txp.TxPassReason, self._ncpus
        )
        return {
            "program_id": self.prog_id,
            "taps": len(self._links),
            **c,
        }


def _create_maps(fds: list[int]) -> txp.TxMapFds:
    def make(kind: int, key: int, value: int, entries: int, name: str, flags: int = 0) -> int:
        return tracked_map(fds, kind, key, value, entries, name, flags)

    maps = txp.TxMapFds(
        tunnels=make(
            bpf.BPF_MAP_TYPE_HASH, txp.TX_KEY_SIZE, txp.TX_VALUE_SIZE, MAX_TUNNELS, "sttun_txtun"
        ),
        reasons=make(
            bpf.BPF_MAP_TYPE_PERCPU_ARRAY,
            4,
            txp.COUNTER_VALUE_SIZE,
            len(txp.TxPassReason),
            "sttun_txreason",
        ),
        tunnel_stats=make(
            bpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4, txp.COUNTER_VALUE_SIZE, MAX_TUNNELS, "sttun_txstats"
        ),
        scratch=make(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4, txp.SCRATCH_SIZE, 1, "sttun_txscratch"),
        crc_table=make(bpf.BPF_MAP_TYPE_ARRAY, 4, txp.CRC_TABLE_SIZE, 1, "sttun_crc32"),
        order=make(
            bpf.BPF_MAP_TYPE_ARRAY,
            4,
            emit.ORDER_VALUE_SIZE,
            MAX_TUNNELS,
            "sttun_txorder",
            bpf.BPF_F_MMAPABLE,
        ),
    )
    bpf.map_update(maps.crc_table, _U32.pack(0), txp.crc_table_bytes())
    return maps


def packet_capture_ifindexes(path: str = "/proc/net/packet") -> set[int]:
    """The interfaces some ``AF_PACKET`` socket of this network namespace is bound to
    (``tcpdump -i DEV`` and the like): ``/proc/net/packet``'s ``Iface`` column.

    A frame the transmit program sends never reaches its TAP's packet taps (they run
    after tc egress), so the daemon lets a captured TAP's frames through Python.
    Empty if the file cannot be read.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    out = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and fields[4].isdigit() and fields[4] != "0":
            out.add(int(fields[4]))
    return out


def tx_fastpath_support() -> str | None:
    """None if the transmit program loads here, else why not (one line)."""
    try:
        TxFastPath.load(invalid_program=False).close()
    except FastPathError as e:
        return e.reason
    return None
