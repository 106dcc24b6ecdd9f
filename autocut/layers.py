"""Building blocks of the head: concat pooling, BatchNorm + dropout, ``SigmoidRange``, and
fastai's ``create_head`` that assembles them.

Each op has a functional form and an ``nn.Module`` form. Nothing here knows about tracing or
models; :mod:`autocut.adapt` puts the head on a body.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocut._validate import number, number_range, positive_int, positive_ints
from autocut.errors import CutError

__all__ = [
    "AdaptiveConcatPool2d",
    "BatchNormDropout1d",
    "Resample",
    "SigmoidRange",
    "adaptive_concat_pool2d",
    "batch_norm_dropout",
    "create_head",
    "fuse_bn_dropout",
]


# --- pooling --------------------------------------------------------------------------------


def adaptive_concat_pool2d(x: torch.Tensor, output_size: int | tuple[int, int] = 1) -> torch.Tensor:
    """``cat([adaptive_max_pool2d(x), adaptive_avg_pool2d(x)], 1)``: max first, as fastai does.

    On CUDA with Triton installed, a global pool (``output_size=1``) runs as one fused kernel that
    reads the map once (see :mod:`autocut.kernels`); everywhere else it is PyTorch's own ops.
    """
    if output_size in (1, (1, 1)):
        from autocut.kernels import fused_concat_pool2d, fused_concat_pool_available

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


class Resample(nn.Module):
    """A map scaled by ``factor`` on each side, with no parameters: bilinear upsampling for a
    factor above 1, max pooling to the smaller grid below 1 (``2`` takes a stride-16 map to stride
    8; ``0.5`` to stride 32). What a simple feature pyramid (ViTDet's, made learnable there by
    deconvolutions a dense head can add) does to the maps of a model at one stride.

    Example:
        >>> Resample(2)(torch.zeros(1, 8, 14, 14)).shape, Resample(0.5)(torch.zeros(1, 8, 14, 14)).shape
        (torch.Size([1, 8, 28, 28]), torch.Size([1, 8, 7, 7]))
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = number("factor", factor, "(0, inf)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return x
        size = (max(1, round(x.shape[-2] * self.factor)), max(1, round(x.shape[-1] * self.factor)))
        if self.factor > 1:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.adaptive_max_pool2d(x, size)

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


# --- normalisation and dropout --------------------------------------------------------------


def batch_norm_dropout(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    p: float,
) -> torch.Tensor:
    """``F.dropout(F.batch_norm(x, ...), p, training)``, the two layers of each block of the head.

    In training on CUDA with Triton, for a ``(B, F)`` input with affine parameters and running
    statistics (contiguous vectors, as a module's are), both run as one fused kernel forward and one
    backward, dropout's mask regenerated from a seed instead of saved (see
    :mod:`autocut.kernels.bn_dropout`); everywhere else it is PyTorch's own ops. The arguments are
    ``F.batch_norm``'s, with ``momentum`` the resolved exponential-average factor, plus dropout's ``p``.

    Example:
        >>> bn = nn.BatchNorm1d(8)
        >>> y = batch_norm_dropout(torch.randn(4, 8), bn.running_mean, bn.running_var, bn.weight, bn.bias,
        ...                        training=True, momentum=0.1, eps=1e-5, p=0.25)
        >>> y.shape
        torch.Size([4, 8])
    """
    if training and None not in (running_mean, running_var, weight, bias):
        from autocut.kernels import fused_bn_dropout, fused_bn_dropout_available

        if fused_bn_dropout_available(x, weight, bias, running_mean, running_var):
            return fused_bn_dropout(x, weight, bias, running_mean, running_var, momentum, eps, p)
    return F.dropout(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps), p, training)


class BatchNormDropout1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` followed by ``nn.Dropout(p)``, as one module (and one fused kernel on CUDA).

    Its parameters and buffers are a BatchNorm1d's, under the same names, so state dicts move
    between the two; it *is* a BatchNorm1d (``isinstance``), so freezing rules and
    :func:`autocut.kernels.fold.fold_head` treat it as one. In eval mode dropout is the identity.
    Build one with :func:`fuse_bn_dropout` rather than by hand.

    One mode serves both halves: putting the module in eval mode (as fastai's ``BnFreeze`` does to
    every BatchNorm) also switches its dropout off. ``nn.SyncBatchNorm.convert_sync_batchnorm``
    would replace it by a plain SyncBatchNorm, without the dropout; ``autocut finetune`` syncs its
    statistics over processes itself and keeps the dropout.

    Args:
        num_features: ``F`` of the ``(B, F)`` input.
        p: dropout probability after the normalisation.
        **kwargs: ``nn.BatchNorm1d``'s (``eps``, ``momentum``, ``affine``, ...).

    Example:
        >>> m = BatchNormDropout1d(8, p=0.5)
        >>> m(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    def __init__(self, num_features: int, p: float = 0.5, **kwargs):
        super().__init__(num_features, **kwargs)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    @classmethod
    def from_pair(cls, bn: nn.BatchNorm1d, p: float) -> BatchNormDropout1d:
        """One module holding ``bn``'s very parameters and buffers (an optimiser built on them keeps working)."""
        new = cls(bn.num_features, p, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm1d does
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm_dropout(x, self.running_mean if track else None, self.running_var if track else None,
                                  self.weight, self.bias, use_batch_stats, factor, self.eps,
                                  self.p if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def fuse_bn_dropout(module: nn.Module) -> nn.Module:
    """In place: each ``BatchNorm1d`` directly followed by a ``Dropout`` in an ``nn.Sequential``
    becomes one :class:`BatchNormDropout1d`, the Dropout's slot an ``nn.Identity``.

    Indices, parameter names and the parameters themselves stay (an optimiser or layer groups built
    before keep working; state dicts load both ways), so this can be called on a whole adapted
    model at any time. It pays on CUDA, where each pair then runs as one kernel each way; on the
    CPU the result computes exactly what the pairs did. Hooks registered on the replaced modules
    are not carried over.

    Args:
        module: a head from :func:`create_head`, or any model containing one.

    Returns:
        ``module`` itself.

    Example:
        >>> head = fuse_bn_dropout(create_head(512, 10))
        >>> [type(m).__name__ for m in head][2:5]
        ['BatchNormDropout1d', 'Identity', 'Linear']
    """
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            bn, drop = seq[i], seq[i + 1]
            if type(bn) is nn.BatchNorm1d and type(drop) is nn.Dropout:
                seq[i], seq[i + 1] = BatchNormDropout1d.from_pair(bn, drop.p), nn.Identity()
    return module


# --- head -----------------------------------------------------------------------------------


def _batch_norm(n: int) -> nn.BatchNorm1d:
    """fastai's ``BatchNorm(n, ndim=1)``: weight 1 and bias 1e-3 (a plain BatchNorm1d's bias starts at 0)."""
    bn = nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.fill_(1e-3)
    return bn


_LINEAR_INIT_SKIPPED = contextvars.ContextVar("autocut_linear_init_skipped", default=False)


@contextlib.contextmanager
def linear_init_skipped() -> Iterator[None]:
    """In the block, :func:`create_head` makes its Linear layers without PyTorch's default
    initialisation (their values are whatever memory held): for a caller that initialises every
    weight and bias next (:func:`autocut.adapt` with an initialiser of ``torch.nn.init``). The
    default draws as many random numbers as the layer has weights: as long as the init itself."""
    token = _LINEAR_INIT_SKIPPED.set(True)
    try:
        yield
    finally:
        _LINEAR_INIT_SKIPPED.reset(token)


def _linear(n_in: int, n_out: int, bias: bool = True) -> nn.Linear:
    if _LINEAR_INIT_SKIPPED.get():
        return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, device=torch.get_default_device())
    return nn.Linear(n_in, n_out, bias=bias)


def _lin_bn_drop(n_in: int, n_out: int, bn: bool, p: float, act: nn.Module | None, lin_first: bool):
    """fastai's ``LinBnDrop``, its layers in a list: BatchNorm (if ``bn``), Dropout (if ``p``),
    Linear, activation; with ``lin_first`` the Linear and activation come first."""
    norm = [_batch_norm(n_out if lin_first else n_in)] if bn else []
    drop = [nn.Dropout(p)] if p != 0 else []
    # fastai drops the Linear's bias wherever the block has a BatchNorm.
    lin = [_linear(n_in, n_out, bias=not bn)]
    if act is not None:
        lin.append(act)
    return lin + norm + drop if lin_first else norm + drop + lin


def _dropouts(ps: Any) -> list[float]:
    """``ps`` as a list of dropout probabilities, each in ``[0, 1)``."""
    if isinstance(ps, numbers.Real):
        return [number("ps", ps, "[0, 1)", 0.5)]
    if isinstance(ps, Sequence) and not isinstance(ps, (str, bytes)) and len(ps) > 0:
        return [number(f"ps[{i}]", p, "[0, 1)", 0.5) for i, p in enumerate(ps)]
    raise CutError(f"ps must be a dropout probability in [0, 1) or a list of them, one per block, got {ps!r}: pass 0.5")


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

    Every option means what it means to fastai 2.8's ``create_head``: the same layers in the same
    order, the same BatchNorms, biases, dropouts, momentum and bounds (checked against fastai's own
    heads over a grid of every option: ``tests/test_fastai_head.py``). The blocks' BatchNorm1d
    start as fastai's ``BatchNorm`` does, weight 1 and bias 1e-3 (``bn_final``'s is a plain one,
    bias 0, as fastai's is); :func:`autocut.adapt` then initialises the Linear layers as fastai's
    ``apply_init`` does (kaiming normal, biases 0).

    Deliberate differences from fastai:

    - ``ps`` of a length other than 1 or the number of blocks is refused, where fastai silently
      zips it with the blocks: extra values are dropped; with too few, the head ends at a hidden
      width instead of ``n_out``; with ``lin_first``, its last Linear does not fit what comes
      before (or, where the widths happen to match, follows an extra block).
    - a dropout of 1 (everything dropped), a ``y_range`` with ``low >= high`` (an output that
      runs backwards) or not finite, and sizes that are floats or bools are refused.
    - ``ps`` is never changed: fastai's ``lin_first`` pops the first value off the caller's list.
    - ``lin_ftrs`` may be a tuple (fastai needs a list).

    Args:
        nf: channels of the feature map the head receives (doubled inside with concat pooling);
            any integral number >= 1 (``numpy.int64`` too).
        n_out: number of outputs, an integral number >= 1.
        lin_ftrs: widths of the hidden layers, ints >= 1; ``None`` means ``[512]``. There is one
            block per hidden layer and one for the output layer.
        ps: dropout probabilities in ``[0, 1)``, one per block; a single value ``p`` spreads as
            ``[p/2] * (n_blocks - 1) + [p]``. A block with ``p == 0`` has no Dropout.
        pool: start with a global pool and a flatten (``False`` for a head fed with vectors).
        concat_pool: pool with :class:`AdaptiveConcatPool2d` (max and avg) instead of avg only.
        first_bn: a BatchNorm1d in the first block (before the first Linear; after it and its
            ReLU with ``lin_first``). Without it, that Linear keeps its bias; every other block
            has a BatchNorm and a Linear without bias.
        bn_final: end with a BatchNorm1d (momentum 0.01).
        lin_first: a Dropout with the first value of ``ps`` on the pooled features, then a block
            per hidden layer of Linear, ReLU, BatchNorm, Dropout (the next value of ``ps``), then
            a bare Linear with a bias. Without it, each block is BatchNorm, Dropout, Linear, and a
            ReLU on all but the last.
        y_range: ``(low, high)``, finite with ``low < high``, to end with a :class:`SigmoidRange`
            (regression).

    Returns:
        ``nn.Sequential`` mapping ``(B, nf, h, w)`` (or ``(B, nf)`` with ``pool=False``) to
        ``(B, n_out)``.

    Raises:
        CutError: (a ``ValueError``) an argument out of its range or of the wrong kind (a float or
            a bool for a size, a dropout of 1, ...), or a number of ``ps`` that is neither 1 nor
            the number of blocks; the message names the argument and what to pass.

    Example:
        >>> head = create_head(512, 10)
        >>> head(torch.randn(4, 512, 7, 7)).shape
        torch.Size([4, 10])
    """
    nf, n_out = positive_int("nf", nf), positive_int("n_out", n_out)
    if pool and concat_pool:
        nf *= 2
    widths = [nf, 512, n_out] if lin_ftrs is None else [nf, *positive_ints("lin_ftrs", lin_ftrs), n_out]
    n_blocks = len(widths) - 1
    ps = _dropouts(ps)
    if y_range is not None:
        y_range = number_range("y_range", y_range)
    if len(ps) == 1:
        ps = [ps[0] / 2] * (n_blocks - 1) + ps
    if len(ps) != n_blocks:
        raise CutError(f"ps has {len(ps)} values for {n_blocks} blocks (one per width of lin_ftrs={widths[1:-1]} "
                       f"and one for the output layer): give one value or {n_blocks}")
    bns = [first_bn] + [True] * (n_blocks - 1)
    acts = [nn.ReLU(inplace=True) for _ in range(n_blocks - 1)] + [None]

    layers: list[nn.Module] = []
    if pool:
        layers += [AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if lin_first:
        # fastai: the first p drops the pooled features, each hidden block takes the next p, and a
        # bare Linear (with its bias) ends the head in place of a last block.
        layers.append(nn.Dropout(ps[0]))
        blocks = zip(widths[:-2], widths[1:-1], bns, ps[1:], acts)
    else:
        blocks = zip(widths[:-1], widths[1:], bns, ps, acts)
    for n_in, n_o, bn, p, act in blocks:
        layers += _lin_bn_drop(n_in, n_o, bn, p, act, lin_first)
    if lin_first:
        layers.append(_linear(widths[-2], n_out))
    if bn_final:
        layers.append(nn.BatchNorm1d(n_out, momentum=0.01))
    if y_range is not None:
        layers.append(SigmoidRange(*y_range))
    return nn.Sequential(*layers)
