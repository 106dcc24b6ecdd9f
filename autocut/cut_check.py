"""Never a silent wrong cut: every cut a rule finds is checked on the same probe before it is returned.

A cut holds when, with the value at the cut held fixed,

1. the output no longer depends on the input: nothing bypasses the cut (a skip connection around
   it, a second branch that reaches the head another way);
2. the output still depends on the value at the cut: the head reads it;
3. no later value with spatial extent feeds the output except inside the head (a module that takes
   a feature map and returns none, an attention pool): a cut too early (at the stem, before the
   stages of an encoder whose output the rule could not read) computes more maps after it.
   Re-laying the value at the cut (views, permutes, slices, copies) makes no new map; re-laying
   values computed after it (windows put back on their grid) does. On the eager forward, per-channel
   ops on the value at the cut (an activation, a norm) make a later map even inside the head: the
   head begins where the map is first mixed across channels or pooled; a module that returns or
   takes the last such map is where the cut belongs (``CutCheck.move_to``).

Dependence is read without values, so the check runs on meta and fake tensors as the probe does:
each value carries the set of sources it was computed from (``"input"``, ``"cut"``), propagated
along the traced graph (:func:`check_graph_cut`) or, for a cut found with module hooks, through
every op the eager forward dispatches (:func:`check_module_cut`). Ops that only re-lay a value
(views, permutes, slices, copies) make no new map.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from autocut.cut import Cut
from autocut.cut_graph import carries_tensor, node_op, nodes_in, scopes_of
from autocut.errors import CutError
from autocut.layout import LAYOUT_OPS, feature_of, per_channel
from autocut.probe import PROBE_BATCH, eval_mode, first_input, meta_first, model_device, model_dtype, probe_input, tensor_leaves
from autocut.trace import Traced

__all__ = ["CutCheck", "check_graph_cut", "check_module_cut", "LAYOUT_OPS"]

INPUT, CUT = "input", "cut"



@dataclass
class CutCheck:
    """What the check found: empty ``problems`` means the cut holds.

    Attributes:
        problems: each failed condition, in words.
        later_maps: ``(where, op, shape)`` of each feature map computed after the cut outside a head.
    """

    problems: list[str] = field(default_factory=list)
    later_maps: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    move_to: str | None = None
    unreachable: tuple[str, str] | None = None

    def raise_for(self, cut: Cut) -> None:
        """Raise a :class:`CutError` naming what failed, the candidates and ``cut=``; nothing if it holds."""
        if not self.problems:
            return
        candidates = list(dict.fromkeys(where for where, _, _ in self.later_maps if where))[-3:]
        hint = f" The feature maps it misses are made in {', '.join(map(repr, candidates))}." if candidates else ""
        if self.unreachable is not None:
            where, op = self.unreachable
            path = cut.where.partition(":")[0]
            example = f" (say, lambda m: nn.Sequential(m.{path}, <{op} as a module>))" if ":" not in cut.where else ""
            raise CutError(
                f"the cut of {cut.arch} at {cut.where!r} (found by {cut.method}) does not hold: "
                + "; ".join(self.problems)
                + f". {op} runs on the map after it" + (f" in {where!r}" if where else " in the model's own forward")
                + ", before its pooling, and no module returns or takes what it makes: module hooks cannot stop there."
                f" Pass cut= a callable model -> body that ends with {op}{example}"
            )
        raise CutError(
            f"the cut of {cut.arch} at {cut.where!r} (found by {cut.method}) does not hold: "
            + "; ".join(self.problems)
            + f".{hint} Pass cut= a module path, node name or callable model -> body to cut where you mean"
        )


def _verdict(output_tags: set[str], later: list[tuple[str, str, tuple[int, ...]]]) -> CutCheck:
    check = CutCheck(later_maps=later)
    if INPUT in output_tags:
        check.problems.append("the output still depends on the input when the value at the cut is held fixed "
                              "(a skip connection or a second branch goes around it)")
    if CUT not in output_tags:
        check.problems.append("the output does not depend on the value at the cut")
    if later:
        shown = ", ".join(f"{op} -> {shape[1:]}" + (f" in {where!r}" if where else "") for where, op, shape in later[-3:])
        check.problems.append(f"feature maps are computed after it outside a pooling head ({len(later)}: {shown})")
    return check


def _is_map(shape: Any, cut: Cut) -> bool:
    return feature_of(shape, tuple(cut.input_size[1:]), [cut.grid]) is not None


def _is_later_map(shape: Any, cut: Cut, batch: int) -> bool:
    """A map, read generously: also a ``(B, C, h, w)`` grid of another aspect than the input's
    (text-line backbones stride each axis differently), which the rules cannot cut at but which
    must not go unseen after a cut."""
    if _is_map(shape, cut):
        return True
    H, W = cut.input_size[1:]
    return (isinstance(shape, tuple) and len(shape) == 4 and shape[0] == batch and shape[1] > 1
            and 2 <= shape[2] <= H and 2 <= shape[3] <= W)


# --- on the traced graph ---------------------------------------------------------------------------


def _scope_is_head(traced: Traced, scope: str, cut: Cut) -> bool:
    """Whether the module at ``scope`` takes a feature map and returns none (a pooling head)."""
    inside = nodes_in(traced, scope)
    if not inside:
        return False
    ins = [a for n in inside for a in n.all_input_nodes if a not in inside]
    outs = [n for n in inside if any(u not in inside for u in n.users)]
    return any(_is_map(traced.shapes.get(a), cut) for a in ins) and not any(_is_map(traced.shapes.get(o), cut) for o in outs)


def _is_head_op(op: str) -> bool:
    """Adaptive pooling (VGG's ``avgpool`` to 7x7, timm's ``SelectAdaptivePool2d``): the head's,
    whatever grid it pools to, as both rules have it."""
    return "adaptive" in op.lower()


def check_graph_cut(traced: Traced, cut: Cut) -> CutCheck:
    """Check a cut at a node of ``traced`` (see the module docstring): sources propagate along
    the graph's edges, the cut node's value held fixed.

    On the graph, maps computed inside a module the body drops are the head's: the graph rule
    assigns them on purpose (lowformer's ``in_conv``, registered after the pool; VOLO's per-token
    ``aux_head``), and every path to the output goes through its cut by construction. The hooks
    rule gets no such allowance (:func:`check_module_cut`): a cut it finds too early drops the
    very stages that make the maps it missed."""
    at = traced.node_named(cut.where)
    if at is None:
        raise CutError(f"no node {cut.where!r} in the graph of {cut.arch}")
    tags: dict[fx.Node, frozenset[str]] = {}
    relaid = {at}  # the value at the cut and what layout ops made of it alone
    dropped = set(cut.dropped)
    later: list[tuple[str, str, tuple[int, ...]]] = []
    heads: dict[str, bool] = {}
    output_tags: set[str] = set()
    batch = traced.input_shape[0]
    for node in traced.graph.nodes:
        if node is traced.input:
            tags[node] = frozenset({INPUT})
        elif node is at:
            tags[node] = frozenset({CUT})
        else:
            # only tensors carry a dependence: reading ``x.shape`` to size a token is not one
            tags[node] = frozenset().union(
                *(tags.get(a, frozenset()) for a in node.all_input_nodes if carries_tensor(traced.shapes.get(a)))
            )
        if node.op == "output":
            output_tags = set(tags[node])
        elif node is not at and CUT in tags[node]:
            sources = [a for a in node.all_input_nodes if CUT in tags.get(a, ())]
            if node_op(traced, node) in LAYOUT_OPS and all(a in relaid for a in sources):
                relaid.add(node)
                continue
            shape = traced.shapes.get(node)
            if _is_later_map(shape, cut, batch) and not _is_head_op(node_op(traced, node)):
                scopes = scopes_of(traced, node)
                if any(s in dropped for s in scopes):
                    continue
                if not any(heads.setdefault(s, _scope_is_head(traced, s, cut)) for s in scopes):
                    later.append((traced.scope.get(node, ""), node_op(traced, node), shape))
    return _verdict(output_tags, later)


# --- on the eager forward ------------------------------------------------------------------------


@dataclass
class _Call:
    path: str
    takes_map: bool = False
    returns_map: bool = False
    entered: int = 0  # the number of ops dispatched before it started, and before it returned
    left: int = 0
    takes: int | None = None  # id() of its first input, and of each tensor it returns
    returns: tuple[int, ...] = ()


class _Sources(TorchDispatchMode):
    """Tags every tensor an op makes with the sources of the tensors it read, and records the
    feature maps made from the cut outside the layout ops."""

    def __init__(self, cut: Cut):
        super().__init__()
        self.cut = cut
        self.tags: dict[int, frozenset[str]] = {}
        self.alive: list[torch.Tensor] = []  # every tagged tensor, so that no id is reused
        self.stack: list[_Call] = []
        # (modules running, op, shape, id() of the map where a per-channel op made it of the value at the cut)
        self.later: list[tuple[list[_Call], str, tuple[int, ...], int | None]] = []
        self.relaid: set[int] = set()  # ids of the value at the cut and what layout ops made of it alone
        self.batch = PROBE_BATCH
        self.held: tuple[int, ...] | None = None  # the shape of the value at the cut
        self.per_channel: dict[int, int] = {}  # id -> op count: the value at the cut, what per-channel ops made of it
        self.ops = 0  # ops dispatched so far
        self.calls: list[_Call] = []  # every module call, in the order they return

    def tag(self, t: torch.Tensor, sources: frozenset[str], replace: bool = False) -> None:
        self.tags[id(t)] = sources if replace else self.tags.get(id(t), frozenset()) | sources
        self.alive.append(t)

    def sources(self, value: Any) -> frozenset[str]:
        leaves = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        return frozenset().union(*(self.tags.get(id(t), frozenset()) for t in leaves))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        read = self.sources((args, kwargs))
        if read:
            written = [a for a, spec in zip(args, func._schema.arguments) if spec.alias_info is not None
                       and spec.alias_info.is_write and isinstance(a, torch.Tensor)]
            for t in [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)] + written:
                self.tag(t, read)
            name = func.overloadpacket.__name__
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            per_channel = CUT in read and self._per_channel((args, kwargs), outs)
            if per_channel:
                self.per_channel[id(outs[0])] = self.ops
            if CUT in read and name in LAYOUT_OPS and all(
                id(t) in self.relaid for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and CUT in self.tags.get(id(t), ())
            ):
                self.relaid.update(id(t) for t in outs)
            elif CUT in read and not _is_head_op(name):
                for t in outs:
                    if _is_later_map(tuple(t.shape), self.cut, self.batch):
                        self.later.append((list(self.stack), f"aten.{name}", tuple(t.shape), id(t) if per_channel else None))
                        break
        return out

    def _per_channel(self, inputs: Any, outs: list[torch.Tensor]) -> bool:
        """Whether an op reading the cut makes a map of the value at the cut's shape from that value
        (or what per-channel ops made of it) and per-channel constants only (a norm, an activation)."""
        if self.held is None or not outs or tuple(outs[0].shape) != self.held:
            return False
        for t in (t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)):
            if id(t) in self.per_channel:
                continue
            if self.tags.get(id(t)) or not per_channel(tuple(t.shape), self.held, self.cut.layout):
                return False
        return True

    def reachable(self) -> tuple[str | None, tuple[str, str] | None]:
        """For the last map per-channel ops made of the value at the cut: the cut that ends there (a
        module returned it, ``"path"``, or took it first, ``"path:input"``), or where and by which
        op it was made where no module call did either."""
        made = [(step, i) for i, step in self.per_channel.items() if step > 0]
        if not made or all(made_id is None for *_, made_id in self.later):
            return None, None
        step, last = max(made)
        counts = Counter(c.path for c in self.calls)
        once = {p for p, n in counts.items() if n == 1}  # a module called twice cannot be stopped at its second call
        returned = [c for c in self.calls if c.path in once and last in c.returns and c.entered < step <= c.left]
        if returned:  # the innermost module that returned it: the first to return
            return min(returned, key=lambda c: c.left).path, None
        taken = [c for c in self.calls if c.path in once and c.takes == last and c.entered >= step]
        if taken:  # the first module to take it (of modules starting together, the first to return)
            return min(taken, key=lambda c: c.entered).path + ":input", None
        found = [(stack[-1].path if stack else "", op) for stack, op, _, made_id in self.later if made_id is not None]
        return None, found[-1]


def check_module_cut(model: nn.Module, cut: Cut, batch: int = PROBE_BATCH) -> CutCheck:
    """Check a cut at a module's input or output (``"layer4"``, ``"pooler:input"``,
    ``"encoder:last_hidden_state"``) on one eager forward of ``model`` (see the module docstring).

    Meta models run on meta tensors, models with real weights on meta stand-ins of their weights
    and where that fails on real zeros (as the hooks probe)."""
    path, _, at = cut.where.partition(":")
    if not path:
        return CutCheck()  # a map in the model's own output (a backbone's): nothing runs after it
    mode, output_tags = meta_first(model, lambda: _sources_of(model, cut, batch))
    # a head's own ops are its business, except per-channel ones on the value at the cut before it mixes or pools it
    later = [(calls[-1].path if calls else "", op, shape) for calls, op, shape, made in mode.later
             if made is not None or not any(c.takes_map and not c.returns_map for c in calls)]
    check = _verdict(output_tags, later)
    if check.problems:
        move_to, unreachable = mode.reachable()
        check.move_to = move_to if move_to != cut.where else None
        check.unreachable = unreachable if check.move_to is None else None
    return check


def _sources_of(model: nn.Module, cut: Cut, batch: int) -> tuple[_Sources, set[str]]:
    """One forward of ``model`` under :class:`_Sources`, the value at ``cut`` held: the mode, and
    the sources of the output."""
    path, _, at = cut.where.partition(":")
    target = model.get_submodule(path)
    mode = _Sources(cut)
    mode.batch = batch

    def hold(value: Any) -> None:  # the value at the cut, held fixed: its own source from here on
        leaves = dict(tensor_leaves(value))
        key = "" if at == "input" else at
        if key in leaves:
            mode.tag(leaves[key], frozenset({CUT}), replace=True)
            mode.relaid.add(id(leaves[key]))
            mode.held = tuple(leaves[key].shape)
            mode.per_channel[id(leaves[key])] = 0

    def enter(path):
        def fn(module, args, kwargs):
            first = first_input(args, kwargs)
            mode.stack.append(_Call(path, takes_map=any(_is_map(tuple(t.shape), cut) for _, t in tensor_leaves((args, kwargs))),
                                    entered=mode.ops, takes=id(first) if isinstance(first, torch.Tensor) else None))

        return fn

    def leave(module, args, kwargs, output):
        call = mode.stack.pop()
        leaves = tensor_leaves(output)
        call.returns_map = any(_is_map(tuple(t.shape), cut) for _, t in leaves)
        call.left, call.returns = mode.ops, tuple(id(t) for _, t in leaves)
        mode.calls.append(call)

    handles = []
    for p, module in model.named_modules():
        if p:
            handles.append(module.register_forward_pre_hook(enter(p), with_kwargs=True))
            handles.append(module.register_forward_hook(leave, with_kwargs=True))
    if at == "input":
        handles.append(target.register_forward_pre_hook(lambda m, a, kw: hold(first_input(a, kw)), with_kwargs=True))
    else:
        handles.append(target.register_forward_hook(lambda m, args, output: hold(output)))
    try:
        size = (batch, *cut.input_size)
        with eval_mode(model), torch.no_grad(), probe_input(size, model_device(model), False, model_dtype(model)) as x:
            mode.tag(x, frozenset({INPUT}))
            with mode:
                output = model(x)
            output_tags = set(mode.sources(output))
    finally:
        for h in handles:
            h.remove()
    return mode, output_tags

