"""The fused training BatchNorm1d + dropout (``autocut.kernels.bn_dropout``) against float64
``F.batch_norm`` and the same mask: the grid, strided input, the mask's rate and seeding, the
registration, the module's dispatch, and on CUDA graph replays and a whole training head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocut import kernels
from autocut.kernels import bn_dropout as bd
from autocut.layers import BatchNormDropout1d, create_head, fuse_bn_dropout

from kernel_helpers import (  # first: the interpreter switch
    DEVICE,
    DTYPES,
    RUNNABLE,
    TOL,
    needs_cuda,
    needs_kernel,
    randomise_bn,
    rerun_in_child,
)

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
    args = (x.detach(), w.detach(), bias.detach(), rm, rv, 0.1, 1e-5, 0.5, seed)
    torch.library.opcheck(torch.ops.autocut.bn_dropout.default, args)
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
        torch.testing.assert_close(a.grad, b.grad, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(fused.buffers(), eager.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
    check_bn_dropout((256, 4096), dtype, 0.25)


# --- the interpreter grid in a clean process ------------------------------------------------


@pytest.mark.skipif(RUNNABLE, reason="the kernels already run in this process")
def test_kernel_grid_in_a_child_process():
    """Another test module imported the kernels before TRITON_INTERPRET was set: rerun here."""
    rerun_in_child(__file__)
