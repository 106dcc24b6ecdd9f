"""The graph rule: where to cut a traced model. No table: everything comes from the traced
graph (:mod:`autocut.trace`) and its shapes.

The rule, on the eval-mode graph:

1. A *feature map* is a value of shape ``(B, C, h, w)``, ``(B, h, w, C)`` or ``(B, L, C)`` tokens
   on a patch grid, with spatial (or token) extent: ``h*w > 1`` or ``L > 1`` besides the prefix
   tokens (:func:`autocut.layout.feature_of`). ``B`` is the probe batch, an odd prime no other
   dimension equals.
2. Of the values every path from the input to the output goes through (the dominators of the
   output), the cut is the last feature map.
3. A module that takes a feature map and returns none (an attention pool, SqueezeNet's conv
   classifier, a head with a conv inside) is the head: the cut moves to that module's input.
   So does a cut made of adaptive pooling (VGG's ``avgpool``), dropout or identity.
4. Ops such a head runs on the map before anything that mixes channels or changes its shape (an
   activation, a per-channel norm or scale: ``class_layers.relu`` before ``class_layers.pool``)
   still make the map: the cut moves past them, and the body keeps them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from autocut.cut import HEAD_LIKE_MODULES, Cut, dropped_modules, stride_of
from autocut.errors import CutError
from autocut.layout import LAYOUT_OPS, Feature, Layout, feature_of, per_channel
from autocut.trace import Traced, op_name

__all__ = ["find_cut", "cut_at_node", "resolve_node", "ancestors", "layout_hint", "node_op", "carries_tensor", "scopes_of",
           "nodes_in", "modules_ending"]


def carries_tensor(shape: Any) -> bool:
    """Whether a recorded shape (:func:`autocut.probe.shape_of`) is a tensor's or holds one:
    reading ``x.shape`` to size a class token makes an int, which carries no dependence."""
    if isinstance(shape, tuple):
        return True
    return isinstance(shape, list) and any(carries_tensor(s) for s in shape)


def _dominator_chain(traced: Traced) -> tuple[list[fx.Node], set[fx.Node]]:
    """Nodes every path from the input to the output goes through, in order, and the set of
    nodes on some such path (Cooper-Harvey-Kennedy on the graph's topological order).

    Only tensors carry paths: reading ``x.shape`` to size a class token is not a path."""
    graph, source = traced.graph, traced.input
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    reach = {source}
    for n in nodes[index[source] + 1:]:
        if (n.op == "output" or carries_tensor(traced.shapes.get(n))) and any(a in reach for a in n.all_input_nodes):
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


_HEAD_LIKE_NAMES = ("SelectAdaptivePool2d", "AdaptiveAvgMaxPool2d", "AdaptiveCatAvgMaxPool2d", "DropPath")  # timm's
_ADAPTIVE_FNS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.adaptive_avg_pool1d}
# the same ops in an exported graph (ATen), where every module is inlined
_HEAD_LIKE_OPS = frozenset({"adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool1d",
                            "adaptive_max_pool1d", "dropout", "feature_dropout", "alpha_dropout", "native_dropout"})
_NCHW_OPS = frozenset({"conv2d", "convolution", "batch_norm", "_native_batch_norm_legit_no_training", "max_pool2d",
                       "avg_pool2d", "max_pool2d_with_indices"})
_LAST_DIM_OPS = frozenset({"linear", "layer_norm", "native_layer_norm"})


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
        return isinstance(module, HEAD_LIKE_MODULES) or type(module).__name__ in _HEAD_LIKE_NAMES
    return node.op == "call_function" and (node.target in _ADAPTIVE_FNS or op_name(node) in _HEAD_LIKE_OPS)


def _features_on_chain(traced: Traced, chain: list[fx.Node]) -> dict[fx.Node, Feature]:
    """The maps on ``chain``: not the image itself, nor what only re-lays or casts it (an exported
    forward's ``pixel_values.to(dtype)``)."""
    in_hw = traced.input_shape[2:]
    grids: list[tuple[int, int]] = []
    out: dict[fx.Node, Feature] = {}
    image = {traced.input}
    for node in chain:
        if node in image or node.op == "output":
            continue
        tensors = [a for a in node.all_input_nodes if carries_tensor(traced.shapes.get(a))]
        if tensors and all(a in image for a in tensors) and node_op(traced, node) in LAYOUT_OPS:
            image.add(node)
            continue
        feat = feature_of(traced.shapes.get(node), in_hw, grids[::-1], hint=layout_hint(traced, node))
        if feat is not None:
            out[node] = feat
            if feat.layout != Layout.NLC:
                grids.append(feat.grid)
    return out


def node_op(traced: Traced, node: fx.Node) -> str:
    """What ``node`` computes, by name: a module's class (``"clone"`` for identity and dropout),
    a function's or method's name, an ATen op's (``"conv2d"``); else the node's kind."""
    if node.op == "call_module":
        module = traced.model.get_submodule(str(node.target))
        return "clone" if isinstance(module, (nn.Identity, nn.Dropout)) else type(module).__name__
    if node.op in ("call_function", "call_method"):
        target = node.target
        return target if isinstance(target, str) else op_name(node) or getattr(target, "__name__", str(target))
    return node.op


def layout_hint(traced: Traced, node: fx.Node) -> Layout | None:
    """The layout ``node``'s op implies, for a shape that reads both ways (``(B, 7, 7, 7)``):
    convolutions and 2-d norms and pools work on NCHW, Linear and LayerNorm on the last dim."""
    module = _module_of(traced, node)
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)):
        return Layout.NCHW
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return Layout.NHWC
    aten = op_name(node)
    if aten in _NCHW_OPS:
        return Layout.NCHW
    if aten in _LAST_DIM_OPS:
        return Layout.NHWC
    if (node.op == "call_method" and node.target == "permute") or aten == "permute":
        dims = tuple(a for a in node.args[1:]) if len(node.args) > 2 else tuple(node.args[1]) if len(node.args) > 1 else ()
        if dims == (0, 2, 3, 1):
            return Layout.NHWC
        if dims == (0, 3, 1, 2):
            return Layout.NCHW
    return None


def nodes_in(traced: Traced, path: str, among: Iterable[fx.Node] | None = None) -> set[fx.Node]:
    """The nodes made inside the module at ``path`` (its submodules included), of ``among`` where given."""
    nodes = traced.scope if among is None else among
    return {n for n in nodes if (s := traced.scope.get(n, "")) == path or s.startswith(path + ".")}


def scopes_of(traced: Traced, node: fx.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first (the root excluded)."""
    scope = traced.scope.get(node, "")
    parts = scope.split(".") if scope else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _head_module_input(
    traced: Traced, node: fx.Node, chain_features: dict[fx.Node, Feature], live: set[fx.Node]
) -> fx.Node | None:
    """If ``node`` sits inside a module that maps a feature map to no feature map (a head), the
    chain feature map that module consumes."""
    for scope in scopes_of(traced, node):
        inside = nodes_in(traced, scope, live)
        inputs = {a for n in inside for a in n.all_input_nodes if a not in inside and a in live}
        outputs = [n for n in inside if any(u not in inside for u in n.users)]
        feature_inputs = [a for a in inputs if a in chain_features]
        if not feature_inputs or any(_output_is_feature(traced, o, chain_features) for o in outputs):
            continue
        return max(feature_inputs, key=lambda a: list(chain_features).index(a))
    return None


def _output_is_feature(traced: Traced, node: fx.Node, chain_features: dict[fx.Node, Feature]) -> bool:
    """Whether a module's output is a map: tokens on a grid the chain's maps were seen on count
    (ViTPose's 16x12 patches at 256x192), as they do on the chain."""
    if node in chain_features:
        return True
    grids = [f.grid for f in chain_features.values() if f.layout != Layout.NLC][::-1]
    return feature_of(traced.shapes.get(node), traced.input_shape[2:], grids) is not None


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
    head_input = None
    for _ in range(len(features)):
        moved = _head_module_input(traced, node, features, live)
        if moved is not None and moved is not node:
            head_input = moved
        elif moved is None and _is_head_like_op(traced, node):
            moved = next((a for a in node.all_input_nodes if a in features), None)
        if moved is None or moved is node:
            break
        node = moved
    if node is head_input:
        node = _through_per_channel_ops(traced, chain, features, node)
    node = _before_modules_registered_after_the_pool(traced, chain, features, node)
    return _cut_at(traced, node, features[node], arch, method="fx")


def _through_per_channel_ops(traced: Traced, chain: list[fx.Node], features: dict[fx.Node, Feature], node: fx.Node) -> fx.Node:
    """The last map on ``chain`` that per-channel ops make of ``node``'s, one after another: a head
    that starts with an activation or a norm (MONAI's ``class_layers.relu``) before its pool runs
    them on the map, which the body keeps; a conv, a Linear or attention (SqueezeNet's classifier,
    an attention pool) is where the head starts."""
    shape, feat = traced.shapes.get(node), features[node]
    made = {node}  # node, and what per-channel ops made of it alone
    nodes = list(traced.graph.nodes)
    for n in nodes[nodes.index(node) + 1:]:
        if traced.shapes.get(n) != shape or _is_head_like_op(traced, n):
            continue
        tensors = [a for a in n.all_input_nodes if carries_tensor(traced.shapes.get(a))]
        if any(a in made for a in tensors) and _is_per_channel_op(traced, n, feat) and all(
            a in made or _is_constant(traced, a, shape, feat.layout) for a in tensors
        ):
            made.add(n)
    for n in chain[chain.index(node) + 1:]:
        if n not in made:
            break
        node = n
    return node


def _is_per_channel_op(traced: Traced, node: fx.Node, feat: Feature) -> bool:
    """A function, or a module whose parameters and buffers are per-channel (a norm, a PReLU, a
    scale) or that has none (an activation): a conv or a Linear holds a weight of ``nf * nf``."""
    if node.op != "call_module":  # a function: per-channel unless it reads a weight (an exported graph's linear)
        return node.op in ("call_function", "call_method") and all(
            _numel(traced.shapes.get(a)) <= feat.nf for a in node.all_input_nodes if a.op == "get_attr")
    module = _module_of(traced, node)
    return module is not None and all(t.numel() <= feat.nf for t in (*module.parameters(), *module.buffers()))


def _numel(shape: Any) -> int:
    return int(torch.Size(shape).numel()) if isinstance(shape, tuple) else 0


def _is_constant(traced: Traced, node: fx.Node, map_shape: tuple[int, ...], layout: Layout) -> bool:
    """A value made of parameters and buffers alone, per channel of the map (a norm's weight,
    a ``(1, C, 1, 1)`` scale): not computed from the input, as a mask or a gate is."""
    shape = traced.shapes.get(node)
    if not isinstance(shape, tuple) or not per_channel(shape, map_shape, layout):
        return False
    return all(a.op == "get_attr" for a in ancestors(node) if a.op not in ("call_function", "call_method"))


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
        # the pool's own module running ops before its pool function is not a module after the pool
        nested = path == pool_path or pool_path.startswith(path + ".") or path.startswith(pool_path + ".")
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
    grids: list[tuple[int, int]] = [f.grid for f in features.values() if f.layout != Layout.NLC][::-1]
    out = []
    for n in nodes[start:]:
        if n not in live or n is traced.input:
            continue
        feat = feature_of(traced.shapes.get(n), traced.input_shape[2:], grids, hint=layout_hint(traced, n))
        if feat is None:
            continue
        if feat.layout != Layout.NLC:
            grids.insert(0, feat.grid)
        if coarsest is None or feat.grid[0] * feat.grid[1] < coarsest:
            out.append(n)
    return out


def _cut_at(traced: Traced, node: fx.Node, feat: Feature, arch: str, method: str) -> Cut:
    used = _modules_used(traced, ancestors(node))
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
        dropped=dropped_modules(traced.model, used),
        after=_module_ending_at(traced, node),
    )


def _module_ending_at(traced: Traced, node: fx.Node) -> str:
    """The outermost module whose every node comes at or before ``node`` in the graph, among the
    modules ``node`` was made in; ``""`` when ``node`` belongs to the model's own forward."""
    return (modules_ending(traced).get(node) or [""])[0]


def modules_ending(traced: Traced) -> dict[fx.Node, list[str]]:
    """For each node, the modules whose last node it is, outermost first."""
    last: dict[str, fx.Node] = {}
    for node in traced.graph.nodes:
        for scope in scopes_of(traced, node):
            last[scope] = node
    out: dict[fx.Node, list[str]] = {}
    for scope, node in last.items():  # an enclosing module is first seen no later than the modules inside it
        out.setdefault(node, []).append(scope)
    return out


def cut_at_node(traced: Traced, name: str, arch: str, method: str = "user") -> Cut:
    """The cut at a named node (exact node name, or a module path: its last node). A 1x1 map
    is accepted here: a small input can shrink the map a larger one found."""
    node = resolve_node(traced, name)
    chain, _ = _dominator_chain(traced)
    features = _features_on_chain(traced, chain)
    feat = features.get(node)
    if feat is None:
        grids = [f.grid for f in features.values() if f.layout != Layout.NLC][::-1]
        hint = layout_hint(traced, node)
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
        close = difflib.get_close_matches(name, names, n=5)
        raise CutError(
            f"no node or module {name!r} in the traced graph"
            + (f"; close: {', '.join(close)}" if close else "")
            + " (pass a node name from autocut.trace.trace(model, size).qualname, a module path, an int or a callable)"
        )
    return last


def ancestors(node: fx.Node, *more: fx.Node) -> set[fx.Node]:
    """``node`` (and ``more``) and every node they are computed from."""
    seen, stack = {node, *more}, [node, *more]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _modules_used(traced: Traced, nodes: set[fx.Node]) -> set[str]:
    return {str(n.target) for n in nodes if n.op in ("call_module", "get_attr")}
