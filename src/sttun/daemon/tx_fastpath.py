"""The kernel transmit fast path as the daemon runs it: one program on every TAP.

:class:`TxFastPaths` applies the ``[daemon] tx_fastpath`` setting (``"auto"``,
``"on"``, ``"off"``): it loads the program once (:class:`~sttun.io.tx_fastpath.
TxFastPath`), attaches it at the egress of each tunnel TAP, and keeps the program's
tunnel map equal to the tunnels that can send now (:meth:`sync`).  With ``"auto"``
a program that cannot load is one log line and the pure-Python send path; with
``"on"`` it is a :class:`~sttun.errors.SetupError`.  A TAP the program cannot be
attached to keeps the Python path (one line).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from sttun.errors import SetupError
from sttun.io.order_counter import OrderCounter
from sttun.io.rx_fastpath import FastPathError
from sttun.io.tx_fastpath import TxFastPath, TxTunnel

#: Why the transmit fast path is off when the configuration says so.
OFF_BY_SETTING = "tx_fastpath = off in the configuration"


class TxFastPaths:
    """The transmit program of one daemon (see the module doc)."""

    def __init__(self, setting: str, log: logging.Logger) -> None:
        if setting not in ("auto", "on", "off"):
            raise ValueError(f"tx_fastpath setting must be auto, on or off, got {setting!r}")
        self.setting = setting
        self.log = log
        self.program: TxFastPath | None = None
        #: Why the program does not run at all (None: it runs, or not decided yet).
        self.unsupported: str | None = None
        #: TAPs (by tunnel name) the program could not be attached to, and why.
        self.why_not: dict[str, str] = {}
        #: Tunnels whose frames go through Python for now although the program could
        #: send them, and why (a packet capture on the TAP).
        self.yielding: dict[str, str] = {}
        self._taps: dict[int, str] = {}  # attached TAP ifindex -> tunnel name
        self._checked = False
        #: Set once the daemon runs: with ``"on"``, a TAP the program cannot be
        #: attached to stops a start, but later (a reload's new tunnel) it is logged.
        self.running = False

    def check(self) -> None:
        """Load the program once; with ``"on"`` raise if it cannot run."""
        if self._checked:
            return
        self._checked = True
        if self.setting == "off":
            self.unsupported = OFF_BY_SETTING
            return
        try:
            self.program = TxFastPath.load()
        except FastPathError as exc:
            self.unsupported = exc.reason
            if self.setting == "on":
                raise SetupError(f"tx_fastpath = on, but {exc.reason}") from exc
            self.log.warning("%s; sending in Python", exc.reason)
            return
        self.log.info("transmit fast path loaded (program id %d)", self.program.prog_id)

    def sync(self, taps: Mapping[int, str], wanted: Mapping[int, TxTunnel]) -> None:
        """Attach to every TAP in ``taps`` (ifindex -> tunnel name), detach from the
        ones gone, and make the map hold exactly ``wanted`` (by TAP ifindex)."""
        prog = self.program
        if prog is None:
            return
        for ifindex in [i for i in self._taps if i not in taps]:
            with contextlib.suppress(OSError):
                prog.detach(ifindex)
            self.why_not.pop(self._taps.pop(ifindex), None)
        for ifindex, name in taps.items():
            if ifindex in self._taps:
                continue
            try:
                mode = prog.attach(ifindex)
            except FastPathError as exc:
                if self.setting == "on" and not self.running:
                    raise SetupError(f"tx_fastpath = on, but tunnel {name}: {exc.reason}") from exc
                if name not in self.why_not:
                    level = logging.ERROR if self.setting == "on" else logging.WARNING
                    self.log.log(level, "%s; tunnel %s sends in Python", exc.reason, name)
                self.why_not[name] = exc.reason
                continue
            self._taps[ifindex] = name
            self.why_not.pop(name, None)
            self.log.debug("transmit fast path on the TAP of tunnel %s (%s)", name, mode)
        for ifindex, name in self._taps.items():
            tunnel = wanted.get(ifindex)
            try:
                if tunnel is None:
                    prog.disable(ifindex, name)
                else:
                    prog.set_tunnel(tunnel)
            except (ValueError, OSError) as exc:
                self.log.error(
                    "transmit fast path: cannot update tunnel %s: %s", self._taps[ifindex], exc
                )
        prog.forget(prog.tunnel_names() - set(taps.values()))

    def order_counter(self, name: str) -> OrderCounter | None:
        """The ordering counters of a tunnel whose TAP has the program, else None."""
        if self.program is None or name not in self._taps.values():
            return None
        return self.program.order_counter(name)

    def close(self) -> None:
        """Detach from every TAP and unload (idempotent)."""
        if self.program is not None:
            with contextlib.suppress(Exception):
                self.program.close()
            self.program = None
            self._taps.clear()
            if self.unsupported is None:
                self.unsupported = "detached"

    def counters(self) -> dict[str, Any]:
        """The program's counters (empty when it does not run)."""
        if self.program is None:
            return {"tunnels": {}, "passed": {}, "errors": {"packets": 0, "bytes": 0}}
        try:
            return self.program.counters()
        except OSError as exc:
            self.log.debug("transmit fast path: counters unreadable: %s", exc)
            return {"tunnels": {}, "passed": {}, "errors": {"packets": 0, "bytes": 0}}

    def status(self, counters: Mapping[str, Any]) -> dict[str, Any]:
        """The ``tx_fastpath`` entry of ``sttun show --json``."""
        on = self.program is not None
        return {
            "setting": self.setting,
            "state": "on" if on else "off",
            "reason": None if on else (self.unsupported or "not loaded"),
            "program_id": self.program.prog_id if self.program is not None else None,
            "taps": len(self._taps),
            "not_attached": dict(self.why_not),
            "yielding": dict(self.yielding) if on else {},
            "passed": dict(counters.get("passed") or {}),
            "errors": dict(counters.get("errors") or {"packets": 0, "bytes": 0}),
        }
