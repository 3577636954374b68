"""Output: results on stdout (`out`), progress and messages on stderr (`console`).

On a terminal a long step shows a rich progress bar. Anywhere else (a CI log, `> build.log 2>&1`) everything is
plain lines: each stage's start and end, and while a stage runs a progress line at least every
TOOLCHAIN_PROGRESS_INTERVAL seconds (default 10) saying what it is doing, so a log always shows signs of life.
Outside a terminal rich writes no colour codes and no carriage returns; the consoles are made wide there so a path
is never wrapped. Third-party tqdm bars (transformers, compressed-tensors) are sent to /dev/null and read back
into our own progress lines; with -q they are disabled.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def _console(stream: Any, stderr: bool) -> Console:
    # Off a terminal rich would wrap at 80 columns: an artifact path in a log must stay one copyable line.
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else 100_000, soft_wrap=not tty)


console = _console(sys.stderr, stderr=True)  # progress, messages, warnings
out = _console(sys.stdout, stderr=False)  # results: tables, paths, summaries


def interval() -> float:
    try:
        return max(0.05, float(os.environ.get("TOOLCHAIN_PROGRESS_INTERVAL", "10")))
    except ValueError:
        return 10.0


def _fmt_count(done: float, total: float | None, unit: str) -> str:
    if unit == "bytes":
        mb = f"{done / 1e6:.0f} MB"
        return f"{mb} of {total / 1e6:.0f} MB ({100 * done / total:.0f}%)" if total else mb
    if total:
        return f"{done:.0f}/{total:.0f} ({100 * done / total:.0f}%)"
    return f"{done:.0f}"


class Task:
    """One long step. On a terminal: a rich bar. Elsewhere: counts that the stage's heartbeat prints."""

    def __init__(self, progress: Progress | None, task_id: int | None, description: str = "",
                 total: float | None = None, unit: str = "items"):
        self._progress, self._id = progress, task_id
        self.description, self.total, self.unit, self.done = description, total, unit, 0.0

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.advance(self._id, n)

    def describe(self, text: str) -> None:
        self.description = text
        if self._progress is not None:
            self._progress.update(self._id, description=text)

    def line(self) -> str:
        return f"{self.description} {_fmt_count(self.done, self.total, self.unit)}"


def _third_party_bars() -> list[str]:
    """What the tqdm bars alive right now say (they write to /dev/null; see adopt_tqdm)."""
    if "tqdm" not in sys.modules:
        return []
    from tqdm import tqdm

    lines = []
    for bar in list(getattr(tqdm, "_instances", [])):
        if getattr(bar, "disable", True):
            continue
        lines.append(f"{bar.desc or 'working'} {_fmt_count(bar.n, bar.total, 'items')}".strip())
    return lines


_ADOPTED = False


def adopt_tqdm(quiet: bool) -> None:
    """Libraries pass `disable=` themselves (compressed-tensors' "Applying quantization config"), which beats
    TQDM_DISABLE: force it. Quiet: disabled. Otherwise: the bar counts into /dev/null and our lines report it."""
    global _ADOPTED
    if _ADOPTED:
        return
    _ADOPTED = True
    from tqdm import std

    original = std.tqdm.__init__
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if quiet:
            kwargs["disable"] = True
        else:
            kwargs["file"] = sink
            kwargs.setdefault("mininterval", 1.0)
        original(self, *args, **kwargs)

    std.tqdm.__init__ = __init__
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # huggingface_hub's own switch (its bars are tqdm too)
    try:
        from loguru import logger  # compressed-tensors and llm-compressor log through loguru

        if quiet:
            logger.remove()
            logger.add(sys.stderr, level="ERROR", colorize=False)
    except ImportError:
        pass


class Reporter:
    """Hands out progress bars and stage lines; quiet (--quiet) prints nothing but warnings and errors."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._tasks: list[Task] = []
        self._bars = 0  # rich bars live on the terminal right now
        self._last_line = time.monotonic()

    def info(self, msg: str) -> None:
        if not self.quiet:
            self._print(msg)

    def warn(self, msg: str) -> None:
        self._print(f"[bold yellow]warning:[/] {msg}")

    def _print(self, msg: str) -> None:
        console.print(msg)
        self._last_line = time.monotonic()

    @contextmanager
    def running(self, name: str, reason: str) -> Iterator[None]:
        """A stage runs: its start line, and until it ends a progress line every interval() seconds."""
        adopt_tqdm(self.quiet)
        self.info(f"[bold]{name}[/]: start ({reason})")
        if self.quiet:
            yield
            return
        t0, stop = time.monotonic(), threading.Event()

        def beat() -> None:
            every = interval()
            while not stop.wait(min(1.0, every / 4)):
                if self._bars or time.monotonic() - self._last_line < every:
                    continue
                doing = [t.line() for t in self._tasks] + _third_party_bars()
                self._print(f"  {name}: {'; '.join(doing) or 'running'}, {time.monotonic() - t0:.0f} s")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def finished(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        """A stage's end line (built / cached / failed / skipped)."""
        colour = {"built": "green", "cached": "cyan", "failed": "bold red", "skipped": "dim"}.get(status, "")
        word = f"[{colour}]{status}[/]" if colour else status
        timing = f" in {seconds:.1f} s" if status in ("built", "failed") else ""
        self.info(f"[bold]{name}[/]: {word}{timing}" + (f" ({detail})" if detail else ""))

    @contextmanager
    def task(self, description: str, total: float | None, unit: str = "items") -> Iterator[Task]:
        if self.quiet or not console.is_terminal:
            task = Task(None, None, description, total, unit)
            self._tasks.append(task)
            try:
                yield task
            finally:
                self._tasks.remove(task)
            return
        counter = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        columns = [TextColumn("  {task.description}"), BarColumn(), TaskProgressColumn(), counter,
                   TimeElapsedColumn(), TimeRemainingColumn()]
        self._bars += 1
        try:
            with Progress(*columns, console=console, transient=True) as progress:
                yield Task(progress, progress.add_task(description, total=total), description, total, unit)
        finally:
            self._bars -= 1
