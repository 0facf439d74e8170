"""``sttun encap``: wrap every Ethernet frame of a capture in STT.

Each frame of ``IN`` becomes one STT frame, cut into software segments that fit
``--mtu`` (outer IP MTU, default 1500) with complete outer IP and TCP checksums,
ACK on every segment and PSH on the last, exactly as :class:`sttun.core.encap.Encapsulator`
sends them without offloads.  Every segment gets an outer Ethernet header with the
fixed, locally administered addresses :data:`OUTER_SRC_MAC` → :data:`OUTER_DST_MAC`,
so the file can be replayed (``tcpreplay``) or opened in Wireshark/tshark
(``-o ip.try_heuristic_first:TRUE`` to see STT).  Segments carry the timestamp of
their inner frame.  Frame ids (ACK) count up from 1, so a run is reproducible.

An outermost 802.1Q tag of an inner frame travels in the STT header (V set, DEI
cleared; protocol.md §5), as a sender puts it there.  Frames that cannot be
encapsulated (shorter than an Ethernet header, or too long for one STT frame) are
counted and reported; they do not stop the run.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from sttun.tools.report import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    fail,
    open_error,
    print_json,
)

TOOL = "encap"
#: Outer Ethernet source address of every segment written.
OUTER_SRC_MAC = bytes.fromhex("020000000001")
#: Outer Ethernet destination address of every segment written.
OUTER_DST_MAC = bytes.fromhex("020000000002")
#: First frame id (TCP ACK field) used.
FIRST_FRAME_ID = 1


def _address(text: str, flag: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not an IPv4 or IPv6 address") from None


def main(args: argparse.Namespace) -> int:
    """Run ``sttun encap`` with the parsed ``args``; returns the exit status."""
    from sttun.core.encap import MIN_UNDERLAY_MTU, Encapsulator
    from sttun.errors import CaptureError
    from sttun.io.pcap import LINKTYPE_ETHERNET, CaptureReader, PcapWriter
    from sttun.tools.progress import open_input
    from sttun.wire.ether import ETH_P_IP, ETH_P_IPV6
    from sttun.wire.stt import STT_PORT

    try:
        src = _address(args.src, "--src")
        dst = _address(args.dst, "--dst")
    except ValueError as e:
        return fail(TOOL, str(e))
    if src.version != dst.version:
        return fail(TOOL, f"--src {src} and --dst {dst} are not of the same address family")
    ipv6 = bool(getattr(args, "ipv6", False))
    if ipv6 != (src.version == 6):
        want = "IPv6" if ipv6 else "IPv4 (add --ipv6 for IPv6 outer headers)"
        return fail(TOOL, f"--src {src} / --dst {dst}: expected {want} addresses")
    mtu = int(getattr(args, "mtu", 1500))
    if mtu < MIN_UNDERLAY_MTU:
        return fail(TOOL, f"--mtu {mtu}: must be at least {MIN_UNDERLAY_MTU}")
    sport = getattr(args, "sport", None)
    ethertype = (ETH_P_IPV6 if ipv6 else ETH_P_IP).to_bytes(2, "big")
    enc = Encapsulator(
        src.packed,
        dst.packed,
        args.context_id,
        dst_port=int(getattr(args, "dst_port", STT_PORT)),
        underlay_mtu=mtu,
        l2=OUTER_DST_MAC + OUTER_SRC_MAC + ethertype,
        first_frame_id=FIRST_FRAME_ID,
        fixed_sport=sport,
    )

    try:
        infile = open_input(args.input, label="encap")
    except OSError as e:
        return fail(TOOL, open_error(args.input, e))
    frames_in = 0
    cut_frames = 0
    interrupted = False
    with infile:
        try:
            reader = CaptureReader(infile, linktypes={LINKTYPE_ETHERNET})
        except CaptureError as e:
            return fail(TOOL, str(e))
        nanosecond = reader.nanosecond or reader.format == "pcapng"
        out_target = sys.stdout.buffer if args.output == "-" else args.output
        try:
            writer = PcapWriter(out_target, nanosecond=nanosecond)
        except OSError as e:
            return fail(TOOL, open_error(args.output, e))
        with writer:
            write = writer.write
            join = b"".join
            encap = enc.encap
            try:
                for ts, _lt, data, orig in reader:
                    frames_in += 1
                    if orig > len(data):
                        cut_frames += 1
                    for parts in encap(data, None, gso=False):
                        write(ts, join(parts))
            except CaptureError as e:
                return fail(TOOL, str(e))
            except KeyboardInterrupt:
                interrupted = True
        truncated = reader.truncated

    summary = {
        "input": args.input,
        "output": args.output,
        "frames_in": frames_in,
        "frames": enc.frames,
        "bytes": enc.bytes,
        "segments": enc.segments,
        "context_id": args.context_id,
        "drops": enc.drops.as_dict(),
        "frames_cut_by_snaplen": cut_frames,
        "truncated": None if truncated is None else str(truncated),
        "interrupted": interrupted,
    }
    stream = sys.stderr if args.output == "-" or not getattr(args, "json", False) else sys.stdout
    if getattr(args, "json", False):
        print_json(summary, stream)
    else:
        _print_summary(summary)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def _print_summary(s: dict[str, object]) -> None:
    """One or two lines on stderr: what was written, what was skipped."""
    line = (
        f"sttun encap: {s['frames']} frame(s), {s['bytes']} bytes -> {s['segments']} "
        f"segment(s) in {s['output']}"
    )
    drops = s["drops"]
    assert isinstance(drops, dict)
    notes = []
    if drops:
        notes.append("skipped " + ", ".join(f"{n} {r}" for r, n in drops.items()))
    if s["frames_cut_by_snaplen"]:
        notes.append(f"{s['frames_cut_by_snaplen']} frame(s) were cut by the input's snaplen")
    if s["truncated"]:
        notes.append(f"input ends in a cut record: {s['truncated']}")
    if s["interrupted"]:
        notes.append("interrupted: the output holds the segments written so far")
    print(line, file=sys.stderr)
    for note in notes:
        print(f"sttun encap: {note}", file=sys.stderr)
