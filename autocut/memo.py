"""What :func:`~autocut.adapt` and :func:`~autocut.create_body` remember of an architecture.

Discovery traces the model, probes its shapes and checks the cut; the layer groups read each
module's stride. None of it depends on the weights' values, only on the architecture: the module
tree (each module's class, its plain attributes and its parameters' and buffers' shapes, dtypes
and devices), its training flags, the input size and the cut asked for. So the first call for an
architecture does that work and keeps a :class:`Recipe`; a later call for a model with the same
key (a second ``adapt("efficientnet_b0")``, a model built again in a loop) makes its body from the
recipe: the first body's graph, already cut, copied onto the new model (its module tree made in
one pass, its Python code reused), the cut and strides found before, no trace and no probe.

A model is not remembered when its key cannot be made safely: hooks on a module (they fire on
the probes), an attribute that is not a plain value, a config or a container of those (a module
kept as a plain attribute, a bound method, an array). Warnings the first call gave are given
again on each later one. :func:`clear_cache` forgets everything (the cache holds at most
:data:`MAX_RECIPES` recipes, the least recently used dropped first).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autocut.body import BodyNote
from autocut.cut import Cut
from autocut.trace import _KEY_SCALARS, has_hooks
from autocut.trace import _MODULE_INTERNALS as _NN_MODULE_ATTRIBUTES

__all__ = ["MAX_RECIPES", "Recipe", "architecture_key", "clear_cache", "lookup", "remember", "recording"]

MAX_RECIPES = 32

_PLAIN = _KEY_SCALARS | {complex, bytes}
_MODULE_INTERNALS = _NN_MODULE_ATTRIBUTES - {"training"}  # (the training flags are part of the key)
_MAX_DEPTH = 8


class _Unkeyable(Exception):
    """An attribute the key cannot stand for by value (see the module docstring)."""


@dataclass
class Recipe:
    """What the first call found for one key: the cut (with the stride read), the first graph
    body's graphs (:class:`~autocut.body.BodyNote`; unused for a hooks or export cut), its
    warnings, the names of its norm parameters, and the layer groups' units as ``(path, stride,
    order, parameter names)`` once a call read them."""

    cut: Cut
    warned: list[warnings.WarningMessage] = field(default_factory=list)
    body: BodyNote = field(default_factory=BodyNote)
    norms: frozenset[str] | None = None
    units: tuple[tuple[str, float, int, tuple[str, ...]], ...] | None = None
    key: Hashable | None = field(default=None, repr=False, compare=False)  # (the one kept: found again by identity)


class _Key:
    """An architecture key with its hash worked out once: the key is a tuple over every module,
    which a lookup would otherwise hash again for each dictionary operation."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: Hashable):
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self._hash == other._hash and self.value == other.value


_RECIPES: OrderedDict[Hashable, Recipe] = OrderedDict()
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every architecture :func:`~autocut.adapt` and :func:`~autocut.create_body` cut in
    this process: the next call for each discovers its cut again."""
    with _LOCK:
        _RECIPES.clear()


def lookup(key: Hashable | None) -> Recipe | None:
    """The recipe kept for ``key`` (``None`` where there is none, or no key)."""
    if key is None:
        return None
    with _LOCK:
        recipe = _RECIPES.get(key)
        if recipe is not None:
            _RECIPES.move_to_end(recipe.key)  # (the kept key: equal to it by identity, not by a walk of both)
        return recipe


def remember(key: Hashable | None, recipe: Recipe) -> None:
    """Keep ``recipe`` for ``key`` (nothing without a key)."""
    if key is None:
        return
    recipe.key = key
    with _LOCK:
        _RECIPES[key] = recipe
        _RECIPES.move_to_end(key)
        while len(_RECIPES) > MAX_RECIPES:
            _RECIPES.popitem(last=False)


def _frozen(value: Any, depth: int = 0) -> Hashable:
    """A hashable stand-in for a module attribute, equal for two attributes the forward cannot
    tell apart by anything but tensor values: plain values by type and value, tensors by their
    metadata, containers and plain objects (configs) by their contents, functions and classes by
    identity. Raises :class:`_Unkeyable` for anything else."""
    kind = type(value)
    if kind in _PLAIN or isinstance(value, enum.Enum):
        return kind, value
    if isinstance(value, torch.Tensor):
        return "tensor", kind, value.shape, value.dtype, value.device, value.requires_grad
    if depth > _MAX_DEPTH:
        raise _Unkeyable
    if isinstance(value, (tuple, list)):  # (torch.Size and named tuples among them)
        types_in = tuple(map(type, value))
        if _PLAIN.issuperset(types_in):  # a convolution's stride, padding, ...: the values and their types, at once
            return kind, tuple(value), types_in
        return kind, tuple(_frozen(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return kind, tuple((_frozen(k, depth + 1), _frozen(v, depth + 1)) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return kind, frozenset(_frozen(v, depth + 1) for v in value)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return value  # by identity: a function redefined is another key
    if isinstance(value, functools.partial):
        return kind, value.func, _frozen(value.args, depth + 1), _frozen(value.keywords, depth + 1)
    if isinstance(value, (nn.Module, types.MethodType)) or not hasattr(value, "__dict__"):
        raise _Unkeyable  # (a module or an instance held by reference: its state is not the key's)
    return kind, _frozen(vars(value), depth + 1)  # a config, a dataclass: by its fields


def _tensors_key(held: dict[str, Any]) -> Hashable:
    """A module's parameters or buffers by name, each by its metadata (the loop: faster than a
    generator here, where the key walks every module)."""
    key = []
    for name, value in held.items():
        if isinstance(value, torch.Tensor):
            key.append((name, type(value), value.shape, value.dtype, value.device, value.requires_grad))
        else:  # (None: a registered but unset parameter or buffer)
            key.append((name, _frozen(value)))
    return tuple(key)


def _module_key(path: str, module: nn.Module) -> Hashable:
    if has_hooks(module):
        raise _Unkeyable
    held = vars(module)
    attributes = []
    for name, value in held.items():
        if name not in _MODULE_INTERNALS:
            kind = type(value)  # (a plain value inline: most attributes are)
            attributes.append((name, kind, value) if kind in _PLAIN else (name, _frozen(value)))
    return (path, type(module), _tensors_key(held["_parameters"]), _tensors_key(held["_buffers"]),
            frozenset(held["_non_persistent_buffers_set"]), tuple(attributes))


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def architecture_key(module: nn.Module, *rest: Hashable) -> Hashable | None:
    """The key of ``module``'s architecture (see the module docstring) with ``rest`` (the input
    size, the cut asked for, ...), or ``None`` where it cannot be made safely."""
    if _global_hooks():
        return None
    try:
        modules = tuple(_module_key(path, m) for path, m in module.named_modules(remove_duplicate=False))
        return _Key((modules, tuple(_frozen(r) for r in rest)))
    except _Unkeyable:
        return None
    except (TypeError, RecursionError):  # an attribute that cannot be hashed or walked: not remembered
        return None


@contextlib.contextmanager
def recording() -> Iterator[list[warnings.WarningMessage]]:
    """Record the warnings given in the block (kept for the recipe) and give them on exit."""
    with warnings.catch_warnings(record=True) as warned:  # (the filters in force decide what is recorded)
        yield warned
    replay(warned)


_SHOWN: dict = {}  # the registry of the warnings replayed: "default" filters show each once, as at first


def replay(warned: list[warnings.WarningMessage]) -> None:
    """Give ``warned`` again, from where the first call gave them (the filters in force apply)."""
    for w in warned:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_SHOWN, source=w.source)
