"""``create_body`` and ``adapt``: a backbone cut at its discovered place, with a new head."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
from torch import nn

from autocut import zoo
from autocut.body import build_body
from autocut.channels import set_input_channels
from autocut.cut import Cut
from autocut.discover import discover_module, _input_size
from autocut.errors import CutError
from autocut.groups import group_summary, norm_parameter_names
from autocut.layers import create_head

__all__ = ["create_body", "adapt", "AdaptedModel", "apply_init"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _materialize(model: str | nn.Module, pretrained: bool = False) -> tuple[nn.Module, str, Any]:
    """A real (CPU) model for a name, or the module itself; with its arch name and zoo spec."""
    if isinstance(model, nn.Module):
        if pretrained:
            raise CutError("pretrained=True needs a model name; load the weights into your module yourself")
        return model, type(model).__name__, None
    spec = zoo.resolve(model)
    return zoo.build(spec, device="cpu", pretrained=pretrained), str(spec), spec


def _probe_body(body: nn.Module, input_size, arch: str) -> Cut:
    """Read what an int- or callable-made body returns, on fake tensors."""
    cut = discover_module(body, input_size, arch=arch)
    return Cut(**{**cut.__dict__, "method": "user"})


def create_body(
    model: str | nn.Module,
    cut: Cut | int | str | Callable[[nn.Module], nn.Module] | None = None,
    input_size: tuple[int, int, int] | None = None,
    n_in: int | None = None,
    n_in_init: str | None = None,
) -> nn.Module:
    """The part of ``model`` up to the cut, returning an NCHW map ``(B, nf, h, w)``.

    Args:
        model: a zoo name (built with random weights on the CPU) or an ``nn.Module``.
        cut: ``None`` to discover it; a :class:`Cut`; an int (fastai-style: the first ``cut``
            children, run in order); a node name or module path of the traced graph; or a
            callable ``model -> body``.
        input_size: ``(C, H, W)``; default from the model's config.
        n_in: input channels, when not the model's own: the layer that reads the image (stem
            conv, patch embedding, ...) is found and rebuilt, keeping its weights (replaced in the
            body; a module shared with ``model`` is replaced there too).
        n_in_init: how the rebuilt layer's weights are made: ``"repeat"`` (timm's
            repeat-and-rescale), ``"sum"`` (``n_in=1``), ``"zero"`` (copy the RGB weights, zero
            the rest) or ``"random"``; default as timm does.

    Returns:
        The body, with ``.cut`` set. NHWC maps come out as a channels_last view (no copy); token
        maps lose their prefix tokens and are laid on the patch grid.

    Example:
        >>> body = create_body("resnet18")
        >>> body(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 512, 2, 2])
    """
    module, arch, spec = _materialize(model)
    size = _input_size(input_size, zoo.default_input_size(spec, module) if spec is not None else zoo.default_input_size(module))
    traced = None
    if cut is None or isinstance(cut, str):
        cut, traced = discover_module(module, size, arch=arch, where=cut, with_trace=True)
    body, found = build_body(module, cut, probe=lambda b: _probe_body(b, size, arch), traced=traced)
    body.cut = found
    names = {n for n, _ in body.named_parameters()}
    body.norm_parameter_names = frozenset(norm_parameter_names(module) & names)
    if n_in is not None and n_in != found.input_size[0]:
        set_input_channels(body, n_in, found.input_size, n_in_init)
        body.cut = dataclasses.replace(found, input_size=(n_in, *found.input_size[1:]))
    elif n_in_init is not None:
        raise CutError("n_in_init does nothing without n_in: pass n_in too")
    return body


def apply_init(module: nn.Module, init: Callable[[torch.Tensor], Any] | None = nn.init.kaiming_normal_) -> None:
    """fastai's ``apply_init``: ``init`` on every weight except norm layers', biases zeroed."""
    if init is None:
        return
    for m in module.modules():
        if isinstance(m, _NORMS):
            continue
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            init(weight)
        bias = getattr(m, "bias", None)
        if isinstance(bias, nn.Parameter):
            with torch.no_grad():
                bias.zero_()


class AdaptedModel(nn.Sequential):
    """``nn.Sequential(body, head)``: ``model[0]`` is the body, ``model[1]`` the head, and
    ``model.cut`` says where the backbone was cut."""

    def __init__(self, body: nn.Module, head: nn.Module, cut: Cut):
        super().__init__(body, head)
        self.cut = cut

    @property
    def body(self) -> nn.Module:
        return self[0]

    @property
    def head(self) -> nn.Module:
        return self[1]

    def freeze_to(self, n: int, train_bn: bool = True) -> "AdaptedModel":
        """Freeze the first ``n`` layer groups (see :func:`autocut.layer_groups`); with
        ``train_bn`` norm layers stay trainable, as in fastai."""
        from autocut.groups import freeze_to

        freeze_to(self, n, train_bn=train_bn)
        return self

    def freeze(self, train_bn: bool = True) -> "AdaptedModel":
        """Freeze all but the last group (the head)."""
        return self.freeze_to(-1, train_bn=train_bn)

    def unfreeze(self) -> "AdaptedModel":
        """Make every parameter trainable."""
        return self.freeze_to(0)


def _load_weights(body: nn.Module, path: str | os.PathLike, arch: str) -> None:
    state = zoo.load_checkpoint(path)
    own = body.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            detail.append(
                f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})"
            )
        raise CutError(f"{path} does not fit the body of {arch}: {'; '.join(detail)}. Is it a checkpoint of {arch}?")
    body.load_state_dict({k: state[k] for k in own}, strict=True)


def adapt(
    model: str | nn.Module,
    n_out: int,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    cut: Cut | int | str | Callable[[nn.Module], nn.Module] | None = None,
    input_size: tuple[int, int, int] | None = None,
    custom_head: nn.Module | None = None,
    init: Callable[[torch.Tensor], Any] | None = nn.init.kaiming_normal_,
    n_in: int | None = None,
    n_in_init: str | None = None,
    **head_options: Any,
) -> AdaptedModel:
    """Cut ``model`` and put a new head on it: ``nn.Sequential(body, head)``.

    Args:
        model: a zoo name or an ``nn.Module``.
        n_out: outputs of the new head.
        pretrained: load the zoo's pretrained weights (timm's/torchvision's own loaders; needs
            the network).
        weights: a local checkpoint of the original model (``.safetensors`` or a torch state
            dict, read with ``weights_only=True``), loaded into the body; the old head's keys
            are ignored, every body key must be there.
        cut: as in :func:`create_body`.
        input_size: ``(C, H, W)``; default from the model's config.
        custom_head: use this head instead of :func:`create_head`'s.
        init: initialiser for the head's weights (custom heads too, as fastai does; norm layers
            skipped, biases zeroed); ``None`` keeps the head's own initialisation.
        n_in, n_in_init: input channels and how to make the new input layer's weights, as in
            :func:`create_body` (applied after ``weights`` load, so RGB checkpoints fit).
        **head_options: passed to :func:`create_head` (``lin_ftrs``, ``ps``, ``concat_pool``, ...).

    Returns:
        An :class:`AdaptedModel` in train mode, with ``.cut``.

    Example:
        >>> model = adapt("resnet18", n_out=37)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 37])
    """
    if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
        raise CutError(f"n_out must be a positive int, got {n_out!r}")
    if pretrained and weights is not None:
        raise CutError("pass pretrained=True or weights=PATH, not both")
    module, arch, spec = _materialize(model, pretrained=pretrained)
    body = create_body(module, cut=cut, input_size=input_size if input_size else (
        zoo.default_input_size(spec, module) if spec is not None else None))
    if weights is not None:
        _load_weights(body, weights, arch)
    if n_in is not None and n_in != body.cut.input_size[0]:
        set_input_channels(body, n_in, body.cut.input_size, n_in_init)
        body.cut = dataclasses.replace(body.cut, input_size=(n_in, *body.cut.input_size[1:]))
    elif n_in_init is not None:
        raise CutError("n_in_init does nothing without n_in: pass n_in too")
    found = dataclasses.replace(body.cut, arch=arch)
    if custom_head is not None and head_options:
        raise CutError(f"head options {sorted(head_options)} do nothing with custom_head: pass one or the other")
    head = custom_head if custom_head is not None else create_head(found.nf, n_out, **head_options)
    apply_init(head, init)
    adapted = AdaptedModel(body, head, found).train()
    try:
        summary = group_summary(adapted)
    except Exception:  # the groups are a description: a model they fail on still adapts
        summary = []
    adapted.cut = dataclasses.replace(found, groups=tuple((g["first"], g["last"], g["params"]) for g in summary))
    return adapted
