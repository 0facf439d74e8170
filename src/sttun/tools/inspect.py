"""``sttun inspect``: what is in an STT capture, per tunnel and context id.

One row per (outer source, outer destination, context id): frames and inner bytes,
segments, errors (segments refused and frames dropped, by reason in ``--json``),
the STT flags seen (``C`` checksum verified, ``P`` partial, ``V`` inner IPv4,
``T`` inner TCP, ``-`` none), MSS values, VLAN ids (``*`` marks a TCI without the V
bit), and how the TCP source ports spread (distinct count, min–max).  Then the drops
by reason, and notes: packets skipped as non-STT traffic, checksum results (see
:class:`~sttun.tools.capture_scan.ScanResult`: verified, offloaded, inner partial,
unchecked), incomplete frames at the end, a cut last record.

The scan is the one ``sttun decap`` does (:mod:`sttun.tools.capture_scan`), segment
by segment: a segment is attributed to a context id through its frame id (the
offset-0 segment carries the STT header).  Segments whose frame never showed its
first segment go to the row with context id ``?``.  Frame-level reassembly drops
(timeouts, evictions, incomplete at the end) appear only in the drops section.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sttun.tools.report import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    checksum_note,
    context_text,
    end_notes,
    fail,
    human_bytes,
    open_error,
    print_json,
    print_tables,
)

if TYPE_CHECKING:
    from sttun.tools.checksum_ahead import ChecksumAhead

TOOL = "inspect"
_CTX = struct.Struct("!Q")
#: How many frame ids (per capture) remember their context id.
FRAME_ID_MEMORY = 65536
#: At most this many distinct MSS / VLAN values are listed per row.
MAX_LISTED = 16
_FLAG_NAMES = ((0x01, "C"), (0x02, "P"), (0x04, "V"), (0x08, "T"))


class Row:
    """Counters of one (outer src, outer dst, context id)."""

    __slots__ = ("bytes", "errors", "flags", "frames", "mss", "segments", "sports", "vlans")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.segments = 0
        self.errors: dict[str, int] = {}
        self.flags: set[str] = set()
        self.mss: set[int] = set()
        self.vlans: set[str] = set()
        self.sports: set[int] = set()

    def error(self, reason: str) -> None:
        """Count one refused segment or dropped frame."""
        self.errors[reason] = self.errors.get(reason, 0) + 1


class Inspector:
    """Collects the rows from :func:`~sttun.tools.capture_scan.scan` callbacks."""

    def __init__(self, drops: Any) -> None:
        self.rows: dict[tuple[bytes, bytes, int | None], Row] = {}
        self.drops = drops
        self._ctx_of: OrderedDict[tuple[bytes, bytes, int], int] = OrderedDict()
        # segments whose frame's context id is not known yet: key -> [(sport, reason)]
        self._pending: OrderedDict[tuple[bytes, bytes, int], list[tuple[int, str | None]]] = (
            OrderedDict()
        )
        self._decapsulator: Any = None

    def row(self, src: bytes, dst: bytes, ctx: int | None) -> Row:
        """The row of ``(src, dst, ctx)``, created if new."""
        key = (src, dst, ctx)
        r = self.rows.get(key)
        if r is None:
            r = self.rows[key] = Row()
        return r

    def _account(self, row: Row, sport: int, reason: str | None) -> None:
        row.segments += 1
        row.sports.add(sport)
        if reason is not None:
            row.error(reason)

    def on_segment(
        self, src: bytes, dst: bytes, sport: int, ack: int, seq: int, payload: Any, reason: Any
    ) -> None:
        """Attribute one segment to its row (deferred until its context id is known)."""
        key = (src, dst, ack)
        why = None if reason is None else reason.value
        if not seq & 0xFFFF and len(payload) >= 16:
            ctx = _CTX.unpack_from(payload, 8)[0]
            self._ctx_of[key] = ctx
            self._ctx_of.move_to_end(key)
            if len(self._ctx_of) > FRAME_ID_MEMORY:
                self._ctx_of.popitem(last=False)
            row = self.row(src, dst, ctx)
            self._account(row, sport, why)
            for p_sport, p_why in self._pending.pop(key, ()):
                self._account(row, p_sport, p_why)
            return
        known = self._ctx_of.get(key)
        if known is not None:
            self._account(self.row(src, dst, known), sport, why)
            return
        waiting = self._pending.get(key)
        if waiting is None:
            waiting = self._pending[key] = []
            if len(self._pending) > FRAME_ID_MEMORY:
                old_key, old = self._pending.popitem(last=False)
                self._give_up(old_key, old)
        waiting.append((sport, why))

    def _give_up(self, key: tuple[bytes, bytes, int], segs: list[tuple[int, str | None]]) -> None:
        row = self.row(key[0], key[1], None)
        for sport, why in segs:
            self._account(row, sport, why)

    def on_frame(self, ts: int, src: bytes, dst: bytes, frame: Any) -> None:
        """Count one complete STT frame under its context id."""
        from sttun.core.drops import DropReason

        if self._decapsulator is None:
            from sttun.core.decap import Decapsulator, DscpModel

            self._decapsulator = Decapsulator(dscp_model=DscpModel.PIPE)
        n = len(frame)
        ctx = _CTX.unpack_from(frame, 8)[0] if n >= 16 else None
        row = self.row(src, dst, ctx)
        result = self._decapsulator.decap(frame, 0, False)
        if isinstance(result, DropReason):
            self.drops.count(result, n)
            row.error(result.value)
            return
        h = result.header
        row.frames += 1
        row.bytes += len(result.inner)
        names = [name for bit, name in _FLAG_NAMES if h.flags & bit]
        row.flags.update(names or ["-"])
        if h.mss and h.flags & 0x02 and len(row.mss) < MAX_LISTED:
            row.mss.add(h.mss)
        if h.vlan_tci and len(row.vlans) < MAX_LISTED:
            row.vlans.add(f"{h.vlan_tci & 0x0FFF}" + ("" if h.vlan_tci & 0x1000 else "*"))

    def finish(self) -> None:
        """Put segments of frames never seen from their first segment in the ``?`` rows."""
        while self._pending:
            key, segs = self._pending.popitem(last=False)
            self._give_up(key, segs)

    def report_rows(self) -> list[dict[str, Any]]:
        """The rows, JSON-ready, sorted by addresses and context id."""
        from sttun.wire.ip import ip_text

        out = []
        for (src, dst, ctx), r in sorted(
            self.rows.items(), key=lambda i: (i[0][0], i[0][1], -1 if i[0][2] is None else i[0][2])
        ):
            out.append(
                {
                    "src": ip_text(src),
                    "dst": ip_text(dst),
                    "context_id": ctx,
                    "hex": context_text(ctx),
                    "frames": r.frames,
                    "bytes": r.bytes,
                    "segments": r.segments,
                    "errors": sum(r.errors.values()),
                    "error_reasons": dict(sorted(r.errors.items())),
                    "flags": sorted(r.flags, key="CPVT-".index),
                    "mss": sorted(r.mss),
                    "vlans": sorted(r.vlans, key=lambda v: int(v.rstrip("*"))),
                    "sports": {
                        "count": len(r.sports),
                        "min": min(r.sports) if r.sports else None,
                        "max": max(r.sports) if r.sports else None,
                    },
                }
            )
        return out


def main(args: argparse.Namespace) -> int:
    """Run ``sttun inspect`` with the parsed ``args``; returns the exit status."""
    from sttun.tools.checksum_ahead import verifier_for

    ports = getattr(args, "port", None) or [7471]
    verify = bool(getattr(args, "verify_checksum", True))
    jobs = getattr(args, "jobs", None)
    with verifier_for(args.input, ports, verify=verify, jobs=jobs) as ahead:
        return _run(args, ports, verify, ahead)


def _run(
    args: argparse.Namespace, ports: list[int], verify: bool, ahead: ChecksumAhead | None
) -> int:
    """Read, inspect and report (``main`` after the verifier is started)."""
    from sttun.core.drops import DropCounters
    from sttun.errors import CaptureError
    from sttun.io.pcap import CaptureReader
    from sttun.tools.capture_scan import scan
    from sttun.tools.progress import open_input

    try:
        infile = open_input(args.input, label="inspect")
    except OSError as e:
        return fail(TOOL, open_error(args.input, e))
    with infile:
        try:
            reader = CaptureReader(infile)
        except CaptureError as e:
            return fail(TOOL, str(e))
        drops = DropCounters()
        insp = Inspector(drops)
        try:
            result = scan(
                reader,
                insp.on_frame,
                drops=drops,
                ports=ports,
                verify=verify,
                on_segment=insp.on_segment,
                ahead=ahead,
            )
        except CaptureError as e:
            return fail(TOOL, str(e))
    insp.finish()
    report: dict[str, Any] = {
        "input": args.input,
        "format": reader.format,
        **result.as_dict(),
        "rows": insp.report_rows(),
        "drops": drops.as_dict(),
    }
    if getattr(args, "json", False):
        print_json(report)
    else:
        print_report(report)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _list(values: list[Any]) -> str:
    return ",".join(str(v) for v in values) if values else "-"


def print_report(rep: dict[str, Any], stream: Any = None) -> None:
    """The report as tables (rich on a terminal, plain text otherwise)."""
    out = sys.stdout if stream is None else stream
    rows = []
    for r in rep["rows"]:
        sp = r["sports"]
        spread = f"{sp['count']} ({sp['min']}-{sp['max']})" if sp["count"] else "-"
        rows.append(
            [
                r["src"],
                r["dst"],
                r["hex"],
                str(r["frames"]),
                human_bytes(r["bytes"]),
                str(r["segments"]),
                str(r["errors"]),
                "".join(r["flags"]) or "-",
                _list(r["mss"]),
                _list(r["vlans"]),
                spread,
            ]
        )
    headings = ["SRC", "DST", "CONTEXT", "FRAMES", "BYTES", "SEGMENTS", "ERRORS", "FLAGS", "MSS",
                "VLAN", "SPORTS"]  # fmt: skip
    drop_rows = [[r, str(n)] for r, n in sorted(rep["drops"].items(), key=lambda i: -i[1])]
    skipped = rep["skipped"]
    ck = rep["checksums"]
    notes = [
        f"{rep['input']}: {rep['format']}, {rep['packets']} packets, {rep['segments']} STT"
        f" segments, {rep['frames']} frames; skipped: {skipped['not_ip']} not IP,"
        f" {skipped['not_tcp']} not TCP, {skipped['other_port']} other ports",
        checksum_note(ck),
    ]
    notes += end_notes(rep, "the report covers the packets read so far")
    print_tables(
        [
            ("STT traffic", headings, rows, {3, 4, 5, 6}),
            ("drops", ["REASON", "COUNT"], drop_rows, {1}),
        ],
        notes,
        out,
    )
