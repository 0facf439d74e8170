"""Two hosts running ``sttun up``: the building block of the endpoint e2e tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.netns import Netns, TwoHosts, make_two_hosts

OVERLAY_A = "192.0.2.1"
OVERLAY_B = "192.0.2.2"
OVERLAY6_A = "2001:db8:1::1"
OVERLAY6_B = "2001:db8:1::2"


@dataclass
class Endpoint:
    """One running ``sttun up`` in a namespace."""

    ns: Netns
    proc: subprocess.Popen[bytes]
    sock: str
    log: Path
    devs: list[str] = field(default_factory=list)

    def show(self) -> dict[str, Any]:
        """``sttun show --json`` of this endpoint."""
        res = self.ns.run(
            [sys.executable, "-m", "sttun", "show", "--json", "--control-socket", self.sock]
        )
        return json.loads(res.stdout)

    def tunnel(self, name: str) -> dict[str, Any]:
        """One tunnel's entry of :meth:`show`."""
        for t in self.show()["tunnels"]:
            if t["name"] == name:
                return t
        raise KeyError(name)

    def stop(self, sig: int = 15) -> int:
        """Send ``sig`` and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        """What the daemon logged so far."""
        try:
            return self.log.read_text()
        except OSError:
            return ""


def start_endpoint(
    ns: Netns,
    args: Sequence[str],
    devs: Sequence[str],
    tmp: Path,
    *,
    config: str | None = None,
    timeout: float = 20.0,
) -> Endpoint:
    """Start ``sttun up ARGS`` in ``ns`` and wait until every TAP in ``devs`` exists."""
    sock = str(tmp / f"{ns.name}.sock")
    log = tmp / f"{ns.name}.log"
    argv = [sys.executable, "-m", "sttun", "up", "--control-socket", sock, "--instance", "e2e"]
    if config is not None:
        cfg = tmp / f"{ns.name}.toml"
        cfg.write_text(config)
        argv += ["-c", str(cfg)]
    argv += list(args)
    with open(log, "wb") as fh:
        proc = ns.popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    ep = Endpoint(ns, proc, sock, log, list(devs))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sttun up exited with {proc.returncode}: {ep.log_text()}")
        ready = os.path.exists(sock) and all(
            ns.run(["ip", "link", "show", d], check=False).returncode == 0 for d in devs
        )
        if ready:
            return ep
        time.sleep(0.1)
    ep.stop(9)
    raise RuntimeError(f"sttun up did not come up in {timeout}s: {ep.log_text()}")


@dataclass
class Tunnelled:
    """Two hosts with an sttun endpoint each and overlay addresses on the TAPs."""

    hosts: TwoHosts
    a: Endpoint
    b: Endpoint
    dev: str


@contextlib.contextmanager
def tunnel_pair(
    tmp: Path,
    *,
    ipv6_underlay: bool = False,
    offload: bool = True,
    overlay_mtu: int = 1500,
    veth_tso: bool = True,
    key: int = 42,
    extra: Sequence[str] = (),
) -> Iterator[Tunnelled]:
    """Two namespaces, a veth underlay, ``sttun up`` in each, overlay addresses set."""
    with make_two_hosts() as h:
        if not veth_tso:
            # real MTU-sized segments on the wire; GRO merges them at the receiver
            for ns, dev in ((h.a, h.dev_a), (h.b, h.dev_b)):
                ns.run(["ethtool", "-K", dev, "tso", "off", "gso", "on", "gro", "on"])
        la, lb = (h.ip6_a, h.ip6_b) if ipv6_underlay else (h.ip_a, h.ip_b)
        dev = "stt0"
        common = ["--key", str(key), "--dev", dev, "--mtu", str(overlay_mtu), *extra]
        if not offload:
            common.append("--no-offload")
        a = start_endpoint(h.a, ["--local-ip", la, "--remote-ip", lb, *common], [dev], tmp)
        try:
            b = start_endpoint(h.b, ["--local-ip", lb, "--remote-ip", la, *common], [dev], tmp)
        except BaseException:
            a.stop()
            raise
        try:
            for ns, addr, addr6 in ((h.a, OVERLAY_A, OVERLAY6_A), (h.b, OVERLAY_B, OVERLAY6_B)):
                ns.run(["ip", "addr", "add", f"{addr}/24", "dev", dev])
                ns.run(["ip", "addr", "add", f"{addr6}/64", "dev", dev, "nodad"])
            yield Tunnelled(h, a, b, dev)
        finally:
            for ep in (a, b):
                status = ep.stop()
                assert status == 0, f"sttun up exited {status}: {ep.log_text()}"


def ping(ns: Netns, addr: str, count: int = 3, timeout: float = 30.0) -> str:
    """Ping ``addr`` from ``ns``; raises if not every reply arrives."""
    res = ns.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", addr], check=False, timeout=timeout
    )
    if res.returncode != 0:
        raise AssertionError(f"ping {addr} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def tcp_transfer(sender: Netns, receiver: Netns, addr: str, nbytes: int, port: int = 5201) -> None:
    """Send ``nbytes`` of pseudo-random data over TCP; assert the sha256 matches."""
    server = (
        "import hashlib,socket,sys\n"
        "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind((sys.argv[1],int(sys.argv[2])));s.listen(1);print('ready',flush=True)\n"
        "c,_=s.accept();h=hashlib.sha256();n=0\n"
        "while True:\n"
        "    d=c.recv(1<<20)\n"
        "    if not d: break\n"
        "    h.update(d);n+=len(d)\n"
        "print(n,h.hexdigest(),flush=True)\n"
    )
    client = (
        "import hashlib,socket,sys\n"
        "n=int(sys.argv[3]);h=hashlib.sha256();blk=bytes(range(256))*4096\n"
        "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=60)\n"
        "sent=0;i=0\n"
        "while sent<n:\n"
        "    b=hashlib.sha256(i.to_bytes(8,'big')).digest()*32768\n"
        "    b=b[:n-sent];s.sendall(b);h.update(b);sent+=len(b);i+=1\n"
        "s.shutdown(socket.SHUT_WR);s.recv(1);print(sent,h.hexdigest(),flush=True)\n"
    )
    srv = receiver.popen(
        [sys.executable, "-c", server, addr, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert srv.stdout is not None
    assert srv.stdout.readline().strip() == "ready"
    res = sender.run([sys.executable, "-c", client, addr, str(port), str(nbytes)], timeout=300)
    out, _ = srv.communicate(timeout=120)
    sent = res.stdout.split()
    got = out.split()
    assert int(sent[0]) == nbytes
    assert got == sent, f"sent {sent}, received {got}"
