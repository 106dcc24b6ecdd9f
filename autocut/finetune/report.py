"""What a run prints (on the main process only): a progress bar per epoch and fastai's table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Report", "COLUMNS"]

COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "error_rate", "time")


def _mmss(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes:02d}:{seconds:02d}"


class Report:
    """Lines and bars on stdout; silent when ``show`` is false (ranks other than 0)."""

    def __init__(self, show: bool = True, bars: bool = True):
        from rich.console import Console

        self.console = Console(quiet=not show, highlight=False)
        self.bars = show and bars and self.console.is_terminal  # bars only where they redraw

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def header(self) -> None:
        self.line("  ".join(f"{c:<10}" for c in COLUMNS).rstrip())

    def row(self, record: dict[str, Any]) -> None:
        cells = [
            str(record["epoch"]),
            f"{record['train_loss']:.6f}",
            f"{record['valid_loss']:.6f}",
            f"{record['accuracy']:.6f}",
            f"{record['error_rate']:.6f}",
            _mmss(record["time"]),
        ]
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
