"""An isolated Open vSwitch (ovsdb-server + ovs-vswitchd) per network namespace.

Used by the tests and by ``sttun demo --ovs``: every "host" gets its own database and
switch daemon, with every file they write (database, sockets, pid files, logs) in one
private directory, so several instances run side by side on one machine and none of
them touches the system's own Open vSwitch (docs/ovs.md)::

    with OvsHost(netns="sttun-a-123") as ovs:
        ovs.add_bridge("br-int")                   # datapath_type=netdev
        ovs.vsctl("add-port", "br-int", "veth0")
        print(ovs.db_remote)                       # unix:/tmp/sttun-ovs-.../db.sock

What :meth:`OvsHost.start` does, step by step:

1. ``ovsdb-tool create DIR/conf.db /usr/share/openvswitch/vswitch.ovsschema``;
2. ``ovsdb-server DIR/conf.db --remote=punix:DIR/db.sock --detach ...`` (in the
   namespace), with ``OVS_RUNDIR``/``OVS_DBDIR``/``OVS_LOGDIR``/``OVS_SYSCONFDIR``
   all set to ``DIR``; ``--detach`` returns once the server listens;
3. ``ovs-vsctl --no-wait init`` (the ``Open_vSwitch`` row);
4. ``ovs-vswitchd unix:DIR/db.sock --detach ...`` (in the namespace);
5. ready when ``ovs-vsctl --timeout=T init`` returns: that command waits until
   ovs-vswitchd has applied the database (``cur_cfg`` caught up with ``next_cfg``).

:meth:`OvsHost.stop` ends both daemons by the PIDs in their pid files (SIGTERM, then
SIGKILL after :data:`STOP_TIMEOUT`), waiting on a pidfd for each to exit, and
removes the directory.  Bridges are ``datapath_type=netdev`` (the userspace
datapath): this machine has no ``openvswitch`` kernel module.

Only :mod:`subprocess` calls to the Open vSwitch programs and ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sttun.errors import SetupError

#: The database schema Debian's ``openvswitch-common`` installs.
VSWITCH_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
#: Seconds the daemons get to come up (ovsdb-server, then ovs-vswitchd's first sync).
START_TIMEOUT = 30.0
#: Seconds a daemon gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds an ``ovs-vsctl`` command may wait for the database / for ovs-vswitchd.
VSCTL_TIMEOUT = 20
#: Where a directory is made when none is given (short: socket paths are <= 107 bytes).
DEFAULT_PARENT = "/tmp"
#: The programs :meth:`OvsHost.start` needs (Debian: ``openvswitch-switch``).
PROGRAMS = ("ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-vswitchd", "ovs-appctl")
DAEMONS = ("ovsdb-server", "ovs-vswitchd")
INSTALL_HINT = "apt-get install openvswitch-switch"


def missing_programs() -> list[str]:
    """The Open vSwitch programs not on PATH (empty when OVS is installed)."""
    return [p for p in PROGRAMS if shutil.which(p) is None]


def check_support() -> str | None:
    """Why an isolated Open vSwitch cannot run here, or None when it can."""
    missing = missing_programs()
    if missing:
        return f"Open vSwitch is not installed ({', '.join(missing)}): {INSTALL_HINT}"
    if not VSWITCH_SCHEMA.is_file():
        return f"Open vSwitch schema {VSWITCH_SCHEMA} is missing (package openvswitch-common)"
    if os.geteuid() != 0:
        return "Open vSwitch in a network namespace needs root"
    return None


class OvsHost:
    """One ovsdb-server + ovs-vswitchd pair, optionally inside network namespace ``netns``.

    ``directory``: where the database, sockets, pid files and logs go; by default a new
    temporary directory that :meth:`stop` removes (a given directory is emptied of
    nothing and left in place, only the daemons are stopped).
    """

    def __init__(self, netns: str | None = None, directory: str | Path | None = None) -> None:
        self.netns = netns
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else None
        self._started = False

    # -- paths -----------------------------------------------------------------
    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise SetupError("Open vSwitch host: not started")
        return self.dir / name

    @property
    def db_path(self) -> Path:
        """The database file (``conf.db``)."""
        return self._path("conf.db")

    @property
    def db_socket(self) -> Path:
        """ovsdb-server's unix socket."""
        return self._path("db.sock")

    @property
    def db_remote(self) -> str:
        """The OVSDB remote clients use: ``unix:DIR/db.sock``."""
        return f"unix:{self.db_socket}"

    def pidfile(self, daemon: str) -> Path:
        """``DIR/<daemon>.pid``."""
        return self._path(f"{daemon}.pid")

    def ctl(self, daemon: str) -> Path:
        """``DIR/<daemon>.ctl``: the daemon's unixctl socket (``ovs-appctl -t``)."""
        return self._path(f"{daemon}.ctl")

    def logfile(self, daemon: str) -> Path:
        """``DIR/<daemon>.log``."""
        return self._path(f"{daemon}.log")

    @property
    def env(self) -> dict[str, str]:
        """The environment every OVS program of this host runs with."""
        d = str(self._path(""))
        env = dict(os.environ)
        for var in ("OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR", "OVS_SYSCONFDIR", "OVS_PKGDATADIR"):
            env.pop(var, None)
        env.update(OVS_RUNDIR=d, OVS_DBDIR=d, OVS_LOGDIR=d, OVS_SYSCONFDIR=d)
        return env

    # -- running programs ---------------------------------------------------------
    def _argv(self, argv: Sequence[str], in_netns: bool) -> list[str]:
        if in_netns and self.netns:
            return ["ip", "netns", "exec", self.netns, *argv]
        return list(argv)

    def _run(
        self,
        argv: Sequence[str],
        *,
        in_netns: bool = False,
        timeout: float = VSCTL_TIMEOUT + 10,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        full = self._argv(argv, in_netns)
        try:
            res = subprocess.run(
                full, capture_output=True, text=True, timeout=timeout, env=self.env, check=False
            )
        except FileNotFoundError as e:
            raise SetupError(
                f"{argv[0]}: not installed (apt-get install openvswitch-switch)"
            ) from e
        except subprocess.TimeoutExpired as e:
            raise SetupError(f"{' '.join(argv)}: no answer in {timeout:g}s") from e
        if check and res.returncode != 0:
            detail = (res.stderr or res.stdout).strip()
            raise SetupError(f"{' '.join(argv)}: {detail or f'exit status {res.returncode}'}")
        return res

    def vsctl(self, *args: str, wait: bool = True, timeout: int = VSCTL_TIMEOUT) -> str:
        """Run ``ovs-vsctl --db=unix:DIR/db.sock --timeout=T ARGS`` and return its stdout.

        ``wait=False`` adds ``--no-wait`` (do not wait for ovs-vswitchd to apply the
        change).  Raises :class:`SetupError` with ovs-vsctl's message on failure.
        """
        argv = ["ovs-vsctl", f"--db={self.db_remote}", f"--timeout={timeout}"]
        if not wait:
            argv.append("--no-wait")
        return self._run([*argv, *args], timeout=timeout + 10).stdout

    def appctl(self, daemon: str, *args: str, timeout: int = VSCTL_TIMEOUT) -> str:
        """``ovs-appctl -t DIR/<daemon>.ctl ARGS`` (e.g. ``dpif/show``); returns stdout."""
        argv = ["ovs-appctl", f"--timeout={timeout}", "-t", str(self.ctl(daemon)), *args]
        return self._run(argv, timeout=timeout + 10).stdout

    def add_bridge(self, name: str, other_config: Mapping[str, str] | None = None) -> None:
        """``add-br NAME`` with ``datapath_type=netdev`` (waits for ovs-vswitchd)."""
        args = ["--may-exist", "add-br", name, "--", "set", "bridge", name, "datapath_type=netdev"]
        for k, v in (other_config or {}).items():
            args.append(f"other_config:{k}={v}")
        self.vsctl(*args)

    def set_userspace_tso(self, enabled: bool) -> None:
        """Set ``Open_vSwitch other_config:userspace-tso-enable``.

        OVS reads this once at start-up (``vswitch.xml``: "changing it requires
        restarting the daemon"): call it before :meth:`start` returns, i.e. pass
        ``userspace_tso`` to :meth:`start`, or restart ovs-vswitchd afterwards.
        """
        self.vsctl(
            "set",
            "Open_vSwitch",
            ".",
            f"other_config:userspace-tso-enable={'true' if enabled else 'false'}",
            wait=False,
        )

    # -- life cycle ---------------------------------------------------------------
    def start(self, *, userspace_tso: bool = False, timeout: float = START_TIMEOUT) -> None:
        """Create the database and start ovsdb-server and ovs-vswitchd (see module doc).

        ``userspace_tso``: set ``other_config:userspace-tso-enable=true`` before
        ovs-vswitchd starts (it only reads it then).
        """
        reason = check_support()
        if reason:
            raise SetupError(reason)
        if self._started:
            raise SetupError("Open vSwitch host: already started")
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="sttun-ovs-", dir=DEFAULT_PARENT))
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._started = True
        try:
            self._run(["ovsdb-tool", "create", str(self.db_path), str(VSWITCH_SCHEMA)])
            self.start_ovsdb_server(timeout=timeout)
            self.vsctl("init", wait=False)
            if userspace_tso:
                self.set_userspace_tso(True)
            self.start_vswitchd(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def start_ovsdb_server(self, timeout: float = START_TIMEOUT) -> None:
        """Start ovsdb-server on the existing database (also used to restart it)."""
        argv = [
            "ovsdb-server",
            str(self.db_path),
            f"--remote=punix:{self.db_socket}",
            f"--pidfile={self.pidfile('ovsdb-server')}",
            f"--unixctl={self.ctl('ovsdb-server')}",
            f"--log-file={self.logfile('ovsdb-server')}",
            "--detach",
        ]
        # --detach returns once the server has opened its remotes (daemonize_complete).
        self._run(argv, in_netns=True, timeout=timeout)
        if not self.db_socket.exists():
            raise SetupError(f"ovsdb-server started but {self.db_socket} does not exist")

    def start_vswitchd(self, timeout: float = START_TIMEOUT) -> None:
        """Start ovs-vswitchd and wait until it has applied the database."""
        argv = [
            "ovs-vswitchd",
            self.db_remote,
            f"--pidfile={self.pidfile('ovs-vswitchd')}",
            f"--unixctl={self.ctl('ovs-vswitchd')}",
            f"--log-file={self.logfile('ovs-vswitchd')}",
            "--detach",
        ]
        self._run(argv, in_netns=True, timeout=timeout)
        # Without --no-wait, "init" returns when ovs-vswitchd's cur_cfg reached next_cfg.
        self.vsctl("init", timeout=max(1, int(timeout)))

    def pid(self, daemon: str) -> int | None:
        """The PID in ``daemon``'s pid file if that process is alive, else None."""
        try:
            pid = int(self.pidfile(daemon).read_text().strip())
        except (OSError, ValueError, SetupError):
            return None
        return pid if process_running(pid) else None

    def stop_daemon(self, daemon: str, timeout: float = STOP_TIMEOUT) -> None:
        """Stop one daemon by its pid file's PID: SIGTERM, wait, SIGKILL if needed."""
        pid = self.pid(daemon)
        if pid is not None:
            end_process(pid, timeout)
        with contextlib.suppress(OSError, SetupError):
            self.pidfile(daemon).unlink()

    def stop(self) -> None:
        """Stop ovs-vswitchd, then ovsdb-server; remove the directory if we made it.

        Idempotent; safe after a failed :meth:`start`.
        """
        if self.dir is None:
            return
        for daemon in reversed(DAEMONS):
            self.stop_daemon(daemon)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self._started = False

    def log_tail(self, daemon: str, lines: int = 20) -> str:
        """The last ``lines`` lines of a daemon's log (for error messages)."""
        try:
            text = self.logfile(daemon).read_text(errors="replace")
        except (OSError, SetupError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> OvsHost:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OvsHost(netns={self.netns!r}, dir={str(self.dir)!r})"


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) S ...": the state follows the last ")" (comm may contain ")").
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def end_process(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``pid`` and wait (on a pidfd) up to ``timeout`` s for it to exit; then SIGKILL.

    Works for processes that are not our children (daemons that detached).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            if _wait_pidfd(pidfd, timeout):
                return
        raise SetupError(f"process {pid} did not exit after SIGKILL")
    finally:
        os.close(pidfd)


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """True once the process behind ``pidfd`` has exited (pidfd readable)."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if poller.poll(left * 1000):
            return True
