"""The hooks rule, for models fx cannot trace (data-dependent control flow, unsupported Python):
the probe, the rule and the body, all on module calls instead of graph nodes.

- :func:`probe_modules` runs one forward with a hook on every module and records each call's input
  and output shapes, in the order calls finish.
- :func:`find_cut_by_hooks` applies the graph rule's idea to those calls: the head is the first
  module that takes a feature map and returns none, after which no module returns a feature map;
  the cut is its input.
- :class:`EarlyExitBody` runs the model's own forward and stops it at the cut.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autocut.cut import HEAD_LIKE_MODULES, Cut, dropped_modules, stride_of
from autocut.errors import CutError
from autocut.layout import Feature, Layout, ToNCHW, feature_of
from autocut.probe import PROBE_BATCH, probe_forward, shape_of

__all__ = ["ModuleCall", "probe_modules", "find_cut_by_hooks", "EarlyExitBody"]


@dataclass
class ModuleCall:
    """One call of a module during a hooked forward: its path, input and output shapes."""

    path: str
    index: int
    in_shape: Any
    out_shape: Any


def probe_modules(model: nn.Module, input_size: tuple[int, int, int], batch: int = PROBE_BATCH) -> list[ModuleCall]:
    """Run one eval forward with hooks on every module and record each call's shapes, in the
    order calls finish.

    Meta models run on meta tensors; a model with real weights runs on real zeros (whatever made
    fx fail, value-dependent code among it, runs as it would for a user).
    """
    calls: list[ModuleCall] = []

    def hook(path):
        def fn(module, args, output):
            first = args[0] if args else None
            calls.append(ModuleCall(path, len(calls), shape_of(first), shape_of(output)))

        return fn

    handles = [module.register_forward_hook(hook(path)) for path, module in model.named_modules() if path]
    try:
        probe_forward(model, input_size, batch, fake=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def find_cut_by_hooks(model: nn.Module, calls: list[ModuleCall], input_size: tuple[int, int, int], arch: str) -> Cut:
    """The cut, from the module calls :func:`probe_modules` recorded.

    The head is the first module call that takes a feature map and returns none, after which no
    module returns a feature map; the cut is its input (climbing to the outermost enclosing
    module that does the same). Without such a module (pooling done by a function), the cut is
    the last module output that is a feature map. ``where`` is a module path, with ``":input"``
    for a module's input."""
    in_hw = tuple(input_size[1:])
    image = (PROBE_BATCH, *input_size)
    grids: list[tuple[int, int]] = []
    outs: list[Feature | None] = []
    ins: list[Feature | None] = []
    for call in calls:
        ins.append(None if call.in_shape == image else feature_of(call.in_shape, in_hw, grids[::-1]))
        feat = feature_of(call.out_shape, in_hw, grids[::-1])
        outs.append(feat)
        if feat is not None and feat.layout != Layout.NLC:
            grids.append(feat.grid)
    if not any(outs) and not any(ins):
        raise CutError(f"{arch} has no module that returns a feature map with spatial or token extent: pass cut=")

    def encloses(outer: str, inner: str) -> bool:
        return inner == outer or inner.startswith(outer + ".")

    where, feat = None, None
    for i, call in enumerate(calls):
        if ins[i] is None or outs[i] is not None:
            continue
        later = any(outs[j] is not None and not encloses(calls[j].path, call.path) for j in range(i + 1, len(calls)))
        if later:
            continue
        where, feat = call.path, ins[i]
        for j in range(i + 1, len(calls)):  # the outermost enclosing module doing the same
            if encloses(calls[j].path, call.path) and ins[j] is not None and outs[j] is None:
                where, feat = calls[j].path, ins[j]
        where = f"{where}:input"
        break
    if where is None:
        last = max(i for i, f in enumerate(outs) if f is not None)
        where, feat = calls[last].path, outs[last]
        module = model.get_submodule(where)
        if isinstance(module, HEAD_LIKE_MODULES) and ins[last] is not None:
            where, feat = f"{where}:input", ins[last]
    return Cut(
        arch=arch,
        where=where,
        nf=feat.nf,
        layout=feat.layout,
        feature_shape=(feat.nf, *feat.grid),
        stride=stride_of(tuple(input_size), feat.grid),
        prefix_tokens=feat.prefix_tokens,
        method="hooks",
        input_size=tuple(input_size),
        dropped=dropped_modules(model, _with_bare_parameters(model, _modules_used(calls, where))),
        after="" if ":" in where else where,
    )


def _with_bare_parameters(model: nn.Module, used: set[str]) -> set[str]:
    """``used``, and the parameters held directly by the model or a module around a used one (a
    class token, a scale on the input): hooks cannot see them used, so they stay with the body."""
    out = set(used)
    for path, module in model.named_modules():
        if not path or any(u == path or u.startswith(path + ".") for u in used):
            out.update(f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False))
    return out


def _modules_used(calls: list[ModuleCall], where: str) -> set[str]:
    """Modules called before the cut, and the cut module itself when the cut is its output."""
    path, _, at = where.partition(":")
    target = next(c for c in calls if c.path == path)
    used = set()
    for c in calls:
        if c.index < target.index or (c.path == path and not at) or c.path.startswith(path + "."):
            if at and c.path.startswith(path + "."):
                continue
            used.add(c.path)
    return used


# --- the body ------------------------------------------------------------------------------


class _Exit(BaseException):
    # BaseException: a model's own ``except Exception`` (a guarded fallback path) must not catch it
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def _raise_output(module, args, output):
    raise _Exit(output)


def _raise_input(module, args):
    raise _Exit(args[0])


_MISSING = object()


class EarlyExitBody(nn.Module):
    """A body for models fx cannot trace: runs the model's own forward and stops at the cut
    (a hook on the cut module raises with the value). Top-level children the cut drops become
    ``nn.Identity``, so the head's parameters are not carried; names are the model's own.

    Args:
        model: the model (its children become the body's, shared).
        cut: a ``"hooks"`` cut of ``model``.
    """

    def __init__(self, model: nn.Module, cut: Cut):
        super().__init__()
        path, _, at = cut.where.partition(":")
        dropped = set(cut.dropped)
        # the model's children become ours, so parameter names stay the model's own
        object.__setattr__(self, "_model_cls", type(model))
        self._model_dict = {k: v for k, v in model.__dict__.items() if k not in ("_modules", "_parameters", "_buffers")}
        for name, child in model.named_children():
            self.add_module(name, child if name not in dropped else nn.Identity())
        for name, p in model.named_parameters(recurse=False):
            if name not in dropped:
                self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.cut_path, self.cut_input = path, at == "input"  # "layer4:input", or the output of "layer4"
        self.to_nchw = ToNCHW(cut.layout, cut.prefix_tokens, cut.grid)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            extra = self.__dict__.get("_model_dict", {})
            if name in extra:
                return extra[name]
            cls = self.__dict__.get("_model_cls", object)
            attr = inspect.getattr_static(cls, name, _MISSING)
            if attr is _MISSING:
                raise
            # the model's own methods (forward_features, ...) and properties, bound to us; constants as they are
            return attr.__get__(self, cls) if hasattr(attr, "__get__") else attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.get_submodule(self.cut_path)
        handle = (
            module.register_forward_pre_hook(_raise_input)
            if self.cut_input
            else module.register_forward_hook(_raise_output)
        )
        try:
            self._model_cls.forward(self, x)
        except _Exit as exit_:
            return self.to_nchw(exit_.value)
        finally:
            handle.remove()
        raise CutError(f"the forward never reached the cut at {self.cut_path!r} for this input")
