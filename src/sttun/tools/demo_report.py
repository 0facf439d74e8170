"""The demo's results and how they are shown: a live step display and a one-screen report.

:class:`Report` collects :class:`Check` lines; :class:`Display` shows each step as it
runs (a rich spinner on a terminal, plain lines otherwise, e.g. in CI logs) and the
final report with the endpoints' counters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    """One line of the final report."""

    name: str
    ok: bool | None  # None: skipped / informational
    detail: str


@dataclass
class Report:
    """Everything the demo found out."""

    title: str
    checks: list[Check] = field(default_factory=list)
    counters: list[list[str]] = field(default_factory=list)

    def add(self, name: str, ok: bool | None, detail: str) -> Check:
        """Record a check and return it."""
        check = Check(name, ok, detail)
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        """True when no check failed."""
        return all(c.ok is not False for c in self.checks)


class Display:
    """Step-by-step progress: a rich spinner per step on a terminal, plain lines else."""

    def __init__(self, rich: bool) -> None:
        self.rich = rich
        self._console: Any = None
        self._n = 0
        if rich:
            from rich.console import Console

            self._console = Console(highlight=False)

    def line(self, text: str) -> None:
        """A line of text."""
        if self._console is not None:
            self._console.print(text, markup=False)
        else:
            print(text, flush=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        """Run a step; yields ``update(text)`` to show live progress under the title.

        The step's outcome line is printed by :meth:`done` (or ``failed`` when the
        block raises).
        """
        self._n += 1
        label = f"[{self._n}] {title}"
        if self._console is None:
            print(f"{label} ...", flush=True)
            yield lambda text: None
            return
        with self._console.status(label) as status:

            def update(text: str) -> None:
                status.update(f"{label} — {text}")

            try:
                yield update
            except BaseException:
                self._console.print(f"[red]✗[/red] {label}")
                raise

    def done(self, check: Check) -> None:
        """Show a step's result."""
        mark = {True: "ok", False: "FAIL", None: "skip"}[check.ok]
        if self._console is not None:
            colour = {True: "green", False: "red", None: "yellow"}[check.ok]
            sym = {True: "✓", False: "✗", None: "–"}[check.ok]
            self._console.print(f"[{colour}]{sym}[/{colour}] {check.name}: {_escape(check.detail)}")
        else:
            print(f"    {mark}: {check.name}: {check.detail}", flush=True)

    def report(self, report: Report) -> None:
        """The one-screen final report."""
        verdict = "PASS" if report.passed else "FAIL"
        if self._console is not None:
            from rich.panel import Panel
            from rich.table import Table

            table = Table.grid(padding=(0, 2))
            table.add_column(style="bold", no_wrap=True)
            table.add_column(no_wrap=True)
            table.add_column()
            for c in report.checks:
                mark = {
                    True: "[green]ok[/green]",
                    False: "[red]FAIL[/red]",
                    None: "[yellow]–[/yellow]",
                }[c.ok]
                table.add_row(c.name, mark, _escape(c.detail))
            counters = Table(box=None, padding=(0, 2), show_edge=False)
            for i, h in enumerate(COUNTER_HEADINGS):
                counters.add_column(h, justify="right" if i else "left")
            for row in report.counters:
                counters.add_row(*row)
            colour = "green" if report.passed else "red"
            body = Table.grid()
            body.add_row(table)
            if report.counters:
                body.add_row("")
                body.add_row(counters)
            self._console.print(
                Panel(
                    body,
                    title=f"{report.title} — [{colour}]{verdict}[/{colour}]",
                    title_align="left",
                )
            )
            return
        print("", flush=True)
        print(f"=== {report.title}: {verdict} ===")
        width = max(len(c.name) for c in report.checks) if report.checks else 0
        for c in report.checks:
            mark = {True: "ok", False: "FAIL", None: "-"}[c.ok]
            print(f"{c.name.ljust(width)}  {mark.ljust(4)}  {c.detail}")
        if report.counters:
            print("")
            print(_plain_table(list(COUNTER_HEADINGS), report.counters))
        print(f"result: {verdict}", flush=True)


#: Columns of the counters table (one row per endpoint).
COUNTER_HEADINGS = (
    "endpoint",
    "tx frames",
    "tx bytes",
    "tx segs",
    "rx frames",
    "rx bytes",
    "rx segs",
    "drops",
)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _plain_table(headings: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headings, *rows]) for i in range(len(headings))]
    lines = []
    for row in [headings, *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
