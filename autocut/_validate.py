"""The one place that checks public arguments: each function takes the argument's name and value,
gives the value back in its plain form (an ``int``, a ``float``, a tuple) or raises
:class:`~autocut.errors.CutError` (a ``ValueError``) naming the argument, saying what was wrong
and what to pass instead.

Integral numbers of any kind (``numpy.int64``, a 0-d integer tensor) count as ints; ``bool``
never does, nor does a float, even a whole one.

Numbers of the command line and of runs (``finetune``, ``predict``, ``scan``) are checked by a
:class:`Bound`: a kind of number and its range. Called on a string it is an ``argparse``
``type=`` (``argument --epochs: ...``); :meth:`Bound.check` refuses a Python argument by name.
Every int and float option of every ``autocut`` subcommand uses one.

Example:
    >>> parser.add_argument("--bs", type=POSITIVE_INT, default=64)
    >>> POSITIVE_INT.check("bs", 0)
    Traceback (most recent call last):
    CutError: bs must be an integer of 1 or more, got 0
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from autocut.errors import CutError

__all__ = [
    "Bound",
    "POSITIVE_INT",
    "COUNT",
    "POSITIVE",
    "NON_NEGATIVE",
    "FRACTION",
    "DROPOUT",
    "AT_LEAST_ONE",
    "a_module",
    "a_callable",
    "input_size",
    "integer",
    "learning_rate",
    "learning_rates",
    "number",
    "number_range",
    "positive_int",
    "positive_ints",
]


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def integer(name: str, value: Any) -> int:
    """``value`` as an ``int``: any integral number but a bool."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise CutError(f"{name} must be an int, got {_shown(value)}: pass a whole number such as 3")


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` >= 1 (sizes, counts of outputs or channels)."""
    try:
        n = integer(name, value)
    except CutError:
        n = None
    if n is None or n < 1:
        raise CutError(f"{name} must be a positive int, got {_shown(value)}: pass a whole number >= 1 such as 3")
    return n


def positive_ints(name: str, value: Any) -> list[int]:
    """A list or tuple of ints >= 1 (hidden widths), as a list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise CutError(f"{name} must be a list of ints >= 1, got {_shown(value)}: pass a list such as [512]")
    return [positive_int(f"{name}[{i}]", v) for i, v in enumerate(value)]


def _interval(spec: str) -> tuple[float, float, bool, bool]:
    """``"(0, 1]"`` -> ``(0.0, 1.0, low_open, high_open)``."""
    low, high = (float(s) for s in spec[1:-1].split(","))
    return low, high, spec[0] == "(", spec[-1] == ")"


def number(name: str, value: Any, interval: str, example: float | None = None) -> float:
    """``value`` as a ``float`` inside ``interval``, written as in maths: ``"(0, 1]"``,
    ``"[0, inf)"`` (a :class:`Bound`: finite numbers only). ``example``, a good value, goes into
    the message."""
    low, high, low_open, high_open = _interval(interval)
    if Bound(float, None if low == -math.inf else low, low_open, None if high == math.inf else high, high_open).fits(value):
        return float(value)
    such = "" if example is None else f": pass a number such as {example!r}"
    raise CutError(f"{name} must be a number in {interval}, got {_shown(value)}{such}")


def learning_rate(name: str, value: Any) -> float:
    """A learning rate: a finite number > 0 (:data:`POSITIVE`), as a ``float``."""
    if POSITIVE.fits(value):
        return float(value)
    raise CutError(f"{name} must be a finite number > 0, got {_shown(value)}: pass a learning rate such as 1e-3")


def learning_rates(name: str, value: Any) -> float | slice:
    """A learning rate, or fastai's ``slice(hi)`` or ``slice(lo, hi)`` with ``0 < lo <= hi``
    (``lo`` for the first layer group, ``hi`` for the head); bounds come back as floats."""
    if not isinstance(value, slice):
        return learning_rate(name, value)
    lo, hi, step = value.start, value.stop, value.step
    if hi is None:
        raise CutError(f"{name}=slice(...) needs a stop: slice(lo, hi) or slice(hi)")
    if step is not None:
        raise CutError(f"{name}=slice(lo, hi) takes no step, got step={step!r}: pass slice(lo, hi) or slice(hi)")
    hi = learning_rate(f"the stop of {name}=slice(...)", hi)
    if lo is None:
        return slice(hi)
    lo = learning_rate(f"the start of {name}=slice(...)", lo)
    if lo > hi:
        raise CutError(f"{name}=slice(lo, hi) gives lo to the first layer group and hi to the head, so lo <= hi; "
                       f"got slice({lo!r}, {hi!r}): pass slice({hi!r}, {lo!r})")
    return slice(lo, hi)


def number_range(name: str, value: Any) -> tuple[float, float]:
    """``(low, high)``: two finite numbers with ``low < high``, as floats."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2:
        low, high = (number(f"{name}[{i}]", v, "(-inf, inf)") for i, v in enumerate(value))
        if low < high:
            return low, high
    raise CutError(f"{name} must be (low, high) finite numbers with low < high, got {value!r}: pass a range such as (0.0, 5.0)")


def input_size(value: Any, default: Sequence[int] | None) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of positive ints. ``None`` gives ``default``; an int ``s`` gives
    ``(C, s, s)``, ``C`` the default's (where ``default`` is ``None``, not known yet, an int is
    only checked and ``None`` comes back)."""
    if value is None:
        return None if default is None else tuple(default)
    if isinstance(value, (numbers.Integral, Sequence)) and not isinstance(value, (bool, str, bytes)):
        if not isinstance(value, Sequence):
            side = operator.index(value)
            if side >= 1:
                return None if default is None else (int(default[0]), side, side)
        elif len(value) == 3 and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in value):
            return tuple(operator.index(d) for d in value)
    raise CutError(f"input_size must be (C, H, W) positive ints or one positive int for a square image, "
                   f"got {value!r}: pass (3, 224, 224) or 224")


def a_module(name: str, value: Any, what: str) -> nn.Module | None:
    """``None`` or an ``nn.Module`` (``what`` says what it should be)."""
    if value is None or isinstance(value, nn.Module):
        return value
    raise CutError(f"{name} must be an nn.Module ({what}) or None, got {_shown(value)}")


def a_callable(name: str, value: Any, what: str) -> Any:
    """``None`` or a callable (``what`` says what it is called with, with an example)."""
    if value is None or callable(value):
        return value
    raise CutError(f"{name} must be a callable ({what}) or None, got {_shown(value)}")


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
            CutError: (a ``ValueError``) ``"NAME must be <describe()>, got VALUE"``.
        """
        if not self.fits(value):
            raise CutError(f"{name} must be {self.describe()}, got {value!r}")

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
AT_LEAST_ONE = Bound(float, 1)
"""A ratio of learning rates (``lr_mult``): 1 or more."""
