"""Interop of sttun.io.pcap with tcpdump and tshark on real captures in a namespace.

Pings cross a veth pair (198.18.0.1 <-> 198.18.0.2, 2001:db8:0:1::1 <-> ::2) while
tcpdump (Ethernet, and ``-i any`` for Linux cooked SLL / SLL2) and tshark (pcapng)
capture; the reader must return exactly the packets ``tshark -r`` shows: same count,
bytes, original lengths and timestamps.  Then files written by :class:`PcapWriter`
must read back identically in ``tshark -r``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sttun.io.pcap import CaptureReader, PcapWriter, l3_offset
from tests.netns import Netns, TwoHosts, need_tools, two_hosts  # noqa: F401 - fixture

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


class Tool:
    """A capture program running in a namespace, ready once it said so on stderr."""

    def __init__(self, ns: Netns, argv: list[str], ready: bytes) -> None:
        self.proc: subprocess.Popen[bytes] = ns.popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert self.proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 20  # hang guard only
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            seen += line
            if ready in line or not line:
                break
        if ready not in seen:
            self.proc.kill()
            raise RuntimeError(f"{argv[0]} did not start: {seen!r}")

    def stop(self) -> None:
        """SIGINT, then wait for the file to be complete."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def start_captures(h: TwoHosts, tmp: Path) -> tuple[dict[str, Path], list[Tool]]:
    a = h.a
    files = {
        "eth": tmp / "x.pcap",
        "ng": tmp / "y.pcapng",
        "sll": tmp / "any.pcap",
        "sll2": tmp / "any2.pcap",
    }
    common = ["-n", "-U", "--immediate-mode", "-s", "262144", "-w"]
    specs: list[tuple[list[str], bytes]] = [
        (["tcpdump", "-i", h.dev_a, *common, str(files["eth"])], b"listening on"),
        (["tshark", "-i", h.dev_a, "-w", str(files["ng"])], b"Capturing on"),
        (
            ["tcpdump", "-i", "any", "-y", "LINUX_SLL", *common, str(files["sll"])],
            b"listening on",
        ),
        (
            ["tcpdump", "-i", "any", "-y", "LINUX_SLL2", *common, str(files["sll2"])],
            b"listening on",
        ),
    ]
    tools: list[Tool] = []
    try:
        for argv, ready in specs:
            tools.append(Tool(a, argv, ready))
    except BaseException:
        for t in tools:
            t.stop()
        raise
    return files, tools


def ping(h: TwoHosts) -> None:
    for size in ("56", "1400"):
        h.a.run(["ping", "-c", "3", "-i", "0.05", "-s", size, "-W", "2", h.ip_b], timeout=30)
        h.a.run(["ping", "-6", "-c", "3", "-i", "0.05", "-s", size, "-W", "2", h.ip6_b], timeout=30)


def test_reader_matches_tshark_and_tshark_reads_writer(
    two_hosts: TwoHosts,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    need_tools("tcpdump", "tshark", "ping")
    h = two_hosts
    files, tools = start_captures(h, tmp_path)
    try:
        ping(h)
        time.sleep(0.3)  # let the last replies reach the capture sockets
    finally:
        for t in tools:
            t.stop()

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
