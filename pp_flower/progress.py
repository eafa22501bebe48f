"""Rich progress bars for every long loop, on stderr (stdout stays for results: ``ppflower classify > labels.tsv``).

Shown only when stderr is a terminal; ``PPFLOWER_QUIET=1`` silences them everywhere (tests, Ray workers).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("PPFLOWER_QUIET", "") not in ("", "0") or not sys.stderr.isatty()


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` under a progress bar labelled ``desc``."""
    if quiet():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _progress() as progress:
        task = progress.add_task(desc, total=total)
        for item in items:
            yield item
            progress.advance(task)


class Bar:
    """A progress bar advanced by hand (for loops that are not a simple iteration); no-op when quiet."""

    def __init__(self, desc: str, total: int | None):
        self.progress = None if quiet() else _progress()
        self.desc, self.total = desc, total

    def __enter__(self) -> "Bar":
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(self.desc, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
