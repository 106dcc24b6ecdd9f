"""``unet``: fastai's dynamic U-Net decoder on the feature pyramid of any backbone.

fastai's ``DynamicUnet`` hooks the children of a ``Sequential`` body after which the map's size
changes, so it works where the body is a ``Sequential`` whose children show each stride.
:func:`unet` takes the levels from :func:`autocut.create_pyramid` instead (the last map at each
stride, found on the graph), so any backbone gets one; the decoder is fastai's, layer for layer
(``tests/golden/fastai_unet.json`` holds what fastai 2.8 builds, and the tests load its weights
into autocut's and compare outputs):

1. the deepest level, batch-normed and ReLU'd, through a middle block (two 3x3 convs, doubling
   then restoring the channels);
2. for each shallower level, deep to shallow, a :class:`UnetBlock`: upsample x2 by pixel shuffle
   (:class:`PixelShuffleICNR`, ICNR-initialised so it starts as nearest upsampling), resize to the
   level's grid where the two differ, concatenate the batch-normed level, two 3x3 convs (the last
   block halves its channels; ``self_attention`` puts a :class:`SelfAttention` after the third
   block from the end);
3. pixel-shuffle steps back towards the input's resolution (fastai takes one, for its bodies
   whose first level is at stride 2; here one per octave of the shallowest level's stride, so a
   stride-4 level is upsampled twice rather than resized), then a nearest resize to the input's
   size exactly;
4. with ``last_cross``, the input image concatenated and a :class:`ResBlock`; a 1x1 conv to
   ``n_out``; with ``y_range`` a :class:`~autocut.layers.SigmoidRange`.

A model at one stride throughout (a ViT) has its levels resampled to strides 4 to 32 first
(ViTDet's simple feature pyramid, ``create_pyramid(simple_pyramid=True)``), so the decoder has
strides to climb.

Differences from fastai, each deliberate: the pixel-shuffle steps of 3.; ``bottle=True`` works
(fastai's last conv expects the channels its ``ResBlock`` halved, and its forward fails);
spectral norm is ``torch.nn.utils.parametrizations.spectral_norm`` (the same values; other
parameter names).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from autocut import _validate
from autocut.adapt import apply_init, with_groups
from autocut.cut import Cut
from autocut.errors import CutError
from autocut.freeze import Freezable
from autocut.layers import SigmoidRange
from autocut.probe import model_device, model_dtype
from autocut.pyramid import Pyramid, _simple, create_pyramid

__all__ = ["unet", "Unet", "UnetDecoder", "UnetBlock", "PixelShuffleICNR", "ResBlock", "SelfAttention", "ConvLayer",
           "icnr_init", "NORM_TYPES"]

NORM_TYPES = (None, "batch")  # the decoder's convs: plain with a bias (fastai's U-Net default), or batch-normed

# fastai's "auto" init of a conv by the activation after it (the rest keep PyTorch's)
_KAIMING_UNIFORM_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
_XAVIER_UNIFORM_ACTS = (nn.Sigmoid, nn.Tanh)


def batch_norm(nf: int, zero: bool = False, ndim: int = 2) -> nn.Module:
    """fastai's ``BatchNorm``: weight 1 (0 with ``zero``, a residual branch that starts as nothing), bias 1e-3."""
    bn = nn.BatchNorm2d(nf) if ndim == 2 else nn.BatchNorm1d(nf)
    with torch.no_grad():
        bn.weight.fill_(0.0 if zero else 1.0)
        bn.bias.fill_(1e-3)
    return bn


def _auto_init(conv: nn.Module, act: nn.Module | None, bias_std: float) -> None:
    """fastai's ``init_linear(init='auto')``: bias from N(0, ``bias_std``) (zero for 0); weight
    kaiming-uniform before a ReLU, xavier-uniform before a sigmoid or tanh, else PyTorch's own."""
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.normal_(0, bias_std) if bias_std else conv.bias.zero_()
    if isinstance(act, _KAIMING_UNIFORM_ACTS):
        nn.init.kaiming_uniform_(conv.weight)
    elif isinstance(act, _XAVIER_UNIFORM_ACTS):
        nn.init.xavier_uniform_(conv.weight)


class ConvLayer(nn.Sequential):
    """fastai's ``ConvLayer``: a conv (``ks`` square, padding to keep the size), then a batch norm
    (``norm_type="batch"``; weight 0 for ``"batch_zero"``), then the activation (``act_cls``, or
    none), then ``xtra``. The conv has a bias only without a norm; ``spectral`` wraps it in
    spectral normalisation.
    """

    def __init__(self, ni: int, nf: int, ks: int = 3, stride: int = 1, norm_type: str | None = "batch",
                 act_cls: type[nn.Module] | None = nn.ReLU, ndim: int = 2, bias: bool | None = None,
                 bias_std: float = 0.01, spectral: bool = False, xtra: nn.Module | None = None):
        bn = norm_type in ("batch", "batch_zero")
        conv = (nn.Conv2d if ndim == 2 else nn.Conv1d)(ni, nf, ks, stride, padding=(ks - 1) // 2,
                                                      bias=not bn if bias is None else bias)
        act = None if act_cls is None else act_cls()
        _auto_init(conv, act, bias_std)
        layers = [spectral_norm(conv) if spectral else conv]
        if bn:
            layers.append(batch_norm(nf, zero=norm_type == "batch_zero", ndim=ndim))
        if act is not None:
            layers.append(act)
        if xtra is not None:
            layers.append(xtra)
        super().__init__(*layers)


def icnr_init(weight: torch.Tensor, scale: int = 2, init: Callable = nn.init.kaiming_normal_) -> torch.Tensor:
    """ICNR (Aitken et al., 2017): a conv weight for a pixel shuffle by ``scale`` whose
    ``scale ** 2`` outputs per channel start equal, so the shuffle starts as nearest upsampling
    of one conv (no checkerboard). Returns a new tensor shaped as ``weight``.

    Example:
        >>> w = icnr_init(torch.empty(16, 3, 1, 1))  # 4 channels after a shuffle by 2
        >>> bool((w[0::4] == w[1::4]).all() and (w[0::4] == w[3::4]).all())
        True
    """
    n_out, n_in, h, w = weight.shape
    groups = scale**2
    if n_out % groups:
        raise CutError(f"icnr_init needs out channels divisible by scale**2 = {groups}, got {n_out}")
    kernel = init(weight.new_zeros(n_out // groups, n_in, h, w))
    return kernel.repeat_interleave(groups, dim=0)


class PixelShuffleICNR(nn.Sequential):
    """fastai's ``PixelShuffle_ICNR``: a 1x1 :class:`ConvLayer` to ``nf * scale**2`` channels
    (ICNR init, zero bias), ``nn.PixelShuffle(scale)``; with ``blur``, a replication pad and a
    2x2 average (fastai's blur against checkerboards)."""

    def __init__(self, ni: int, nf: int | None = None, scale: int = 2, blur: bool = False, norm_type: str | None = None,
                 act_cls: type[nn.Module] | None = nn.ReLU):
        nf = ni if nf is None else nf
        conv = ConvLayer(ni, nf * scale**2, ks=1, norm_type=norm_type, act_cls=act_cls, bias_std=0)
        with torch.no_grad():
            conv[0].weight.copy_(icnr_init(conv[0].weight, scale))
        layers = [conv, nn.PixelShuffle(scale)]
        if blur:
            layers += [nn.ReplicationPad2d((1, 0, 1, 0)), nn.AvgPool2d(2, stride=1)]
        super().__init__(*layers)


class SelfAttention(nn.Module):
    """fastai's ``SelfAttention`` (SAGAN, Zhang et al., 2019): spectral-normed 1x1 query, key
    (``n_channels // 8`` each) and value, ``x + gamma * attention``; ``gamma`` starts at 0, so
    the layer starts as the identity."""

    def __init__(self, n_channels: int):
        super().__init__()
        self.query, self.key, self.value = (
            ConvLayer(n_channels, c, ks=1, ndim=1, norm_type=None, act_cls=None, bias=False, spectral=True)
            for c in (n_channels // 8, n_channels // 8, n_channels)
        )
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape
        flat = x.reshape(*size[:2], -1)
        f, g, h = self.query(flat), self.key(flat), self.value(flat)
        beta = F.softmax(torch.bmm(f.transpose(1, 2), g), dim=1)
        return (self.gamma * torch.bmm(h, beta) + flat).reshape(size)


class ResBlock(nn.Module):
    """fastai's ``ResBlock`` with expansion 1, as the U-Net uses it: two 3x3 :class:`ConvLayer`\\ s
    (the second without activation; batch-normed from zero with ``norm_type="batch"``), a 1x1
    conv with batch norm on the shortcut where the channels change, ReLU of the sum."""

    def __init__(self, ni: int, nf: int, norm_type: str | None = None, act_cls: type[nn.Module] = nn.ReLU):
        super().__init__()
        second = "batch_zero" if norm_type == "batch" else norm_type
        self.convpath = nn.Sequential(ConvLayer(ni, nf, norm_type=norm_type, act_cls=act_cls),
                                      ConvLayer(nf, nf, norm_type=second, act_cls=None))
        self.idpath = nn.Sequential(*([ConvLayer(ni, nf, ks=1, act_cls=None)] if ni != nf else []))
        self.act = act_cls(inplace=True) if act_cls is nn.ReLU else act_cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convpath(x) + self.idpath(x))


class UnetBlock(nn.Module):
    """fastai's ``UnetBlock``: ``up_in`` upsampled x2 (:class:`PixelShuffleICNR`, to half its
    channels), resized to the skip's grid where they differ, concatenated with the batch-normed
    skip, ReLU, two 3x3 :class:`ConvLayer`\\ s (the output keeps the concatenation's channels,
    or half of them for the last block: ``final_div=False``)."""

    def __init__(self, up_in_c: int, x_in_c: int, final_div: bool = True, blur: bool = False,
                 act_cls: type[nn.Module] = nn.ReLU, self_attention: bool = False,
                 init: Callable | None = nn.init.kaiming_normal_, norm_type: str | None = None):
        super().__init__()
        self.shuf = PixelShuffleICNR(up_in_c, up_in_c // 2, blur=blur, act_cls=act_cls, norm_type=norm_type)
        self.bn = batch_norm(x_in_c)
        ni = up_in_c // 2 + x_in_c
        self.out_channels = ni if final_div else ni // 2
        nf = self.out_channels
        self.conv1 = ConvLayer(ni, nf, act_cls=act_cls, norm_type=norm_type)
        self.conv2 = ConvLayer(nf, nf, act_cls=act_cls, norm_type=norm_type,
                               xtra=SelfAttention(nf) if self_attention else None)
        self.relu = act_cls()
        apply_init(nn.Sequential(self.conv1, self.conv2), init)

    def forward(self, up_in: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.shuf(up_in)
        if up.shape[-2:] != skip.shape[-2:]:
            up = F.interpolate(up, skip.shape[-2:], mode="nearest")
        return self.conv2(self.conv1(self.relu(torch.cat([up, self.bn(skip)], dim=1))))


def _octaves(stride: float | tuple[float, float]) -> int:
    """Pixel-shuffle steps from a level at ``stride`` back to the input: one per octave."""
    axes = stride if isinstance(stride, tuple) else (stride,)
    return max(0, round(math.log2(max(sum(axes) / len(axes), 1.0))))


class UnetDecoder(nn.Module):
    """The decoder of :func:`unet` (steps 1-4 of the module docstring), on maps of ``channels``
    (shallow to deep) whose shallowest is at ``first_stride``; ``forward(maps, x)`` takes the
    pyramid's maps and the input image and returns ``(B, n_out, H, W)`` at the image's size.
    """

    def __init__(self, channels: Sequence[int], first_stride: float | tuple[float, float], n_in: int, n_out: int, *,
                 blur: bool = False, blur_final: bool = True, self_attention: bool = False,
                 y_range: tuple[float, float] | None = None, last_cross: bool = True, bottle: bool = False,
                 act_cls: type[nn.Module] = nn.ReLU, init: Callable | None = nn.init.kaiming_normal_,
                 norm_type: str | None = None):
        super().__init__()
        ni = channels[-1]
        self.bn = batch_norm(ni)
        self.relu = nn.ReLU()
        self.middle = nn.Sequential(ConvLayer(ni, ni * 2, act_cls=act_cls, norm_type=norm_type),
                                    ConvLayer(ni * 2, ni, act_cls=act_cls, norm_type=norm_type))
        skips = list(channels[:-1])[::-1]
        blocks = []
        for i, x_in_c in enumerate(skips):
            not_final = i != len(skips) - 1
            block = UnetBlock(ni, x_in_c, final_div=not_final, blur=blur and (not_final or blur_final), act_cls=act_cls,
                              self_attention=self_attention and i == len(skips) - 3, init=init, norm_type=norm_type)
            blocks.append(block)
            ni = block.out_channels
        self.blocks = nn.ModuleList(blocks)
        self.upsample = nn.Sequential(*(PixelShuffleICNR(ni, act_cls=act_cls, norm_type=norm_type)
                                        for _ in range(_octaves(first_stride))))
        self.cross = None
        if last_cross:
            ni += n_in
            self.cross = ResBlock(ni, ni // 2 if bottle else ni, act_cls=act_cls, norm_type=norm_type)
            ni = ni // 2 if bottle else ni
        self.final = ConvLayer(ni, n_out, ks=1, act_cls=None, norm_type=norm_type)
        apply_init(nn.Sequential(self.middle, *([self.cross] if self.cross is not None else [])), init)
        self.y_range = None if y_range is None else SigmoidRange(*y_range)

    def forward(self, maps: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.relu(self.bn(maps[-1])))
        for block, skip in zip(self.blocks, reversed(maps[:-1])):
            h = block(h, skip)
        h = self.upsample(h)
        if h.shape[-2:] != x.shape[-2:]:
            h = F.interpolate(h, x.shape[-2:], mode="nearest")
        if self.cross is not None:
            h = self.cross(torch.cat([h, x], dim=1))
        h = self.final(h)
        return h if self.y_range is None else self.y_range(h)


class Unet(Freezable, nn.Module):
    """A U-Net: ``body`` (a :class:`~autocut.Pyramid`) and ``head`` (its :class:`UnetDecoder`);
    ``forward(x)`` is ``head(body(x), x)``, ``(B, n_out, H, W)`` at the input's size.

    ``cut`` is the deepest level's :class:`~autocut.Cut` (its layer groups in ``cut.groups``);
    ``freeze_to``, ``freeze`` and ``unfreeze`` work on the layer groups, whose last is the decoder.
    """

    def __init__(self, body: Pyramid, head: UnetDecoder, cut: Cut):
        super().__init__()
        self.body, self.head, self.cut = body, head, cut

    @property
    def levels(self) -> tuple[Cut, ...]:
        """The pyramid's levels the decoder merges, shallow to deep."""
        return self.body.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x), x)


def _norm_type(value: Any) -> str | None:
    if value not in NORM_TYPES:
        raise CutError(f"norm_type must be None (plain convs with a bias, fastai's U-Net default) or 'batch', got {value!r}")
    return value


def _act_cls(value: Any) -> type[nn.Module]:
    if not (isinstance(value, type) and issubclass(value, nn.Module)):
        raise CutError(f"act_cls must be an nn.Module class such as nn.ReLU (called with no arguments), got {value!r}")
    return value


def unet(
    model: str | nn.Module,
    n_out: int,
    *,
    input_size: tuple[int, int, int] | int | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    n_in: int | None = None,
    n_in_init: str | None = None,
    blur: bool = False,
    blur_final: bool = True,
    self_attention: bool = False,
    y_range: tuple[float, float] | None = None,
    last_cross: bool = True,
    bottle: bool = False,
    act_cls: type[nn.Module] = nn.ReLU,
    init: Callable[[torch.Tensor], Any] | None = nn.init.kaiming_normal_,
    norm_type: str | None = None,
) -> Unet:
    """A U-Net for dense prediction on any backbone: fastai's dynamic U-Net decoder over the
    levels of :func:`autocut.create_pyramid` (see the module docstring).

    Args:
        model: a zoo name or an ``nn.Module`` (its modules are shared, as :func:`autocut.adapt`'s).
        n_out: output channels (classes of a segmentation).
        input_size, pretrained, weights, n_in, n_in_init: as in :func:`autocut.adapt`.
        blur: blur after each pixel shuffle of the blocks (fastai's cure for checkerboards);
            ``blur_final=False`` leaves the last block unblurred.
        self_attention: a :class:`SelfAttention` in the third block from the end.
        y_range: ``(low, high)``: end with a :class:`~autocut.layers.SigmoidRange` (regression).
        last_cross: concatenate the input image before a last :class:`ResBlock`; ``bottle``
            halves that block's channels.
        act_cls: the activation class of the decoder's convs.
        init: initialiser of the middle block's, the blocks' and the last ResBlock's conv
            weights (biases zeroed), as fastai's ``apply_init``; ``None`` keeps the layers' own.
        norm_type: ``None`` (fastai's default: convs with a bias, no norm) or ``"batch"``.

    Returns:
        A :class:`Unet`; for a name, in train mode; for a module, in that module's mode (as
        :func:`autocut.adapt`). ``model(x)`` is ``(B, n_out, H, W)`` for any ``(B, C, H, W)`` the
        backbone takes. ``layer_groups``, ``param_groups``, ``freeze`` work as for
        classification: early body, late body, decoder.

    Raises:
        CutError: (a ``ValueError``) an argument of the wrong kind or out of range, named in the
            message; a backbone with no pyramid (:func:`autocut.discover_pyramid` says why); a
            checkpoint that does not fit.

    Example:
        >>> model = unet("resnet18", n_out=5)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5, 64, 64])
    """
    n_out = _validate.positive_int("n_out", n_out)
    norm_type, act_cls = _norm_type(norm_type), _act_cls(act_cls)
    _validate.a_callable("init", init, "called on each conv weight of the decoder, such as nn.init.kaiming_normal_")
    if y_range is not None:
        y_range = _validate.number_range("y_range", y_range)
    pyramid = create_pyramid(model, input_size=input_size, pretrained=pretrained, weights=weights, n_in=n_in,
                             n_in_init=n_in_init)
    levels = pyramid.levels
    if len({level.stride for level in levels}) == 1:  # one stride throughout: a simple pyramid to climb
        simple, resample = _simple(list(levels), levels[-1].arch)
        pyramid = Pyramid(pyramid.body, simple, resample)
        levels = pyramid.levels
    decoder = UnetDecoder([level.nf for level in levels], levels[0].stride, levels[0].input_size[0], n_out, blur=blur,
                          blur_final=blur_final, self_attention=self_attention, y_range=y_range, last_cross=last_cross,
                          bottle=bottle, act_cls=act_cls, init=init, norm_type=norm_type)
    decoder.to(device=model_device(pyramid), dtype=model_dtype(pyramid))
    return with_groups(Unet(pyramid, decoder, levels[-1]), levels[-1], levels[-1].arch,
                       model if isinstance(model, nn.Module) else None)
