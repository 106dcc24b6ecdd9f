"""The one place numeric arguments are checked, from the command line and from Python alike.

A :class:`Bound` is a kind of number (integer or real) and the range it must lie in. Called on
a string it is an ``argparse`` ``type=`` (a bad value is refused with argparse's usual
``argument --epochs: ...`` message); :meth:`Bound.check` refuses a Python argument with a
``ValueError`` that names it. Every int and float option of every ``autocut`` subcommand uses one.

Example:
    >>> parser.add_argument("--bs", type=POSITIVE_INT, default=64)
    >>> POSITIVE_INT.check("bs", 0)
    Traceback (most recent call last):
    ValueError: bs must be an integer of 1 or more, got 0
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass

__all__ = ["Bound", "POSITIVE_INT", "COUNT", "POSITIVE", "NON_NEGATIVE", "FRACTION", "DROPOUT"]


@dataclass(frozen=True)
class Bound:
    """Integers (``kind=int``) or finite real numbers (``kind=float``) from ``low`` to ``high``;
    ``*_open`` leaves that end out."""

    kind: type
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False

    def describe(self) -> str:
        """What to pass, in words: ``"an integer of 1 or more"``, ``"a number above 0"``..."""
        what = "an integer" if self.kind is int else "a number"
        low = None if self.low is None else f"{self.low:g}"
        high = None if self.high is None else f"{self.high:g}"
        if low is not None and high is not None:
            return (f"{what} from {low}{' (excluded)' if self.low_open else ''} to {high}"
                    f"{' (excluded)' if self.high_open else ''}")
        if low is not None:
            return f"{what} above {low}" if self.low_open else f"{what} of {low} or more"
        if high is not None:
            return f"{what} below {high}" if self.high_open else f"{what} of {high} or less"
        return what

    def fits(self, value: object) -> bool:
        """Whether ``value`` is of the kind and in the range."""
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value: object) -> None:
        """Refuse ``value`` for the argument ``name`` unless it fits.

        Raises:
            ValueError: ``"NAME must be <describe()>, got VALUE"``.
        """
        if not self.fits(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")

    def __call__(self, text: str) -> int | float:
        """Parse a command-line value (argparse's ``type=``).

        Raises:
            argparse.ArgumentTypeError: the value is not of the kind or out of range; argparse
                prefixes the option's name.
        """
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if not self.fits(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return value


POSITIVE_INT = Bound(int, 1)
"""Sizes, batch sizes, jobs, top-k: 1 or more."""
COUNT = Bound(int, 0)
"""Epochs, workers, seeds: 0 or more."""
POSITIVE = Bound(float, 0, low_open=True)
"""Learning rates, timeouts: above 0."""
NON_NEGATIVE = Bound(float, 0)
"""Weight decay, memory limits (0: none): 0 or more."""
FRACTION = Bound(float, 0, True, 1, True)
"""A share of the data: strictly between 0 and 1."""
DROPOUT = Bound(float, 0, False, 1, True)
"""A dropout probability: from 0 to below 1."""
