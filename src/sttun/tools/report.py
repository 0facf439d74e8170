"""Output helpers shared by the capture tools: error lines, tables, JSON.

Tables are drawn with rich when the stream is a terminal and as plain aligned
text otherwise (pipes, files, tests); rich is imported only in the first case.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import IO, Any

#: Exit status of the tools: success, runtime failure, bad input or usage.
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def fail(tool: str, message: str) -> int:
    """Print ``sttun TOOL: message`` on stderr and return :data:`EXIT_BAD_INPUT`."""
    print(f"sttun {tool}: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def open_error(path: str, err: OSError) -> str:
    """``"PATH: cannot open: No such file or directory"`` for an :class:`OSError`."""
    return f"{path}: cannot open: {err.strerror or err}"


def context_text(ctx: int | None) -> str:
    """A context id as the tools print it: hex, or ``?`` when unknown."""
    return "?" if ctx is None else f"{ctx:#x}"


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; under 1 KiB as plain bytes."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def checksum_note(ck: dict[str, int]) -> str:
    """The summary line on outer TCP checksums, shared by decap and inspect.

    Segments verified only once their inner checksum was finished
    (``inner_partial``) are named when there are any.
    """
    inner = ck.get("inner_partial", 0)
    return (
        f"TCP checksums: {ck['verified']} verified, {ck['offloaded']} offloaded "
        f"(not checkable), "
        + (f"{inner} verified with the inner checksum finished (left partial), " if inner else "")
        + f"{ck['unchecked']} not checked"
    )


def end_notes(summary: dict[str, Any], interrupted: str) -> list[str]:
    """Notes on how a scan ended: frames left incomplete, a cut last record, Ctrl-C."""
    notes = []
    if summary["incomplete_at_eof"]:
        notes.append(f"incomplete frames at end of capture: {summary['incomplete_at_eof']}")
    if summary["truncated"]:
        notes.append(f"note: the capture ends in a cut record: {summary['truncated']}")
    if summary["interrupted"]:
        notes.append(f"interrupted: {interrupted}")
    return notes


def print_json(data: Any, stream: IO[str] | None = None) -> None:
    """``data`` as indented JSON, one document, on ``stream`` (default stdout)."""
    out = sys.stdout if stream is None else stream
    import json  # here, not at the top: the tools start faster without it

    out.write(json.dumps(data, indent=2) + "\n")
    out.flush()


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def plain_table(headings: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Rows as aligned text; columns whose index is in ``right`` are right-aligned."""
    widths = [len(h) for h in headings]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headings, *rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_tables(
    sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]], set[int]]],
    notes: Sequence[str],
    stream: IO[str] | None = None,
) -> None:
    """Print titled tables ``(title, headings, rows, right-aligned columns)`` and notes.

    Uses rich on a terminal, plain text otherwise.  Empty tables print ``(none)``.
    """
    out = sys.stdout if stream is None else stream
    if _is_tty(out):
        try:
            _print_rich(sections, notes, out)
            return
        except ImportError:  # pragma: no cover - rich is a dependency
            pass
    parts = []
    for title, headings, rows, right in sections:
        body = plain_table(headings, rows, right) if rows else "(none)"
        parts.append(f"{title}\n{body}")
    out.write("\n\n".join(parts))
    if notes:
        out.write("\n\n" + "\n".join(notes))
    out.write("\n")
    out.flush()


def _print_rich(
    sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]], set[int]]],
    notes: Sequence[str],
    out: IO[str],
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out)
    for title, headings, rows, right in sections:
        if not rows:
            console.print(f"[bold]{title}[/bold]: (none)", highlight=False)
            continue
        table = Table(title=title, title_justify="left")
        for i, heading in enumerate(headings):
            table.add_column(heading, justify="right" if i in right else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in notes:
        console.print(line, highlight=False, markup=False)
