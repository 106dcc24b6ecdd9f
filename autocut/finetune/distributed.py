"""Processes for ``torchrun``: set-up and tear-down, and batch norm synchronised across them.

A run with ``N`` processes matches a single one up to float noise when every step sees the same
global batch: each process takes ``bs / N`` samples of the same permutation
(``DistributedSampler``), gradients are averaged (``DistributedDataParallel``) and batch norm
takes its statistics over the global batch. ``nn.SyncBatchNorm`` only runs on GPUs, so
:func:`synced_batch_norm` computes them with differentiable all-reduces, on any backend (gloo
included) and for timm's ``BatchNormAct2d`` too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["Processes", "setup", "teardown", "synced_batch_norm", "all_sum"]


@dataclass(frozen=True)
class Processes:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # setup() started the process group, teardown() ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup(device: str | torch.device | None = None) -> Processes:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``), NCCL on CUDA, gloo on CPU; a single process when there is none. The
    device defaults to ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), device, owns)
    return Processes(0, 1, device)


def teardown(procs: Processes) -> None:
    if procs.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum of ``values`` over the processes (``values`` itself for one)."""
    if procs.world_size > 1:
        values = values.to(procs.device if procs.device.type == "cuda" else "cpu")
        dist.all_reduce(values)
    return values


class _AllSum(torch.autograd.Function):
    """A differentiable sum over processes: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllSum.apply(grad, ctx.group), None


def _batch_norm_over_processes(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, group) -> torch.Tensor:
    """Training-mode batch norm with mean and variance over every process's batch (two-pass,
    both sums differentiable so the backward pass sums over processes as well)."""
    channels = x.shape[1]
    dims = [d for d in range(x.dim()) if d != 1]
    shape = (1, channels) + (1,) * (x.dim() - 2)
    xf = x.float()
    count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
    sums = _AllSum.apply(torch.cat([xf.sum(dims), count]), group)
    n = sums[channels]
    mean = sums[:channels] / n
    centred = xf - mean.view(shape)
    var = _AllSum.apply((centred * centred).sum(dims), group) / n
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach(), momentum)
            bn.running_var.lerp_(var.detach() * n / (n - 1), momentum)
    return y.to(x.dtype)


def _synced_forward(bn: nn.modules.batchnorm._BatchNorm, eval_forward, group, then: Callable | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not bn.training:
            return eval_forward(x)
        y = _batch_norm_over_processes(bn, x, group)
        return then(y) if then is not None else y

    return forward


def _after_norm(bn: nn.modules.batchnorm._BatchNorm) -> Callable | None:
    """What a batch norm module does after normalising (timm's act and drop, autocut's dropout)."""
    from timm.layers import BatchNormAct2d

    from autocut.layers import BatchNormDropout1d

    if isinstance(bn, BatchNormAct2d):
        return lambda y: bn.act(bn.drop(y))
    if isinstance(bn, BatchNormDropout1d):
        return lambda y: F.dropout(y, bn.p, bn.training)
    return None


@contextmanager
def synced_batch_norm(model: nn.Module, procs: Processes) -> Iterator[nn.Module]:
    """Within the block, ``model``'s batch norms take training statistics over all processes.

    Their ``forward`` is swapped in place (parameter names and the module tree stay as they
    are, so checkpoints do not change) and restored on exit. A no-op for one process.
    """
    if procs.world_size == 1:
        yield model
        return
    from timm.layers import BatchNormAct2d

    from autocut.layers import BatchNormDropout1d

    known = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNormDropout1d)
    group = dist.new_group()  # its own group: no interleaving with DDP's gradient buckets
    swapped, unknown = [], set()
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if type(module) in known or isinstance(module, BatchNormAct2d):
            module.forward = _synced_forward(module, module.forward, group, _after_norm(module))
            swapped.append(module)
        else:
            unknown.add(type(module).__name__)
    if unknown:
        warnings.warn(f"batch norms of type {', '.join(sorted(unknown))} keep per-process statistics", stacklevel=3)
    try:
        yield model
    finally:
        for module in swapped:
            del module.forward
        dist.destroy_process_group(group)
