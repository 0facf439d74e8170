"""tcpdump writing a capture file inside a host: started and stopped on events.

:class:`Capture` runs ``tcpdump -U -w FILE`` in a :class:`~sttun.tools.topology.Host`
(the demo's wire check and the end-to-end tests use it) and never guesses with a
sleep:

* :meth:`Capture.start` returns once tcpdump says it is listening (its socket is
  open and filtered, so every packet from then on is seen);
* :meth:`Capture.sync` asks tcpdump for its counters (``SIGUSR1``: packets
  captured, received by the filter, dropped by the kernel) until every packet its
  socket has received is in the file — each one written whole (``-U``), or counted
  as dropped;
* :meth:`Capture.stop` syncs, then ends tcpdump (``SIGINT``) and keeps its final
  counters (:attr:`Capture.dropped`).

What a sync cannot know is traffic that has not reached the capture socket yet: wait
for the event that proves it did (the reply arrived, the receiver has the data, a
counter moved) before :meth:`~Capture.sync` or :meth:`~Capture.stop`, or wait for the
packets themselves with :meth:`Capture.wait_for`.

By default tcpdump uses the kernel's ``TPACKET_V3`` ring, which packs packets
tightly (a 32 MiB buffer holds tens of thousands of MTU-sized ones) but hands them
over in blocks, up to a second late; ``immediate=True`` hands each over at once, in
fixed slots of the snapshot length (about 128 of them for 32 MiB and 256 KiB).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sttun.errors import SetupError
from sttun.tools.topology import Host, run

#: Seconds tcpdump may take to start listening.
START_TIMEOUT = 20.0
#: Seconds a sync may take (tcpdump's blocks are handed over at least once a second).
SYNC_TIMEOUT = 15.0

_STATS = re.compile(
    rb"(\d+) packets? captured,? +(\d+) packets? received by filter,? +"
    rb"(\d+) packets? dropped by kernel"
)


@dataclass(frozen=True)
class CaptureStats:
    """tcpdump's counters: packets written, passed by the filter, dropped by the kernel."""

    captured: int
    received: int
    dropped: int

    @property
    def complete(self) -> bool:
        """True when every packet the filter passed is written or counted as dropped."""
        return self.captured + self.dropped >= self.received


class Capture:
    """tcpdump on ``dev`` in ``host``, writing ``path``; use as a context manager.

    ``bpf`` is a tcpdump filter expression; ``link_type`` a ``-y`` data link type
    (e.g. ``LINUX_SLL2`` with ``dev="any"``).
    """

    def __init__(
        self,
        host: Host,
        dev: str,
        path: str | os.PathLike[str],
        bpf: str = "",
        *,
        snaplen: int = 262144,
        buffer_kib: int = 32768,
        link_type: str | None = None,
        immediate: bool = False,
    ) -> None:
        self.host, self.dev, self.path, self.bpf = host, dev, Path(path), bpf
        self.argv = ["tcpdump", "-i", dev, "-n", "-U", "-Z", "root", "-s", str(snaplen)]
        self.argv += ["-B", str(buffer_kib)]
        if link_type:
            self.argv += ["-y", link_type]
        if immediate:
            self.argv.append("--immediate-mode")
        self.argv += ["-w", str(self.path), *bpf.split()]
        self.proc: subprocess.Popen[bytes] | None = None
        self._err = b""
        #: the final counters, known after :meth:`stop`
        self.final: CaptureStats | None = None

    @property
    def dropped(self) -> int | None:
        """Packets tcpdump reported "dropped by kernel" (after :meth:`stop`; else None)."""
        return self.final.dropped if self.final is not None else None

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> Capture:
        """Start tcpdump; returns once it is listening.  :class:`SetupError` if it does not."""
        self.proc = self.host.popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while b"listening on" not in self._err:
            if not self._read_err(deadline):
                self._kill()
                raise SetupError(f"tcpdump on {self.dev} in {self.host.name} did not start: "
                                 f"{self._err.decode(errors='replace').strip()}")  # fmt: skip
        return self

    def stats(self, timeout: float = 5.0) -> CaptureStats:
        """tcpdump's counters now (it prints them on ``SIGUSR1``)."""
        proc = self._running()
        self._err = b""
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            m = _STATS.search(self._err)
            if m:
                return CaptureStats(int(m[1]), int(m[2]), int(m[3]))
            if not self._read_err(deadline):
                raise SetupError(
                    f"tcpdump on {self.dev} in {self.host.name} gave no counters in "
                    f"{timeout:g}s: {self._err.decode(errors='replace').strip()}"
                )

    def sync(self, timeout: float = SYNC_TIMEOUT) -> CaptureStats:
        """Wait until every packet the capture socket has received is in the file."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if st.complete:
                return st
            if time.monotonic() > deadline:
                raise SetupError(
                    f"tcpdump on {self.dev} in {self.host.name} wrote {st.captured} of the "
                    f"{st.received} packets it received ({st.dropped} dropped) in {timeout:g}s"
                )
            time.sleep(0.05)  # tcpdump gets the next block of packets from the kernel

    def wait_for(self, n: int, bpf: str = "", timeout: float = SYNC_TIMEOUT) -> int:
        """Wait until the file holds at least ``n`` packets matching ``bpf``; the count.

        Raises :class:`SetupError` with the count reached after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.sync(timeout=max(1.0, deadline - time.monotonic()))
            got = self.count(bpf)
            if got >= n:
                return got
            if time.monotonic() > deadline:
                what = f" matching {bpf!r}" if bpf else ""
                raise SetupError(
                    f"capture on {self.dev} in {self.host.name}: {got} packets{what} "
                    f"after {timeout:g}s, expected at least {n}"
                )
            time.sleep(0.05)

    def stop(self, *, sync: bool = True) -> CaptureStats | None:
        """Sync (unless told not to), end tcpdump and keep its final counters."""
        if self.proc is None:
            return self.final
        try:
            if sync and self.proc.poll() is None:
                self.sync()
        finally:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            self._err += err or b""
            m = re.search(
                rb"(\d+) packets? captured\s+(\d+) packets? received by filter\s+"
                rb"(\d+) packets? dropped by kernel",
                self._err,
            )
            if m:
                self.final = CaptureStats(int(m[1]), int(m[2]), int(m[3]))
        return self.final

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # after a failure in the block, only stop: a sync error would hide it
        self.stop(sync=exc_type is None)

    # -- reading the file ----------------------------------------------------------
    def count(self, bpf: str = "") -> int:
        """Packets in the file matching a tcpdump filter expression.

        Works while tcpdump runs: a packet being written just now (a cut record at
        the end) is not counted.
        """
        res = run(["tcpdump", "-n", "-r", str(self.path), *bpf.split()], check=False)
        if res.returncode != 0 and "truncated dump file" not in res.stderr:
            raise SetupError(f"tcpdump -r {self.path}: {res.stderr.strip()}")
        return len([ln for ln in res.stdout.splitlines() if ln.strip()])

    # -- helpers -------------------------------------------------------------------
    def _running(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise SetupError(f"tcpdump on {self.dev} in {self.host.name} is not running")
        if self.proc.poll() is not None:
            self._read_err(time.monotonic())
            raise SetupError(
                f"tcpdump on {self.dev} in {self.host.name} exited with status "
                f"{self.proc.returncode}: {self._err.decode(errors='replace').strip()}"
            )
        return self.proc

    def _read_err(self, deadline: float) -> bool:
        """Read what tcpdump wrote to stderr until ``deadline``; False at end or timeout."""
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        data = os.read(fd, 65536)
        self._err += data
        return bool(data)

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()
            self.proc = None
