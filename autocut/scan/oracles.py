"""What a model's own code says the body should return, independently of autocut's graph rule.

- timm: ``forward_features``, laid out as ``(B, C, h, w)`` from timm's own metadata
  (``output_fmt``, ``num_prefix_tokens``, ``patch_embed.grid_size``, ``feature_info``).
- torchvision: the tensor the model's forward reduces globally (the input of its pooling, mean or
  class-token select), family by family, read from torchvision's source.

Where autocut deliberately differs from an oracle, :func:`timm_expected` raises
:class:`Differs` with the reason, so a scan can tell a known difference from a failure.

Example:
    >>> model = zoo.build(zoo.resolve("resnet18"), device="meta")
    >>> timm_expected(model, torch.empty(3, 3, 224, 224, device="meta"))
    torch.Size([3, 512, 7, 7])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Differs", "DIFFERS", "OracleError", "timm_expected", "torchvision_expected", "torchvision_reduced",
           "TORCHVISION_ORACLE"]

_MAX_PREFIX = 32  # class + distillation + register tokens: more tokens than this are a map

# The reasons a model may differ from its oracle on purpose, and what autocut does instead.
DIFFERS = {
    "cls-only features": "forward_features returns the class token(s) only, (B, n, C): autocut cuts at the "
    "last token map before the class token is split off, so the head sees a spatial map",
    "list features": "forward_features returns a list of per-branch maps on different grids: no single map "
    "every path goes through, so autocut raises CutError and asks for cut=",
}


class Differs(Exception):
    """The oracle has no single map to compare with, for a reason listed in :data:`DIFFERS`.
    ``channels`` is the width autocut's map should have, where the oracle knows it."""

    def __init__(self, reason: str, channels: int | None = None):
        super().__init__(reason)
        self.reason, self.channels = reason, channels


class OracleError(ValueError):
    """The oracle ran but its output cannot be laid out as a map (retrying elsewhere won't help)."""


# --- timm ------------------------------------------------------------------------------------


def _token_grid(model: nn.Module, tokens: int, size: tuple[int, ...]) -> tuple[int, int] | None:
    """The (h, w) grid ``tokens`` patch tokens lie on, from timm's metadata; None if none fits."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    candidates = []
    if grid is not None and len(tuple(grid)) == 2:
        candidates.append(tuple(int(g) for g in grid))
    info = getattr(model, "feature_info", None)
    if info:
        red = info[-1].get("reduction") if isinstance(info[-1], dict) else None
        if red:
            candidates.append((math.ceil(size[-2] / red), math.ceil(size[-1] / red)))
    side = math.isqrt(tokens)
    candidates.append((side, side))
    return next((g for g in candidates if g[0] * g[1] == tokens and tokens > 1), None)


def timm_expected(model: nn.Module, x: torch.Tensor) -> torch.Size:
    """``forward_features(x)`` as ``(B, C, h, w)``: NHWC maps permuted (``output_fmt``), token
    maps without their prefix tokens (``num_prefix_tokens``; where a model does not say, the few
    tokens ahead of a square grid) laid on the patch grid (``patch_embed.grid_size``,
    ``feature_info``'s reduction, or square).

    Raises :class:`Differs` for list features and class-token-only features, :class:`OracleError`
    for output that lies on no grid.
    """
    with torch.no_grad():
        feats = model.forward_features(x)
    if isinstance(feats, (list, tuple)):
        raise Differs("list features")
    if feats.ndim == 4:
        fmt = str(getattr(model, "output_fmt", "NCHW"))
        return feats.permute(0, 3, 1, 2).shape if fmt.endswith("NHWC") else feats.shape
    if feats.ndim != 3:
        raise OracleError(f"forward_features returned a {feats.ndim}-d tensor {tuple(feats.shape)}: no map to compare with")
    b, n, c = feats.shape
    declared = getattr(model, "num_prefix_tokens", None)
    prefix = int(declared or 0)
    grid = _token_grid(model, n - prefix, tuple(x.shape))
    side = math.isqrt(n)
    if grid is None and declared is None and side > 1 and 0 < n - side * side <= _MAX_PREFIX:
        # the model does not say (CoaT-lite: class token + 7x7): a few tokens ahead of a square grid
        prefix, grid = n - side * side, (side, side)
    if grid is None:
        if n <= _MAX_PREFIX:  # a few tokens on no grid: class / distillation tokens only
            raise Differs("cls-only features", channels=c)
        raise OracleError(f"forward_features returned {n} tokens ({prefix} prefix) that lie on no grid timm's metadata gives")
    return torch.Size((b, c, *grid))


# --- torchvision -----------------------------------------------------------------------------


def _vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    b, n, c = tokens.shape
    side = int((n - 1) ** 0.5)
    return tokens[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)


# family regex -> (module, "input" | "output", transform): where torchvision's forward reduces
TORCHVISION_ORACLE: list[tuple[str, str, str, Callable[[torch.Tensor], torch.Tensor] | None]] = [
    (r"^(alexnet|vgg)", "avgpool", "input", None),
    (r"^(resnet|resnext|wide_resnet|regnet|googlenet|inception_v3|efficientnet|mobilenet_v3|convnext|swin)",
     "avgpool", "input", None),
    (r"^densenet", "features", "output", F.relu),  # forward applies F.relu, then pools
    (r"^mnasnet", "layers", "output", None),  # x.mean([2, 3])
    (r"^mobilenet_v2", "features", "output", None),  # F.adaptive_avg_pool2d
    (r"^shufflenet", "conv5", "output", None),  # x.mean([2, 3])
    (r"^(squeezenet|maxvit)", "classifier", "input", None),  # conv classifier / pool inside
    (r"^vit", "encoder", "output", _vit_tokens_to_map),  # x[:, 0] after the encoder
]


def _torchvision_oracle(name: str):
    for pattern, module, at, transform in TORCHVISION_ORACLE:
        if re.search(pattern, name):
            return module, at, transform
    raise OracleError(f"no oracle for torchvision model {name}: add its family to TORCHVISION_ORACLE")


def torchvision_reduced(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The tensor torchvision's ``model(x)`` reduces globally, in NCHW (hooks on its pooling)."""
    module, at, transform = _torchvision_oracle(name)
    seen: dict[str, Any] = {}
    target = model.get_submodule(module)
    if at == "input":
        handle = target.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    else:
        handle = target.register_forward_hook(lambda m, args, out: seen.setdefault("x", out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return transform(seen["x"]) if transform else seen["x"]


def torchvision_expected(model: nn.Module, name: str, x: torch.Tensor) -> torch.Size:
    """The shape of :func:`torchvision_reduced`."""
    return torchvision_reduced(model, name, x).shape
