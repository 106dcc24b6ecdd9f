"""``discover``: from a name or a module to a :class:`~autocut.cut.Cut`, with fallbacks.

The order of attempts, each tried only where the one before failed: the graph rule
(:mod:`autocut.cut_graph`) on the module as given (meta or fake tensors); on a real CPU copy, for a
named model whose meta copy cannot run; then the hooks rule (:mod:`autocut.cut_hooks`) on each.
``Cut.method`` says which one answered; when none does, the ``CutError`` lists why each failed.
Where the size probed was only the 224 px guess (the model states none) and the model does not run
there, the attempts are made at the first of :data:`LARGER_SIDES` it runs at, recorded in
``Cut.input_size``; where it runs at none, the ``CutError`` lists each size and what the model said.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

from torch import nn

from autocut import _validate, zoo
from autocut._gc import gc_paused
from autocut.cut import Cut
from autocut.cut_check import check_graph_cut, check_module_cut
from autocut.cut_export import module_cut
from autocut.cut_graph import cut_at_node, find_cut
from autocut.cut_hooks import ModuleCall, find_cut_by_hooks, move_cut, probe_modules
from autocut.errors import CutError, first_line
from autocut.probe import model_device, modes_kept, probe_forward
from autocut.trace import Traced, trace, trace_aten

__all__ = ["discover", "discover_module", "discover_with_trace", "discovery_target", "Target", "check_input_size", "unwrap",
           "LARGER_SIDES"]

# where a model states no input size and does not run at the 224 px guess (a fixed
# F.avg_pool2d(x, 8), a positional table for 256 px), the sides tried next, in order
LARGER_SIDES = (256, 299, 320, 384, 448, 512)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``torch.compile``'s ``OptimizedModule`` (its ``_orig_mod``),
    ``nn.DataParallel``'s and ``DistributedDataParallel``'s ``.module``; else ``model`` itself.

    A wrapper has no forward of its own to cut (a compiled module's graph is dynamo's, not
    fx's): autocut cuts what it wraps, whose modules the wrapper shares. Compile or wrap the
    adapted model afterwards.
    """
    wrappers: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded where anything was compiled
    if eval_frame is not None:
        wrappers += (eval_frame.OptimizedModule,)
    while isinstance(model, wrappers):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def check_input_size(input_size, default) -> tuple[int, int, int]:
    """``input_size`` as a ``(C, H, W)`` tuple of positive ints (one int ``s``: ``(C, s, s)`` with
    ``default``'s ``C``), or ``default`` where it is ``None`` (:func:`autocut._validate.input_size`).

    Raises:
        CutError: anything else.
    """
    return _validate.input_size(input_size, default)


def discover(model: str | nn.Module, input_size: tuple[int, int, int] | None = None) -> Cut:
    """Find where to cut ``model``, the width ``nf`` there and the layout, without a table.

    Args:
        model: a timm name (``"convnext_tiny"``), a torchvision name (``"torchvision:densenet121"``,
            or the bare name where timm has none), or any ``nn.Module`` (a ``torch.compile``'d or
            data-parallel one is read as the module it wraps, see :func:`unwrap`).
        input_size: ``(C, H, W)`` to probe with (one int ``s``: ``(C, s, s)``); default the size the
            model states (:func:`autocut.zoo.input_size_source`: timm's ``pretrained_cfg``,
            torchvision's weights, a module's config or attributes), else ``(3, 224, 224)``, and
            where the model does not run at that guess, the first of :data:`LARGER_SIDES` it runs
            at (``Cut.input_size`` says which).

    Returns:
        A :class:`Cut`. Named models are built on the meta device: discovery allocates no
        weights, whatever the model's size. Modules are traced where they are; real weights are
        never copied (shapes come from fake tensors).

    Raises:
        CutError: the model has no feature map to cut at (say, an MLP); it does not run at
            ``input_size`` (the message says which size or ``n_in`` it needs, or each size tried
            and what the model said there); an unknown model name (the message lists close matches).

    Example:
        >>> cut = discover("resnet34")
        >>> cut.nf, cut.feature_shape, cut.stride
        (512, (512, 7, 7), 32)
    """
    target = discovery_target(model, input_size)
    cut = discover_module(target.module, target.input_size, arch=target.arch, rebuild=target.rebuild,
                          try_larger=target.try_larger)
    return _stride_read(target.module, cut, target.own_size)


class Target(NamedTuple):
    """What :func:`discover` probes: the module (a named model built on the meta device), the name
    its cut is reported under, the size to probe, the model's own size, how to build a real copy
    (named models), and whether the size is only the 224 px guess (larger ones may be tried)."""

    module: nn.Module
    arch: str
    input_size: tuple[int, int, int]
    own_size: tuple[int, int, int]
    rebuild: Callable[[], nn.Module] | None
    try_larger: bool


def discovery_target(model: str | nn.Module, input_size: tuple[int, int, int] | None) -> Target:
    """The :class:`Target` of a name (built on the meta device) or a module (unwrapped: :func:`unwrap`)."""
    if isinstance(model, nn.Module):
        model = unwrap(model)
        own = zoo.default_input_size(model)
        larger = input_size is None and zoo.stated_input_size(model) is None
        return Target(model, type(model).__name__, check_input_size(input_size, own), own, None, larger)
    spec = zoo.resolve(model)
    meta = zoo.build(spec, device="meta")
    own = zoo.default_input_size(spec, meta)
    larger = input_size is None and zoo.stated_input_size(spec, meta) is None
    return Target(meta, str(spec), check_input_size(input_size, own), own, lambda: zoo.build(spec, device="cpu"), larger)


def _stride_read(model: nn.Module, cut: Cut, own_size: tuple[int, int, int]) -> Cut:
    """``cut`` with its stride read at the model's own size where ``cut.input_size`` is smaller
    (:func:`autocut.groups.read_stride`, on the body ``create_body`` would make)."""
    if own_size[1] <= cut.input_size[1] and own_size[2] <= cut.input_size[2]:
        return cut
    from autocut.body import build_body  # bodies are built on discovery
    from autocut.groups import read_stride

    with modes_kept(model):
        try:
            body, cut = build_body(model, cut, cut.input_size, cut.arch)
        except CutError:  # a body the meta model cannot run: the stride stays read at input_size
            return cut
        return read_stride(body, cut, own_size)


def discover_module(
    module: nn.Module,
    input_size: tuple[int, int, int],
    arch: str | None = None,
    rebuild: Callable[[], nn.Module] | None = None,
    where: str | None = None,
    try_larger: bool = False,
) -> Cut:
    """:func:`discover` for a module at a checked ``input_size``.

    Args:
        arch: the name the cut is reported under (default: the module's class name).
        rebuild: gives a real (CPU) copy, for when the module is on the meta device and the
            meta probe fails.
        where: cut at this node name or module path instead of finding the cut.
        try_larger: ``input_size`` is only a guess (the model states none, the caller gave
            none): where the model does not run there, try each of :data:`LARGER_SIDES` in turn
            and cut at the first it runs at (``Cut.input_size``) before refusing.
    """
    return discover_with_trace(module, input_size, arch, rebuild, where, try_larger)[0]


def discover_with_trace(
    module: nn.Module,
    input_size: tuple[int, int, int],
    arch: str | None = None,
    rebuild: Callable[[], nn.Module] | None = None,
    where: str | None = None,
    try_larger: bool = False,
) -> tuple[Cut, Traced | None]:
    """:func:`discover_module`, and the trace of ``module`` it was found on (``None`` where the
    cut came from the real copy or from hooks), so a body can reuse the eval graph instead of
    tracing it again. Every module of ``module`` keeps its training flag. The size the cut was
    found at is ``Cut.input_size`` (a larger one than ``input_size`` with ``try_larger``)."""
    with modes_kept(module):
        return _discover(module, input_size, arch or type(module).__name__, rebuild, where, try_larger)


def _discover(
    module: nn.Module,
    input_size: tuple[int, int, int],
    arch: str,
    rebuild: Callable[[], nn.Module] | None,
    where: str | None,
    try_larger: bool = False,
) -> tuple[Cut, Traced | None]:
    errors: list[str] = []
    real: list[nn.Module] = []

    def candidates():
        yield module
        if rebuild is not None:
            if not real:
                real.append(rebuild())
            yield real[0]

    found = _attempts(module, candidates, input_size, arch, where, errors)
    if found is not None:
        return found

    def runs_at(size: tuple[int, int, int]) -> bool:
        return any(_runs_at(candidate, size) for candidate in candidates())

    if where is not None:
        instead = None if runs_at(tuple(input_size)) else _what_size_instead(arch, module, tuple(input_size), runs_at)
        raise CutError(instead or f"cannot cut {arch} at {where!r}: it cannot be traced ({errors[0]}); pass a "
                       "callable or an int")
    instead = _what_size_instead(arch, module, tuple(input_size), runs_at)
    if instead is not None:
        raise CutError(instead)
    tried: list[str] = []
    said_before = {error.split(": ", 1)[1] for error in errors}
    for side in LARGER_SIDES if try_larger else ():
        size = (input_size[0], side, side)
        if side <= min(input_size[1:]):
            continue
        said = _probe_error(list(candidates()), size)
        if said in said_before:  # a failure that does not change with the size is not for want of a larger one
            tried.append(f"{side} px (the same error: not a size failure, no larger size tried)")
            break
        if said is None:  # it runs here: cut here (or say why not, at the size it runs at)
            at_size: list[str] = []
            found = _attempts(module, candidates, size, arch, None, at_size)
            if found is not None:
                return found
            said = "; ".join(at_size)
        said_before.add(said)
        tried.append(f"{side} px ({said})")
    raise CutError(
        f"could not probe {arch} at input size {tuple(input_size)}, {_size_note(module, tuple(input_size))} "
        f"({'; '.join(errors)})" + (f"; nor at the larger sizes tried: {', '.join(tried)}" if tried else "")
        + ". Check the input size (input_size=(C, H, W)) or pass cut= explicitly"
    )


def _attempts(
    module: nn.Module,
    candidates: Callable[[], Iterator[nn.Module]],
    input_size: tuple[int, int, int],
    arch: str,
    where: str | None,
    errors: list[str],
) -> tuple[Cut, Traced | None] | None:
    """The graph rule on each candidate, then (without ``where``) the hooks rule on each: the
    first cut found and checked, or ``None`` with why each attempt failed added to ``errors``."""
    for candidate in candidates():
        try:
            traced = trace(candidate, input_size)
        except Exception as err:  # fx or meta/fake tensors fail: next attempt; listed in the CutError if all fail
            errors.append(f"fx: {type(err).__name__}: {first_line(err)}")
            continue
        if where is not None:
            return cut_at_node(traced, where, arch), (traced if candidate is module else None)
        with gc_paused():  # (the graph rule and its check allocate as tracing does)
            cut = _find_cut_at_own_size(traced, arch)
            check_graph_cut(traced, cut).raise_for(cut)
        return cut, (traced if candidate is module else None)
    if where is not None:
        return None
    values_read = False  # the meta model's forward failed: it reads values, which no ATen graph can be made of either
    for candidate in candidates():
        try:
            calls = probe_modules(candidate, input_size)
        except Exception as err:  # the model's forward fails: next attempt; listed in the CutError if all fail
            errors.append(f"hooks: {type(err).__name__}: {first_line(err)}")
            values_read = values_read or model_device(candidate).type == "meta"
            continue
        exported = None if values_read else _cut_on_export(candidate, calls, input_size, arch, errors)
        cut = exported or find_cut_by_hooks(candidate, calls, input_size, arch)
        check = check_module_cut(candidate, cut)
        if check.move_to:  # per-channel ops (a head's ReLU) run on the map after the cut, up to a module call
            cut = move_cut(candidate, calls, cut, check.move_to)
            check = check_module_cut(candidate, cut)
        check.raise_for(cut)
        return cut, None
    return None


def _cut_on_export(
    module: nn.Module, calls: list[ModuleCall], input_size: tuple[int, int, int], arch: str, errors: list[str]
) -> Cut | None:
    """The graph rule on ``module``'s ATen graph (:func:`autocut.trace.trace_aten`), checked there
    and made at a module's output or input (:mod:`autocut.cut_export`); ``None`` where no such
    graph can be made (the forward reads values) or the cut is made between module calls (the
    hooks rule answers instead; why is added to ``errors``). A cut that fails the graph check
    raises, as on an fx graph."""
    try:
        traced = trace_aten(module, input_size)
    except Exception as err:  # neither records nor exports (data-dependent code, unsupported Python): the hooks rule
        errors.append(f"export: {type(err).__name__}: {first_line(err)}")
        return None
    cut = find_cut(traced, arch)
    check_graph_cut(traced, cut).raise_for(dataclasses.replace(cut, method="export"))
    try:
        return module_cut(module, traced, cut, calls)
    except CutError as err:
        errors.append(f"export: {first_line(err)}")
        return None


def _probe_error(candidates: list[nn.Module], size: tuple[int, int, int]) -> str | None:
    """``None`` where one of ``candidates`` runs at ``size``, else the first line of the error of
    the last (the real copy, where there is one). Meta or fake tensors only, unless a model's
    code reads values (``.item()``): then one real forward of batch 1, as every probe does."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    said = None
    for candidate in candidates:
        try:
            try:
                probe_forward(candidate, size, real_batch=None)
            except (DataDependentOutputException, DynamicOutputShapeException):
                probe_forward(candidate, size, batch=1, fake=False)
            return None
        except Exception as err:  # any failure: the model does not run at this size; what it said is listed
            said = f"{type(err).__name__}: {first_line(err)}"
    return said


def _runs_at(module: nn.Module, size: tuple[int, int, int]) -> bool:
    try:
        probe_forward(module, size)
    except Exception:  # any failure: the model does not run at this size either
        return False
    return True


def _what_size_instead(
    arch: str, module: nn.Module, size: tuple[int, int, int], runs_at: Callable[[tuple[int, int, int]], bool]
) -> str | None:
    """For a model that ran at no attempt: where it runs with its own channels or at its own
    size, what to pass instead (``n_in=``, ``input_size=``); ``None`` where it does not run there."""
    own = zoo.default_input_size(module)
    c, h, w = size
    n_in = (f"pass n_in={c} (adapt, create_body) to rebuild its input layer for {c} channel{'s' * (c != 1)}, "
            f"keeping its weights (see n_in_init), with input_size={{}}: the channels the model itself reads")
    if c != own[0] and runs_at((own[0], h, w)):
        return f"{arch} reads {own[0]}-channel images, not {c} (input_size={size}): " + n_in.format((own[0], h, w))
    if (h, w) != tuple(own[1:]) and runs_at(own):
        found = zoo.input_size_source(module)
        said = f", which its {found[1]} states" if found else " (the default size)"
        return (f"{arch} does not run at {h}x{w}: it needs its own input size, {own}{said}. Pass input_size={own} "
                f"(and resize your images to {own[1]}x{own[2]}), or build the model for {h}x{w} and pass the module"
                + _built_for(arch, module, h if h == w else (h, w))
                + (f". Also {n_in.format(own)}" if c != own[0] else ""))
    return None


def _built_for(arch: str, module: nn.Module, side: int | tuple[int, int]) -> str:
    """How the zoo the module comes from builds it for another input size."""
    if hasattr(module, "pretrained_cfg"):  # timm's
        return f" (timm.create_model({arch!r}, img_size={side}))"
    if type(module).__module__.startswith("torchvision.") and hasattr(module, "image_size"):  # its ViTs
        return f" (torchvision.models.{arch.removeprefix('torchvision:')}(image_size={side}))"
    return ""


def _size_note(module: nn.Module, size: tuple[int, int, int]) -> str:
    """Where the size probed came from, for a failed probe's message."""
    found = zoo.input_size_source(module)
    if found is None:
        given = "the default 224 px" if size == zoo.default_input_size(module) else "the size given"
        return f"{given}; it states no input size (read: {'; '.join(zoo.INPUT_SIZE_SOURCES)})"
    stated, source = found
    return f"the size it states ({source})" if stated == size else f"not the size it states: {stated} from {source}"


def _find_cut_at_own_size(traced: Traced, arch: str) -> Cut:
    """The cut of a traced model. Where the cut is does not depend on the input size, but a small
    input can shrink the last map to 1x1 (resnet18 at 32 px): then the node is found at the
    model's own size and its shape read at the size traced."""
    size = tuple(traced.input_shape[1:])
    default = zoo.default_input_size(traced.model)
    if tuple(default[1:]) == size[1:] or min(size[1:]) >= min(default[1:]):
        return find_cut(traced, arch)
    try:
        at_own_size = trace(traced.model, (size[0], *default[1:]))
    except Exception as err:  # as above: any trace failure; the cut is found at the size given
        if zoo.stated_input_size(traced.model) is not None:  # (224 px is only a guess for other modules)
            warnings.warn(
                f"{arch} could not be traced at its own input size {tuple(default)} ({type(err).__name__}: "
                f"{first_line(err)}); its cut is found at {size}, where small maps can move it: pass a larger input_size",
                stacklevel=4,
            )
        return find_cut(traced, arch)
    try:
        where = find_cut(at_own_size, arch).where
    except CutError:  # no cut at its own size: the error worth showing is the one at the size given
        return find_cut(traced, arch)
    return cut_at_node(traced, where, arch, method="fx")
