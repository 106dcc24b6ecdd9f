"""Tensor layouts of feature maps, and the one conversion to NCHW.

A feature map comes as ``(B, C, h, w)`` (NCHW, convnets), ``(B, h, w, C)`` (NHWC: ConvNeXt, Swin
and other channels-last models) or ``(B, L, C)`` tokens on a patch grid, behind a few class,
register or distillation tokens (NLC: ViTs). :func:`feature_of` reads a shape as one of these;
:func:`to_nchw` turns any of them into ``(B, C, h, w)``, which every body returns.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autocut.probe import PROBE_BATCH

__all__ = ["Layout", "Feature", "LAYOUT_OPS", "MAX_PREFIX_TOKENS", "feature_of", "per_channel", "nhwc_to_nchw",
           "tokens_to_nchw", "to_nchw", "ToNCHW"]

MAX_PREFIX_TOKENS = 32  # class + distillation + register tokens


# ops that re-lay or copy a value without computing a new one, by name (aten overload packets,
# fx call_method / call_function targets)
LAYOUT_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "flatten", "unflatten", "permute", "transpose",
    "t", "movedim", "expand", "expand_as", "slice", "select", "narrow", "getitem", "unsqueeze", "squeeze", "split",
    "split_with_sizes", "chunk", "unbind", "clone", "contiguous", "copy", "copy_", "_to_copy", "to", "type", "float",
    "half", "bfloat16", "alias", "detach", "lift_fresh", "as_strided", "to_nchw",
})


class Layout(str, enum.Enum):
    """How a feature map's dimensions are laid out. A ``str``: ``Layout.NCHW == "NCHW"``."""

    NCHW = "NCHW"
    NHWC = "NHWC"
    NLC = "NLC"  # tokens

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Feature:
    """A value read as a feature map: its layout, channels, grid and prefix tokens."""

    layout: Layout
    nf: int
    grid: tuple[int, int]
    prefix_tokens: int = 0


# --- reading shapes as feature maps ---------------------------------------------------------


def per_channel(shape: tuple[int, ...], map_shape: tuple[int, ...], layout: Layout) -> bool:
    """Whether a tensor of ``shape``, combined with a map of ``map_shape`` laid out as ``layout``,
    varies along the map's channels at most: a number, a norm's ``(C,)`` weight, a ``(1, C, 1, 1)``
    scale; not a mask or a gate made per image or per position, nor a conv's weight.

    >>> per_channel((1, 64, 1, 1), (2, 64, 7, 7), Layout.NCHW), per_channel((2, 1, 7, 7), (2, 64, 7, 7), Layout.NCHW)
    (True, False)
    """
    if math.prod(shape) <= 1 or (len(shape) == 1 and shape[0] == _channels(map_shape, layout)):
        return True
    channel = 1 if layout == Layout.NCHW else len(map_shape) - 1
    offset = len(map_shape) - len(shape)
    return offset >= 0 and all(size == 1 or i + offset == channel for i, size in enumerate(shape))


def _channels(map_shape: tuple[int, ...], layout: Layout) -> int:
    return map_shape[1] if layout == Layout.NCHW else map_shape[-1]


def _proportional(h: int, w: int, in_hw: tuple[int, int]) -> bool:
    """Whether an ``h x w`` grid has the input's aspect (to within a cell) and fits inside it."""
    H, W = in_hw
    return 0 < h <= H and 0 < w <= W and abs(w - W * h / H) <= 1 + 1e-6


def _layout4(shape: tuple[int, ...], in_hw: tuple[int, int], hint: Layout | None) -> Layout | None:
    _, a, b, c = shape
    nchw, nhwc = _proportional(b, c, in_hw), _proportional(a, b, in_hw)
    if nchw and nhwc:
        return hint or Layout.NCHW
    if nchw:
        return Layout.NCHW
    if nhwc:
        return Layout.NHWC
    return None


def _grid_of_tokens(length: int, grids: list[tuple[int, int]]) -> tuple[tuple[int, int], int] | None:
    """The patch grid and prefix count for ``length`` tokens: the nearest map seen before whose
    cells account for all but a few tokens, else a square grid."""
    for h, w in grids:
        if h * w > 1 and 0 <= length - h * w <= MAX_PREFIX_TOKENS:
            return (h, w), length - h * w
    for prefix in range(0, 9):
        side = math.isqrt(length - prefix) if length - prefix > 0 else 0
        if side > 1 and side * side == length - prefix:
            return (side, side), prefix
    return None


def feature_of(
    shape: Any,
    in_hw: tuple[int, int],
    grids: list[tuple[int, int]] = (),
    batch: int = PROBE_BATCH,
    hint: Layout | None = None,
    min_cells: int = 2,
) -> Feature | None:
    """Read ``shape`` as a feature map, or ``None`` if it is not one.

    Args:
        shape: a value's shape, as :func:`autocut.probe.shape_of` gives it.
        in_hw: the input's ``(H, W)``: a map's grid has the input's aspect and fits inside it.
        grids: spatial grids of maps seen before this value, nearest first; tokens are laid on
            the first one their count fits (a few prefix tokens aside), else on a square grid.
        batch: the probe batch: a map's first dimension.
        hint: the layout to pick where a 4-d shape reads both ways (``(B, 7, 7, 7)``).
        min_cells: the fewest grid cells a map has (a 1x1 "map" is a pooled vector).

    Example:
        >>> feature_of((11, 512, 7, 7), (224, 224))
        Feature(layout=<Layout.NCHW: 'NCHW'>, nf=512, grid=(7, 7), prefix_tokens=0)
        >>> feature_of((11, 197, 768), (224, 224)).prefix_tokens
        1
    """
    if not isinstance(shape, tuple) or not shape or not all(isinstance(d, int) for d in shape):
        return None
    if shape[0] != batch or len(shape) not in (3, 4):
        return None
    if len(shape) == 4:
        layout = _layout4(shape, in_hw, hint)
        if layout is None:
            return None
        nf, h, w = (shape[1], shape[2], shape[3]) if layout == Layout.NCHW else (shape[3], shape[1], shape[2])
        if nf < 2 or h * w < min_cells:
            return None
        return Feature(layout, nf, (h, w))
    _, length, nf = shape
    if nf < 2 or length < 2:
        return None
    grids = list(grids)
    if grids and nf == grids[0][0] * grids[0][1] > 1 and not 0 <= length - nf <= MAX_PREFIX_TOKENS:
        return None  # (B, C, h*w): the nearest map flattened channels-first (to pool it), not tokens
    found = _grid_of_tokens(length, grids)
    if found is None:
        return None
    grid, prefix = found
    return Feature(Layout.NLC, nf, grid, prefix)


# --- the conversion -------------------------------------------------------------------------


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` to ``(B, C, H, W)`` as a view (channels_last memory, no copy)."""
    return x.permute(0, 3, 1, 2)


def tokens_to_nchw(x: torch.Tensor, prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, prefix + h*w, C)`` tokens to a ``(B, C, h, w)`` map.

    The ``prefix_tokens`` leading tokens (class, register, distillation) are dropped. ``grid`` is
    the patch grid seen when the model was probed; at another input size a square grid is
    re-derived from the token count, any other grid must match.

    >>> tokens_to_nchw(torch.zeros(2, 1 + 6, 8), 1, (2, 3)).shape
    torch.Size([2, 8, 2, 3])
    """
    tokens = x[:, prefix_tokens:]
    h, w = grid
    n = tokens.shape[1]
    if n != h * w:
        side = math.isqrt(n)
        if h != w or side * side != n:
            raise ValueError(
                f"the body was cut for a {h}x{w} token grid ({h * w} tokens after {prefix_tokens} "
                f"prefix tokens) but got {n} tokens; use the input size the model was discovered with"
            )
        h = w = side
    return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)


def to_nchw(x: torch.Tensor, layout: str, prefix_tokens: int = 0, grid: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """A map in ``layout`` as ``(B, C, h, w)``: NCHW as it is, NHWC as a permuted view, tokens
    without their ``prefix_tokens`` laid on ``grid`` (see :func:`tokens_to_nchw`).

    Example:
        >>> to_nchw(torch.zeros(2, 7, 7, 96), "NHWC").shape
        torch.Size([2, 96, 7, 7])
    """
    if layout == Layout.NHWC:
        return nhwc_to_nchw(x)
    if layout == Layout.NLC:
        return tokens_to_nchw(x, prefix_tokens, grid)
    if layout == Layout.NCHW:
        return x
    raise ValueError(f"unknown layout {layout!r}: one of {', '.join(m.value for m in Layout)}")


class ToNCHW(nn.Module):
    """:func:`to_nchw` as a module (no parameters): what a body made by an int or a callable ends with."""

    def __init__(self, layout: str, prefix_tokens: int = 0, grid: tuple[int, int] = (1, 1)):
        super().__init__()
        self.layout, self.prefix_tokens, self.grid = Layout(layout), prefix_tokens, tuple(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(x, self.layout, self.prefix_tokens, self.grid)

    def extra_repr(self) -> str:
        return f"{self.layout}" + (f", prefix_tokens={self.prefix_tokens}, grid={self.grid}" if self.layout == Layout.NLC else "")
