"""What a run prints (on the main process only): a progress bar per epoch and fastai's table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Report", "COLUMNS"]

COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "error_rate", "time")  # a classification's


def columns(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The table's columns for a task's metrics."""
    return ("epoch", "train_loss", "valid_loss", *metrics, "time")


def _mmss(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes:02d}:{seconds:02d}"


class Report:
    """Lines and bars on stdout; silent when ``show`` is false (ranks other than 0)."""

    def __init__(self, show: bool = True, bars: bool = True):
        from rich.console import Console

        self.console = Console(quiet=not show, highlight=False)
        self.bars = show and bars and self.console.is_terminal  # bars only where they redraw
        self.columns = COLUMNS

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def header(self, metrics: tuple[str, ...] = COLUMNS[3:5]) -> None:
        """The table's header: epoch, the losses, ``metrics``, time; later rows show the same."""
        self.columns = columns(metrics)
        self.line("  ".join(f"{c:<10}" for c in self.columns).rstrip())

    def row(self, record: dict[str, Any]) -> None:
        cells = [str(record[c]) if c == "epoch" else _mmss(record[c]) if c == "time" else f"{record[c]:.6f}"
                 for c in self.columns]
        self.line("  ".join(f"{c:<10}" for c in cells).rstrip())

    @contextmanager
    def bar(self, total: int, description: str) -> Iterator:
        """A transient bar; yields ``advance(loss)``."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if not self.bars:
            yield lambda loss: None
            return
        columns = (
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total, loss="-")
            yield lambda loss: progress.update(task, advance=1, loss=f"{loss:.4f}")
