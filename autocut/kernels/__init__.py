"""Fused GPU kernels for the head. Chosen here, in one place, and nowhere else.

:func:`fused_concat_pool_available` is the one decision between the Triton kernel and PyTorch's
ops; :func:`autocut.layers.adaptive_concat_pool2d` asks it. :func:`fused_bn_dropout_available`
is the same decision for the training head's BatchNorm-dropout pairs
(:func:`autocut.layers.batch_norm_dropout`). The kernel serves CUDA tensors when
Triton imports; ``AUTOCUT_DISABLE_KERNELS=1`` forces the PyTorch path everywhere.

Triton is imported only when a CUDA tensor asks, so CPU users never pay for it.

Example:
    >>> from autocut.layers import adaptive_concat_pool2d
    >>> x = torch.randn(2, 8, 7, 7)   # on CUDA (and without AUTOCUT_DISABLE_KERNELS) the kernel runs
    >>> adaptive_concat_pool2d(x).shape
    torch.Size([2, 16, 1, 1])
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "fused_bn_dropout",
    "fused_bn_dropout_available",
    "fused_concat_pool2d",
    "fused_concat_pool_available",
    "kernels_disabled",
    "vectors_fit",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # concat_pool.SUPPORTED_DTYPES, without importing triton
_ready: dict[str, bool] = {}  # kernel module -> whether it imported; filled when a CUDA tensor first asks


def kernels_disabled() -> bool:
    """Whether ``AUTOCUT_DISABLE_KERNELS`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get("AUTOCUT_DISABLE_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


def _load(module: str = "concat_pool") -> bool:
    """Import ``autocut.kernels.<module>`` (Triton, and the ops it registers) once; whether it imported."""
    if module not in _ready:
        try:  # import statements, not importlib: torch.compile traces these (the module is loaded by then)
            if module == "bn_dropout":
                import autocut.kernels.bn_dropout  # noqa: F401
            else:
                import autocut.kernels.concat_pool  # noqa: F401
        except ImportError:
            _ready[module] = False
        else:
            _ready[module] = True
    return _ready[module]


def fused_concat_pool_available(x: torch.Tensor) -> bool:
    """Whether the fused concat-pool kernel serves ``x``: a 4-D float32/float16/bfloat16 CUDA
    tensor, Triton importable, and ``AUTOCUT_DISABLE_KERNELS`` unset.

    Example:
        >>> fused_concat_pool_available(torch.randn(2, 8, 7, 7))  # CPU: PyTorch's ops serve it
        False
    """
    if not x.is_cuda or x.dim() != 4 or x.dtype not in _DTYPES or kernels_disabled():
        return False
    return _load()


def fused_concat_pool2d(x: torch.Tensor) -> torch.Tensor:
    """The fused ``[max, avg]`` global pool, ``(B, C, H, W) -> (B, 2C, 1, 1)``; see
    :func:`autocut.kernels.concat_pool.concat_pool2d`. Ask :func:`fused_concat_pool_available`
    first (``adaptive_concat_pool2d`` does)."""
    from autocut.kernels.concat_pool import concat_pool2d

    return concat_pool2d(x)


def vectors_fit(x: torch.Tensor, *vectors: torch.Tensor) -> bool:
    """Whether each of ``vectors`` (weight, bias, running statistics) is a contiguous 1-D tensor of
    ``x.shape[-1]`` elements on ``x``'s device: the kernels index them as plain arrays."""
    f = x.shape[-1]
    return all(v.shape == (f,) and v.is_contiguous() and v.device == x.device for v in vectors)


def fused_bn_dropout_available(x: torch.Tensor, *vectors: torch.Tensor) -> bool:
    """Whether the fused training BatchNorm-dropout kernel serves ``x``: a 2-D ``(B, F)``
    float32/float16/bfloat16 CUDA tensor under 2**31 elements, ``vectors`` (the BatchNorm's weight,
    bias and running statistics) contiguous ``F``-vectors on its device, Triton importable,
    ``AUTOCUT_DISABLE_KERNELS`` unset.

    Example:
        >>> fused_bn_dropout_available(torch.randn(4, 8))  # CPU: PyTorch's ops serve it
        False
    """
    if not x.is_cuda or x.dim() != 2 or x.dtype not in _DTYPES or x.numel() >= 2**31 or kernels_disabled():
        return False
    return vectors_fit(x, *vectors) and _load("bn_dropout")


def fused_bn_dropout(x, weight, bias, running_mean, running_var, momentum: float, eps: float, p: float) -> torch.Tensor:
    """Training BatchNorm1d then dropout in one kernel; see
    :func:`autocut.kernels.bn_dropout.bn_dropout_train`. Ask :func:`fused_bn_dropout_available`
    first (:func:`autocut.layers.batch_norm_dropout` does)."""
    from autocut.kernels.bn_dropout import bn_dropout_train

    return bn_dropout_train(x, weight, bias, running_mean, running_var, momentum, eps, p)
