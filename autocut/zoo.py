"""Resolve model names from timm and torchvision, build them (on the meta device by default),
read their default input size and normalisation, and load local checkpoints safely."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from autocut import _validate
from autocut.errors import CutError
from autocut.probe import set_mode

__all__ = [
    "ModelSpec",
    "resolve",
    "build",
    "on_meta",
    "default_input_size",
    "stated_input_size",
    "input_size_source",
    "INPUT_SIZE_SOURCES",
    "normalization",
    "load_checkpoint",
    "timm_names",
    "torchvision_names",
    "transformers_types",
    "transformers_names",
]

TORCHVISION = "torchvision"
TIMM = "timm"
TRANSFORMERS = "transformers"
_DEFAULT_INPUT = (3, 224, 224)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """A model named in a zoo: ``source`` is ``"timm"``, ``"torchvision"`` or ``"transformers"``
    (``name`` a model type such as ``"convnext"``, a hub id ``"ORG/NAME"`` or a local folder)."""

    source: str
    name: str

    def __str__(self) -> str:
        return self.name if self.source == TIMM else f"{self.source}:{self.name}"


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


@functools.cache
def transformers_types() -> dict[str, str]:
    """Every model type of transformers' image-classification and backbone mappings, with the
    auto class that builds it: ``"AutoModelForImageClassification"`` where the type has a
    classifier, else ``"AutoBackbone"``. Empty without transformers installed."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return {}
    types = dict.fromkeys(modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES, "AutoBackbone")
    types.update(dict.fromkeys(modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "AutoModelForImageClassification"))
    return dict(sorted(types.items()))


def transformers_names() -> tuple[str, ...]:
    """Every transformers model type autocut's scan covers, as zoo names (``"transformers:convnext"``)."""
    return tuple(f"{TRANSFORMERS}:{t}" for t in transformers_types())


def _resolve_transformers(bare: str) -> ModelSpec:
    if not transformers_types():
        raise CutError("transformers: names need the transformers package: pip install 'autocut[transformers]'")
    if bare in transformers_types() or Path(bare).is_dir() or (bare.count("/") == 1 and not bare.startswith((".", "/"))):
        return ModelSpec(TRANSFORMERS, bare)
    close = difflib.get_close_matches(bare, list(transformers_types()), n=5, cutoff=0.6)
    hint = f"; close model types: {', '.join(close)}" if close else ""
    raise CutError(
        f"unknown transformers model {bare!r}{hint}: name a model type of the image-classification or backbone "
        "mappings (autocut.zoo.transformers_types()), a hub id 'ORG/NAME' or a local folder saved with save_pretrained"
    )


def _is_timm(name: str) -> bool:
    import timm

    return timm.is_model(name) or timm.is_model(name.split(".", 1)[0])


def _check_timm_tag(name: str) -> None:
    """``"resnet18.a1_in1k"``: the tag must be one of the architecture's pretrained configs
    (timm itself raises a ``RuntimeError`` for any other, but only when the model is built)."""
    import timm

    arch, _, tag = name.partition(".")
    if not tag:
        return
    tags = timm.list_pretrained(f"{arch}.*")
    if name not in tags:
        close = difflib.get_close_matches(name, tags, n=5, cutoff=0.6)
        raise CutError(
            f"unknown pretrained tag {tag!r} of timm's {arch} in {name!r}: "
            + (f"close matches: {', '.join(close)}; " if close else "")
            + (f"pass one of its {len(tags)} tagged names (timm.list_pretrained({arch + '.*'!r})) or {arch!r} alone"
               if tags else f"it has no tagged weights: pass {arch!r} alone")
        )


def resolve(name: str) -> ModelSpec:
    """``"convnext_tiny"`` (timm), ``"torchvision:densenet121"``, a bare torchvision name that
    timm does not have, or ``"transformers:convnext"`` (a model type, built from its default
    config), ``"transformers:ORG/NAME"`` or ``"transformers:/a/local/folder"`` (a checkpoint).
    Unknown names raise a :class:`CutError` (a ``ValueError``) listing close matches."""
    if not isinstance(name, str) or not name:
        raise CutError(f"expected a model name or an nn.Module, got {name!r}")
    if name.startswith(f"{TRANSFORMERS}:"):
        return _resolve_transformers(name[len(TRANSFORMERS) + 1:])
    source, _, bare = name.rpartition(":")
    if source not in ("", TIMM, TORCHVISION):
        raise CutError(f"unknown zoo {source!r} in {name!r}: prefix with 'timm:', 'torchvision:', 'transformers:' or none")
    if source in ("", TIMM) and _is_timm(bare):
        _check_timm_tag(bare)
        return ModelSpec(TIMM, bare)
    if source in ("", TORCHVISION) and bare in torchvision_names():
        return ModelSpec(TORCHVISION, bare)
    pool = {
        TIMM: list(timm_names()),
        TORCHVISION: [f"{TORCHVISION}:{n}" for n in torchvision_names()],
        "": list(timm_names()) + [f"{TORCHVISION}:{n}" for n in torchvision_names()],
    }[source]
    by_lower = {n.lower(): n for n in pool}  # "ResNet18" is close to "resnet18"
    close = [by_lower[n] for n in difflib.get_close_matches(name.strip().lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise CutError(f"unknown model {name!r}{hint} (timm.list_models() and torchvision.models.list_models() list them)")


def _build_timm(name: str, pretrained: bool, num_classes: int | None = None) -> nn.Module:
    import timm

    extra = {} if num_classes is None else {"num_classes": num_classes}  # (timm's loader drops the old classifier)
    return timm.create_model(name, pretrained=pretrained, **extra)


def _build_torchvision(name: str, pretrained: bool, num_classes: int | None = None) -> nn.Module:
    import torchvision

    weights = "DEFAULT" if pretrained else None
    # (pretrained weights come with their own classifier's size: torchvision refuses another)
    extra = {} if num_classes is None or pretrained else {"num_classes": num_classes}
    return torchvision.models.get_model(name, weights=weights, **extra)


def _build_transformers(name: str, pretrained: bool, num_classes: int | None = None) -> nn.Module:
    """A model type from its default config (random weights), or a checkpoint: its config with
    random weights, or with ``pretrained`` its weights (``from_pretrained``, its own classifier)."""
    import transformers

    if name in transformers_types():
        if pretrained:
            raise CutError(f"transformers:{name} is a model type, which has no weights: name a checkpoint "
                           "('transformers:ORG/NAME' or a local folder) for pretrained weights")
        config = transformers.AutoConfig.for_model(name)
        if not config.architectures:  # the auto class cannot choose among a type's several classes without it
            from transformers.models.auto import modeling_auto

            mapping = (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
                       if transformers_types()[name] == "AutoModelForImageClassification"
                       else modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES)
            classes = mapping[name]
            config.architectures = [classes if isinstance(classes, str) else classes[0]]
    else:
        config = transformers.AutoConfig.from_pretrained(name)
    auto = getattr(transformers, transformers_types().get(config.model_type, "AutoModel"))
    if pretrained:
        return auto.from_pretrained(name)
    if num_classes is not None:
        config.num_labels = num_classes
    return auto.from_config(config)


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


def build(spec: ModelSpec, device: str | torch.device = "meta", pretrained: bool = False,
          num_classes: int | None = None) -> nn.Module:
    """Build ``spec`` in eval mode. On ``"meta"`` no weight memory is used and no weights are
    initialised; models whose constructors cannot run on meta (regnets) are built on the CPU
    with each parameter moved to meta as it is made.

    ``pretrained=True`` downloads weights through timm's, torchvision's or transformers' own
    loader and fails with a ``RuntimeError`` that says so when they cannot be fetched (no network).

    ``num_classes``: the size of the model's own classifier, where its constructor takes one
    (``timm.create_model(name, num_classes=n)``, torchvision's ``num_classes`` and transformers'
    ``num_labels`` for random weights); ``None`` (default), the zoo's own (1000 for ImageNet
    models). :func:`autocut.adapt` builds a named model with its ``n_out``, as a user building it
    to fine-tune would: the classifier it drops after the cut costs no more to make than theirs.
    """
    if num_classes is not None:
        num_classes = _validate.positive_int("num_classes", num_classes)
    make = {TIMM: _build_timm, TORCHVISION: _build_torchvision, TRANSFORMERS: _build_transformers}[spec.source]
    builder = functools.partial(make, num_classes=num_classes)
    device = torch.device(device)
    if pretrained:
        if device.type == "meta":
            raise CutError("pretrained weights cannot be loaded on the meta device: build on the CPU (device='cpu')")
        try:
            model = builder(spec.name, True)
        except CutError:
            raise
        except Exception as err:  # hub/network errors come in many types
            raise RuntimeError(
                f"could not load pretrained weights for {spec} through {spec.source}'s loader "
                f"({type(err).__name__}: {err}). Offline? Pass weights=PATH to a local checkpoint "
                "(safetensors or a torch state dict) instead."
            ) from err
        return set_mode(model.to(device), False)
    if device.type == "meta":
        return on_meta(lambda: builder(spec.name, False))
    if device == torch.get_default_device():  # (a device context would send every tensor op through Python: ~15% of a build)
        return set_mode(builder(spec.name, False), False)
    with torch.device(device):
        return set_mode(builder(spec.name, False), False)


def on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()``'s module on the meta device, in eval mode, no weight memory used and no weights
    initialised; a constructor that cannot run on meta (regnets' ``aten::_unique2``, gemma4's
    ``.item()``) runs on the CPU with each parameter moved to meta as it is made."""
    try:
        with torch.device("meta"), _SkipInitOnMeta():
            return set_mode(make(), False)
    except RuntimeError:
        with _registered_on_meta(), _SkipInitOnMeta():
            model = make()
        return set_mode(model.to("meta"), False)  # anything not registered the usual way


def default_input_size(model: nn.Module | ModelSpec, built: nn.Module | None = None) -> tuple[int, int, int]:
    """The model's own input size (:func:`stated_input_size`), else ``(3, 224, 224)``.

    Args:
        model: a built model, or the spec of a named one.
        built: the model built from that spec, where there is one.
    """
    return stated_input_size(model, built) or _DEFAULT_INPUT


def stated_input_size(model: nn.Module | ModelSpec, built: nn.Module | None = None) -> tuple[int, int, int] | None:
    """The input size the model states, or ``None`` (see :func:`input_size_source`)."""
    found = input_size_source(model, built)
    return found[0] if found else None


# where a module states its input size, in the order they are read (for messages and docs)
INPUT_SIZE_SOURCES = (
    "pretrained_cfg / default_cfg input_size",
    "config.image_size (or a nested vision_config's)",
    "an image_size / img_size attribute (the model's or a patch embedding's)",
    "an input_size attribute in (C, H, W) or (H, W, C) order",
    "a config the model holds (a namespace, dataclass, namedtuple or dict attribute) with an "
    "image_size / img_size / input_size / resolution / crop_size field",
    "positional embedding length x patch size",
)


def input_size_source(model: nn.Module | ModelSpec, built: nn.Module | None = None) -> tuple[tuple[int, int, int], str] | None:
    """The input size the model states and where it says so, or ``None`` where it says nothing.

    For a named model: timm's ``pretrained_cfg``; a fixed ``image_size`` the built torchvision
    model insists on (its ViTs); torchvision's weights' crop size. For a module, the first of
    :data:`INPUT_SIZE_SOURCES`: ``pretrained_cfg``/``default_cfg``; ``config.image_size`` (and
    ``config.num_channels``), also of a nested ``vision_config`` (transformers); an
    ``image_size``/``img_size`` attribute of the model or of a submodule (a patch embedding); an
    ``input_size`` attribute holding ``(C, H, W)`` or ``(H, W, C)`` (Cadene's pretrainedmodels;
    the end holding 1 to 4 is the channels); a size field (``image_size``, ``img_size``,
    ``input_size``, ``resolution``, ``crop_size``, ...; sides 16 to 4096) of a config the model or
    a submodule holds under any attribute name: a dict, namespace, dataclass or namedtuple, or one
    nested in it two levels down; the side of a square positional embedding times the patch size.

    Example:
        >>> input_size_source(timm.create_model("vit_base_patch16_384"))
        ((3, 384, 384), 'pretrained_cfg')
        >>> model.args = argparse.Namespace(img_size=256, lr=0.1)
        >>> input_size_source(model)  # a module that states nothing else
        ((3, 256, 256), 'args.img_size')
    """
    if isinstance(model, ModelSpec) and model.source == TRANSFORMERS:
        model = built if built is not None else build(model)
    if isinstance(model, ModelSpec):
        fixed = getattr(built, "image_size", None)
        if model.source == TIMM:
            import timm

            cfg = timm.get_pretrained_cfg(model.name)
            size = (cfg.to_dict() if cfg is not None else {}).get("input_size")
            return (tuple(size), "pretrained_cfg") if size else None
        if isinstance(fixed, int):
            return (3, fixed, fixed), "image_size"
        crop = _torchvision_transform_kwargs(model.name).get("crop_size")
        return ((3, *_pair(crop)), "torchvision weights' crop_size") if crop else None
    for read in (_from_pretrained_cfg, _from_config, _from_attributes, _from_input_size_attribute,
                 _from_held_config, _from_position_embedding):
        found = read(model)
        if found is not None:
            return _as_built(model, found) if read is _from_pretrained_cfg else found
    return None


def _as_built(model: nn.Module, found: tuple[tuple[int, int, int], str]) -> tuple[tuple[int, int, int], str]:
    """The size the module was built for where it differs from its ``pretrained_cfg``'s: timm's
    ``create_model(name, img_size=64)`` keeps the weights' 224 in the cfg, and its patch
    embedding only takes 64."""
    built = _from_attributes(model)
    if built is not None and built[0][1:] != found[0][1:]:
        return (found[0][0], *built[0][1:]), f"{built[1]} (built for it; {found[1]} states {found[0][1]}x{found[0][2]})"
    return found


def _size(channels: Any, side: Any) -> tuple[int, int, int] | None:
    if isinstance(side, int) and not isinstance(side, bool) and side > 0:
        side = (side, side)
    if not (isinstance(side, (tuple, list)) and len(side) == 2 and all(isinstance(d, int) and d > 0 for d in side)):
        return None
    channels = channels if isinstance(channels, int) and channels > 0 else 3
    return (channels, int(side[0]), int(side[1]))


def _from_pretrained_cfg(model: nn.Module) -> tuple[tuple[int, int, int], str] | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if size:
            return tuple(size), attr
    return None


def _from_config(model: nn.Module) -> tuple[tuple[int, int, int], str] | None:
    config = getattr(model, "config", None)
    for path, cfg in (("config", config), ("config.vision_config", getattr(config, "vision_config", None))):
        size = _size(getattr(cfg, "num_channels", None), getattr(cfg, "image_size", None)) if cfg is not None else None
        if size is not None:
            return size, f"{path}.image_size"
    return None


def _from_attributes(model: nn.Module) -> tuple[tuple[int, int, int], str] | None:
    for path, module in model.named_modules():
        for attr in ("image_size", "img_size"):
            side = _attribute(module, attr)
            if side is None:
                continue
            size = _size(_attribute(module, "in_chans", _attribute(module, "num_channels")), side)
            if size is not None:
                return size, f"{path}.{attr}" if path else attr
    return None


def _attribute(module: nn.Module, name: str, default: Any = None) -> Any:
    """``getattr(module, name, default)`` for a plain attribute (the instance's or its class's),
    without asking ``nn.Module.__getattr__``, which raises (slowly) for each name a module lacks
    and holds only tensors and modules, never a size."""
    own = vars(module)
    if name in own:
        return own[name]
    return getattr(module, name, default) if hasattr(type(module), name) else default


# the sides a size read from a loosely named place (an input_size triple, a config's field) may
# have: a field called "resolution" that holds 1 or 8 says something else
_SIDES = range(16, 4097)
_CHANNELS = range(1, 5)  # a triple's channel end; the other end holds a side, never this small


def _shape(value: Any, channels: Any = None) -> tuple[int, int, int] | None:
    """``(C, H, W)`` from one side, ``(H, W)``, or a triple in either order: ``(C, H, W)`` where
    the first entry is a channel count (1 to 4) and the last is not, ``(H, W, C)`` the other way
    round; ``None`` for anything else (a side out of :data:`_SIDES`, a float, a 4-tuple)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return None
    if len(value) == 3:
        first, last = value[0] in _CHANNELS, value[-1] in _CHANNELS
        if first == last:  # both ends or neither could be channels: no order to read
            return None
        channels, value = (value[0], value[1:]) if first else (value[-1], value[:2])
    if len(value) != 2 or not all(d in _SIDES for d in value):
        return None
    channels = channels if isinstance(channels, int) and not isinstance(channels, bool) and 1 <= channels <= 16 else 3
    return (channels, value[0], value[1])


def _from_input_size_attribute(model: nn.Module) -> tuple[tuple[int, int, int], str] | None:
    """An ``input_size`` attribute holding a triple, ``[3, 299, 299]`` or ``(299, 299, 3)``, of the
    model or a submodule (one int means features elsewhere: ``nn.LSTM``'s ``input_size``)."""
    for path, module in model.named_modules():
        value = getattr(module, "input_size", None)
        size = _shape(value) if isinstance(value, (tuple, list)) and len(value) == 3 else None
        if size is not None:
            return size, f"{path}.input_size" if path else "input_size"
    return None


# a held config's fields that state the input size, most telling first (compared lower-case:
# yacs configs say IMAGE_SIZE); those that may hold one int for a square side (an MLP's
# input_size of 784 is a feature count); and those that state its channels
_SIZE_FIELDS = ("input_size", "image_size", "img_size", "input_resolution", "image_resolution", "img_resolution",
                "resolution", "crop_size", "input_shape", "image_shape", "img_shape")
_SIDE_FIELDS = frozenset(("image_size", "img_size", "input_resolution", "image_resolution", "img_resolution", "resolution",
                          "crop_size"))
_CHANNEL_FIELDS = ("in_chans", "in_channels", "num_channels", "input_channels", "n_channels")
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping: hooks, _modules, ...


def _config_fields(value: Any) -> dict[str, Any] | None:
    """The fields of a config object: a dict (or any mapping: yacs, OmegaConf), a namespace
    (``types.SimpleNamespace``, ``argparse.Namespace``), a dataclass or a namedtuple; ``None``
    for anything else (a module, a tensor, a list, a plain object)."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, (types.SimpleNamespace, argparse.Namespace)):
        return dict(vars(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return dict(zip(value._fields, value))
    return None


def _size_in_config(fields: dict[str, Any], path: str, depth: int = 2) -> tuple[tuple[int, int, int], str] | None:
    """The first size field of a config (see :data:`_SIZE_FIELDS`), else of the configs nested in
    it, ``depth`` levels down; its channels from a channel field of the same config."""
    lower = {k.lower(): k for k in fields}
    channels = next((fields[lower[c]] for c in _CHANNEL_FIELDS if c in lower), None)
    for name in _SIZE_FIELDS:
        value = fields[lower[name]] if name in lower else None
        size = None if value is None or (isinstance(value, int) and name not in _SIDE_FIELDS) else _shape(value, channels)
        if size is not None:
            return size, f"{path}.{lower[name]}"
    if depth > 0:
        for key, value in fields.items():
            nested = _config_fields(value)
            found = _size_in_config(nested, f"{path}.{key}", depth - 1) if nested else None
            if found is not None:
                return found
    return None


def _from_held_config(model: nn.Module) -> tuple[tuple[int, int, int], str] | None:
    """A size field of a config object the model (or a submodule) holds under any attribute
    name: ``self.args = Namespace(img_size=256)``, ``self._global_params = GlobalParams(...,
    image_size=260)`` (a namedtuple), ``self.cfg = {"MODEL": {"IMAGE_SIZE": 384}}``."""
    seen: set[int] = set()  # a config every layer holds (transformers') is read once
    for path, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in _MODULE_ATTRIBUTES or id(value) in seen:
                continue
            seen.add(id(value))
            fields = _config_fields(value)
            found = _size_in_config(fields, f"{path}.{attr}" if path else attr) if fields else None
            if found is not None:
                return found
    return None


_POSITION_NAMES = ("pos_embed", "pos_embedding", "position_embedding", "position_embeddings", "absolute_pos_embed")


def _from_position_embedding(model: nn.Module) -> tuple[tuple[int, int, int], str] | None:
    """A square grid of learned positions (a few prefix tokens aside) times the stride of the
    patch embedding: the first convolution whose kernel equals its stride."""
    patch = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.stride[0] > 1), None)
    if patch is None:
        return None
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.rsplit(".", 1)[-1] in ("weight",) and any(p in name for p in _POSITION_NAMES):
            length = tensor.shape[0]  # nn.Embedding(positions, dim)
        elif name.rsplit(".", 1)[-1] in _POSITION_NAMES and tensor.ndim == 3:
            length = tensor.shape[1]  # (1, positions, dim)
        else:
            continue
        for prefix in range(0, 9):
            side = math.isqrt(max(length - prefix, 0))
            if side > 1 and side * side == length - prefix:
                size = (patch.in_channels, side * patch.stride[0], side * patch.stride[1])
                return size, f"{name} ({length} positions) x patch {patch.stride[0]}"
    return None


def normalization(model: nn.Module | ModelSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the model expects, from its own config; ImageNet's when it has none."""
    if isinstance(model, ModelSpec) and model.source == TORCHVISION:
        kw = _torchvision_transform_kwargs(model.name)
        return tuple(kw.get("mean", _IMAGENET_MEAN)), tuple(kw.get("std", _IMAGENET_STD))
    if isinstance(model, ModelSpec) and model.source == TRANSFORMERS:
        # a checkpoint folder's image processor says; a bare model type has no weights to match
        path = Path(model.name) / "preprocessor_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        cfg = {"mean": cfg.get("image_mean", _IMAGENET_MEAN), "std": cfg.get("image_std", _IMAGENET_STD)}
    elif isinstance(model, ModelSpec):
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

    Raises:
        FileNotFoundError: no file at ``path``.
        CutError: naming the file: damaged, pickled objects, or not a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as err:  # cut short, or not safetensors at all
            raise CutError(f"{path} is damaged: safetensors cannot read it ({err}); copy or download the "
                           "checkpoint again") from None
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
