"""Building blocks: the concat-pool head and the layout conversions the body ends with.

Each op has a functional form and an ``nn.Module`` form. Nothing here knows about tracing or
models; ``body`` and ``adapt`` assemble these pieces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdaptiveConcatPool2d",
    "SigmoidRange",
    "adaptive_concat_pool2d",
    "create_head",
    "nhwc_to_nchw",
    "tokens_to_nchw",
]


# --- layouts --------------------------------------------------------------------------------


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


# --- pooling --------------------------------------------------------------------------------


def adaptive_concat_pool2d(x: torch.Tensor, output_size: int | tuple[int, int] = 1) -> torch.Tensor:
    """``cat([adaptive_max_pool2d(x), adaptive_avg_pool2d(x)], 1)``: max first, as fastai does.

    On CUDA with Triton installed, a global pool (``output_size=1``) runs as one fused kernel that
    reads the map once (see :mod:`autocut.kernels`); everywhere else it is PyTorch's own ops.
    """
    if output_size in (1, (1, 1)):
        from autocut.kernels import fused_concat_pool_available, fused_concat_pool2d

        if fused_concat_pool_available(x):
            return fused_concat_pool2d(x)
    return torch.cat([F.adaptive_max_pool2d(x, output_size), F.adaptive_avg_pool2d(x, output_size)], 1)


class AdaptiveConcatPool2d(nn.Module):
    """Concatenate adaptive max and average pooling: ``(B, C, H, W) -> (B, 2C, s, s)``.

    The order is fastai's, ``[max, avg]``. timm's ``adaptive_catavgmax_pool2d`` (``pool_type=
    'catavgmax'``) puts the average first: to move a head's weights between the two, swap the two
    halves of the first layer's input features.

    Args:
        size: output size of each pooling (``1`` for a global pool, the usual case).

    Example:
        >>> pool = AdaptiveConcatPool2d()
        >>> pool(torch.randn(2, 512, 7, 7)).shape
        torch.Size([2, 1024, 1, 1])
    """

    def __init__(self, size: int | tuple[int, int] | None = None):
        super().__init__()
        self.size = size or 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_concat_pool2d(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class SigmoidRange(nn.Module):
    """``sigmoid(x) * (high - low) + low``: squashes a regression output into ``(low, high)``."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * (self.high - self.low) + self.low

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


# --- head -----------------------------------------------------------------------------------


def _lin_bn_drop(n_in: int, n_out: int, bn: bool, p: float, act: nn.Module | None, lin_first: bool):
    norm = [nn.BatchNorm1d(n_out if lin_first else n_in)] if bn else []
    drop = [nn.Dropout(p)] if p != 0 else []
    # fastai drops the Linear's bias wherever the block has a BatchNorm.
    lin = [nn.Linear(n_in, n_out, bias=not bn)]
    if act is not None:
        lin.append(act)
    return lin + norm + drop if lin_first else norm + drop + lin


def create_head(
    nf: int,
    n_out: int,
    lin_ftrs: Sequence[int] | None = None,
    ps: float | Sequence[float] = 0.5,
    pool: bool = True,
    concat_pool: bool = True,
    first_bn: bool = True,
    bn_final: bool = False,
    lin_first: bool = False,
    y_range: tuple[float, float] | None = None,
) -> nn.Sequential:
    """fastai's classifier head: pool, flatten, then BatchNorm/Dropout/Linear blocks.

    Args:
        nf: channels of the feature map the head receives (doubled inside with concat pooling).
        n_out: number of outputs.
        lin_ftrs: widths of the hidden layers; ``None`` means ``[512]``.
        ps: dropout probabilities, one per block; a single value ``p`` spreads as
            ``[p/2] * (n_blocks - 1) + [p]``.
        pool: start with a global pool and a flatten (``False`` for a head fed with vectors).
        concat_pool: pool with :class:`AdaptiveConcatPool2d` (max and avg) instead of avg only.
        first_bn: put a BatchNorm1d before the first Linear.
        bn_final: end with a BatchNorm1d (momentum 0.01).
        lin_first: each block is Linear, ReLU, BatchNorm, Dropout instead of BatchNorm, Dropout,
            Linear, ReLU; the last block is a bare Linear. (fastai appends an extra Linear here,
            which only fits when the last hidden width equals ``n_out``; autocut does not.)
        y_range: ``(low, high)`` to end with a :class:`SigmoidRange` (regression).

    Returns:
        ``nn.Sequential`` mapping ``(B, nf, h, w)`` (or ``(B, nf)`` with ``pool=False``) to
        ``(B, n_out)``.

    Example:
        >>> head = create_head(512, 10)
        >>> head(torch.randn(4, 512, 7, 7)).shape
        torch.Size([4, 10])
    """
    if nf < 1 or n_out < 1:
        raise ValueError(f"create_head needs nf >= 1 and n_out >= 1, got nf={nf}, n_out={n_out}")
    if pool and concat_pool:
        nf *= 2
    widths = [nf, 512, n_out] if lin_ftrs is None else [nf, *lin_ftrs, n_out]
    n_blocks = len(widths) - 1
    ps = [ps] if isinstance(ps, (int, float)) else list(ps)
    if len(ps) == 1:
        ps = [ps[0] / 2] * (n_blocks - 1) + ps
    if len(ps) != n_blocks:
        raise ValueError(f"ps has {len(ps)} values for {n_blocks} blocks: give one value or {n_blocks}")
    bns = [first_bn] + [True] * (n_blocks - 1)
    acts = [nn.ReLU(inplace=True) for _ in range(n_blocks - 1)] + [None]

    layers: list[nn.Module] = []
    if pool:
        layers += [AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if lin_first:
        layers.append(nn.Dropout(ps[0]))
        for n_in, n_hidden, p, act in zip(widths[:-2], widths[1:-1], ps[1:], acts):
            layers += _lin_bn_drop(n_in, n_hidden, True, p, act, lin_first=True)
        layers.append(nn.Linear(widths[-2], n_out))
    else:
        for n_in, n_o, bn, p, act in zip(widths[:-1], widths[1:], bns, ps, acts):
            layers += _lin_bn_drop(n_in, n_o, bn, p, act, lin_first=False)
    if bn_final:
        layers.append(nn.BatchNorm1d(n_out, momentum=0.01))
    if y_range is not None:
        layers.append(SigmoidRange(*y_range))
    return nn.Sequential(*layers)
