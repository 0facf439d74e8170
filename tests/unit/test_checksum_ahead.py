"""Checksums verified in a second process (``sttun decap -j 2``) change nothing reported.

A capture above the verifier's size floor mixes good segments with bad checksums
at record numbers the verifier checks and at ones the scan keeps for itself,
offloaded packets (a sending host's partial checksums, a GSO super-packet),
kernel-encapsulated frames whose inner checksum is still the seed (accepted, and
broken ones that are not), IPv6, an 802.1Q-tagged outer header and traffic that is
not STT.  ``-j 1`` and ``-j 2``
must give the same summary and byte-identical output; the verifier must have
covered the file; a verifier that dies, or a file it cannot read to the end, leaves
the rest to the scan.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path
from typing import Any

import pytest
from tests.unit.test_tools_capture_seed import broken_segments, kind_segments
from tests.unit.test_tools_decap import (
    _bench_offline,
    inner_udp,
    run,
    segment,
    segments_of,
    stt_header,
)

from sttun.core.drops import DropCounters
from sttun.io.pcap import CaptureReader, PcapWriter
from sttun.tools import checksum_ahead
from sttun.tools.capture_scan import ScanResult, scan
from sttun.tools.checksum_ahead import MIN_FILE_SIZE, PERIOD, ChecksumAhead

#: Record numbers (1-based) whose TCP checksum is broken: some the scan checks
#: itself (multiples of PERIOD), some the verifier checks, some in a row.
BAD_RECORDS = (PERIOD, 2 * PERIOD, 3, 5, 6, 7, 1001, 1002, 1003, 2 * PERIOD * 100, 2501)


#: Whole-frame segments with the inner checksum seed (accepted as ``inner_partial``)
#: and ones that must stay bad checksums.
SEEDED = kind_segments()[0]
BROKEN_SEEDED = broken_segments()


def _corrupt(packet: bytes) -> bytes:
    """The packet with its (IPv4, untagged) TCP checksum field changed."""
    b = bytearray(packet)
    b[14 + 20 + 16] ^= 0x5A
    return bytes(b)


def _extras() -> list[bytes]:
    """Packets of every other kind, appended after the benchmark's segments."""
    frame = stt_header(9) + inner_udp(3000)
    vlan_l2 = bytes.fromhex("020000000002020000000001") + b"\x81\x00\x00\x07\x08\x00"
    return [
        *segments_of(frame, partial=True, ack=101),  # a sending host's capture
        segment(frame, length=len(frame), ack=102, corrupt=True),  # GSO super-packet
        *segments_of(frame, ack=103, src="2001:db8:0:1::1", dst="2001:db8:0:1::2"),
        *segments_of(frame, ack=104, l2=vlan_l2),
        segment(frame[:1000], length=1000, ack=105, corrupt=True, l2=vlan_l2),
        segment(b"x" * 100, length=100, ack=106, dport=80),  # not STT
        bytes(60),  # not IP
        # kernel-encapsulated, inner checksum left partial: records either process checks
        *SEEDED,
        *BROKEN_SEEDED,
    ]


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A capture just above the verifier's floor, with bad and odd packets."""
    tmp = tmp_path_factory.mktemp("ahead")
    plain = tmp / "plain.pcap"
    segments = MIN_FILE_SIZE // 1500 + 200
    _bench_offline().build_mixed_capture(plain, segments, seed=3)
    with CaptureReader(plain, strict=True) as r:
        records = [(ts, bytes(d)) for ts, _lt, d, _o in r]
    path = tmp / "in.pcap"
    with PcapWriter(path, nanosecond=True) as w:
        for n, (ts, data) in enumerate(records, start=1):
            w.write(ts, _corrupt(data) if n in BAD_RECORDS else data)
        for data in _extras():
            ts += 1000
            w.write(ts, data)
    assert path.stat().st_size >= MIN_FILE_SIZE
    return path


def _decap(cap: Path, out: Path, jobs: int) -> dict[str, Any]:
    p = run("decap", cap, "-o", out, "--json", "-j", str(jobs))
    assert p.returncode == 0, p.stderr
    summary: dict[str, Any] = json.loads(p.stdout)
    summary.pop("outputs")
    return summary


def test_two_processes_report_and_write_what_one_does(capture: Path, tmp_path: Path) -> None:
    one = _decap(capture, tmp_path / "one.pcap", 1)
    two = _decap(capture, tmp_path / "two.pcap", 2)
    assert two == one
    assert (tmp_path / "two.pcap").read_bytes() == (tmp_path / "one.pcap").read_bytes()
    # the capture's bad checksums were seen as such, the offloaded ones and those
    # with the inner checksum left partial too
    assert one["drops"]["bad_tcp_checksum"] == len(BAD_RECORDS) + 1 + len(BROKEN_SEEDED)
    assert one["checksums"]["offloaded"] == 4
    assert one["checksums"]["inner_partial"] == len(SEEDED)


def test_inspect_reports_the_same_with_two_processes(capture: Path) -> None:
    reports = []
    for jobs in ("1", "2"):
        p = run("inspect", capture, "--json", "-j", jobs)
        assert p.returncode == 0, p.stderr
        reports.append(json.loads(p.stdout))
    assert reports[1] == reports[0]
    assert reports[0]["drops"]["bad_tcp_checksum"] == len(BAD_RECORDS) + 1 + len(BROKEN_SEEDED)
    assert reports[0]["checksums"]["inner_partial"] == len(SEEDED)


def _scan(cap: Path, ahead: ChecksumAhead | None) -> tuple[dict[str, object], dict[str, int]]:
    drops = DropCounters()
    frames: list[bytes] = []
    with CaptureReader(cap) as reader:
        res: ScanResult = scan(
            reader, lambda _t, _s, _d, f: frames.append(bytes(f)), drops=drops, ahead=ahead
        )
    return {**res.as_dict(), "frames_seen": len(frames), "hash": hash(tuple(frames))}, (
        drops.as_dict()
    )


def test_verifier_covers_the_file(capture: Path) -> None:
    alone = _scan(capture, None)
    ahead = ChecksumAhead.start(str(capture), (7471,))
    assert ahead is not None
    try:
        assert _scan(capture, ahead) == alone
        packets = alone[0]["packets"]
        assert ahead.done and ahead.upto == packets
        assert not ahead.failed  # every failure it reported was looked at
    finally:
        ahead.close()


def test_verifier_killed_the_scan_checks_the_rest(capture: Path) -> None:
    alone = _scan(capture, None)
    ahead = ChecksumAhead.start(str(capture), (7471,))
    assert ahead is not None
    os.kill(ahead.pid, signal.SIGKILL)
    try:
        assert _scan(capture, ahead) == alone
        assert ahead.done
    finally:
        ahead.close()


def test_broken_record_same_error_and_no_verifier_left(capture: Path, tmp_path: Path) -> None:
    data = bytearray(capture.read_bytes())
    # the 2000th record's length field (classic pcap: 24-byte file header, 16-byte
    # record headers) set far past any snaplen
    pos = 24
    for _ in range(1999):
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
    struct.pack_into("<II", data, pos + 8, 0x7FFFFFFF, 0x7FFFFFFF)
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(bytes(data))
    results = [run("decap", bad, "-o", tmp_path / f"o{j}.pcap", "-j", str(j)) for j in (1, 2)]
    assert [p.returncode for p in results] == [2, 2]
    assert results[0].stderr == results[1].stderr
    assert "record length 2147483647 exceeds" in results[1].stderr
    assert _no_process_reading("bad.pcap")


def _no_process_reading(name: str) -> bool:
    """No decap process (a verifier left behind) still has ``name`` on its command line."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"decap" in cmdline and name.encode() in cmdline:
            return False
    return True


def test_not_started_for_stdin_small_files_or_pipes(tmp_path: Path) -> None:
    small = tmp_path / "small.pcap"
    with PcapWriter(small) as w:
        w.write(0, segment(b"x" * 100, length=100))
    assert ChecksumAhead.start("-", (7471,)) is None
    assert ChecksumAhead.start(str(small), (7471,)) is None
    assert ChecksumAhead.start(str(tmp_path / "missing.pcap"), (7471,)) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert ChecksumAhead.start(str(fifo), (7471,)) is None


def test_default_jobs_follows_the_cpus_we_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert checksum_ahead.default_jobs() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    assert checksum_ahead.default_jobs() == 2
