"""The folded eval head (``autocut.kernels.fold``): BatchNorms folded into the Linears, against the
head itself in eval mode, for every head option."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocut.kernels.fold import FoldedHead, FoldedLinear, fold_head
from autocut.layers import create_head

from kernel_helpers import RUNNABLE, needs_cuda, randomise_bn, rerun_in_child  # first: the interpreter switch


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


# --- the interpreter grid in a clean process ------------------------------------------------


@pytest.mark.skipif(RUNNABLE, reason="the kernels already run in this process")
def test_kernel_grid_in_a_child_process():
    """Another test module imported the kernels before TRITON_INTERPRET was set: rerun here."""
    rerun_in_child(__file__)
