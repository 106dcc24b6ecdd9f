"""The fused concat pool and the fused training BatchNorm-dropout against PyTorch's reference, and
the folded eval head against the head.

Without CUDA the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``), which must be
set before the kernel module is imported; when another test module imported it first, the grid
reruns in a child process. With CUDA the same grid runs on the GPU, plus the CUDA-only checks
(dispatch, torch.compile, CUDA graphs, large shapes).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    # Read when a function is decorated with triton.jit (triton.language's own, at its import)
    # and again at launch, so it stays set for this process.
    os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

tl = pytest.importorskip("triton.language")
from autocut import kernels  # noqa: E402
from autocut.kernels import bn_dropout as bd  # noqa: E402
from autocut.kernels import concat_pool as cp  # noqa: E402
from autocut.kernels.fold import FoldedHead, FoldedLinear, fold_head  # noqa: E402
from autocut.layers import BatchNormDropout1d, adaptive_concat_pool2d, create_head, fuse_bn_dropout  # noqa: E402

INTERPRETED = all(type(f).__name__ == "InterpretedFunction" for f in (cp._concat_pool_fwd_kernel, tl.zeros))
RUNNABLE = CUDA or INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
needs_kernel = pytest.mark.skipif(not RUNNABLE, reason="kernels compiled for a GPU; the grid reruns in a child process")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, C, H, W): odd sizes, h*w = 1, and 16x17 = 272 > 256 positions for the int16 argmax.
SHAPES = [(2, 3, 4, 5), (3, 8, 1, 1), (1, 5, 3, 3), (2, 4, 16, 17)]
LAYOUTS = ["nchw", "channels_last", "channel_slice", "transposed"]
# Avg and grad tolerances: fp32 accumulation differs from PyTorch's by rounding only; the
# interpreter also truncates fp32 -> bf16 where GPUs round (one bf16 ulp).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


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


@needs_cuda
def test_cuda_folded_head_bf16():
    head = randomise_bn(create_head(2048, 1000)).cuda().eval()
    x = torch.randn(64, 2048, 7, 7, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = head(x)
        got = fold_head(head)(x)
        got_bf16 = fold_head(head).to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_bf16.float(), want, rtol=5e-2, atol=5e-2)


# --- the folded eval head -------------------------------------------------------------------


def randomise_bn(head: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones fold to ~identity)."""
    g = torch.Generator().manual_seed(0)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm1d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return head


HEADS = {
    "default": dict(),
    "two_hidden": dict(lin_ftrs=[16, 12], ps=[0.1, 0.2, 0.3]),
    "lin_first": dict(lin_first=True, lin_ftrs=[16]),
    "bn_final": dict(bn_final=True),
    "no_first_bn": dict(first_bn=False),
    "y_range": dict(y_range=(-1.0, 3.0)),
    "avg_pool": dict(concat_pool=False),
}


@pytest.mark.parametrize("options", HEADS.values(), ids=HEADS.keys())
def test_folded_head_equals_head_in_eval(options):
    torch.manual_seed(0)
    head = randomise_bn(create_head(8, 5, **options)).double().train()  # fold_head must not care
    folded = fold_head(head)
    head.eval()
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), head(x), rtol=1e-10, atol=1e-10)
    n_linear = sum(isinstance(m, nn.Linear) for m in head.modules())
    assert len(folded.linears) == n_linear
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.Dropout)) for m in folded.modules())
    assert not list(folded.parameters())


def test_folded_head_float32_and_relu_fused():
    head = randomise_bn(create_head(16, 7)).eval()
    folded = fold_head(head)
    assert [type(m) for m in folded.linears] == [FoldedLinear, FoldedLinear]
    assert [m.relu for m in folded.linears] == [True, False]
    x = torch.randn(4, 16, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), head(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(4, 16, 3, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(folded(x).float(), head(x).float(), rtol=5e-2, atol=5e-2)


def test_folded_head_without_pool():
    head = randomise_bn(create_head(10, 3, pool=False)).double().eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(fold_head(head)(x), head(x), rtol=1e-10, atol=1e-10)


def test_fold_head_says_what_it_cannot_fold():
    head = create_head(8, 5)
    head[2] = nn.BatchNorm1d(16, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold_head(head)
    with pytest.raises(ValueError, match=r"head\[1\] \(GELU\)"):
        fold_head(nn.Sequential(nn.Linear(4, 4), nn.GELU()))
    with pytest.raises(ValueError, match="no Linear to fold it into"):
        fold_head(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4)))
    with pytest.raises(TypeError, match="nn.Sequential"):
        fold_head(nn.Linear(4, 4))
    assert isinstance(fold_head(nn.Sequential(nn.Linear(4, 4))), FoldedHead)


# --- training BatchNorm + dropout -----------------------------------------------------------

# (B, F): F below, at and above one feature block (32); B above one batch block (128).
BN_SHAPES = [(2, 3), (37, 70), (130, 33), (5, 1)]
# Sums over the batch in another order than PyTorch's: a few fp32 ulps of the sum.
BN_TOL = {**TOL, torch.float32: dict(rtol=1e-4, atol=1e-5)}


def bn_inputs(shape, dtype, layout="contiguous", seed=0):
    """``x`` (off-centre, so the two-pass variance matters), BatchNorm parameters and running stats."""
    g = torch.Generator().manual_seed(seed)
    b, f = shape
    x = torch.randn(b, f, generator=g) * 3 + 5
    x = x.t().contiguous().t() if layout == "column_major" else x
    x = x.to(DEVICE, dtype).requires_grad_()
    w = (torch.rand(f, generator=g) + 0.5).to(DEVICE).requires_grad_()
    bias = torch.randn(f, generator=g).to(DEVICE).requires_grad_()
    return x, w, bias, torch.randn(f, generator=g).to(DEVICE), (torch.rand(f, generator=g) + 0.5).to(DEVICE)


def check_bn_dropout(shape, dtype, p, layout="contiguous", momentum=0.1):
    """Forward, running statistics and every gradient against ``F.batch_norm`` then the same mask,
    computed in float64 from the very same (rounded) inputs."""
    x, w, bias, rm, rv = bn_inputs(shape, dtype, layout)
    rm_ref, rv_ref = rm.double(), rv.double()
    y = bd.bn_dropout_train(x, w, bias, rm, rv, momentum, 1e-5, p)
    assert y.shape == x.shape and y.dtype == dtype
    leaves = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    ref = F.batch_norm(leaves[0], rm_ref, rv_ref, leaves[1], leaves[2], True, momentum, 1e-5)
    # The mask is Philox's, not PyTorch's: read it off the output (a kept value is never exactly 0).
    keep = (y != 0).double()
    if p == 0:
        assert keep.all()
    want = ref * keep / (1 - p)
    torch.testing.assert_close(y.double(), want, **BN_TOL[dtype])
    torch.testing.assert_close(rm.double(), rm_ref, **BN_TOL[torch.float32])
    torch.testing.assert_close(rv.double(), rv_ref, **BN_TOL[torch.float32])
    # The backward regenerates the mask from the seed: a different mask would show in every grad.
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = torch.autograd.grad(y, (x, w, bias), g)
    ref_grads = torch.autograd.grad(want, leaves, g.double())
    for a, b, tol in zip(got, ref_grads, (BN_TOL[dtype], BN_TOL[torch.float32], BN_TOL[torch.float32])):
        torch.testing.assert_close(a.double(), b, **tol)
    return y


@needs_kernel
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_dropout_grid(shape, dtype, p):
    check_bn_dropout(shape, dtype, p)


@needs_kernel
def test_bn_dropout_strided_input_and_momentum_one():
    check_bn_dropout((9, 40), torch.float32, 0.5, layout="column_major", momentum=1.0)


@needs_kernel
def test_bn_dropout_mask_rate_and_seeding():
    x, w, bias, rm, rv = bn_inputs((64, 96), torch.float32)
    x = x.detach()

    def run(seed):
        torch.manual_seed(seed)
        return bd.bn_dropout_train(x, w.detach(), bias.detach(), rm.clone(), rv.clone(), 0.1, 1e-5, 0.3) == 0

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again), "torch.manual_seed must make the mask repeatable"
    assert not torch.equal(first, other)
    assert abs(first.float().mean().item() - 0.3) < 0.03  # 6,144 draws: sd 0.006
    # No stripes: every row and column sees drops.
    assert first.any(0).all() and first.any(1).all()


@needs_kernel
def test_bn_dropout_drops_everything_at_p_one():
    x, w, bias, rm, rv = bn_inputs((4, 6), torch.float32)
    y = bd.bn_dropout_train(x, w, bias, rm, rv, 0.1, 1e-5, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, bias))
    assert not gx.abs().sum() and not gw.abs().sum() and not gb.abs().sum()


def test_bn_dropout_refuses_what_pytorch_refuses():
    x, w, bias, rm, rv = bn_inputs((1, 4), torch.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bd.bn_dropout_forward(x, w, bias, rm, rv, 0.1, 1e-5, 0.5, bd.dropout_seed(DEVICE))
    x, w, bias, rm, rv = bn_inputs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="between 0 and 1"):
        bd.bn_dropout_forward(x, w, bias, rm, rv, 0.1, 1e-5, -0.1, bd.dropout_seed(DEVICE))
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        bd.bn_dropout_forward(x[None], w, bias, rm, rv, 0.1, 1e-5, 0.5, bd.dropout_seed(DEVICE))
    with pytest.raises(TypeError, match="float32"):
        bd.bn_dropout_forward(x.double(), w, bias, rm, rv, 0.1, 1e-5, 0.5, bd.dropout_seed(DEVICE))
    for bad in (dict(weight=w.detach()[:3]), dict(bias=torch.zeros(4, 2, device=DEVICE)[:, 0]), dict(running_var=rv[:3])):
        args = {**dict(weight=w, bias=bias, running_mean=rm, running_var=rv), **bad}
        with pytest.raises(ValueError, match="contiguous vectors of 4 features"):
            bd.bn_dropout_forward(x, momentum=0.1, eps=1e-5, p=0.5, seed=bd.dropout_seed(DEVICE), **args)
    # The module-facing check sends such vectors to PyTorch instead (strided, short, elsewhere).
    assert kernels.vectors_fit(x, w, bias, rm, rv)
    assert not kernels.vectors_fit(x, torch.zeros(4, 2)[:, 0]) and not kernels.vectors_fit(x, rm[:3])
    assert not kernels.vectors_fit(x, torch.zeros(4, device="meta"))


@needs_kernel
def test_bn_dropout_opcheck_and_compile():
    x, w, bias, rm, rv = bn_inputs((6, 5), torch.float32)
    seed = bd.dropout_seed(DEVICE)
    torch.library.opcheck(torch.ops.autocut.bn_dropout.default, (x.detach(), w.detach(), bias.detach(), rm, rv, 0.1, 1e-5, 0.5, seed))
    grad = torch.randn(6, 5, device=DEVICE)
    _, mean, rstd = bd.bn_dropout_forward(x.detach(), w.detach(), bias.detach(), rm.clone(), rv.clone(), 0.1, 1e-5, 0.5, seed)
    torch.library.opcheck(torch.ops.autocut.bn_dropout_backward.default, (grad, x.detach(), w.detach(), mean, rstd, seed, 0.5))

    def step(t):
        return bd.bn_dropout_train(t, w, bias, rm, rv, 0.1, 1e-5, 0.5).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    got = torch.autograd.grad(compiled(x), (x, w, bias))
    stats = rm.clone(), rv.clone()  # a lost in-place update would show here
    torch.manual_seed(3)
    want = torch.autograd.grad(step(x), (x, w, bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    rm_ref, rv_ref = stats[0].clone(), stats[1].clone()
    bd.bn_dropout_forward(x.detach(), w.detach(), bias.detach(), rm_ref, rv_ref, 0.1, 1e-5, 0.5, seed)
    torch.testing.assert_close(rm, rm_ref)  # the eager call after the compiled one updated them once more
    torch.testing.assert_close(rv, rv_ref)
    assert not torch.equal(stats[0], rm_ref)


@needs_kernel
def test_bn_dropout_module_takes_the_kernel_where_available(monkeypatch):
    """The module's own logic (batch counting, momentum=None) in front of the kernel, against nn.BatchNorm1d."""
    calls = []
    real = bd.bn_dropout_train

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kernels, "fused_bn_dropout_available", lambda x, *vectors: x.dim() == 2)
    monkeypatch.setattr(bd, "bn_dropout_train", counting)
    torch.manual_seed(0)
    x = torch.randn(12, 10, device=DEVICE) * 2 + 1
    for momentum in (0.1, None):
        fused, bn = BatchNormDropout1d(10, p=0.0, momentum=momentum).to(DEVICE), nn.BatchNorm1d(10, momentum=momentum).to(DEVICE)
        for _ in range(3):
            torch.testing.assert_close(fused(x), bn(x), **TOL[torch.float32])
        torch.testing.assert_close(fused.running_var, bn.running_var)
        assert fused.num_batches_tracked.item() == 3
    assert len(calls) == 6
    fused.eval()
    fused(x)
    assert len(calls) == 6, "eval mode uses the running statistics: PyTorch's ops, no kernel"
    # With dropout: what survives is the normalised value scaled by 1/(1-p), at about 1-p of the places.
    fused, bn = BatchNormDropout1d(10, p=0.5).to(DEVICE), nn.BatchNorm1d(10).to(DEVICE)
    x = torch.randn(256, 10, device=DEVICE)
    y, want = fused(x), bn(x)
    kept = y != 0
    assert len(calls) == 7 and abs(kept.float().mean().item() - 0.5) < 0.05
    torch.testing.assert_close(y[kept], 2 * want[kept], **BN_TOL[torch.float32])


@needs_cuda
def test_cuda_bn_dropout_graph_replays_draw_fresh_masks():
    x, w, bias, rm, rv = bn_inputs((64, 96), torch.float32)
    g = torch.randn(64, 96, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles) off the capture
        for _ in range(2):
            torch.autograd.grad(bd.bn_dropout_train(x, w, bias, rm, rv, 0.1, 1e-5, 0.5), x, g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = bd.bn_dropout_train(x, w, bias, rm, rv, 0.1, 1e-5, 0.5)
        (gx,) = torch.autograd.grad(y, x, g)
    masks, grads = [], []
    for _ in range(2):
        graph.replay()
        masks.append((y != 0).clone())
        grads.append(gx.clone())
    assert not torch.equal(masks[0], masks[1]), "each replay must draw a new mask"
    # Each replay's gradient is the one of its own mask (regenerated from that replay's seed).
    for mask, grad in zip(masks, grads):
        keep = mask.double()
        leaf = x.detach().double().requires_grad_()
        ref = F.batch_norm(leaf, None, None, w.detach().double(), bias.detach().double(), True) * keep / 0.5
        (want,) = torch.autograd.grad(ref, leaf, g.double())
        torch.testing.assert_close(grad.double(), want, **BN_TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fused_training_head_matches_eager(dtype):
    """A training step of a fused head on the GPU (dropout off, so the two are comparable) equals the
    eager head's: output, every gradient, the running statistics; with dropout, the real sizes."""
    torch.manual_seed(0)
    eager = randomise_bn(create_head(2048, 10)).cuda().train()
    fused = fuse_bn_dropout(randomise_bn(create_head(2048, 10)).cuda().train())
    fused.load_state_dict(eager.state_dict())
    for m in list(eager) + list(fused):
        if isinstance(m, (nn.Dropout, BatchNormDropout1d)):
            m.p = 0.0
    x = torch.randn(256, 2048, 7, 7, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got, want = fused(x), eager(x)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    got.float().square().mean().backward()
    want.float().square().mean().backward()
    for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    for a, b in zip(fused.buffers(), eager.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
    check_bn_dropout((256, 4096), dtype, 0.25)


# --- the interpreter grid in a clean process ------------------------------------------------


@pytest.mark.skipif(RUNNABLE, reason="the kernels already run in this process")
def test_kernel_grid_in_a_child_process():
    """Another test module imported the kernels before TRITON_INTERPRET was set: rerun here."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
