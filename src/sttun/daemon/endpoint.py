"""The endpoint daemon behind ``sttun up``: TAP devices ⇄ STT over AF_PACKET.

One process, one thread, one epoll loop serving every tunnel of the
configuration:

* **TAP → underlay**: read one frame (``virtio_net_hdr`` + inner Ethernet frame,
  up to 64 KB with TSO), let the tunnel's
  :class:`~sttun.core.encap.Encapsulator` build the outer headers, and hand the
  result to the kernel with one ``sendmsg`` on the underlay's ``AF_PACKET``
  socket: a GSO super-packet the kernel segments (``offload = true``), or the
  segments made in Python (``offload = false``).
* **underlay → TAP**: receive (GRO-merged) STT segments on the ``AF_PACKET``
  socket, feed the core :class:`~sttun.core.endpoint.Endpoint` (demux, checksum,
  reassembly, decapsulation) and write each complete inner frame, with its
  offload state as a ``virtio_net_hdr``, to the tunnel's TAP.

Around it: the nftables rules that keep the host stack from answering STT
segments with RSTs, the control socket (``sttun show``), the Prometheus
metrics, and signal handling (SIGTERM/SIGINT stop, SIGHUP reloads).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sttun.core.decap import DscpModel
from sttun.core.drops import DropReason
from sttun.core.endpoint import Endpoint, Tunnel, TunnelSpec
from sttun.core.reassembly import DEFAULT_SOURCE_BUDGET, Reassembler
from sttun.daemon.config import DaemonConfig, TunnelConfig, diff_configs, reload_config
from sttun.daemon.logsetup import setup_logging, tunnel_logger
from sttun.errors import ConfigError, SetupError, SttError
from sttun.io import netlink
from sttun.io.firewall import Firewall
from sttun.io.packet_socket import RECV_SIZE, PacketSocket
from sttun.io.tap import TAP_READ_SIZE, TapDevice
from sttun.wire.ether import ETH_HLEN, ETH_P_IP, ETH_P_IPV6
from sttun.wire.vnet import VNET_HDR, VNET_HDR_LEN, VNET_NONE, VnetFlag, VnetHdr

log = logging.getLogger("sttun.daemon")

#: Frames handled per readiness event before other descriptors get a turn.
BATCH = 64
#: Frames held per tunnel while its next hop is being resolved (Linux keeps a few
#: too: neighbour ``unres_qlen``); more are dropped as ``tx_no_neighbour``.
PENDING_MAX = 64
#: How long a send waits for room in a full socket buffer before the packet counts
#: as dropped (``tx_error``).
SEND_WAIT = 0.01
#: How often the loop refreshes the published statistics and retries neighbours.
HOUSEKEEPING_INTERVAL = 1.0
#: The largest TSO frame the overlay stack may hand to a TAP: keeps every inner
#: frame within STT's offloadable size (65477 bytes, protocol.md §1.5) so the
#: fast path never has to re-segment in Python.
TAP_GSO_MAX_SIZE = 65000
_ETH = struct.Struct("!6s6sH")
_IP_ETHERTYPES = (ETH_P_IP, ETH_P_IPV6)
#: vnet flags saying the kernel checked (DATA_VALID) or will compute (NEEDS_CSUM) the sum.
_CSUM_TRUSTED = int(VnetFlag.NEEDS_CSUM | VnetFlag.DATA_VALID)
#: Where the outer IP header starts in a receive buffer (after vnet + Ethernet).
_IP_OFFSET = VNET_HDR_LEN + ETH_HLEN
#: Receive buffers kept for reuse after frames were built in them (a few suffice:
#: GRO'd frames complete one after another).
RX_SPARES = 4


@dataclass
class Underlay:
    """One underlay interface: its AF_PACKET socket and the tunnels using it."""

    ifname: str
    ifindex: int
    mac: bytes
    sock: PacketSocket
    tunnels: list[TunnelRuntime] = field(default_factory=list)


@dataclass
class TunnelRuntime:
    """A configured tunnel with its kernel objects."""

    config: TunnelConfig
    tunnel: Tunnel
    tap: TapDevice
    underlay: Underlay | None = None
    nexthop: str = ""
    state: str = "down"
    log: logging.LoggerAdapter[logging.Logger] | None = None
    #: The last route lookup for the remote failed (frames count as tx_no_route).
    no_route: bool = False
    #: Frames (vnet header + frame, copied) read while the next hop was unresolved.
    pending: collections.deque[bytes] = field(default_factory=collections.deque)

    @property
    def offload(self) -> bool:
        """Whether this tunnel uses kernel GSO (else Python segments and checksums)."""
        return self.config.offload


def _spec(cfg: TunnelConfig) -> TunnelSpec:
    tos = None if cfg.tos == "inherit" else int(cfg.tos)
    ttl = None if cfg.ttl == "inherit" else int(cfg.ttl)
    return TunnelSpec(
        name=cfg.name,
        local=cfg.local_ip.packed,
        remote=cfg.remote_ip.packed,
        in_key=cfg.in_key,
        out_key=cfg.out_key,
        dst_port=cfg.dst_port,
        tos=tos,
        ttl=ttl,
        df=cfg.df,
        underlay_mtu=cfg.underlay_mtu or 1500,
        dscp_model=DscpModel.UNIFORM if tos is None else DscpModel.PIPE,
    )


class Daemon:
    """The running endpoint.  :meth:`run` blocks until stopped."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        budget = config.reassembly_source_budget or min(
            DEFAULT_SOURCE_BUDGET, config.reassembly_high_water // 2
        )
        self.core = Endpoint(
            reassembler=Reassembler(
                timeout=config.reassembly_timeout,
                high_water=config.reassembly_high_water,
                low_water=config.reassembly_low_water,
                source_budget=budget,
            )
        )
        self.started = time.time()
        self.tunnels: dict[str, TunnelRuntime] = {}
        self.underlays: dict[str, Underlay] = {}
        self.by_tap_fd: dict[int, TunnelRuntime] = {}
        self.by_sock_fd: dict[int, Underlay] = {}
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.firewall: Firewall | None = None
        self.control: Any = None
        self.watcher: Any = None
        self.metrics_stop: Callable[[], None] | None = None
        self.snapshot: Any = None
        self.stopping = False
        self.reload_requested = False
        self._tap_buf = bytearray(TAP_READ_SIZE)
        self._tap_mv = memoryview(self._tap_buf)
        self._rx_buf = bytearray(RECV_SIZE)
        self._rx_mv = memoryview(self._rx_buf)
        # Receive buffers the reassembler built frames in (kept in place, see
        # Reassembler.add ``room``), back from the TAP write, for the next swap.
        self._rx_spare: list[bytearray] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        """Create every kernel object; on failure undo what was done and raise."""
        try:
            # before touching the host: refuse if another daemon serves this socket
            from sttun.daemon.control import ControlServer

            ControlServer.check_existing(self.config.control_socket)
            self._install_firewall()
            for cfg in self.config.tunnels:
                self._add_tunnel(cfg)
            self._start_control()
            self._start_metrics()
            self._start_watcher()
        except BaseException:
            self.shutdown()
            raise
        self._register(self._wake_r, self._on_wakeup)

    def _install_firewall(self) -> None:
        if not self.config.firewall:
            log.warning(
                "firewall disabled (--no-firewall): the host stack will answer STT segments "
                "with TCP RSTs unless something else drops them"
            )
            return
        fw = Firewall(self.config.instance)
        fw.install(self._local_addresses(), self._ports())
        self.firewall = fw
        log.info(
            "nftables table %s installed (ports %s)",
            fw.table_name,
            ",".join(map(str, self._ports())),
        )

    def _local_addresses(self) -> list[str]:
        return sorted({str(t.local_ip) for t in self.config.tunnels})

    def _ports(self) -> list[int]:
        return sorted({t.dst_port for t in self.config.tunnels})

    def _underlay_for(self, cfg: TunnelConfig) -> tuple[Underlay, netlink.Route]:
        try:
            route = netlink.route_lookup(str(cfg.remote_ip))
        except SetupError as exc:
            raise SetupError(f"tunnel {cfg.name}: remote_ip {cfg.remote_ip}: {exc}") from exc
        if not netlink.is_local_address(str(cfg.local_ip)):
            raise SetupError(
                f"tunnel {cfg.name}: local_ip {cfg.local_ip} is not an address of this host"
            )
        underlay = self.underlays.get(route.ifname)
        if underlay is None:
            ifindex, mac, _mtu, _up = netlink.link_info(route.ifname)
            sock = PacketSocket(route.ifname, self._ports(), vnet_hdr=True)
            underlay = Underlay(route.ifname, ifindex, bytes.fromhex(mac.replace(":", "")), sock)
            self.underlays[route.ifname] = underlay
            self.by_sock_fd[sock.fileno()] = underlay
            self._register(sock.fileno(), functools.partial(self._on_underlay, underlay))
            log.info("underlay %s: AF_PACKET socket open", route.ifname)
        return underlay, route

    def _add_tunnel(self, cfg: TunnelConfig, tap: TapDevice | None = None) -> None:
        tlog = tunnel_logger("sttun.tunnel", cfg.name, cfg.in_key)
        underlay, route = self._underlay_for(cfg)
        if cfg.underlay_mtu is None:
            mtu = route.mtu or 1500
        else:
            mtu = cfg.underlay_mtu
        tunnel = self.core.add_tunnel(dataclasses.replace(_spec(cfg), underlay_mtu=mtu))
        try:
            if tap is None:
                tap = TapDevice(
                    cfg.dev,
                    offload=True,
                    persist=cfg.persist,
                    mtu=cfg.mtu,
                    bridge=cfg.bridge,
                    up=True,
                )
            else:  # a changed tunnel keeps its TAP (addresses, routes, bridge port)
                tap.set_mtu(cfg.mtu)
                if cfg.bridge:
                    tap.set_bridge(cfg.bridge)
        except BaseException:
            self.core.remove_tunnel(cfg.name)
            raise
        with contextlib.suppress(SttError, OSError):
            netlink.set_gso_max_size(cfg.dev, TAP_GSO_MAX_SIZE)
        rt = TunnelRuntime(cfg, tunnel, tap, underlay, log=tlog)
        rt.nexthop = route.gateway or str(cfg.remote_ip)
        underlay.tunnels.append(rt)
        self.tunnels[cfg.name] = rt
        self.by_tap_fd[tap.fileno()] = rt
        self._register(tap.fileno(), functools.partial(self._on_tap, rt))
        self._refresh_l2(rt)
        rt.state = "up"
        tlog.info(
            "tunnel up: dev %s, %s -> %s via %s, key %s, underlay MTU %d, offload %s",
            cfg.dev,
            cfg.local_ip,
            cfg.remote_ip,
            underlay.ifname,
            _keys(cfg),
            mtu,
            "on" if cfg.offload else "off",
        )

    def _remove_tunnel(self, name: str, keep_tap: bool = False) -> TapDevice:
        rt = self.tunnels.pop(name)
        fd = rt.tap.fileno()
        self._unregister(fd)
        self.by_tap_fd.pop(fd, None)
        if rt.underlay is not None:
            rt.underlay.tunnels.remove(rt)
        self.core.remove_tunnel(name)
        if not keep_tap:
            rt.tap.close(remove=not rt.config.persist)
        if rt.log:
            rt.log.info("tunnel removed" if not keep_tap else "tunnel stopped for a change")
        return rt.tap

    def _refresh_l2(self, rt: TunnelRuntime) -> None:
        """Look up the next hop's MAC; without one, start resolution."""
        u = rt.underlay
        if u is None:
            return
        encap = rt.tunnel.encapsulator
        mac = netlink.neighbour(u.ifindex, rt.nexthop)
        if mac is None:
            netlink.resolve(u.ifindex, rt.nexthop)
            encap.l2 = b""
            return
        etype = ETH_P_IPV6 if len(rt.tunnel.spec.remote) == 16 else ETH_P_IP
        l2 = _ETH.pack(bytes.fromhex(mac.replace(":", "")), u.mac, etype)
        if l2 != encap.l2:
            if not encap.l2 and rt.log:
                rt.log.info("next hop %s resolved (%s)", rt.nexthop, mac)
            encap.l2 = l2
        while rt.pending:
            held = rt.pending.popleft()
            self._transmit(rt, u, memoryview(held)[VNET_HDR_LEN:], *VNET_HDR.unpack_from(held))

    def _start_control(self) -> None:
        from sttun.daemon.control import ControlServer
        from sttun.daemon.metrics import ShowSnapshot

        self.snapshot = ShowSnapshot()
        self.control = ControlServer(
            self.config.control_socket,
            {"show": lambda _req: self.show_data()},
            instance=self.config.instance,
        )
        self._register(self.control.fileno(), self.control.handle_readable)

    def _start_metrics(self) -> None:
        if not self.config.metrics:
            return
        from sttun.daemon.metrics import SttunCollector, start_metrics_server

        self.snapshot.publish(self.show_data())
        self.metrics_stop = start_metrics_server(self.config.metrics, SttunCollector(self.snapshot))
        log.info("metrics on http://%s/metrics", self.config.metrics)

    def _start_watcher(self) -> None:
        try:
            self.watcher = netlink.NetlinkWatcher()
        except (SttError, OSError) as exc:  # the loop still retries neighbours each second
            log.warning("netlink watcher unavailable: %s", exc)
            return
        self._register(self.watcher.fileno(), self._on_netlink)

    # ------------------------------------------------------------------ loop
    def _register(self, fd: int, handler: Callable[[], None]) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, select.EPOLLIN)

    def _unregister(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)

    def wake(self) -> None:
        """Make the loop look at its flags (called from signal handlers)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _on_wakeup(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 512):
                pass

    def run(self) -> None:
        """Serve until :meth:`request_stop`; handles timeouts and reloads."""
        next_housekeeping = time.monotonic()
        poll = self.epoll.poll
        handlers = self.handlers
        core = self.core
        while not self.stopping:
            now = time.monotonic()
            deadline = core.next_deadline()
            wait_until = next_housekeeping if deadline is None else min(deadline, next_housekeeping)
            timeout = max(0.0, wait_until - now)
            try:
                events = poll(timeout)
            except InterruptedError:
                events = []
            for fd, _ev in events:
                h = handlers.get(fd)
                if h is not None:
                    h()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                core.handle_timeout(now)
            if now >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
            if self.reload_requested:
                self.reload_requested = False
                self.reload()

    def _on_tap(self, rt: TunnelRuntime) -> None:
        tap = rt.tap
        u = rt.underlay
        buf = self._tap_buf
        if u is None or not rt.tunnel.encapsulator.l2:
            # No route: drop.  No next-hop MAC yet: hold a few frames, count the
            # rest, keep resolving.
            drops = rt.tunnel.encapsulator.drops
            for _ in range(BATCH):
                n = tap.read_into(buf)
                if not n:
                    break
                if rt.no_route:
                    drops.count(DropReason.TX_NO_ROUTE, n - VNET_HDR_LEN)
                elif len(rt.pending) < PENDING_MAX:
                    rt.pending.append(bytes(buf[:n]))
                else:
                    drops.count(DropReason.TX_NO_NEIGHBOUR, n - VNET_HDR_LEN)
            if not rt.no_route:
                self._refresh_l2(rt)
            return
        mv = self._tap_mv
        unpack = VNET_HDR.unpack_from
        transmit = self._transmit
        for _ in range(BATCH):
            n = tap.read_into(buf)
            if not n:
                return
            if n > VNET_HDR_LEN:
                transmit(rt, u, mv[VNET_HDR_LEN:n], *unpack(buf))

    def _transmit(
        self,
        rt: TunnelRuntime,
        u: Underlay,
        frame: memoryview,
        flags: int,
        gso_type: int,
        hdr_len: int,
        gso_size: int,
        cstart: int,
        coff: int,
    ) -> None:
        """Encapsulate one frame read from the TAP and send it on the underlay."""
        encap = rt.tunnel.encapsulator
        send = u.sock.send
        try:
            if rt.config.offload:
                packet = encap.encap_gso(frame, flags, gso_type, gso_size, cstart, coff)
                if packet is not None:
                    if not send(packet):
                        self._send_when_writable(rt, u, packet)
                    return
            vnet = (
                VnetHdr(flags, gso_type, hdr_len, gso_size, cstart, coff)
                if flags or gso_type
                else None
            )
            if rt.config.offload:
                packets = encap.encap(frame, vnet, gso=True)
            else:
                packets = [[VNET_NONE, *parts] for parts in encap.encap(frame, vnet, gso=False)]
            for parts in packets:
                if not send(parts):
                    self._send_when_writable(rt, u, parts)
        except OSError as exc:
            encap.drops.count(DropReason.TX_ERROR, len(frame))
            if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                rt.state = "down"
            if rt.log:
                rt.log.debug("send failed: %s", exc)

    def _send_when_writable(self, rt: TunnelRuntime, u: Underlay, parts: list[Any]) -> None:
        """The socket's send buffer is full: wait a little for room (back-pressure, as a
        blocking send would), then send; count the packet as dropped if it stays full."""
        _r, writable, _x = select.select([], [u.sock], [], SEND_WAIT)
        if not writable or not u.sock.send(parts):
            rt.tunnel.encapsulator.drops.count(
                DropReason.TX_ERROR, sum(len(p) for p in parts) - VNET_HDR_LEN
            )

    def _on_underlay(self, u: Underlay) -> None:
        recv = u.sock.recv_into
        buf = self._rx_buf
        mv = self._rx_mv
        receive = self.core.receive
        reasm = self.core.reassembler
        for _ in range(BATCH):
            try:
                n = recv(buf)
            except OSError as exc:
                # e.g. ENETDOWN: the kernel reports a link going down once on the
                # bound socket; the socket keeps working when the link comes back.
                log.warning("underlay %s: receive failed: %s", u.ifname, exc)
                for down in u.tunnels:
                    down.state = "down"
                return
            if not n:
                return
            if n < VNET_HDR_LEN + ETH_HLEN:
                continue
            etype = (buf[22] << 8) | buf[23]
            if etype not in _IP_ETHERTYPES:
                continue  # the BPF filter lets only IP through; a VLAN'd frame, skip
            csum_ok = bool(buf[0] & _CSUM_TRUSTED)
            result = receive(
                mv[_IP_OFFSET:n], time.monotonic(), csum_ok=csum_ok, room=(buf, _IP_OFFSET)
            )
            if reasm.kept:
                # The reassembler builds a frame in this buffer: receive into another.
                reasm.kept = False
                spare = self._rx_spare
                buf = self._rx_buf = spare.pop() if spare else bytearray(RECV_SIZE)
                mv = self._rx_mv = memoryview(buf)
            if result is None:
                continue
            tunnel, dec = result
            rt = self.tunnels.get(tunnel.spec.name)
            if rt is None:
                continue
            try:
                rt.tap.write(dec.vnet.pack(), dec.inner)
            except OSError as exc:
                tunnel.drops.count(DropReason.TX_ERROR, len(dec.inner))
                if rt.log:
                    rt.log.debug("TAP write failed: %s", exc)
            owner = dec.inner.obj if type(dec.inner) is memoryview else None
            if (
                owner is not buf
                and type(owner) is bytearray
                and len(owner) == RECV_SIZE
                and len(self._rx_spare) < RX_SPARES
            ):
                self._rx_spare.append(owner)  # a frame built in place is written: reuse

    def _on_netlink(self) -> None:
        try:
            changed = self.watcher.drain()
        except (SttError, OSError) as exc:
            log.warning("netlink watcher failed: %s", exc)
            self._unregister(self.watcher.fileno())
            self.watcher = None
            return
        if changed:
            self._refresh_routes()

    def _refresh_routes(self) -> None:
        for rt in self.tunnels.values():
            self._refresh_route(rt)

    def _refresh_route(self, rt: TunnelRuntime) -> None:
        """Look the route to the remote up again; re-home, re-resolve, or mark down."""
        encap = rt.tunnel.encapsulator
        try:
            route = netlink.route_lookup(str(rt.config.remote_ip))
        except (SttError, OSError) as exc:
            if not rt.no_route and rt.log:
                rt.log.warning("no route to the remote any more: %s", exc)
            rt.no_route = True
            rt.state = "down"
            encap.l2 = b""
            return
        if rt.no_route and rt.log:
            rt.log.info("route to the remote is back via %s", route.ifname)
        rt.no_route = False
        if rt.underlay is not None and route.ifname != rt.underlay.ifname:
            # the route moved to another interface: re-home the tunnel
            rt.underlay.tunnels.remove(rt)
            try:
                rt.underlay, _r = self._underlay_for(rt.config)
            except (SttError, OSError) as exc:
                rt.state = "error"
                if rt.log:
                    rt.log.warning("cannot use the new underlay: %s", exc)
                return
            rt.underlay.tunnels.append(rt)
        rt.nexthop = route.gateway or str(rt.config.remote_ip)
        if rt.config.underlay_mtu is None and route.mtu:
            encap.underlay_mtu = route.mtu
        self._refresh_l2(rt)
        rt.state = "up" if encap.l2 else "down"

    def _housekeeping(self) -> None:
        for rt in self.tunnels.values():
            if not rt.tunnel.encapsulator.l2:
                self._refresh_route(rt)
        if self.snapshot is not None:
            self.snapshot.publish(self.show_data())

    # ------------------------------------------------------------------ reload
    def reload(self) -> None:
        """Re-read the configuration file and apply the differences (SIGHUP)."""
        if not self.config.config_path:
            log.warning("SIGHUP ignored: tunnels came from the command line, not a file")
            return
        try:
            new = reload_config(self.config)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        added, removed, changed = diff_configs(self.config, new)
        for cfg in removed:
            self._remove_tunnel(cfg.name)
        kept: dict[str, TapDevice] = {}
        for old_cfg, cfg in changed:
            same_dev = old_cfg.dev == cfg.dev and old_cfg.persist == cfg.persist
            tap = self._remove_tunnel(cfg.name, keep_tap=same_dev)
            if same_dev:
                kept[cfg.name] = tap
        self.config = new
        if self.firewall is not None:
            try:
                self.firewall.install(self._local_addresses(), self._ports())
            except SttError as exc:
                log.error("firewall update failed: %s", exc)
        for cfg in [*added, *(c for _o, c in changed)]:
            reused = kept.pop(cfg.name, None)
            try:
                self._add_tunnel(cfg, reused)
            except (SttError, OSError) as exc:
                log.error("tunnel %s: cannot start: %s", cfg.name, exc)
                if reused is not None:
                    reused.close(remove=not cfg.persist)
        for u in self.underlays.values():
            with contextlib.suppress(SttError, OSError):
                u.sock.set_ports(self._ports())
        log.info(
            "configuration reloaded: %d added, %d removed, %d changed",
            len(added),
            len(removed),
            len(changed),
        )

    # ------------------------------------------------------------------ stats
    def show_data(self) -> dict[str, Any]:
        """The :class:`~sttun.daemon.metrics.ShowData` of this daemon, now."""
        core = self.core.stats()
        reasm = core["reassembly"]
        by_source = self.core.reassembler.bytes_by_source
        tunnels = []
        for name, rt in self.tunnels.items():
            t = core["tunnels"].get(name, {})
            cfg = rt.config
            tunnels.append(
                {
                    "name": name,
                    "dev": cfg.dev,
                    "local_ip": str(cfg.local_ip),
                    "remote_ip": str(cfg.remote_ip),
                    "in_key": cfg.in_key,
                    "out_key": cfg.out_key,
                    "dst_port": cfg.dst_port,
                    "state": rt.state,
                    "offload": cfg.offload,
                    "underlay": rt.underlay.ifname if rt.underlay else None,
                    "underlay_mtu": rt.tunnel.encapsulator.underlay_mtu,
                    "tx": t.get("tx"),
                    "rx": t.get("rx"),
                    "drops": t.get("drops", {}),
                    "reassembly": _reassembly_view(reasm, by_source, rt),
                    "software_completions": t.get("software_completions", 0),
                    "vlan_without_v": t.get("vlan_without_v", 0),
                    "ce_marked": t.get("ce_marked", 0),
                }
            )
        return {
            "pid": os.getpid(),
            "instance": self.config.instance,
            "started": self.started,
            "tunnels": tunnels,
            "drops": core["drops"],
            "reassembly": {
                "entries": reasm.get("entries", 0),
                "bytes": reasm.get("bytes_held", 0),
                "peak_bytes": reasm.get("peak_bytes", 0),
                "evictions": reasm.get("evictions", 0),
                "timeouts": reasm.get("timeouts", 0),
                "high_water": self.config.reassembly_high_water,
            },
            "segments_in": core["segments_in"],
        }

    # ------------------------------------------------------------------ tear-down
    def request_stop(self) -> None:
        """Ask the loop to stop (signal-safe)."""
        self.stopping = True
        self.wake()

    def request_reload(self) -> None:
        """Ask the loop to reload the configuration (signal-safe)."""
        self.reload_requested = True
        self.wake()

    def shutdown(self) -> None:
        """Remove what this run created: TAPs (unless persistent), rules, sockets."""
        for name in list(self.tunnels):
            with contextlib.suppress(Exception):
                self._remove_tunnel(name)
        for u in self.underlays.values():
            with contextlib.suppress(Exception):
                u.sock.close()
        self.underlays.clear()
        if self.firewall is not None:
            try:
                self.firewall.remove()
                log.info("nftables table %s removed", self.firewall.table_name)
            except SttError as exc:
                log.error("could not remove the nftables table: %s", exc)
            self.firewall = None
        if self.control is not None:
            with contextlib.suppress(Exception):
                self.control.close()
            self.control = None
        if self.metrics_stop is not None:
            with contextlib.suppress(Exception):
                self.metrics_stop()
            self.metrics_stop = None
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                self.watcher.close()
            self.watcher = None


def _keys(cfg: TunnelConfig) -> str:
    if cfg.in_key == cfg.out_key:
        return f"{cfg.in_key:#x}"
    return f"in {cfg.in_key:#x} / out {cfg.out_key:#x}"


def _reassembly_view(
    reasm: dict[str, Any], by_source: dict[Any, int], rt: TunnelRuntime
) -> dict[str, int]:
    """A tunnel's share of the reassembler: the bytes held for its remote address."""
    held = by_source.get(rt.tunnel.spec.remote, 0)
    return {
        "entries": reasm.get("entries", 0),
        "bytes": held,
        "peak_bytes": reasm.get("peak_bytes", 0),
        "evictions": reasm.get("evictions", 0),
        "timeouts": reasm.get("timeouts", 0),
    }


def run(config: DaemonConfig) -> int:
    """Run the endpoint until SIGTERM/SIGINT; returns the process exit status."""
    setup_logging(config.log_level, config.log_format)
    if os.geteuid() != 0:
        raise SetupError(
            "sttun up: must be run as root (CAP_NET_ADMIN needed for TAP and AF_PACKET)"
        )
    daemon = Daemon(config)
    # Handlers first: a SIGTERM during start-up then stops cleanly once the kernel
    # objects exist (rules and TAPs removed), instead of killing a half-set-up host.
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    daemon.start()
    log.info(
        "sttun %s running: %d tunnel(s), control socket %s",
        config.instance,
        len(daemon.tunnels),
        config.control_socket,
    )
    try:
        daemon.run()
    finally:
        daemon.shutdown()
        log.info("sttun %s stopped", config.instance)
    return 0
