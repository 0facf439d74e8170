"""Network namespaces as hosts, and two of them on a veth underlay: the test bed.

The demo, the benchmarks and the end-to-end tests all build their worlds from this
module (the tests through thin fixtures in ``tests/netns.py``):

* :func:`create_namespace` / :class:`Host` — a named network namespace: run commands
  in it (``ip netns exec``), start processes that are stopped when it is deleted,
  switch the calling thread into it (:meth:`Host.entered`);
* :func:`add_veth`, :func:`add_address`, :func:`wait_link_ready` — links between
  hosts, usable (IPv6 included) when the call returns;
* :class:`TwoHosts` — two namespaces ``<prefix>-<suffix>-a`` and ``-b`` joined by a
  veth pair (``eth0`` in each) with both underlay families from the documentation
  ranges (198.18.0.1/.2 and 2001:db8:0:1::1/::2); ``ipv6`` selects the family the
  overlays use.  With ``routed=True`` a third namespace ``-r`` forwards between them
  instead (a's ``eth0`` to the router's ``eth0``, the router's ``eth1`` to b's
  ``eth0``; a 198.18.0.1/24 and b 198.18.1.2/24, 2001:db8:0:1::1/80 and
  2001:db8:0:1:1::2/80): forwarding orphans each packet as a physical NIC's receive
  path does, so GRO on b merges the segments of one frame whole.  On top of it:

  * :meth:`TwoHosts.start_sttun` — an ``sttun up`` endpoint in each namespace (a
    subprocess: ``python -m sttun up ...``), overlay addresses on their TAP devices;
  * :meth:`TwoHosts.add_vxlan` — the kernel's VXLAN device between the same hosts;
  * :meth:`TwoHosts.add_overlay_on_underlay` — the overlay addresses on the veth itself.

Everything lives inside the namespaces: deleting them (:meth:`TwoHosts.close`)
removes the interfaces, the routes and the endpoints' nftables tables with them; the
processes are stopped first.  A small state directory under :data:`STATE_ROOT`
records who owns the hosts so that :func:`remove_stale` can find and remove hosts
that a ``--keep`` run (or a killed one) left behind.

A namespace made here has IPv6 duplicate address detection off: on a veth between
two namespaces of our own there is nobody to collide with, and while a link-local
address is still tentative the kernel sends no neighbour solicitation at all, so the
first IPv6 neighbour resolutions after ``link up`` would fail for a second or two
(longer on a loaded machine).  :func:`wait_link_ready` then waits until the kernel
has really brought the link up (its link watch runs asynchronously) and IPv6 has
configured it.

Only :mod:`subprocess` calls to ``ip``, ``ethtool`` and ``sysctl``; nothing here needs
pyroute2, so the module is cheap to import.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sttun.errors import SetupError

#: Where the hosts' control sockets, logs and ownership notes live.
STATE_ROOT = Path("/run/sttun/hosts")

UNDERLAY4 = ("198.18.0.1", "198.18.0.2", 24)
UNDERLAY6 = ("2001:db8:0:1::1", "2001:db8:0:1::2", 64)
#: With a router: (a, b, prefix length); a's and b's links are different subnets.
ROUTED4 = ("198.18.0.1", "198.18.1.2", 24)
ROUTED6 = ("2001:db8:0:1::1", "2001:db8:0:1:1::2", 80)
#: The router's addresses: (towards a, towards b) for IPv4 and IPv6.
ROUTER4 = ("198.18.0.254", "198.18.1.254")
ROUTER6 = ("2001:db8:0:1::fe", "2001:db8:0:1:1::fe")
ROUTER_DEV_B = "eth1"
OVERLAY4 = ("192.0.2.1", "192.0.2.2", 24)
OVERLAY6 = ("2001:db8:1::1", "2001:db8:1::2", 64)

UNDERLAY_DEV = "eth0"
STT_DEV = "stt0"
VXLAN_DEV = "vxlan0"
VXLAN_PORT = 4789

#: Seconds ``sttun up`` may take to open its control socket and create its TAP.
START_TIMEOUT = 20.0
#: Seconds an endpoint gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds a new link may take to come up (the kernel's link watch, IPv6 set-up).
LINK_TIMEOUT = 20.0

_KEPT = "kept"
_OWNER = "owner"
_CLONE_NEWNET = 0x40000000


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input: str | bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; text output captured.  Raises :class:`SetupError` on failure."""
    text_in = input.decode() if isinstance(input, bytes) else input
    try:
        res = subprocess.run(
            list(argv),
            input=text_in,
            stdin=None if text_in is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise SetupError(f"{argv[0]}: not installed") from e
    except subprocess.TimeoutExpired as e:
        raise SetupError(f"{' '.join(argv)}: no answer in {timeout:g}s") from e
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise SetupError(f"{' '.join(argv)}: {detail[-1] if detail else res.returncode}")
    return res


def list_namespaces() -> list[str]:
    """Names of all named network namespaces."""
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Processes running in namespace ``name``."""
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_pids(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``pids``, wait up to ``timeout``, then SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def ipv6_available() -> bool:
    """True unless this kernel runs without IPv6 (``ipv6.disable=1``)."""
    return os.path.exists("/proc/sys/net/ipv6")


def create_namespace(name: str) -> None:
    """``ip netns add name``, ``lo`` up, IPv6 duplicate address detection off.

    DAD is off for every link made in the namespace afterwards (see the module
    docstring); raises :class:`SetupError` and leaves nothing behind on failure.
    """
    run(["ip", "netns", "add", name])
    try:
        keys = ("all", "default") if ipv6_available() else ()
        for key in keys:
            run(
                [
                    "ip",
                    "netns",
                    "exec",
                    name,
                    "sysctl",
                    "-q",
                    "-w",
                    f"net.ipv6.conf.{key}.accept_dad=0",
                ]
            )
        run(["ip", "-n", name, "link", "set", "lo", "up"])
    except BaseException:
        delete_namespace(name)
        raise


def delete_namespace(name: str) -> None:
    """End every process in namespace ``name`` and delete it (quiet if it is gone)."""
    _end_pids(namespace_pids(name))
    deadline = time.monotonic() + 5.0
    while True:
        if run(["ip", "netns", "del", name], check=False).returncode == 0:
            return
        if name not in list_namespaces():
            return
        if time.monotonic() > deadline:
            raise SetupError(f"cannot delete network namespace {name}")
        time.sleep(0.1)  # "ip netns del" fails while exiting processes still hold it


class Host:
    """One named network namespace: run commands in it, start processes in it.

    Processes started with :meth:`popen` are stopped by :meth:`stop_processes` and
    :meth:`delete` (every other process in the namespace is ended by
    :func:`delete_namespace` too).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[Any]] = []

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec NAME``."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace and wait; raises :class:`SetupError` on failure."""
        return run(self.argv(argv), check=check, timeout=timeout, input=input)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace (``ip netns exec`` execs it: same pid)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def ip(self, *args: str) -> str:
        """``ip ARGS`` in the namespace; its stdout."""
        return self.run(["ip", *args]).stdout

    def ethtool(self, dev: str, **features: bool | str) -> None:
        """``ethtool -K dev feature on|off ...``: values True/False or "on"/"off"
        (underscores in feature names become dashes)."""
        args: list[str] = []
        for k, v in features.items():
            if isinstance(v, str) and v not in ("on", "off"):
                raise ValueError(f"ethtool feature {k}: expected on/off, got {v!r}")
            value = v if isinstance(v, str) else ("on" if v else "off")
            args += [k.replace("_", "-"), value]
        self.run(["ethtool", "-K", dev, *args])

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl inside the namespace."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def link_mac(self, dev: str) -> str:
        """The MAC address of ``dev``."""
        return str(json.loads(self.ip("-j", "link", "show", dev))[0]["address"])

    @contextlib.contextmanager
    def entered(self) -> Iterator[Host]:
        """Switch the calling *thread* into this namespace for the ``with`` block.

        Sockets, TAP devices and netlink sockets created inside the block belong to
        the namespace for their whole life; subprocesses started inside the block run
        in it.  (``/sys`` is not remounted, unlike ``ip netns exec``.)
        """
        old = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            new = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(new)
                try:
                    yield self
                finally:
                    _setns(old)
            finally:
                os.close(new)
        finally:
            os.close(old)

    def stop_processes(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the processes :meth:`popen` started, SIGKILL after ``timeout``; reap them."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self.procs.clear()

    def delete(self) -> None:
        """Stop our processes and delete the namespace (quiet if it is gone)."""
        self.stop_processes()
        delete_namespace(self.name)

    def __repr__(self) -> str:
        return f"Host({self.name!r})"


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def add_veth(a: Host, name_a: str, b: Host, name_b: str, mtu: int = 1500) -> None:
    """A veth pair: ``name_a`` in ``a`` and ``name_b`` in ``b`` (both still down).

    Both ends are created inside their namespaces, so no name ever exists in the
    namespace of the caller.
    """
    a.ip(
        "link", "add", name_a, "mtu", str(mtu), "type", "veth",
        "peer", "name", name_b, "netns", b.name, "mtu", str(mtu),
    )  # fmt: skip


def add_address(host: Host, dev: str, cidr: str) -> None:
    """``ip addr add cidr dev dev``; IPv6 addresses with ``nodad`` (usable at once)."""
    extra = ["nodad"] if ":" in cidr else []
    host.ip("addr", "add", cidr, "dev", dev, *extra)


def link_state(host: Host, dev: str) -> tuple[str, bool, bool]:
    """(operstate, has a usable IPv6 link-local address, has a tentative address)."""
    info = json.loads(host.ip("-j", "addr", "show", "dev", dev))[0]
    addrs = info.get("addr_info") or []
    link_local = any(
        a.get("family") == "inet6" and a.get("scope") == "link" and not a.get("tentative")
        for a in addrs
    )
    tentative = any(a.get("tentative") for a in addrs)
    return str(info.get("operstate", "")), link_local, tentative


def wait_link_ready(
    host: Host, dev: str, *, ipv6: bool = True, timeout: float = LINK_TIMEOUT
) -> None:
    """Wait until ``dev`` is operationally up and, with ``ipv6``, IPv6 is configured
    on it (a usable link-local address, nothing tentative).

    ``ip link set up`` returns before the kernel's link watch has run (it batches
    events, about once a second, later under load); until then the peer may drop
    multicast such as IPv6 neighbour solicitations.  Raises :class:`SetupError`
    after ``timeout`` seconds naming what was still missing.
    """
    deadline = time.monotonic() + timeout
    while True:
        state, link_local, tentative = link_state(host, dev)
        ready = state == "UP" and (not ipv6 or (link_local and not tentative))
        if ready:
            return
        if time.monotonic() > deadline:
            raise SetupError(
                f"{dev} in {host.name} not ready after {timeout:g}s: operstate {state}, "
                f"IPv6 link-local {'yes' if link_local else 'no'}, "
                f"tentative addresses {'yes' if tentative else 'no'}"
            )
        time.sleep(0.02)


@dataclass
class Endpoint:
    """One ``sttun up`` running in a host."""

    host: Host
    pid: int
    control_socket: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def show(self, timeout: float = 5.0) -> dict[str, Any]:
        """The endpoint's ``sttun show --json`` data (over its control socket)."""
        from sttun.daemon.control import query

        return query(self.control_socket, "show", timeout=timeout)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the endpoint process has used so far."""
        return process_cpu_seconds(self.pid)

    def alive(self) -> bool:
        """True while the process runs."""
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_alive(self.pid)

    def log_text(self) -> str:
        """What the endpoint logged so far ('' if nothing)."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tunnel(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        """One tunnel's entry of :meth:`show` (KeyError if there is none)."""
        for t in self.show(timeout=timeout).get("tunnels") or []:
            if t.get("name") == name:
                return dict(t)
        raise KeyError(name)

    def stop(self, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` (SIGTERM), wait, SIGKILL if needed; the exit status if it is
        our child."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return self.proc.returncode
        _end_pids([self.pid], timeout)
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat


def check_support() -> str | None:
    """Why this machine cannot build the hosts, as one line; None when it can."""
    if os.geteuid() != 0:
        return "must be run as root (network namespaces, TAP devices and AF_PACKET need it)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: the kernel needs TUN/TAP support (modprobe tun)"
    if shutil.which("ip") is None:
        return "the 'ip' command is missing (apt install iproute2)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    return None


def new_suffix() -> str:
    """A short random suffix for names."""
    return secrets.token_hex(3)


@dataclass
class TwoHosts:
    """Two namespaces ``a`` and ``b`` on a veth underlay, with an optional overlay.

    Use as a context manager, or call :meth:`build` and :meth:`close`.  The veth
    (``eth0`` on both sides) carries both underlay families; ``ipv6`` selects the one
    the overlays (:attr:`underlay`) use.  ``underlay_mtu`` is the veth MTU.
    ``routed`` puts a router namespace (:attr:`router`) between the two (see the
    module doc).
    """

    prefix: str = "sttun-hosts"
    ipv6: bool = False
    underlay_mtu: int = 1500
    routed: bool = False
    suffix: str = field(default_factory=new_suffix)
    a: Host = field(init=False)
    b: Host = field(init=False)
    router: Host | None = field(default=None, init=False)
    endpoints: list[Endpoint] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.a = Host(f"{self.prefix}-{self.suffix}-a")
        self.b = Host(f"{self.prefix}-{self.suffix}-b")
        if self.routed:
            self.router = Host(f"{self.prefix}-{self.suffix}-r")

    # -- addresses ---------------------------------------------------------------
    @property
    def underlay(self) -> tuple[str, str, int]:
        """(address of a, address of b, prefix length) on the underlay the overlays use."""
        if self.routed:
            return ROUTED6 if self.ipv6 else ROUTED4
        return UNDERLAY6 if self.ipv6 else UNDERLAY4

    @property
    def overlay(self) -> tuple[str, str, int]:
        """(address of a, address of b, prefix length) of the IPv4 overlay."""
        return OVERLAY4

    @property
    def dev_a(self) -> str:
        """The underlay device in a."""
        return UNDERLAY_DEV

    @property
    def dev_b(self) -> str:
        """The underlay device in b."""
        return UNDERLAY_DEV

    @property
    def ip_a(self) -> str:
        """a's IPv4 underlay address."""
        return UNDERLAY4[0]

    @property
    def ip_b(self) -> str:
        """b's IPv4 underlay address."""
        return ROUTED4[1] if self.routed else UNDERLAY4[1]

    @property
    def ip6_a(self) -> str:
        """a's IPv6 underlay address."""
        return UNDERLAY6[0]

    @property
    def ip6_b(self) -> str:
        """b's IPv6 underlay address."""
        return ROUTED6[1] if self.routed else UNDERLAY6[1]

    @property
    def state_dir(self) -> Path:
        """This pair's directory for sockets, logs and ownership notes."""
        return STATE_ROOT / f"{self.prefix}-{self.suffix}"

    @property
    def hosts(self) -> tuple[Host, Host]:
        """(a, b)."""
        return self.a, self.b

    @property
    def namespaces(self) -> tuple[Host, ...]:
        """Every namespace of the set-up: a, b and the router if there is one."""
        return (self.a, self.b) if self.router is None else (self.a, self.b, self.router)

    # -- life cycle --------------------------------------------------------------
    def build(self) -> TwoHosts:
        """Create the namespaces and the veth underlay: addresses set, links up and
        ready (:func:`wait_link_ready`).  Without IPv6 in the kernel the underlay is
        IPv4 only (and ``ipv6=True`` is refused)."""
        if self.ipv6 and not ipv6_available():
            raise SetupError("this kernel has no IPv6 (booted with ipv6.disable=1)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / _OWNER).write_text(f"{os.getpid()}\n")
        try:
            for host in self.namespaces:
                create_namespace(host.name)
            if self.router is not None:
                self._build_routed(self.router)
                return self
            add_veth(self.a, UNDERLAY_DEV, self.b, UNDERLAY_DEV, self.underlay_mtu)
            v6 = ipv6_available()
            for i, host in enumerate(self.hosts):
                for addr in (UNDERLAY4, UNDERLAY6) if v6 else (UNDERLAY4,):
                    add_address(host, UNDERLAY_DEV, f"{addr[i]}/{addr[2]}")
                host.ip("link", "set", UNDERLAY_DEV, "up")
            for host in self.hosts:
                wait_link_ready(host, UNDERLAY_DEV, ipv6=v6)
        except BaseException:
            with contextlib.suppress(SetupError):
                self.close()
            raise
        return self

    def _build_routed(self, r: Host) -> None:
        """a --eth0/eth0-- router --eth1/eth0-- b, forwarding on, links ready."""
        v6 = ipv6_available()
        add_veth(self.a, UNDERLAY_DEV, r, UNDERLAY_DEV, self.underlay_mtu)
        add_veth(self.b, UNDERLAY_DEV, r, ROUTER_DEV_B, self.underlay_mtu)
        families = ((ROUTED4, ROUTER4), (ROUTED6, ROUTER6)) if v6 else ((ROUTED4, ROUTER4),)
        for i, (host, rdev) in enumerate(((self.a, UNDERLAY_DEV), (self.b, ROUTER_DEV_B))):
            for ends, gws in families:
                add_address(host, UNDERLAY_DEV, f"{ends[i]}/{ends[2]}")
                add_address(r, rdev, f"{gws[i]}/{ends[2]}")
            host.ip("link", "set", UNDERLAY_DEV, "up")
            r.ip("link", "set", rdev, "up")
        for i, host in enumerate(self.hosts):
            far4 = ROUTER4[1 - i].rsplit(".", 1)[0] + ".0"
            host.ip("route", "add", f"{far4}/{ROUTED4[2]}", "via", ROUTER4[i])
            if v6:
                far6 = ROUTER6[1 - i].rsplit(":", 1)[0] + ":"
                host.ip("-6", "route", "add", f"{far6}/{ROUTED6[2]}", "via", ROUTER6[i])
        r.sysctl("net.ipv4.ip_forward", "1")
        if v6:
            r.sysctl("net.ipv6.conf.all.forwarding", "1")
        for host, dev in ((self.a, UNDERLAY_DEV), (self.b, UNDERLAY_DEV), (r, UNDERLAY_DEV),
                          (r, ROUTER_DEV_B)):  # fmt: skip
            wait_link_ready(host, dev, ipv6=v6)

    def keep(self) -> None:
        """Mark the hosts as left running on purpose (:func:`remove_stale` removes them)."""
        (self.state_dir / _KEPT).write_text(f"{time.time():.0f}\n")

    def close(self) -> None:
        """Stop the endpoints and delete both namespaces and the state directory."""
        errors: list[str] = []
        for ep in self.endpoints:
            try:
                ep.stop()
            except Exception as e:
                errors.append(str(e))
        self.endpoints.clear()
        for host in self.namespaces:
            try:
                host.delete()
            except SetupError as e:
                errors.append(str(e))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if errors:
            raise SetupError("; ".join(errors))

    def __enter__(self) -> TwoHosts:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- underlay variants -------------------------------------------------------
    def set_underlay_offloads(self, host: Host, **features: bool) -> None:
        """``ethtool -K eth0 ...`` in ``host`` (e.g. ``tso=False``, ``gro=True``)."""
        host.ethtool(UNDERLAY_DEV, **features)

    # -- overlays ----------------------------------------------------------------
    def add_overlay_on_underlay(self) -> str:
        """Put the overlay addresses on the veth itself (no tunnel); returns the device.

        With a router the two ends are on different links: each gets its overlay
        addresses as host routes (/32, /128) and a route to the other's through the
        router, which reaches both directly."""
        if self.router is None:
            self.add_overlay(UNDERLAY_DEV)
            return UNDERLAY_DEV
        r = self.router
        ends = (
            (self.a, UNDERLAY_DEV, OVERLAY4[0], OVERLAY6[0], ROUTER4[0], ROUTER6[0]),
            (self.b, ROUTER_DEV_B, OVERLAY4[1], OVERLAY6[1], ROUTER4[1], ROUTER6[1]),
        )
        for i, (host, rdev, addr4, addr6, gw4, gw6) in enumerate(ends):
            far4, far6 = OVERLAY4[1 - i], OVERLAY6[1 - i]
            add_address(host, UNDERLAY_DEV, f"{addr4}/32")
            add_address(host, UNDERLAY_DEV, f"{addr6}/128")
            host.ip("route", "add", f"{far4}/32", "via", gw4, "src", addr4)
            host.ip("-6", "route", "add", f"{far6}/128", "via", gw6, "src", addr6)
            r.ip("route", "add", f"{addr4}/32", "dev", rdev)
            r.ip("-6", "route", "add", f"{addr6}/128", "dev", rdev)
        return UNDERLAY_DEV

    def add_vxlan(self, vni: int = 42, dev: str = VXLAN_DEV, mtu: int | None = None) -> str:
        """A kernel VXLAN device in each host (dstport 4789) with the overlay addresses."""
        addr_a, addr_b, _ = self.underlay
        overhead = 70 if self.ipv6 else 50
        size = mtu if mtu is not None else self.underlay_mtu - overhead
        for host, local, remote in ((self.a, addr_a, addr_b), (self.b, addr_b, addr_a)):
            host.ip(
                "link", "add", dev, "mtu", str(size), "type", "vxlan", "id", str(vni),
                "local", local, "remote", remote, "dstport", str(VXLAN_PORT),
                "dev", UNDERLAY_DEV,
            )  # fmt: skip
            host.ip("link", "set", dev, "up")
        self.add_overlay(dev)
        return dev

    def start_sttun(
        self,
        *,
        key: int = 0x5747,
        dev: str = STT_DEV,
        mtu: int = 1500,
        offload: bool = True,
        detach: bool = False,
        instance: str = "hosts",
        extra: Sequence[str] = (),
    ) -> tuple[Endpoint, Endpoint]:
        """Start ``sttun up`` in both hosts and put the overlay addresses on ``dev``.

        ``detach``: the endpoints get their own session and survive this process
        (for ``--keep``).  Raises :class:`SetupError` (with the endpoint's log) if one
        does not come up in :data:`START_TIMEOUT` seconds.
        """
        addr_a, addr_b, _ = self.underlay
        eps = []
        for host, local, remote in ((self.a, addr_a, addr_b), (self.b, addr_b, addr_a)):
            argv = [
                sys.executable, "-m", "sttun", "up",
                "--local-ip", local, "--remote-ip", remote, "--key", hex(key),
                "--dev", dev, "--mtu", str(mtu),
                "--instance", instance,
                "--control-socket", str(self.state_dir / f"{host.name}.sock"),
                *([] if offload else ["--no-offload"]), *extra,
            ]  # fmt: skip
            eps.append(self._start_endpoint(host, argv, dev, detach))
        self.add_overlay(dev)
        return eps[0], eps[1]

    def _start_endpoint(self, host: Host, argv: list[str], dev: str, detach: bool) -> Endpoint:
        log = self.state_dir / f"{host.name}.log"
        sock = argv[argv.index("--control-socket") + 1]
        proc = launch_sttun(host, argv, sock=sock, log=log, devs=[dev])
        ep = Endpoint(host, proc.pid, sock, log, proc)
        self.endpoints.append(ep)
        if detach:
            (self.state_dir / f"{host.name}.pid").write_text(f"{proc.pid}\n")
        return ep

    def add_overlay(self, dev: str) -> None:
        """Put the overlay addresses (IPv4 and IPv6) on ``dev`` in both hosts, link up."""
        oa, ob, plen = self.overlay
        a6, b6, plen6 = OVERLAY6
        for host, addr, addr6 in ((self.a, oa, a6), (self.b, ob, b6)):
            host.ip("addr", "add", f"{addr}/{plen}", "dev", dev)
            host.ip("addr", "add", f"{addr6}/{plen6}", "dev", dev, "nodad")
            host.ip("link", "set", dev, "up")

    def enter_commands(self) -> list[str]:
        """Shell commands that open a shell in each host."""
        return [f"ip netns exec {h.name} bash" for h in self.hosts]


def launch_sttun(
    host: Host,
    argv: Sequence[str],
    *,
    sock: str,
    log: Path,
    devs: Sequence[str],
    timeout: float = START_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (an ``sttun up`` command line) in ``host``, output to ``log``
    (``env``: variables added to this process's environment for it).

    Returns once the control socket ``sock`` and every TAP in ``devs`` exist.  The
    process gets its own session (a Ctrl-C reaches only the caller, which stops it in
    order).  Raises :class:`SetupError` with the end of its log if it exits or does
    not come up in ``timeout`` seconds (it is killed then).
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    with open(log, "wb") as fh:
        proc: subprocess.Popen[bytes] = host.popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SetupError(
                f"sttun up in {host.name} exited with status {proc.returncode}: {_tail(log)}"
            )
        if os.path.exists(sock) and all(_link_exists(host, d) for d in devs):
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SetupError(
                f"sttun up in {host.name} did not come up in {timeout:g}s: {_tail(log)}"
            )
        time.sleep(0.05)


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def _link_exists(host: Host, dev: str) -> bool:
    return host.run(["ip", "link", "show", dev], check=False).returncode == 0


@dataclass
class StaleHosts:
    """A pair of hosts found by :func:`find_hosts`."""

    name: str
    namespaces: list[str]
    kept: bool
    owner_alive: bool
    state_dir: Path


def find_hosts(prefix: str) -> list[StaleHosts]:
    """Host pairs whose namespaces start with ``prefix-`` (running or left behind)."""
    groups: dict[str, list[str]] = {}
    for ns in list_namespaces():
        if ns.startswith(prefix + "-") and ns[-2:] in ("-a", "-b", "-r"):
            groups.setdefault(ns[:-2], []).append(ns)
    found = []
    for name, namespaces in sorted(groups.items()):
        state = STATE_ROOT / name
        kept = (state / _KEPT).exists()
        try:
            owner = int((state / _OWNER).read_text().strip())
            alive = _pid_alive(owner)
        except (OSError, ValueError):
            alive = False
        found.append(StaleHosts(name, sorted(namespaces), kept, alive, state))
    return found


def remove_stale(prefix: str) -> list[str]:
    """Remove host pairs under ``prefix`` that were kept or whose owner is gone.

    Hosts whose building process still runs (and did not mark them kept) are left
    alone, so a ``--down`` never pulls the floor from under a running demo.  Returns
    the namespaces removed.
    """
    removed: list[str] = []
    for pair in find_hosts(prefix):
        if pair.owner_alive and not pair.kept:
            continue
        for ns in pair.namespaces:
            delete_namespace(ns)
            removed.append(ns)
        shutil.rmtree(pair.state_dir, ignore_errors=True)
    return removed


@contextlib.contextmanager
def two_hosts(**kwargs: Any) -> Iterator[TwoHosts]:
    """``with two_hosts(prefix=..., ipv6=...) as h:`` — built, and always removed."""
    hosts = TwoHosts(**kwargs)
    hosts.build()
    try:
        yield hosts
    finally:
        hosts.close()
