"""Progress bars and messages on stderr (stdout stays clean for --json)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


class Task:
    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, n)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._id, description=text)


class Reporter:
    """Hands out progress bars; quiet mode (for --json or --quiet) prints nothing but warnings."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def info(self, msg: str) -> None:
        if not self.quiet:
            console.print(msg)

    def warn(self, msg: str) -> None:
        console.print(f"[bold yellow]warning:[/] {msg}")

    @contextmanager
    def task(self, description: str, total: float | None, unit: str = "items") -> Iterator[Task]:
        if self.quiet or not console.is_terminal and total is None:
            yield Task(None, None)
            return
        counter = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        columns = [TextColumn("  {task.description}"), BarColumn(), TaskProgressColumn(), counter,
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            yield Task(progress, progress.add_task(description, total=total))
