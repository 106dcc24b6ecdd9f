"""Fused global concat pool: ``[max, avg]`` over ``h*w`` in one read of the map, and its backward.

The file reads top to bottom as: Triton kernels, their launchers, the ``torch.library`` custom ops
that call them (with a fake implementation and the autograd formula registered on the op, so
``torch.compile`` and CUDA graphs capture them as single nodes), then the functional form
:func:`concat_pool2d`. The ops are ``custom_op`` rather than ``triton_op`` so that the very same
registration runs under ``TRITON_INTERPRET=1``, where kernels cannot be traced.

Semantics are PyTorch's ``torch.cat([adaptive_max_pool2d(x, 1), adaptive_avg_pool2d(x, 1)], 1)``:

* max first (fastai's order), output ``(B, 2C, 1, 1)`` in ``x``'s dtype, accumulated in fp32;
* the argmax is the first position of the maximum (ties), and a NaN anywhere makes the max NaN
  with the argmax on the *last* NaN, as PyTorch's CPU and CUDA kernels do (each NaN they meet
  replaces the running max);
* the argmax is saved only when ``x`` needs a gradient, as the smallest integer type that holds
  ``h*w - 1`` (uint8, int16, int32);
* the backward writes every element of ``grad_x`` once, ``g_avg/(h*w) + (pos == argmax)*g_max``:
  no zero-fill, no atomics, deterministic.

Any strides work as long as ``h`` and ``w`` flatten into one stride (NCHW, channels_last, channel
slices); other views are copied once. The kernels run wherever Triton can launch them; set
``TRITON_INTERPRET=1`` *before* this module is imported to run them on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["SUPPORTED_DTYPES", "concat_pool2d", "concat_pool_backward", "concat_pool_forward", "index_dtype"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _concat_pool_fwd_kernel(
    x_ptr, out_ptr, idx_ptr,
    C, HW,
    stride_xb, stride_xc, stride_xhw,
    stride_ob,
    SAVE_INDEX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    # int64 batch offset: B * stride_b passes 2**31 elements on large maps.
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb + offs_c[:, None] * stride_xc

    run_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
    run_idx = tl.zeros([BLOCK_C], tl.int32)  # an all -inf row keeps index 0, as PyTorch does
    run_sum = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw[None, :] < HW)
        # Upcast on load: fp32 accumulation, and the interpreter's bf16 arithmetic is wrong.
        v = tl.load(x_base + offs_hw[None, :] * stride_xhw, mask=mask, other=0.0).to(tl.float32)
        run_sum += tl.sum(v, axis=1)

        is_nan = (v != v) & mask
        hw2d = offs_hw[None, :] + tl.zeros([BLOCK_C, BLOCK_HW], tl.int32)
        last_nan = tl.max(tl.where(is_nan, hw2d, -1), axis=1)
        vals = tl.where(mask & (v == v), v, float("-inf"))
        tile_max = tl.max(vals, axis=1)
        # First position of the tile's max among valid, non-NaN lanes (ties go to the first).
        hit = (vals == tile_max[:, None]) & mask & (v == v)
        tile_idx = tl.min(tl.where(hit, hw2d, 2147483647), axis=1)

        run_is_nan = run_max != run_max
        take = (~run_is_nan) & (tile_max > run_max)
        run_idx = tl.where(take, tile_idx, run_idx)
        run_max = tl.where(take, tile_max, run_max)
        # A NaN in this tile wins over everything before it: PyTorch keeps the last NaN.
        has_nan = last_nan >= 0
        run_idx = tl.where(has_nan, last_nan, run_idx)
        run_max = tl.where(has_nan, float("nan"), run_max)

    out_row = out_ptr + pid_b.to(tl.int64) * stride_ob
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_row + offs_c, run_max.to(out_ty), mask=mask_c)
    tl.store(out_row + C + offs_c, (run_sum / HW).to(out_ty), mask=mask_c)
    if SAVE_INDEX:
        tl.store(idx_ptr + pid_b.to(tl.int64) * C + offs_c, run_idx.to(idx_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _concat_pool_bwd_kernel(
    g_ptr, idx_ptr, gx_ptr,
    C, HW,
    stride_gb, stride_gc,
    stride_xb, stride_xc, stride_xhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_hw = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_hw[None, :] < HW)

    g_row = g_ptr + pid_b.to(tl.int64) * stride_gb
    g_max = tl.load(g_row + offs_c * stride_gc, mask=mask_c, other=0.0).to(tl.float32)
    g_avg = tl.load(g_row + (C + offs_c) * stride_gc, mask=mask_c, other=0.0).to(tl.float32)
    arg = tl.load(idx_ptr + pid_b.to(tl.int64) * C + offs_c, mask=mask_c, other=0).to(tl.int32)

    g = (g_avg / HW)[:, None] + tl.where(offs_hw[None, :] == arg[:, None], g_max[:, None], 0.0)
    gx = gx_ptr + pid_b.to(tl.int64) * stride_xb + offs_c[:, None] * stride_xc + offs_hw[None, :] * stride_xhw
    tl.store(gx, g.to(gx_ptr.dtype.element_ty), mask=mask)


# --- launch helpers -------------------------------------------------------------------------


def index_dtype(hw: int) -> torch.dtype:
    """The smallest integer type that holds an argmax over ``hw`` positions (``0 .. hw-1``).

    >>> index_dtype(49), index_dtype(16 * 17), index_dtype(256 * 256)
    (torch.uint8, torch.int16, torch.int32)
    """
    if hw <= 256:
        return torch.uint8
    if hw <= 32768:
        return torch.int16
    return torch.int32


def _hw_stride(x: torch.Tensor) -> int | None:
    """One stride walking ``h*w`` in logical (row-major) order, or ``None`` when there is none."""
    _, _, h, w = x.shape
    if h == 1:
        return x.stride(3)
    if w == 1:
        return x.stride(2)
    return x.stride(3) if x.stride(2) == w * x.stride(3) else None


def _blocks(c: int, hw: int, channel_stride: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_HW, num_warps)``: the tile's long side runs along the unit stride."""
    if channel_stride == 1:  # channels_last: channels are contiguous, walk h*w in short steps
        block_c = min(triton.next_power_of_2(c), 128)
        block_hw = min(triton.next_power_of_2(hw), max(1, 4096 // block_c), 32)
    else:  # NCHW: each channel's h*w is contiguous; cover it in one step when it fits
        block_hw = min(triton.next_power_of_2(hw), 256)
        block_c = min(triton.next_power_of_2(c), max(1, 2048 // block_hw))
    return block_c, block_hw, 4


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"concat_pool2d takes a (B, C, H, W) map, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"concat_pool2d runs on float32, float16 or bfloat16, got {x.dtype}; use "
                        "autocut.layers.adaptive_concat_pool2d, which falls back to PyTorch")


def concat_pool_forward(x: torch.Tensor, save_index: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel on ``x``'s device: ``(out (B, 2C, 1, 1), argmax (B, C))``.

    The argmax is empty when ``save_index`` is false. This is the launch both the op and the
    CPU tests (``TRITON_INTERPRET=1``) call; models go through :func:`concat_pool2d`.

    Example (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)::

        out, idx = concat_pool_forward(torch.randn(8, 64, 7, 7, device="cuda"), save_index=True)
        out.shape, idx.shape, idx.dtype  # (8, 128, 1, 1), (8, 64), torch.uint8
    """
    _check(x)
    if _hw_stride(x) is None:
        x = x.contiguous()  # h and w do not flatten into one stride (e.g. transposed): copy once
    b, c, h, w = x.shape
    hw = h * w
    out = torch.empty((b, 2 * c, 1, 1), device=x.device, dtype=x.dtype)
    idx = torch.empty((b, c) if save_index else (0,), device=x.device, dtype=index_dtype(hw))
    if b == 0 or c == 0:
        return out, idx
    if hw == 0:
        raise ValueError("concat_pool2d needs a non-empty map (h*w >= 1)")
    block_c, block_hw, num_warps = _blocks(c, hw, x.stride(1))
    grid = (b, triton.cdiv(c, block_c))
    _concat_pool_fwd_kernel[grid](
        x, out, idx if save_index else out,
        c, hw,
        x.stride(0), x.stride(1), _hw_stride(x),
        out.stride(0),
        SAVE_INDEX=save_index, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )
    return out, idx


def concat_pool_backward(grad: torch.Tensor, index: torch.Tensor, h: int, w: int, channels_last: bool) -> torch.Tensor:
    """Run the backward kernel: ``grad (B, 2C, 1, 1)`` and the saved argmax to ``grad_x (B, C, h, w)``.

    ``grad_x`` is laid out channels_last when ``channels_last`` is true, NCHW otherwise.

    Example (continuing the one of :func:`concat_pool_forward`)::

        gx = concat_pool_backward(torch.ones_like(out), idx, 7, 7, channels_last=False)  # (8, 64, 7, 7)
    """
    b, c2 = grad.shape[0], grad.shape[1]
    c = c2 // 2
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gx = torch.empty((b, c, h, w), device=grad.device, dtype=grad.dtype, memory_format=fmt)
    hw = h * w
    if gx.numel() == 0:
        return gx
    g = grad.view(b, c2)  # (B, 2C, 1, 1) always views as (B, 2C), whatever its strides
    block_c, block_hw, num_warps = _blocks(c, hw, gx.stride(1))
    grid = (b, triton.cdiv(c, block_c), triton.cdiv(hw, block_hw))
    _concat_pool_bwd_kernel[grid](
        g, index, gx,
        c, hw,
        g.stride(0), g.stride(1),
        gx.stride(0), gx.stride(1), _hw_stride(gx),
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )
    return gx


# --- torch.library ops ----------------------------------------------------------------------


@torch.library.custom_op("autocut::concat_pool2d", mutates_args=())
def _concat_pool2d_op(x: torch.Tensor, save_index: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return concat_pool_forward(x, save_index)


@_concat_pool2d_op.register_fake
def _(x, save_index):
    _check(x)
    b, c, h, w = x.shape
    out = x.new_empty((b, 2 * c, 1, 1))
    return out, x.new_empty((b, c) if save_index else (0,), dtype=index_dtype(h * w))


@torch.library.custom_op("autocut::concat_pool2d_backward", mutates_args=())
def _concat_pool2d_backward_op(grad: torch.Tensor, index: torch.Tensor, h: int, w: int, channels_last: bool) -> torch.Tensor:
    return concat_pool_backward(grad, index, h, w, channels_last)


@_concat_pool2d_backward_op.register_fake
def _(grad, index, h, w, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (grad.shape[0], grad.shape[1] // 2, h, w)
    return torch.empty(shape, device=grad.device, dtype=grad.dtype, memory_format=fmt)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _setup_context(ctx, inputs, output) -> None:
    x, save_index = inputs
    ctx.save_for_backward(output[1])
    ctx.saved_index = save_index
    ctx.h, ctx.w = x.shape[2], x.shape[3]
    ctx.channels_last = _is_channels_last(x)


def _backward(ctx, grad_out, _grad_index):
    if not ctx.saved_index:
        raise RuntimeError("autocut::concat_pool2d ran with save_index=False, so it has no argmax to "
                           "differentiate with; call concat_pool2d(x), which saves it when x needs a grad")
    (index,) = ctx.saved_tensors
    return _concat_pool2d_backward_op(grad_out, index, ctx.h, ctx.w, ctx.channels_last), None


_concat_pool2d_op.register_autograd(_backward, setup_context=_setup_context)


# --- functional form ------------------------------------------------------------------------


def concat_pool2d(x: torch.Tensor) -> torch.Tensor:
    """``cat([adaptive_max_pool2d(x, 1), adaptive_avg_pool2d(x, 1)], 1)`` in one fused kernel.

    Differentiable; the argmax is kept only when ``x`` needs a gradient. Models should call
    :func:`autocut.layers.adaptive_concat_pool2d`, which picks this kernel when it can serve
    ``x`` (see :func:`autocut.kernels.fused_concat_pool_available`).

    Args:
        x: ``(B, C, H, W)`` float32/float16/bfloat16, NCHW or channels_last, on a device Triton
            can launch on.

    Returns:
        ``(B, 2C, 1, 1)``: the max of each channel, then its mean.

    Example (CUDA)::

        x = torch.randn(8, 512, 7, 7, device="cuda", requires_grad=True)
        concat_pool2d(x).shape   # torch.Size([8, 1024, 1, 1])
        concat_pool2d(x).sum().backward()
    """
    save_index = torch.is_grad_enabled() and x.requires_grad
    return _concat_pool2d_op(x, save_index)[0]
