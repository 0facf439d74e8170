"""``sttun inspect`` and ``sttun encap`` through the CLI, and the core outer-header checks."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
from tests.unit.test_tools_decap import (
    inner_udp,
    run,
    segment,
    segments_of,
    stt_header,
    write_pcap,
)

from sttun.core.drops import DropReason
from sttun.core.outer import checksum_is_partial, parse_outer, tcp_checksum_ok
from sttun.io.pcap import CaptureReader


def test_inspect_rows(tmp_path: Path) -> None:
    pkts = []
    pkts += segments_of(stt_header(1, flags=0x0E, l4=34, mss=1400) + inner_udp(3000), ack=1,
                        sport=50000)  # fmt: skip
    pkts += segments_of(stt_header(1, flags=0x01, tci=0x1000 | 7) + inner_udp(100), ack=2,
                        sport=50010)  # fmt: skip
    pkts += segments_of(stt_header(2) + inner_udp(100), ack=3, src="198.18.0.3")
    pkts.append(segment(b"x" * 50, length=50, ack=4, corrupt=True))
    cap = write_pcap(tmp_path / "in.pcap", pkts)
    p = run("inspect", cap, "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    rows = {(r["src"], r["hex"]): r for r in rep["rows"]}
    r1 = rows[("198.18.0.1", "0x1")]
    assert (r1["frames"], r1["segments"], r1["errors"]) == (2, 4, 0)
    assert r1["flags"] == ["C", "P", "V", "T"] and r1["mss"] == [1400] and r1["vlans"] == ["7"]
    assert r1["sports"] == {"count": 2, "min": 50000, "max": 50010}
    assert rows[("198.18.0.3", "0x2")]["frames"] == 1
    bad = rows[("198.18.0.1", "0x7878787878787878")]  # its (untrusted) payload bytes
    assert bad["error_reasons"] == {"bad_tcp_checksum": 1} and bad["segments"] == 1
    assert rep["drops"] == {"bad_tcp_checksum": 1}
    text = run("inspect", cap)
    assert text.returncode == 0 and "198.18.0.3" in text.stdout and "CPVT" in text.stdout


def test_encap_cli_and_errors(tmp_path: Path) -> None:
    inner = write_pcap(tmp_path / "in.pcap", [inner_udp(3000), inner_udp(60)])
    out = tmp_path / "stt.pcap"
    p = run("encap", inner, "-o", out, "--src", "198.18.0.1", "--dst", "198.18.0.2",
            "--context-id", "0x99", "--sport", "4242", "--mtu", "1000")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stderr == f"sttun encap: 2 frame(s), 3060 bytes -> 5 segment(s) in {out}\n"
    with CaptureReader(out) as r:
        pkts = [bytes(d) for _t, _l, d, _o in r]
    assert all(len(x) <= 1014 for x in pkts)
    assert {struct.unpack_from("!HH", x, 34) for x in pkts} == {(4242, 7471)}
    assert pkts[0][:14] == bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    for args, msg in [
        (["--src", "198.18.0.1", "--dst", "2001:db8:0:1::2"],
         "--src 198.18.0.1 and --dst 2001:db8:0:1::2 are not of the same address family"),
        (["--src", "198.18.0.1", "--dst", "198.18.0.2", "--ipv6"],
         "--src 198.18.0.1 / --dst 198.18.0.2: expected IPv6 addresses"),
        (["--src", "x", "--dst", "198.18.0.2"], "--src 'x' is not an IPv4 or IPv6 address"),
        (["--src", "198.18.0.1", "--dst", "198.18.0.2", "--mtu", "200"],
         "--mtu 200: must be at least 576"),
    ]:  # fmt: skip
        p = run("encap", inner, "-o", out, "--context-id", "1", *args)
        assert (p.returncode, p.stderr) == (2, f"sttun encap: {msg}\n")


def _reference_ok(pkt: bytes, l3: int) -> bool:
    from tests.netns import ones_sum

    v4 = pkt[l3] >> 4 == 4
    hl = (pkt[l3] & 15) * 4 if v4 else 40
    end = l3 + (struct.unpack_from("!H", pkt, l3 + 2)[0] if v4 else 40 + struct.unpack_from(
        "!H", pkt, l3 + 4)[0])  # fmt: skip
    addrs = pkt[l3 + 12 : l3 + 20] if v4 else pkt[l3 + 8 : l3 + 40]
    ph = addrs + (struct.pack("!BBH", 0, 6, end - l3 - hl) if v4 else struct.pack(
        "!IxxxB", end - l3 - hl, 6))  # fmt: skip
    return ones_sum(pkt[l3 + hl : end], ones_sum(ph)) == 0xFFFF


@pytest.mark.parametrize("seed", range(40))
def test_tcp_checksum_matches_reference(seed: int) -> None:
    rnd = random.Random(seed)
    n = rnd.randrange(0, 300)
    v6 = bool(seed & 1)
    src, dst = ("2001:db8:0:1::1", "2001:db8:0:1::2") if v6 else ("198.18.0.1", "198.18.0.2")
    pkt = bytearray(segment(rnd.randbytes(n), length=n or 1, src=src, dst=dst,
                            corrupt=rnd.random() < 0.5))  # fmt: skip
    if rnd.random() < 0.3:
        pkt[-1 if n else 20] ^= 0xFF
    fields = parse_outer(pkt, 14)
    assert not isinstance(fields, DropReason)
    _s, _d, _t, l4, end = fields
    assert tcp_checksum_ok(pkt, 14, l4, end) == _reference_ok(bytes(pkt), 14)


def test_parse_outer_reasons_and_partial() -> None:
    good = segment(b"abc", length=3)
    assert parse_outer(good, 14)[3:] == (34, len(good))  # type: ignore[index]
    assert parse_outer(good[:40], 14) is DropReason.OUTER_TRUNCATED
    assert parse_outer(b"\x45" + good[15:30], 0) is DropReason.OUTER_TRUNCATED
    assert parse_outer(b"\x55" * 40, 0) is DropReason.OUTER_BAD_IP
    udp = bytearray(good)
    udp[14 + 9] = 17
    assert parse_outer(udp, 14) is DropReason.OUTER_NOT_TCP
    part = segment(b"abcd", length=4, partial=True)
    assert not tcp_checksum_ok(part, 14, 34, len(part))
    assert checksum_is_partial(part, 14, 34, len(part))
    assert not checksum_is_partial(good, 14, 34, len(good))
