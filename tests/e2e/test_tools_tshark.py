"""The capture tools against tshark and tcpdump.

* ``sttun encap`` output decoded by ``tshark -o ip.try_heuristic_first:TRUE``: the
  right context ids and frame lengths; every TCP checksum good
  (``tcp.checksum.status`` 1 with ``-o tcp.check_checksum:TRUE``).
* ``sttun decap`` output opened by tshark shows the inner protocols.
* Real STT traffic: an encap pcap replayed with an AF_PACKET socket from one
  namespace over a veth pair (underlay 198.18.0.0/15), captured on the peer by
  tcpdump (pcap) and ``tshark -w`` (pcapng); ``sttun decap`` of either capture gives
  back the original inner frames.
"""

from __future__ import annotations

import ipaddress
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from sttun.io.pcap import CaptureError, CaptureReader
from sttun.tools.capture import Capture
from sttun.tools.topology import TwoHosts
from sttun.tools.wire_check import TSHARK_CHECKSUM_FIELDS, tshark_checksum_verdict
from sttun.wire.checksum import checksum, ones_sum
from tests.e2e.sttun_hosts import wait_until
from tests.unit.test_tools_decap import decap_json, frames_of, inner_udp, run, write_pcap

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")

SIZES = [60, 1000, 1514, 3000, 20000, 64000]


def tshark_fields(path: Path, *args: str) -> list[list[str]]:
    res = subprocess.run(["tshark", "-r", str(path), *args], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return [line.split("\t") for line in res.stdout.splitlines()]


def make_inner(tmp: Path) -> Path:
    return write_pcap(tmp / "inner.pcap", [inner_udp(n, n & 0xFF) for n in SIZES])


@pytest.mark.parametrize("ipv6", [False, True])
def test_encap_output_decoded_by_tshark(tmp_path: Path, ipv6: bool) -> None:
    src, dst = ("2001:db8:0:1::1", "2001:db8:0:1::2") if ipv6 else ("198.18.0.1", "198.18.0.2")
    out = tmp_path / "stt.pcap"
    extra = ["--ipv6"] if ipv6 else []
    p = run("encap", make_inner(tmp_path), "-o", out, "--src", src, "--dst", dst,
            "--context-id", "0x1234abcd", *extra)  # fmt: skip
    assert p.returncode == 0, p.stderr
    pref = "ipv6.try_heuristic_first:TRUE" if ipv6 else "ip.try_heuristic_first:TRUE"
    rows = tshark_fields(out, "-o", pref, "-T", "fields",
                         "-e", "stt.context_id", "-e", "eth.len", "-e", "ip.len",
                         "-e", "udp.length")  # fmt: skip
    done = [r for r in rows if r[0]]
    assert [r[0] for r in done] == ["0x000000001234abcd"] * len(SIZES)
    # each reassembled frame: its inner UDP length is the original's
    assert [int(r[3].split(",")[-1]) for r in done] == [n - 34 for n in SIZES]
    status = tshark_fields(out, "-o", "tcp.check_checksum:TRUE", "-T", "fields",
                           "-e", "tcp.checksum.status")  # fmt: skip
    assert status and all(r == ["1"] for r in status)


def test_decap_output_shows_inner_protocols(tmp_path: Path) -> None:
    stt = tmp_path / "stt.pcap"
    assert run("encap", make_inner(tmp_path), "-o", stt, "--src", "198.18.0.1",
               "--dst", "198.18.0.2", "--context-id", "7").returncode == 0  # fmt: skip
    decap_json(stt, tmp_path)
    rows = tshark_fields(tmp_path / "out.pcap", "-o", "udp.check_checksum:TRUE", "-T", "fields",
                         "-e", "frame.protocols", "-e", "ip.src",
                         "-e", "udp.checksum.status")  # fmt: skip
    assert [r[0] for r in rows] == ["eth:ethertype:ip:udp:data"] * len(SIZES)
    assert {r[1] for r in rows} == {"192.0.2.1"}
    assert {r[2] for r in rows} == {"1"}


def _tshark_capture(hosts: TwoHosts, path: Path) -> subprocess.Popen[bytes]:
    """``tshark -w`` on B's veth; returns once its capture has started (dumpcap has the
    interface open: tshark logs "Capture started" when dumpcap reports its file)."""
    proc = hosts.b.popen(["tshark", "-i", hosts.dev_b, "-w", str(path), "-F", "pcapng"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 30
    while b"Capture started" not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, left))
        chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            proc.kill()
            proc.wait()
            raise AssertionError(f"tshark did not start capturing: {seen.decode(errors='replace')}")
        seen += chunk
    return proc


def _packets_in(path: Path, match: bytes) -> int:
    """Packets containing ``match`` in a capture file that may still be growing."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    try:
        with CaptureReader(path) as r:  # a cut record at the end is not an error
            return sum(1 for _t, _l, data, _o in r if match in bytes(data))
    except CaptureError:
        return 0  # the file header is not complete yet


@pytest.mark.netns
@pytest.mark.parametrize("ipv6", [False, True])
def test_real_traffic_captured_by_tcpdump_and_tshark(
    tmp_path: Path,
    two_hosts: TwoHosts,
    ipv6: bool,
) -> None:
    h = two_hosts
    src, dst = (h.ip6_a, h.ip6_b) if ipv6 else (h.ip_a, h.ip_b)
    stt = tmp_path / "stt.pcap"
    extra = ["--ipv6"] if ipv6 else []
    assert run("encap", make_inner(tmp_path), "-o", stt, "--src", src, "--dst", dst,
               "--context-id", "0x77", *extra).returncode == 0  # fmt: skip
    with CaptureReader(stt) as r:
        packets = [bytes(d) for _t, _l, d, _o in r]
    # every segment carries the outer source and destination address, in this order
    marker = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    ng = tmp_path / "cap.pcapng"
    tshark_proc = _tshark_capture(h, ng)
    try:
        with Capture(h.b, h.dev_b, tmp_path / "cap.pcap", bpf="tcp port 7471") as cap:
            with h.a.entered():
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            try:
                s.bind((h.dev_a, 0))
                for p in packets:
                    s.send(p)
            finally:
                s.close()
            cap.wait_for(len(packets), "tcp port 7471")
        wait_until(lambda: _packets_in(ng, marker) >= len(packets), 30,
                   what=f"{len(packets)} segments in tshark's capture")  # fmt: skip
    finally:
        tshark_proc.send_signal(2)
        tshark_proc.wait(timeout=20)
    want = [inner_udp(n, n & 0xFF) for n in SIZES]
    for cap_file in (tmp_path / "cap.pcap", ng):
        out = tmp_path / f"{cap_file.name}.inner"
        summary = decap_json(cap_file, tmp_path, "--split-by-context", out)
        assert summary["drops"] == {}, summary
        assert summary["checksums"]["verified"] == len(packets), summary
        assert [f for _t, f in frames_of(out / "ctx-77.pcap")] == want


def _tcp_with_checksum(field: int | None) -> bytes:
    """An IPv4/TCP packet to the STT port whose correct checksum is 0x0000 (two payload
    bytes chosen for it); ``field`` overrides the stored checksum."""
    src, dst = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 7471, 1, 1, 0x50, 0x18, 1000, 0, 0))
    tcp += b"sttun checksum" + bytes(2)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    struct.pack_into("!H", tcp, len(tcp) - 2, (0xFFFF - ones_sum(pseudo + tcp)) % 0xFFFF)
    assert checksum(pseudo + tcp) == 0  # 0x0000 is the right value
    if field is not None:
        struct.pack_into("!H", tcp, 16, field)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                               src, dst))  # fmt: skip
    struct.pack_into("!H", ip, 10, checksum(ip))
    return bytes(12) + b"\x08\x00" + bytes(ip) + bytes(tcp)


def test_checksum_verdict_matches_tshark_on_linux_mangled_zero(tmp_path: Path) -> None:
    """Linux stores a checksum that folds to 0x0000 as 0xffff; tshark calls that bad,
    the demo and the tests count it good; a really wrong checksum stays bad."""
    pcap = write_pcap(tmp_path / "zero.pcap",
                      [_tcp_with_checksum(None), _tcp_with_checksum(0xFFFF),
                       _tcp_with_checksum(0x1234)])  # fmt: skip
    args = ["-o", "tcp.check_checksum:TRUE", "-T", "fields"]
    for f in TSHARK_CHECKSUM_FIELDS:
        args += ["-e", f]
    rows = tshark_fields(pcap, *args)
    assert [r[0] for r in rows] == ["1", "0", "0"]  # what tshark itself says
    assert [tshark_checksum_verdict(*r) for r in rows] == ["good", "good", "bad"]
