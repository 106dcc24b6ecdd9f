"""One forward that costs no memory: meta tensors for a meta model, fake tensors for real weights.

Discovery, layer groups and input channels each need to see a model run once, never its values:
:func:`probe_forward` runs it on tensors that have shapes and no storage, and falls back to one
small real forward only where the model's code needs values (``.item()``, a data-dependent shape).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["PROBE_BATCH", "shape_of", "model_device", "probe_input", "eval_mode", "probe_forward"]

# An odd prime no other dimension is likely to equal: attention pools stack k/v in a dimension of
# size 2, qkv in one of size 3, and feature maps are often 7, 13 or 14 wide.
PROBE_BATCH = 11


def shape_of(value: Any) -> Any:
    """A tensor's shape as a tuple, a list or tuple of values as a list of theirs, anything else ``None``."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return [shape_of(v) for v in value]  # a list, so it never reads as a shape
    return None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def probe_input(shape: tuple[int, ...], device: torch.device, fake: bool = True) -> Iterator[torch.Tensor]:
    """An input of ``shape`` with no storage: on the meta device for a meta model, else (with
    ``fake``) a fake tensor on ``device``, valid inside the block; without ``fake``, real zeros."""
    if device.type == "meta":
        yield torch.empty(shape, device="meta")
    elif fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode.from_tensor(torch.empty(shape, device=device))
    else:
        yield torch.zeros(shape, device=device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode within the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def probe_forward(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int = PROBE_BATCH,
    fake: bool = True,
    real_batch: int | None = 1,
    before_real: Callable[[], None] | None = None,
) -> int:
    """Run ``model`` once, in eval mode and without gradients, on a ``(batch, *input_size)`` input
    of :func:`probe_input`; what it records is up to the caller's hooks.

    Args:
        fake: fake tensors for a model with real weights; ``False`` runs real zeros of ``batch``.
        real_batch: where fake tensors cannot run the model's code (it reads values: ``.item()``,
            a data-dependent shape), run it once more on real zeros of this batch; ``None`` raises.
        before_real: called before that real forward (hooks clear what the failed one recorded).

    Returns:
        The batch of the forward that ran to the end.

    Raises:
        Whatever the model raises (a hook may raise a ``BaseException`` to stop it early).

    Example:
        >>> shapes = []
        >>> handle = model.layer4.register_forward_hook(lambda m, a, out: shapes.append(out.shape))
        >>> probe_forward(model, (3, 224, 224))
        11
    """
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        try:
            with probe_input((batch, *input_size), device, fake) as x:
                model(x)
            return batch
        except RuntimeError:  # fake and meta tensors raise RuntimeErrors where code needs values
            if real_batch is None or device.type == "meta" or not fake:
                raise
        if before_real is not None:
            before_real()
        model(torch.zeros(real_batch, *input_size, device=device))
        return real_batch
