"""The kernel receive fast path as one object the daemon holds per underlay interface.

    fp = RxFastPath.attach("eth0")                    # FastPathError(reason) if not
    fp.set_tunnels([FastPathTunnel("t1", local, remote, 42, tap_ifindex)])
    fp.counters()   # {"mode": "tcx", "tunnels": {"t1": {...}}, "passed": {...}, ...}
    fp.close()

:meth:`RxFastPath.attach` creates the maps, generates and loads the program
(:mod:`sttun.io.ebpf.program`) and attaches it at the interface's ingress with a
TCX link, or with a tc clsact filter on kernels without TCX.  Any failure raises
:class:`FastPathError` whose :attr:`~FastPathError.reason` is one line for the log;
the caller then keeps the pure-Python receive path.  :func:`fastpath_support` says
beforehand whether the fast path can run here.

The program handles whole STT frames of the configured tunnels and leaves the rest
to the Python path (see the program's module documentation for the exact accept
set), so the underlay's AF_PACKET sockets must be bound per protocol
(``ETH_P_IP``/``ETH_P_IPV6``, which run after tc ingress) rather than to
``ETH_P_ALL`` (which runs before it and would see every frame twice).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import mmap
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sttun.errors import SetupError
from sttun.io.ebpf import emit
from sttun.io.ebpf import program as prog
from sttun.io.ebpf import syscall as bpf
from sttun.io.ebpf.attach import TcFilter, TcxLink, attach_auto
from sttun.io.ebpf.counters import program_counters, tracked_map, zero_counter
from sttun.io.order_counter import RX_ORDER_BUCKETS, BucketOrder
from sttun.wire.stt import STT_PORT

log = logging.getLogger(__name__)

#: Tunnels one program serves (size of the tunnel and per-tunnel counter maps).
MAX_TUNNELS = 1024
#: Destination ports one program recognises.
MAX_PORTS = 64
#: Environment variable that makes :meth:`RxFastPath.attach` load a program the
#: verifier refuses (to exercise the fallback in tests and on a live system).
FORCE_INVALID_ENV = "STTUN_FASTPATH_FORCE_INVALID"
_SIOCGIFMTU = 0x8921
_TUNNEL_VALUE = struct.Struct("<IIII")
_U32 = struct.Struct("<I")


class FastPathError(SetupError):
    """The fast path cannot run; :attr:`reason` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FastPathTunnel:
    """One tunnel as the program sees it.

    ``local``/``remote``: the underlay addresses (text, packed bytes or ipaddress
    objects, both of one family); ``context_id``: the key received frames carry
    (the tunnel's in-key); ``tap_ifindex``: where its inner frames go;
    ``dscp_uniform``: the tunnel copies the outer DSCP into the inner header (the
    program then leaves frames whose inner DSCP differs to Python).
    """

    name: str
    local: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address
    remote: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address
    context_id: int
    tap_ifindex: int
    dst_port: int = STT_PORT
    dscp_uniform: bool = True

    def key(self) -> bytes:
        """The program's tunnel-map key (see ``program.TUNNEL_KEY_SIZE``)."""
        local = _packed(self.local)
        remote = _packed(self.remote)
        if len(local) != len(remote):
            raise ValueError(f"tunnel {self.name!r}: local and remote of different families")
        if not 0 <= self.context_id < 1 << 64:
            raise ValueError(f"tunnel {self.name!r}: context id out of range")
        if not 0 < self.dst_port < 65536:
            raise ValueError(f"tunnel {self.name!r}: port out of range")
        family = 4 if len(local) == 4 else 6
        return (
            remote.ljust(16, b"\0")
            + local.ljust(16, b"\0")
            + self.context_id.to_bytes(8, "big")
            + self.dst_port.to_bytes(2, "big")
            + bytes([family])
            + bytes(5)
        )


def _packed(addr: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ValueError(f"address must be 4 or 16 bytes, got {len(addr)}")
        return addr
    return ipaddress.ip_address(addr).packed


def _mtu(ifname: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16si12x", ifname.encode()[:15], 0)
        res = fcntl.ioctl(s.fileno(), _SIOCGIFMTU, req)
    return int(struct.unpack_from("i", res, 16)[0])


class RxFastPath:
    """The fast path attached to one underlay interface (see the module doc)."""

    def __init__(
        self,
        ifname: str,
        ifindex: int,
        maps: prog.MapFds,
        prog_fd: int,
        attachment: TcxLink | TcFilter,
    ) -> None:
        self.ifname = ifname
        self.ifindex = ifindex
        self._maps = maps
        self._prog_fd = prog_fd
        self._attachment: TcxLink | TcFilter | None = attachment
        self._ncpus = bpf.possible_cpus()
        self._slots: dict[str, int] = {}
        self._keys: dict[str, bytes] = {}
        self._ports: set[int] = set()
        self._order_mmap = mmap.mmap(
            maps.order,
            emit.ORDER_VALUE_SIZE * RX_ORDER_BUCKETS,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._order_view = memoryview(self._order_mmap).cast("Q")
        #: The receive order of this underlay (:class:`BucketOrder`): the data path
        #: calls ``done(sport)`` for every packet it received from the underlay's
        #: sockets and ``drained()`` when one had nothing more.
        self.order = BucketOrder(self._order_view)
        #: The kernel's id of the loaded program.
        self.prog_id = bpf.prog_id(prog_fd)

    # -- life cycle -------------------------------------------------------------------
    @classmethod
    def attach(
        cls,
        interface: str | int,
        *,
        mode: str = "auto",
        ordered: bool = False,
        invalid_program: bool | None = None,
    ) -> RxFastPath:
        """Load the program and attach it at ``interface``'s ingress.

        ``mode``: ``"auto"`` (TCX, else tc), ``"tcx"`` or ``"tc"``.  ``ordered``: the
        program keeps the order with what it left to Python, and the reader of the
        underlay's sockets must account for every packet it receives in
        :attr:`order` (the daemon does).
        ``invalid_program`` (default: the ``STTUN_FASTPATH_FORCE_INVALID``
        environment variable) loads a program the verifier refuses.
        Raises :class:`FastPathError` with the reason when anything fails.
        """
        if mode not in ("auto", "tcx", "tc"):
            raise ValueError(f"mode must be auto, tcx or tc, got {mode!r}")
        if invalid_program is None:
            invalid_program = os.environ.get(FORCE_INVALID_ENV, "") not in ("", "0")
        try:
            if isinstance(interface, int):
                ifindex, ifname = interface, socket.if_indextoname(interface)
            else:
                ifname, ifindex = interface, socket.if_nametoindex(interface)
            mtu = _mtu(ifname)
        except OSError as e:
            raise FastPathError(f"fast path: no interface {interface!r} ({e.strerror})") from e
        fds: list[int] = []
        try:
            maps = _create_maps(fds)
            code = prog.build(
                maps, max_linear_len=mtu + 14, ordered=ordered, invalid=invalid_program
            )
            try:
                prog_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, code, name="sttun_rx")
            except bpf.VerifierError as e:
                why = f"fast path: the verifier rejected the program: {e.summary}"
                raise FastPathError(why) from e
            fds.append(prog_fd)
            attachment = attach_auto(prog_fd, ifindex, mode)
        except FastPathError:
            close_fds(fds)
            raise
        except OSError as e:
            close_fds(fds)
            raise FastPathError(f"fast path on {ifname}: {explain_oserror(e)}") from e
        fp = cls(ifname, ifindex, maps, prog_fd, attachment)
        log.info(
            "fast path attached to %s (%s, program id %d)", ifname, attachment.mode, fp.prog_id
        )
        return fp

    @property
    def mode(self) -> str:
        """How the program is attached: ``"tcx"``, ``"tc"``, or ``"closed"``."""
        return self._attachment.mode if self._attachment is not None else "closed"

    def close(self) -> None:
        """Detach the program and free the maps (idempotent)."""
        if self._attachment is None:
            return
        self._attachment.detach()
        self._attachment = None
        m = self._maps
        self.order.release()
        self._order_view.release()
        with contextlib.suppress(BufferError):
            self._order_mmap.close()
        close_fds(
            [self._prog_fd, m.tunnels, m.ports, m.reasons, m.tunnel_stats, m.scratch, m.order]
        )

    def __enter__(self) -> RxFastPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- configuration ----------------------------------------------------------------
    def set_tunnels(self, tunnels: Iterable[FastPathTunnel]) -> None:
        """Make the program serve exactly ``tunnels`` (by name; call on every reload).

        New and changed entries are written before stale ones are deleted, so a
        tunnel that stays is never missing.  A tunnel keeps its counters while its
        name stays; a new name starts from zero.  Raises ValueError for a bad entry
        or more than :data:`MAX_TUNNELS` tunnels / :data:`MAX_PORTS` ports.
        """
        wanted = list(tunnels)
        names = [t.name for t in wanted]
        if len(set(names)) != len(names):
            raise ValueError("fast path: tunnel names must be unique")
        if len(wanted) > MAX_TUNNELS:
            raise ValueError(f"fast path: at most {MAX_TUNNELS} tunnels")
        ports = {t.dst_port for t in wanted}
        if len(ports) > MAX_PORTS:
            raise ValueError(f"fast path: at most {MAX_PORTS} ports")
        keys = {t.name: t.key() for t in wanted}
        m = self._maps
        for gone in set(self._slots) - set(keys):
            del self._slots[gone]
        free = sorted(set(range(MAX_TUNNELS)) - set(self._slots.values()), reverse=True)
        for p in ports - self._ports:
            bpf.map_update(m.ports, p.to_bytes(2, "big"), _U32.pack(1))
        for t in wanted:
            slot = self._slots.get(t.name)
            if slot is None:
                slot = self._slots[t.name] = free.pop()
                zero_counter(m.tunnel_stats, slot, self._ncpus)
            flags = prog.TUNNEL_FLAG_DSCP_UNIFORM if t.dscp_uniform else 0
            value = _TUNNEL_VALUE.pack(t.tap_ifindex, slot, flags, 0)
            bpf.map_update(m.tunnels, keys[t.name], value)
        live = set(keys.values())
        for key in bpf.map_keys(m.tunnels, prog.TUNNEL_KEY_SIZE):
            if key not in live:
                bpf.map_delete(m.tunnels, key)
        for p in self._ports - ports:
            bpf.map_delete(m.ports, p.to_bytes(2, "big"))
        self._ports = ports
        self._keys = keys

    # -- counters ---------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """Counters summed over CPUs, JSON-ready::

            {"mode": "tcx", "interface": "eth0", "program_id": 97,
             "tunnels": {name: {"frames": n, "bytes": n}},      # fast-path deliveries
             "passed": {reason: {"packets": n, "bytes": n}},    # left to Python
             "errors": {"packets": n, "bytes": n}}              # dropped mid-change

        ``bytes`` of a tunnel count inner frames (as the Python path's rx bytes do);
        ``passed`` counts whole packets as received.  Reasons are
        :class:`~sttun.io.ebpf.program.PassReason` names in lower case.
        """
        if self._attachment is None:
            return {"mode": "closed", "interface": self.ifname, "tunnels": {}, "passed": {}}
        c = program_counters(
            self._maps.tunnel_stats, self._maps.reasons, self._slots, prog.PassReason, self._ncpus
        )
        return {
            "mode": self.mode,
            "interface": self.ifname,
            "program_id": self.prog_id,
            **c,
        }

    def __repr__(self) -> str:
        return f"RxFastPath({self.ifname!r}, mode={self.mode!r}, tunnels={len(self._slots)})"


def _create_maps(fds: list[int]) -> prog.MapFds:
    def make(kind: int, key: int, value: int, entries: int, name: str, flags: int = 0) -> int:
        return tracked_map(fds, kind, key, value, entries, name, flags)

    return prog.MapFds(
        tunnels=make(
            bpf.BPF_MAP_TYPE_HASH,
            prog.TUNNEL_KEY_SIZE,
            prog.TUNNEL_VALUE_SIZE,
            MAX_TUNNELS,
            "sttun_tunnels",
        ),
        ports=make(bpf.BPF_MAP_TYPE_HASH, prog.PORT_KEY_SIZE, 4, MAX_PORTS, "sttun_ports"),
        reasons=make(
            bpf.BPF_MAP_TYPE_PERCPU_ARRAY,
            4,
            prog.COUNTER_VALUE_SIZE,
            len(prog.PassReason),
            "sttun_reasons",
        ),
        tunnel_stats=make(
            bpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4, prog.COUNTER_VALUE_SIZE, MAX_TUNNELS, "sttun_tstats"
        ),
        scratch=make(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4, prog.SCRATCH_SIZE, 1, "sttun_scratch"),
        order=make(
            bpf.BPF_MAP_TYPE_ARRAY,
            4,
            emit.ORDER_VALUE_SIZE,
            RX_ORDER_BUCKETS,
            "sttun_rxorder",
            bpf.BPF_F_MMAPABLE,
        ),
    )


def explain_oserror(e: OSError) -> str:
    """One line for the log: why a ``bpf()`` or attach call failed."""
    if e.errno in (1, 13):  # EPERM, EACCES
        return "not permitted (needs root: CAP_BPF and CAP_NET_ADMIN)"
    return e.strerror or str(e)


def close_fds(fds: Iterable[int]) -> None:
    """Close every descriptor, ignoring errors (clean-up after a failed set-up)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fastpath_support() -> str | None:
    """None if the fast path can run here, else why not (one line).

    Tries what attaching needs, without attaching anything: the ``bpf()`` system
    call, a map, and loading the program.
    """
    fds: list[int] = []
    try:
        maps = _create_maps(fds)
        code = prog.build(maps, max_linear_len=1514)
        fds.append(bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, code, name="sttun_probe"))
    except bpf.VerifierError as e:
        return f"the verifier rejected the program: {e.summary}"
    except OSError as e:
        return explain_oserror(e)
    finally:
        close_fds(fds)
    return None
