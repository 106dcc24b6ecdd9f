"""Resolve model names from timm and torchvision, build them (on the meta device by default),
read their default input size and normalisation, and load local checkpoints safely."""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from autocut.errors import CutError

__all__ = [
    "ModelSpec",
    "resolve",
    "build",
    "default_input_size",
    "stated_input_size",
    "normalization",
    "load_checkpoint",
    "timm_names",
    "torchvision_names",
]

TORCHVISION = "torchvision"
TIMM = "timm"
_DEFAULT_INPUT = (3, 224, 224)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """A model named in a zoo: ``source`` is ``"timm"`` or ``"torchvision"``."""

    source: str
    name: str

    def __str__(self) -> str:
        return self.name if self.source == TIMM else f"{TORCHVISION}:{self.name}"


@functools.cache
def timm_names() -> tuple[str, ...]:
    """Every architecture name timm can build."""
    import timm

    return tuple(timm.list_models())


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model name."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _is_timm(name: str) -> bool:
    import timm

    return timm.is_model(name) or timm.is_model(name.split(".", 1)[0])


def resolve(name: str) -> ModelSpec:
    """``"convnext_tiny"`` (timm), ``"torchvision:densenet121"``, or a bare torchvision name that
    timm does not have. Unknown names raise a :class:`CutError` (a ``ValueError``) listing close
    matches."""
    if not isinstance(name, str) or not name:
        raise CutError(f"expected a model name or an nn.Module, got {name!r}")
    source, _, bare = name.rpartition(":")
    if source not in ("", TIMM, TORCHVISION):
        raise CutError(f"unknown zoo {source!r} in {name!r}: prefix with 'timm:' or 'torchvision:' or none")
    if source in ("", TIMM) and _is_timm(bare):
        return ModelSpec(TIMM, bare)
    if source in ("", TORCHVISION) and bare in torchvision_names():
        return ModelSpec(TORCHVISION, bare)
    pool = {
        TIMM: list(timm_names()),
        TORCHVISION: [f"{TORCHVISION}:{n}" for n in torchvision_names()],
        "": list(timm_names()) + [f"{TORCHVISION}:{n}" for n in torchvision_names()],
    }[source]
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise CutError(f"unknown model {name!r}{hint} (timm.list_models() and torchvision.models.list_models() list them)")


def _build_timm(name: str, pretrained: bool) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=pretrained)


def _build_torchvision(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    weights = "DEFAULT" if pretrained else None
    return torchvision.models.get_model(name, weights=weights)


# in-place ops that change a tensor's shape, strides or flags, not just its values
_METADATA_OPS = frozenset({
    "resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_", "swapdims_",
    "swapaxes_", "requires_grad_", "detach_", "rename_", "sparse_resize_", "sparse_resize_and_clear_",
})


class _SkipInitOnMeta(TorchFunctionMode):
    """In-place ops on meta tensors return their tensor untouched. Weight initialisation
    (``normal_``, ``trunc_normal_``'s ``uniform_``/``erfinv_``/``clamp_``, ``zero_``, ...) only
    sets values, which meta tensors do not have, yet it is most of a meta build's time: torch's
    meta kernels for elementwise ops run in Python. Ops that change metadata still run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name not in _METADATA_OPS:
            # torch.nn.init passes the tensor by keyword
            target = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def _registered_on_meta():
    """Build on the CPU, but move each parameter and buffer to meta as it is registered (the way
    ``accelerate.init_empty_weights`` does), so a constructor that computes its configuration
    with tensor ops meta has no kernel for (regnets' ``unique``, ``.item()``) still allocates no
    weights and initialises nothing."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def on_meta_parameter(module, name, param):
        register_parameter(module, name, param)
        if param is not None and not param.is_meta:
            moved = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(vars(param))
            module._parameters[name] = moved

    def on_meta_buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor, persistent)
        if tensor is not None and not tensor.is_meta:
            module._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = on_meta_parameter, on_meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def build(spec: ModelSpec, device: str | torch.device = "meta", pretrained: bool = False) -> nn.Module:
    """Build ``spec`` in eval mode. On ``"meta"`` no weight memory is used and no weights are
    initialised; models whose constructors cannot run on meta (regnets) are built on the CPU
    with each parameter moved to meta as it is made.

    ``pretrained=True`` downloads weights through timm's or torchvision's own loader and fails
    with a ``RuntimeError`` that says so when they cannot be fetched (no network).
    """
    builder = _build_timm if spec.source == TIMM else _build_torchvision
    device = torch.device(device)
    if pretrained:
        if device.type == "meta":
            raise CutError("pretrained weights cannot be loaded on the meta device: build on the CPU (device='cpu')")
        try:
            model = builder(spec.name, True)
        except Exception as err:  # hub/network errors come in many types
            raise RuntimeError(
                f"could not load pretrained weights for {spec} through {spec.source}'s loader "
                f"({type(err).__name__}: {err}). Offline? Pass weights=PATH to a local checkpoint "
                "(safetensors or a torch state dict) instead."
            ) from err
        return model.to(device).eval()
    if device.type == "meta":
        try:
            with torch.device("meta"), _SkipInitOnMeta():
                return builder(spec.name, False).eval()
        except RuntimeError:  # no meta kernel (regnets' aten::_unique2) or a value read (gemma4's .item())
            with _registered_on_meta(), _SkipInitOnMeta():
                model = builder(spec.name, False)
            return model.to("meta").eval()  # anything not registered the usual way
    with torch.device(device):
        return builder(spec.name, False).eval()


def default_input_size(model: nn.Module | ModelSpec, built: nn.Module | None = None) -> tuple[int, int, int]:
    """The model's own input size (:func:`stated_input_size`), else ``(3, 224, 224)``.

    Args:
        model: a built model, or the spec of a named one.
        built: the model built from that spec, where there is one.
    """
    return stated_input_size(model, built) or _DEFAULT_INPUT


def stated_input_size(model: nn.Module | ModelSpec, built: nn.Module | None = None) -> tuple[int, int, int] | None:
    """The input size the model states, or ``None``: timm's ``pretrained_cfg``, a fixed
    ``image_size`` the built model insists on (torchvision's ViTs), torchvision's weights' crop
    size."""
    fixed = getattr(built if built is not None else model, "image_size", None)
    is_timm = isinstance(model, ModelSpec) and model.source == TIMM
    if isinstance(fixed, int) and not is_timm:
        return (3, fixed, fixed)
    if isinstance(model, ModelSpec):
        if model.source == TIMM:
            import timm

            cfg = timm.get_pretrained_cfg(model.name)
            cfg = cfg.to_dict() if cfg is not None else {}
            size = cfg.get("input_size")
            return tuple(size) if size else None
        crop = _torchvision_transform_kwargs(model.name).get("crop_size")
        return (3, *_pair(crop)) if crop else None
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else None


def normalization(model: nn.Module | ModelSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the model expects, from its own config; ImageNet's when it has none."""
    if isinstance(model, ModelSpec) and model.source == TORCHVISION:
        kw = _torchvision_transform_kwargs(model.name)
        return tuple(kw.get("mean", _IMAGENET_MEAN)), tuple(kw.get("std", _IMAGENET_STD))
    if isinstance(model, ModelSpec):
        import timm

        cfg = timm.get_pretrained_cfg(model.name)
        cfg = cfg.to_dict() if cfg is not None else {}
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", _IMAGENET_MEAN)), tuple(cfg.get("std", _IMAGENET_STD))


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _torchvision_transform_kwargs(name: str) -> dict[str, Any]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return {}
    return dict(getattr(weights.transforms, "keywords", {}) or {})


# --- checkpoints ----------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file without unpickling arbitrary objects.

    ``.safetensors`` files go through safetensors; anything else through ``torch.load(...,
    weights_only=True)``. ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DDP's
    ``module.`` prefixes are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle's, zip's and torch's own errors all mean "not a plain checkpoint": re-raised
            raise CutError(
                f"{path} is not a plain tensor checkpoint ({type(err).__name__}: {err}); autocut never "
                "unpickles arbitrary objects: save a state_dict (torch.save(model.state_dict(), ...)) "
                "or a .safetensors file"
            ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CutError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
