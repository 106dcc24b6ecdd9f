"""The hooks rule, for models fx cannot trace (data-dependent control flow, unsupported Python):
the probe, the rule and the body, all on module calls instead of graph nodes.

- :func:`probe_modules` runs one forward with a hook on every module and records each call's input
  and output shapes, in the order calls finish; a structured output (a tuple, a dict, a
  dataclass, transformers' ``ModelOutput``) is read as the tensors inside it, by key.
- :func:`find_cut_by_hooks` applies the graph rule's idea to those calls: the head is the first
  module that takes a feature map and returns none, after which no module returns a feature map;
  the cut is its input.
- :class:`EarlyExitBody` runs the model's own forward and stops it at the cut.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autocut.cut import HEAD_LIKE_MODULES, Cut, dropped_modules, stride_of
from autocut.errors import CutError
from autocut.layout import Feature, Layout, ToNCHW, feature_of
from autocut.probe import PROBE_BATCH, first_input, leaf_at, meta_first, probe_forward, shape_of, shapes_inside, tensor_leaves
from autocut.trace import forward_of

__all__ = ["ModuleCall", "probe_modules", "find_cut_by_hooks", "move_cut", "dropped_by", "EarlyExitBody", "levels_by_hooks"]


@dataclass
class ModuleCall:
    """One call of a module during a hooked forward: its path, the shape of its first input and
    of its output (a tensor's shape, or ``{key: shape}`` of the tensors inside a structured
    output, see :func:`autocut.probe.shapes_inside`)."""

    path: str
    index: int
    in_shape: Any
    out_shape: Any
    out_ids: dict[str, int] = field(default_factory=dict)  # key -> id() of each tensor returned, while the probe ran
    in_view_of: int | None = None  # id() of the tensor the first input is a re-laid view of (a transpose), if it is


def probe_modules(model: nn.Module, input_size: tuple[int, int, int], batch: int = PROBE_BATCH) -> list[ModuleCall]:
    """Run one eval forward with hooks on every module and record each call's shapes, in the
    order calls finish.

    Meta models run on meta tensors; a model with real weights on meta stand-ins of its weights
    (:func:`autocut.probe.meta_first`), and where that fails on real zeros (whatever made fx fail,
    value-dependent code among it, runs as it would for a user).
    """
    calls: list[ModuleCall] = []
    alive: list[torch.Tensor] = []  # every tensor returned, so that no id is reused during the probe

    def hook(path):
        def fn(module, args, kwargs, output):
            leaves = tensor_leaves(output)
            alive.extend(t for _, t in leaves)
            ids = {key: id(t) for key, t in leaves}
            first = first_input(args, kwargs)
            base = getattr(first, "_base", None)
            relaid = isinstance(base, torch.Tensor) and (base.shape, base.stride()) != (first.shape, first.stride())
            view_of = id(base) if relaid else None
            calls.append(ModuleCall(path, len(calls), shape_of(first), shapes_inside(output), ids, view_of))

        return fn

    # the model itself too (path ""): a backbone's own output is the last map it makes
    handles = [module.register_forward_hook(hook(path), with_kwargs=True) for path, module in model.named_modules()]
    def clear() -> None:
        calls.clear()
        alive.clear()

    try:
        meta_first(model, lambda: probe_forward(model, input_size, batch, fake=False), before_real=clear)
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
    for a module's input, or ``":KEY"`` for the tensor ``KEY`` inside a structured output
    (``"resnet.encoder:last_hidden_state"``); of the maps in a structured output, the one made
    last is the cut (the first of equals: ``last_hidden_state`` before ``hidden_states``)."""
    in_hw = tuple(input_size[1:])
    image = (PROBE_BATCH, *input_size)
    grids: list[tuple[int, int]] = []
    outs: list[Feature | None] = []
    maps: list[list[tuple[str, Feature]]] = []  # the maps in each output, by key ("" for a tensor output)
    ins: list[Feature | None] = []
    for call in calls:
        ins.append(None if call.in_shape == image else feature_of(call.in_shape, in_hw, grids[::-1]))
        found = _features(call.out_shape, in_hw, grids[::-1])
        if not call.path and found and not found[0][0]:
            found = []  # a model that returns a bare map is cut where a module made it, as before
        maps.append(found)
        outs.append(found[0][1] if found else None)
        if found and found[0][1].layout != Layout.NLC:
            grids.append(found[0][1].grid)
    if not any(outs) and not any(ins):
        raise CutError(f"{arch} has no module that returns a feature map with spatial or token extent: pass cut=")

    def encloses(outer: str, inner: str) -> bool:
        return inner == outer or _inside(outer, inner)

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
        where, feat = _where_viewed(calls, i, maps, where, feat)
        break
    if where is None:
        last = max(i for i, f in enumerate(outs) if f is not None)
        where, feat = calls[last].path, outs[last]
        module = model.get_submodule(where)
        if isinstance(module, HEAD_LIKE_MODULES) and ins[last] is not None:
            where, feat = f"{where}:input", ins[last]
        elif maps[last][0][0]:  # a structured output: its map made last, where it was made
            key, feat = _made_last(calls, last, maps[last])
            where = _innermost_returning(calls, last, key)
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
        dropped=dropped_by(model, calls, where),
        after="" if ":" in where else where,
    )


def move_cut(model: nn.Module, calls: list[ModuleCall], cut: Cut, where: str) -> Cut:
    """``cut`` moved to ``where`` (a module's output or ``":input"``) holding a map of the same
    shape: where :func:`autocut.cut_check.check_module_cut` found per-channel ops (a head's
    ReLU) that run on the map after ``cut`` and end at a module call (``CutCheck.move_to``)."""
    return dataclasses.replace(
        cut, where=where, after="" if ":" in where else where,
        dropped=dropped_by(model, calls, where),
    )


def _inside(outer: str, inner: str) -> bool:
    """Whether module path ``inner`` is strictly inside ``outer`` (``""``, the model, holds all)."""
    return inner != outer and (outer == "" or inner.startswith(outer + "."))


def _innermost_returning(calls: list[ModuleCall], last: int, key: str) -> str:
    """Where the tensor ``key`` of call ``last``'s output was made: the module inside it that
    returned that same tensor last (a stack's ``last_hidden_state`` is its final norm's output),
    so that the body stops there and leaves out what the outer module computes after it (a pooler)."""
    outer, made = calls[last], calls[last].out_ids.get(key)
    for call in reversed(calls[:last]):
        if made is None or not _inside(outer.path, call.path):
            continue
        inner_key = next((k for k, i in call.out_ids.items() if i == made), None)
        if inner_key is not None:
            return f"{call.path}:{inner_key}" if inner_key else call.path
    return f"{outer.path}:{key}" if key else outer.path


def _where_viewed(calls: list[ModuleCall], head: int, maps: list[list[tuple[str, Feature]]], where: str,
                  feat: Feature) -> tuple[str, Feature]:
    """A head whose input re-lays a map a module returned (``(B, C, L)``, transposed to pool
    it) is cut at that module's output instead: its layout is the map's own, where a re-laid
    one can read two ways (``C == L``)."""
    view_of = calls[head].in_view_of
    for j in range(head - 1, -1, -1):
        if view_of is None:
            break
        for key, found in maps[j]:
            if calls[j].out_ids.get(key) == view_of:
                return (f"{calls[j].path}:{key}" if key else calls[j].path), found
    return where, feat


def _made_last(calls: list[ModuleCall], last: int, found: list[tuple[str, Feature]]) -> tuple[str, Feature]:
    """Of the maps in call ``last``'s structured output, the one made last: by the module inside
    it that finished last, or by its own code (after all of them); the first of equals."""
    outer = calls[last]

    def made_at(key: str) -> int:
        made = outer.out_ids.get(key)
        for call in reversed(calls[:last]):
            if _inside(outer.path, call.path) and made in call.out_ids.values():
                return call.index
        return outer.index

    return max(found, key=lambda kf: made_at(kf[0]))


def _features(shapes: Any, in_hw: tuple[int, int], grids: list[tuple[int, int]]) -> list[tuple[str, Feature]]:
    """The key and reading of each feature map in a call's output shapes (key ``""`` for a
    tensor output), in order."""
    items = shapes.items() if isinstance(shapes, dict) else [("", shapes)]
    return [(key, feat) for key, shape in items if (feat := feature_of(shape, in_hw, grids)) is not None]


def levels_by_hooks(model: nn.Module, calls: list[ModuleCall], cut: Cut, n: int) -> list[Cut]:
    """A pyramid's levels from module calls, for a model only hooks can cut (no graph to read
    strides off): where every map before the cut is on the cut's grid (a ViT), ``n`` levels at
    evenly spaced depths over the outputs of its most repeated blocks (the children of one module
    called once each: ``blocks.0`` .. ``blocks.11``), the last the cut; the cut alone where it
    repeats no block.

    Raises:
        CutError: a map before the cut is on another grid: several strides, which only a graph
            tells apart from branches.
    """
    in_hw = tuple(cut.input_size[1:])
    counts: dict[str, int] = {}
    for call in calls:
        counts[call.path] = counts.get(call.path, 0) + 1
    grids: list[tuple[int, int]] = []  # the grids of the maps so far, nearest first: tokens are laid on them
    path, _, at = cut.where.partition(":")
    end = next((i for i, call in enumerate(calls) if call.path == path), len(calls))
    if at == "input":  # calls finish in order: the module's own children, just before it, run after its input
        while end > 0 and calls[end - 1].path.startswith(path + "."):
            end -= 1
    families: dict[str, list[tuple[str, Feature]]] = {}
    for call in calls[:end]:
        found = _features(call.out_shape, in_hw, grids)
        grids[:0] = [feat.grid for _, feat in found[:1] if feat.layout != Layout.NLC]
        for key, feat in found:
            if feat.grid != cut.grid:
                raise CutError(f"{cut.arch} was cut by hooks ({cut.where!r}): neither fx nor an ATen recording could capture its "
                               f"graph, and {call.path or 'its forward'!r} returns a map on a {feat.grid[0]}x{feat.grid[1]} "
                               f"grid before its {cut.grid[0]}x{cut.grid[1]} cut: several strides, which only a graph "
                               "tells from branches. Make its forward traceable, or use create_body for the last map")
            parent, _, child = call.path.rpartition(".")
            if call.path and counts[call.path] == 1 and child.isdigit():
                families.setdefault(parent, []).append((f"{call.path}:{key}" if key else call.path, feat))
                break
    blocks = max(families.values(), key=len, default=[])
    if len(blocks) < 2:
        return [cut]
    n = min(n, len(blocks))
    picked = [blocks[round((k + 1) * len(blocks) / n) - 1] for k in range(n - 1)]
    levels = [dataclasses.replace(cut, where=where, after="" if ":" in where else where, nf=feat.nf, layout=feat.layout,
                                  feature_shape=(feat.nf, *feat.grid), prefix_tokens=feat.prefix_tokens,
                                  stride=stride_of(tuple(cut.input_size), feat.grid), dropped=dropped_by(model, calls, where))
              for where, feat in dict(picked).items()]
    return [*levels, cut]


def dropped_by(model: nn.Module, calls: list[ModuleCall], where: str) -> tuple[str, ...]:
    """What a body cut at ``where`` leaves out: what runs after the cut, but never a module around
    the cut, whose forward the body runs up to it (``head`` for ``"head.pool:input"``: its ``fc``)."""
    parts = where.partition(":")[0].split(".")
    around = {".".join(parts[:k]) for k in range(1, len(parts))}
    used = _with_bare_parameters(model, _modules_used(calls, where) | around) - around
    return dropped_modules(model, used, around)


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
        if c.index < target.index or (c.path == path and at != "input") or _inside(path, c.path):
            if at == "input" and _inside(path, c.path):
                continue
            used.add(c.path)
    return used - {""}


# --- the body ------------------------------------------------------------------------------


class _Exit(BaseException):
    # BaseException: a model's own ``except Exception`` (a guarded fallback path) must not catch it
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def _exit_of(cut: Cut) -> tuple[str, bool, str]:
    """Where a hooks or export cut stops: the module path, whether at its input, and the key of
    the tensor in its structured output (``""``: the output itself)."""
    path, _, at = cut.where.partition(":")
    return path, at == "input", "" if at == "input" else at


def _keep(values: dict[int, Any], i: int, at_input: bool, key: str, stop: bool):
    """A hook that keeps the value at exit ``i`` (its first call) in ``values``; at the deepest
    (``stop``) it ends the forward there."""

    def seen(value: Any) -> None:
        if stop:
            raise _Exit(value)
        values.setdefault(i, value)

    if at_input:
        return lambda module, args, kwargs: seen(first_input(args, kwargs))
    return lambda module, args, output: seen(leaf_at(output, key) if key else output)


_MISSING = object()


class EarlyExitBody(nn.Module):
    """A body for models fx cannot trace: runs the model's own forward (the one set on the instance,
    where there is one: :func:`autocut.trace.forward_of`) and stops at the cut
    (a hook on the cut module raises with the value). Top-level children the cut drops become
    ``nn.Identity``, so the head's parameters are not carried; names are the model's own.

    Args:
        model: the model (its children become the body's, shared).
        cut: a ``"hooks"`` or ``"export"`` cut of ``model``; or a list of them, shallow to deep (a
            pyramid's levels): ``forward`` then returns a map per cut, each kept as the model's
            forward passes it, and stops at the deepest.
    """

    def __init__(self, model: nn.Module, cut: Cut | list[Cut]):
        super().__init__()
        cuts = list(cut) if isinstance(cut, (list, tuple)) else [cut]
        deepest = cuts[-1]
        dropped = set(deepest.dropped)
        # the model's children become ours, so parameter names stay the model's own
        object.__setattr__(self, "_model_cls", type(model))
        # what model(x) runs: the class's forward, or one set on the instance (which the class's may not match)
        object.__setattr__(self, "_model_forward", forward_of(model))
        extra = {k: v for k, v in model.__dict__.items() if k not in ("_modules", "_parameters", "_buffers", "forward")}
        # methods bound on the instance (features(), logits()) are bound to us instead, as the class's are
        self._model_methods = {k: v.__func__ for k, v in extra.items() if isinstance(v, types.MethodType) and v.__self__ is model}
        self._model_dict = {k: v for k, v in extra.items() if k not in self._model_methods}
        for name, child in model.named_children():
            self.add_module(name, child if name not in dropped else nn.Identity())
        for name, p in model.named_parameters(recurse=False):
            if name not in dropped:
                self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        # "layer4:input", the output of "layer4", or the tensor "last_hidden_state" in "encoder"'s output
        self._exits = [_exit_of(c) for c in cuts]
        for level, (path, _, _) in zip(cuts[:-1], self._exits):
            if not path:
                raise CutError(f"the level at {level.where!r} is in the model's own output: only the deepest can be")
        self.cut_path, self.cut_input, self.cut_key = self._exits[-1]
        self.to_nchw = ToNCHW(deepest.layout, deepest.prefix_tokens, deepest.grid)
        self._as_list = isinstance(cut, (list, tuple))
        if self._as_list:  # a pyramid: a map per cut, shallow to deep
            self.level_to_nchw = nn.ModuleList([ToNCHW(c.layout, c.prefix_tokens, c.grid) for c in cuts[:-1]])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            extra = self.__dict__.get("_model_dict", {})
            if name in extra:
                return extra[name]
            method = self.__dict__.get("_model_methods", {}).get(name)
            if method is not None:
                return types.MethodType(method, self)
            cls = self.__dict__.get("_model_cls", object)
            attr = inspect.getattr_static(cls, name, _MISSING)
            if attr is _MISSING:
                raise
            # the model's own methods (forward_features, ...) and properties, bound to us; constants as they are
            return attr.__get__(self, cls) if hasattr(attr, "__get__") else attr

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        values: dict[int, Any] = {}
        last = len(self._exits) - 1
        handles = []
        for i, (path, at_input, key) in enumerate(self._exits):
            if not path:  # a map in the model's own (structured) output: a backbone's
                continue
            module = self.get_submodule(path)
            hook = _keep(values, i, at_input, key, stop=i == last)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if at_input
                           else module.register_forward_hook(hook))
        try:
            out = self._model_forward(self, x)
            if self.cut_path:
                raise CutError(f"the forward never reached the cut at {self.cut_path!r} for this input")
            values[last] = leaf_at(out, self.cut_key)
        except _Exit as exit_:
            values[last] = exit_.value
        finally:
            for handle in handles:
                handle.remove()
        if not self._as_list:
            return self.to_nchw(values[last])
        missing = [self._exits[i][0] for i in range(last) if i not in values]
        if missing:
            raise CutError(f"the forward never reached the level(s) at {', '.join(map(repr, missing))} for this input")
        return [*(to_nchw(values[i]) for i, to_nchw in enumerate(self.level_to_nchw)), self.to_nchw(values[last])]
