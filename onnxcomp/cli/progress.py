"""The Rich progress display on stderr (transient: gone once the command prints its result)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from onnxcomp.cli.root import err_console


@dataclass
class Bar:
    """One progress bar; its methods are the callbacks the library's long jobs take."""

    display: Progress
    task: TaskID

    def advance(self, n: int) -> None:
        """``n`` more samples (or steps) done."""
        self.display.advance(self.task, n)

    def set_total(self, total: int | None) -> None:
        self.display.update(self.task, total=total)

    def show(self, description: str, completed: float) -> None:
        """A new step and how far along it is (fractions, for ``bench``)."""
        self.display.update(self.task, description=description, completed=completed)

    def restart(self, description: str, total: int | None) -> None:
        """A new job (a data pass, verification): back to zero."""
        self.display.update(self.task, description=description, total=total, completed=0)

    def start_pass(self, name: str) -> None:
        self.restart(f"pass: {name}", None)


@contextmanager
def progress_bar(description: str, total: float | None = None) -> Iterator[Bar]:
    """One bar showing description, bar, done/total and elapsed time, while the block runs."""
    display = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    with display:
        yield Bar(display, display.add_task(description, total=total))
