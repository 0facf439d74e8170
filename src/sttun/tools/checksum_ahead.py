"""Outer TCP checksums verified in a second process, ahead of the capture scan.

Checking every STT segment's TCP checksum is about half of what ``sttun decap``
does per segment (the sum runs at C speed through ``int.from_bytes``, and that is
as fast as pure Python sums bytes), and the check of one segment depends on no
other.  So on a machine with two or more CPUs the scan forks a *verifier*: a child
process that opens the same capture file, reads it with the same reader, finds
the TCP segments to the STT ports with the same classifier
(:func:`sttun.tools.capture_scan.locate_segment`) and checks their checksums with
the same function (:func:`sttun.core.outer.tcp_checksum_ok`).  It sends the scan,
through a pipe and a batch of records at a time, how far it has got and the
numbers of the records whose checksum failed.  The scan keeps checking one record
in :data:`PERIOD` itself (the two processes then take about as long per record)
and waits only when it catches up with the verifier.

What the tools report does not change: a record the verifier has not reached when
it stops (the file ended or turned unreadable for it, or it died) is checked by the
scan itself; a failed check is judged by the scan exactly as before (offloaded, an
inner checksum left partial, or bad: :mod:`sttun.tools.capture_scan`).  The
verifier is bounded by the pipe (it blocks when the scan has not read its last
batches), ignores Ctrl-C (the scan stops it), and ends by itself when the scan is
gone (a write to the pipe fails).

Used only for regular files of at least :data:`MIN_FILE_SIZE` bytes (stdin and
pipes cannot be read twice; for small files the fork costs more than it saves),
and only with ``jobs >= 2``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import struct
from collections.abc import Collection, Iterator
from typing import Final

__all__ = ["MIN_FILE_SIZE", "PERIOD", "ChecksumAhead", "default_jobs", "verifier_for"]

#: Files smaller than this are verified in-process (the fork is not worth it).
MIN_FILE_SIZE: Final = 4 * 1024 * 1024
#: The scan checks the records whose number is a multiple of this itself; the
#: verifier checks the others (a power of two: the scan tests ``n & (PERIOD - 1)``).
PERIOD: Final = 8
#: Records per message from the verifier.
_BATCH: Final = 512
#: Message header: records done (1-based count), failed records that follow, done flag.
_HEAD: Final = struct.Struct("<QII")
_U64: Final = struct.Struct("<Q")


def default_jobs() -> int:
    """Processes ``sttun decap`` uses by default: 2 when two CPUs are ours, else 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


@contextlib.contextmanager
def verifier_for(
    path: str, ports: Collection[int], *, verify: bool, jobs: int | None
) -> Iterator[ChecksumAhead | None]:
    """A verifier for the capture ``path`` while the block runs, or None.

    None when checksums are not verified, with ``jobs`` 1 (``None``:
    :func:`default_jobs`), or when :meth:`ChecksumAhead.start` finds it not worth
    it.  Start it before anything else (a progress bar's thread, open outputs): it
    forks.  Stopped and reaped when the block ends.
    """
    ahead = None
    if verify and (jobs or default_jobs()) >= 2:
        ahead = ChecksumAhead.start(path, ports)
    try:
        yield ahead
    finally:
        if ahead is not None:
            ahead.close()


class ChecksumAhead:
    """The scan's side of a verifier process.

    ``failed`` holds the numbers (1-based, as the scan counts records) of the
    records the verifier checked and found bad, up to :attr:`upto`; ``done``
    becomes True when it has sent its last batch.
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        self.failed: set[int] = set()
        self.upto = 0
        self.done = False

    @classmethod
    def start(cls, path: str, ports: Collection[int]) -> ChecksumAhead | None:
        """Fork a verifier for the capture file ``path``; None if it is not worth it.

        None for stdin (``-``), anything that is not a regular file, a file below
        :data:`MIN_FILE_SIZE`, or when the fork fails.
        """
        if path == "-":
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size < MIN_FILE_SIZE:
            return None
        try:
            rfd, wfd = os.pipe()
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError:
            os.close(rfd)
            os.close(wfd)
            return None
        if pid == 0:  # the verifier: never returns
            os.close(rfd)
            status = 0
            try:
                _verify(path, frozenset(ports), wfd)
            except BaseException:  # the scan checks what the verifier did not
                status = 1
            os._exit(status)
        os.close(wfd)
        return cls(pid, rfd)

    def wait(self, record: int) -> int:
        """Read batches until record number ``record`` is covered or the verifier is done.

        Returns :attr:`upto`, the number of records the verifier has covered.
        """
        while self.upto < record and not self.done:
            head = self._read(_HEAD.size)
            if head is None:  # the verifier is gone: the scan checks the rest
                self.done = True
                break
            upto, count, done = _HEAD.unpack(head)
            if count:
                body = self._read(count * _U64.size)
                if body is None:
                    self.done = True
                    break
                self.failed.update(v for (v,) in _U64.iter_unpack(body))
            self.upto = upto
            self.done = bool(done)
        return self.upto

    def _read(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes from the pipe, or None at its end (or on an error)."""
        parts = []
        while n:
            try:
                chunk = os.read(self._fd, n)
            except InterruptedError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Stop the verifier (if it still runs) and reap it."""
        if self._fd >= 0:
            os.close(self._fd)  # a verifier still writing gets EPIPE and ends
            self._fd = -1
        if self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.pid, 0)
            self.pid = 0


def _verify(path: str, ports: frozenset[int], wfd: int) -> None:
    """The verifier process: check the file's STT segments, report the failed ones."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from sttun.core.outer import tcp_checksum_ok
    from sttun.errors import CaptureError
    from sttun.io.pcap import CaptureReader
    from sttun.tools.capture_scan import locate_segment

    own = PERIOD - 1
    failed: list[int] = []
    record = 0
    next_send = _BATCH

    def send(done: bool) -> None:
        msg = _HEAD.pack(record, len(failed), done) + b"".join(_U64.pack(r) for r in failed)
        view = memoryview(msg)
        while view:
            view = view[os.write(wfd, view) :]
        failed.clear()

    with open(path, "rb", buffering=0) as f:
        try:
            for _ts, linktype, data, _orig in CaptureReader(f):
                record += 1
                if record & own and (found := locate_segment(linktype, data)) is not None:
                    l3, seg = found
                    if (
                        type(seg) is tuple
                        and seg[4] in ports
                        and not tcp_checksum_ok(data, l3, seg[8], seg[9])
                    ):
                        failed.append(record)
                if record >= next_send:
                    send(False)
                    next_send = record + _BATCH
        except CaptureError:
            pass  # the scan meets the same error (or reads more): it checks the rest
    send(True)
