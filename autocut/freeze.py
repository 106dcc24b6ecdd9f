"""Freezing by layer group, fastai's way: norm layers stay trainable (``train_bn``).

Graph bodies lose their modules' types (a traced LayerNorm is a plain ``Module``), so
:func:`autocut.create_body` records the names of the original model's norm parameters as
``body.norm_parameter_names``; :func:`norm_parameter_names` reads them back.
"""

from __future__ import annotations

from torch import nn

from autocut._validate import integer
from autocut.errors import CutError
from autocut.groups import layer_groups

__all__ = ["NORM_TYPES", "norm_parameter_names", "norm_parameter_ids", "record_norms", "freeze_to", "Freezable"]

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...)
    of ``model``. Graph bodies lose the norm modules' types, so ``create_body`` records these
    names from the original model as ``body.norm_parameter_names``."""
    names = set()
    for path, m in model.named_modules():
        recorded = getattr(m, "norm_parameter_names", None)
        if isinstance(recorded, (set, frozenset)):
            names.update(f"{path}.{n}" if path else n for n in recorded)
        elif isinstance(m, NORM_TYPES) or "norm" in type(m).__name__.lower():
            names.update(f"{path}.{n}" if path else n for n, _ in m.named_parameters(recurse=False))
    return names


def record_norms(body: nn.Module, model: nn.Module) -> None:
    """Set ``body.norm_parameter_names``: the names of ``model``'s norm parameters that ``body``
    (a body cut from it, sharing its names) holds; graph bodies lose the modules' types."""
    names = {n for n, _ in body.named_parameters()}
    body.norm_parameter_names = frozenset(norm_parameter_names(model) & names)


def norm_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of normalisation layers (see :func:`norm_parameter_names`)."""
    names = norm_parameter_names(model)
    return {id(p) for n, p in model.named_parameters() if n in names}


def freeze_to(model: nn.Module, n: int, train_bn: bool = True, groups: int | None = 3) -> None:
    """Freeze the first ``n`` layer groups (negative counts from the end), fastai's way: with
    ``train_bn`` the norm layers' parameters stay trainable.

    The last group, the head, always trains: of ``k`` groups, ``n`` runs from ``-k`` (as 0:
    nothing frozen) to ``k - 1`` (as -1: all but the head). fastai's ``freeze_to`` freezes the
    whole model, with a warning, for ``n >= k`` and freezes nothing for ``n < -k``; autocut
    refuses both.

    Args:
        model: a model made by :func:`autocut.adapt`.
        n: how many groups to freeze, an integral number in ``[-k, k)``.
        train_bn: keep the norm layers' parameters trainable.
        groups: which layer groups, as ``n`` in :func:`autocut.layer_groups`.

    Raises:
        CutError: (a ``ValueError``) ``n`` not an int (a bool, a float, a string) or out of
            ``[-k, k)``; the message names it and says the range.
    """
    n = integer("n", n)
    gs = layer_groups(model, groups)
    if not -len(gs) <= n < len(gs):
        k = len(gs)
        raise CutError(f"freeze_to's n={n} is out of range for {k} layer groups: pass {-k} to {k - 1} "
                       f"({k - 1} or -1 freezes all but the head, which always trains; 0 freezes nothing)")
    stop = n if n >= 0 else len(gs) + n
    norms = norm_parameter_ids(model) if train_bn else set()
    for i, g in enumerate(gs):
        for p in g:
            p.requires_grad_(i >= stop or id(p) in norms)


class Freezable:
    """``freeze_to``, ``freeze`` and ``unfreeze`` as methods, for the models autocut makes (a body
    and a head with ``.cut``: :class:`~autocut.AdaptedModel`, :class:`~autocut.Unet`)."""

    def freeze_to(self, n: int, train_bn: bool = True):
        """Freeze the first ``n`` layer groups (see :func:`autocut.layer_groups`); with
        ``train_bn`` norm layers stay trainable, as in fastai."""
        freeze_to(self, n, train_bn=train_bn)
        return self

    def freeze(self, train_bn: bool = True):
        """Freeze all but the last group (the head)."""
        return self.freeze_to(-1, train_bn=train_bn)

    def unfreeze(self):
        """Make every parameter trainable."""
        return self.freeze_to(0)
