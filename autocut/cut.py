"""Find where to cut a model: the last feature map every path to the output goes through, before
the global reduction. No table: everything comes from the traced graph and its shapes.

The rule, on the eval-mode graph traced by :mod:`autocut.trace`:

1. A *feature map* is a value of shape ``(B, C, h, w)``, ``(B, h, w, C)`` or ``(B, L, C)`` tokens
   on a patch grid, with spatial (or token) extent: ``h*w > 1`` or ``L > 1`` besides the prefix
   tokens. ``B`` is the probe batch, an odd prime no other dimension equals.
2. Of the values every path from the input to the output goes through (the dominators of the
   output), the cut is the last feature map.
3. A module that takes a feature map and returns none (an attention pool, SqueezeNet's conv
   classifier, a head with a conv inside) is the head: the cut moves to that module's input.
   So does a cut made of adaptive pooling (VGG's ``avgpool``), dropout or identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from autocut.errors import CutError
from autocut.trace import PROBE_BATCH, ModuleCall, Traced

__all__ = ["Cut", "Feature", "find_cut", "find_cut_by_hooks", "feature_of"]

_MAX_PREFIX = 32  # class + distillation + register tokens


@dataclass(frozen=True)
class Feature:
    """A value read as a feature map: its layout, channels, grid and prefix tokens."""

    layout: str  # "NCHW", "NHWC" or "NLC"
    nf: int
    grid: tuple[int, int]
    prefix_tokens: int = 0


@dataclass(frozen=True)
class Cut:
    """Where a model was cut, and what the body there returns.

    Attributes:
        arch: the model's name (zoo name or class name).
        where: the graph node (torchvision feature-extraction naming, e.g. ``"layer4"`` or
            ``"norm.layer_norm"``) or module path the body ends at.
        nf: channels of the feature map at the cut.
        layout: layout of the value at the cut: ``"NCHW"``, ``"NHWC"`` or ``"NLC"`` (tokens). The
            body always returns NCHW.
        feature_shape: ``(nf, h, w)`` of the body's output at ``input_size``.
        stride: input size / feature size (one number when both axes agree, else ``(sh, sw)``).
        prefix_tokens: class/register/distillation tokens the body drops (token layouts).
        method: how the cut was found: ``"fx"`` (graph on meta/fake tensors), ``"hooks"`` (module
            hooks, for models fx cannot trace) or ``"user"`` (given by the caller).
        input_size: ``(C, H, W)`` the model was probed with.
        dropped: modules with parameters that the body leaves out (the original head).
        groups: for an adapted model's cut, the default layer groups as ``(first module, last
            module, parameter count)`` (see :func:`autocut.layer_groups`); empty otherwise.
        after: the outermost module the body ends with, where the cut is the last thing that
            module computes (``"layer4"`` for a ResNet, fastai's way of saying it); ``""`` where
            the cut is made by the model's own forward between modules.
    """

    arch: str
    where: str
    nf: int
    layout: str
    feature_shape: tuple[int, int, int]
    stride: float | tuple[float, float]
    prefix_tokens: int
    method: str
    input_size: tuple[int, int, int]
    dropped: tuple[str, ...] = ()
    groups: tuple[tuple[str, str, int], ...] = ()
    after: str = ""

    @property
    def grid(self) -> tuple[int, int]:
        return self.feature_shape[1], self.feature_shape[2]

    def __str__(self) -> str:
        stride = "x".join(_fmt(s) for s in self.stride) if isinstance(self.stride, tuple) else _fmt(self.stride)
        lines = [
            f"Cut of {self.arch} at {self.where!r}" + (f", the end of {self.after!r}" if self.after and self.after != self.where
                                                       else "") + f" (found by {self.method})",
            f"  features   {self.nf} channels, {self.feature_shape[1]}x{self.feature_shape[2]} "
            f"(stride {stride}) for input {tuple(self.input_size)}",
            f"  layout     {self.layout}" + (f", {self.prefix_tokens} prefix tokens dropped" if self.prefix_tokens else "")
            + ("" if self.layout == "NCHW" else " -> body returns NCHW"),
            f"  dropped    {', '.join(self.dropped) if self.dropped else '(nothing with parameters)'}",
        ]
        for i, (first, last, count) in enumerate(self.groups):
            span = first if first == last else f"{first} .. {last}"
            lines.append(f"  group {i}    {span} ({count:,} parameters)")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


def stride_of(input_size: tuple[int, int, int], grid: tuple[int, int]) -> float | tuple[float, float]:
    sh, sw = input_size[1] / grid[0], input_size[2] / grid[1]
    sh, sw = (int(s) if float(s).is_integer() else round(s, 3) for s in (sh, sw))
    return sh if sh == sw else (sh, sw)


# --- reading shapes as feature maps ---------------------------------------------------------


def _proportional(h: int, w: int, in_hw: tuple[int, int]) -> bool:
    """Whether an ``h x w`` grid has the input's aspect (to within a cell) and fits inside it."""
    H, W = in_hw
    return 0 < h <= H and 0 < w <= W and abs(w - W * h / H) <= 1 + 1e-6


def _layout4(shape: tuple[int, ...], in_hw: tuple[int, int], hint: str | None) -> str | None:
    _, a, b, c = shape
    nchw, nhwc = _proportional(b, c, in_hw), _proportional(a, b, in_hw)
    if nchw and nhwc:
        return hint or "NCHW"
    if nchw:
        return "NCHW"
    if nhwc:
        return "NHWC"
    return None


def _grid_of_tokens(length: int, grids: list[tuple[int, int]]) -> tuple[tuple[int, int], int] | None:
    """The patch grid and prefix count for ``length`` tokens: the nearest map seen before whose
    cells account for all but a few tokens, else a square grid."""
    for h, w in grids:
        if h * w > 1 and 0 <= length - h * w <= _MAX_PREFIX:
            return (h, w), length - h * w
    for prefix in range(0, 9):
        side = math.isqrt(length - prefix) if length - prefix > 0 else 0
        if side > 1 and side * side == length - prefix:
            return (side, side), prefix
    return None


def feature_of(
    shape: Any,
    in_hw: tuple[int, int],
    grids: list[tuple[int, int]] = (),
    batch: int = PROBE_BATCH,
    hint: str | None = None,
    min_cells: int = 2,
) -> Feature | None:
    """Read ``shape`` as a feature map (``None`` if it is not one). ``grids`` are the spatial
    grids of maps seen before it, nearest first, used to lay tokens on a grid."""
    if not isinstance(shape, tuple) or not shape or not all(isinstance(d, int) for d in shape):
        return None
    if shape[0] != batch or len(shape) not in (3, 4):
        return None
    if len(shape) == 4:
        layout = _layout4(shape, in_hw, hint)
        if layout is None:
            return None
        nf, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
        if nf < 2 or h * w < min_cells:
            return None
        return Feature(layout, nf, (h, w))
    _, length, nf = shape
    if nf < 2 or length < 2:
        return None
    found = _grid_of_tokens(length, list(grids))
    if found is None:
        return None
    grid, prefix = found
    return Feature("NLC", nf, grid, prefix)


# --- the graph rule -------------------------------------------------------------------------


def _carries_tensor(shape: Any) -> bool:
    if isinstance(shape, tuple):
        return True
    return isinstance(shape, list) and any(_carries_tensor(s) for s in shape)


def _dominator_chain(traced: Traced) -> tuple[list[fx.Node], set[fx.Node]]:
    """Nodes every path from the input to the output goes through, in order, and the set of
    nodes on some such path (Cooper-Harvey-Kennedy on the graph's topological order).

    Only tensors carry paths: reading ``x.shape`` to size a class token is not a path."""
    graph, source = traced.graph, traced.input
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    reach = {source}
    for n in nodes[index[source] + 1:]:
        if (n.op == "output" or _carries_tensor(traced.shapes.get(n))) and any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    output = next(n for n in reversed(nodes) if n.op == "output")
    if output not in reach:
        raise CutError("the model's output does not depend on its input")
    idom: dict[fx.Node, fx.Node] = {source: source}

    def meet(a: fx.Node, b: fx.Node) -> fx.Node:
        while a is not b:
            while index[a] > index[b]:
                a = idom[a]
            while index[b] > index[a]:
                b = idom[b]
        return a

    for n in nodes[index[source] + 1:]:
        if n not in reach:
            continue
        preds = [a for a in n.all_input_nodes if a in reach]
        d = preds[0]
        for p in preds[1:]:
            d = meet(p, d)
        idom[n] = d
    chain = [output]
    while chain[-1] is not source:
        chain.append(idom[chain[-1]])
    # keep only nodes that also reach the output
    live = {output}
    for n in reversed(nodes):
        if n in live:
            live.update(a for a in n.all_input_nodes if a in reach)
    return chain[::-1], live


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
_ADAPTIVE_FNS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.adaptive_avg_pool1d}
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def _module_of(traced: Traced, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return traced.model.get_submodule(node.target)
    except AttributeError:
        return None


def _is_head_like_op(traced: Traced, node: fx.Node) -> bool:
    """Adaptive pooling, dropout or identity: ops at the cut that belong to the head."""
    module = _module_of(traced, node)
    if module is not None:
        name = type(module).__name__
        return isinstance(module, _ADAPTIVE_POOLS + _PASS_THROUGH) or name in (
            "SelectAdaptivePool2d",
            "AdaptiveAvgMaxPool2d",
            "AdaptiveCatAvgMaxPool2d",
            "DropPath",
        )
    return node.op == "call_function" and node.target in _ADAPTIVE_FNS


def _features_on_chain(traced: Traced, chain: list[fx.Node]) -> dict[fx.Node, Feature]:
    in_hw = traced.input_shape[2:]
    grids: list[tuple[int, int]] = []
    out: dict[fx.Node, Feature] = {}
    for node in chain:
        if node is traced.input or node.op == "output":
            continue
        hint = _layout_hint(traced, node)
        feat = feature_of(traced.shapes.get(node), in_hw, grids[::-1], hint=hint)
        if feat is not None:
            out[node] = feat
            if feat.layout != "NLC":
                grids.append(feat.grid)
    return out


def _layout_hint(traced: Traced, node: fx.Node) -> str | None:
    module = _module_of(traced, node)
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)):
        return "NCHW"
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return "NHWC"
    if node.op == "call_method" and node.target == "permute":
        dims = tuple(a for a in node.args[1:]) if len(node.args) > 2 else tuple(node.args[1]) if len(node.args) > 1 else ()
        if dims == (0, 2, 3, 1):
            return "NHWC"
        if dims == (0, 3, 1, 2):
            return "NCHW"
    return None


def _scopes_of(traced: Traced, node: fx.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first (the root excluded)."""
    scope = traced.scope.get(node, "")
    parts = scope.split(".") if scope else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _head_module_input(
    traced: Traced, node: fx.Node, chain_features: dict[fx.Node, Feature], live: set[fx.Node]
) -> fx.Node | None:
    """If ``node`` sits inside a module that maps a feature map to no feature map (a head), the
    chain feature map that module consumes."""
    for scope in _scopes_of(traced, node):
        inside = {n for n in live if (s := traced.scope.get(n, "")) == scope or s.startswith(scope + ".")}
        inputs = {a for n in inside for a in n.all_input_nodes if a not in inside and a in live}
        outputs = [n for n in inside if any(u not in inside for u in n.users)]
        feature_inputs = [a for a in inputs if a in chain_features]
        if not feature_inputs or any(_output_is_feature(traced, o) for o in outputs):
            continue
        return max(feature_inputs, key=lambda a: list(chain_features).index(a))
    return None


def _output_is_feature(traced: Traced, node: fx.Node) -> bool:
    return feature_of(traced.shapes.get(node), traced.input_shape[2:]) is not None


def find_cut(traced: Traced, arch: str) -> Cut:
    """Apply the rule (see the module docstring) to a traced model."""
    chain, live = _dominator_chain(traced)
    features = _features_on_chain(traced, chain)
    node = list(features)[-1] if features else None
    deeper = _deeper_branches(traced, live, node, features)
    if node is None or deeper:
        names = ", ".join(repr(traced.qualname.get(n, n.name)) for n in deeper[-4:])
        raise CutError(
            f"{arch} has no single feature map that every path to its output goes through: "
            + (f"its branches only meet after pooling (last maps: {names}). " if deeper else "it has none (an MLP?). ")
            + "Pass cut= a node name, a module path, or a callable model -> body to choose one"
        )
    for _ in range(len(features)):
        moved = _head_module_input(traced, node, features, live)
        if moved is None and _is_head_like_op(traced, node):
            moved = next((a for a in node.all_input_nodes if a in features), None)
        if moved is None or moved is node:
            break
        node = moved
    node = _before_modules_registered_after_the_pool(traced, chain, features, node)
    return _cut_at(traced, node, features[node], arch, method="fx")


def _module_path(traced: Traced, node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else traced.scope.get(node, "")


def _before_modules_registered_after_the_pool(
    traced: Traced, chain: list[fx.Node], features: dict[fx.Node, Feature], node: fx.Node
) -> fx.Node:
    """A module the author registered after the pooling module is part of the head, even when
    it runs on the map before the pool (lowformer's ``in_conv``); efficientnet's ``conv_head``,
    registered before ``global_pool``, stays in the body."""
    after = chain[chain.index(node) + 1:]
    pool = next((n for n in after if n.op != "output"), None)
    pool_path = _module_path(traced, pool) if pool is not None else ""
    if not pool_path:
        return node
    order = {path: i for i, (path, _) in enumerate(traced.model.named_modules())}
    ordered = list(features)
    while True:
        path = _module_path(traced, node)
        nested = pool_path.startswith(path + ".") or path.startswith(pool_path + ".")
        if not path or path not in order or pool_path not in order or nested:
            return node
        if order[path] < order[pool_path]:
            return node
        earlier = ordered[: ordered.index(node)]
        if not earlier:
            return node
        node = earlier[-1]


def _deeper_branches(
    traced: Traced, live: set[fx.Node], node: fx.Node | None, features: dict[fx.Node, Feature]
) -> list[fx.Node]:
    """Feature maps on paths to the output, after ``node``, on a coarser grid than any map every
    path goes through: the model's branches go deeper than its last common map (crossvit, coat)."""
    nodes = list(traced.graph.nodes)
    start = nodes.index(node) + 1 if node is not None else 0
    coarsest = min((f.grid[0] * f.grid[1] for f in features.values()), default=None)
    grids: list[tuple[int, int]] = [f.grid for f in features.values() if f.layout != "NLC"][::-1]
    out = []
    for n in nodes[start:]:
        if n not in live or n is traced.input:
            continue
        feat = feature_of(traced.shapes.get(n), traced.input_shape[2:], grids, hint=_layout_hint(traced, n))
        if feat is None:
            continue
        if feat.layout != "NLC":
            grids.insert(0, feat.grid)
        if coarsest is None or feat.grid[0] * feat.grid[1] < coarsest:
            out.append(n)
    return out


def _cut_at(traced: Traced, node: fx.Node, feat: Feature, arch: str, method: str) -> Cut:
    body = _ancestors(node)
    used = _modules_used(traced, body)
    return Cut(
        arch=arch,
        where=traced.qualname[node],
        nf=feat.nf,
        layout=feat.layout,
        feature_shape=(feat.nf, *feat.grid),
        stride=stride_of(traced.input_shape[1:], feat.grid),
        prefix_tokens=feat.prefix_tokens,
        method=method,
        input_size=tuple(traced.input_shape[1:]),
        dropped=_dropped(traced.model, used),
        after=_module_ending_at(traced, node),
    )


def _module_ending_at(traced: Traced, node: fx.Node) -> str:
    """The outermost module whose every node comes at or before ``node`` in the graph, among the
    modules ``node`` was made in; ``""`` when ``node`` belongs to the model's own forward."""
    last: dict[str, int] = {}
    at = -1
    for i, n in enumerate(traced.graph.nodes):
        if n is node:
            at = i
        scope = traced.scope.get(n, "")
        parts = scope.split(".") if scope else []
        for k in range(1, len(parts) + 1):
            last[".".join(parts[:k])] = i
    scope = traced.scope.get(node, "")
    parts = scope.split(".") if scope else []
    for k in range(1, len(parts) + 1):
        if last.get(".".join(parts[:k])) == at:
            return ".".join(parts[:k])
    return ""


def cut_at_node(traced: Traced, name: str, arch: str, method: str = "user") -> Cut:
    """The cut at a named node (exact node name, or a module path: its last node). A 1x1 map
    is accepted here: a small input can shrink the map a larger one found."""
    node = resolve_node(traced, name)
    chain, _ = _dominator_chain(traced)
    features = _features_on_chain(traced, chain)
    feat = features.get(node)
    if feat is None:
        grids = [f.grid for f in features.values() if f.layout != "NLC"][::-1]
        hint = _layout_hint(traced, node)
        feat = feature_of(traced.shapes.get(node), traced.input_shape[2:], grids, hint=hint, min_cells=1)
    if feat is None:
        raise CutError(
            f"{name!r} in {arch} gives shape {traced.shapes.get(node)}, not a feature map "
            f"(B, C, h, w), (B, h, w, C) or (B, tokens, C) with spatial extent: pick an earlier node"
        )
    return _cut_at(traced, node, feat, arch, method=method)


def resolve_node(traced: Traced, name: str) -> fx.Node:
    """A node by its exact name, or the last node of the module at path ``name``."""
    exact = traced.node_named(name)
    if exact is not None:
        return exact
    last = None
    for node, qual in traced.qualname.items():
        if qual.startswith(name + "."):
            last = node
    if last is None:
        names = list(traced.qualname.values())
        import difflib

        close = difflib.get_close_matches(name, names, n=5)
        raise CutError(
            f"no node or module {name!r} in the traced graph"
            + (f"; close: {', '.join(close)}" if close else "")
            + " (pass a node name from autocut.trace.trace(model, size).qualname, a module path, an int or a callable)"
        )
    return last


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _modules_used(traced: Traced, nodes: set[fx.Node]) -> set[str]:
    return {str(n.target) for n in nodes if n.op in ("call_module", "get_attr")}


def _dropped(model: nn.Module, used: set[str]) -> tuple[str, ...]:
    """The outermost modules (or bare parameters) whose parameters the body does not use.
    Compared by identity: a module reached under two names is used under both."""
    kept: set[int] = set()
    for path in used:
        try:
            target = model.get_submodule(path)
            kept.update(id(p) for p in target.parameters())
        except AttributeError:
            try:
                kept.add(id(model.get_parameter(path)))
            except AttributeError:
                pass
    dropped: list[str] = []

    def visit(prefix: str, module: nn.Module):
        for name, child in module.named_children():
            params = [id(p) for p in child.parameters()]
            if not params or all(p in kept for p in params):
                continue
            if any(p in kept for p in params):
                visit(f"{prefix}{name}.", child)
            else:
                dropped.append(f"{prefix}{name}")
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in kept:
                dropped.append(f"{prefix}{name}")

    visit("", model)
    return tuple(dropped)


# --- the hook rule (fallback) ---------------------------------------------------------------


def find_cut_by_hooks(model: nn.Module, calls: list[ModuleCall], input_size: tuple[int, int, int], arch: str) -> Cut:
    """The same rule on module calls, for models fx cannot trace.

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
        if feat is not None and feat.layout != "NLC":
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
        if isinstance(module, _ADAPTIVE_POOLS + _PASS_THROUGH) and ins[last] is not None:
            where, feat = f"{where}:input", ins[last]
    used = _hook_modules_used(calls, where)
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
        dropped=_dropped(model, used),
        after="" if ":" in where else where,
    )


def _hook_modules_used(calls: list[ModuleCall], where: str) -> set[str]:
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
