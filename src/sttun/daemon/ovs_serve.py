"""``sttun up --ovsdb``: the daemon serves Open vSwitch's ``type=stt`` interfaces.

:class:`OvsServer` is the glue between the OVSDB client
(:class:`~sttun.daemon.ovsdb.OvsdbClient`, which turns Interface rows into
:class:`~sttun.daemon.ovs_tunnel.OvsTunnel` events and writes ``error``/``status``
back) and the running :class:`~sttun.daemon.endpoint.Daemon`.  It owns the client,
one :class:`~sttun.io.veth_port.VethPort` per served row (the system port OVS opens
under the interface's name) and the :class:`~sttun.daemon.config.TunnelConfig` it
made of each row, and uses four calls of the daemon: ``register`` (its descriptor
in the epoll loop), ``add_managed_tunnel`` / ``remove_managed_tunnel`` (a tunnel on
a device the caller owns) and ``tunnels`` (read-only: states, clashes).

Per event (docs/architecture.md, "Open vSwitch integration"):

* ``added``: the row's options -> a :class:`TunnelConfig` (``local_ip`` absent:
  the source address of the route to ``remote_ip``; the port's offloads from OVS's
  userspace TSO setting), checked against every running tunnel exactly as the
  protocol core will (:func:`~sttun.daemon.config.validate_with_core`), then the
  veth pair is made (or adopted, after a restart of sttun), the tunnel started on
  it and the row switched to a system port (``port_ready``).  Anything refused
  goes into the row's ``error`` column and its ``status:sttun_state=error``.
* ``changed``: that tunnel only is stopped and started again with the new
  options on the same device (OVS keeps its port).
* ``removed``: the tunnel stops; with ``del-port`` the pair goes too.

After the first complete read of the database, pairs sttun made
(:func:`~sttun.io.veth_port.sttun_ports`) whose row is gone - deleted while sttun
was not running - are removed.  Rows that could not be set up are retried when
the routes or addresses change and after a tunnel was removed (the clash may be
gone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from sttun.daemon.config import DEFAULT_MTU, TunnelConfig, validate_with_core
from sttun.daemon.ovs_tunnel import OvsTunnel
from sttun.daemon.ovsdb import OvsdbClient, OvsEvent
from sttun.errors import ConfigError, SttError
from sttun.io import netlink
from sttun.io.veth_port import VethPort, sttun_ports

if TYPE_CHECKING:
    from sttun.daemon.endpoint import Daemon

log = logging.getLogger("sttun.ovs")


def tunnel_config(t: OvsTunnel, local_ip: str | None = None) -> TunnelConfig:
    """The daemon's :class:`TunnelConfig` for an OVS row's tunnel.

    ``local_ip``: the address to use when the row has none (the caller looks up
    the route's source address).  The pair outlives the daemon (``persist``), the
    underlay uses kernel GSO (``offload``), and the port takes GSO frames only when
    OVS does userspace TSO (``port_offload``).
    """
    local = t.local_ip if t.local_ip is not None else ipaddress.ip_address(local_ip or "")
    return TunnelConfig(
        name=t.name,
        local_ip=local,
        remote_ip=t.remote_ip,
        in_key=t.in_key,
        out_key=t.out_key,
        dev=t.dev,
        dst_port=t.dst_port,
        mtu=t.mtu if t.mtu is not None else DEFAULT_MTU,
        tos=t.tos,
        ttl=t.ttl,
        df=t.df,
        offload=True,
        port_offload=t.offload,
        persist=True,
    )


class OvsServer:
    """Serve the ``type=stt`` Interface rows of the OVSDB at ``remote`` (module doc).

    Raises :class:`~sttun.errors.SetupError` if the ``ovs`` package is missing (the
    message says what to install).  Nothing blocks: the daemon's loop calls
    :meth:`on_readable` when :meth:`fileno` is readable and :meth:`housekeeping`
    once a second.
    """

    def __init__(self, daemon: Daemon, remote: str) -> None:
        self.daemon = daemon
        self.remote = remote
        self.client = OvsdbClient(remote)
        self.ports: dict[str, VethPort] = {}
        """The veth pair of every row that has one, by Interface name."""
        self.configs: dict[str, TunnelConfig] = {}
        """The running tunnels made of rows, by Interface name."""
        self.failed: dict[str, OvsTunnel] = {}
        """Rows whose tunnel could not start (their ``error`` says why): retried."""
        self.failures: dict[str, str] = {}
        """Why each of :attr:`failed` could not start (what its ``error`` column shows)."""
        self._swept = False
        self._published: dict[str, tuple[str, str | None, bool | None]] = {}

    def fileno(self) -> int:
        """Readable whenever :meth:`on_readable` has work."""
        return self.client.fileno()

    # ------------------------------------------------------------------ events
    def on_readable(self) -> None:
        """Talk to ovsdb-server and apply what changed."""
        try:
            events = self.client.run()
        except Exception as exc:  # the IDL's own errors: log, the loop goes on
            log.error("ovsdb %s: %s", self.remote, exc)
            return
        for ev in events:
            self._apply(ev)
        if events and any(ev.kind == "removed" for ev in events):
            self.retry()
        if self.client.synced and not self._swept:
            self._swept = True
            self._sweep_leftovers()
        self._publish_states()

    def _apply(self, ev: OvsEvent) -> None:
        if ev.kind == "added" and ev.tunnel is not None:
            log.info("ovsdb: interface %s: new tunnel to %s", ev.name, ev.tunnel.remote_ip)
            self._start(ev.tunnel)
        elif ev.kind == "changed" and ev.tunnel is not None:
            log.info("ovsdb: interface %s: options changed, restarting its tunnel", ev.name)
            self._stop(ev.name)
            self._start(ev.tunnel)
        elif ev.kind == "removed":
            log.info(
                "ovsdb: interface %s: %s",
                ev.name,
                "port deleted" if ev.port_gone else "no longer servable",
            )
            self._stop(ev.name)
            self.failed.pop(ev.name, None)
            self.failures.pop(ev.name, None)
            port = self.ports.pop(ev.name, None) if ev.port_gone else None
            if port is not None:
                port.close(remove=True)
            self._published.pop(ev.name, None)

    def _start(self, t: OvsTunnel) -> None:
        """Start the tunnel of row ``t.name``; on failure report it in the row."""
        self.failed.pop(t.name, None)
        try:
            cfg = self._config_for(t)
            port = self._port_for(t)
            self.daemon.add_managed_tunnel(cfg, port)
        except Exception as exc:  # every refusal goes into the row, none stops the daemon
            msg = str(exc) or type(exc).__name__
            if self.failures.get(t.name) != msg:
                log.warning("ovsdb: interface %s: cannot serve: %s", t.name, msg)
            self.failed[t.name] = t
            self.failures[t.name] = msg
            self.client.set_error(t.name, msg)
            self.client.set_state(t.name, "error")
            self._published.pop(t.name, None)
            return
        self.configs[t.name] = cfg
        self.failures.pop(t.name, None)
        self.client.set_error(t.name, None)
        self.client.port_ready(t.name)

    def _stop(self, name: str) -> None:
        if self.configs.pop(name, None) is not None:
            with contextlib.suppress(SttError, OSError, KeyError):
                self.daemon.remove_managed_tunnel(name)

    def _config_for(self, t: OvsTunnel) -> TunnelConfig:
        """The tunnel's configuration, checked with every running tunnel by the core's rules."""
        local = None
        if t.local_ip is None:
            try:
                local = netlink.route_lookup(str(t.remote_ip)).src_ip
            except SttError as exc:
                raise ConfigError(f"remote_ip {t.remote_ip}: {exc}") from None
        cfg = tunnel_config(t, local)
        running = self.daemon.tunnels.get(t.name)
        if running is not None:  # a tunnel of that name from sttun's own configuration
            raise ConfigError(
                f"sttun already runs a tunnel named {t.name} from its configuration file; "
                "rename one of them"
            )
        others = tuple(rt.config for rt in self.daemon.tunnels.values())
        try:
            validate_with_core(
                dataclasses.replace(self.daemon.config, tunnels=(*others, cfg), config_path=None)
            )
        except ConfigError as exc:
            raise ConfigError(_without_label(str(exc))) from None
        return cfg

    def _port_for(self, t: OvsTunnel) -> VethPort:
        """The row's veth pair: kept across changes, adopted after a restart."""
        port = self.ports.get(t.name)
        if port is None:
            port = VethPort(t.dev, offload=t.offload, mtu=t.mtu)
            self.ports[t.name] = port
            if port.existed:
                log.info("ovsdb: interface %s: adopted the existing veth pair", t.name)
        elif port.offload != t.offload:
            port.set_offload(t.offload)
        return port

    # ------------------------------------------------------------------ upkeep
    def retry(self) -> None:
        """Try the rows that failed again (routes, addresses or other tunnels changed)."""
        for t in list(self.failed.values()):
            if self.client.tunnels.get(t.name) == t:
                self._start(t)

    def addresses_changed(self) -> None:
        """Routes or addresses changed: ``local_ip`` validity and failed rows again."""
        self.client.recheck()
        self.retry()
        self.on_readable()

    def housekeeping(self) -> None:
        """Publish the tunnels' states in their rows (once a second)."""
        self.on_readable()

    def _publish_states(self) -> None:
        for name in self.configs:
            rt = self.daemon.tunnels.get(name)
            if rt is None:
                continue
            egress = rt.underlay.ifname if rt.underlay is not None else None
            carrier: bool | None = None
            if egress is not None:
                try:
                    carrier = netlink.link_info(egress)[3]
                except SttError:
                    carrier = False
            state = (rt.state, egress, carrier)
            if self._published.get(name) != state:
                self._published[name] = state
                self.client.set_state(name, rt.state, egress_iface=egress, carrier=carrier)

    def _sweep_leftovers(self) -> None:
        """Remove the pairs sttun made whose row is gone (deleted while it was down)."""
        known = {*self.client.tunnels, *self.client.errors, *self.ports}
        known |= {rt.config.dev for rt in self.daemon.tunnels.values()}
        try:
            leftovers = [p for p in sttun_ports() if p not in known]
        except Exception as exc:
            log.warning("cannot list sttun's veth pairs: %s", exc)
            return
        for name in leftovers:
            log.info("removing veth pair %s: its OVS interface is gone", name)
            remove_link(name)

    # ------------------------------------------------------------------ reading
    def annotate(self, data: dict[str, Any]) -> None:
        """Add the OVS view to a ``show_data`` dictionary (``sttun show``)."""
        for t in data.get("tunnels", []):
            t["ovs_interface"] = t["name"] if t["name"] in self.configs else None
        data["ovsdb"] = {
            "remote": self.remote,
            "connected": self.client.connected,
            "userspace_tso": self.client.userspace_tso,
            "interfaces": sorted({*self.client.tunnels, *self.client.errors}),
            "errors": {**self.client.errors, **self.failures},
        }

    def close(self) -> None:
        """Disconnect; the pairs stay (OVS keeps its ports while sttun is away)."""
        for port in self.ports.values():
            with contextlib.suppress(Exception):
                port.close(remove=False)
        self.ports.clear()
        with contextlib.suppress(Exception):
            self.client.close()


def remove_link(name: str) -> None:
    """Delete the interface ``name`` (a veth takes its peer with it), if it exists."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr, contextlib.suppress(Exception):
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


def _without_label(message: str) -> str:
    """A :func:`validate_with_core` message without its ``tunnel[N]:`` label."""
    head, sep, rest = message.partition(": ")
    return rest if sep and head.startswith(("tunnel[", "daemon")) else message
