"""The eval head folded: every BatchNorm1d merged into a Linear, dropout gone, ReLU fused.

In eval mode a BatchNorm1d is an affine map ``y = s*x + t`` with ``s = γ/σ``, ``σ = sqrt(var+eps)``,
``t = β - μ*s``. fastai's head puts it *before* a Linear (``BN, Dropout, Linear``), the order
``torch.nn.utils.fusion.fuse_linear_bn_eval`` does not cover; folding it forward is exact:

    W' = W·diag(s),   b' = b + W·t

A BatchNorm *after* a Linear with nothing in between (``bn_final``, ``lin_first``) folds
backward: ``W' = diag(s)·W``, ``b' = s*b + t``. The second BatchNorm of ``create_head`` sits after
a ReLU, so it folds into the Linear that follows it, like the first.

:func:`create_head`'s default head then runs as three launches: the concat pool (the fused
kernel on CUDA, via :func:`autocut.layers.adaptive_concat_pool2d`), one GEMM with bias and ReLU
in its epilogue, one GEMM with bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autocut.layers import AdaptiveConcatPool2d, SigmoidRange

__all__ = ["FoldedHead", "FoldedLinear", "fold_head"]

_POOLS = (AdaptiveConcatPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_TAILS = (SigmoidRange, nn.Sigmoid)


class FoldedLinear(nn.Module):
    """``relu(x @ W.T + b)`` (or without the ReLU) with weights held as buffers: inference only.

    With ``relu`` the ReLU runs in the GEMM's epilogue (``torch._addmm_activation``), one launch.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, relu: bool):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu and x.dim() == 2 and x.dtype == self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return torch._addmm_activation(self.bias, x, self.weight.t())
        y = F.linear(x, self.weight, self.bias)  # autocast and odd shapes take the plain path
        return torch.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, relu={self.relu}"


class FoldedHead(nn.Module):
    """A head after :func:`fold_head`: its pool and flatten, folded Linears, then its tail.

    It has no parameters (the folded weights are buffers), so it neither trains nor changes
    between train and eval mode.
    """

    def __init__(self, prefix: list[nn.Module], linears: list[FoldedLinear], tail: list[nn.Module]):
        super().__init__()
        self.prefix = nn.Sequential(*prefix)
        self.linears = nn.Sequential(*linears)
        self.tail = nn.Sequential(*tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.linears(self.prefix(x)))


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 with ``bn(x) == s*x + t`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} has no running statistics (track_running_stats=False): it normalises "
                         "with batch statistics even in eval mode and cannot be folded")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


@torch.no_grad()
def fold_head(head: nn.Sequential) -> FoldedHead:
    """An inference copy of ``head`` with every BatchNorm1d folded into a neighbouring Linear.

    Equal to ``head.eval()`` up to float rounding (the folding is done in float64). ``head``
    itself is left untouched. Supported: the heads :func:`autocut.layers.create_head` builds, i.e.
    a pool and flatten, then BatchNorm1d / Dropout / Linear / ReLU in any order where each
    BatchNorm has a Linear to fold into, then optionally ``SigmoidRange``.

    Args:
        head: the ``nn.Sequential`` head, e.g. ``model.head`` of :func:`autocut.adapt`.

    Returns:
        A :class:`FoldedHead`, on the head's device and in its dtype.

    Raises:
        ValueError: for a layer it cannot fold, with the layer's index and what it is.

    Example:
        >>> from autocut.layers import create_head
        >>> head = create_head(512, 10).eval()
        >>> x = torch.randn(4, 512, 7, 7)
        >>> torch.allclose(fold_head(head)(x), head(x), atol=1e-5)
        True
    """
    if not isinstance(head, nn.Sequential):
        raise TypeError(f"fold_head takes the nn.Sequential that create_head builds, got {type(head).__name__}")
    prefix: list[nn.Module] = []
    stages: list[list] = []  # [weight (float64), bias (float64), relu, dtype]
    tail: list[nn.Module] = []
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # a BN waiting for the next Linear
    after_linear = False  # the previous layer (dropouts aside) is a Linear without activation

    for i, m in enumerate(head):
        where = f"head[{i}] ({type(m).__name__})"
        if tail and not isinstance(m, _TAILS):
            raise ValueError(f"fold_head cannot fold {where} after the output activation")
        if isinstance(m, (nn.Dropout, nn.Identity)):
            continue  # identity in eval mode
        if isinstance(m, _POOLS):
            if stages or pending is not None:
                raise ValueError(f"fold_head expects pooling only at the start of the head, found {where}")
            prefix.append(m)
        elif isinstance(m, nn.BatchNorm1d):
            s, t = _bn_affine(m)
            if after_linear:
                w, b = stages[-1][0], stages[-1][1]
                stages[-1][0], stages[-1][1] = s[:, None] * w, s * b + t
            else:
                pending = (s, t) if pending is None else (pending[0] * s, pending[1] * s + t)
        elif isinstance(m, nn.Linear):
            w = m.weight.double()
            b = m.bias.double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            if pending is not None:
                s, t = pending
                w, b = w * s[None, :], b + w @ t
                pending = None
            stages.append([w, b, False, m.weight.dtype])
            after_linear = True
            continue
        elif isinstance(m, nn.ReLU):
            if not after_linear:
                raise ValueError(f"fold_head fuses a ReLU into the Linear before it, but {where} does not follow a Linear")
            stages[-1][2] = True
        elif isinstance(m, _TAILS):
            if pending is not None:
                raise ValueError(f"a BatchNorm1d before {where} has no Linear to fold into")
            tail.append(m)
        else:
            raise ValueError(f"fold_head does not know how to fold {where}; fold heads built by create_head")
        after_linear = False

    if pending is not None:
        raise ValueError("the head ends with a BatchNorm1d after an activation: there is no Linear to fold it into")
    if not stages:
        raise ValueError("fold_head found no Linear in the head")
    linears = [FoldedLinear(w.to(dtype), b.to(dtype), relu) for w, b, relu, dtype in stages]
    return FoldedHead(prefix, linears, tail)
