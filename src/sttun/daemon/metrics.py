"""The show-data shape, and its export as Prometheus metrics.

:class:`ShowData` is the one description of a running endpoint's state: the daemon
builds it, the control socket serves it (``sttun show``), and
:class:`SttunCollector` turns it into metrics on every scrape.

prometheus_client is imported only when metrics are used, so importing this module
for the types costs nothing.

Metrics (``tunnel`` and ``key`` labels on every per-tunnel series; ``key`` is the
context id as :func:`~sttun.core.keys.format_key` writes it, ``0x1234``, or
``in/out`` when the two differ)::

    sttun_info{instance,version}                       1
    sttun_start_time_seconds                           gauge
    sttun_tunnel_state{tunnel,key,state}               1 for the current state
    sttun_tunnel_{tx,rx}_{frames,bytes,segments}_total counter
    sttun_tunnel_drops_total{tunnel,key,reason}        counter
    sttun_peer_reassembly_{entries,bytes,peak_bytes}{peer}  gauge, per remote address
    sttun_peer_reassembly_{evictions,timeouts}_total{peer}  counter, per remote address
    sttun_drops_total{reason}                          drops no tunnel can be blamed for
    sttun_reassembly_{entries,bytes,peak_bytes}        gauge, whole reassembler
    sttun_reassembly_{evictions,timeouts}_total        counter, whole reassembler
    sttun_fastpath_{frames,bytes}_total{tunnel,key}    counter, delivered by the kernel fast path
    sttun_fastpath_attached{underlay}                  1 if the fast path runs there
    sttun_fastpath_passed_{packets,bytes}_total{underlay,reason}  left to Python, by reason
    sttun_fastpath_errors_total{underlay}              dropped by the program mid-change
    sttun_tx_fastpath_{frames,bytes}_total{tunnel,key} counter, sent by the transmit program
    sttun_tx_fastpath_attached                         TAPs the transmit program runs on
    sttun_tx_fastpath_passed_{packets,bytes}_total{reason}  left to Python, by reason
    sttun_tx_fastpath_errors_total                     dropped by it mid-change

``sttun_tunnel_rx_*`` count both receive paths; the Python path's share is
``sttun_tunnel_rx_frames_total - sttun_fastpath_frames_total``.

Reassembly is per peer, not per tunnel: until a frame is complete its context id is
unknown, so its partial state belongs to the outer source address (the ``peer``
label, a tunnel's ``remote_ip``) that tunnels to the same remote share.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from sttun.core.keys import format_key
from sttun.daemon.config_keys import parse_hostport
from sttun.errors import ConfigError, SetupError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry


class TrafficStats(TypedDict):
    """One direction of a tunnel: inner frames, their bytes, outer segments."""

    frames: int  # inner Ethernet frames (one STT frame each)
    bytes: int  # inner frame bytes
    segments: int  # outer TCP-like segments (packets on the underlay; GSO pieces count once)


class ReassemblyStats(TypedDict):
    """Reassembly state and history, of one peer or of the whole reassembler."""

    entries: int  # partial frames buffered now
    bytes: int  # bytes charged for them now
    peak_bytes: int  # highest ``bytes`` seen
    evictions: int  # partial frames thrown away for memory (high water, source budget)
    timeouts: int  # partial frames thrown away after the reassembly timeout


class PeerReassemblyStats(ReassemblyStats):
    """A tunnel's remote peer's part of the reassembler (``peer``: its address).

    Partial frames are known only by their outer source address until they
    complete, so tunnels to the same remote address show the same numbers.
    """

    peer: str


class FastPathTraffic(TypedDict):
    """Frames the kernel fast path delivered to a tunnel's TAP, and their inner bytes."""

    frames: int
    bytes: int


class TunnelStats(TypedDict):
    """One tunnel in :class:`ShowData`.

    ``state`` is one of ``"up"``, ``"down"`` (TAP down / not yet set up) or
    ``"error"``; ``drops`` maps a :class:`sttun.core.drops.DropReason` value to a
    count and lists non-zero counts only.  ``rx`` counts both receive paths:
    ``rx_python`` (the AF_PACKET socket and the core) plus ``rx_fastpath`` (the
    eBPF program; each of its frames counts as one segment in ``rx``).
    """

    name: str
    dev: str
    local_ip: str
    remote_ip: str
    in_key: int
    out_key: int
    dst_port: int
    state: str
    offload: bool
    tx: TrafficStats
    tx_python: NotRequired[TrafficStats]
    tx_fastpath: NotRequired[FastPathTraffic]
    rx: TrafficStats
    rx_python: TrafficStats
    rx_fastpath: FastPathTraffic
    drops: dict[str, int]
    peer_reassembly: PeerReassemblyStats
    ovs_interface: NotRequired[str | None]  # with --ovsdb: the OVS Interface it serves


class OvsdbStats(TypedDict):
    """With ``sttun up --ovsdb``: the database and its ``type=stt`` interfaces."""

    remote: str
    connected: bool
    userspace_tso: bool | None  # Open_vSwitch other_config:userspace-tso-enable
    interfaces: list[str]  # every type=stt (or served) Interface row
    errors: dict[str, str]  # rows not served: what their error column says


class PacketCount(TypedDict):
    """Packets and their bytes as received on the underlay."""

    packets: int
    bytes: int


class UnderlayFastPath(TypedDict):
    """The fast path on one underlay.

    ``state`` ``"on"`` or ``"off"``; ``reason`` says why it is off (None when on);
    ``attach`` ``"tcx"`` (a link that dies with the daemon) or ``"tc"`` (a tc
    filter, replaced on the next start); ``passed`` counts what the program left to
    Python by reason (``piece``, ``unknown_tunnel``, ``checksum``, ...), ``errors``
    what it dropped after changing it.
    """

    state: str
    reason: str | None
    attach: str | None
    program_id: int | None
    passed: dict[str, PacketCount]
    errors: PacketCount


class UnderlayStats(TypedDict):
    """One underlay interface: its sockets (``["all"]``: one bound to every protocol;
    else ``ipv4``/``ipv6``, bound per protocol), the tunnels routed over it, its fast path."""

    name: str
    sockets: list[str]
    tunnels: list[str]
    fastpath: UnderlayFastPath


class FastPathSetting(TypedDict):
    """The daemon's ``fastpath`` setting and, if it cannot run on this host, why."""

    setting: str
    unsupported: str | None


class TxFastPathStatus(TypedDict):
    """The transmit fast path: ``setting``; ``state`` ``"on"``/``"off"`` and why off;
    the program, how many TAPs it is attached to, TAPs it could not attach to (by
    tunnel, why), tunnels it leaves to Python for now (``yielding``: a packet capture
    is open on the TAP), and what it left to Python by reason (``gso``, ``no_tunnel``,
    ``checksum``, ...) or dropped after changing it (``errors``)."""

    setting: str
    state: str
    reason: str | None
    program_id: int | None
    taps: int
    not_attached: dict[str, str]
    yielding: dict[str, str]
    passed: dict[str, PacketCount]
    errors: PacketCount


class ShowData(TypedDict):
    """What ``sttun show`` prints and the metrics export: a running endpoint's state.

    ``started`` is the Unix time the daemon started.  ``drops`` holds drops that no
    tunnel can be blamed for (wrong port, unknown source, ...), keyed by drop reason
    value; ``reassembly`` describes the whole reassembler.
    """

    pid: int
    instance: str
    started: float
    tunnels: list[TunnelStats]
    drops: dict[str, int]
    reassembly: ReassemblyStats
    fastpath: FastPathSetting
    underlays: list[UnderlayStats]
    tx_fastpath: NotRequired[TxFastPathStatus]
    ovsdb: NotRequired[OvsdbStats]


def empty_traffic() -> TrafficStats:
    """A zeroed :class:`TrafficStats`."""
    return {"frames": 0, "bytes": 0, "segments": 0}


def empty_reassembly() -> ReassemblyStats:
    """A zeroed :class:`ReassemblyStats`."""
    return {"entries": 0, "bytes": 0, "peak_bytes": 0, "evictions": 0, "timeouts": 0}


TUNNEL_STATES = ("up", "down", "error")

_TRAFFIC_FIELDS = ("frames", "bytes", "segments")
_REASM_GAUGES = (
    ("entries", "partial frames being reassembled"),
    ("bytes", "bytes held by partial frames"),
    ("peak_bytes", "highest bytes held by partial frames"),
)
_REASM_COUNTERS = (
    ("evictions", "partial frames evicted under memory pressure"),
    ("timeouts", "partial frames dropped after the reassembly timeout"),
)


class ShowSnapshot:
    """A thread-safe box holding the latest :class:`ShowData`.

    The metrics HTTP server runs in its own thread; the daemon's loop calls
    :meth:`publish` (e.g. once a second and before each control reply) and the
    collector reads the last published value, so a scrape never iterates over the
    loop's live structures.
    """

    def __init__(self, initial: ShowData | None = None) -> None:
        self._lock = threading.Lock()
        self._data = initial

    def publish(self, data: ShowData) -> None:
        """Make ``data`` the value the next scrape sees."""
        with self._lock:
            self._data = data

    def __call__(self) -> ShowData | None:
        with self._lock:
            return self._data


class SttunCollector:
    """A prometheus_client collector that exports :class:`ShowData` on each scrape.

    ``source`` returns the current data (or None before the daemon has any: then
    only ``sttun_info`` is exported).  It is called in the HTTP server's thread.
    """

    def __init__(self, source: Callable[[], ShowData | None], version: str | None = None) -> None:
        from sttun import __version__

        self._source = source
        self._version = version if version is not None else __version__

    def describe(self) -> list[Metric]:
        """No up-front description: the metric set depends on the data."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from one read of the data."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        data = self._source()
        info = GaugeMetricFamily(
            "sttun_info", "sttun endpoint (value always 1)", labels=["instance", "version"]
        )
        info.add_metric([data["instance"] if data else "", self._version], 1)
        yield info
        if data is None:
            return
        yield GaugeMetricFamily(
            "sttun_start_time_seconds", "Unix time the daemon started", value=data["started"]
        )

        tl = ["tunnel", "key"]
        state = GaugeMetricFamily(
            "sttun_tunnel_state", "1 for the tunnel's current state", labels=[*tl, "state"]
        )
        traffic: dict[tuple[str, str], CounterMetricFamily] = {}
        for direction, verb in (("tx", "sent"), ("rx", "received")):
            for f in _TRAFFIC_FIELDS:
                traffic[direction, f] = CounterMetricFamily(
                    f"sttun_tunnel_{direction}_{f}",
                    f"inner {f} {verb}" if f != "segments" else f"outer STT segments {verb}",
                    labels=tl,
                )
        drops = CounterMetricFamily(
            "sttun_tunnel_drops", "packets dropped, by reason", labels=[*tl, "reason"]
        )
        reasm_g = {
            f: GaugeMetricFamily(f"sttun_peer_reassembly_{f}", f"{text}, per peer", labels=["peer"])
            for f, text in _REASM_GAUGES
        }
        reasm_c = {
            f: CounterMetricFamily(
                f"sttun_peer_reassembly_{f}", f"{text}, per peer", labels=["peer"]
            )
            for f, text in _REASM_COUNTERS
        }
        fast = {
            f: CounterMetricFamily(
                f"sttun_fastpath_{f}", f"inner {f} the kernel fast path delivered", labels=tl
            )
            for f in ("frames", "bytes")
        }
        tx_fast = {
            f: CounterMetricFamily(
                f"sttun_tx_fastpath_{f}", f"inner {f} the kernel transmit fast path sent", labels=tl
            )
            for f in ("frames", "bytes")
        }
        peers: set[str] = set()
        for t in data["tunnels"]:
            labels = [t["name"], format_key(t["in_key"], t["out_key"])]
            fp_traffic: Mapping[str, Any] = t.get("rx_fastpath") or {}
            tx_traffic: Mapping[str, Any] = t.get("tx_fastpath") or {}
            for f, tfam in tx_fast.items():
                tfam.add_metric(labels, tx_traffic.get(f, 0))
            for f, ffam in fast.items():
                ffam.add_metric(labels, fp_traffic.get(f, 0))
            states: tuple[str, ...] = TUNNEL_STATES
            if t["state"] not in states:
                states = (*states, t["state"])
            for s in states:
                state.add_metric([*labels, s], 1 if t["state"] == s else 0)
            for direction in ("tx", "rx"):
                stats: Mapping[str, Any] = t.get(direction) or {}  # type: ignore[assignment]
                for f in _TRAFFIC_FIELDS:
                    traffic[direction, f].add_metric(labels, stats.get(f, 0))
            for reason, n in sorted((t.get("drops") or {}).items()):
                drops.add_metric([*labels, reason], n)
            reasm: Mapping[str, Any] = t.get("peer_reassembly") or {}
            peer = str(reasm.get("peer", t.get("remote_ip", "")))
            if not reasm or peer in peers:
                continue  # tunnels to the same remote share their peer's numbers
            peers.add(peer)
            for f, fam in reasm_g.items():
                fam.add_metric([peer], reasm.get(f, 0))
            for f, cfam in reasm_c.items():
                cfam.add_metric([peer], reasm.get(f, 0))
        yield state
        yield from traffic.values()
        yield from fast.values()
        yield from tx_fast.values()
        yield drops
        yield from reasm_g.values()
        yield from reasm_c.values()

        gdrops = CounterMetricFamily(
            "sttun_drops", "packets dropped before a tunnel was known, by reason", labels=["reason"]
        )
        for reason, n in sorted((data.get("drops") or {}).items()):
            gdrops.add_metric([reason], n)
        yield gdrops
        greasm: Mapping[str, Any] = data.get("reassembly") or {}
        for f, text in _REASM_GAUGES:
            yield GaugeMetricFamily(f"sttun_reassembly_{f}", text, value=greasm.get(f, 0))
        for f, text in _REASM_COUNTERS:
            yield CounterMetricFamily(f"sttun_reassembly_{f}", text, value=greasm.get(f, 0))
        yield from _fastpath_underlay_metrics(data.get("underlays") or [])
        yield from _tx_fastpath_metrics(data.get("tx_fastpath") or {})


def _tx_fastpath_metrics(tx: Mapping[str, Any]) -> Iterator[Metric]:
    """Whether the transmit fast path runs, what it left to Python, its errors."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily(
        "sttun_tx_fastpath_attached",
        "number of tunnel TAPs the kernel transmit fast path runs on",
        value=tx.get("taps", 0) if tx.get("state") == "on" else 0,
    )
    for f in ("packets", "bytes"):
        fam = CounterMetricFamily(
            f"sttun_tx_fastpath_passed_{f}",
            f"{f} the transmit fast path left to the Python path, by reason",
            labels=["reason"],
        )
        for reason, counts in sorted((tx.get("passed") or {}).items()):
            fam.add_metric([reason], counts.get(f, 0))
        yield fam
    yield CounterMetricFamily(
        "sttun_tx_fastpath_errors",
        "frames the transmit fast path dropped after changing them (a helper failed)",
        value=(tx.get("errors") or {}).get("packets", 0),
    )


def _fastpath_underlay_metrics(underlays: list[Any]) -> Iterator[Metric]:
    """Per underlay: whether the fast path runs, what it left to Python, its errors."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    attached = GaugeMetricFamily(
        "sttun_fastpath_attached",
        "1 if the kernel receive fast path runs on the underlay",
        labels=["underlay"],
    )
    passed = {
        f: CounterMetricFamily(
            f"sttun_fastpath_passed_{f}",
            f"{f} the fast path left to the Python path, by reason",
            labels=["underlay", "reason"],
        )
        for f in ("packets", "bytes")
    }
    errors = CounterMetricFamily(
        "sttun_fastpath_errors",
        "packets the fast path dropped after changing them (a helper failed)",
        labels=["underlay"],
    )
    for u in underlays:
        name = str(u.get("name", ""))
        fp: Mapping[str, Any] = u.get("fastpath") or {}
        attached.add_metric([name], 1 if fp.get("state") == "on" else 0)
        for reason, counts in sorted((fp.get("passed") or {}).items()):
            for f, fam in passed.items():
                fam.add_metric([name, reason], counts.get(f, 0))
        errors.add_metric([name], (fp.get("errors") or {}).get("packets", 0))
    yield attached
    yield from passed.values()
    yield errors


def make_registry(collector: SttunCollector, process: bool = True) -> CollectorRegistry:
    """A fresh registry with ``collector`` (and the process metrics if ``process``)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(collector: SttunCollector) -> str:
    """The text exposition format of ``collector`` alone (for tests and debugging)."""
    from prometheus_client import generate_latest

    return generate_latest(make_registry(collector, process=False)).decode()


def start_metrics_server(addr: str, collector: SttunCollector) -> Callable[[], None]:
    """Serve ``collector`` over HTTP on ``addr`` (``host:port``, ``[::1]:9100``, ``:9100``).

    The server runs in a daemon thread.  Returns a function that stops it.
    Raises :class:`ConfigError` for a malformed address and :class:`SetupError` if
    the address cannot be bound.
    """
    from prometheus_client import start_http_server

    try:
        host, port = parse_hostport(addr)
    except ValueError as e:
        raise ConfigError(f"metrics address: {e}") from None
    try:
        server, thread = start_http_server(
            port, addr=host or "0.0.0.0", registry=make_registry(collector)
        )
    except OSError as e:
        raise SetupError(f"cannot serve metrics on {addr}: {e.strerror or e}") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
