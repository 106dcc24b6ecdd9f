"""Fused GPU kernels for the head. Chosen here, in one place, and nowhere else.

:func:`fused_concat_pool_available` is the one decision between the Triton kernel and PyTorch's
ops; :func:`autocut.layers.adaptive_concat_pool2d` asks it. The kernel serves CUDA tensors when
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

__all__ = ["fused_concat_pool_available", "fused_concat_pool2d", "kernels_disabled"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # concat_pool.SUPPORTED_DTYPES, without importing triton
_triton_ready: bool | None = None  # None until the first CUDA tensor asks


def kernels_disabled() -> bool:
    """Whether ``AUTOCUT_DISABLE_KERNELS`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get("AUTOCUT_DISABLE_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


def _load() -> bool:
    global _triton_ready
    if _triton_ready is None:
        try:
            import autocut.kernels.concat_pool  # noqa: F401  (imports triton, registers the ops)
        except ImportError:
            _triton_ready = False
        else:
            _triton_ready = True
    return _triton_ready


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
