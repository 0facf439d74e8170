"""The kernel receive fast path as the daemon runs it: one program per underlay.

:class:`FastPaths` applies the ``[daemon] fastpath`` setting (``"auto"``, ``"on"``,
``"off"``): it checks once whether the eBPF program can run here
(:func:`~sttun.io.rx_fastpath.fastpath_support`), attaches an
:class:`~sttun.io.rx_fastpath.RxFastPath` to each underlay interface the daemon
opens, keeps every program's tunnel map equal to the daemon's tunnels, and
collects the programs' counters for ``sttun show`` and the metrics.

With ``"auto"`` a fast path that cannot run is one log line and the pure-Python
receive path; with ``"on"`` it is a :class:`~sttun.errors.SetupError` (``sttun up``
exits with status 1).  Where the fast path is attached, the daemon binds the
underlay's ``AF_PACKET`` sockets per protocol (they run after tc ingress and see
only what the program leaves to Python); see :mod:`sttun.daemon.endpoint`.

Every program gets every tunnel, whichever underlay its route uses: the Python path
accepts a tunnel's frames on any underlay socket, and so does the fast path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any, TypedDict

from sttun.errors import SetupError
from sttun.io.rx_fastpath import FastPathError, FastPathTunnel, RxFastPath, fastpath_support

#: Why the fast path is off when the configuration says so.
OFF_BY_SETTING = "fastpath = off in the configuration"


class FastPathCounters(TypedDict):
    """A tunnel's frames delivered by the fast path, and their inner bytes."""

    frames: int
    bytes: int


class FastPaths:
    """The fast paths of one daemon, by underlay interface name (see the module doc)."""

    def __init__(self, setting: str, log: logging.Logger) -> None:
        if setting not in ("auto", "on", "off"):
            raise ValueError(f"fastpath setting must be auto, on or off, got {setting!r}")
        self.setting = setting
        self.log = log
        self.attached: dict[str, RxFastPath] = {}
        #: Underlays without the fast path, and why (one line each).
        self.why_not: dict[str, str] = {}
        #: Why the fast path cannot run on this host at all (None: it can).
        self.unsupported: str | None = None
        self._checked = False

    # -- life cycle -------------------------------------------------------------------
    def check(self) -> None:
        """Decide once whether to try at all; with ``"on"`` raise if it cannot run."""
        if self._checked:
            return
        self._checked = True
        if self.setting == "off":
            self.unsupported = OFF_BY_SETTING
            return
        why = fastpath_support()
        if why is None:
            return
        self.unsupported = f"fast path cannot run here: {why}"
        if self.setting == "on":
            raise SetupError(f"fastpath = on, but the {self.unsupported}")
        self.log.warning("%s; receiving in Python", self.unsupported)

    def attach(self, ifname: str) -> bool:
        """Attach the fast path to ``ifname`` unless it is there or cannot run; True if
        it is attached.  With ``"on"`` a failure raises :class:`SetupError`."""
        self.check()
        if ifname in self.attached:
            return True
        if self.unsupported is not None:
            self.why_not[ifname] = self.unsupported
            return False
        try:
            fp = RxFastPath.attach(ifname, ordered=True)
        except FastPathError as exc:
            if self.setting == "on":
                raise SetupError(f"fastpath = on, but on {ifname}: {exc.reason}") from exc
            self.log.warning("%s; receiving on %s in Python", exc.reason, ifname)
            self.why_not[ifname] = exc.reason
            return False
        self.attached[ifname] = fp
        self.why_not.pop(ifname, None)
        return True

    def is_attached(self, ifname: str) -> bool:
        """True if the program is attached to ``ifname``."""
        return ifname in self.attached

    def close(self) -> None:
        """Detach every program (idempotent)."""
        for ifname, fp in list(self.attached.items()):
            with contextlib.suppress(Exception):
                fp.close()
            self.why_not[ifname] = "detached"
        self.attached.clear()

    # -- tunnels ----------------------------------------------------------------------
    def set_tunnels(self, tunnels: Iterable[FastPathTunnel]) -> None:
        """Make every attached program serve exactly ``tunnels``.  A program that
        refuses the set keeps its previous one (one error line)."""
        wanted = list(tunnels)
        for ifname, fp in self.attached.items():
            try:
                fp.set_tunnels(wanted)
            except (ValueError, OSError) as exc:
                self.log.error("fast path on %s: cannot update its tunnels: %s", ifname, exc)

    # -- counters ---------------------------------------------------------------------
    def counters(self) -> dict[str, dict[str, Any]]:
        """Every attached program's :meth:`~RxFastPath.counters`, by interface."""
        out = {}
        for ifname, fp in self.attached.items():
            try:
                out[ifname] = fp.counters()
            except OSError as exc:  # a map read failed: show the program without numbers
                self.log.debug("fast path on %s: counters unreadable: %s", ifname, exc)
        return out

    @staticmethod
    def tunnel_totals(counters: dict[str, dict[str, Any]]) -> dict[str, FastPathCounters]:
        """Per tunnel name: frames and bytes the fast path delivered on every underlay."""
        totals: dict[str, FastPathCounters] = {}
        for c in counters.values():
            for name, t in (c.get("tunnels") or {}).items():
                acc = totals.setdefault(name, {"frames": 0, "bytes": 0})
                acc["frames"] += t.get("frames", 0)
                acc["bytes"] += t.get("bytes", 0)
        return totals

    def status(self, ifname: str, counters: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The ``fastpath`` entry of an underlay in ``sttun show --json``."""
        c = counters.get(ifname)
        if ifname in self.attached:
            fp = self.attached[ifname]
            return {
                "state": "on",
                "reason": None,
                "attach": fp.mode,  # "tcx" or "tc"
                "program_id": fp.prog_id,
                "passed": (c or {}).get("passed", {}),
                "errors": (c or {}).get("errors", {"packets": 0, "bytes": 0}),
            }
        return {
            "state": "off",
            "reason": self.why_not.get(ifname, self.unsupported or "not attached"),
            "attach": None,
            "program_id": None,
            "passed": {},
            "errors": {"packets": 0, "bytes": 0},
        }
