"""``create_body`` and ``adapt``: a backbone cut at its discovered place, with a new head.

:func:`adapt` goes the way fastai's ``create_vision_model`` does, each step once: resolve the
model (build it for a name), make the body (discover the cut, truncate), load weights, set the
input channels, make the head, initialise it; then the layer groups are read off the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from autocut import _validate, memo, zoo
from autocut._gc import gc_paused
from autocut.body import BodyNote, build_body
from autocut.channels import set_input_channels
from autocut.cut import Cut
from autocut.discover import discover_with_trace, unwrap
from autocut.errors import CutError, first_line
from autocut.freeze import NORM_TYPES, Freezable, record_norms
from autocut.groups import Unit, group_summary, read_stride
from autocut.layers import create_head, linear_init_skipped
from autocut.probe import model_device, model_dtype, modes_kept

__all__ = ["create_body", "adapt", "AdaptedModel", "apply_init"]

CutSpec = Cut | int | str | Callable[[nn.Module], nn.Module] | None


class _Resolved(NamedTuple):
    """A model resolved once: the module to cut, the name its cut is reported under, the size,
    and whether the module is the user's (its training flags are theirs) or built here."""

    module: nn.Module
    arch: str
    input_size: tuple[int, int, int]
    own_size: tuple[int, int, int]  # the model's own (stated or default) size
    guessed: bool = False  # input_size is the 224 px guess: discovery may find a larger one it runs at
    users: bool = False


def _resolve(model: str | nn.Module, input_size, pretrained: bool = False, num_classes: int | None = None) -> _Resolved:
    """A real (CPU) model for a name (its classifier of ``num_classes``, see
    :func:`autocut.zoo.build`), or the module itself (unwrapped, see
    :func:`autocut.discover.unwrap`); its arch name and input size."""
    if isinstance(model, nn.Module):
        if pretrained:
            raise CutError("pretrained=True needs a model name; load the weights into your module yourself")
        model = unwrap(model)
        return _Resolved(model, type(model).__name__, *_sizes(input_size, model), users=True)
    spec = zoo.resolve(model)
    module = zoo.build(spec, device="cpu", pretrained=pretrained, num_classes=num_classes)
    return _Resolved(module, str(spec), *_sizes(input_size, spec, module))


def _sizes(input_size, *model) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
    """The size to cut ``model`` (a module, or a spec and its module) at, its own size, and
    whether the first is the 224 px guess (the model states none; one read of what it states)."""
    stated = zoo.stated_input_size(*model)
    own = stated or zoo.default_input_size(*model)
    return _validate.input_size(input_size, own), own, input_size is None and stated is None


@gc_paused()
def _body(model: _Resolved, cut: CutSpec) -> tuple[nn.Module, memo.Recipe | None]:
    """The body of a resolved model, with ``.cut`` and ``.norm_parameter_names``, in the model's
    mode (every module of the model keeps its own training flag); and the recipe it was made
    from or kept as, for a discovered cut of a model :mod:`autocut.memo` can key."""
    key = recipe = None
    if cut is None or isinstance(cut, str):
        key = memo.architecture_key(model.module, model.input_size, model.own_size, model.guessed, cut)
        recipe = memo.lookup(key)
    with modes_kept(model.module) if model.users else contextlib.nullcontext():  # (flags of a model built here are ours)
        if recipe is not None:  # the same architecture, size and cut asked for as before: no trace, no probe
            memo.replay(recipe.warned)
            body, found = build_body(model.module, recipe.cut, model.input_size, model.arch, checked=True,
                                     note=recipe.body)
        else:
            traced = None
            with memo.recording() as warned:  # what a recipe skips warns again from it (building the body warns itself)
                if cut is None or isinstance(cut, str):  # the Cut found says the size it was found at (a larger one than guessed)
                    cut, traced = discover_with_trace(model.module, model.input_size, arch=model.arch, where=cut,
                                                      try_larger=model.guessed)
            note = None if key is None else BodyNote()  # (filled by the body made now)
            body, found = build_body(model.module, cut, model.input_size, model.arch, traced, note=note)
            with memo.recording() as warned_later:
                found = read_stride(body, found, model.own_size)  # where the map is big enough to say
            if key is not None:
                recipe = memo.Recipe(found, warned + warned_later, body=note)
                memo.remember(key, recipe)
        if model.users or body.training != model.module.training:  # (a body made in the model's mode has it)
            body.train(model.module.training)  # the body's own flag (a GraphBody's graph), not the model's modules'
    body.cut = found
    if recipe is not None and recipe.norms is not None:
        body.norm_parameter_names = recipe.norms
    else:
        record_norms(body, model.module)
        if recipe is not None:
            recipe.norms = body.norm_parameter_names
    return body, recipe


def _check_n_in(n_in: int | None, n_in_init: str | None) -> int | None:
    if n_in_init is not None and n_in is None:
        raise CutError("n_in_init does nothing without n_in: pass n_in too")
    return None if n_in is None else _validate.positive_int("n_in", n_in)


def _set_n_in(body: nn.Module, n_in: int | None, n_in_init: str | None) -> None:
    """Rebuild the body's input layer for ``n_in`` channels (nothing where it already has them)."""
    size = body.cut.input_size
    if n_in is None or n_in == size[0]:
        return
    set_input_channels(body, n_in, size, n_in_init)
    body.cut = dataclasses.replace(body.cut, input_size=(n_in, *size[1:]))


def create_body(
    model: str | nn.Module,
    cut: CutSpec = None,
    input_size: tuple[int, int, int] | None = None,
    n_in: int | None = None,
    n_in_init: str | None = None,
) -> nn.Module:
    """The part of ``model`` up to the cut, returning an NCHW map ``(B, nf, h, w)``.

    Args:
        model: a zoo name (built with random weights on the CPU) or an ``nn.Module``.
        cut: ``None`` to discover it; a :class:`Cut`; an int (fastai-style: the first ``cut``
            children, run in order); a node name or module path of the traced graph; or a
            callable ``model -> body``.
        input_size: ``(C, H, W)``, or an int ``s`` for a square ``(C, s, s)`` with the model's own
            ``C``; default from the model's config.
        n_in: input channels, when not the model's own: the layer that reads the image (stem
            conv, patch embedding, ...) is found and rebuilt, keeping its weights (replaced in the
            body; a module shared with ``model`` is replaced there too).
        n_in_init: how the rebuilt layer's weights are made: ``"repeat"`` (timm's
            repeat-and-rescale), ``"sum"`` (``n_in=1``), ``"zero"`` (copy the RGB weights, zero
            the rest) or ``"random"``; default as timm does.

    Returns:
        The body, with ``.cut`` set, in ``model``'s mode (a named model is built in eval mode);
        the modules it shares with ``model`` keep their own training flags. NHWC maps come out as
        a channels_last view (no copy); token maps lose their prefix tokens and are laid on the
        patch grid. A ``torch.compile``'d module, ``nn.DataParallel`` or
        ``DistributedDataParallel`` is cut as the module it wraps: compile or wrap the result.

    Raises:
        CutError: (a ``ValueError``) a bad ``input_size`` or ``n_in`` (named in the message), or
            a model that cannot be cut as asked (the message says what to pass instead).

    Example:
        >>> body = create_body("resnet18")
        >>> body(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 512, 2, 2])
    """
    n_in = _check_n_in(n_in, n_in_init)
    _validate.input_size(input_size, None)  # a bad size fails before the build
    body, _ = _body(_resolve(model, input_size), cut)
    _set_n_in(body, n_in, n_in_init)
    return body


def _fills(init: Callable | None) -> bool:
    """Whether ``init`` is one of ``torch.nn.init``'s initialisers (or a partial of one), each of
    which writes every element of the tensor it is given."""
    func = init.func if isinstance(init, functools.partial) else init
    return getattr(func, "__module__", None) == nn.init.__name__


def apply_init(module: nn.Module, init: Callable[[torch.Tensor], Any] | None = nn.init.kaiming_normal_) -> None:
    """fastai's ``apply_init``: ``init`` on every weight except norm layers', biases zeroed (a
    spectral- or weight-normed layer's own weight, the one its parametrization reads)."""
    if init is None:
        return
    for m in module.modules():
        if isinstance(m, NORM_TYPES):
            continue
        weight = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            init(weight)
        bias = getattr(m, "bias", None)
        if isinstance(bias, nn.Parameter):
            with torch.no_grad():
                bias.zero_()


class AdaptedModel(Freezable, nn.Sequential):
    """``nn.Sequential(body, head)``: ``model[0]`` is the body, ``model[1]`` the head, and
    ``model.cut`` says where the backbone was cut. ``freeze_to``, ``freeze`` and ``unfreeze``
    work on its layer groups (:class:`~autocut.freeze.Freezable`)."""

    def __init__(self, body: nn.Module, head: nn.Module, cut: Cut):
        super().__init__(body, head)
        self.cut = cut

    @property
    def body(self) -> nn.Module:
        return self[0]

    @property
    def head(self) -> nn.Module:
        return self[1]


def load_weights(body: nn.Module, path: str | os.PathLike, arch: str) -> None:
    """Load a checkpoint of the original model ``arch`` into ``body`` (a body or a pyramid's):
    every key of the body must be there with its shape; the rest (the old head) is ignored.

    Raises:
        CutError: keys missing or of another shape (counted, with examples).
    """
    state = zoo.load_checkpoint(path)
    own = body.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            detail.append(
                f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})"
            )
        raise CutError(f"{path} does not fit the body of {arch}: {'; '.join(detail)}. Is it a checkpoint of {arch}?")
    body.load_state_dict({k: state[k] for k in own}, strict=True)


def adapt(
    model: str | nn.Module,
    n_out: int,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    cut: CutSpec = None,
    input_size: tuple[int, int, int] | None = None,
    custom_head: nn.Module | None = None,
    init: Callable[[torch.Tensor], Any] | None = nn.init.kaiming_normal_,
    n_in: int | None = None,
    n_in_init: str | None = None,
    **head_options: Any,
) -> AdaptedModel:
    """Cut ``model`` and put a new head on it: ``nn.Sequential(body, head)``.

    Args:
        model: a zoo name or an ``nn.Module``. A name is built as its zoo builds it to
            fine-tune, with an ``n_out``-way classifier (``timm.create_model(name,
            num_classes=n_out)``; see :func:`autocut.zoo.build`), which the cut drops.
        n_out: outputs of the new head.
        pretrained: load the zoo's pretrained weights (timm's/torchvision's own loaders; needs
            the network).
        weights: a local checkpoint of the original model (``.safetensors`` or a torch state
            dict, read with ``weights_only=True``), loaded into the body; the old head's keys
            are ignored, every body key must be there.
        cut: as in :func:`create_body`.
        input_size: as in :func:`create_body` (``(C, H, W)`` or one int).
        custom_head: an ``nn.Module`` to use as the head instead of :func:`create_head`'s (moved,
            as :func:`create_head`'s is, to the body's device and floating-point dtype).
        init: a callable, initialiser for the head's weights (custom heads too, as fastai does;
            norm layers skipped, biases zeroed); ``None`` keeps the head's own initialisation.
        n_in, n_in_init: input channels and how to make the new input layer's weights, as in
            :func:`create_body` (applied after ``weights`` load, so RGB checkpoints fit).
        **head_options: passed to :func:`create_head` (``lin_ftrs``, ``ps``, ``concat_pool``, ...).

    Returns:
        An :class:`AdaptedModel` with ``.cut`` (its layer groups in ``cut.groups``; empty, with a
        warning, where they cannot be found), its head on the body's device and in its dtype
        (the first floating-point parameter's: a bfloat16 model gets a bfloat16 head).
        For a name, in train mode. For a module, in that module's mode (``model.training``):
        the body shares its modules, and ``adapt`` switches none of them, so a model passed in
        eval mode comes back in eval mode (call ``.train()`` to train it) and a norm layer frozen
        in eval mode stays so. A ``torch.compile``'d module (or ``nn.DataParallel`` /
        ``DistributedDataParallel``) is adapted as the module it wraps: compile (or wrap) the
        result. Hooks registered on the model's modules keep firing on every forward.

    Raises:
        CutError: (a ``ValueError``) an argument of the wrong kind or out of range, named in the
            message (``n_out`` not an integral number >= 1, ``custom_head`` not a module,
            ``init`` not a callable, a bad ``input_size``, head options as :func:`create_head`
            refuses them); a model that cannot be cut as asked, or a checkpoint that does not
            fit (the message says what to pass instead).

    Example:
        >>> model = adapt("resnet18", n_out=37)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 37])
    """
    n_out = _validate.positive_int("n_out", n_out)
    _validate.a_module("custom_head", custom_head, "the head, taking the body's (B, nf, h, w) map")
    _validate.a_callable("init", init, "called on each weight tensor of the head, such as nn.init.kaiming_normal_")
    if pretrained and weights is not None:
        raise CutError("pass pretrained=True or weights=PATH, not both")
    if custom_head is not None and head_options:
        raise CutError(f"head options {sorted(head_options)} do nothing with custom_head: pass one or the other")
    n_in = _check_n_in(n_in, n_in_init)
    _validate.input_size(input_size, None)  # a bad size fails before the build

    resolved = _resolve(model, input_size, pretrained=pretrained, num_classes=n_out)
    body, recipe = _body(resolved, cut)
    if weights is not None:
        load_weights(body, weights, resolved.arch)
    _set_n_in(body, n_in, n_in_init)
    if custom_head is not None:
        head = custom_head
    else:  # (PyTorch's default init of the Linear layers would be drawn for nothing where init redraws them all)
        with linear_init_skipped() if _fills(init) else contextlib.nullcontext():
            head = create_head(body.cut.nf, n_out, **head_options)
    apply_init(head, init)
    head.to(device=model_device(body), dtype=model_dtype(body))  # a meta, GPU or bfloat16 body's head is too

    adapted = AdaptedModel(body, head, body.cut)
    if recipe is not None and recipe.units is not None:
        _units_from(adapted, recipe.units)
    adapted = with_groups(adapted, body.cut, resolved.arch, resolved.module if resolved.users else None)
    if recipe is not None and recipe.units is None and getattr(adapted, "_autocut_units", None) is not None:
        recipe.units = _units_of(adapted)
    return adapted


def _units_of(model: AdaptedModel) -> tuple[tuple[str, float, int, tuple[str, ...]], ...]:
    """The layer groups' units of ``model`` (:func:`autocut.groups.body_units`, as read by its
    groups), each with the names of its parameters in the body, for a recipe."""
    names = {id(p): name for name, p in model.body.named_parameters()}
    return tuple((u.path, u.stride, u.order, tuple(names[id(p)] for p in u.params)) for u in model._autocut_units)


def _units_from(model: AdaptedModel, units: tuple[tuple[str, float, int, tuple[str, ...]], ...]) -> None:
    """Give ``model`` the units a recipe kept (:func:`_units_of`), with its own body's parameters."""
    params = dict(model.body.named_parameters())
    model._autocut_units = [Unit(path, stride, order, [params[n] for n in names]) for path, stride, order, names in units]


def with_groups(model: nn.Module, cut: Cut, arch: str, users: nn.Module | None) -> nn.Module:
    """``model`` (a body and a head autocut made) in its mode, with ``.cut`` holding its layer
    groups: in the mode of the user's module ``users`` (its modules, shared with the body, keep
    their own flags), else in train mode; the groups empty, with a warning, where they cannot be
    found (the model still works without them)."""
    if users is not None:
        with modes_kept(users):
            model.train(users.training)
    else:
        model.train()
    try:
        groups = tuple((g["first"], g["last"], g["params"]) for g in group_summary(model))
    except Exception as err:  # any failure of the groups' forward: warned, not raised
        warnings.warn(f"the layer groups of {arch} could not be found ({type(err).__name__}: {first_line(err)}); "
                      "model.cut.groups is empty and layer_groups(model) raises", stacklevel=3)
        groups = ()
    model.cut = dataclasses.replace(cut, groups=groups)
    return model
