"""The one place that checks public arguments: each function takes the argument's name and value,
gives the value back in its plain form (an ``int``, a ``float``, a tuple) or raises
:class:`~autocut.errors.CutError` (a ``ValueError``) naming the argument, saying what was wrong
and what to pass instead.

Integral numbers of any kind (``numpy.int64``, a 0-d integer tensor) count as ints; ``bool``
never does, nor does a float, even a whole one.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

from torch import nn

from autocut.errors import CutError

__all__ = [
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
    ``"[0, inf)"``. NaN is in no interval, infinity only in one closed at ``inf]``.
    ``example``, a good value, goes into the message."""
    low, high, low_open, high_open = _interval(interval)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        x = float(value)
        above = x > low if low_open else x >= low
        below = x < high if high_open else x <= high
        if above and below:
            return x
    such = "" if example is None else f": pass a number such as {example!r}"
    raise CutError(f"{name} must be a number in {interval}, got {_shown(value)}{such}")


def learning_rate(name: str, value: Any) -> float:
    """A learning rate: a finite number > 0, as a ``float``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < float(value) < math.inf:
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
