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

The per-frame work lives in :mod:`sttun.daemon.datapath`; this module sets up
and tears down the devices and runs the loop.  Around it: the nftables rules
that keep the host stack from answering STT segments with RSTs, the control
socket (``sttun show``), the Prometheus metrics, and signal handling
(SIGTERM/SIGINT stop, SIGHUP reloads).

The kernel receive fast path (``[daemon] fastpath``, :mod:`sttun.daemon.fastpath`)
is kept in the methods of the "fast path" section: attached per underlay when the
underlay is opened, its tunnel map synced whenever a tunnel is added or removed,
detached at shutdown.  Where it is attached the underlay's sockets are bound per
protocol (:meth:`Daemon._open_underlay_port`), so no frame reaches both paths.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from sttun.core.drops import DropReason
from sttun.core.encap import DEFAULT_UNDERLAY_MTU, MIN_UNDERLAY_MTU
from sttun.core.endpoint import Tunnel
from sttun.core.keys import format_key
from sttun.core.reassembly import Reassembler
from sttun.daemon.config import (
    INHERIT,
    DaemonConfig,
    TunnelConfig,
    core_endpoint,
    diff_configs,
    reload_config,
    tunnel_spec,
)
from sttun.daemon.datapath import Datapath, TunnelRuntime, Underlay, UnderlayPort
from sttun.daemon.fastpath import FastPaths
from sttun.daemon.logsetup import setup_logging, tunnel_logger
from sttun.daemon.tx_fastpath import TxFastPaths
from sttun.errors import ConfigError, SetupError, SttError
from sttun.io import netlink
from sttun.io.ethtool import tso_enabled
from sttun.io.firewall import Firewall
from sttun.io.packet_socket import PacketSocket
from sttun.io.rx_fastpath import FastPathTunnel
from sttun.io.tap import TapDevice
from sttun.io.tx_fastpath import TxTunnel, packet_capture_ifindexes
from sttun.io.veth_port import VethPort
from sttun.wire.ether import ETH_P_IP, ETH_P_IPV6
from sttun.wire.stt import STT_PORT

log = logging.getLogger("sttun.daemon")

#: How often the loop refreshes the published statistics and retries neighbours.
HOUSEKEEPING_INTERVAL = 1.0
#: How often the daemon looks for packet captures on its TAPs (``/proc/net/packet``),
#: whose frames then go through Python, where the capture sees them.
CAPTURE_CHECK_INTERVAL = 0.2
#: How often the daemon looks at TAPs whose transmit-order counters are apart while
#: nothing wakes their reader (``OrderCounter.drained`` forgives lost frames): often
#: while some are apart (the program sends nothing of theirs meanwhile), else rarely.
ORDER_CHECK_INTERVAL = 0.05
ORDER_CHECK_LAGGING = 0.006
#: The largest TSO frame the overlay stack may hand to a TAP: keeps every inner
#: frame within STT's offloadable size (65477 bytes, protocol.md §1.5) so the
#: fast path never has to re-segment in Python.
TAP_GSO_MAX_SIZE = 65000
_ETH = struct.Struct("!6s6sH")
#: A tunnel's overlay device: a TAP, or a veth pair when its reader takes no
#: offloads (``port_offload = false``, Open vSwitch ports).
Device = TapDevice | VethPort


class Daemon:
    """The running endpoint.  :meth:`run` blocks until stopped."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.core = core_endpoint(config)
        self.started = time.time()
        self.tunnels: dict[str, TunnelRuntime] = {}
        self.underlays: dict[str, Underlay] = {}
        self.datapath = Datapath(self.core, self._runtime_of, log=log)
        self.fastpaths = FastPaths(config.fastpath, log)
        self.tx_fastpath = TxFastPaths(config.tx_fastpath, log)
        #: TAP ifindexes with a packet capture open (their frames go through Python).
        self._captured: set[int] = set()
        #: ``[daemon] tx_ring`` as started with (a reload changes it at the next start).
        self.tx_ring_setting = config.tx_ring
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.firewall: Firewall | None = None
        self.control: Any = None
        self.watcher: Any = None
        self.metrics_stop: Callable[[], None] | None = None
        self.ovs: Any = None  # sttun.daemon.ovs_serve.OvsServer with --ovsdb
        #: Tunnels that are not in the configuration (OVSDB's rows), by name.
        self.managed: dict[str, TunnelConfig] = {}
        self.snapshot: Any = None
        self.stopping = False
        self.reload_requested = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        """Create every kernel object; on failure undo what was done and raise."""
        try:
            # before touching the host: refuse if another daemon serves this socket
            from sttun.daemon.control import ControlServer

            ControlServer.check_existing(self.config.control_socket)
            self._install_firewall()
            self.fastpaths.check()
            self.tx_fastpath.check()
            for cfg in self.config.tunnels:
                self._add_tunnel(cfg)
            self._start_control()
            self._start_metrics()
            self._start_watcher()
            self._start_ovsdb()
            self.tx_fastpath.running = True
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
        return sorted({str(t.local_ip) for t in (*self.config.tunnels, *self.managed.values())})

    def _ports(self) -> list[int]:
        ports = {t.dst_port for t in (*self.config.tunnels, *self.managed.values())}
        return sorted(ports or {STT_PORT})  # no tunnel yet (--ovsdb): STT's own port

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
            self._attach_fastpath(route.ifname)
            underlay = Underlay(route.ifname, ifindex, bytes.fromhex(mac.replace(":", "")), {})
            fp = self.fastpaths.attached.get(route.ifname)
            underlay.rx_order = fp.order if fp is not None else None
            self.underlays[route.ifname] = underlay
        self._open_underlay_port(underlay, cfg.family)
        return underlay, route

    def _open_underlay_port(self, u: Underlay, version: int) -> None:
        """Give ``u`` a socket that sends and receives IP ``version`` if it has none.

        Without the fast path one socket bound to every protocol serves both
        families.  With it, one socket per family bound to ``ETH_P_IP`` /
        ``ETH_P_IPV6``: those run after tc ingress, so they see only what the
        program passes on (an ``ETH_P_ALL`` tap would see its frames too, and each
        would be delivered twice).
        """
        if version in u.ports:
            return
        setting = self.tx_ring_setting
        # auto: where the kernel cuts GSO frames in software (no TSO on the underlay),
        # which is where the ring was measured to win (docs/architecture.md)
        ring = setting == "on" or (setting == "auto" and tso_enabled(u.ifname) is False)
        if self.fastpaths.is_attached(u.ifname):
            proto = ETH_P_IPV6 if version == 6 else ETH_P_IP
            sock = PacketSocket(
                u.ifname, self._ports(), vnet_hdr=True, protocol=proto, tx_ring=ring
            )
            versions = [version]
            what = f"IPv{version} (bound to ethertype {proto:#06x})"
        else:
            sock = PacketSocket(u.ifname, self._ports(), vnet_hdr=True, tx_ring=ring)
            versions = [4, 6]
            what = "every protocol"
        if sock.tx_ring_error is not None:
            if setting == "on":
                sock.close()
                raise SetupError(f"tx_ring = on, but underlay {u.ifname}: {sock.tx_ring_error}")
            log.warning("underlay %s: %s; sending with sendmsg", u.ifname, sock.tx_ring_error)
        for v in versions:
            u.ports[v] = sock
        self._register(sock.fileno(), functools.partial(self.datapath.on_underlay, u, sock))
        sends = ", sending through a TX ring" if sock.tx_ring is not None else ""
        log.info("underlay %s: AF_PACKET socket open for %s%s", u.ifname, what, sends)

    def _add_tunnel(self, cfg: TunnelConfig, tap: Device | None = None) -> None:
        tlog = tunnel_logger("sttun.tunnel", cfg.name, cfg.in_key)
        underlay, route = self._underlay_for(cfg)
        mtu = cfg.underlay_mtu if cfg.underlay_mtu is not None else route.mtu
        usable = mtu is None or mtu >= MIN_UNDERLAY_MTU
        # a route MTU too small for STT starts the tunnel down (below), not at all
        tunnel = self.core.add_tunnel(tunnel_spec(cfg, mtu if usable else DEFAULT_UNDERLAY_MTU))
        new_tap = False
        try:
            if tap is None and not cfg.port_offload:  # the kernel completes every frame
                tap = VethPort(cfg.dev, offload=False, mtu=cfg.mtu)
            elif tap is None:
                # up only once the transmit program is on it (below): every frame
                # the TAP queues is then one the program has counted
                new_tap = True
                tap = TapDevice(
                    cfg.dev,
                    offload=True,
                    persist=cfg.persist,
                    mtu=cfg.mtu,
                    bridge=cfg.bridge,
                    up=self.tx_fastpath.program is None,
                )
            else:  # a changed tunnel keeps its TAP (addresses, routes, bridge port)
                tap.set_mtu(cfg.mtu)
                if cfg.bridge and isinstance(tap, TapDevice):
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
        self._sync_fastpath()
        if new_tap and isinstance(tap, TapDevice) and self.tx_fastpath.program is not None:
            self._sync_tx_fastpath()
            tap.set_up(True)
        self._register(tap.fileno(), functools.partial(self.datapath.on_tap, rt))
        if not usable:
            self._block_small_mtu(rt, mtu or 0)
        else:
            self._refresh_l2(rt)
            rt.state = "up"
        self._sync_tx_fastpath()
        tlog.info(
            "tunnel up: dev %s, %s -> %s via %s, key %s, underlay MTU %d, offload %s",
            cfg.dev,
            cfg.local_ip,
            cfg.remote_ip,
            underlay.ifname,
            format_key(cfg.in_key, cfg.out_key),
            tunnel.encapsulator.underlay_mtu,
            "on" if cfg.offload else "off",
        )

    def _remove_tunnel(self, name: str, keep_tap: bool = False, readd: bool = False) -> Device:
        rt = self.tunnels.pop(name)
        self._sync_fastpath()  # before the TAP goes: the program stops redirecting to it
        if not readd:
            # the transmit program leaves the TAP; the TAP of a changed tunnel
            # (``readd``) keeps it and its counters until the tunnel is added again
            self._sync_tx_fastpath()
        self._unregister(rt.tap.fileno())
        if rt.underlay is not None:
            rt.underlay.tunnels.remove(rt)
        self.core.remove_tunnel(name)
        tap = _device(rt)
        if not keep_tap:
            tap.close(remove=not rt.config.persist)
        if rt.log:
            rt.log.info("tunnel removed" if not keep_tap else "tunnel stopped for a change")
        return tap

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
        self.datapath.flush_pending(rt)
        self._sync_tx_fastpath()

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

    # ------------------------------------------------------------------ OVSDB (--ovsdb)
    def _start_ovsdb(self) -> None:
        if not self.config.ovsdb:
            return
        from sttun.daemon.ovs_serve import OvsServer  # imports the 'ovs' package

        self.ovs = OvsServer(self, self.config.ovsdb)
        self._register(self.ovs.fileno(), self.ovs.on_readable)
        log.info("ovsdb %s: serving its type=stt interfaces", self.config.ovsdb)

    def add_managed_tunnel(self, cfg: TunnelConfig, device: VethPort) -> None:
        """Start a tunnel that is not in the configuration on ``device``, which the
        caller owns (kept when the tunnel stops).  Raises what set-up raises."""
        self.managed[cfg.name] = cfg
        try:
            self._sync_filters()
            self._add_tunnel(cfg, device)
        except BaseException:
            self.managed.pop(cfg.name, None)
            with contextlib.suppress(SttError, OSError):
                self._sync_filters()
            raise

    def remove_managed_tunnel(self, name: str) -> None:
        """Stop a tunnel started by :meth:`add_managed_tunnel`; its device stays."""
        self._remove_tunnel(name, keep_tap=True)
        self.managed.pop(name, None)
        self._sync_filters()

    def _sync_filters(self) -> None:
        """The firewall's addresses and ports, and the underlay sockets' ports, anew."""
        if self.firewall is not None:
            self.firewall.install(self._local_addresses(), self._ports())
        for u in self.underlays.values():
            for port in u.receive_ports():
                _socket(port).set_ports(self._ports())

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
        next_capture_check = next_order_check = next_housekeeping
        poll = self.epoll.poll
        handlers = self.handlers
        core = self.core
        while not self.stopping:
            now = time.monotonic()
            deadline = core.next_deadline()
            wait_until = next_housekeeping if deadline is None else min(deadline, next_housekeeping)
            if self.tx_fastpath.program is not None:
                wait_until = min(wait_until, next_capture_check, next_order_check)
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
            if self.tx_fastpath.program is not None:
                if now >= next_capture_check:
                    self._check_captures()
                    next_capture_check = now + CAPTURE_CHECK_INTERVAL
                if now >= next_order_check:
                    lagging = self._check_order()
                    next_order_check = now + (
                        ORDER_CHECK_LAGGING if lagging else ORDER_CHECK_INTERVAL
                    )
            if self.reload_requested:
                self.reload_requested = False
                self.reload()

    def _runtime_of(self, tunnel: Tunnel) -> TunnelRuntime | None:
        """The runtime of a core tunnel, if it is still the configured one."""
        rt = self.tunnels.get(tunnel.spec.name)
        return rt if rt is not None and rt.tunnel is tunnel else None

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
            if self.ovs is not None:
                self.ovs.addresses_changed()

    def _refresh_routes(self) -> None:
        for rt in self.tunnels.values():
            self._refresh_route(rt)

    def _refresh_route(self, rt: TunnelRuntime) -> None:
        """Look the route to the remote up again; re-home, re-resolve, or mark down."""
        encap = rt.tunnel.encapsulator
        try:
            route = netlink.route_lookup(str(rt.config.remote_ip))
        except (SttError, OSError) as exc:
            if rt.blocked is not DropReason.TX_NO_ROUTE and rt.log:
                rt.log.warning("no route to the remote any more: %s", exc)
            rt.blocked = DropReason.TX_NO_ROUTE
            rt.state = "down"
            encap.l2 = b""
            self._sync_tx_fastpath()
            return
        if rt.blocked is DropReason.TX_NO_ROUTE:
            if rt.log:
                rt.log.info("route to the remote is back via %s", route.ifname)
            rt.blocked = None
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
            if route.mtu < MIN_UNDERLAY_MTU:
                self._block_small_mtu(rt, route.mtu)
                return
            if rt.blocked is DropReason.TX_UNDERLAY_MTU:
                if rt.log:
                    rt.log.info("underlay MTU %d is usable again: tunnel up", route.mtu)
                rt.blocked = None
            encap.underlay_mtu = route.mtu
        self._refresh_l2(rt)
        rt.state = "up" if encap.l2 else "down"
        self._sync_tx_fastpath()

    def _block_small_mtu(self, rt: TunnelRuntime, mtu: int) -> None:
        """The route's MTU is too small for STT: the tunnel is down (its frames are
        counted as ``tx_underlay_mtu``) until a route change makes it usable."""
        if rt.blocked is not DropReason.TX_UNDERLAY_MTU and rt.log:
            rt.log.warning(
                "underlay MTU %d of the route to %s is below %d: tunnel down until it grows",
                mtu,
                rt.config.remote_ip,
                MIN_UNDERLAY_MTU,
            )
        rt.blocked = DropReason.TX_UNDERLAY_MTU
        rt.state = "down"
        rt.pending.clear()
        self._sync_tx_fastpath()

    def _housekeeping(self) -> None:
        for rt in self.tunnels.values():
            if not rt.tunnel.encapsulator.l2 or rt.blocked is not None:
                self._refresh_route(rt)
        self._sync_tx_fastpath()  # also follows link state the data path changed
        if self.ovs is not None:
            self.ovs.housekeeping()
        if self.snapshot is not None:
            self.snapshot.publish(self.show_data())

    # ------------------------------------------------------------------ reload
    def reload(self) -> None:
        """Re-read the configuration file and apply the differences (SIGHUP).

        Nothing changes unless the new file passes the whole validation ``sttun up``
        runs, the protocol core's rules included (``reload_config`` ends with
        ``validate_with_core``); otherwise one error line is logged and the running
        configuration stays.
        """
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
        kept: dict[str, Device] = {}
        for old_cfg, cfg in changed:
            same_dev = old_cfg.dev == cfg.dev and old_cfg.persist == cfg.persist
            tap = self._remove_tunnel(cfg.name, keep_tap=same_dev, readd=same_dev)
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
            for port in u.receive_ports():
                with contextlib.suppress(SttError, OSError):
                    _socket(port).set_ports(self._ports())
        if new.tx_ring != self.tx_ring_setting:
            log.warning(
                "tx_ring = %s takes effect at the next start (running with %s)",
                new.tx_ring,
                self.tx_ring_setting,
            )
        self._sync_tx_fastpath()  # also for a changed tunnel that did not start again
        if new.tx_fastpath != self.tx_fastpath.setting:
            log.warning(
                "tx_fastpath = %s takes effect at the next start (running with %s)",
                new.tx_fastpath,
                self.tx_fastpath.setting,
            )
        if new.fastpath != self.fastpaths.setting:
            log.warning(
                "fastpath = %s takes effect at the next start (running with %s)",
                new.fastpath,
                self.fastpaths.setting,
            )
        log.info(
            "configuration reloaded: %d added, %d removed, %d changed",
            len(added),
            len(removed),
            len(changed),
        )

    # ------------------------------------------------------------------ fast path
    def _attach_fastpath(self, ifname: str) -> None:
        """Attach the kernel receive fast path to a new underlay (as ``fastpath`` says:
        with ``"auto"`` a failure is one log line, with ``"on"`` a SetupError)."""
        if self.fastpaths.attach(ifname):
            self._sync_fastpath()  # a new program starts with an empty tunnel map

    def _fastpath_tunnels(self) -> list[FastPathTunnel]:
        """Every tunnel as the program sees it (its TAP's ifindex, the DSCP model)."""
        out = []
        for name, rt in self.tunnels.items():
            cfg = rt.config
            if not isinstance(rt.tap, TapDevice):
                # A veth port (OVS, port_offload = false) is written to by sending
                # through the pair; the program only delivers into a TAP's ingress,
                # so these tunnels' frames stay on the Python path.
                continue
            try:
                tap_ifindex = rt.tap.ifindex
            except OSError:  # the TAP vanished under us: Python handles its frames
                continue
            out.append(
                FastPathTunnel(
                    name,
                    cfg.local_ip,
                    cfg.remote_ip,
                    cfg.in_key,
                    tap_ifindex,
                    dst_port=cfg.dst_port,
                    dscp_uniform=cfg.tos == INHERIT,
                )
            )
        return out

    def _sync_fastpath(self) -> None:
        """Make every attached program's tunnel map equal to the daemon's tunnels."""
        if self.fastpaths.attached:
            self.fastpaths.set_tunnels(self._fastpath_tunnels())

    def _detach_fastpaths(self) -> None:
        """Detach every program (shutdown); frames then reach the Python path only."""
        if self.fastpaths.attached:
            for u in self.underlays.values():
                u.rx_order = None
            self.fastpaths.close()
            log.info("fast path detached")

    def _tx_tunnel(self, rt: TunnelRuntime, tap_ifindex: int) -> TxTunnel | None:
        """The transmit program's entry for a tunnel that can send now, else None (its
        frames then go to Python, which queues, resolves and counts drops)."""
        encap = rt.tunnel.encapsulator
        u = rt.underlay
        if (
            not rt.config.offload
            or rt.blocked is not None
            or rt.state != "up"
            or not encap.l2
            or u is None
        ):
            return None
        return TxTunnel(
            rt.config.name,
            tap_ifindex,
            u.ifindex,
            encap.header_template(),
            encap.outer_tos_table,
            encap.outer_ttl_table,
            encap.max_single_inner,
            encap.ipv6,
            encap.fixed_sport,
            # GSO frames only where the underlay takes them whole (TSO: a NIC cuts
            # them, a veth passes them on).  Without TSO the kernel would cut them in
            # software here, and the peer's GRO leaves some in pieces that its
            # program passes to Python, behind later frames; Python's TX ring sends
            # those (docs/architecture.md, "GSO frames").
            encap.segment_payload if tso_enabled(u.ifname) else 0,
            encap.max_inner_len,
        )

    def _check_captures(self) -> None:
        """Follow packet captures on the TAPs: a captured TAP's frames go through
        Python (where its taps see them) until the capture ends."""
        captured = packet_capture_ifindexes()
        if captured != self._captured:
            self._captured = captured
            self._sync_tx_fastpath()

    def _check_order(self) -> bool:
        """Read the TAPs whose transmit-order counters are apart while nothing wakes
        their reader, so that frames their queue dropped (or that were queued before
        the program was attached) are forgiven (``OrderCounter.drained``), and the
        underlays whose receive-order counters are.  True if some still are apart."""
        lagging = False
        for rt in list(self.tunnels.values()):
            if rt.tx_order is not None and rt.tx_order.lagging():
                self.datapath.on_tap(rt)
                lagging = lagging or rt.tx_order.lagging()
        for u in list(self.underlays.values()):  # the same for the receive program
            if u.rx_order is not None and u.rx_order.lagging():
                self.datapath.on_underlay(u)
                lagging = lagging or u.rx_order.lagging()
        return lagging

    def _sync_tx_fastpath(self) -> None:
        """Attach the transmit program to every tunnel TAP and write the entries of the
        tunnels that can send (cheap when nothing changed: entries are compared)."""
        if self.tx_fastpath.program is None:
            return
        taps: dict[int, str] = {}
        wanted: dict[int, TxTunnel] = {}
        yielding: dict[str, str] = {}
        for name, rt in self.tunnels.items():
            if not isinstance(rt.tap, TapDevice):
                continue  # a veth port (OVS, port_offload = false): Python sends
            try:
                ifindex = rt.tap.ifindex
            except OSError:
                continue
            taps[ifindex] = name
            if ifindex in self._captured:
                yielding[name] = f"a packet capture is open on {rt.config.dev}"
                continue
            entry = self._tx_tunnel(rt, ifindex)
            if entry is not None:
                wanted[ifindex] = entry
        self.tx_fastpath.yielding = yielding
        self.tx_fastpath.sync(taps, wanted)
        for rt in self.tunnels.values():
            rt.tx_order = self.tx_fastpath.order_counter(rt.config.name)

    def _fastpath_show(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the programs' counters by interface, the per-tunnel fast-path totals)."""
        counters = self.fastpaths.counters()
        return counters, dict(self.fastpaths.tunnel_totals(counters))

    def _underlays_show(self, counters: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``underlays`` list of the show data: sockets and fast path per interface."""
        out = []
        for ifname, u in self.underlays.items():
            shared = len(u.ports) == 2 and u.ports[4] is u.ports[6]
            out.append(
                {
                    "name": ifname,
                    # "all": one socket bound to every protocol; else one per family
                    "sockets": ["all"] if shared else sorted(f"ipv{v}" for v in u.ports),
                    "tunnels": [rt.config.name for rt in u.tunnels],
                    "fastpath": self.fastpaths.status(ifname, counters),
                }
            )
        return out

    # ------------------------------------------------------------------ stats
    def show_data(self) -> dict[str, Any]:
        """The :class:`~sttun.daemon.metrics.ShowData` of this daemon, now."""
        core = self.core.stats()
        reasm = core["reassembly"]
        fp_counters, fp_tunnels = self._fastpath_show()
        tx_counters = self.tx_fastpath.counters()
        tx_fast_tunnels = tx_counters.get("tunnels") or {}
        tunnels = []
        for name, rt in self.tunnels.items():
            t = core["tunnels"].get(name, {})
            cfg = rt.config
            rx_python = t.get("rx") or {"frames": 0, "bytes": 0, "segments": 0}
            rx_fast = fp_tunnels.get(name, {"frames": 0, "bytes": 0})
            tx_python = t.get("tx") or {"frames": 0, "bytes": 0, "segments": 0}
            tx_fast = tx_fast_tunnels.get(name, {"frames": 0, "bytes": 0})
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
                    "tx": _path_total(tx_python, tx_fast),
                    "tx_python": tx_python,
                    "tx_fastpath": tx_fast,
                    "rx": _path_total(rx_python, rx_fast),
                    "rx_python": rx_python,
                    "rx_fastpath": rx_fast,
                    "drops": t.get("drops", {}),
                    "peer_reassembly": _reassembly_view(self.core.reassembler, rt),
                    "software_completions": t.get("software_completions", 0),
                    "vlan_without_v": t.get("vlan_without_v", 0),
                    "ce_marked": t.get("ce_marked", 0),
                }
            )
        data = {
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
            "fastpath": {
                "setting": self.fastpaths.setting,
                "unsupported": self.fastpaths.unsupported,
            },
            "underlays": self._underlays_show(fp_counters),
            "tx_fastpath": self.tx_fastpath.status(tx_counters),
        }
        if self.ovs is not None:
            self.ovs.annotate(data)
        return data

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
        """Remove what this run created: fast paths, TAPs (unless persistent), rules,
        sockets.

        The veth pairs of OVS ports stay: OVS keeps its ports while sttun is away.
        """
        if self.ovs is not None:
            self._unregister(self.ovs.fileno())
            with contextlib.suppress(Exception):
                self.ovs.close()
            self.ovs = None
        self._detach_fastpaths()
        for rt in self.tunnels.values():
            rt.tx_order = None
        self.tx_fastpath.close()
        for name in list(self.tunnels):
            with contextlib.suppress(Exception):
                self._remove_tunnel(name)
        for u in self.underlays.values():
            for port in u.receive_ports():
                with contextlib.suppress(Exception):
                    _socket(port).close()
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


def _device(rt: TunnelRuntime) -> Device:
    """The device of a tunnel the daemon made (the data path sees it as a TapPort)."""
    return cast(Device, rt.tap)


def _socket(port: UnderlayPort) -> PacketSocket:
    """An underlay socket the daemon opened (the data path sees an UnderlayPort)."""
    return cast(PacketSocket, port)


def _path_total(python: dict[str, int], fast: dict[str, int]) -> dict[str, int]:
    """A tunnel's receive (or send) totals over both paths.  A fast-path frame is one
    packet on the underlay (a GSO skb or one segment), so it counts as one segment."""
    return {
        "frames": python.get("frames", 0) + fast.get("frames", 0),
        "bytes": python.get("bytes", 0) + fast.get("bytes", 0),
        "segments": python.get("segments", 0) + fast.get("frames", 0),
    }


def _reassembly_view(reassembler: Reassembler, rt: TunnelRuntime) -> dict[str, Any]:
    """The reassembly numbers of a tunnel's remote peer (``PeerReassemblyStats``).

    Until a frame is complete the reassembler knows only its outer addresses (the
    context id is inside the frame), so these belong to the peer and are shared by
    every tunnel to the same remote address.
    """
    return {"peer": str(rt.config.remote_ip), **reassembler.source_stats(rt.tunnel.spec.remote)}


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
