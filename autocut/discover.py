"""``discover``: from a name or a module to a :class:`~autocut.cut.Cut`, with fallbacks.

The order of attempts, each tried only where the one before failed: the graph rule
(:mod:`autocut.cut_graph`) on the module as given (meta or fake tensors); on a real CPU copy, for a
named model whose meta copy cannot run; then the hooks rule (:mod:`autocut.cut_hooks`) on each.
``Cut.method`` says which one answered; when none does, the ``CutError`` lists why each failed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from autocut import zoo
from autocut.cut import Cut
from autocut.cut_check import check_graph_cut, check_module_cut
from autocut.cut_graph import cut_at_node, find_cut
from autocut.cut_hooks import find_cut_by_hooks, probe_modules
from autocut.errors import CutError, first_line
from autocut.trace import Traced, trace

__all__ = ["discover", "discover_module", "discover_with_trace", "check_input_size"]


def check_input_size(input_size, default) -> tuple[int, int, int]:
    """``input_size`` as a ``(C, H, W)`` tuple of positive ints, or ``default`` where it is ``None``.

    Raises:
        CutError: anything else.
    """
    if input_size is None:
        return tuple(default)
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
        raise CutError(f"input_size must be (C, H, W) positive ints, got {input_size!r}")
    return size


def discover(model: str | nn.Module, input_size: tuple[int, int, int] | None = None) -> Cut:
    """Find where to cut ``model``, the width ``nf`` there and the layout, without a table.

    Args:
        model: a timm name (``"convnext_tiny"``), a torchvision name (``"torchvision:densenet121"``,
            or the bare name where timm has none), or any ``nn.Module``.
        input_size: ``(C, H, W)`` to probe with; default from the model's own config (timm's
            ``pretrained_cfg``, torchvision's weights), else ``(3, 224, 224)``.

    Returns:
        A :class:`Cut`. Named models are built on the meta device: discovery allocates no
        weights, whatever the model's size. Modules are traced where they are; real weights are
        never copied (shapes come from fake tensors).

    Raises:
        CutError: the model has no feature map to cut at (say, an MLP), or an unknown model name
            (the message lists close matches).

    Example:
        >>> cut = discover("resnet34")
        >>> cut.nf, cut.feature_shape, cut.stride
        (512, (512, 7, 7), 32)
    """
    if isinstance(model, nn.Module):
        return discover_module(model, check_input_size(input_size, zoo.default_input_size(model)))
    spec = zoo.resolve(model)
    meta = zoo.build(spec, device="meta")
    size = check_input_size(input_size, zoo.default_input_size(spec, meta))
    return discover_module(meta, size, arch=str(spec), rebuild=lambda: zoo.build(spec, device="cpu"))


def discover_module(
    module: nn.Module,
    input_size: tuple[int, int, int],
    arch: str | None = None,
    rebuild: Callable[[], nn.Module] | None = None,
    where: str | None = None,
) -> Cut:
    """:func:`discover` for a module at a checked ``input_size``.

    Args:
        arch: the name the cut is reported under (default: the module's class name).
        rebuild: gives a real (CPU) copy, for when the module is on the meta device and the
            meta probe fails.
        where: cut at this node name or module path instead of finding the cut.
    """
    return discover_with_trace(module, input_size, arch, rebuild, where)[0]


def discover_with_trace(
    module: nn.Module,
    input_size: tuple[int, int, int],
    arch: str | None = None,
    rebuild: Callable[[], nn.Module] | None = None,
    where: str | None = None,
) -> tuple[Cut, Traced | None]:
    """:func:`discover_module`, and the trace of ``module`` it was found on (``None`` where the
    cut came from the real copy or from hooks), so a body can reuse the eval graph instead of
    tracing it again."""
    arch = arch or type(module).__name__
    errors: list[str] = []
    real: list[nn.Module] = []

    def candidates():
        yield module
        if rebuild is not None:
            if not real:
                real.append(rebuild())
            yield real[0]

    for candidate in candidates():
        try:
            traced = trace(candidate, input_size)
        except Exception as err:  # fx or meta/fake tensors fail: next attempt; listed in the CutError if all fail
            errors.append(f"fx: {type(err).__name__}: {first_line(err)}")
            continue
        if where is not None:
            return cut_at_node(traced, where, arch), (traced if candidate is module else None)
        cut = _find_cut_at_own_size(traced, arch)
        check_graph_cut(traced, cut).raise_for(cut)
        return cut, (traced if candidate is module else None)
    if where is not None:
        raise CutError(f"cannot cut {arch} at {where!r}: it cannot be traced ({errors[0]}); pass a callable or an int")
    for candidate in candidates():
        try:
            calls = probe_modules(candidate, input_size)
        except Exception as err:  # the model's forward fails: next attempt; listed in the CutError if all fail
            errors.append(f"hooks: {type(err).__name__}: {first_line(err)}")
            continue
        cut = find_cut_by_hooks(candidate, calls, input_size, arch)
        check_module_cut(candidate, cut).raise_for(cut)
        return cut, None
    raise CutError(
        f"could not probe {arch} at input size {tuple(input_size)}, {_size_note(module, tuple(input_size))} "
        f"({'; '.join(errors)}). Check the input size (input_size=(C, H, W)) or pass cut= explicitly"
    )


def _size_note(module: nn.Module, size: tuple[int, int, int]) -> str:
    """Where the size probed came from, for a failed probe's message."""
    found = zoo.input_size_source(module)
    if found is None:
        given = "the default 224 px" if size == zoo.default_input_size(module) else "the size given"
        return f"{given}; it states no input size (read: {', '.join(zoo.INPUT_SIZE_SOURCES)})"
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
