"""One forward that costs no memory: meta tensors for a meta model, fake tensors for real weights.

Discovery, layer groups and input channels each need to see a model run once, never its values:
:func:`probe_forward` runs it on tensors that have shapes and no storage, and falls back to one
small real forward only where the model's code needs values (``.item()``, a data-dependent shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = [
    "PROBE_BATCH", "shape_of", "tensor_leaves", "first_input", "leaf_at", "shapes_inside", "model_device",
    "probe_input", "eval_mode", "probe_forward",
]

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


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # pytree's MappingKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def tensor_leaves(value: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside ``value``, in order, with its key: ``""`` for a tensor itself, else the
    keys, indices and field names on the way to it joined by dots (``"last_hidden_state"``,
    ``"0"``, ``"hidden_states.3"``).

    Containers are those torch's pytree knows (tuples, lists, dicts, namedtuples, transformers'
    ``ModelOutput``, anything registered with it) and dataclasses; anything else holds no tensor.

    Example:
        >>> tensor_leaves({"maps": (torch.ones(1), None), "n": 3})
        [('maps.0', tensor([1.]))]
    """
    out: list[tuple[str, torch.Tensor]] = []

    def visit(prefix: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            out.append((prefix, v))
            return
        if type(v) in pytree.SUPPORTED_NODES or pytree.is_namedtuple_instance(v):
            flat = pytree.tree_flatten_with_path(v, is_leaf=lambda x: x is not v)[0]  # one level
            children = [(_key_name(path[0]), child) for path, child in flat]
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            children = [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v)]
        else:
            return
        for key, child in children:
            visit(f"{prefix}.{key}" if prefix else key, child)

    visit("", value)
    return out


def leaf_at(value: Any, key: str) -> torch.Tensor:
    """The tensor :func:`tensor_leaves` names ``key`` inside ``value``.

    Raises:
        KeyError: no tensor there (this input made the model return something else).
    """
    for k, leaf in tensor_leaves(value):
        if k == key:
            return leaf
    raise KeyError(f"no tensor {key!r} in the {type(value).__name__} returned (it holds {[k for k, _ in tensor_leaves(value)]})")


def shapes_inside(value: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """A tensor's shape; for a structure (tuple, dict, ``ModelOutput``, dataclass), the shape of
    each tensor inside by its :func:`tensor_leaves` key; ``None`` where it holds no tensor."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    leaves = tensor_leaves(value)
    return {key: tuple(t.shape) for key, t in leaves} if leaves else None


def first_input(args: tuple, kwargs: dict) -> Any:
    """A module call's first argument, passed by position or (transformers' way) by keyword."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


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
