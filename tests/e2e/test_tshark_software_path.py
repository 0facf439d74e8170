"""tshark's STT dissector as an external validator of the software segmentation path.

A pcap of software-path segments (no traffic is sent: the file is only read) is
dissected with ``-o ip.try_heuristic_first:TRUE`` (protocol.md §12.1); context ids,
flags, lengths and reassembled lengths (= L + 20, §12.4) must match what was encoded
and no expert info may fire.  A second pass with heuristics off and
``tcp.check_checksum:TRUE`` must call every outer TCP checksum Good (§12.5 item 2).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from sttun.core.encap import Encapsulator
from sttun.io.pcap_write import PcapWriter
from sttun.wire.ip import ip_bytes
from sttun.wire.vnet import GsoType, VnetFlag, VnetHdr
from tests.reference import naive_sum

MACS = bytes.fromhex("020000000002020000000001")
OUTER_L2 = bytes.fromhex("02000000000a02000000000b") + b"\x08\x00"
SRC, DST = ip_bytes("198.18.0.1"), ip_bytes("198.18.0.2")
S4, D4 = ip_bytes("192.0.2.1"), ip_bytes("192.0.2.2")
CTX_A, CTX_B = 0x1111, 0x0102030405060708
MTU = 1500


def inner_tcp(payload_len: int, sport: int, *, partial: bool = False) -> bytes:
    """IPv4/TCP inner frame, its own TCP flow (so tshark's TCP analysis stays quiet)."""
    payload = bytes((i * 11) & 0xFF for i in range(payload_len))
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, 80, 1, 1, 0x50, 0x18, 512, 0, 0)) + payload
    pseudo = naive_sum(S4 + D4 + bytes([0, 6]) + len(tcp).to_bytes(2))
    c = pseudo if partial else ~naive_sum(bytes(tcp) + pseudo.to_bytes(2)) & 0xFFFF
    struct.pack_into("!H", tcp, 16, c)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                               S4, D4))  # fmt: skip
    struct.pack_into("!H", ip, 10, ~naive_sum(bytes(ip)) & 0xFFFF)
    return MACS + b"\x08\x00" + bytes(ip) + bytes(tcp)


class Case(NamedTuple):
    ctx: int
    inner: bytes
    vnet: VnetHdr | None
    flags: int
    l4offset: int
    mss: int
    vid: int | None
    stt_len: int  # L


ARP = MACS + b"\x08\x06" + bytes.fromhex("0001080006040001") + bytes(20)
TAGGED = (lambda f: f[:12] + bytes.fromhex("8100a064") + f[12:])(inner_tcp(3000, 1003))
CASES = [
    Case(CTX_A, ARP, None, 0x00, 0, 0, None, 18 + len(ARP)),
    Case(CTX_A, inner_tcp(1446, 1001), None, 0x00, 0, 0, None, 18 + 1500),
    Case(CTX_B, inner_tcp(65000 - 54, 1002), None, 0x00, 0, 0, None, 65018),
    Case(CTX_B, TAGGED, None, 0x00, 0, 0, 100, 18 + len(TAGGED) - 4),
    Case(CTX_A, inner_tcp(500, 1004), VnetHdr(flags=VnetFlag.DATA_VALID), 0x01, 0, 0, None, 572),
    Case(
        CTX_B,
        inner_tcp(4000, 1005, partial=True),
        VnetHdr(VnetFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16),
        0x0E,
        34,
        1448,
        None,
        18 + 54 + 4000,
    ),
]


def tshark(*args: str) -> list[list[str]]:
    res = subprocess.run(["tshark", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [line.split("\t") for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """The pcap, and for every case the frame numbers of its segments."""
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    path = tmp_path_factory.mktemp("stt") / "software_path.pcap"
    encs = {
        ctx: Encapsulator(SRC, DST, ctx, l2=OUTER_L2, underlay_mtu=MTU, first_frame_id=fid)
        for ctx, fid in ((CTX_A, 0x100), (CTX_B, 0x200))
    }
    numbers: list[list[int]] = []
    n = 0
    sizes.clear()
    with PcapWriter(path) as w:
        ts = 1_700_000_000 * 10**9
        for case in CASES:
            pkts = encs[case.ctx].encap(case.inner, case.vnet, gso=False)
            nums = []
            for p in pkts:
                data = b"".join(bytes(b) for b in p)
                assert len(data) <= 14 + MTU
                n += 1
                ts += 1000
                w.write(ts, data)
                nums.append(n)
                # what was encoded: payload bytes per segment, for the offsets below
                sizes[n] = len(data) - 14 - 20 - 20
            numbers.append(nums)
    return path, numbers


#: payload size of every written frame (by frame number), filled by the fixture
sizes: dict[int, int] = {}

FIELDS = [
    "frame.number",
    "stt.pkt_len",
    "stt.seg_off",
    "stt.pkt_id",
    "stt.flags",
    "stt.l4offset",
    "stt.mss",
    "stt.vlan.id",
    "stt.context_id",
    "stt.reassembled.length",
    "_ws.expert.message",
]


def test_tshark_decodes_every_frame(capture: tuple[Path, list[list[int]]]) -> None:
    path, numbers = capture
    args = ["-r", str(path), "-o", "ip.try_heuristic_first:TRUE", "-T", "fields"]
    for f in FIELDS:
        args += ["-e", f]
    rows = {int(r[0]): dict(zip(FIELDS, r, strict=True)) for r in tshark(*args)}
    assert len(rows) == sum(len(n) for n in numbers)
    for case, nums in zip(CASES, numbers, strict=True):
        ids = {rows[n]["stt.pkt_id"] for n in nums}
        assert len(ids) == 1  # one frame id per STT frame
        offset = 0
        for n in nums:
            r = rows[n]
            assert int(r["stt.pkt_len"]) == case.stt_len
            assert int(r["stt.seg_off"]) == offset
            assert r["_ws.expert.message"] == "", r  # no STT (or any) warning
            offset += sizes[n]
        assert offset == case.stt_len
        # the STT header is decoded in the frame that holds the whole STT frame
        last = rows[nums[-1]]
        assert int(last["stt.context_id"], 16) == case.ctx
        assert int(last["stt.flags"], 16) == case.flags
        assert int(last["stt.l4offset"]) == case.l4offset
        assert int(last["stt.mss"]) == case.mss
        if case.vid is None:
            assert last["stt.vlan.id"] in ("", "0")
        else:
            assert int(last["stt.vlan.id"]) == case.vid
        if len(nums) > 1:
            assert int(last["stt.reassembled.length"]) == case.stt_len + 20
            for n in nums[:-1]:
                assert rows[n]["stt.context_id"] == ""  # not reassembled yet
        else:
            assert last["stt.reassembled.length"] == ""
    assert len(numbers[2]) == 45  # the 65000-byte frame at MTU 1500


def test_tshark_inner_frames_dissected(capture: tuple[Path, list[list[int]]]) -> None:
    path, numbers = capture
    rows = tshark("-r", str(path), "-o", "ip.try_heuristic_first:TRUE", "-T", "fields",
                  "-e", "frame.number", "-e", "frame.protocols")  # fmt: skip
    protos = {int(r[0]): r[1] for r in rows}
    assert protos[numbers[0][-1]].endswith("stt:eth:ethertype:arp")
    for nums in numbers[1:]:
        assert ":stt:eth:ethertype:" in protos[nums[-1]]
        assert protos[nums[-1]].endswith(":ip:tcp") or protos[nums[-1]].endswith(":ip:tcp:data")


def test_tshark_outer_tcp_checksums_good(capture: tuple[Path, list[list[int]]]) -> None:
    path, numbers = capture
    rows = tshark("-r", str(path), "-o", "tcp.check_checksum:TRUE", "-T", "fields",
                  "-e", "tcp.checksum.status")  # fmt: skip
    assert len(rows) == sum(len(n) for n in numbers)
    assert all(r == ["1"] for r in rows), rows
