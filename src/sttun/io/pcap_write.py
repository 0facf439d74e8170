"""Classic pcap writer.

:class:`PcapWriter` writes a classic (libpcap) capture file: Ethernet link type by
default, microsecond or nanosecond timestamps, snaplen 262144.  Records are collected
in an in-memory buffer (header and data appended back to back, no join) and written
out in big chunks.  When the writer opened the file itself, large packets held in
immutable memory (``bytes``, or a ``memoryview`` of ``bytes``) are not copied into
the buffer: they are queued by reference, in order, and the queue goes to the file
with ``os.writev`` (``sttun decap`` writes reassembled frames this way).

A file interrupted by Ctrl-C stays a valid capture: a record enters the buffer whole
or not at all (an interrupted :meth:`PcapWriter.write` takes its half-appended bytes
back out), the buffer is written with whole records only, and the context manager /
:meth:`PcapWriter.close` flush whatever was buffered when an exception such as
``KeyboardInterrupt`` unwinds through it.
"""

from __future__ import annotations

import os
import struct
from typing import Final, Protocol

from sttun.errors import EncodeError

__all__ = ["DEFAULT_SNAPLEN", "PcapWriter"]

DEFAULT_SNAPLEN: Final = 262144
_LINKTYPE_ETHERNET: Final = 1
_FLUSH_AT: Final = 1 << 20
#: Packets at least this long, in immutable memory, are queued by reference.
_HOLD_MIN: Final = 4096
#: At most this many buffers per ``writev`` (Linux IOV_MAX is 1024).
_IOV_MAX: Final = 1024
_NS: Final = 1_000_000_000
_MAX_SEC: Final = 0xFFFFFFFF

_FILE_HDR = struct.Struct("<IHHiIII")
_REC_HDR = struct.Struct("<IIII")
_MAGIC_US: Final = 0xA1B2C3D4
_MAGIC_NS: Final = 0xA1B23C4D


class WritableBinary(Protocol):
    """What the writer needs from a file object."""

    def write(self, data: memoryview, /) -> int | None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class PcapWriter:
    """Write packets to a classic pcap file.

    ``target`` is a path (created/truncated) or a binary file object (left open by
    :meth:`close`).  ``linktype`` is the file's LINKTYPE_* value (1, Ethernet, by
    default); ``nanosecond=True`` writes the nanosecond-resolution magic
    (0xa1b23c4d) instead of the microsecond one.  ``buffer_size`` bytes are collected
    before a write to the file.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | WritableBinary,
        *,
        linktype: int = _LINKTYPE_ETHERNET,
        nanosecond: bool = False,
        snaplen: int = DEFAULT_SNAPLEN,
        buffer_size: int = _FLUSH_AT,
    ) -> None:
        if not 0 <= linktype <= 0xFFFF:
            raise EncodeError(f"pcap link type {linktype} out of range 0..65535")
        if not 0 < snaplen <= 0xFFFFFFFF:
            raise EncodeError(f"pcap snaplen {snaplen} out of range 1..4294967295")
        if isinstance(target, (str, os.PathLike)):
            self.name = os.fspath(target)
            raw = open(self.name, "wb", buffering=0)  # noqa: SIM115
            self._file: WritableBinary = raw
            self._fd: int | None = raw.fileno()  # for writev of queued packets
            self._owns = True
        else:
            self.name = str(getattr(target, "name", "<stream>"))
            self._file = target
            self._fd = None
            self._owns = False
        self.linktype = linktype
        self.nanosecond = nanosecond
        self.snaplen = snaplen
        self.packets = 0
        self._closed = False
        self._flush_at = max(int(buffer_size), 1)
        self._div = 1 if nanosecond else 1000
        magic = _MAGIC_NS if nanosecond else _MAGIC_US
        # The open record buffer; it is always the last entry of the write queue.
        self._buf = bytearray(_FILE_HDR.pack(magic, 2, 4, 0, 0, snaplen, linktype))
        self._queue: list[bytes | bytearray | memoryview] = [self._buf]
        self._queued = 0  # bytes queued by reference (not counting self._buf)

    def write(self, ts_ns: int, data: bytes | bytearray | memoryview, orig_len: int = -1) -> None:
        """Append one packet captured at ``ts_ns`` (integer ns since the epoch).

        ``orig_len`` is the length on the wire (default ``len(data)``); data longer
        than the snaplen is cut to it, as a capture would.  Raises
        :class:`sttun.errors.EncodeError` for a timestamp outside 0 .. 2**32 s.
        """
        if self._closed:
            raise ValueError(f"{self.name}: write to a closed PcapWriter")
        n = len(data)
        if orig_len < 0:
            orig_len = n
        sec, frac = divmod(ts_ns, _NS)
        if not 0 <= sec <= _MAX_SEC:
            raise EncodeError(f"pcap timestamp {ts_ns} ns out of range 0..2**32 s")
        if n > self.snaplen:
            data = memoryview(data)[: self.snaplen]
            n = self.snaplen
        rec = _REC_HDR.pack(sec, frac // self._div, n, orig_len)
        if n >= _HOLD_MIN and self._fd is not None and _immutable(data):
            # Queued by reference: the record header, the data, a new open buffer,
            # in one list operation (a Ctrl-C cannot split the record).
            new = bytearray()
            self._queue += (rec, data, new)
            self._buf = new
            self._queued += 16 + n
        else:
            buf = self._buf
            mark = len(buf)
            try:
                buf += rec
                buf += data
            except BaseException:
                del buf[mark:]  # never leave half a record behind (Ctrl-C)
                raise
        self.packets += 1
        if self._queued + len(self._buf) >= self._flush_at:
            self._write_out()

    def _write_out(self) -> None:
        """Write the queue (whole records only) to the file; keep what was not written."""
        if len(self._queue) > 1:
            self._write_queue()
        buf = self._buf
        done = 0
        view = memoryview(buf)
        try:
            write = self._file.write
            total = len(buf)
            while done < total:
                n = write(view[done:])
                if n is None:  # non-blocking file object that took nothing
                    continue
                done += n
        finally:
            view.release()
            del buf[:done]

    def _write_queue(self) -> None:
        """``writev`` every queue entry before the open buffer, in order."""
        assert self._fd is not None
        queue = self._queue
        while len(queue) > 1:
            batch = queue[: min(len(queue) - 1, _IOV_MAX)]
            n = os.writev(self._fd, batch)
            done = 0
            for part in batch:
                size = len(part)
                if n < size:
                    break
                n -= size
                done += 1
            if done < len(batch) and n:
                queue[done] = bytes(memoryview(queue[done])[n:])  # partly written
            del queue[:done]
        self._queued = 0  # only the open buffer is left

    def flush(self) -> None:
        """Write every buffered record to the file and flush the file object."""
        self._write_out()
        self._file.flush()

    def close(self) -> None:
        """Flush and, if the writer opened the file, close it.  Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._owns:
                self._file.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _immutable(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data``'s bytes cannot change: ``bytes``, or a flat byte view of one."""
    if type(data) is bytes:
        return True
    return (
        type(data) is memoryview
        and type(data.obj) is bytes
        and data.c_contiguous
        and data.itemsize == 1
    )
