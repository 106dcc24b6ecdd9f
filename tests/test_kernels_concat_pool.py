"""The fused concat pool (``autocut.kernels.concat_pool``) against PyTorch's two pooling ops: the
grid (shapes x dtypes x layouts), ties, NaN, the saved argmax, the torch.library registration, the
choice between kernel and PyTorch, and on CUDA real sizes, Inductor and CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autocut import kernels
from autocut.kernels import concat_pool as cp
from autocut.layers import adaptive_concat_pool2d

from kernel_helpers import (  # first: the interpreter switch
    DEVICE,
    DTYPES,
    RUNNABLE,
    TOL,
    needs_cuda,
    needs_kernel,
    rerun_in_child,
)

# (B, C, H, W): odd sizes, h*w = 1, and 16x17 = 272 > 256 positions for the int16 argmax.
SHAPES = [(2, 3, 4, 5), (3, 8, 1, 1), (1, 5, 3, 3), (2, 4, 16, 17)]
LAYOUTS = ["nchw", "channels_last", "channel_slice", "transposed"]

def reference(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)


def make_input(shape, dtype, layout, device=DEVICE, values=None) -> torch.Tensor:
    """A ``shape`` map in ``layout``: the last two are non-contiguous views."""
    b, c, h, w = shape
    if layout == "channel_slice":
        base = torch.randn(b, 2 * c, h, w) if values is None else values.repeat_interleave(2, 1)
        return base.to(device, dtype)[:, ::2]
    if layout == "transposed":
        base = torch.randn(b, c, w, h) if values is None else values.transpose(2, 3).contiguous()
        return base.to(device, dtype).transpose(2, 3)
    x = (torch.randn(shape) if values is None else values).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def check_forward(x: torch.Tensor) -> None:
    c = x.shape[1]
    out, idx = cp.concat_pool_forward(x, save_index=True)
    ref = reference(x)
    ref_max, ref_idx = F.adaptive_max_pool2d(x, 1, return_indices=True)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert idx.dtype == cp.index_dtype(x.shape[2] * x.shape[3]) and idx.shape == x.shape[:2]
    # The max is a copy of one input value: exact. The argmax too.
    torch.testing.assert_close(out[:, :c], ref_max, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.long(), ref_idx.view(idx.shape))
    torch.testing.assert_close(out[:, c:], ref[:, c:], equal_nan=True, **TOL[x.dtype])


def check_backward(x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    x = x.detach().requires_grad_()
    out = cp.concat_pool2d(x)
    g = torch.randn(out.shape).to(out) if grad is None else grad
    (gx,) = torch.autograd.grad(out, x, g)
    (ref,) = torch.autograd.grad(reference(x), x, g)
    torch.testing.assert_close(gx, ref, equal_nan=True, **TOL[x.dtype])
    return gx


# --- the grid -------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grid_forward_backward(shape, dtype, layout):
    torch.manual_seed(sum(shape))
    x = make_input(shape, dtype, layout)
    check_forward(x)
    gx = check_backward(x)
    if layout == "channels_last" and shape[2] * shape[3] > 1:
        assert gx.is_contiguous(memory_format=torch.channels_last) and not gx.is_contiguous()


@needs_kernel
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_first_index(dtype, layout):
    torch.manual_seed(0)
    values = torch.randint(0, 3, (3, 6, 4, 5)).float()  # many equal maxima per channel
    values[0, 0] = 7.0  # a constant channel: the argmax is 0
    x = make_input(values.shape, dtype, layout, values=values)
    check_forward(x)
    check_backward(x)
    assert cp.concat_pool_forward(x, True)[1][0, 0] == 0


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (1, 3, 16, 17)], ids=["3x5", "16x17"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagates_like_pytorch(dtype, layout, shape):
    torch.manual_seed(1)
    values = torch.randn(shape)
    hw = shape[2] * shape[3]
    flat = values.view(shape[0], shape[1], hw)
    flat[0, 0, 1] = float("nan")
    flat[0, 0, hw - 2] = float("nan")  # two NaNs (in different tiles for 16x17): PyTorch keeps the last
    flat[-1, -1, 0] = float("nan")
    flat[0, 1, :] = float("-inf")  # an all -inf channel: max -inf at index 0
    x = make_input(shape, dtype, layout, values=values)
    out, idx = cp.concat_pool_forward(x, True)
    assert torch.isnan(out[0, 0]) and torch.isnan(out[0, shape[1]])  # max and avg
    assert idx[0, 0] == hw - 2 and idx[-1, -1] == 0
    assert out[0, 1] == float("-inf") and idx[0, 1] == 0
    check_forward(x)
    # The max's gradient goes to the NaN PyTorch picked, the avg's everywhere.
    check_backward(x)


@needs_kernel
def test_backward_takes_any_grad_layout():
    x = make_input((2, 6, 3, 4), torch.float32, "nchw")
    g = torch.randn(2, 1, 1, 1).expand(2, 12, 1, 1)  # stride 0, as y.sum().backward() gives
    check_backward(x, grad=g)
    g = torch.randn(1, 12, 2, 1).permute(2, 1, 0, 3)  # (2, 12, 1, 1), non-contiguous
    check_backward(x, grad=g)


@needs_kernel
def test_index_saved_only_when_a_gradient_is_needed(monkeypatch):
    seen = []
    run = cp.concat_pool_forward
    monkeypatch.setattr(cp, "concat_pool_forward", lambda x, save_index: seen.append(save_index) or run(x, save_index))
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    cp.concat_pool2d(x)
    cp.concat_pool2d(x.requires_grad_())
    with torch.no_grad():
        cp.concat_pool2d(x)
    with torch.inference_mode():
        cp.concat_pool2d(x)
    assert seen == [False, True, False, False]
    assert cp.concat_pool_forward(x, save_index=False)[1].numel() == 0


@needs_kernel
def test_backward_without_index_says_why():
    x = torch.randn(1, 2, 3, 3, device=DEVICE, requires_grad=True)
    out, _ = torch.ops.autocut.concat_pool2d(x, False)
    with pytest.raises(RuntimeError, match="save_index=False"):
        out.sum().backward()


@needs_kernel
def test_backward_is_deterministic():
    x = make_input((3, 8, 5, 5), torch.bfloat16, "channels_last").requires_grad_()
    g = torch.randn(3, 16, 1, 1, device=DEVICE, dtype=torch.bfloat16)
    runs = [torch.autograd.grad(cp.concat_pool2d(x), x, g)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_index_dtype_is_the_smallest_that_fits():
    assert cp.index_dtype(1) == torch.uint8
    assert cp.index_dtype(256) == torch.uint8  # indices 0..255
    assert cp.index_dtype(257) == torch.int16
    assert cp.index_dtype(32768) == torch.int16
    assert cp.index_dtype(32769) == torch.int32


def test_rejects_what_it_cannot_serve():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cp.concat_pool_forward(torch.zeros(1, 2, 3, 3, dtype=torch.float64), True)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        cp.concat_pool_forward(torch.zeros(2, 3, 3), True)


# --- torch.library registration -------------------------------------------------------------


def test_fake_and_meta_tensors_get_shapes_without_a_launch():
    from torch._subclasses.fake_tensor import FakeTensorMode

    out, idx = torch.ops.autocut.concat_pool2d(torch.empty(2, 3, 16, 17, device="meta"), True)
    assert out.shape == (2, 6, 1, 1) and out.device.type == "meta" and idx.dtype == torch.int16
    with FakeTensorMode():
        x = torch.empty(4, 8, 7, 7).to(memory_format=torch.channels_last)
        out, idx = torch.ops.autocut.concat_pool2d(x, False)
        gx = torch.ops.autocut.concat_pool2d_backward(torch.empty(4, 16, 1, 1), torch.empty(4, 8, dtype=torch.uint8), 7, 7, True)
    assert out.shape == (4, 16, 1, 1) and idx.numel() == 0
    assert gx.shape == (4, 8, 7, 7) and gx.is_contiguous(memory_format=torch.channels_last)


@needs_kernel
def test_opcheck():
    x = make_input((2, 3, 4, 5), torch.float32, "channels_last").requires_grad_()
    torch.library.opcheck(torch.ops.autocut.concat_pool2d.default, (x, True))
    torch.library.opcheck(torch.ops.autocut.concat_pool2d.default, (x.detach(), False))
    g = torch.randn(2, 6, 1, 1, device=DEVICE)
    idx = cp.concat_pool_forward(x.detach(), True)[1]
    torch.library.opcheck(torch.ops.autocut.concat_pool2d_backward.default, (g, idx, 4, 5, True))


@needs_kernel
def test_compiles_in_one_graph_with_its_backward():
    x = make_input((2, 3, 4, 5), torch.float32, "nchw").requires_grad_()
    compiled = torch.compile(lambda t: cp.concat_pool2d(t).square().sum(), backend="aot_eager", fullgraph=True)
    (gx,) = torch.autograd.grad(compiled(x), x)
    (ref,) = torch.autograd.grad(reference(x).square().sum(), x)
    torch.testing.assert_close(gx, ref)


# --- choosing the kernel --------------------------------------------------------------------


def test_cpu_tensors_take_the_pytorch_path():
    x = torch.randn(2, 3, 4, 4)
    assert not kernels.fused_concat_pool_available(x)
    torch.testing.assert_close(adaptive_concat_pool2d(x), reference(x))


def test_the_choice_traces_in_one_graph(monkeypatch):
    fn = torch.compile(adaptive_concat_pool2d, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fn(x), reference(x))
    # The CUDA branch's checks (environment switch, lazy import) trace too, and the switch is guarded.
    monkeypatch.delenv("AUTOCUT_DISABLE_KERNELS", raising=False)
    switch = torch.compile(lambda t: t + kernels.kernels_disabled() + kernels._load(), backend="eager", fullgraph=True)
    assert switch(torch.zeros(1)).item() == 1
    monkeypatch.setenv("AUTOCUT_DISABLE_KERNELS", "1")
    assert switch(torch.zeros(1)).item() == 2


@needs_cuda
def test_cuda_tensors_take_the_kernel(monkeypatch):
    x = torch.randn(2, 3, 4, 4, device="cuda")
    assert kernels.fused_concat_pool_available(x)
    assert not kernels.fused_concat_pool_available(x.double())
    assert not kernels.fused_concat_pool_available(x[0])
    monkeypatch.setenv("AUTOCUT_DISABLE_KERNELS", "1")
    assert not kernels.fused_concat_pool_available(x)


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("AUTOCUT_DISABLE_KERNELS", "1")
    assert kernels.kernels_disabled()
    monkeypatch.setenv("AUTOCUT_DISABLE_KERNELS", "0")
    assert not kernels.kernels_disabled()


# --- CUDA only: real sizes, torch.compile with Inductor, CUDA graphs ------------------------


@needs_cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(256, 2048, 7, 7), (32, 1280, 12, 12), (8, 64, 56, 56)], ids=str)
def test_cuda_real_shapes(shape, dtype, layout):
    torch.manual_seed(0)
    x = make_input(shape, dtype, layout, device="cuda")
    check_forward(x)
    check_backward(x)


@needs_cuda
def test_cuda_layers_dispatch_matches_reference():
    x = torch.randn(4, 64, 7, 7, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(adaptive_concat_pool2d(x), reference(x), **TOL[torch.bfloat16])


@needs_cuda
def test_cuda_inductor_compile_forward_backward():
    x = torch.randn(16, 256, 7, 7, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda t: adaptive_concat_pool2d(t).square().sum(), fullgraph=True)
    (gx,) = torch.autograd.grad(compiled(x), x)
    (ref,) = torch.autograd.grad(reference(x).square().sum(), x)
    torch.testing.assert_close(gx, ref)


@needs_cuda
def test_cuda_graph_capture():
    x = torch.randn(8, 128, 7, 7, device="cuda", requires_grad=True)
    g = torch.randn(8, 256, 1, 1, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles) off the capture
        for _ in range(2):
            torch.autograd.grad(cp.concat_pool2d(x), x, g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cp.concat_pool2d(x)
        (gx,) = torch.autograd.grad(out, x, g)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, reference(x.detach()))
    (ref,) = torch.autograd.grad(reference(x), x, g)
    torch.testing.assert_close(gx, ref)


# --- the interpreter grid in a clean process ------------------------------------------------


@pytest.mark.skipif(RUNNABLE, reason="the kernels already run in this process")
def test_kernel_grid_in_a_child_process():
    """Another test module imported the kernels before TRITON_INTERPRET was set: rerun here."""
    rerun_in_child(__file__)
