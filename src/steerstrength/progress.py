"""Progress bars for long loops: `progress_bar(description, total)` yields `advance(n)`; quiet with `--quiet`.

Every stage takes a `progress(description, total)` context manager (stages.no_progress by default); the CLI and
the notebooks pass this one. It lives below the CLI so library code can name it without importing the command line.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)  # progress and log lines go to stderr; stdout stays for results
state = {"quiet": False}  # `--quiet` sets it for the whole process


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, quiet: bool | None = None) -> Iterator:
    """A rich progress bar with ETA; yields `advance(n)`. Silent when quiet."""
    quiet = state["quiet"] if quiet is None else quiet
    if quiet:
        yield lambda n=1: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
