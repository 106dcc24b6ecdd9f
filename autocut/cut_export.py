"""The graph rule on models torch.fx cannot trace: found on the forward's graph of ATen ops, made
with module hooks.

A model fx cannot trace (Hugging Face's forwards: decorators, ``**kwargs`` plumbing, structured
outputs built in Python) still runs, and one meta forward is recorded op by op
(:func:`autocut.trace.trace_aten`: :func:`~autocut.trace.trace_dispatched`, else torch.export's
:func:`~autocut.trace.trace_exported`). The graph rule (:func:`autocut.cut_graph.find_cut`:
dominators, the last map) runs on that graph as on an fx one, and its check
(:func:`autocut.cut_check.check_graph_cut`) with it. Such a graph is of ATen ops for one input
shape, so the body is not made from it: the node the rule found is named
as a module's output (``"encoder:last_hidden_state"``, ``"layernorm"``) or input
(``"pooler:input"``), which :class:`~autocut.cut_hooks.EarlyExitBody` stops the model's own
forward at, and that cut is checked once more on the eager forward
(:func:`autocut.cut_check.check_module_cut`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from torch import fx, nn

from autocut.cut import Cut
from autocut.cut_graph import carries_tensor, cut_at_node, layout_hint, nodes_in, scopes_of
from autocut.cut_hooks import ModuleCall, dropped_by
from autocut.errors import CutError
from autocut.layout import LAYOUT_OPS, feature_of
from autocut.trace import Traced, op_name

__all__ = ["module_cut"]


def module_cut(model: nn.Module, traced: Traced, cut: Cut, calls: list[ModuleCall]) -> Cut:
    """``cut``, found on the exported graph ``traced`` at a node, as a cut at a module's output or
    input that module hooks can stop at, with ``method="export"``.

    Of the modules the node was made in, the outermost that returns it and nothing else (the
    one tensor of that shape in a structured output: ``"encoder:last_hidden_state"``); else the
    outermost module that takes it (``"pooler:input"``); each called once (``calls``, from
    :func:`autocut.cut_hooks.probe_modules`, say what each call returned).

    Raises:
        CutError: the node is made and used by the model's own code between module calls.
    """
    node = traced.node_named(cut.where)
    if node is None:
        raise CutError(f"no node {cut.where!r} in the exported graph of {cut.arch}")
    counts = Counter(call.path for call in calls)
    by_path = {call.path: call for call in calls if counts[call.path] == 1}
    relaid = _relaid_from(traced, node)
    # a module's output first, in its own layout (a (B, C, L) transpose of a token map to pool it reads
    # two ways where C == L); else the input of a module that takes the map
    found = next(((n, w) for n in relaid if (w := _returned_by(traced, n, by_path))), None) or next(
        ((n, w) for n in reversed(relaid) if (w := _taken_by(traced, n, by_path))), None)
    if found is None:
        raise CutError(
            f"the cut of {cut.arch} at {cut.where!r} in its exported graph is made and used by code between module "
            "calls, where module hooks cannot stop"
        )
    at, where = found
    if at is not node:
        cut = cut_at_node(traced, at.name, cut.arch, method="export")
    return dataclasses.replace(cut, where=where, method="export", after="" if ":" in where else where,
                               dropped=dropped_by(model, calls, where))


def _relaid_from(traced: Traced, node: fx.Node) -> list[fx.Node]:
    """The value an op other than a re-laying one (a view, a transpose) made, and what re-laying
    ops made of it alone up to ``node``, in order; those that are maps of ``node``'s width and grid."""
    chain = [node]
    while op_name(chain[-1]) in LAYOUT_OPS and chain[-1].args and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    want = feature_of(traced.shapes.get(node), traced.input_shape[2:], hint=layout_hint(traced, node))
    same = [n for n in chain if _same_map(traced, n, want)]
    return same[::-1] or [node]


def _same_map(traced: Traced, node: fx.Node, want) -> bool:
    shape = traced.shapes.get(node)
    for hint in (layout_hint(traced, node), None):
        feat = feature_of(shape, traced.input_shape[2:], hint=hint)
        if feat is not None and want is not None and (feat.nf, feat.grid) == (want.nf, want.grid):
            return True
    return False


def _returned_by(traced: Traced, node: fx.Node, by_path: dict[str, ModuleCall]) -> str | None:
    shape = traced.shapes.get(node)
    for path in scopes_of(traced, node):
        inside = nodes_in(traced, path)
        outputs = {n for n in inside if carries_tensor(traced.shapes.get(n)) and any(u not in inside for u in n.users)}
        call = by_path.get(path)
        if outputs != {node} or call is None:
            continue
        if call.out_shape == shape:
            return path
        if isinstance(call.out_shape, dict):
            keys = [key for key, s in call.out_shape.items() if s == shape]
            if len(keys) == 1:
                return f"{path}:{keys[0]}"
    return None


def _taken_by(traced: Traced, node: fx.Node, by_path: dict[str, ModuleCall]) -> str | None:
    shape = traced.shapes.get(node)
    made_in = set(scopes_of(traced, node))
    for user in node.users:
        for path in scopes_of(traced, user):
            call = by_path.get(path)
            if path not in made_in and call is not None and call.in_shape == shape:
                return f"{path}:input"
    return None
