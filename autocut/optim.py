"""Optimiser param groups: one learning rate per layer group (fastai's discriminative rates or
timm's layer decay), no weight decay on norms and biases. Works with any torch optimiser."""

from __future__ import annotations

from typing import Any

from torch import nn

from autocut._validate import learning_rates, number
from autocut.errors import CutError
from autocut.freeze import norm_parameter_ids
from autocut.groups import layer_groups

__all__ = ["param_groups"]


def _lrs(lr: float | slice, n: int) -> list[float]:
    """One rate per group from a checked ``lr`` (see :func:`autocut._validate.learning_rates`)."""
    if isinstance(lr, slice):
        lo, hi = lr.start, lr.stop
        if lo is None:  # fastai: slice(hi) gives hi/10 to all but the last group
            return [hi / 10] * (n - 1) + [hi]
        if n == 1:
            return [hi]
        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    return [lr] * n


def param_groups(
    model: nn.Module,
    lr: float | slice,
    weight_decay: float = 0.01,
    layer_decay: float | None = None,
    n: int | None = 3,
) -> list[dict[str, Any]]:
    """Optimiser param groups for any torch optimiser: one learning rate per layer group, and no
    weight decay on norms and biases.

    Args:
        lr: a float, or ``slice(lo, hi)`` spread geometrically over the groups (fastai's
            discriminative learning rates: ``lo`` for the first group, ``hi`` for the head, so
            ``lo <= hi``), or ``slice(hi)`` (``hi/10`` for all but the head). Every rate is a
            finite number > 0.
        weight_decay: for weights, a finite number >= 0; norms and biases get 0.
        layer_decay: timm-style, in ``(0, 1]``: group ``i`` of ``k`` gets
            ``lr * layer_decay ** (k - 1 - i)``, so earlier groups learn slower (1: all alike).
        n: as in :func:`layer_groups`.

    Raises:
        CutError: (a ``ValueError``) a rate that is not a finite number > 0 (NaN, 0, negative,
            infinite), a slice with its bounds swapped or a step, ``layer_decay`` outside
            ``(0, 1]`` or with a slice, ``weight_decay`` negative or not finite; the message
            names the argument.

    Example:
        >>> opt = torch.optim.AdamW(param_groups(model, slice(1e-5, 1e-3)))
    """
    lr = learning_rates("lr", lr)
    weight_decay = number("weight_decay", weight_decay, "[0, inf)", 0.01)
    if layer_decay is not None:
        if isinstance(lr, slice):
            raise CutError("give lr as a float with layer_decay (the decay spreads it over the groups)")
        layer_decay = number("layer_decay", layer_decay, "(0, 1]", 0.75)
    gs = layer_groups(model, n)
    if layer_decay is not None:
        lrs = [lr * layer_decay ** (len(gs) - 1 - i) for i in range(len(gs))]
    else:
        lrs = _lrs(lr, len(gs))
    norms = norm_parameter_ids(model)
    out = []
    for i, (g, group_lr) in enumerate(zip(gs, lrs)):
        decay = [p for p in g if p.ndim > 1 and id(p) not in norms]
        no_decay = [p for p in g if not (p.ndim > 1 and id(p) not in norms)]
        if decay:
            out.append({"params": decay, "lr": group_lr, "weight_decay": weight_decay, "layer_group": i})
        if no_decay:
            out.append({"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "layer_group": i})
    return out
