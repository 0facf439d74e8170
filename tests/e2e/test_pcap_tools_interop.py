"""Interop of sttun.io.pcap with tcpdump and tshark on real captures in a namespace.

Pings cross a veth pair (198.18.0.1 <-> 198.18.0.2, 2001:db8:0:1::1 <-> ::2) while
tcpdump (Ethernet, and ``-i any`` for Linux cooked SLL / SLL2) and tshark (pcapng)
capture; the reader must return exactly the packets ``tshark -r`` shows: same count,
bytes, original lengths and timestamps.  Then files written by :class:`PcapWriter`
must read back identically in ``tshark -r``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sttun.io.pcap import CaptureError, CaptureReader, PcapWriter, l3_offset
from sttun.tools.capture import Capture
from sttun.tools.topology import Host, TwoHosts
from tests.e2e.sttun_hosts import wait_until
from tests.netns import need_tools

pytestmark = pytest.mark.netns

Frame = tuple[int, bytes, int]  # (ts_ns, bytes, orig_len)


def tshark_frames(path: Path) -> list[Frame]:
    """What tshark sees in a capture file: (timestamp ns, raw bytes, frame.len)."""
    res = subprocess.run(
        ["tshark", "-r", str(path), "-T", "json", "-x"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    frames: list[Frame] = []
    for pkt in json.loads(res.stdout or "[]"):
        layers = pkt["_source"]["layers"]
        frame = layers["frame"]
        sec, _, frac = frame["frame.time_epoch"].partition(".")
        ts = int(sec) * 10**9 + int(frac.ljust(9, "0")[:9])
        frames.append((ts, bytes.fromhex(layers["frame_raw"][0]), int(frame["frame.len"])))
    return frames


def reader_frames(path: Path) -> tuple[list[Frame], set[int]]:
    """What CaptureReader sees: frames and the set of link types."""
    reader = CaptureReader(path, strict=True)
    frames: list[Frame] = []
    linktypes: set[int] = set()
    for ts, lt, data, orig in reader:
        frames.append((ts, bytes(data), orig))
        linktypes.add(lt)
        # every packet captured here is ARP, IPv4 (ping) or IPv6 (ping, ND, MLD)
        found = l3_offset(lt, data)
        assert found is not None, (lt, bytes(data[:32]).hex())
        etype, off = found
        if etype != 0x0806:
            assert (etype, data[off] >> 4) in ((0x0800, 4), (0x86DD, 6)), (lt, etype, off)
    return frames, linktypes


class TsharkCapture:
    """``tshark -w FILE`` (pcapng) in a namespace; ready once the capture has started
    (tshark logs "Capture started" when dumpcap, with the interface open, reports its
    file)."""

    def __init__(self, ns: Host, dev: str, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] = ns.popen(
            ["tshark", "-i", dev, "-w", str(path)], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 30
        while b"Capture started" not in seen:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            chunk = os.read(self.proc.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                self.stop()
                raise RuntimeError(f"tshark did not start: {seen!r}")
            seen += chunk

    def stop(self) -> None:
        """SIGINT, then wait for the file to be complete."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


#: The echo replies the pings of :func:`ping` bring back (IPv4 and IPv6).
REPLIES = "icmp[icmptype] == icmp-echoreply or icmp6[icmp6type] == icmp6-echoreply"
NREPLIES = 12


def _echo_replies(path: Path) -> int:
    """Echo replies in an Ethernet capture file that may still be growing."""
    n = 0
    try:
        with CaptureReader(path) as reader:
            for _ts, lt, data, _orig in reader:
                found = l3_offset(lt, data)
                if found is None:
                    continue
                etype, off = found
                if etype == 0x0800 and data[off + 9] == 1:
                    n += data[off + (data[off] & 0x0F) * 4] == 0
                elif etype == 0x86DD and data[off + 6] == 58:
                    n += data[off + 40] == 129
    except (CaptureError, OSError):
        return 0  # not even the file header yet
    return n


def start_captures(h: TwoHosts, tmp: Path) -> tuple[dict[str, Path], list[Capture], TsharkCapture]:
    a = h.a
    files = {
        "eth": tmp / "x.pcap",
        "ng": tmp / "y.pcapng",
        "sll": tmp / "any.pcap",
        "sll2": tmp / "any2.pcap",
    }
    caps: list[Capture] = []
    try:
        caps.append(Capture(a, h.dev_a, files["eth"], immediate=True).start())
        tshark = TsharkCapture(a, h.dev_a, files["ng"])
        for key, link in (("sll", "LINUX_SLL"), ("sll2", "LINUX_SLL2")):
            caps.append(Capture(a, "any", files[key], link_type=link, immediate=True).start())
    except BaseException:
        for c in caps:
            c.stop(sync=False)
        raise
    return files, caps, tshark


def ping(h: TwoHosts) -> None:
    for size in ("56", "1400"):
        h.a.run(["ping", "-c", "3", "-i", "0.05", "-s", size, "-W", "2", h.ip_b], timeout=30)
        h.a.run(["ping", "-6", "-c", "3", "-i", "0.05", "-s", size, "-W", "2", h.ip6_b], timeout=30)


def test_reader_matches_tshark_and_tshark_reads_writer(
    two_hosts: TwoHosts,
    tmp_path: Path,
) -> None:
    need_tools("tcpdump", "tshark", "ping")
    h = two_hosts
    files, caps, tshark = start_captures(h, tmp_path)
    try:
        ping(h)
        # every file holds the last reply before the captures stop
        for c in caps:
            assert c.wait_for(NREPLIES, REPLIES) == NREPLIES
        wait_until(lambda: _echo_replies(files["ng"]) >= NREPLIES, 30, what="replies in pcapng")
    finally:
        for c in caps:
            c.stop()
        tshark.stop()

    seen: dict[str, tuple[list[Frame], set[int]]] = {}
    for key, path in files.items():
        mine, linktypes = reader_frames(path)
        theirs = tshark_frames(path)
        assert len(mine) >= 12, f"{key}: only {len(mine)} packets captured"
        assert len(mine) == len(theirs), key
        assert mine == theirs, key
        seen[key] = (mine, linktypes)

    assert seen["eth"][1] == {1}
    assert seen["ng"][1] == {1}
    assert seen["sll"][1] == {113}
    assert seen["sll2"][1] == {276}
    assert CaptureReader(files["ng"]).format == "pcapng"

    # Writer -> tshark: Ethernet (us and ns) and SLL2 link type.
    eth_frames = seen["eth"][0]
    out_files: list[tuple[Path, list[Frame], bool]] = []
    for nano in (False, True):
        out = tmp_path / f"written-{'ns' if nano else 'us'}.pcap"
        with PcapWriter(out, nanosecond=nano) as w:
            for ts, data, _orig in eth_frames:
                w.write(ts, memoryview(data))
        out_files.append((out, eth_frames, nano))
    sll2_out = tmp_path / "written-sll2.pcap"
    with PcapWriter(sll2_out, linktype=276, nanosecond=True) as w:
        for ts, data, _orig in seen["sll2"][0]:
            w.write(ts, data)
    out_files.append((sll2_out, seen["sll2"][0], True))

    for out, frames, nano in out_files:
        step = 1 if nano else 1000
        expect = [(ts - ts % step, data, len(data)) for ts, data, _ in frames]
        assert tshark_frames(out) == expect, out.name
        assert reader_frames(out)[0] == expect, out.name
