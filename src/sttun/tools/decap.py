"""``sttun decap``: the inner Ethernet frames of an STT capture, as a pcap file.

Reads classic pcap (either byte order, µs or ns) or pcapng (several interfaces;
Ethernet, Linux cooked v1/v2 and raw-IP link types), finds STT segments by TCP
destination port (``--port``, default 7471), checks them (outer IPv4/IPv6 header,
outer 802.1Q/802.1ad tags stepped over, TCP checksum — see
:mod:`sttun.tools.capture_scan` for captures made on a sending host), reassembles
them with the core reassembler on capture time, and writes each inner frame with
the timestamp of the segment that completed it:

* an 802.1Q tag carried in the STT header is put back into the frame;
* a frame sent with the P flag (inner checksum partial, possibly a TSO
  super-frame with an MSS) is written as one frame with its inner TCP/UDP
  checksum completed, pseudo-header recomputed from the inner headers, so
  Wireshark shows it as correct (``--keep-partial`` writes the bytes as carried);
* a frame a kernel transmit program encapsulated, captured before the NIC
  finished its inner checksum (the field holds the pseudo-header seed, the outer
  checksum verifies once it is finished; counted as ``inner_partial`` under
  ``checksums``), is written with the inner checksum finished (``--keep-partial``:
  as carried);
* the inner frame is otherwise written exactly as carried: no DSCP or ECN
  changes (a receiving endpoint would apply those, a capture tool does not).

``-o OUT`` receives every frame (or those of ``--context-id K``, repeatable);
``--split-by-context DIR`` writes ``DIR/ctx-<hex id>.pcap`` per context id.  A
summary goes to stdout (a table, or JSON with ``--json``; to stderr if ``-o -``
sends the pcap to stdout).  Exit status 0, or 2 with one line
``sttun decap: FILE: byte N: what`` when the input is not a readable capture.
Ctrl-C stops early: the output files are valid and hold every frame written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import struct
import sys
from typing import IO, TYPE_CHECKING, Any

from sttun.errors import DecodeError
from sttun.tools.report import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    checksum_note,
    end_notes,
    fail,
    human_bytes,
    open_error,
    print_json,
    print_tables,
)

if TYPE_CHECKING:
    from sttun.io.pcap import PcapWriter
    from sttun.tools.checksum_ahead import ChecksumAhead
    from sttun.wire.vnet import VnetHdr

TOOL = "decap"
_CTX = struct.Struct("!Q")


def split_name(context_id: int) -> str:
    """File name used by ``--split-by-context`` for one context id."""
    return f"ctx-{context_id:x}.pcap"


def complete_partial(inner: Any, vnet: VnetHdr) -> bytearray:
    """A copy of ``inner`` with the partial L4 checksum described by ``vnet`` finished.

    The pseudo-header is recomputed from the inner IPv4/IPv6 header (the value in
    the field is not trusted: senders differ on whether it includes the length,
    protocol.md §4.2), and the sum covers the L4 bytes up to the IP packet's end,
    not Ethernet padding: :func:`sttun.core.softpath.finish_checksum` with
    ``pseudo_from_headers``.  A field outside the frame leaves the bytes alone.
    """
    from sttun.core.softpath import finish_checksum

    buf = bytearray(inner)
    with contextlib.suppress(DecodeError):
        finish_checksum(buf, vnet.csum_start, vnet.csum_offset, pseudo_from_headers=True)
    return buf


class _Decap:
    """Per-frame work: STT header, filter, counters, writers."""

    def __init__(
        self,
        writer: PcapWriter | None,
        split_dir: str | None,
        contexts: set[int] | None,
        keep_partial: bool,
        nanosecond: bool,
        drops: Any,
    ) -> None:
        self._decapsulator: Any = None  # made on the first frame that needs it
        self.writer = writer
        self.split_dir = split_dir
        self.split: dict[int, PcapWriter] = {}
        self.contexts = contexts
        self.keep_partial = keep_partial
        self.nanosecond = nanosecond
        self.drops = drops
        self.per_context: dict[int, list[int]] = {}  # ctx -> [frames, bytes]
        self.filtered = 0
        self.completed = 0
        self.written = 0
        self.bytes = 0

    @property
    def decapsulator(self) -> Any:
        """The core decapsulator, without DSCP/ECN changes (imported on first use)."""
        if self._decapsulator is None:
            from sttun.core.decap import Decapsulator, DscpModel

            self._decapsulator = Decapsulator(dscp_model=DscpModel.PIPE)
        return self._decapsulator

    def on_frame(self, ts: int, src: bytes, dst: bytes, frame: Any) -> None:
        """Decapsulate one complete STT frame, count it, write it where it belongs."""
        n = len(frame)
        # Fast path for the plain case (version 0, P clear, no VLAN): what
        # Decapsulator.decap returns for it, without building objects.
        if n >= 32 and not frame[0] and not frame[1] & 2 and not frame[6] and not frame[7]:
            ctx = _CTX.unpack_from(frame, 8)[0]
            inner = frame[18:]
        else:
            from sttun.core.drops import DropReason

            result = self.decapsulator.decap(frame, 0, False)
            if isinstance(result, DropReason):
                self.drops.count(result, n)
                return
            ctx = result.header.context_id
            inner = result.inner
            if result.vnet.flags & 1 and not self.keep_partial:  # NEEDS_CSUM
                inner = complete_partial(inner, result.vnet)
                self.completed += 1
        stats = self.per_context.get(ctx)
        if stats is None:
            stats = self.per_context[ctx] = [0, 0]
        stats[0] += 1
        stats[1] += len(inner)
        if self.contexts is not None and ctx not in self.contexts:
            self.filtered += 1
            return
        self.written += 1
        self.bytes += len(inner)
        if self.writer is not None:
            self.writer.write(ts, inner)
        if self.split_dir is not None:
            w = self.split.get(ctx)
            if w is None:
                w = self._open_split(ctx)
            w.write(ts, inner)

    def _open_split(self, ctx: int) -> PcapWriter:
        from sttun.io.pcap import PcapWriter

        assert self.split_dir is not None
        w = PcapWriter(os.path.join(self.split_dir, split_name(ctx)), nanosecond=self.nanosecond)
        self.split[ctx] = w
        return w

    def close(self) -> None:
        """Flush and close every output (also after Ctrl-C or an input error)."""
        for w in (self.writer, *self.split.values()):
            if w is not None:
                w.close()


def main(args: argparse.Namespace) -> int:
    """Run ``sttun decap`` with the parsed ``args``; returns the exit status."""
    from sttun.tools.checksum_ahead import verifier_for

    output: str | None = getattr(args, "output", None)
    split_dir: str | None = getattr(args, "split_by_context", None)
    ids = getattr(args, "context_id", None)
    contexts = set(ids) if ids else None
    ports = getattr(args, "port", None) or [7471]
    verify = bool(getattr(args, "verify_checksum", True))
    keep_partial = bool(getattr(args, "keep_partial", False))

    jobs = getattr(args, "jobs", None)
    with verifier_for(args.input, ports, verify=verify, jobs=jobs) as ahead:
        return _run(args, output, split_dir, contexts, ports, verify, keep_partial, ahead)


def _run(
    args: argparse.Namespace,
    output: str | None,
    split_dir: str | None,
    contexts: set[int] | None,
    ports: list[int],
    verify: bool,
    keep_partial: bool,
    ahead: ChecksumAhead | None,
) -> int:
    """Read, reassemble, write and report (``main`` after the verifier is started)."""
    from sttun.core.drops import DropCounters
    from sttun.errors import CaptureError
    from sttun.io.pcap import CaptureReader, PcapWriter
    from sttun.tools.capture_scan import scan
    from sttun.tools.progress import open_input

    as_json = bool(getattr(args, "json", False))
    try:
        infile = open_input(args.input, label="decap")
    except OSError as e:
        return fail(TOOL, open_error(args.input, e))
    with infile:
        try:
            reader = CaptureReader(infile)
        except CaptureError as e:
            return fail(TOOL, str(e))
        nanosecond = reader.nanosecond or reader.format == "pcapng"
        writer = None
        if output is not None:
            target: Any = sys.stdout.buffer if output == "-" else output
            try:
                writer = PcapWriter(target, nanosecond=nanosecond)
            except OSError as e:
                return fail(TOOL, open_error(output, e))
        if split_dir is not None:
            try:
                os.makedirs(split_dir, exist_ok=True)
            except OSError as e:
                if writer is not None:
                    writer.close()
                return fail(TOOL, open_error(split_dir, e))
        drops = DropCounters()
        sink = _Decap(writer, split_dir, contexts, keep_partial, nanosecond, drops)
        try:
            result = scan(
                reader,
                sink.on_frame,
                drops=drops,
                ports=ports,
                verify=verify,
                ahead=ahead,
                keep_partial=keep_partial,
            )
        except CaptureError as e:
            return fail(TOOL, str(e))
        except OSError as e:  # an output file could not be written
            return fail(TOOL, f"{e.filename or output}: cannot write: {e.strerror or e}")
        finally:
            sink.close()

    summary: dict[str, Any] = {
        "input": args.input,
        "format": reader.format,
        **result.as_dict(),
        "written": sink.written,
        "bytes": sink.bytes,
        "filtered_out": sink.filtered,
        "partial_checksums_completed": sink.completed,
        "contexts": [
            {"context_id": ctx, "hex": f"{ctx:#x}", "frames": f, "bytes": b}
            for ctx, (f, b) in sorted(sink.per_context.items())
        ],
        "drops": drops.as_dict(),
        "outputs": _outputs(output, split_dir, sink),
    }
    stream: IO[str] = sys.stderr if output == "-" else sys.stdout
    if as_json:
        print_json(summary, stream)
    else:
        print_summary(summary, stream)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _outputs(output: str | None, split_dir: str | None, sink: _Decap) -> list[str]:
    files = [] if output is None else [output]
    if split_dir is not None:
        files += [os.path.join(split_dir, split_name(c)) for c in sorted(sink.split)]
    return files


def print_summary(s: dict[str, Any], stream: IO[str]) -> None:
    """The summary as tables: frames per context id, then drops, then notes."""
    rows = [
        [c["hex"], str(c["frames"]), str(c["bytes"]), human_bytes(c["bytes"])]
        for c in s["contexts"]
    ]
    drop_rows = [[r, str(n)] for r, n in sorted(s["drops"].items(), key=lambda i: -i[1])]
    skipped = sum(s["skipped"].values())
    ck = s["checksums"]
    notes = [
        f"{s['input']}: {s['format']}, {s['packets']} packets, {s['segments']} STT segments"
        f" ({skipped} other packets skipped), {s['frames']} frames reassembled",
        f"written: {s['written']} frames, {s['bytes']} bytes"
        + (
            f" ({s['filtered_out']} frames of other context ids left out)"
            if s["filtered_out"]
            else ""
        )
        + (f" -> {', '.join(s['outputs'])}" if s["outputs"] else ""),
        checksum_note(ck),
    ]
    if s["partial_checksums_completed"]:
        notes.append(f"inner checksums completed (P flag): {s['partial_checksums_completed']}")
    notes += end_notes(s, "the output holds the frames written so far")
    print_tables(
        [
            ("frames per context id", ["CONTEXT", "FRAMES", "BYTES", ""], rows, {1, 2, 3}),
            ("drops", ["REASON", "COUNT"], drop_rows, {1}),
        ],
        notes,
        stream,
    )


__all__ = ["complete_partial", "main", "print_summary", "split_name"]
