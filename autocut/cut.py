"""The :class:`Cut`: where a model was cut, and what the body there returns.

A plain, printable record, the answer to "where did you cut my model?". It is found on the traced
graph (:mod:`autocut.cut_graph`), by module hooks where fx cannot trace (:mod:`autocut.cut_hooks`),
or made from what the user asked for; :mod:`autocut.body` builds the body it describes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autocut.layout import Layout

__all__ = ["Cut", "METHODS", "HEAD_LIKE_MODULES", "stride_of", "format_stride", "dropped_modules"]

# how a cut can be found: on the fx graph, on the forward's ATen graph (made with hooks), with module
# hooks, or where the user said
METHODS = ("fx", "export", "hooks", "user")

# modules that belong to the head when a cut lands on their output (both rules): global pools,
# dropout, identity; the cut moves to their input
HEAD_LIKE_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
                     nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


@dataclass(frozen=True)
class Cut:
    """Where a model was cut, and what the body there returns.

    Attributes:
        arch: the model's name (zoo name or class name).
        where: the graph node (torchvision feature-extraction naming, e.g. ``"layer4"`` or
            ``"norm.layer_norm"``) or module path the body ends at.
        nf: channels of the feature map at the cut.
        layout: :class:`~autocut.layout.Layout` of the value at the cut: ``"NCHW"``, ``"NHWC"``
            or ``"NLC"`` (tokens). The body always returns NCHW.
        feature_shape: ``(nf, h, w)`` of the body's output at ``input_size``.
        stride: input size / feature size (one number when both axes agree, else ``(sh, sw)``),
            read at ``stride_size`` where that is set.
        prefix_tokens: class/register/distillation tokens the body drops (token layouts).
        method: how the cut was found: ``"fx"`` (torch.fx's graph on meta/fake tensors),
            ``"export"`` (the forward's graph of ATen ops, for models fx cannot trace: recorded
            on one meta forward, else torch.export's; made at a module's output or input, as a
            hooks cut is), ``"hooks"`` (module hooks, for models neither
            can capture) or ``"user"`` (given by the caller).
        input_size: ``(C, H, W)`` the model was probed with.
        dropped: modules with parameters that the body leaves out (the original head).
        groups: for an adapted model's cut, the default layer groups as ``(first module, last
            module, parameter count)`` (see :func:`autocut.layer_groups`); empty otherwise.
        after: the outermost module the body ends with, where the cut is the last thing that
            module computes (``"layer4"`` for a ResNet, fastai's way of saying it); ``""`` where
            the cut is made by the model's own forward between modules.
        stride_size: ``(H, W)`` the stride (and the layer groups' strides) were read at, where
            ``input_size`` is smaller than the model's own size: at 16 px a ResNet's map is 1x1
            from ``layer3`` on, which says nothing about stride. ``None``: read at ``input_size``.
    """

    arch: str
    where: str
    nf: int
    layout: Layout
    feature_shape: tuple[int, int, int]
    stride: float | tuple[float, float]
    prefix_tokens: int
    method: str
    input_size: tuple[int, int, int]
    dropped: tuple[str, ...] = ()
    groups: tuple[tuple[str, str, int], ...] = ()
    after: str = ""
    stride_size: tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "layout", Layout(self.layout))  # a record read back from JSON has a str

    @property
    def grid(self) -> tuple[int, int]:
        return self.feature_shape[1], self.feature_shape[2]

    def __str__(self) -> str:
        stride = format_stride(self.stride)
        lines = [
            f"Cut of {self.arch} at {self.where!r}" + (f", the end of {self.after!r}" if self.after and self.after != self.where
                                                       else "") + f" (found by {self.method})",
            f"  features   {self.nf} channels, {self.feature_shape[1]}x{self.feature_shape[2]} "
            f"(stride {stride}{self._read_at}) for input {tuple(self.input_size)}",
            f"  layout     {self.layout}" + (f", {self.prefix_tokens} prefix tokens dropped" if self.prefix_tokens else "")
            + ("" if self.layout == Layout.NCHW else " -> body returns NCHW"),
            f"  dropped    {', '.join(self.dropped) if self.dropped else '(nothing with parameters)'}",
        ]
        for i, (first, last, count) in enumerate(self.groups):
            span = first if first == last else f"{first} .. {last}"
            lines.append(f"  group {i}    {span} ({count:,} parameters)")
        return "\n".join(lines)

    @property
    def _read_at(self) -> str:
        return f", read at {self.stride_size[0]}x{self.stride_size[1]}" if self.stride_size else ""


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


def format_stride(stride: float | tuple[float, float]) -> str:
    """A stride as people read it: ``"32"``, ``"37.4"``, ``"16x22.9"`` for ``(sh, sw)``."""
    return "x".join(_fmt(s) for s in stride) if isinstance(stride, tuple) else _fmt(stride)


def stride_of(input_size: tuple[int, int, int], grid: tuple[int, int]) -> float | tuple[float, float]:
    """Input size over grid size: one number where both axes agree, else ``(sh, sw)``.

    >>> stride_of((3, 224, 224), (7, 7)), stride_of((3, 224, 320), (14, 14))
    (32, (16, 22.857))
    """
    sh, sw = input_size[1] / grid[0], input_size[2] / grid[1]
    sh, sw = (int(s) if float(s).is_integer() else round(s, 3) for s in (sh, sw))
    return sh if sh == sw else (sh, sw)


def dropped_modules(model: nn.Module, used: set[str], around: set[str] = frozenset()) -> tuple[str, ...]:
    """The outermost modules (or bare parameters) of ``model`` whose parameters none of the
    ``used`` module or parameter paths holds: what a body leaves out (the original head).
    Compared by identity: a module reached under two names is used under both. A module that holds
    a used one, or one of ``around`` (whose forward runs up to the cut), is never left out whole:
    ``class_layers.out`` is, where the body keeps ``class_layers.relu``."""
    kept: set[int] = set()
    modules = dict(model.named_modules(remove_duplicate=False))  # every name a module is reached by
    params = dict(model.named_parameters(remove_duplicate=False))
    for path in used:
        if path in modules:
            kept.update(id(p) for p in modules[path].parameters())
        elif path in params:
            kept.add(id(params[path]))
    dropped: list[str] = []

    def visit(prefix: str, module: nn.Module):
        for name, child in module.named_children():
            params = [id(p) for p in child.parameters()]
            if not params or all(p in kept for p in params):
                continue
            path = f"{prefix}{name}"
            if any(p in kept for p in params) or path in around or any(u.startswith(path + ".") for u in used):
                visit(f"{prefix}{name}.", child)
            else:
                dropped.append(f"{prefix}{name}")
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in kept:
                dropped.append(f"{prefix}{name}")

    visit("", model)
    return tuple(dropped)
