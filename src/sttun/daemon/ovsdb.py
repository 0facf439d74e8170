"""OVSDB client: serve Open vSwitch's ``type=stt`` Interface rows.

:class:`OvsdbClient` keeps a replica of the parts of the ``Open_vSwitch`` database
sttun needs, using the Open vSwitch project's own Python IDL (PyPI ``ovs``,
``pip install 'sttun[ovs]'``).  The schema is fetched from the server
(``get_schema``), so no schema file is needed and any OVS version works.

What it reads: every ``Interface`` row whose ``type`` is ``stt`` or that carries
the marker ``external_ids:sttun-type=stt`` (a row sttun already serves, see
docs/ovs.md), and ``Open_vSwitch other_config:userspace-tso-enable``.  Each row
becomes an :class:`~sttun.daemon.ovs_tunnel.OvsTunnel` or an error
(:mod:`sttun.daemon.ovs_tunnel`); :meth:`OvsdbClient.run` returns what changed as
:class:`OvsEvent` objects (``added`` / ``changed`` / ``removed``).

What it writes, where OVS users look:

* ``error``: why a row cannot be served (bad or unsupported options, key clash,
  or what the daemon reported with :meth:`OvsdbClient.set_error`).  ovs-vswitchd
  clears ``error`` of every interface on each reconfiguration; the client puts
  its message back (one write per reconfiguration).  A message the client did
  not write is never touched.
* ``status``: ``sttun_state`` (the daemon's word for the tunnel: ``up``,
  ``down``, ...; ``error`` for a row in error), ``tunnel_egress_iface`` and
  ``tunnel_egress_iface_carrier`` like OVS's own tunnel ports; written key by
  key (a mutation), so the keys ovs-vswitchd keeps there (``driver_name``...)
  are left alone.
* ``type`` = ``system`` and ``external_ids:sttun-type=stt`` once the daemon has
  made the port's device (:meth:`OvsdbClient.port_ready`): from then on
  ovs-vswitchd opens the device of that name as an ordinary system port.

Event loop integration: :meth:`OvsdbClient.fileno` is one file descriptor (an
epoll instance holding the IDL's socket and a timerfd for its timers) that becomes
readable whenever :meth:`OvsdbClient.run` has work; ``run()`` never blocks.  A lost
connection is retried by the IDL's reconnect logic (backoff up to 8 s); after the
server comes back the replica is reloaded and only real differences are reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from sttun.daemon.ovs_tunnel import OvsTunnel, RowError, resolve_clashes, translate
from sttun.errors import SetupError

log = logging.getLogger("sttun.ovsdb")

DB_NAME = "Open_vSwitch"
STT_TYPE = "stt"
MARKER_KEY = "sttun-type"
"""``external_ids`` key that marks a row sttun serves (its value is ``stt``)."""
SERVED_TYPE = "system"
"""The ``type`` a served row gets: ovs-vswitchd opens the device of the row's name."""
STATE_KEY = "sttun_state"
EGRESS_KEY = "tunnel_egress_iface"
CARRIER_KEY = "tunnel_egress_iface_carrier"
INSTALL_HINT = (
    "the OVSDB client needs the 'ovs' package: pip install 'sttun[ovs]' (or: pip install ovs)"
)

INTERFACE_COLUMNS = ["name", "type", "options", "external_ids", "status", "error", "mtu_request"]
OPEN_VSWITCH_COLUMNS = ["other_config"]

EventKind = Literal["added", "changed", "removed"]


def import_ovs() -> ModuleType:
    """Import the ``ovs`` package's IDL, or raise :class:`SetupError` saying how to get it."""
    try:
        import ovs.db.idl
        import ovs.jsonrpc
        import ovs.poller
        import ovs.timeval
    except ImportError as e:
        raise SetupError(INSTALL_HINT) from e
    module: ModuleType = ovs
    return module


@dataclass(frozen=True)
class OvsEvent:
    """A change of the tunnels OVSDB asks for.

    ``added``: ``tunnel`` is new.  ``changed``: ``old`` became ``tunnel`` (same
    name).  ``removed``: ``old`` is no longer wanted; ``port_gone`` is true when
    the Interface row itself went away (``del-port``: remove the device too) and
    false when the row stays but cannot be served (keep the device, so that OVS
    keeps its port, and stop the tunnel; the row's ``error`` says why).
    """

    kind: EventKind
    name: str
    tunnel: OvsTunnel | None = None
    old: OvsTunnel | None = None
    port_gone: bool = False


# --------------------------------------------------------------------------- waiting
_libc = ctypes.CDLL(None, use_errno=True)
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
_ITIMERSPEC = struct.Struct("=qqqq")  # it_interval (sec, nsec), it_value (sec, nsec)


class _TimerFd:
    """A non-blocking CLOCK_MONOTONIC timerfd (Python 3.11 has no os.timerfd_create)."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise SetupError(f"timerfd_create: {os.strerror(err)}")
        self.fd = int(fd)

    def arm(self, msec: float | None) -> None:
        """Expire once after ``msec`` ms (0: at once); None: disarm."""
        if msec is None:
            sec = nsec = 0
        else:
            ns = max(1, int(msec * 1_000_000))
            sec, nsec = divmod(ns, 1_000_000_000)
        spec = ctypes.create_string_buffer(_ITIMERSPEC.pack(0, 0, sec, nsec))
        if _libc.timerfd_settime(self.fd, 0, spec, None) != 0:
            err = ctypes.get_errno()
            raise SetupError(f"timerfd_settime: {os.strerror(err)}")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _WaitSet:
    """Stands in for ``ovs.poller.Poller``: collects what the IDL wants to wait for.

    The IDL and its session call ``fd_wait``/``timer_wait``/``immediate_wake`` on
    it; :meth:`apply` then mirrors that into an epoll instance and a timerfd, so a
    single descriptor tells the daemon's loop when to call ``run()`` again.
    """

    def __init__(self, msec_now: Callable[[], float]) -> None:
        self._now = msec_now
        self.epoll = select.epoll()
        self.timer = _TimerFd()
        self.epoll.register(self.timer.fd, select.EPOLLIN)
        self._registered: set[int] = set()
        self._fds: dict[int, int] = {}
        self._timeout: float | None = None

    # -- ovs.poller.Poller's interface ----------------------------------------
    def fd_wait(self, fd: Any, events: int) -> None:
        n = fd if isinstance(fd, int) else fd.fileno()
        if n >= 0:
            self._fds[n] = self._fds.get(n, 0) | events

    def timer_wait(self, msec: float) -> None:
        if msec <= 0:
            self.immediate_wake()
        elif self._timeout is None or msec < self._timeout:
            self._timeout = msec

    def timer_wait_until(self, msec: float) -> None:
        self.timer_wait(msec - self._now())

    def immediate_wake(self) -> None:
        self._timeout = 0

    # -- ours ------------------------------------------------------------------
    def apply(self) -> None:
        """Make the epoll set and the timer match what was asked since the last apply."""
        wanted = {fd: _epoll_events(ev) for fd, ev in self._fds.items()}
        for fd in self._registered - wanted.keys():
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
        for fd, ev in wanted.items():
            try:
                self.epoll.modify(fd, ev)
            except FileNotFoundError:  # new fd, or a reused number epoll forgot
                self.epoll.register(fd, ev)
        self._registered = set(wanted)
        self.timer.arm(self._timeout)
        self._fds = {}
        self._timeout = None

    def close(self) -> None:
        self.epoll.close()
        self.timer.close()


def _epoll_events(poll_events: int) -> int:
    ev = 0
    if poll_events & select.POLLIN:
        ev |= select.EPOLLIN
    if poll_events & select.POLLOUT:
        ev |= select.EPOLLOUT
    return ev or select.EPOLLIN


# --------------------------------------------------------------------------- the client
@dataclass
class _RowWrite:
    """What the client wants one Interface row to show."""

    served: bool = False  # the daemon made the device: type=system + marker
    error: str | None = None  # translation / clash error
    daemon_error: str | None = None  # set_error()
    status: dict[str, str] | None = None


class OvsdbClient:
    """Serve ``type=stt`` Interface rows of the OVSDB at ``remote`` (see module doc).

    ``remote``: an OVSDB remote as OVS writes it (``unix:/var/run/openvswitch/db.sock``,
    ``tcp:127.0.0.1:6640``; several separated by commas).  ``is_local(addr)``:
    whether ``local_ip`` values are addresses of this host (default: ask the kernel,
    :func:`sttun.io.netlink.is_local_address`).

    Raises :class:`SetupError` if the ``ovs`` package is missing (the message says
    what to install).  Connecting happens in :meth:`run`; nothing here blocks.
    """

    def __init__(
        self,
        remote: str,
        *,
        is_local: Callable[[str], bool] | None = None,
        probe_interval_ms: int | None = None,
    ) -> None:
        self._ovs = import_ovs()
        if is_local is None:
            from sttun.io import netlink

            is_local = netlink.is_local_address
        self.remote = remote
        self._is_local = is_local
        self._probe = probe_interval_ms
        self._waits = _WaitSet(self._ovs.timeval.msec)
        self._schema_session: Any = None
        self._schema_request: Any = None
        self._schema_seqno: int | None = None
        self._idl: Any = None
        self._seen_seqno = -1
        self._dirty = True
        self._txn: Any = None
        self._desired: dict[str, OvsTunnel] = {}
        self._errors: dict[str, str] = {}
        self._writes: dict[str, _RowWrite] = {}
        self._written_errors: dict[str, str] = {}
        self.userspace_tso: bool | None = None
        """``other_config:userspace-tso-enable`` as the database has it (None: not read yet)."""
        self._start_schema_fetch()
        self._rearm()

    # -- public state ---------------------------------------------------------
    @property
    def tunnels(self) -> Mapping[str, OvsTunnel]:
        """The tunnels the database asks for now, by Interface name."""
        return self._desired

    @property
    def errors(self) -> Mapping[str, str]:
        """Rows that cannot be served, by Interface name: the message in ``error``."""
        return self._errors

    @property
    def synced(self) -> bool:
        """True once the replica holds a complete copy of the database."""
        return self._idl is not None and self._idl.state == self._idl.IDL_S_MONITORING

    @property
    def connected(self) -> bool:
        """True while the connection to ovsdb-server is up and the replica is current."""
        if self._idl is None:
            return False
        return bool(self.synced and self._idl._session.is_connected())

    def fileno(self) -> int:
        """A descriptor that is readable whenever :meth:`run` should be called."""
        return self._waits.epoll.fileno()

    # -- what the daemon reports ----------------------------------------------------
    def port_ready(self, name: str) -> None:
        """The daemon made the device ``name``: switch the row to a system port."""
        self._row_write(name).served = True

    def set_state(
        self,
        name: str,
        state: str,
        *,
        egress_iface: str | None = None,
        carrier: bool | None = None,
    ) -> None:
        """Publish the tunnel's state in the row's ``status`` column."""
        status = {STATE_KEY: state}
        if egress_iface is not None:
            status[EGRESS_KEY] = egress_iface
        if carrier is not None:
            status[CARRIER_KEY] = "up" if carrier else "down"
        self._row_write(name).status = status

    def set_error(self, name: str, message: str | None) -> None:
        """Put (or, with None, take back) a daemon-side error in the row's ``error``."""
        self._row_write(name).daemon_error = message

    def recheck(self) -> None:
        """Translate every row again on the next :meth:`run` (e.g. local addresses changed)."""
        self._dirty = True

    # -- the loop -----------------------------------------------------------------
    def run(self) -> list[OvsEvent]:
        """Do whatever is ready without blocking; return the changes since the last call."""
        self._waits.timer.drain()
        events: list[OvsEvent] = []
        try:
            if self._idl is None:
                self._advance_schema_fetch()
            if self._idl is not None:
                self._idl.run()
                self._finish_txn()
                if self.synced and (self._dirty or self._idl.change_seqno != self._seen_seqno):
                    self._seen_seqno = self._idl.change_seqno
                    self._dirty = False
                    events = self._recompute()
                if self.synced and self._txn is None:
                    self._start_txn()
        finally:
            self._rearm()
        return events

    def close(self) -> None:
        """Close the connection and the descriptors (the database is left as it is)."""
        if self._txn is not None:
            with contextlib.suppress(Exception):
                self._txn.abort()
            self._txn = None
        if self._idl is not None:
            self._idl.close()
            self._idl = None
        if self._schema_session is not None:
            self._schema_session.close()
            self._schema_session = None
        self._waits.close()

    def __enter__(self) -> OvsdbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema --------------------------------------------------------------------
    def _start_schema_fetch(self) -> None:
        jsonrpc = self._ovs.jsonrpc
        self._schema_session = jsonrpc.Session.open(self.remote, probe_interval=self._probe)
        self._schema_request = None
        self._schema_seqno = None

    def _advance_schema_fetch(self) -> None:
        jsonrpc = self._ovs.jsonrpc
        session = self._schema_session
        session.run()
        if not session.is_connected():
            return
        if self._schema_seqno != session.get_seqno():  # new connection: (re)send
            self._schema_seqno = session.get_seqno()
            self._schema_request = jsonrpc.Message.create_request("get_schema", [DB_NAME])
            session.send(self._schema_request)
        for _ in range(16):
            msg = session.recv()
            if msg is None:
                return
            if msg.id != self._schema_request.id:
                continue
            if msg.type != jsonrpc.Message.T_REPLY:
                log.error("ovsdb %s: get_schema %s failed: %s", self.remote, DB_NAME, msg.error)
                session.force_reconnect()
                return
            self._make_idl(msg.result)
            session.close()
            self._schema_session = None
            return

    def _make_idl(self, schema_json: Any) -> None:
        idl_mod = self._ovs.db.idl
        helper = idl_mod.SchemaHelper(schema_json=schema_json)
        helper.register_columns("Interface", INTERFACE_COLUMNS)
        helper.register_columns(DB_NAME, OPEN_VSWITCH_COLUMNS)
        self._idl = idl_mod.Idl(self.remote, helper, probe_interval=self._probe)
        log.info("ovsdb %s: schema %s fetched, monitoring Interface rows", self.remote, DB_NAME)

    # -- reading ---------------------------------------------------------------------
    def _recompute(self) -> list[OvsEvent]:
        tables = self._idl.tables
        tso = False
        for row in tables[DB_NAME].rows.values():
            tso = row.other_config.get("userspace-tso-enable") == "true"
        self.userspace_tso = tso
        rows = {}
        for row in tables["Interface"].rows.values():
            if row.type == STT_TYPE or row.external_ids.get(MARKER_KEY) == STT_TYPE:
                rows[row.name] = row
        wanted: list[OvsTunnel] = []
        errors: dict[str, str] = {}
        for name, row in sorted(rows.items()):
            mtu = row.mtu_request[0] if row.mtu_request else None
            res = translate(
                name,
                dict(row.options),
                mtu_request=mtu,
                userspace_tso=tso,
                is_local=self._is_local,
            )
            if isinstance(res, RowError):
                errors[name] = res.message
            else:
                wanted.append(res)
        kept, clashes = resolve_clashes(wanted, self._desired)
        for e in clashes:
            errors[e.name] = e.message
        events = self._diff(kept, set(rows))
        for name, msg in errors.items():
            if self._errors.get(name) != msg:
                log.warning("ovsdb: interface %s cannot be served: %s", name, msg)
        self._desired = kept
        self._errors = errors
        for name in list(self._writes):
            if name not in rows:
                del self._writes[name]
                self._written_errors.pop(name, None)
        for name in rows:
            w = self._row_write(name)
            w.error = errors.get(name)
            if name in errors and name not in kept:
                w.status = {STATE_KEY: "error"}
        return events

    def _diff(self, new: Mapping[str, OvsTunnel], rows: set[str]) -> list[OvsEvent]:
        events: list[OvsEvent] = []
        for name, gone in self._desired.items():
            if name not in new:
                events.append(OvsEvent("removed", name, old=gone, port_gone=name not in rows))
        for name, t in new.items():
            old = self._desired.get(name)
            if old is None:
                events.append(OvsEvent("added", name, tunnel=t))
            elif old != t:
                events.append(OvsEvent("changed", name, tunnel=t, old=old))
        return events

    # -- writing ---------------------------------------------------------------------
    def _row_write(self, name: str) -> _RowWrite:
        w = self._writes.get(name)
        if w is None:
            w = self._writes[name] = _RowWrite()
        return w

    def _start_txn(self) -> None:
        rows = {r.name: r for r in self._idl.tables["Interface"].rows.values()}
        plan: list[tuple[Any, _RowWrite]] = []
        for name, w in self._writes.items():
            row = rows.get(name)
            if row is not None and self._needs_write(row, w):
                plan.append((row, w))
        if not plan:
            return
        txn = self._ovs.db.idl.Transaction(self._idl)
        txn.add_comment("sttun: serve type=stt interfaces")
        for row, w in plan:
            self._write_row(row, w)
        self._txn = txn
        self._finish_txn()

    def _wanted_error(self, name: str, w: _RowWrite) -> str | None:
        return w.error or w.daemon_error

    def _needs_write(self, row: Any, w: _RowWrite) -> bool:
        if w.served and (row.type != SERVED_TYPE or row.external_ids.get(MARKER_KEY) != STT_TYPE):
            return True
        want = self._wanted_error(row.name, w)
        have = row.error[0] if row.error else None
        if want is not None and have != want:
            return True
        if want is None and have is not None and have == self._written_errors.get(row.name):
            return True
        return bool(w.status and any(row.status.get(k) != v for k, v in w.status.items()))

    def _write_row(self, row: Any, w: _RowWrite) -> None:
        name = row.name
        if w.served and (row.type != SERVED_TYPE or row.external_ids.get(MARKER_KEY) != STT_TYPE):
            row.verify("type")
            row.type = SERVED_TYPE
            row.setkey("external_ids", MARKER_KEY, STT_TYPE)
            log.info("ovsdb: interface %s is now a system port served by sttun", name)
        want = self._wanted_error(name, w)
        have = row.error[0] if row.error else None
        if want is not None and have != want:
            row.error = [want]
            self._written_errors[name] = want
        elif want is None and have is not None and have == self._written_errors.get(name):
            row.verify("error")
            row.error = []
            self._written_errors.pop(name, None)
        if w.status:
            for k, v in w.status.items():
                if row.status.get(k) != v:
                    row.setkey("status", k, v)

    def _finish_txn(self) -> None:
        if self._txn is None:
            return
        txn_cls = self._ovs.db.idl.Transaction
        status = self._txn.commit()
        if status == txn_cls.INCOMPLETE:
            return
        if status not in (txn_cls.SUCCESS, txn_cls.UNCHANGED):
            log.debug("ovsdb: transaction %s (%s); retrying", status, self._txn.get_error())
            self._dirty = True
        self._txn = None

    def _rearm(self) -> None:
        waits = self._waits
        if self._schema_session is not None:
            self._schema_session.wait(waits)
            self._schema_session.recv_wait(waits)
        if self._idl is not None:
            self._idl.wait(waits)
            if self._txn is not None:
                self._txn.wait(waits)
        waits.apply()
