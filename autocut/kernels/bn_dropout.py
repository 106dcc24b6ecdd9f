"""Training-mode BatchNorm1d (batch statistics) and dropout in one kernel, and its backward.

The head's ``BatchNorm1d, Dropout`` pairs act on a small ``(B, F)`` matrix (the pooled features,
then the hidden layer), so in eager PyTorch they cost launches, not bandwidth: statistics,
normalisation and the running-average update, then dropout's mask and scale, then as many again
backwards. Here each direction is one kernel (the forward also draws its seed, a second launch):

* forward: one program per block of features walks the batch three times (mean, variance, then
  ``y = dropout(γ·(x-μ)/σ + β)``) and updates the running statistics in place, as
  ``F.batch_norm`` does (unbiased variance in the running average);
* dropout draws its mask from Philox (``tl.rand``) keyed by a seed tensor and the element's
  position, so the backward *regenerates* the mask instead of saving it; the seed comes from
  ``torch.randint`` on the input's device, so ``torch.manual_seed`` makes runs repeatable and CUDA
  graphs replay with fresh masks;
* backward: the same walk, ``dx = γ/σ·(g' - mean(g') - x̂·mean(g'·x̂))`` with ``g'`` the incoming
  gradient through the regenerated mask, plus ``dγ = Σ g'·x̂`` and ``dβ = Σ g'``.

Statistics accumulate in fp32 whatever ``x``'s dtype; the output has ``x``'s dtype, as
``F.batch_norm`` gives. The ops are ``custom_op`` (see :mod:`autocut.kernels.concat_pool` for why); the forward one
mutates the running statistics, so its autograd formula is an ``autograd.Function`` around them.
Models reach this through :class:`autocut.layers.BatchNormDropout1d`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autocut.kernels import vectors_fit
from autocut.kernels.concat_pool import SUPPORTED_DTYPES

__all__ = ["bn_dropout_backward", "bn_dropout_forward", "bn_dropout_train", "dropout_seed"]


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _drop(v, seed, offs_b, offs_f, F, p, scale):
    """Dropout of the ``(BLOCK_B, BLOCK_F)`` tile ``v``: kept (probability ``1-p``) times ``scale``, else 0.

    One Philox draw per element, keyed by its position: forward and backward draw the same mask.
    """
    r = tl.rand(seed, offs_b[:, None] * F + offs_f[None, :])
    return tl.where(r >= p, v * scale, 0.0)


@triton.jit
def _tile(ptr, start, offs_f, mask_f, B, stride_b, stride_f, BLOCK_B: tl.constexpr):
    """Rows ``start .. start+BLOCK_B`` of a ``(B, F)`` matrix at ``offs_f``: ``(offs_b, mask, fp32 values)``, 0 outside."""
    offs_b = start + tl.arange(0, BLOCK_B)
    m = (offs_b[:, None] < B) & mask_f[None, :]
    v = tl.load(ptr + offs_b[:, None] * stride_b + offs_f[None, :] * stride_f, mask=m, other=0.0)
    return offs_b, m, v.to(tl.float32)


@triton.jit
def _bn_dropout_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, rstd_ptr, seed_ptr,
    B, F,
    stride_xb, stride_xf, stride_yb, stride_yf,
    eps, momentum, p, scale,
    APPLY_DROPOUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F

    # Two passes for the variance (mean first): no cancellation when |mean| >> std.
    acc = tl.zeros([BLOCK_F], tl.float32)
    for start in range(0, B, BLOCK_B):
        _, m, v = _tile(x_ptr, start, offs_f, mask_f, B, stride_xb, stride_xf, BLOCK_B)
        acc += tl.sum(v, axis=0)
    mean = acc / B
    acc = tl.zeros([BLOCK_F], tl.float32)
    for start in range(0, B, BLOCK_B):
        _, m, v = _tile(x_ptr, start, offs_f, mask_f, B, stride_xb, stride_xf, BLOCK_B)
        d = tl.where(m, v - mean[None, :], 0.0)
        acc += tl.sum(d * d, axis=0)
    var = acc / B
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + offs_f, mean, mask=mask_f)
    tl.store(rstd_ptr + offs_f, rstd, mask=mask_f)

    # Running statistics, as F.batch_norm updates them: the unbiased variance, in the buffers' dtype.
    rm = tl.load(rm_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    rm = (1.0 - momentum) * rm + momentum * mean
    rv = (1.0 - momentum) * rv + momentum * (acc / (B - 1))
    tl.store(rm_ptr + offs_f, rm.to(rm_ptr.dtype.element_ty), mask=mask_f)
    tl.store(rv_ptr + offs_f, rv.to(rv_ptr.dtype.element_ty), mask=mask_f)

    w = tl.load(w_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    a = w * rstd  # y = a*x + c before dropout
    c = bias - mean * a
    seed = tl.load(seed_ptr)
    for start in range(0, B, BLOCK_B):
        offs_b, m, v = _tile(x_ptr, start, offs_f, mask_f, B, stride_xb, stride_xf, BLOCK_B)
        y = v * a[None, :] + c[None, :]
        if APPLY_DROPOUT:
            y = _drop(y, seed, offs_b, offs_f, F, p, scale)
        tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_f[None, :] * stride_yf, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_dropout_bwd_kernel(
    g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, seed_ptr, dx_ptr, dw_ptr, db_ptr,
    B, F,
    stride_gb, stride_gf, stride_xb, stride_xf, stride_dxb, stride_dxf,
    p, scale,
    APPLY_DROPOUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    mean = tl.load(mean_ptr + offs_f, mask=mask_f, other=0.0)
    rstd = tl.load(rstd_ptr + offs_f, mask=mask_f, other=0.0)
    w = tl.load(w_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)

    # Pass 1: the two sums over the batch (they are also dbias and dweight); pass 2: dx.
    sum_g = tl.zeros([BLOCK_F], tl.float32)
    sum_gx = tl.zeros([BLOCK_F], tl.float32)
    for start in range(0, B, BLOCK_B):
        offs_b, m, g = _tile(g_ptr, start, offs_f, mask_f, B, stride_gb, stride_gf, BLOCK_B)
        if APPLY_DROPOUT:
            g = _drop(g, seed, offs_b, offs_f, F, p, scale)
        _, _, v = _tile(x_ptr, start, offs_f, mask_f, B, stride_xb, stride_xf, BLOCK_B)
        xhat = tl.where(m, (v - mean[None, :]) * rstd[None, :], 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * xhat, axis=0)
    tl.store(dw_ptr + offs_f, sum_gx.to(dw_ptr.dtype.element_ty), mask=mask_f)
    tl.store(db_ptr + offs_f, sum_g.to(db_ptr.dtype.element_ty), mask=mask_f)

    mean_g = sum_g / B
    mean_gx = sum_gx / B
    k = w * rstd
    for start in range(0, B, BLOCK_B):
        offs_b, m, g = _tile(g_ptr, start, offs_f, mask_f, B, stride_gb, stride_gf, BLOCK_B)
        if APPLY_DROPOUT:
            g = _drop(g, seed, offs_b, offs_f, F, p, scale)
        _, _, v = _tile(x_ptr, start, offs_f, mask_f, B, stride_xb, stride_xf, BLOCK_B)
        xhat = (v - mean[None, :]) * rstd[None, :]
        dx = k[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
        tl.store(dx_ptr + offs_b[:, None] * stride_dxb + offs_f[None, :] * stride_dxf, dx.to(dx_ptr.dtype.element_ty), mask=m)


# --- launch helpers -------------------------------------------------------------------------


def _blocks(b: int, f: int) -> tuple[int, int]:
    """``(BLOCK_B, BLOCK_F)``: narrow feature blocks for parallelism (F = 512 gives 16 programs,
    the 4,096 features after a ResNet-50 body 128); a first guess, unmeasured on a GPU."""
    block_f = min(triton.next_power_of_2(f), 32)
    block_b = min(triton.next_power_of_2(b), max(16, 4096 // block_f))
    return block_b, block_f


def _dropout(p: float) -> tuple[bool, float]:
    """``(apply, scale)``: kept elements are multiplied by ``1/(1-p)``; ``p = 1`` drops everything."""
    return p > 0.0, (0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def _check(x: torch.Tensor, weight, bias, running_mean, running_var, p: float) -> None:
    if x.dim() != 2:
        raise ValueError(f"the fused BatchNorm-dropout takes a (B, F) matrix, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused BatchNorm-dropout runs on float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if x.numel() >= 2**31:
        raise ValueError(f"the fused BatchNorm-dropout indexes with int32: {tuple(x.shape)} is too large; "
                         "use autocut.layers.batch_norm_dropout, which falls back to PyTorch")
    if not vectors_fit(x, weight, bias, running_mean, running_var):
        shapes = ", ".join(f"{tuple(v.shape)}{'' if v.is_contiguous() else ' strided'} on {v.device}"
                           for v in (weight, bias, running_mean, running_var))
        raise ValueError(f"BatchNorm weight, bias and running statistics must be contiguous vectors of "
                         f"{x.shape[1]} features on {x.device}, got {shapes}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh Philox seed for one call, drawn from ``device``'s default generator.

    A tensor rather than an int, so that a captured CUDA graph draws a new one on every replay.
    """
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)  # Philox keys take all 64 bits


def bn_dropout_forward(x, weight, bias, running_mean, running_var, momentum: float, eps: float, p: float,
                       seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(y, mean, rstd)``, the batch mean and ``1/sqrt(var+eps)`` in fp32.

    Updates ``running_mean`` and ``running_var`` in place. Models go through
    :func:`bn_dropout_train` (differentiable) or :class:`autocut.layers.BatchNormDropout1d`.
    """
    _check(x, weight, bias, running_mean, running_var, p)
    b, f = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = torch.empty(f, device=x.device, dtype=torch.float32)
    rstd = torch.empty(f, device=x.device, dtype=torch.float32)
    if f == 0:
        return y, mean, rstd
    apply, scale = _dropout(p)
    block_b, block_f = _blocks(b, f)
    _bn_dropout_fwd_kernel[(triton.cdiv(f, block_f),)](
        x, y, weight, bias, running_mean, running_var, mean, rstd, seed,
        b, f,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        eps, momentum, p, scale,
        APPLY_DROPOUT=apply, BLOCK_B=block_b, BLOCK_F=block_f, num_warps=4,
    )
    return y, mean, rstd


def bn_dropout_backward(grad, x, weight, mean, rstd, seed, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``(grad_x, grad_weight, grad_bias)``, the mask regenerated from ``seed``."""
    b, f = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw = torch.empty(f, device=weight.device, dtype=weight.dtype)  # written as plain arrays
    db = torch.empty(f, device=weight.device, dtype=weight.dtype)
    if f == 0:
        return dx, dw, db
    apply, scale = _dropout(p)
    block_b, block_f = _blocks(b, f)
    _bn_dropout_bwd_kernel[(triton.cdiv(f, block_f),)](
        grad, x, weight, mean, rstd, seed, dx, dw, db,
        b, f,
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
        p, scale,
        APPLY_DROPOUT=apply, BLOCK_B=block_b, BLOCK_F=block_f, num_warps=4,
    )
    return dx, dw, db


# --- torch.library ops ----------------------------------------------------------------------


@torch.library.custom_op("autocut::bn_dropout", mutates_args=("running_mean", "running_var"))
def _bn_dropout_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, momentum: float, eps: float, p: float,
                   seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_dropout_forward(x, weight, bias, running_mean, running_var, momentum, eps, p, seed)


@_bn_dropout_op.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, p, seed):
    _check(x, weight, bias, running_mean, running_var, p)
    f = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(f, dtype=torch.float32),
            x.new_empty(f, dtype=torch.float32))


@torch.library.custom_op("autocut::bn_dropout_backward", mutates_args=())
def _bn_dropout_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, seed: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_dropout_backward(grad, x, weight, mean, rstd, seed, p)


@_bn_dropout_backward_op.register_fake
def _(grad, x, weight, mean, rstd, seed, p):
    f = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(f), weight.new_empty(f))


class _BatchNormDropout(torch.autograd.Function):
    """Autograd around the two ops: the forward op updates the running statistics in place, and
    ``register_autograd`` only takes functional ops, so the formula lives here."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, p, seed):
        y, mean, rstd = _bn_dropout_op(x, weight, bias, running_mean, running_var, momentum, eps, p, seed)
        ctx.save_for_backward(x, weight, mean, rstd, seed)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, rstd, seed = ctx.saved_tensors
        dx, dw, db = _bn_dropout_backward_op(grad_y, x, weight, mean, rstd, seed, ctx.p)
        return dx, dw, db, None, None, None, None, None, None


# --- functional form ------------------------------------------------------------------------


def bn_dropout_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                     running_var: torch.Tensor, momentum: float, eps: float, p: float) -> torch.Tensor:
    """``F.dropout(F.batch_norm(x, ..., training=True), p)`` in one launch (and one backward).

    Differentiable in ``x``, ``weight`` and ``bias``; updates the running statistics in place
    with ``momentum`` (the exponential-average factor, already resolved for ``momentum=None``).

    Example (CUDA)::

        bn = torch.nn.BatchNorm1d(1024).cuda()
        y = bn_dropout_train(torch.randn(256, 1024, device="cuda"), bn.weight, bn.bias,
                             bn.running_mean, bn.running_var, 0.1, bn.eps, 0.25)
    """
    seed = dropout_seed(x.device)
    return _BatchNormDropout.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps), float(p), seed)
