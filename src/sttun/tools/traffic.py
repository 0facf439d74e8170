"""Traffic between two hosts for the demo: ping RTTs and bulk TCP transfers.

* :func:`ping_rtts` — the RTTs in ``ping`` output;
* :func:`python_transfer` — random bytes a -> b over TCP with sha256 compared at
  both ends (a receiver and a sender script run with this Python in the hosts);
* :func:`iperf3_bulk` — iperf3 a -> b, its JSON result.

While a transfer runs, the live display shows the tunnel's transmit rate read from
an endpoint's counters.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sttun.errors import SetupError
from sttun.tools.report import human_bytes
from sttun.tools.topology import Endpoint, TwoHosts

TRANSFER_PORT = 5301
IPERF_PORT = 5302
IPERF_SECONDS = 3


def gbits(bits_per_second: float) -> str:
    """``3.2e9`` → ``"3.20 Gbit/s"`` (Mbit/s below 1 Gbit/s)."""
    if bits_per_second >= 1e9:
        return f"{bits_per_second / 1e9:.2f} Gbit/s"
    return f"{bits_per_second / 1e6:.1f} Mbit/s"


_RTT_LINE = re.compile(r"time=([\d.]+) ms")


def ping_rtts(output: str) -> list[float]:
    """The per-reply RTTs (ms) in ``ping`` output."""
    return [float(m) for m in _RTT_LINE.findall(output)]


def _tx_bytes(ep: Endpoint) -> int:
    try:
        tunnels = ep.show(timeout=1.0).get("tunnels") or []
    except Exception:
        return 0
    return sum(int((t.get("tx") or {}).get("bytes", 0)) for t in tunnels)


def _watch(
    proc: subprocess.Popen[Any], ep: Endpoint, update: Callable[[str], None], timeout: float
) -> None:
    """Wait for ``proc``, showing the tunnel's live transmit rate from ``ep``'s counters."""
    deadline = time.monotonic() + timeout
    last_t, last_b = time.monotonic(), _tx_bytes(ep)
    total = 0
    while proc.poll() is None:
        if time.monotonic() > deadline:
            _stop(proc)
            raise SetupError(f"the transfer did not finish in {timeout:g}s")
        time.sleep(0.25)
        now, b = time.monotonic(), _tx_bytes(ep)
        if b >= last_b and now > last_t:
            total += b - last_b
            rate = gbits((b - last_b) * 8 / (now - last_t))
            update(f"{rate} through the tunnel, {human_bytes(total)}")
        last_t, last_b = now, b


# The built-in transfer: a receiver that hashes what it gets, and a sender.
_RECEIVER = """\
import hashlib, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); print('ready', flush=True)
s.settimeout(60); c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    h.update(d); n += len(d)
c.sendall(b'k'); c.close()
print(n, h.hexdigest(), flush=True)
"""

_SENDER = """\
import hashlib, os, socket, sys, time
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(1 << 20); h = hashlib.sha256(); sent = 0
s = socket.create_connection((addr, port), timeout=60)
t0 = time.monotonic()
while sent < total:
    b = block[: total - sent]
    s.sendall(b); h.update(b); sent += len(b)
    block = block[1:] + block[:1]
s.shutdown(socket.SHUT_WR); s.recv(1); dt = time.monotonic() - t0
print(sent, h.hexdigest(), dt, flush=True)
"""


@dataclass
class Transfer:
    """Result of the built-in transfer."""

    sent: int
    received: int
    match: bool
    seconds: float
    digest: str


def _run_watched(
    proc: subprocess.Popen[str], ep: Endpoint, update: Callable[[str], None], timeout: float
) -> tuple[str, str]:
    """``proc``'s stdout and stderr once it ends, watched by :func:`_watch`; stopped if not."""
    try:
        _watch(proc, ep, update, timeout=timeout)
        return proc.communicate()
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def python_transfer(
    hosts: TwoHosts,
    nbytes: int,
    ep: Endpoint,
    update: Callable[[str], None],
    port: int = TRANSFER_PORT,
) -> Transfer:
    """Send ``nbytes`` random bytes from a to b over TCP; compare sha256 at both ends."""
    addr = hosts.overlay[1]
    rx = hosts.b.popen(
        [sys.executable, "-c", _RECEIVER, addr, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert rx.stdout is not None
        if rx.stdout.readline().strip() != "ready":
            raise SetupError(f"transfer receiver did not start: {_read_err(rx)}")
        tx = hosts.a.popen(
            [sys.executable, "-c", _SENDER, addr, str(port), str(nbytes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = _run_watched(tx, ep, update, timeout=300)
        if tx.returncode != 0:
            raise SetupError(f"transfer sender failed: {err.strip().splitlines()[-1:]}")
        sent, digest, seconds = out.split()
        rout, _ = rx.communicate(timeout=60)
        got = rout.split()
        received = int(got[0]) if got else 0
        return Transfer(int(sent), received, got[1:2] == [digest], float(seconds), digest)
    finally:
        _stop(rx)


def _read_err(proc: subprocess.Popen[str]) -> str:
    with contextlib.suppress(Exception):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        return (err or "").strip()[-200:]
    return ""


def iperf3_bulk(
    hosts: TwoHosts, ep: Endpoint, update: Callable[[str], None], seconds: int = IPERF_SECONDS
) -> dict[str, Any]:
    """iperf3 from a to b over the tunnel for ``seconds``; the client's JSON result."""
    addr = hosts.overlay[1]
    server = hosts.b.popen(
        ["iperf3", "-s", "-1", "--forceflush", "-B", addr, "-p", str(IPERF_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if "listening" not in line.lower() and "----" not in line:
            raise SetupError(f"iperf3 server did not start: {line.strip()}")
        client = hosts.a.popen(
            ["iperf3", "-c", addr, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = _run_watched(client, ep, update, timeout=seconds + 30)
        try:
            result: dict[str, Any] = json.loads(out)
        except json.JSONDecodeError as e:
            raise SetupError(f"iperf3 gave no result: {err.strip() or out.strip()[:200]}") from e
        if "error" in result:
            raise SetupError(f"iperf3: {result['error']}")
        return result
    finally:
        _stop(server)
