"""A userspace impairment relay and the three-namespace line it sits in.

Topology (:func:`make_line`)::

    A (dev_a) ---- veth ---- (dev_ra) R (dev_rb) ---- veth ---- (dev_b) B

* ``routed=False``: A (198.18.0.1/24) and B (198.18.0.2/24) share one subnet and R
  has no addresses; :func:`relay` (run in R as ``python impair.py ...``) copies every
  Ethernet frame between ``dev_ra`` and ``dev_rb`` with AF_PACKET sockets, reordering
  STT segments within a window and duplicating a percentage of them.
* ``routed=True``: A is 198.18.0.1/24 behind R's 198.18.0.254, B is 198.18.1.2/24
  behind R's 198.18.1.254, R forwards in the kernel (so nftables in R can drop).

For the relay to see the segments as they are on the wire, A's and B's veths do
GSO in software with full checksums (``tx off tso off gso on``) and R does no GRO.

:func:`start_pair` starts ``sttun up -c`` on A and B with a ``[daemon]`` table of
your choice and puts the overlay addresses on the TAPs.

The relay script writes its counters as JSON to ``--stats`` when it stops (SIGTERM
or SIGINT): frames relayed, STT segments, duplicates sent, segments reordered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
STT_PORT = 7471


def is_stt(frame: bytes, port: int = STT_PORT) -> bool:
    """True for an Ethernet/IPv4 TCP segment to ``port`` (first fragment)."""
    if len(frame) < 38 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return False
    l4 = 14 + (frame[14] & 0x0F) * 4
    return len(frame) >= l4 + 4 and int.from_bytes(frame[l4 + 2 : l4 + 4], "big") == port


def is_whole_frame(frame: bytes) -> bool:
    """True if an STT segment (see :func:`is_stt`) carries a whole STT frame: offset 0
    and as many payload bytes as SEQ says the frame has."""
    ihl = (frame[14] & 0x0F) * 4
    l4 = 14 + ihl
    if len(frame) < l4 + 20:
        return False
    seq = int.from_bytes(frame[l4 + 4 : l4 + 8], "big")
    payload = int.from_bytes(frame[16:18], "big") - ihl - 20
    return seq & 0xFFFF == 0 and seq >> 16 == payload


@dataclass
class RelayStats:
    """What the relay did."""

    frames: int = 0
    stt: int = 0
    duplicated: int = 0
    #: duplicates that were whole STT frames in one segment, per direction
    dup_whole_left_to_right: int = 0
    dup_whole_right_to_left: int = 0
    reordered: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return dict(self.__dict__)


def _open(dev: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    s.bind((dev, ETH_P_ALL))
    s.setblocking(False)
    return s


def relay(
    left: str,
    right: str,
    *,
    window: int = 8,
    dup_percent: float = 0.0,
    hold: float = 0.002,
    seed: int | None = None,
    stop: Any = None,
) -> RelayStats:
    """Copy frames between ``left`` and ``right`` until ``stop()`` is true.

    Non-STT frames pass at once.  STT segments of each direction wait in a buffer of
    ``window`` frames; when it is full a random one leaves (so segments overtake each
    other by up to ``window - 1`` places), and whatever waits longer than ``hold``
    seconds is flushed in random order.  ``dup_percent`` of the STT segments are
    sent twice (the copy goes back into the buffer, so it arrives later).
    """
    rnd = random.Random(seed)
    stats = RelayStats()
    socks = {left: _open(left), right: _open(right)}
    out = {left: socks[right], right: socks[left]}
    pending: dict[str, list[bytes]] = {left: [], right: []}
    oldest: dict[str, float] = {left: 0.0, right: 0.0}
    fds = {s.fileno(): dev for dev, s in socks.items()}

    def send(dev: str, frame: bytes) -> None:
        try:
            out[dev].send(frame)
        except OSError:
            stats.errors += 1

    def release(dev: str, n: int) -> None:
        buf = pending[dev]
        for _ in range(n):
            i = rnd.randrange(len(buf))
            if i != len(buf) - 1:
                stats.reordered += 1
            buf[i], buf[-1] = buf[-1], buf[i]
            send(dev, buf.pop())

    try:
        while stop is None or not stop():
            waiting = [oldest[d] + hold for d in pending if pending[d]]
            timeout = max(0.0, min(waiting) - time.monotonic()) if waiting else 0.2
            ready, _, _ = select.select(list(fds), [], [], timeout)
            for fd in ready:
                dev = fds[fd]
                s = socks[dev]
                for _ in range(256):
                    try:
                        frame = s.recv(65600)
                    except BlockingIOError:
                        break
                    stats.frames += 1
                    if not is_stt(frame) or (window <= 1 and dup_percent <= 0):
                        send(dev, frame)
                        continue
                    stats.stt += 1
                    buf = pending[dev]
                    if not buf:
                        oldest[dev] = time.monotonic()
                    buf.append(frame)
                    if dup_percent > 0 and rnd.random() * 100 < dup_percent:
                        buf.append(frame)
                        stats.duplicated += 1
                        if is_whole_frame(frame):
                            if dev == left:
                                stats.dup_whole_left_to_right += 1
                            else:
                                stats.dup_whole_right_to_left += 1
                    if len(buf) >= window:
                        release(dev, len(buf) - window + 1)
            now = time.monotonic()
            for dev, buf in pending.items():
                if buf and now - oldest[dev] >= hold:
                    release(dev, len(buf))
    finally:
        for dev in pending:
            while pending[dev]:
                send(dev, pending[dev].pop())
        for s in socks.values():
            s.close()
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """``impair.py --left DEV --right DEV [--window N] [--dup PCT] [--stats FILE]``."""
    p = argparse.ArgumentParser(description="STT reordering/duplicating L2 relay")
    p.add_argument("--left", required=True)
    p.add_argument("--right", required=True)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--dup", type=float, default=0.0, help="percent of STT segments sent twice")
    p.add_argument("--hold", type=float, default=0.002)
    p.add_argument("--seed", type=int)
    p.add_argument("--stats", help="write the counters here (JSON) on exit")
    a = p.parse_args(argv)
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("ready", flush=True)
    stats = relay(
        a.left,
        a.right,
        window=a.window,
        dup_percent=a.dup,
        hold=a.hold,
        seed=a.seed,
        stop=lambda: stopping,
    )
    if a.stats:
        Path(a.stats).write_text(json.dumps(stats.as_dict()))
    return 0


# --------------------------------------------------------------------------- topology
# (imports of the test package are local: the relay script runs without it)


@dataclass
class Line:
    """A - R - B (see the module docstring)."""

    a: Any
    r: Any
    b: Any
    dev_a: str
    dev_ra: str
    dev_rb: str
    dev_b: str
    ip_a: str
    ip_b: str
    routed: bool
    procs: list[Any] = field(default_factory=list)


@contextlib.contextmanager
def make_line(routed: bool = False) -> Iterator[Line]:
    """Three namespaces in a line; A's and B's veths segment in software (module doc)."""
    from tests.netns import Netns, ifname, unique_suffix, veth_pair

    sfx = unique_suffix()
    with Netns("a") as a, Netns("r") as r, Netns("b") as b:
        names = [ifname(p, sfx) for p in ("la", "ra", "rb", "lb")]
        if routed:
            veth_pair(a, r, names[0], names[1], "198.18.0.1/24", "198.18.0.254/24")
            veth_pair(r, b, names[2], names[3], "198.18.1.254/24", "198.18.1.2/24")
            r.sysctl("net.ipv4.ip_forward", "1")
            a.run(["ip", "route", "add", "198.18.1.0/24", "via", "198.18.0.254"])
            b.run(["ip", "route", "add", "198.18.0.0/24", "via", "198.18.1.254"])
            ip_a, ip_b = "198.18.0.1", "198.18.1.2"
        else:
            veth_pair(a, r, names[0], names[1], "198.18.0.1/24")
            veth_pair(r, b, names[2], names[3], None, "198.18.0.2/24")
            ip_a, ip_b = "198.18.0.1", "198.18.0.2"
        for ns, dev in ((a, names[0]), (b, names[3])):
            ns.run(["ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "on"])
        for dev in names[1:3]:
            r.run(["ethtool", "-K", dev, "gro", "off", "tso", "off", "gso", "off"])
        yield Line(a, r, b, names[0], names[1], names[2], names[3], ip_a, ip_b, routed)


def start_relay(
    line: Line, tmp: Path, *, window: int = 8, dup: float = 0.0, seed: int = 1
) -> tuple[Any, Path]:
    """Run :func:`relay` in R between its two veths; returns (process, stats path)."""
    stats = tmp / f"relay-{line.dev_ra}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--left", line.dev_ra]
    argv += ["--right", line.dev_rb, "--window", str(window), "--dup", str(dup)]
    argv += ["--seed", str(seed), "--stats", str(stats)]
    proc = line.r.popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    line.procs.append(proc)
    return proc, stats


def stop_relay(proc: Any, stats: Path) -> dict[str, int]:
    """Stop the relay; its counters."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    result: dict[str, int] = json.loads(stats.read_text())
    return result


@dataclass
class Pair:
    """``sttun up`` on both ends of a line (or any two namespaces)."""

    a: Any  # tests.e2e.sttun_hosts.Endpoint
    b: Any
    dev: str = "stt0"


OVERLAY_A = "192.0.2.1"
OVERLAY_B = "192.0.2.2"


def pair_configs(
    ip_a: str, ip_b: str, *, key: int = 42, daemon: dict[str, Any] | None = None, **tunnel: Any
) -> tuple[str, str]:
    """TOML for A and for B: one tunnel ``stt0`` each way plus a ``[daemon]`` table."""
    from tests.e2e.sttun_hosts import config_toml

    d = daemon or {}
    ta = {"name": "stt0", "local_ip": ip_a, "remote_ip": ip_b, "key": key, **tunnel}
    tb = {"name": "stt0", "local_ip": ip_b, "remote_ip": ip_a, "key": key, **tunnel}
    return config_toml([ta], **d), config_toml([tb], **d)


@contextlib.contextmanager
def start_pair(
    ns_a: Any,
    ns_b: Any,
    ip_a: str,
    ip_b: str,
    tmp: Path,
    *,
    daemon: dict[str, Any] | None = None,
    **tunnel: Any,
) -> Iterator[Pair]:
    """``sttun up -c`` in ``ns_a`` and ``ns_b``, overlay 192.0.2.1/.2 on ``stt0``."""
    from tests.e2e.sttun_hosts import start_endpoint

    cfg_a, cfg_b = pair_configs(ip_a, ip_b, daemon=daemon, **tunnel)
    a = start_endpoint(ns_a, [], ["stt0"], tmp, config=cfg_a)
    try:
        b = start_endpoint(ns_b, [], ["stt0"], tmp, config=cfg_b)
    except BaseException:
        a.stop()
        raise
    try:
        ns_a.run(["ip", "addr", "add", f"{OVERLAY_A}/24", "dev", "stt0"])
        ns_b.run(["ip", "addr", "add", f"{OVERLAY_B}/24", "dev", "stt0"])
        yield Pair(a, b)
    finally:
        for ep in (a, b):
            status = ep.stop()
            assert status == 0, f"sttun up exited {status}: {ep.log_text()}"


if __name__ == "__main__":
    sys.exit(main())
