"""Rich progress bars for every long loop; silenced with ``PPFLOWER_QUIET=1`` (tests, Ray workers)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("PPFLOWER_QUIET", "") not in ("", "0")


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` under a progress bar labelled ``desc``."""
    if quiet():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
    ) as progress:
        task = progress.add_task(desc, total=total)
        for item in items:
            yield item
            progress.advance(task)


class Bar:
    """A progress bar advanced by hand (for loops that are not a simple iteration); no-op when quiet."""

    def __init__(self, desc: str, total: int | None):
        self.progress = None if quiet() else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn())
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
