"""One forward that costs no memory: meta tensors for a meta model, fake tensors for real weights.

Discovery, layer groups and input channels each need to see a model run once, never its values:
:func:`probe_forward` runs it on tensors that have shapes and no storage, and falls back to one
small real forward only where the model's code needs values (``.item()``, a data-dependent shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = [
    "PROBE_BATCH", "shape_of", "tensor_leaves", "first_input", "leaf_at", "shapes_inside", "model_device",
    "model_dtype", "probe_input", "modes_kept", "eval_mode", "set_mode", "weights_on_meta", "probe_forward",
]

# An odd prime no other dimension is likely to equal: attention pools stack k/v in a dimension of
# size 2, qkv in one of size 3, and feature maps are often 7, 13 or 14 wide.
PROBE_BATCH = 11


def shape_of(value: Any) -> Any:
    """A tensor's shape as a tuple; a structure's (list, tuple, dict, dataclass, ``ModelOutput``)
    as a list of its values' (a list, so it never reads as a shape); anything else ``None``."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, torch.Size):
        return None
    if isinstance(value, (list, tuple)):
        return [shape_of(v) for v in value]
    children = _children(value)
    return None if children is None else [shape_of(child) for _, child in children]


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # pytree's MappingKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _children(value: Any) -> list[tuple[str, Any]] | None:
    """The ``(key, value)`` pairs one level inside a structure (see :func:`tensor_leaves`), or
    ``None`` where ``value`` is not one."""
    if type(value) in pytree.SUPPORTED_NODES or pytree.is_namedtuple_instance(value):
        flat = pytree.tree_flatten_with_path(value, is_leaf=lambda x: x is not value)[0]  # one level
        return [(_key_name(path[0]), child) for path, child in flat]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    return None


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
        for key, child in _children(v) or ():
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


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (torch's default dtype
    for a model with neither): what an input must have for a half-precision model to run."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Within the block, the loggers ``names`` say nothing below CRITICAL: torch logs what fails
    on a path autocut tries and falls back from (FakeTensorMode the traceback of each op that
    fails on fake tensors; torch.export's shape environment a data-dependent guard, with the
    whole graph), before raising the error autocut catches and reports where every path fails."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def probe_input(
    shape: tuple[int, ...], device: torch.device, fake: bool = True, dtype: torch.dtype | None = None
) -> Iterator[torch.Tensor]:
    """An input of ``shape`` with no storage: on the meta device for a meta model, else (with
    ``fake``) a fake tensor on ``device``, valid inside the block; without ``fake``, real zeros.

    Args:
        dtype: the input's dtype (:func:`model_dtype`: bfloat16 for a bfloat16 model); default
            torch's default dtype.
    """
    if device.type == "meta":
        yield torch.empty(shape, device="meta", dtype=dtype)
    elif fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with quiet_loggers("torch._subclasses.fake_tensor"), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode.from_tensor(torch.empty(shape, device=device, dtype=dtype))
    else:
        yield torch.zeros(shape, device=device, dtype=dtype)


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``.train()``/``.eval()`` may switch ``model``'s modules; after it, each
    module's training flag is the one it had before (a BatchNorm the user froze in eval mode
    inside a model in train mode stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]  # parents before children
    try:
        yield model
    finally:
        for m, training in flags:
            if _plain_flag(type(m)):
                vars(m)["training"] = training  # (what nn.Module.__setattr__ would do, without its checks)
            else:  # its own train() does more than set flags (a GraphBody switches graphs): call it
                m.train(training)  # (its children come later, and get their own flags back)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode within the block, each module's own mode restored after."""
    with modes_kept(model):
        set_mode(model, False)
        yield model


_PLAIN_FLAG: dict[type, bool] = {}  # (by class: a weak mapping would cost more than the walk saves)


def _plain_flag(cls: type) -> bool:
    """Whether ``cls.train(mode)`` only sets ``self.training`` in the instance's dict (and its
    children's): no ``train``, no ``__setattr__`` of its own, and ``training`` not a property."""
    plain = _PLAIN_FLAG.get(cls)
    if plain is None:
        plain = _PLAIN_FLAG[cls] = (cls.train is nn.Module.train and cls.__setattr__ is nn.Module.__setattr__
                                    and not hasattr(inspect.getattr_static(cls, "training", None), "__set__"))
    return plain


def set_mode(model: nn.Module, training: bool) -> nn.Module:
    """``model.train(training)``, a few times faster on a model of thousands of modules: each
    flag is set directly, and a module with a ``train()`` of its own (a ``GraphBody`` switches
    graphs, a frozen-BatchNorm wrapper keeps its norms in eval), a ``__setattr__`` of its own or a
    ``training`` property is left to its ``train()``, subtree included."""
    stack = [model]
    while stack:
        m = stack.pop()
        if not _plain_flag(type(m)):
            m.train(training)
            continue
        vars(m)["training"] = training
        stack.extend(child for child in vars(m)["_modules"].values() if child is not None)
    return model


@contextlib.contextmanager
def weights_on_meta(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every parameter and buffer of ``model`` is a meta tensor of its shape,
    strides and dtype (a parameter still a parameter, one shared tensor still shared); after it,
    the model's own tensors again, untouched. A probe then runs on meta tensors, as a meta model's
    does, without converting each weight to a fake tensor on every use."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    made: dict[int, torch.Tensor] = {}
    try:
        for module in model.modules():
            for store in (vars(module)["_parameters"], vars(module)["_buffers"]):
                for name, t in store.items():
                    if t is None or t.device.type == "meta":
                        continue
                    meta = made.get(id(t))
                    if meta is None:
                        meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                        if isinstance(t, nn.Parameter):
                            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                        made[id(t)] = meta
                    swapped.append((store, name, t))
                    store[name] = meta
        yield model
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


T = TypeVar("T")


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """Within the block, each tensor made is a fake tensor and each other one read becomes one: code
    that reads values only where it is not traced (transformers' mask checks,
    ``padding_mask.all()``, skipped where the mask is a fake tensor, as under torch.export) runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with quiet_loggers("torch._subclasses.fake_tensor"), FakeTensorMode(allow_non_fake_inputs=True):
        yield


def meta_first(model: nn.Module, run: Callable[[], T], before_real: Callable[[], None] | None = None,
               real: bool = True, fake: bool = True) -> T:
    """``run()`` with ``model``'s weights stood in for by meta tensors (:func:`weights_on_meta`:
    a probe that makes its input on :func:`model_device` makes a meta one; a meta model as it is),
    for the shapes and the flow of values alone. Where that fails, after ``before_real()``, on
    fake tensors (``fake``; :func:`fake_tensors`, a real model's weights as fake tensors of
    themselves): code that reads values unless traced (transformers' mask checks) and a tensor
    attribute that is no weight (a real one, which meta tensors cannot meet) run there. Where
    that fails too, after ``before_real()``, ``run()`` on the real weights, which raises what it
    raises; a meta model, or ``real=False``, raises what the meta run raised instead."""
    meta = model_device(model).type == "meta"
    try:
        with contextlib.nullcontext() if meta else weights_on_meta(model):
            return run()
    except Exception as err:  # (any failure on meta tensors) fake ones next, then the real weights
        failed = err
    if fake:
        if before_real is not None:
            before_real()
        try:
            with fake_tensors():
                return run()
        except Exception:  # (any failure on fake tensors) the real weights next, or the meta run's error
            pass
    if meta or not real:
        raise failed
    if before_real is not None:
        before_real()
    return run()


def probe_forward(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int = PROBE_BATCH,
    fake: bool = True,
    real_batch: int | None = 1,
    before_real: Callable[[], None] | None = None,
) -> int:
    """Run ``model`` once, in eval mode and without gradients, on a ``(batch, *input_size)`` input
    of :func:`probe_input` in the model's dtype; what it records is up to the caller's hooks.

    Args:
        fake: meta tensors for a model with real weights (each weight stood in for by a meta
            tensor, :func:`weights_on_meta`), where that fails fake tensors; ``False`` runs real
            zeros of ``batch``.
        real_batch: where fake tensors cannot run the model's code (it reads values: ``.item()``,
            a data-dependent shape), run it once more on real zeros of this batch; ``None`` raises.
        before_real: called before each forward after a failed one (hooks clear what the failed
            one recorded).

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
    def run() -> int:  # (on meta stand-ins of the weights first, under meta_first: on a meta input then)
        device, dtype = model_device(model), model_dtype(model)
        try:
            with probe_input((batch, *input_size), device, fake, dtype) as x:
                model(x)
            return batch
        except RuntimeError:  # fake and meta tensors raise RuntimeErrors where code needs values
            if real_batch is None or device.type == "meta" or not fake:
                raise
        if before_real is not None:
            before_real()
        model(torch.zeros(real_batch, *input_size, device=device, dtype=dtype))
        return real_batch

    with eval_mode(model), torch.no_grad():  # meta first: no fake weight per use, no Python per op (as trace() does)
        # (a real model's run makes its own fake input once meta stand-ins fail)
        return meta_first(model, run, before_real, fake=model_device(model).type == "meta") if fake else run()
