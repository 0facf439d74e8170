"""sttun.io.tap: TAP devices with vnet headers, a relay between two of them."""

from __future__ import annotations

import json
import select
import sys
import threading

import pytest

from sttun.errors import SetupError
from sttun.io.tap import TAP_READ_SIZE, VNET_HDR_LEN, TapDevice
from sttun.tools.topology import Host
from tests.netns import VNET_HDR, ifname, unique_suffix

pytestmark = pytest.mark.netns

NBYTES = 8 * 1024 * 1024

SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.0.2.2", 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while (d := c.recv(1 << 16)):
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = """
import hashlib, socket, sys
data = bytes(range(256)) * (int(sys.argv[1]) // 256)
s = socket.create_connection(("192.0.2.2", 5001), timeout=30); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def _link(ns: Host, dev: str) -> dict:  # type: ignore[type-arg]
    return json.loads(ns.run(["ip", "-j", "-d", "addr", "show", dev]).stdout)[0]


class Relay(threading.Thread):
    """Copies frames with their vnet headers between two TAPs (scatter-gather write)."""

    def __init__(self, t1: TapDevice, t2: TapDevice) -> None:
        super().__init__(daemon=True)
        self.t1, self.t2 = t1, t2
        self.stop = threading.Event()
        self.frames = 0
        self.gso_frames = 0
        self.max_len = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        buf = bytearray(TAP_READ_SIZE)
        mv = memoryview(buf)
        peer = {self.t1.fileno(): self.t2, self.t2.fileno(): self.t1}
        src = {self.t1.fileno(): self.t1, self.t2.fileno(): self.t2}
        try:
            while not self.stop.is_set():
                ready, _, _ = select.select(list(src), [], [], 0.1)
                for fd in ready:
                    while (n := src[fd].read_into(buf)) > 0:
                        self.frames += 1
                        self.max_len = max(self.max_len, n - VNET_HDR_LEN)
                        if VNET_HDR.unpack_from(buf)[1] != 0:
                            self.gso_frames += 1
                        peer[fd].write(mv[:VNET_HDR_LEN], mv[VNET_HDR_LEN:n])
        except BaseException as e:  # reported by the test
            self.errors.append(e)


@pytest.mark.parametrize("offload", [True, False])
def test_relay_between_taps(netns_factory, offload: bool) -> None:  # type: ignore[no-untyped-def]
    """TCP over two TAPs joined by a Python relay: intact data; with offload the
    relay sees GSO super-frames, without it only MTU-sized frames."""
    a, b = netns_factory("ta"), netns_factory("tb")
    sfx = unique_suffix()
    with a.entered():
        ta = TapDevice(ifname("ta", sfx), offload=offload, mtu=1500)
    with b.entered():
        tb = TapDevice(ifname("tb", sfx), offload=offload, mtu=1500)
    a.run(["ip", "addr", "add", "192.0.2.1/24", "dev", ta.name])
    b.run(["ip", "addr", "add", "192.0.2.2/24", "dev", tb.name])
    relay = Relay(ta, tb)
    relay.start()
    try:
        server = b.popen([sys.executable, "-c", SERVER], stdout=-1, text=True)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = a.run([sys.executable, "-c", CLIENT, str(NBYTES)], timeout=120)
        sent = client.stdout.split()
        got = server.stdout.readline().split()
        server.wait(timeout=30)
    finally:
        relay.stop.set()
        relay.join(timeout=5)
        ta.close()
        tb.close()
    assert not relay.errors, relay.errors
    assert got == sent and int(got[0]) == NBYTES
    if offload:
        assert relay.gso_frames > 0 and relay.max_len > 1514
    else:
        assert relay.gso_frames == 0 and relay.max_len <= 1514


def test_persistent_reopen_keeps_config(netns_factory) -> None:  # type: ignore[no-untyped-def]
    ns = netns_factory("tp")
    name, br = ifname("tp"), ifname("br")
    ns.run(["ip", "link", "add", br, "type", "bridge"])
    with ns.entered():
        t = TapDevice(name, persist=True, mtu=9000, bridge=br)
        mac = t.mac
        t.close()  # persistent: stays
    ns.run(["ip", "addr", "add", "192.0.2.9/24", "dev", name])
    info = _link(ns, name)
    assert info["mtu"] == 9000 and info["master"] == br
    with ns.entered():
        t2 = TapDevice(name, offload=False)
        assert t2.existed and t2.persistent and t2.mac == mac
    info = _link(ns, name)
    assert info["master"] == br and info["mtu"] == 9000
    assert any(a["local"] == "192.0.2.9" for a in info["addr_info"])
    assert "UP" in info["flags"]
    t2.close(remove=True)
    assert ns.run(["ip", "link", "show", name], check=False).returncode != 0


def test_non_persistent_vanishes(netns_factory) -> None:  # type: ignore[no-untyped-def]
    ns = netns_factory("tv")
    name = ifname("tv")
    with ns.entered():
        t = TapDevice(name)
        assert len(t.mac) == 17 and t.fileno() >= 0
        buf = bytearray(TAP_READ_SIZE)
        assert t.read_into(buf) in range(0, TAP_READ_SIZE)  # 0 or an IPv6 ND frame
        t.close()
        t.close()  # idempotent
    assert ns.run(["ip", "link", "show", name], check=False).returncode != 0


@pytest.mark.parametrize(
    ("name", "kw", "msg"),
    [
        ("x" * 16, {}, "at most 15"),
        ("a/b", {}, "not allow"),
        ("", {}, "non-empty"),
        ("tapok", {"mtu": 67}, "MTU"),
        ("tapok", {"mtu": 65001}, "MTU"),
        ("tapok", {"bridge": "nobridge"}, "does not exist"),
        ("lo", {}, "not a free TAP"),
    ],
)
def test_setup_errors(netns_factory, name: str, kw: dict, msg: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    ns = netns_factory("te")
    with ns.entered():
        with pytest.raises(SetupError, match=msg):
            TapDevice(name, **kw)
        # a failed set-up leaves nothing behind
        assert ns.run(["ip", "link", "show", "tapok"], check=False).returncode != 0


def test_bridge_must_be_a_bridge(netns_factory) -> None:  # type: ignore[no-untyped-def]
    ns = netns_factory("tb")
    with ns.entered(), pytest.raises(SetupError, match="not a bridge"):
        TapDevice(ifname("tx"), bridge="lo")
