"""``discover``: from a name or a module to a :class:`~autocut.cut.Cut`, with fallbacks."""

from __future__ import annotations

from torch import nn

from autocut import zoo
from autocut.cut import Cut, cut_at_node, find_cut, find_cut_by_hooks
from autocut.errors import CutError
from autocut.trace import probe_modules, trace

__all__ = ["discover", "discover_module"]


def _input_size(input_size, default) -> tuple[int, int, int]:
    if input_size is None:
        return tuple(default)
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(d, int) and d > 0 for d in size):
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
        CutError: the model has no feature map to cut at (say, an MLP).
        ValueError: an unknown model name (the message lists close matches).

    Example:
        >>> cut = discover("resnet34")
        >>> cut.nf, cut.feature_shape, cut.stride
        (512, (512, 7, 7), 32)
    """
    if isinstance(model, nn.Module):
        return discover_module(model, _input_size(input_size, zoo.default_input_size(model)))
    spec = zoo.resolve(model)
    meta = zoo.build(spec, device="meta")
    size = _input_size(input_size, zoo.default_input_size(spec, meta))
    return discover_module(meta, size, arch=str(spec), rebuild=lambda: zoo.build(spec, device="cpu"))


def _locate_at_default_size(module: nn.Module, input_size, arch: str):
    """Where the cut is does not depend on the input size, but a small input can shrink the last
    map to 1x1 (resnet18 at 32 px): find the node at the model's own size, then read its shape at
    ``input_size``. ``None`` when the sizes agree or the model does not trace at its own size."""
    default = zoo.default_input_size(module)
    if tuple(default[1:]) == tuple(input_size[1:]) or min(input_size[1:]) >= min(default[1:]):
        return None
    try:
        where = find_cut(trace(module, (input_size[0], *default[1:])), arch).where
        traced = trace(module, input_size)
        return cut_at_node(traced, where, arch, method="fx"), traced
    except Exception:
        return None


def discover_module(
    module: nn.Module, input_size, arch: str | None = None, rebuild=None, where: str | None = None, with_trace: bool = False
):
    """:func:`discover` for a module. ``rebuild()`` gives a real (CPU) copy for when the meta
    probe fails; ``where`` cuts at a named node instead of finding the cut.

    The order of attempts: fx on this module, fx on the real copy (fake tensors), module hooks
    on this module, module hooks on the real copy. ``Cut.method`` says which one answered.
    With ``with_trace``, returns ``(cut, traced)`` (``traced`` is ``None`` for hooks) so a body
    can reuse the eval graph of a traced module instead of tracing it again.
    """
    arch = arch or type(module).__name__
    located = _locate_at_default_size(module, input_size, arch) if where is None else None
    if located is not None:
        return located if with_trace else located[0]
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
        except Exception as err:  # fx cannot trace it, or shapes fail on meta/fake tensors
            errors.append(f"fx: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        cut = cut_at_node(traced, where, arch) if where is not None else find_cut(traced, arch)
        if not with_trace:
            return cut
        return cut, (traced if candidate is module else None)
    if where is not None:
        raise CutError(f"cannot cut {arch} at {where!r}: it cannot be traced ({errors[0]}); pass a callable or an int")
    for candidate in candidates():
        try:
            calls = probe_modules(candidate, input_size)
        except Exception as err:
            errors.append(f"hooks: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        cut = find_cut_by_hooks(candidate, calls, input_size, arch)
        return (cut, None) if with_trace else cut
    raise CutError(
        f"could not probe {arch} at input size {tuple(input_size)} ({'; '.join(errors)}). "
        "Check the input size (input_size=(C, H, W)) or pass cut= explicitly"
    )
