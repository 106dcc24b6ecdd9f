"""What a model's own code says the body should return, independently of autocut's graph rule.

- timm: ``forward_features``, laid out as ``(B, C, h, w)`` from timm's own metadata
  (``output_fmt``, ``num_prefix_tokens``, ``patch_embed.grid_size``, ``feature_info``).
- torchvision: the tensor the model's forward reduces globally (the input of its pooling, mean or
  class-token select), family by family, read from torchvision's source.
- transformers: the base model's ``last_hidden_state`` (tokens laid on their square grid, prefix
  tokens dropped), or a backbone's last feature map.

Where autocut deliberately differs from an oracle, :func:`timm_expected` raises
:class:`Differs` with the reason, so a scan can tell a known difference from a failure.

Example:
    >>> model = zoo.build(zoo.resolve("resnet18"), device="meta")
    >>> timm_expected(model, torch.empty(3, 3, 224, 224, device="meta"))
    torch.Size([3, 512, 7, 7])
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Differs", "DIFFERS", "OracleError", "timm_expected", "timm_reduced", "torchvision_expected", "torchvision_reduced",
           "TORCHVISION_ORACLE", "transformers_expected", "transformers_reduced", "VALUE_DIFFERENCES"]

_MAX_PREFIX = 32  # class + distillation + register tokens: more tokens than this are a map

# The reasons a model may differ from its oracle on purpose, and what autocut does instead.
DIFFERS = {
    "cls-only features": "forward_features returns the class token(s) only, (B, n, C): autocut cuts at the "
    "last token map before the class token is split off, so the head sees a spatial map",
    "list features": "forward_features returns a list of per-branch maps on different grids: no single map "
    "every path goes through, so autocut raises CutError and asks for cut=",
    "no image input": "the model takes no (B, C, H, W) image (token ids, a text prompt, packed patches): there is "
    "no image backbone to cut, and autocut raises CutError",
    "soft tokens": "the model's own output is a map of soft tokens, pooled from the patch tokens and then "
    "standardised (Gemma4's vision encoders, global_pool='soft'; no classifier): autocut reads the pooler's output "
    "as a map, where forward_features stops before the pooler, and refuses the cut where standardisation follows "
    "(a CutError that asks for cut=)",
    "latent array": "the encoder returns a fixed array of learned latents (Perceiver), not a map on the image's "
    "grid: autocut reads a square number of latents as a grid and cuts there, which shapes cannot tell from a "
    "map (the body's values are not spatial)",
    "anisotropic map": "the last map's grid does not have the input's aspect (a text-line backbone strides one "
    "axis more than the other): autocut reads no such map, and its check refuses the cut it finds before it "
    "with a CutError that asks for cut=",
}


# Models whose body values differ from the oracle's on purpose, each checked by hand: why.
VALUE_DIFFERENCES = {
    "transformers:poolformer": "the body ends after the GroupNorm that PoolFormer's classifier applies to the map "
    "before pooling (a map op: the graph rule's last map); the oracle's last_hidden_state is before it. Checked: "
    "the body equals model.norm(last_hidden_state)",
}


class Differs(Exception):
    """The oracle has no single map to compare with, for a reason listed in :data:`DIFFERS`.
    ``channels`` is the width autocut's map should have, where the oracle knows it."""

    def __init__(self, reason: str, channels: int | None = None, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.channels, self.detail = reason, channels, detail


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
    """The shape of :func:`timm_reduced`."""
    return timm_reduced(model, x).shape


def timm_reduced(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward_features(x)`` as ``(B, C, h, w)``: NHWC maps permuted (``output_fmt``), token
    maps without their prefix tokens (``num_prefix_tokens``; where a model does not say, the few
    tokens ahead of a square grid) laid on the patch grid (``patch_embed.grid_size``,
    ``feature_info``'s reduction, or square).

    Raises :class:`Differs` for list features and class-token-only features, :class:`OracleError`
    for output that lies on no grid.
    """
    if getattr(model, "global_pool", None) == "soft":
        raise Differs("soft tokens", detail="global_pool='soft'")
    with torch.no_grad():
        feats = model.forward_features(x)
    if isinstance(feats, (list, tuple)):
        raise Differs("list features")
    if feats.ndim == 4:
        fmt = str(getattr(model, "output_fmt", "NCHW"))
        return feats.permute(0, 3, 1, 2) if fmt.endswith("NHWC") else feats
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
    return feats[:, prefix:].transpose(1, 2).reshape(b, c, *grid)


# --- transformers ----------------------------------------------------------------------------


def _base_output(model: nn.Module, x: torch.Tensor) -> Any:
    """The base model's output: ``model.base_model``, or the first child that takes the pixels
    and returns a ``last_hidden_state`` (CLIP's and SigLIP's ``vision_model``)."""
    bases = [model.base_model] if model.base_model is not model else []
    bases += [child for child in model.children() if child not in bases]
    for base in bases:
        if hasattr(base, "forward_features"):  # a timm model wrapped by transformers
            return base.forward_features(x)
        try:
            out = base(x)
        except (TypeError, RuntimeError, ValueError):  # a child that does not take the pixels
            continue
        if getattr(out, "last_hidden_state", None) is not None and out.last_hidden_state.ndim >= 3:
            return out.last_hidden_state
    out = model(x, output_hidden_states=True)  # no base model: the last hidden state the model returns
    hidden = getattr(out, "hidden_states", None)
    if hidden:
        return hidden[-1]
    raise OracleError(f"{type(model).__name__} returns no last_hidden_state and no hidden_states")


def _takes_no_image(model: nn.Module) -> str | None:
    """Why ``model`` takes no ``(B, C, H, W)`` image, from its forward's signature, else ``None``."""
    params = list(inspect.signature(model.forward).parameters)
    if not params or params[0] not in ("pixel_values", "inputs"):  # Perceiver calls the image "inputs"
        return f"its forward takes {params[0] if params else 'nothing'!r} first, not pixel_values"
    if "spatial_shapes" in params:
        return "its forward takes a sequence of patches with spatial_shapes, not an image"
    return None


def transformers_reduced(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The map transformers' own outputs give, as ``(B, C, h, w)``: a backbone's last
    ``feature_maps`` entry; else the base model's ``last_hidden_state`` (``model.base_model``, or
    the child that takes the pixels), which transformers lays out as ``(B, C, h, w)`` for
    convolutional models and as ``(B, L, C)`` tokens otherwise: the few tokens ahead of a grid
    with the input's aspect (class, register tokens) are dropped.

    Raises :class:`Differs` for a model that takes no image or whose map has another aspect
    than the input's, :class:`OracleError` for an output with no map.
    """
    reason = _takes_no_image(model)
    if reason is not None:
        raise Differs("no image input", detail=reason)
    latents = getattr(getattr(model, "config", None), "num_latents", None)
    if latents:
        raise Differs("latent array", detail=f"{latents} latents")
    with torch.no_grad():
        if hasattr(model, "out_features") and hasattr(model, "stage_names"):  # transformers' BackboneMixin
            maps = model(x).feature_maps
            if not maps:
                raise OracleError("the backbone returned no feature maps")
            out = maps[-1]
        else:
            out = _base_output(model, x)
    H, W = x.shape[-2:]
    if out.ndim == 4:
        if abs(out.shape[3] - W * out.shape[2] / H) > 1:
            raise Differs("anisotropic map", channels=out.shape[1],
                          detail=f"{tuple(out.shape[2:])} for a {H}x{W} input")
        return out
    if out.ndim != 3:
        raise OracleError(f"last_hidden_state is {out.ndim}-d {tuple(out.shape)}: no map to compare with")
    b, n, c = out.shape
    for prefix in range(0, _MAX_PREFIX + 1):
        stride = math.sqrt(H * W / (n - prefix)) if n > prefix else 0
        h, w = (math.ceil(H / stride), math.ceil(W / stride)) if stride else (0, 0)
        if h * w == n - prefix and h > 1 and w > 1:
            return out[:, prefix:].transpose(1, 2).reshape(b, c, h, w)
    raise OracleError(f"last_hidden_state has {n} tokens, which lie on no grid of the input's aspect")


def transformers_expected(model: nn.Module, x: torch.Tensor) -> torch.Size:
    """The shape of :func:`transformers_reduced`."""
    return transformers_reduced(model, x).shape


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
