"""Any number of input channels: find the layer that consumes the image and rebuild it for
``n_in`` channels, keeping its pretrained weights."""

from __future__ import annotations

import torch
from torch import nn

from autocut._validate import positive_int
from autocut.errors import CutError
from autocut.probe import probe_forward

__all__ = ["N_IN_INITS", "find_input_layer", "set_input_channels"]

N_IN_INITS = ("repeat", "sum", "zero", "random")


class _Found(BaseException):
    # BaseException: a model's own ``except Exception`` must not swallow it
    pass


def find_input_layer(body: nn.Module, input_size: tuple[int, int, int]) -> str:
    """Path of the first Conv2d or Linear that reads the image's ``C`` channels (a stem conv, a
    ViT/Swin patch-embedding conv, a channels-last Linear), found by running ``body`` once on
    meta/fake tensors with hooks (:func:`autocut.probe.probe_forward`), stopped there."""
    c = input_size[0]
    found: list[str] = []

    def hook(path):
        def fn(module, args):
            x = args[0] if args else None
            if not found and isinstance(x, torch.Tensor):
                width = x.shape[1] if isinstance(module, nn.Conv2d) else x.shape[-1]
                if width == c:
                    found.append(path)
                    raise _Found

        return fn

    handles = []
    for path, module in body.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            in_width = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            if in_width == c:
                handles.append(module.register_forward_pre_hook(hook(path)))
    try:
        probe_forward(body, input_size, batch=2)
    except _Found:
        pass
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise CutError(
            f"no Conv2d or Linear reads the {c} input channels of this model directly, so n_in cannot "
            "be changed automatically: adapt the first layer yourself, or pass cut= a callable"
        )
    return found[0]


def _new_weight(weight: torch.Tensor, n_in: int, init: str, dim: int) -> torch.Tensor:
    old = weight.detach()
    c = old.shape[dim]
    if init == "repeat" or (init == "sum" and n_in == 1):
        from timm.models import adapt_input_conv

        if old.ndim == 4:
            return adapt_input_conv(n_in, old).to(old.dtype)
        if n_in == 1:  # a Linear reading channels last: (out, c)
            return old.sum(dim, keepdim=True)
        return old.repeat(1, -(-n_in // c))[:, :n_in] * (c / n_in)
    if init == "sum":
        raise CutError(f"n_in_init='sum' makes one channel from {c}: use it with n_in=1, or 'repeat'/'zero'/'random'")
    if init == "zero":
        if n_in < c:
            raise CutError(f"n_in_init='zero' keeps the {c} original channels: n_in must be >= {c}, got {n_in}")
        shape = list(old.shape)
        shape[dim] = n_in
        new = old.new_zeros(shape)
        new.narrow(dim, 0, c).copy_(old)
        return new
    if init == "random":
        shape = list(old.shape)
        shape[dim] = n_in
        new = old.new_empty(shape)
        nn.init.kaiming_normal_(new, nonlinearity="relu")
        return new
    raise CutError(f"n_in_init must be one of {N_IN_INITS}, got {init!r}")


def set_input_channels(body: nn.Module, n_in: int, input_size: tuple[int, int, int], init: str | None = None) -> str:
    """Replace ``body``'s input layer with one that takes ``n_in`` channels; returns its path.

    ``init``: ``"repeat"`` (timm's repeat-and-rescale), ``"sum"`` (``n_in=1``), ``"zero"`` (copy
    the original channels, zero the rest: extra channels that are zero change nothing) or
    ``"random"``; default as timm does (``"sum"`` for one channel, else ``"repeat"``).
    """
    n_in = positive_int("n_in", n_in)
    init = init or ("sum" if n_in == 1 else "repeat")
    if init not in N_IN_INITS:
        raise CutError(f"n_in_init must be one of {N_IN_INITS}, got {init!r}")
    path = find_input_layer(body, input_size)
    old = body.get_submodule(path)
    if isinstance(old, nn.Conv2d):
        if old.groups != 1:
            raise CutError(f"the input layer {path!r} is a grouped conv; n_in cannot be changed automatically")
        new = nn.Conv2d(
            n_in, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, 1,
            old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype,
        )
    else:
        new = nn.Linear(n_in, old.out_features, old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(_new_weight(old.weight, n_in, init, dim=1))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_path, _, name = path.rpartition(".")
    setattr(body.get_submodule(parent_path) if parent_path else body, name, new)
    return path
