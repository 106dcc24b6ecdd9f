"""What the kernel test files share: the interpreter switch, the markers, dtypes and tolerances,
and the rerun of a kernel test file in a child process.

Import it before anything imports Triton: without CUDA the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``), which must be set before Triton is imported; where another test module
imported it first, the file's kernel tests rerun in a child process (:func:`rerun_in_child`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    # Read when a function is decorated with triton.jit (triton.language's own, at its import)
    # and again at launch, so it stays set for this process.
    os.environ["TRITON_INTERPRET"] = "1"

tl = pytest.importorskip("triton.language")
from autocut.kernels import concat_pool as cp  # noqa: E402

INTERPRETED = all(type(f).__name__ == "InterpretedFunction" for f in (cp._concat_pool_fwd_kernel, tl.zeros))
RUNNABLE = CUDA or INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
needs_kernel = pytest.mark.skipif(not RUNNABLE, reason="kernels compiled for a GPU; the grid reruns in a child process")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Avg and grad tolerances: fp32 accumulation differs from PyTorch's by rounding only; the
# interpreter also truncates fp32 -> bf16 where GPUs round (one bf16 ulp).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def rerun_in_child(path: str) -> None:
    """Run the test file at ``path`` in a child process with the interpreter on, and fail with its output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", path],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


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
