"""Two hosts running ``sttun up``: the building block of the endpoint e2e tests.

The hosts are :class:`sttun.tools.topology.TwoHosts` (through
:func:`tests.netns.make_two_hosts`) and the endpoints are started by
:func:`sttun.tools.topology.launch_sttun`, as in ``sttun demo``; what this module
adds is test-side: endpoints read through the ``sttun show --json`` command line,
tunnel pairs configured from flags or TOML files, traffic that asserts what it
delivered, waiting on events, and frame sniffers for TAPs.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sttun.tools import topology
from sttun.tools.topology import Host, TwoHosts, launch_sttun
from tests.netns import Netns, make_two_hosts

OVERLAY_A = "192.0.2.1"
OVERLAY_B = "192.0.2.2"
OVERLAY6_A = "2001:db8:1::1"
OVERLAY6_B = "2001:db8:1::2"


@dataclass
class Endpoint(topology.Endpoint):
    """One running ``sttun up`` in a namespace, read as a user would read it."""

    devs: list[str] = field(default_factory=list)

    @property
    def ns(self) -> Host:
        """The namespace it runs in."""
        return self.host

    @property
    def sock(self) -> str:
        """Its control socket."""
        return self.control_socket

    def show(self, timeout: float = 30.0) -> dict[str, Any]:
        """``sttun show --json`` of this endpoint (the command line, in its namespace)."""
        argv = [sys.executable, "-m", "sttun", "show", "--json", "--control-socket", self.sock]
        res = self.host.run(argv, timeout=timeout)
        data: dict[str, Any] = json.loads(res.stdout)
        return data


def start_endpoint(
    ns: Host,
    args: Sequence[str],
    devs: Sequence[str],
    tmp: Path,
    *,
    config: str | None = None,
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
) -> Endpoint:
    """Start ``sttun up ARGS`` in ``ns`` and wait until every TAP in ``devs`` exists.

    With ``config`` the text is written to ``<tmp>/<namespace>.toml`` and passed as
    ``-c``; ``env`` adds environment variables for the daemon.  Raises
    :class:`~sttun.errors.SetupError` with the end of the log if the daemon exits or
    does not come up.
    """
    sock = str(tmp / f"{ns.name}.sock")
    log = tmp / f"{ns.name}.log"
    argv = [sys.executable, "-m", "sttun", "up", "--control-socket", sock, "--instance", "e2e"]
    if config is not None:
        cfg = tmp / f"{ns.name}.toml"
        cfg.write_text(config)
        argv += ["-c", str(cfg)]
    argv += list(args)
    proc = launch_sttun(ns, argv, sock=sock, log=log, devs=devs, timeout=timeout, env=env)
    return Endpoint(ns, proc.pid, sock, log, proc, list(devs))


@dataclass
class Tunnelled:
    """Two hosts with an sttun endpoint each and overlay addresses on the TAPs."""

    hosts: TwoHosts
    a: Endpoint
    b: Endpoint
    dev: str


def _segment_in_software(h: TwoHosts) -> None:
    """Real MTU-sized segments on the wire (no TSO); GRO merges them at the receiver."""
    for host in h.hosts:
        host.ethtool(topology.UNDERLAY_DEV, tso=False, gso=True, gro=True)


def _stop_all(*eps: Endpoint) -> None:
    """Stop every endpoint; each must exit with status 0."""
    for ep in eps:
        status = ep.stop(timeout=15.0)
        assert status == 0, f"sttun up exited {status}: {ep.log_text()}"


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
            _segment_in_software(h)
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
            _stop_all(a, b)


def ping(ns: Host, addr: str, count: int = 3, timeout: float = 30.0) -> str:
    """Ping ``addr`` from ``ns``; raises if not every reply arrives."""
    res = ns.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", addr], check=False, timeout=timeout
    )
    if res.returncode != 0:
        raise AssertionError(f"ping {addr} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


_RECEIVER = """\
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""
_SENDER = """\
import hashlib, socket, sys, time
n, io_timeout, rate = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
h = hashlib.sha256()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=io_timeout)
sent = 0; i = 0; t0 = time.monotonic()
while sent < n:
    b = hashlib.sha256(i.to_bytes(8, "big")).digest() * (2048 if rate else 32768)
    b = b[: n - sent]; s.sendall(b); h.update(b); sent += len(b); i += 1
    ahead = t0 + sent / rate - time.monotonic() if rate else 0
    if ahead > 0:
        time.sleep(ahead)  # pacing: about `rate` bytes a second
s.shutdown(socket.SHUT_WR); s.recv(1); print(sent, h.hexdigest(), flush=True)
"""


def tcp_transfer(
    sender: Host,
    receiver: Host,
    addr: str,
    nbytes: int,
    port: int = 5201,
    io_timeout: float = 60.0,
    rate: float = 0.0,
) -> None:
    """Send ``nbytes`` of pseudo-random data over TCP; assert the sha256 matches.

    ``io_timeout``: how long one blocking socket call may wait (a lossy path needs
    more patience: TCP backs off exponentially when a retransmission is lost too).
    ``rate`` > 0 paces the sender at about that many bytes a second (so the transfer
    lasts long enough to be interrupted).
    """
    srv = receiver.popen(
        [sys.executable, "-c", _RECEIVER, addr, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert srv.stdout is not None
    assert srv.stdout.readline().strip() == "ready"
    argv = [sys.executable, "-c", _SENDER, addr, str(port), str(nbytes), str(io_timeout)]
    res = sender.run([*argv, str(rate)], timeout=max(300.0, 2 * io_timeout))
    out, _ = srv.communicate(timeout=max(120.0, io_timeout))
    sent = res.stdout.split()
    got = out.split()
    assert int(sent[0]) == nbytes
    assert got == sent, f"sent {sent}, received {got}"


# --------------------------------------------------------------------------- reliability helpers
# (tests/e2e/test_reliability_*.py and tests/soak: multi-tunnel hosts, TOML configs, polling)


def config_toml(tunnels: Sequence[dict[str, Any]], **daemon: Any) -> str:
    """A TOML configuration: ``[daemon]`` from keyword arguments, one ``[[tunnel]]`` each."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    lines = ["[daemon]", *(f"{k} = {val(v)}" for k, v in daemon.items())]
    for t in tunnels:
        lines += ["", "[[tunnel]]", *(f"{k} = {val(v)}" for k, v in t.items())]
    return "\n".join(lines) + "\n"


def wait_until(
    pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``pred()`` until it returns something truthy, and return that.

    AssertionError naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or pred}")
        time.sleep(interval)


def drops_of(ep: Endpoint) -> dict[str, int]:
    """Top-level drops of ``ep`` plus every tunnel's drops, summed per reason."""
    data = ep.show()
    out: dict[str, int] = dict(data.get("drops", {}))
    for t in data["tunnels"]:
        for k, v in (t.get("drops") or {}).items():
            out[k] = out.get(k, 0) + v
    return out


@dataclass
class Star:
    """A hub namespace joined to each peer namespace by its own veth pair.

    Link ``i`` is ``hub_devs[i]`` (198.18.<i>.1/24) <-> ``peer_devs[i]``
    (198.18.<i>.2/24) in ``peers[i]``; IPv4 underlay only.
    """

    hub: Netns
    peers: list[Netns]
    hub_devs: list[str]
    peer_devs: list[str]

    def hub_ip(self, i: int) -> str:
        """The hub's address on link ``i``."""
        return f"198.18.{i}.1"

    def peer_ip(self, i: int) -> str:
        """Peer ``i``'s address."""
        return f"198.18.{i}.2"


@contextlib.contextmanager
def make_star(n: int) -> Iterator[Star]:
    """A hub and ``n`` peers, each on its own veth link (see :class:`Star`)."""
    from tests.netns import ifname, unique_suffix, veth_pair

    sfx = unique_suffix()
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(Netns("hub"))
        peers = [stack.enter_context(Netns(f"p{i}")) for i in range(n)]
        s = Star(hub, peers, [], [])
        for i, p in enumerate(peers):
            hd, pd = ifname(f"h{i}", sfx), ifname(f"p{i}", sfx)
            veth_pair(hub, p, hd, pd, f"198.18.{i}.1/24", f"198.18.{i}.2/24")
            s.hub_devs.append(hd)
            s.peer_devs.append(pd)
        yield s


def sample_reassembly(ep: Endpoint, stop: Any, out: list[dict[str, int]], period: float) -> None:
    """Append ``show()["reassembly"]`` to ``out`` every ``period`` s until ``stop`` is set.

    Meant for a thread: ``stop`` is a :class:`threading.Event`.
    """
    while not stop.is_set():
        with contextlib.suppress(Exception):
            out.append(dict(ep.show()["reassembly"]))
        stop.wait(period)


# --------------------------------------------------------------------------- TOML configs
# (added for the test_endpoint_*.py files: many tunnels per daemon, reloads, raw frames)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"no TOML rendering for {value!r}")


def tunnels_toml(tunnels: Sequence[dict[str, object]]) -> str:
    """A config file of ``[[tunnel]]`` tables, keys rendered in the order given."""
    out: list[str] = []
    for t in tunnels:
        out.append("[[tunnel]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in t.items()]
        out.append("")
    return "\n".join(out)


def config_path(ep: Endpoint) -> Path:
    """The TOML file :func:`start_endpoint` wrote for ``ep`` (rewrite it, then SIGHUP)."""
    return ep.log.with_suffix(".toml")


@dataclass
class TenantSpec:
    """One tunnel of a :func:`config_pair`: its name (= TAP), key and overlay /24s."""

    name: str
    key: int
    addr_a: str  # "192.0.2.1/24": put on A's TAP
    addr_b: str  # "192.0.2.2/24": put on B's TAP
    options: dict[str, object] = field(default_factory=dict)  # more [[tunnel]] keys

    def table(self, local: str, remote: str) -> dict[str, object]:
        """The ``[[tunnel]]`` table for the side whose underlay address is ``local``."""
        return {
            "name": self.name,
            "local_ip": local,
            "remote_ip": remote,
            "key": self.key,
            **self.options,
        }


@dataclass
class ConfigPair:
    """Two hosts running ``sttun up -c FILE`` with several tunnels each."""

    hosts: TwoHosts
    a: Endpoint
    b: Endpoint
    tenants: list[TenantSpec]
    local_a: str
    local_b: str

    def config_for(self, side: str, tenants: Sequence[TenantSpec]) -> str:
        """The TOML text of ``side`` ("a" or "b") serving ``tenants``."""
        la, lb = (self.local_a, self.local_b) if side == "a" else (self.local_b, self.local_a)
        return tunnels_toml([t.table(la, lb) for t in tenants])


@contextlib.contextmanager
def config_pair(
    tmp: Path,
    tenants: Sequence[TenantSpec],
    *,
    ipv6_underlay: bool = False,
    veth_tso: bool = True,
) -> Iterator[ConfigPair]:
    """Like :func:`tunnel_pair`, with a TOML file of several tunnels on each side."""
    with make_two_hosts() as h:
        if not veth_tso:
            _segment_in_software(h)
        la, lb = (h.ip6_a, h.ip6_b) if ipv6_underlay else (h.ip_a, h.ip_b)
        devs = [t.name for t in tenants]
        cfg_a = tunnels_toml([t.table(la, lb) for t in tenants])
        cfg_b = tunnels_toml([t.table(lb, la) for t in tenants])
        a = start_endpoint(h.a, [], devs, tmp, config=cfg_a)
        try:
            b = start_endpoint(h.b, [], devs, tmp, config=cfg_b)
        except BaseException:
            a.stop()
            raise
        try:
            for t in tenants:
                h.a.run(["ip", "addr", "add", t.addr_a, "dev", t.name])
                h.b.run(["ip", "addr", "add", t.addr_b, "dev", t.name])
            yield ConfigPair(h, a, b, list(tenants), la, lb)
        finally:
            _stop_all(a, b)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """:func:`wait_until` for a predicate whose value is not needed."""
    wait_until(predicate, timeout, what=what)


def link_exists(ns: Host, dev: str) -> bool:
    """True if ``dev`` exists in ``ns``."""
    return ns.run(["ip", "link", "show", dev], check=False).returncode == 0


# --------------------------------------------------------------------------- raw frames on a TAP
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
TPACKET_AUXDATA = struct.Struct("=IIIHHHH")
"""struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, vlan_tpid."""


def packet_socket(ns: Host, dev: str) -> socket.socket:
    """An ``AF_PACKET``/``SOCK_RAW`` socket bound to ``dev`` in ``ns``, with auxdata on.

    Frames written to it leave through ``dev`` exactly as given (tags in-band);
    :func:`recv_frame` reads frames with the kernel's out-of-band VLAN tag put back.
    """
    with ns.entered():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        s.bind((dev, ETH_P_ALL))
    except BaseException:
        s.close()
        raise
    return s


def recv_frame(
    s: socket.socket, match: bytes, timeout: float = 5.0
) -> tuple[bytes, tuple[int, int] | None]:
    """The next incoming frame on ``s`` that contains ``match``, tag restored in-band.

    Returns ``(frame, aux_tag)``: ``aux_tag`` is ``(tpid, tci)`` if the kernel handed
    the tag over as auxdata (then it is also re-inserted into ``frame`` after the MAC
    addresses), else None.  Outgoing frames are skipped.  AssertionError on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no frame containing {match!r} within {timeout}s")
        ready, _, _ = select.select([s], [], [], left)
        if not ready:
            continue
        data, anc, _flags, addr = s.recvmsg(65536, socket.CMSG_SPACE(TPACKET_AUXDATA.size))
        if addr[2] == PACKET_OUTGOING or match not in data:
            continue
        tag = None
        for level, kind, cdata in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                status, _l, _s, _m, _n, tci, tpid = TPACKET_AUXDATA.unpack_from(cdata)
                if status & TP_STATUS_VLAN_VALID or tci:
                    if not status & TP_STATUS_VLAN_TPID_VALID:
                        tpid = 0x8100
                    tag = (tpid, tci)
        if tag is not None:
            data = data[:12] + struct.pack("!HH", *tag) + data[12:]
        return data, tag


class TapSniffer:
    """Every frame arriving on a TAP (an ``AF_PACKET`` socket in its namespace).

    :meth:`wait_for` waits for a frame carrying a marker: sent after the packets
    under test, its arrival is the positive sign that they have all been handled.
    """

    def __init__(self, ns: Host, dev: str) -> None:
        with ns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self.sock.bind((dev, ETH_P_ALL))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.dev = dev
        #: every frame received so far
        self.frames: list[bytes] = []

    def drain(self) -> list[bytes]:
        """Read what is waiting; every frame received so far."""
        while True:
            try:
                self.frames.append(self.sock.recv(70000))
            except BlockingIOError:
                return self.frames

    def with_marker(self, marker: bytes) -> list[bytes]:
        """The frames received so far that contain ``marker``."""
        return [f for f in self.drain() if marker in f]

    def wait_for(self, marker: bytes, timeout: float = 10.0) -> bytes:
        """The first frame containing ``marker``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.with_marker(marker)
            if found:
                return found[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame with {marker!r} on {self.dev} in {timeout:g}s")
            select.select([self.sock], [], [], left)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> TapSniffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def udp_frame(
    dst_mac: str,
    src_mac: str,
    src_ip: str,
    dst_ip: str,
    payload: bytes,
    *,
    tags: Sequence[tuple[int, int]] = (),
    sport: int = 40000,
    dport: int = 9,
) -> bytes:
    """An Ethernet/IPv4/UDP frame (UDP checksum 0), with VLAN ``tags`` ``(tpid, tci)``
    in-band after the MAC addresses, outermost first."""
    from tests.netns import ipv4_header, mac_bytes

    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = ipv4_header(src_ip, dst_ip, len(udp), proto=17)
    l2 = mac_bytes(dst_mac) + mac_bytes(src_mac)
    for tpid, tci in tags:
        l2 += struct.pack("!HH", tpid, tci)
    return l2 + b"\x08\x00" + ip + udp
