"""A model's feature pyramid in a scan: autocut's levels (:func:`autocut.create_pyramid`), run,
and checked against the levels the zoo's own code states.

The oracles, never autocut's:

- timm: the maps ``features_only=True``'s module returns (channels and strides, read off its own
  forward on meta tensors), for the levels its ``feature_info`` lists (written by hand in each
  model file; where it states other numbers than the module returns, the record notes it); a
  model timm has none for is recorded as such.
- torchvision: the backbones its detection and segmentation models take, from torchvision's own
  code: ``layer1`` .. ``layer4`` for the ResNets (``resnet_fpn_backbone``, DeepLabV3, FCN); for
  the MobileNets the stage indices ``mobilenet_backbone`` reads (the blocks flagged ``_is_cn``,
  which change the stride), each stride ending with the block before the next such index; for
  VGG the max pools SSD's ``_vgg_extractor`` splits at, each stride ending with the layer before
  one. Channels and reductions come from the model's own forward (hooks on those modules).
- transformers: the maps Hugging Face's own backbone for the model's config returns
  (``AutoBackbone``, every stage the config names), where the model type has one.

They are compared as :func:`pyramid_differences` says; :func:`check_pyramid` is the scan's step.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch
from torch import nn

from autocut import zoo
from autocut.cut import stride_of
from autocut.errors import CutError, first_line
from autocut.pyramid import _stride_matches, create_pyramid
from autocut.scan.oracles import OracleError

__all__ = ["pyramid_expected", "pyramid_differences", "check_pyramid", "refused_pyramid", "level_record",
           "pyramid_explained", "PYRAMID_DIFFERENCES"]

# Why a model's levels differ from what its zoo states, checked by hand: name pattern -> why.
# Filled from a whole-zoo scan (benchmarks/reports/zoo/report.md lists every difference).
PYRAMID_DIFFERENCES: dict[str, str] = {
    "xception*": "timm taps each block's residual branch (`stack`) before its strided conv, a map the shortcut "
    "bypasses; the last map every path takes at that stride is the previous block's output (fewer channels)",
    "hrnet_w*": "HRNet keeps a stride-4 branch through every stage beside the others; the only stride-4 map on every "
    "path is `layer1`'s output, before the branches split (autocut's level), where timm taps the branch's end in the "
    "head (`incre_modules.0`). Its strides 8 and 16 agree: the sums its head makes",
    "inception_v4": "`features.4` (Mixed_4a) trims the grid 73 -> 71 with valid 3x3 convs, no stride change: "
    "autocut's stride-4 level is after it (192 ch), timm's before (`features.3`, 160 ch)",
    "*ghostnet*": "the stride-16 stage goes on after `blocks.5` (timm's tap) through `blocks.6`, still at stride 16 and "
    "wider: autocut's level is its end, the last map at that stride",
    "mobilenetv5_*": "the cut is the output of the multi-scale fusion adapter (`msfa`), the map the model's own head "
    "reads, which resamples the last stages to a fixed 16x16 grid; at 256 px (mobilenetv5_base) that is stride 16, "
    "so the levels end there with the cut: the stride-32 maps before it are coarser than the cut, and strides "
    "increase to it",
}


def pyramid_explained(name: str) -> str | None:
    """Why ``name``'s levels differ from its zoo's, where :data:`PYRAMID_DIFFERENCES` says."""
    bare = name.split(":", 1)[-1]
    return next((why for pattern, why in PYRAMID_DIFFERENCES.items() if fnmatch.fnmatchcase(bare, pattern)), None)


def _timm_levels(name: str, x: torch.Tensor) -> list[dict[str, Any]]:
    """The maps timm's ``features_only`` module returns, read off its own forward (its
    ``feature_info`` states channels and reductions by hand, and for a few models they are not
    what it returns: a pruned model's widths, EfficientNet-X's stem), else as stated."""
    import timm

    try:
        model = zoo.on_meta(lambda: timm.create_model(name, features_only=True, pretrained=False))
    except Exception as err:  # timm states no levels for it (coat, convit, ...): the reason is recorded
        raise OracleError(f"timm has no features_only for it: {type(err).__name__}: {first_line(err)[:300]}") from err
    stated = [{"module": d["module"], "reduction": float(d["reduction"]), "num_chs": int(d["num_chs"])}
              for d in model.feature_info.get_dicts()]
    try:
        with torch.no_grad():
            maps = model(x)
    except Exception:  # the meta forward cannot run it: what feature_info states
        return stated
    nhwc = "NHWC" in str(getattr(model, "output_fmt", "NCHW"))
    out = []
    for entry, m in zip(stated, maps):
        channels, grid = (m.shape[-1], tuple(m.shape[1:3])) if nhwc else (m.shape[1], tuple(m.shape[2:]))
        returned = {"num_chs": int(channels), "reduction": stride_of(tuple(x.shape[1:]), grid)}
        nominal = _nominal(returned["reduction"])
        if channels != entry["num_chs"] or abs(nominal - entry["reduction"]) > 0.15 * entry["reduction"]:
            returned["stated"] = f"{entry['module']}: {entry['num_chs']} ch at {entry['reduction']:g}"
        out.append({**entry, **returned})
    return out


def _torchvision_modules(name: str, model: nn.Module) -> tuple[str, list[str]]:
    """The modules whose outputs torchvision's own detection/segmentation backbones take, and whence."""
    if re.match(r"(resnet|resnext|wide_resnet)\d", name):
        return "torchvision layer1..layer4", [f"layer{i}" for i in range(1, 5)]
    features = getattr(model, "features", None)
    if re.match(r"mobilenet_v[23]", name) and isinstance(features, nn.Sequential):
        # mobilenet_backbone's stage_indices: 0, each block that changes the stride, the last
        starts = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
        return "torchvision mobilenet_backbone stages", [f"features.{i - 1}" for i in starts] + [f"features.{len(features) - 1}"]
    if re.match(r"vgg\d", name) and isinstance(features, nn.Sequential):
        pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]  # _vgg_extractor's split
        return "torchvision SSD VGG stages", [f"features.{i - 1}" for i in pools] + [f"features.{pools[-1]}"]
    raise OracleError("torchvision builds no detection or segmentation backbone from it")


def _measured(model: nn.Module, modules: list[str], x: torch.Tensor) -> list[dict[str, Any]]:
    """Each module's output channels and reduction in the model's own forward."""
    shapes: dict[str, torch.Size] = {}
    hooks = [model.get_submodule(path).register_forward_hook(
        lambda module, args, out, key=path: shapes.__setitem__(key, out.shape)) for path in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [{"module": path, "reduction": x.shape[-1] / shapes[path][-1], "num_chs": int(shapes[path][1])}
            for path in modules]


def _transformers_levels(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """The maps Hugging Face's own backbone of the model's config (``AutoBackbone``, every stage
    its config names) returns: their channels and strides, on meta tensors."""
    import transformers

    config = getattr(model, "config", None)
    names = list(getattr(config, "stage_names", None) or [])
    if not names:
        raise OracleError("transformers has no backbone for it (its config names no stages)")
    settings = {k: v for k, v in config.to_dict().items() if k not in ("out_features", "out_indices")}
    try:
        backbone = zoo.on_meta(lambda: transformers.AutoBackbone.from_config(type(config)(**settings, out_features=names)))
    except Exception as err:  # no backbone class for this model type, or its config will not rebuild
        raise OracleError(f"transformers has no backbone for it: {type(err).__name__}: {first_line(err)[:300]}") from err
    with torch.no_grad():
        maps = backbone(x).feature_maps
    return [{"module": name, "num_chs": int(m.shape[1]), "reduction": stride_of(tuple(x.shape[1:]), tuple(m.shape[2:]))}
            for name, m in zip(names, maps) if m.shape[1:] != x.shape[1:]]  # not the image itself (DINOv3 ConvNeXt's stem)


def pyramid_expected(spec: zoo.ModelSpec, model: nn.Module, x: torch.Tensor) -> tuple[str, list[dict[str, Any]]]:
    """What ``spec``'s zoo states for its levels: the oracle's name and its levels, shallow to
    deep, each ``{"module", "reduction", "num_chs"}``.

    Args:
        spec: the model's zoo name.
        model: the model, untouched (the meta one will do).
        x: an input for its forward, where the oracle runs it (torchvision).

    Raises:
        OracleError: the zoo states no levels for it (why).
    """
    if spec.source == zoo.TIMM:
        return "timm features_only", _timm_levels(spec.name, x)
    if spec.source == zoo.TORCHVISION:
        source, modules = _torchvision_modules(spec.name, model)
        return source, _measured(model, modules, x)
    if spec.source == zoo.TRANSFORMERS:
        return "transformers AutoBackbone", _transformers_levels(model, x)
    raise OracleError(f"{spec.source} states no levels to compare with")


def _stride(level: dict[str, Any]) -> float | tuple[float, float]:
    stride = level["stride"]
    return tuple(stride) if isinstance(stride, list) else stride


def pyramid_differences(levels: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[str]:
    """Where autocut's levels and the stated ones differ; empty where they agree.

    Of the stated levels, the last at each reduction counts (timm lists a few twice); each must
    have an autocut level at its reduction (within 15%, as valid padding makes inception's 2.03 a
    2) with its channels, but where both are the deepest: autocut's is the model's cut by design
    (after efficientnet's ``conv_head``, swin's final norm), compared on stride only. An autocut
    level deeper than any stated one (a cut after a last strided conv) is no difference.

    Args:
        levels: autocut's levels, each with ``where``, ``nf`` and ``stride`` (:func:`level_record`).
        expected: the stated ones, as :func:`pyramid_expected` gives them.
    """
    stated = list({_key(entry["reduction"]): entry for entry in expected}.values())
    out = []
    for entry in stated:
        at = [level for level in levels if _matches(_stride(level), entry["reduction"])]
        if not at:
            out.append(f"{entry['module']} at stride {_shown(entry['reduction'])}: no autocut level there")
        elif at[-1] is levels[-1] and entry is stated[-1]:
            continue  # both deepest: autocut's is the cut, its channels the cut's
        elif at[-1]["nf"] != entry["num_chs"]:
            out.append(f"stride {_shown(entry['reduction'])}: {entry['module']} {entry['num_chs']} ch, autocut "
                       f"{at[-1]['where']} {at[-1]['nf']} ch")
    return out


def _matches(stride, reduction) -> bool:
    """Whether a level's stride is a stated reduction (per axis where the reduction has two)."""
    if isinstance(reduction, (list, tuple)):
        axes = stride if isinstance(stride, tuple) else (stride, stride)
        return all(_stride_matches(s, r) for s, r in zip(axes, reduction))
    return _stride_matches(stride, reduction)


def _key(reduction) -> Any:
    return tuple(reduction) if isinstance(reduction, (list, tuple)) else reduction


def _nominal(reduction) -> float:
    """A stated reduction as one number: the mean of its axes."""
    return sum(reduction) / len(reduction) if isinstance(reduction, (list, tuple)) else reduction


def _shown(reduction) -> str:
    return "x".join(f"{r:g}" for r in reduction) if isinstance(reduction, (list, tuple)) else f"{reduction:g}"


def level_record(level) -> dict[str, Any]:
    """A level (:class:`~autocut.cut.Cut`) as the scan records it."""
    return {"where": level.where, "after": level.after, "nf": level.nf, "layout": level.layout,
            "stride": list(level.stride) if isinstance(level.stride, tuple) else level.stride}


def _run_pyramid(model: nn.Module, size: tuple[int, int, int], batch: int):
    """autocut's pyramid of ``model``, run: its levels, and whether every map it returns is the
    NCHW map its level says."""
    pyramid = create_pyramid(model, input_size=size)
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.empty(batch, *size, device="meta") if device.type == "meta" else torch.randn(batch, *size)
    with torch.no_grad():
        maps = pyramid(x)
    got = [tuple(m.shape) for m in maps]
    want = [(batch, *level.feature_shape) for level in pyramid.levels]
    return pyramid.levels, None if got == want else f"the pyramid returns {got}, its levels say {want}"


def _stated(spec: zoo.ModelSpec, meta: nn.Module, size: tuple[int, int, int], batch: int):
    """The record of what the zoo states (``pyramid_oracle``, ``pyramid_expected`` or
    ``pyramid_no_oracle``), and the stated levels or ``None``."""
    try:
        source, expected = pyramid_expected(spec, meta, torch.empty(batch, *size, device="meta"))
    except OracleError as err:  # no levels stated
        return {"pyramid_oracle": None, "pyramid_no_oracle": first_line(err)[:300]}, None
    except Exception as err:  # the oracle cannot run on meta: recorded, not guessed
        failed = f"the oracle failed: {type(err).__name__}: {first_line(err)[:300]}"
        return {"pyramid_oracle": None, "pyramid_no_oracle": failed}, None
    stated = [[e["module"], _rounded(e["reduction"]), e["num_chs"]] for e in expected]
    rec = {"pyramid_oracle": source, "pyramid_expected": stated}
    if any("stated" in e for e in expected):  # timm's feature_info is not what its module returns
        rec["pyramid_oracle_note"] = "feature_info states " + "; ".join(e["stated"] for e in expected if "stated" in e)
    return rec, expected


def _rounded(reduction) -> Any:
    return [round(r, 3) for r in reduction] if isinstance(reduction, (list, tuple)) else round(reduction, 3)


def refused_pyramid(spec: zoo.ModelSpec, meta: nn.Module, size: tuple[int, int, int], err: CutError,
                    batch: int = 3) -> dict[str, Any]:
    """The pyramid record of a model autocut finds no cut for: refused for the same reason (a
    pyramid's deepest level is the cut), with what the zoo states."""
    rec, _ = _stated(spec, meta, size, batch)
    return {**rec, "pyramid_check": "refused", "pyramid_error": f"no cut: {str(err)[:1500]}"}


def check_pyramid(spec: zoo.ModelSpec, meta: nn.Module, size: tuple[int, int, int], rebuild, real_needed: bool,
                  batches: tuple[int, int] = (3, 1)) -> dict[str, Any]:
    """The scan's pyramid step for one model: ``pyramid`` (its levels, :func:`level_record`),
    ``pyramid_on`` (where it ran: ``meta``, else a real CPU copy), ``pyramid_oracle`` and
    ``pyramid_expected`` (what the zoo states) or ``pyramid_no_oracle`` (why none), and
    ``pyramid_check``: ``agree``, ``differ`` (``pyramid_diff`` lists how), ``no oracle``,
    ``mismatch`` (a map not the shape its level says), ``refused`` (a CutError: ``pyramid_error``
    says why) or ``failed``.

    Args:
        real_needed: only a real copy could be cut (``rebuild`` was called for the cut): a
            CutError on the meta model is then no answer.
        batches: the batch on meta tensors, and on real ones.
    """
    rec, expected = _stated(spec, meta, size, batches[0])
    levels, problem = None, None
    for device, batch in zip(("meta", "cpu"), batches):
        try:
            levels, problem = _run_pyramid(meta if device == "meta" else rebuild(), size, batch)
            rec["pyramid_on"] = device
            break
        except CutError as err:
            if device == "cpu" or not real_needed:
                return {**rec, "pyramid_check": "refused", "pyramid_error": str(err)[:1500]}
        except Exception as err:  # the meta model cannot run it: a real copy, next; there, a failure
            if device == "cpu":
                return {**rec, "pyramid_check": "failed", "pyramid_error": f"{type(err).__name__}: {str(err)[:1500]}"}
    rec["pyramid"] = [level_record(level) for level in levels]
    if problem:
        return {**rec, "pyramid_check": "mismatch", "pyramid_diff": [problem]}
    if expected is None:
        return {**rec, "pyramid_check": "no oracle"}
    diff = pyramid_differences(rec["pyramid"], expected)
    return {**rec, "pyramid_check": "differ" if diff else "agree", **({"pyramid_diff": diff} if diff else {})}
