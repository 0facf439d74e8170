"""``sttun show``: ask a running endpoint for its state and print it.

The daemon answers on its control socket with a
:class:`~sttun.daemon.metrics.ShowData`; this module prints it as JSON
(``--json``), as a rich table on a terminal, or as plain aligned text
(:func:`format_show_text`) for pipes and logs.  The renderers tolerate missing or
null sections: the data crosses a process boundary, possibly from another version.

Partial frames are only known by their outer source address until they complete
(the context id is inside the frame), so the reassembly numbers on a tunnel's row
are those of its remote peer, shared by every tunnel to that address; the text
says so (``PEER REASM``, ``reassembly from <peer> (tunnels ...)``).

The kernel receive fast path gets a line per underlay (on, how it is attached and
what it left to Python by reason; or off and why) and, where it runs, a line per
tunnel splitting the received frames between the fast path and the Python path
(the table's RX columns count both).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sttun.core.keys import format_key
from sttun.tools.report import human_bytes

if TYPE_CHECKING:
    from sttun.daemon.metrics import ShowData

__all__ = ["format_show_text", "human_duration", "main", "print_show_rich"]

_COLUMNS = (
    ("TUNNEL", False),
    ("DEV", False),
    ("LOCAL", False),
    ("REMOTE", False),
    ("KEY", False),
    ("PORT", True),
    ("STATE", False),
    ("TX FRAMES", True),
    ("TX BYTES", True),
    ("RX FRAMES", True),
    ("RX BYTES", True),
    ("DROPS", True),
    ("PEER REASM", True),
)  # (heading, right-aligned)


def main(ns: argparse.Namespace) -> int:
    """Run ``sttun show`` with parsed arguments; returns the exit status."""
    from sttun.daemon.config_keys import DEFAULT_INSTANCE, default_control_socket
    from sttun.daemon.control import query

    path = ns.control_socket or default_control_socket(ns.instance or DEFAULT_INSTANCE)
    data: Any = query(path, "show", timeout=ns.timeout)
    if ns.json:
        print(json.dumps(data, indent=2))
        return 0
    if sys.stdout.isatty():
        try:
            print_show_rich(data)
            return 0
        except ImportError:
            pass
    print(format_show_text(data))
    return 0


def human_duration(seconds: float) -> str:
    """``3725`` → ``"1h02m"``."""
    s = max(int(seconds), 0)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _reassembly_text(r: Mapping[str, Any]) -> str:
    return (
        f"{r.get('entries', 0)} partial frame(s), {human_bytes(r.get('bytes', 0))} "
        f"(peak {human_bytes(r.get('peak_bytes', 0))}), {r.get('evictions', 0)} evicted, "
        f"{r.get('timeouts', 0)} timed out"
    )


def _drop_list(drops: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items(), key=lambda i: -i[1]))


def _show_parts(data: ShowData, now: float) -> tuple[str, list[list[str]], list[str]]:
    """(header line, table rows, detail lines) for ``sttun show``."""
    tunnels: list[Mapping[str, Any]] = data.get("tunnels") or []  # type: ignore[assignment]
    header = (
        f"sttun instance {data.get('instance', '?')}, pid {data.get('pid', '?')}, "
        f"up {human_duration(now - data.get('started', now))}, "
        f"{len(tunnels)} tunnel(s)"
    )
    rows = []
    details = _fastpath_lines(data, tunnels)
    # peer address -> (its reassembly numbers, the tunnels to it), in tunnel order
    peers: dict[str, tuple[Mapping[str, Any], list[str]]] = {}
    for t in tunnels:
        name = str(t.get("name", "?"))
        ovs_name = t.get("ovs_interface")
        tx: Mapping[str, Any] = t.get("tx") or {}
        rx: Mapping[str, Any] = t.get("rx") or {}
        drops: Mapping[str, int] = t.get("drops") or {}
        r: Mapping[str, Any] = t.get("peer_reassembly") or {}
        rows.append(
            [
                f"{name} (ovs)" if ovs_name else name,
                str(t.get("dev", "?")),
                str(t.get("local_ip", "?")),
                str(t.get("remote_ip", "?")),
                format_key(t.get("in_key", 0), t.get("out_key", 0)),
                str(t.get("dst_port", "?")),
                str(t.get("state", "?")) + ("" if t.get("offload", True) else " (no offload)"),
                str(tx.get("frames", 0)),
                human_bytes(tx.get("bytes", 0)),
                str(rx.get("frames", 0)),
                human_bytes(rx.get("bytes", 0)),
                str(sum(drops.values())),
                f"{r.get('entries', 0)}/{human_bytes(r.get('bytes', 0))}",
            ]
        )
        if drops:
            details.append(f"drops {name}: {_drop_list(drops)}")
        if r:
            peer = str(r.get("peer", t.get("remote_ip", "?")))
            peers.setdefault(peer, (r, []))[1].append(name)
    if data.get("drops"):
        details.append(f"drops (no tunnel): {_drop_list(data['drops'])}")
    for peer, (r, names) in peers.items():
        if any(r.get(k) for k in ("entries", "peak_bytes", "evictions", "timeouts")):
            details.append(
                f"reassembly from {peer} (tunnels {', '.join(names)}): {_reassembly_text(r)}"
            )
    details.append(f"reassembly: {_reassembly_text(data.get('reassembly') or {})}")
    details.extend(_ovsdb_lines(data.get("ovsdb")))
    return header, rows, details


def _count(frames: int, octets: int) -> str:
    return f"{frames} frame(s) ({human_bytes(octets)})"


def _fastpath_lines(data: ShowData, tunnels: list[Mapping[str, Any]]) -> list[str]:
    """Per underlay: the fast path's state; per tunnel: received frames by path."""
    lines = []
    underlays: list[Mapping[str, Any]] = data.get("underlays") or []  # type: ignore[assignment]
    for u in underlays:
        fp: Mapping[str, Any] = u.get("fastpath") or {}
        sockets = ", ".join(u.get("sockets") or []) or "none"
        head = f"underlay {u.get('name', '?')} (sockets: {sockets}): fast path"
        if fp.get("state") == "on":
            passed = {r: c.get("packets", 0) for r, c in (fp.get("passed") or {}).items()}
            left = _drop_list({r: n for r, n in passed.items() if n}) or "nothing"
            errors = (fp.get("errors") or {}).get("packets", 0)
            lines.append(
                f"{head} on ({fp.get('attach', '?')}, program {fp.get('program_id', '?')}), "
                f"left to Python: {left}" + (f", errors {errors}" if errors else "")
            )
        else:
            lines.append(f"{head} off: {fp.get('reason') or 'not attached'}")
    if any((u.get("fastpath") or {}).get("state") == "on" for u in underlays):
        lines.extend(_by_path("rx", t) for t in tunnels)
    lines.extend(_tx_fastpath_lines(data.get("tx_fastpath"), tunnels))
    return lines


def _tx_fastpath_lines(tx: Mapping[str, Any] | None, tunnels: list[Mapping[str, Any]]) -> list[str]:
    """The transmit fast path's state; per tunnel: sent frames by path."""
    if not tx:
        return []
    if tx.get("state") != "on":
        return [f"transmit fast path off: {tx.get('reason') or 'not loaded'}"]
    passed = {r: c.get("packets", 0) for r, c in (tx.get("passed") or {}).items()}
    left = _drop_list({r: n for r, n in passed.items() if n}) or "nothing"
    errors = (tx.get("errors") or {}).get("packets", 0)
    lines = [
        f"transmit fast path on (program {tx.get('program_id', '?')}, {tx.get('taps', 0)} "
        f"TAP(s)), left to Python: {left}" + (f", errors {errors}" if errors else "")
    ]
    for name, why in sorted((tx.get("not_attached") or {}).items()):
        lines.append(f"transmit fast path not on the TAP of {name}: {why}")
    for name, why in sorted((tx.get("yielding") or {}).items()):
        lines.append(f"transmit fast path: {name} sends in Python while {why}")
    lines.extend(_by_path("tx", t) for t in tunnels)
    return lines


def _by_path(direction: str, t: Mapping[str, Any]) -> str:
    """One tunnel's ``rx`` or ``tx`` frames split by path: fast path, Python path."""
    fast: Mapping[str, Any] = t.get(f"{direction}_fastpath") or {}
    py: Mapping[str, Any] = t.get(f"{direction}_python") or {}
    return (
        f"{direction} {t.get('name', '?')}: fast path "
        f"{_count(fast.get('frames', 0), fast.get('bytes', 0))}, Python path "
        f"{_count(py.get('frames', 0), py.get('bytes', 0))}"
    )


def _ovsdb_lines(ovsdb: Mapping[str, Any] | None) -> list[str]:
    """``sttun up --ovsdb``: the database, its interfaces and why some are not served."""
    if not ovsdb:
        return []
    names = ovsdb.get("interfaces") or []
    tso = ovsdb.get("userspace_tso")
    lines = [
        f"ovsdb {ovsdb.get('remote', '?')}: "
        f"{'connected' if ovsdb.get('connected') else 'not connected'}, "
        f"userspace TSO {'on' if tso else 'off' if tso is not None else '?'}, "
        f"type=stt interfaces: {', '.join(names) if names else 'none'}"
    ]
    for name, msg in sorted((ovsdb.get("errors") or {}).items()):
        lines.append(f"ovs interface {name} not served: {msg}")
    return lines


def format_show_text(data: ShowData, now: float | None = None) -> str:
    """``sttun show`` as plain aligned text (no colour), for pipes and logs."""
    header, rows, details = _show_parts(data, time.time() if now is None else now)
    headings = [c for c, _ in _COLUMNS]
    widths = [max(len(str(x)) for x in col) for col in zip(headings, *rows, strict=False)]
    lines = [header, ""]
    for row in (headings, *rows):
        cells = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, (_, right) in zip(row, widths, _COLUMNS, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    if not rows:
        lines.append("(no tunnels)")
    lines.append("")
    lines.extend(details)
    return "\n".join(lines)


def print_show_rich(data: ShowData) -> None:
    """``sttun show`` as a rich table on the terminal (ImportError without rich)."""
    from rich.console import Console
    from rich.table import Table

    header, rows, details = _show_parts(data, time.time())
    table = Table(title=header, title_justify="left")
    for heading, right in _COLUMNS:
        table.add_column(heading, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for line in details:
        console.print(line, highlight=False)
