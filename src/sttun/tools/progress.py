"""A progress bar for reading big capture files, and the file wrapper that drives it.

:func:`open_input` opens a capture for :class:`~sttun.io.pcap.CaptureReader`.  When
stderr is a terminal and the file is bigger than :data:`MIN_SIZE`, the returned
object advances a rich progress bar from ``readinto`` — once per chunk the reader
asks for (about 1 MiB), never per packet, so the bar costs nothing measurable.  In
every other case (a pipe, a small file, stdin, ``TERM=dumb``) it is the plain file
and nothing is printed; rich is not even imported.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: Files at least this big get a progress bar on a terminal.
MIN_SIZE = 8 * 1024 * 1024


class _NoBar:
    """Stands in for a progress bar when there is none."""

    def advance(self, n: int) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


class _RichBar:
    """A rich transfer bar on stderr (``transient``: it disappears when done)."""

    def __init__(self, total: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self._task = self._progress.add_task(label, total=total)
        self._progress.start()

    def advance(self, n: int) -> None:
        """Add ``n`` bytes read."""
        self._progress.advance(self._task, n)

    def close(self) -> None:
        """Stop the bar and remove it from the screen."""
        self._progress.stop()


class CountingFile:
    """A binary file opened for reading whose ``readinto`` feeds a progress bar.

    Has what :class:`~sttun.io.pcap.CaptureReader` needs (``readinto``, ``close``,
    ``name``); :attr:`bytes_read` counts the bytes handed out.
    """

    def __init__(self, raw: Any, name: str, bar: _NoBar | _RichBar) -> None:
        self._raw = raw
        self.name = name
        self.bytes_read = 0
        self._bar = bar

    def readinto(self, buffer: memoryview, /) -> int | None:
        """Read into ``buffer`` and advance the bar."""
        n: Any = self._raw.readinto(buffer)
        if n:
            self.bytes_read += n
            self._bar.advance(n)
        return n  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the bar and close the file (stdin is left open)."""
        try:
            self._bar.close()
        finally:
            if self._raw is not getattr(sys.stdin, "buffer", None):
                self._raw.close()

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _want_bar(size: int, force: bool | None) -> bool:
    if force is not None:
        return force
    if size < MIN_SIZE or os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def open_input(path: str, *, label: str = "reading", force: bool | None = None) -> CountingFile:
    """Open ``path`` (``-`` for stdin) for a capture reader, with a bar if it is worth it.

    ``force`` overrides the decision (True: always a bar, False: never).  Raises
    :class:`OSError` if the file cannot be opened.
    """
    if path == "-":
        return CountingFile(sys.stdin.buffer, "<stdin>", _NoBar())
    raw = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by CountingFile.close
    try:
        size = os.fstat(raw.fileno()).st_size
        bar: _NoBar | _RichBar = _RichBar(size, label) if _want_bar(size, force) else _NoBar()
    except BaseException:
        raw.close()
        raise
    return CountingFile(raw, path, bar)
