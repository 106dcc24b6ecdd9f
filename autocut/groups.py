"""Layer groups inferred from the feature stride: fastai's splitters, found.

fastai keeps a hand-written splitter per architecture (``_resnet_split``: ``body[:6]``,
``body[6:]``, head). autocut reads the stride every module's output runs at (from the shapes
discovery's trace recorded for each module call, else one forward on fake tensors with module
hooks) and splits where the stride changes:

- a *unit* is the coarsest module whose children all run at one stride (``layer3`` of a ResNet,
  ``features.denseblock2`` of a DenseNet); units in execution order make the body;
- a *stage* is a run of units at one stride (``n=None``: one group per stage, for layer-wise
  decay); ``n=3`` (the default) is early body / late body / head, the late body starting where the
  stride first reaches 16, as ``_resnet_split`` does; other ``n`` merge stages evenly.

Parameters no module call owns (class tokens, position embeddings) go to the first group; final
norms run at the last stride, so they go with the last stage.

Freezing by group is :mod:`autocut.freeze`; optimiser param groups are :mod:`autocut.optim`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from autocut.cut import Cut, stride_of
from autocut.errors import CutError
from autocut.layout import Layout, feature_of
from autocut.probe import PROBE_BATCH, probe_forward, shape_of

__all__ = ["LATE_STRIDE", "Unit", "body_units", "layer_groups", "splitter", "group_summary", "stride_size",
           "read_stride"]

LATE_STRIDE = 16  # where fastai's _resnet_split starts the late body


@dataclass
class Unit:
    """A module (path in the body) whose parameters share one stage, and the stride it runs at."""

    path: str
    stride: float
    order: int
    params: list[nn.Parameter]


def _module_strides(body: nn.Module, input_size: tuple[int, int, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Output stride and first-call order of every module of ``body``; modules whose output is
    not a feature map get no stride.

    A graph body made by ``create_body`` from discovery's trace carries the output shape of each
    module call at that size (``body.module_calls``); any other body runs once with hooks."""
    in_hw = tuple(input_size[1:])
    recorded = getattr(body, "module_calls", None)
    if recorded is not None and recorded[0] == in_hw:
        calls, batch = recorded[1], PROBE_BATCH
    else:
        calls, batch = _hooked_forward(body, input_size)
    strides: dict[str, float] = {}
    order: dict[str, int] = {}
    grids: list[tuple[int, int]] = []
    for path, shape in calls:
        order.setdefault(path, len(order))
        if isinstance(shape, list):  # a tuple or list output: its first value
            shape = shape[0] if shape else None
        if path in strides or not isinstance(shape, tuple):
            continue
        feat = feature_of(shape, in_hw, grids[::-1], batch=batch)
        if feat is not None:
            if feat.layout != Layout.NLC:
                grids.append(feat.grid)
            strides[path] = max(input_size[1] / feat.grid[0], input_size[2] / feat.grid[1])
    # A graph body calls leaf modules directly, never their containers: a container runs from
    # its first descendant's call to its last, at the stride of its last one.
    first: dict[str, int] = {}
    last_stride: dict[str, float] = {}
    for path, i in sorted(order.items(), key=lambda kv: kv[1]):
        parts = path.split(".")
        for k in range(1, len(parts)):
            container = ".".join(parts[:k])
            if container not in order:
                first.setdefault(container, i)
                if path in strides:
                    last_stride[container] = strides[path]
    order.update(first)
    for container, stride in last_stride.items():
        strides.setdefault(container, stride)
    return strides, order


def _hooked_forward(body: nn.Module, input_size: tuple[int, int, int]) -> tuple[list[tuple[str, Any]], int]:
    """``(module path, output shape)`` of each module call of one eval forward of ``body``
    (:func:`autocut.probe.probe_forward`), and the batch it ran with."""
    calls: list[tuple[str, Any]] = []
    handles = [
        module.register_forward_hook(lambda m, args, out, path=path: calls.append((path, shape_of(out))))
        for path, module in body.named_modules()
        if path
    ]
    try:
        batch = probe_forward(body, input_size, before_real=calls.clear)
    finally:
        for h in handles:
            h.remove()
    return calls, batch


def stride_size(
    body: nn.Module, input_size: tuple[int, int, int], own_size: tuple[int, int, int]
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Where to read ``body``'s strides, and its output grid there: the model's own size on each
    side where ``input_size`` is smaller (at 16 px a ResNet's map is 1x1 from ``layer3`` on,
    which says nothing about stride), so strides and layer groups do not depend on the training
    size. ``None`` where ``input_size`` is as big, or the body does not run at the bigger size
    on fake tensors (a model built for one size, or one that reads values: a real forward there
    could need the memory a smaller size was chosen to spare); then strides are read at
    ``input_size``.

    Example:
        >>> stride_size(create_body("resnet50", input_size=(3, 16, 16)), (3, 16, 16), (3, 224, 224))
        ((224, 224), (7, 7))
    """
    hw = (max(own_size[1], input_size[1]), max(own_size[2], input_size[2]))
    if hw == tuple(input_size[1:]):
        return None
    out: list[Any] = []
    handle = body.register_forward_hook(lambda m, args, o: out.append(shape_of(o)))
    try:  # fake tensors only: no real forward at a size the caller may have chosen to spare memory
        probe_forward(body, (input_size[0], *hw), real_batch=None)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError, CutError):
        return None  # the model runs only at the given size, or only on real tensors
    finally:
        handle.remove()
    shape = out[-1] if out else None
    return (hw, tuple(shape[-2:])) if isinstance(shape, tuple) and len(shape) == 4 else None


def read_stride(body: nn.Module, cut: Cut, own_size: tuple[int, int, int]) -> Cut:
    """``cut`` with its stride read at :func:`stride_size` (``stride_size`` set) where that is
    not ``cut.input_size``; else ``cut`` itself."""
    measured = stride_size(body, cut.input_size, own_size)
    if measured is None:
        return cut
    return dataclasses.replace(cut, stride=stride_of((0, *measured[0]), measured[1]), stride_size=measured[0])


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def body_units(body: nn.Module, input_size: tuple[int, int, int]) -> list[Unit]:
    """The body's units in execution order (see the module docstring)."""
    strides, order = _module_strides(body, input_size)

    def stride_of(path: str, module: nn.Module) -> float | None:
        if path in strides:
            return strides[path]
        paths = [f"{path}.{p}" if path else p for p, _ in module.named_modules() if p]
        inner = [strides[p] for p in paths if p in strides]
        return inner[-1] if inner else None

    units: list[Unit] = []
    loose: list[nn.Parameter] = []  # parameters no called module owns: class tokens, embeddings

    def visit(path: str, module: nn.Module):
        children = [(f"{path}.{n}" if path else n, c) for n, c in module.named_children() if _has_params(c)]
        own = list(module.parameters(recurse=False))
        child_strides = {stride_of(p, c) for p, c in children} - {None}
        if path and (not children or len(child_strides) <= 1) and path in order:
            units.append(Unit(path, stride_of(path, module) or math.nan, order[path], list(module.parameters())))
            return
        loose.extend(own)
        for p, c in children:
            if p in order:
                visit(p, c)
            else:
                loose.extend(c.parameters())

    visit("", body)
    units.sort(key=lambda u: u.order)
    last = None
    for u in units:  # a unit whose output is no feature map runs at the stride before it
        if math.isnan(u.stride):
            u.stride = last if last is not None else min((v.stride for v in units if not math.isnan(v.stride)), default=1.0)
        last = u.stride
    if loose:
        units.insert(0, Unit("(embeddings)", units[0].stride if units else 1.0, -1, loose))
    return units


def _stages(units: list[Unit]) -> list[list[Unit]]:
    """Runs of units at one stride (the embeddings come first, at the first unit's stride)."""
    stages: list[list[Unit]] = []
    for u in units:
        if stages and stages[-1][-1].stride == u.stride:
            stages[-1].append(u)
        else:
            stages.append([u])
    return stages


def _finer(units: list[Unit], body: nn.Module) -> list[Unit]:
    """Each unit split into its children with parameters, in order (for models at one stride
    throughout, like ViTs); a unit's own parameters (a position embedding) go with its first child."""
    out: list[Unit] = []
    for u in units:
        module = body.get_submodule(u.path) if u.path != "(embeddings)" else None
        kids = [(f"{u.path}.{n}", c) for n, c in module.named_children() if _has_params(c)] if module else []
        if len(kids) < 2:
            out.append(u)
            continue
        own = list(module.parameters(recurse=False))
        out += [Unit(p, u.stride, u.order, (own if i == 0 else []) + list(c.parameters())) for i, (p, c) in enumerate(kids)]
    return out


def _early_late(units: list[Unit], body: nn.Module) -> tuple[list[Unit], list[Unit]]:
    real = [i for i, u in enumerate(units) if u.path != "(embeddings)"]
    late_at = next((i for i in real if units[i].stride >= LATE_STRIDE), None)
    if late_at is not None and real and late_at > real[0]:
        return units[:late_at], units[late_at:]
    # one stride throughout (ViT) or never reaching 16: split the parameters in halves, at units
    # fine enough that none holds half of them (a ViT's blocks, not its `blocks` container)
    for _ in range(3):
        real_units = [u for u in units if u.path != "(embeddings)"]
        sizes = [sum(p.numel() for p in u.params) for u in real_units]
        if len(real_units) >= 4 and max(sizes) <= sum(sizes) / 2:
            break
        units = _finer(units, body)
    sizes = np.cumsum([sum(p.numel() for p in u.params) for u in units])
    cut = int(np.searchsorted(sizes, sizes[-1] / 2)) + 1 if len(units) > 1 else 1
    cut = min(max(cut, 1), len(units) - 1) if len(units) > 1 else 1
    return units[:cut], units[cut:]


def _adapted_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, Any]:
    """``(body, head, cut)`` of a model autocut made: ``adapt``'s ``nn.Sequential(body, head)``
    or ``unet``'s pyramid and decoder (``.body``, ``.head``), each with ``.cut``."""
    if isinstance(model, nn.Sequential) and len(model) == 2 and hasattr(model, "cut"):
        return model[0], model[1], model.cut
    parts = getattr(model, "body", None), getattr(model, "head", None), getattr(model, "cut", None)
    if all(isinstance(p, nn.Module) for p in parts[:2]) and isinstance(parts[2], Cut):
        return parts
    raise CutError(
        f"layer groups need a model made by autocut.adapt or autocut.unet (a body and a head, with .cut), got "
        f"{type(model).__name__}"
    )


def layer_groups(model: nn.Module, n: int | None = 3) -> list[list[nn.Parameter]]:
    """Parameter groups of an adapted model, in execution order, partitioning its parameters.

    Args:
        model: a model made by :func:`autocut.adapt` or :func:`autocut.unet` (whose head is
            the decoder).
        n: ``3`` (default): early body, late body (from stride 16 on), head. ``None``: one group
            per stage (stride change) plus the head. Any other ``n >= 2``: the stages merged
            evenly into ``n - 1`` body groups, plus the head.

    Example:
        >>> model = autocut.adapt("torchvision:resnet34", n_out=10)
        >>> [len(g) for g in layer_groups(model)]  # conv1..layer2, layer3..layer4, head
        [48, 60, 6]
    """
    return [[p for u in g for p in u.params] if g and isinstance(g[0], Unit) else g for g in _groups(model, n)]


def _groups(model: nn.Module, n: int | None) -> list[list]:
    body, head, cut = _adapted_parts(model)
    cached = getattr(model, "_autocut_units", None)
    if cached is None:
        cached = body_units(body, (cut.input_size[0], *(cut.stride_size or cut.input_size[1:])))
        model._autocut_units = cached  # one hooked forward per model
    units = cached
    head_params = list(head.parameters())
    if n == 3:
        early, late = _early_late(units, body)
        return [early, late, head_params]
    stages = _stages(units)
    if n is None:
        return [*stages, head_params]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise CutError(f"n must be None or an int >= 2 (body groups + head), got {n!r}")
    if n - 1 > len(stages):
        raise CutError(f"{cut.arch} has {len(stages)} stages: n can be at most {len(stages) + 1} (or None)")
    merged = [[u for s in part for u in s] for part in np.array_split(np.array(stages, dtype=object), n - 1)]
    return [*merged, head_params]


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """fastai-compatible splitter (``Learner(splitter=autocut.splitter)``): the default groups."""
    return layer_groups(model)


def group_summary(model: nn.Module, n: int | None = 3) -> list[dict[str, Any]]:
    """First and last module and parameter count of each group, for printing."""
    out = []
    for i, g in enumerate(_groups(model, n)):
        if g and isinstance(g[0], Unit):
            out.append({"group": i, "first": g[0].path, "last": g[-1].path, "stride": g[-1].stride,
                        "params": sum(p.numel() for u in g for p in u.params)})
        else:
            out.append({"group": i, "first": "head", "last": "head", "stride": None, "params": sum(p.numel() for p in g)})
    return out
