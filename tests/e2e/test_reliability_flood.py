"""Hostile input through the real daemon (issue #7): reassembly floods and tenant spoofing.

Topology (``make_star(2)``): the hub runs ``sttun up`` with two tunnels,

* ``stt0``: 198.18.0.1 <-> peer 0 (198.18.0.2), key 1 - peer 0 runs no daemon, it is
  the attacker and sends hand-made segments (``stt_craft``) from that allowed address;
* ``stt1``: 198.18.1.1 <-> peer 1 (198.18.1.2), key 2 - peer 1 runs ``sttun up``; the
  overlay 198.51.100.1 <-> .2 carries the legitimate traffic.

The reassembly limits are small (2 MiB high water, 2 s timeout) so that the
floods fill them quickly and the memory comes back within the test.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import stt_craft as sc
from tests.e2e.sttun_hosts import (
    Endpoint,
    Star,
    TapSniffer,
    config_toml,
    drops_of,
    make_star,
    ping,
    sample_reassembly,
    start_endpoint,
    tcp_transfer,
    wait_until,
)
from tests.netns import link_mac, need_root

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
TIMEOUT = 2.0
HIGH_WATER = 2 * MiB
LOW_WATER = 3 * MiB // 2
KEY0, KEY1 = 1, 2
HUB1_OVERLAY = "198.51.100.1"
PEER1_OVERLAY = "198.51.100.2"
CRAFT = str(Path(sc.__file__).resolve())


@dataclass
class Hub:
    """The hub daemon, the legitimate peer's daemon and the attacker's injector."""

    star: Star
    hub: Endpoint
    peer1: Endpoint
    inj0: sc.Injector
    inj1: sc.Injector
    tmp: Path


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    need_root()
    tmp = tmp_path_factory.mktemp("flood")
    with make_star(2) as s:
        cfg = config_toml(
            [
                {"name": "stt0", "local_ip": s.hub_ip(0), "remote_ip": s.peer_ip(0), "key": KEY0},
                {"name": "stt1", "local_ip": s.hub_ip(1), "remote_ip": s.peer_ip(1), "key": KEY1},
            ],
            reassembly_timeout=TIMEOUT,
            reassembly_high_water=HIGH_WATER,
            reassembly_low_water=LOW_WATER,
            reassembly_source_budget=HIGH_WATER,
        )
        hub_ep = start_endpoint(s.hub, [], ["stt0", "stt1"], tmp, config=cfg)
        peer1 = start_endpoint(
            s.peers[1],
            ["--local-ip", s.peer_ip(1), "--remote-ip", s.hub_ip(1), "--key", str(KEY1)],
            ["stt0"],
            tmp,
        )
        try:
            s.hub.run(["ip", "addr", "add", "192.0.2.1/24", "dev", "stt0"])
            s.hub.run(["ip", "addr", "add", f"{HUB1_OVERLAY}/24", "dev", "stt1"])
            s.peers[1].run(["ip", "addr", "add", f"{PEER1_OVERLAY}/24", "dev", "stt0"])
            with s.peers[0].entered():
                inj0 = sc.Injector(s.peer_devs[0], link_mac(s.hub, s.hub_devs[0]))
            with s.peers[1].entered():
                inj1 = sc.Injector(s.peer_devs[1], link_mac(s.hub, s.hub_devs[1]))
            with inj0, inj1:
                yield Hub(s, hub_ep, peer1, inj0, inj1, tmp)
        finally:
            for ep in (hub_ep, peer1):
                status = ep.stop()
                assert status == 0, f"sttun up exited {status}: {ep.log_text()}"


# --------------------------------------------------------------------------- spoofing


def test_spoofed_keys_never_reach_a_tap(hub: Hub) -> None:
    """Allowed source + another tunnel's key, or a key nobody uses: counted as
    unknown_context, delivered to no TAP.  A correctly keyed frame is delivered."""
    s = hub.star
    spoof = sc.inner_udp4(sc.MARKER + b"-spoof")
    good = sc.inner_udp4(sc.MARKER + b"-good")
    sniffers = [TapSniffer(s.hub, "stt0"), TapSniffer(s.hub, "stt1")]
    try:
        before = drops_of(hub.hub)
        sent = 0
        for i, (inj, src, dst, key) in enumerate(
            [
                (hub.inj0, s.peer_ip(0), s.hub_ip(0), KEY1),  # peer 0 with stt1's key
                (hub.inj1, s.peer_ip(1), s.hub_ip(1), KEY0),  # peer 1 with stt0's key
                (hub.inj0, s.peer_ip(0), s.hub_ip(0), 999),  # keys no tunnel uses
                (hub.inj1, s.peer_ip(1), s.hub_ip(1), 0),
                (hub.inj0, s.peer_ip(0), s.hub_ip(0), 2**64 - 1),
            ]
        ):
            frame = sc.stt_frame(spoof, key)
            # whole frames and frames in three pieces
            inj.send(sc.segment(src, dst, frame, frame_len=len(frame), ack=1000 + i))
            inj.send_all(sc.split(src, dst, frame, ack=2000 + i, mss=30))
            sent += 2
        # the control frame goes last: once it is on stt0, the hub has handled the rest
        control = sc.stt_frame(good, KEY0)
        hub.inj0.send(
            sc.segment(s.peer_ip(0), s.hub_ip(0), control, frame_len=len(control), ack=3000)
        )
        sniffers[0].wait_for(sc.MARKER + b"-good")
        after = drops_of(hub.hub)
        assert after.get("unknown_context", 0) - before.get("unknown_context", 0) == sent
        seen = [f for sn in sniffers for f in sn.drain()]
        assert not [f for f in seen if sc.MARKER + b"-spoof" in f], "a spoofed frame leaked"
        on_stt0 = [f for f in sniffers[0].frames if sc.MARKER + b"-good" in f]
        assert len(on_stt0) == 1, "the control frame was not delivered once on stt0"
        assert not [f for f in sniffers[1].frames if sc.MARKER in f]
    finally:
        for sn in sniffers:
            sn.close()


# --------------------------------------------------------------------------- floods


def _start_flood(hub: Hub, src: str, name: str, seconds: float) -> tuple[Any, Path]:
    s = hub.star
    stop = hub.tmp / f"stop-{name}"
    stop.unlink(missing_ok=True)
    argv = [sys.executable, CRAFT, "flood", "--dev", s.peer_devs[0]]
    argv += ["--dst-mac", link_mac(s.hub, s.hub_devs[0]), "--src", src, "--dst", s.hub_ip(0)]
    argv += ["--seconds", str(seconds), "--stop-file", str(stop)]
    proc = s.peers[0].popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, stop


def _stop_flood(proc: Any, stop: Path) -> int:
    stop.touch()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return int(out.split()[-1])


def test_flood_from_unknown_source_buffers_nothing(hub: Hub) -> None:
    """First segments from an address no tunnel names: zero bytes buffered, all
    counted as unknown_source."""
    before = drops_of(hub.hub)
    peak_before = hub.hub.show()["reassembly"]["peak_bytes"]
    samples: list[dict[str, int]] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=sample_reassembly, args=(hub.hub, stop_sampling, samples, 0.1)
    )
    proc, stop = _start_flood(hub, "198.18.0.9", "unknown", 3.0)
    sampler.start()
    try:
        proc.wait(timeout=30)
    finally:
        sent = _stop_flood(proc, stop)
        stop_sampling.set()
        sampler.join()

    # a frame the hub delivers, sent after the flood from the same host: once it is
    # on stt0, the hub has read every flood segment its socket queued before it
    marker = sc.MARKER + b"-after-unknown-flood"
    frame = sc.stt_frame(sc.inner_udp4(marker), KEY0)
    with TapSniffer(hub.star.hub, "stt0") as sniffer:
        hub.inj0.send(
            sc.segment(hub.star.peer_ip(0), hub.star.hub_ip(0), frame, frame_len=len(frame), ack=5)
        )
        sniffer.wait_for(marker, timeout=30)
    counted = drops_of(hub.hub).get("unknown_source", 0) - before.get("unknown_source", 0)
    print(f"unknown-source flood: sent {sent}, counted unknown_source {counted}")
    assert samples, "no show samples during the flood"
    assert all(x["bytes"] == 0 and x["entries"] == 0 for x in samples)
    assert hub.hub.show()["reassembly"]["peak_bytes"] == peak_before
    assert 0 < counted <= sent
    delta = {k: v - before.get(k, 0) for k, v in drops_of(hub.hub).items() if v != before.get(k, 0)}
    assert set(delta) == {"unknown_source"}


def test_flood_from_allowed_source_stays_in_budget(hub: Hub) -> None:
    """First segments of 64 KB frames that never complete, random ACKs, from stt0's
    remote: the hub's reassembly memory stays under the high water, ping and a TCP
    transfer on stt1 succeed meanwhile, and the memory is back to 0 after the timeout."""
    samples: list[dict[str, int]] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=sample_reassembly, args=(hub.hub, stop_sampling, samples, 0.1)
    )
    proc, stop = _start_flood(hub, hub.star.peer_ip(0), "allowed", 120.0)
    sampler.start()
    try:
        wait_until(lambda: samples and samples[-1]["entries"] > 0, 10, what="flood entries")
        ping(hub.star.peers[1], HUB1_OVERLAY, count=5)
        tcp_transfer(hub.star.peers[1], hub.star.hub, HUB1_OVERLAY, 10 * MiB)
        ping(hub.star.hub, PEER1_OVERLAY, count=5)
        assert proc.poll() is None, "the flood ended before the legitimate traffic did"
    finally:
        sent = _stop_flood(proc, stop)
        stop_sampling.set()
        sampler.join()
    reasm = hub.hub.show()["reassembly"]
    peak_sampled = max(x["bytes"] for x in samples)
    print(
        f"allowed-source flood: sent {sent}, samples {len(samples)}, max sampled bytes "
        f"{peak_sampled}, peak_bytes {reasm['peak_bytes']}, high water {HIGH_WATER}, "
        f"evictions {reasm['evictions']}, drops {drops_of(hub.hub)}"
    )
    assert reasm["high_water"] == HIGH_WATER
    assert all(x["bytes"] <= HIGH_WATER for x in samples)
    assert reasm["peak_bytes"] <= HIGH_WATER
    assert peak_sampled > LOW_WATER // 2, "the flood never filled the reassembly memory"
    assert reasm["evictions"] > 0
    wait_until(
        lambda: (r := hub.hub.show()["reassembly"])["entries"] == 0 and r["bytes"] == 0,
        TIMEOUT + 5,
        what="reassembly memory back to 0",
    )
