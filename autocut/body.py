"""Truncate a model at its cut and make the result return an NCHW map.

A body found by fx is a ``torchvision`` ``DualGraphModule``: the model's train and eval graphs,
each ending at the cut, so ``.train()``/``.eval()`` switch graphs like the original's control
flow would. It keeps the model's own parameter names and shares its modules (as fastai's
``create_body`` shares children); the dropped head's parameters are not in it.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule

from autocut.cut import Cut, _ancestors
from autocut.errors import CutError
from autocut.layers import nhwc_to_nchw, tokens_to_nchw
from autocut.trace import Traced, constants_attached, trace_graph

__all__ = ["build_body", "ToNCHW", "EarlyExitBody", "SequentialBody"]


def _append_to_nchw(graph: fx.Graph, node: fx.Node, cut: Cut) -> fx.Node:
    with graph.inserting_after(node):
        if cut.layout == "NHWC":
            return graph.call_function(nhwc_to_nchw, (node,))
        if cut.layout == "NLC":
            return graph.call_function(tokens_to_nchw, (node, cut.prefix_tokens, cut.grid))
    return node


def _truncate(graph: fx.Graph, qualname: dict[fx.Node, str], cut: Cut, train_only: set[str] | None = None) -> fx.Graph:
    """End ``graph`` at ``cut.where``: new output, layout conversion, everything else removed
    except asserts (and what they read) that run before the cut.

    With ``train_only`` (the eval graph's node names), ops that only the train graph has and
    that directly follow the cut stay in the body: they act on the feature map in training."""
    node = next((n for n, q in qualname.items() if q == cut.where), None)
    if node is None:
        raise KeyError(cut.where)
    while train_only is not None and len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or qualname.get(user) in train_only:
            break
        node = user
    for out in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(out)
    result = _append_to_nchw(graph, node, cut)
    graph.output(result)
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    live = _ancestors(nodes[-1])
    for n in nodes:
        # keep input checks (torch._assert) that precede the cut
        if n.op == "call_function" and position[n] < position[node] and n.is_impure():
            live |= _ancestors(n)
    for n in reversed(nodes):
        if n not in live and n.op != "placeholder":
            graph.erase_node(n)
    graph.lint()
    return graph


# what GraphModule.recompile sets on the instance (the forward itself goes on its own class)
_COMPILED_ATTRS = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")


class GraphBody(DualGraphModule):
    """A body made from the model's train and eval graphs; ``.train()``/``.eval()`` switch.

    Each graph's Python code is generated once: DualGraphModule regenerates and re-executes it
    on every switch (25-50 ms on a ViT or a Swin), which adds up in loops that toggle modes.
    Edit a graph with ``body.graph`` while it is the active one, then call ``body.recompile()``.

    ``module_calls``, when discovery's trace made the body: ``((H, W), ((module path, output
    shape), ...))``, each module call of the eval graph in order, at that input size (what the
    layer groups read instead of running a forward).
    """

    def recompile(self):
        code = super().recompile()
        compiled = {k: self.__dict__[k] for k in _COMPILED_ATTRS if k in self.__dict__}
        self.__dict__.setdefault("_compiled", {})[id(self._graph)] = (self._graph, type(self).forward, compiled)
        return code

    def train(self, mode: bool = True):
        graph = self.train_graph if mode else self.eval_graph
        current = self.__dict__.get("_graph")
        if current is not None and current is not graph:
            cached = self.__dict__.get("_compiled", {}).get(id(graph))
            if cached is None:
                self.graph = graph  # generates the code, and recompile caches it
            else:
                self._graph = graph
                graph.owning_module = self
                type(self).forward = cached[1]
                self.__dict__.update(cached[2])
        return nn.Module.train(self, mode)

    def __deepcopy__(self, memo):
        # GraphModule's deepcopy re-runs __init__, which resets every training flag to True
        res = super().__deepcopy__(memo)
        for mine, theirs in zip(self.modules(), res.modules()):
            theirs.training = mine.training
        res.graph = res.train_graph if self.training else res.eval_graph
        for attr in ("cut", "norm_parameter_names", "module_calls"):  # set by create_body; __init__ drops them
            if attr in self.__dict__:
                setattr(res, attr, self.__dict__[attr])
        return res


def _fx_body(model: nn.Module, cut: Cut, traced: Traced | None = None) -> nn.Module:
    if traced is not None:  # discovery's eval graph: no need to trace it again
        eval_graph, eval_names_of, constants = traced.graph, traced.qualname, dict(traced.constants)
    else:
        eval_graph, eval_tracer, _ = trace_graph(model, training=False)
        eval_names_of, constants = eval_tracer.node_to_qualname, dict(eval_tracer.constants)
    eval_names = set(eval_names_of.values())
    _truncate(eval_graph, eval_names_of, cut)
    # The graphs' tensor constants sit on the model only while the body is built (the body keeps
    # its own copies): the user's model is left without fx's _tensor_constantN attributes.
    with constants_attached(model, constants):
        try:
            train_graph, train_tracer, _ = trace_graph(model, training=True)  # names constants past the eval ones
            constants.update(train_tracer.constants)
            _truncate(train_graph, train_tracer.node_to_qualname, cut, train_only=eval_names)
        except Exception:
            # the train graph lacks the cut or cannot be traced: the eval graph serves both modes
            train_graph = eval_graph
    if _same_graph(train_graph, eval_graph):  # most models: one graph, one compile, free .train()/.eval()
        train_graph = eval_graph
    with constants_attached(model, constants):
        body = GraphBody(model, train_graph, eval_graph, class_name=f"{type(model).__name__}Body")
    if traced is not None:  # what each module call returns, for the layer groups (no forward needed)
        body.module_calls = (tuple(traced.input_shape[2:]), tuple(
            (n.target, traced.shapes.get(n)) for n in eval_graph.nodes if n.op == "call_module"))
    _match_persistence(body, set(model.state_dict(keep_vars=True)))
    body.train(model.training)
    return body


def _same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two graphs run the same ops on the same inputs, node for node."""
    nodes_a, nodes_b = list(a.nodes), list(b.nodes)
    if len(nodes_a) != len(nodes_b):
        return False
    same_as: dict[fx.Node, fx.Node] = {}
    try:
        for x, y in zip(nodes_a, nodes_b):
            if x.op != y.op or x.target != y.target:
                return False
            same_as[y] = x
            if fx.node.map_arg((y.args, y.kwargs), lambda n: same_as.get(n)) != (x.args, x.kwargs):
                return False
    except Exception:  # arguments that cannot be compared: keep both graphs
        return False
    return True


def _match_persistence(body: nn.Module, model_keys: set[str]) -> None:
    """fx copies tensor attributes (constants, non-persistent buffers) as persistent buffers;
    keep in the state dict only what the model's own state dict has, so checkpoints fit."""
    for path, module in body.named_modules():
        for name in list(module._buffers):
            if (f"{path}.{name}" if path else name) not in model_keys:
                module._non_persistent_buffers_set.add(name)


class ToNCHW(nn.Module):
    """The layout conversion a body ends with (no parameters)."""

    def __init__(self, layout: str, prefix_tokens: int = 0, grid: tuple[int, int] = (1, 1)):
        super().__init__()
        self.layout, self.prefix_tokens, self.grid = layout, prefix_tokens, tuple(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            return nhwc_to_nchw(x)
        if self.layout == "NLC":
            return tokens_to_nchw(x, self.prefix_tokens, self.grid)
        return x

    def extra_repr(self) -> str:
        return f"{self.layout}" + (f", prefix_tokens={self.prefix_tokens}, grid={self.grid}" if self.layout == "NLC" else "")


class SequentialBody(nn.Sequential):
    """fastai's body for an int cut: the first children of the model, with their own names."""


class _Exit(BaseException):
    # BaseException: a model's own ``except Exception`` (a guarded fallback path) must not catch it
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def _raise_output(module, args, output):
    raise _Exit(output)


def _raise_input(module, args):
    raise _Exit(args[0])


class EarlyExitBody(nn.Module):
    """A body for models fx cannot trace: runs the model's own forward and stops at the cut
    (a hook on the cut module raises with the value). Modules only used after the cut are
    removed, so the head's parameters are not carried; names are the model's own."""

    def __init__(self, model: nn.Module, cut: Cut, keep: set[str]):
        super().__init__()
        path, _, at = cut.where.partition(":")
        # the model's children become ours, so parameter names stay the model's own
        object.__setattr__(self, "_model_cls", type(model))
        self._model_dict = {k: v for k, v in model.__dict__.items() if k not in ("_modules", "_parameters", "_buffers")}
        for name, child in model.named_children():
            self.add_module(name, child if name in keep else nn.Identity())
        for name, p in model.named_parameters(recurse=False):
            if name in keep:
                self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.cut_path, self.cut_at = path, at or "output"
        self.to_nchw = ToNCHW(cut.layout, cut.prefix_tokens, cut.grid)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            extra = self.__dict__.get("_model_dict", {})
            if name in extra:
                return extra[name]
            attr = getattr(self.__dict__.get("_model_cls", object), name, None)
            if callable(attr):  # the model's own methods (forward_features, ...), bound to us
                return types.MethodType(attr, self)
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.get_submodule(self.cut_path)
        handle = (
            module.register_forward_pre_hook(_raise_input)
            if self.cut_at == "input"
            else module.register_forward_hook(_raise_output)
        )
        try:
            self._model_cls.forward(self, x)
        except _Exit as exit_:
            return self.to_nchw(exit_.value)
        finally:
            handle.remove()
        raise CutError(f"the forward never reached the cut at {self.cut_path!r} for this input")


def build_body(
    model: nn.Module, cut: Cut | int | Callable[[nn.Module], nn.Module], probe: Callable, traced: Traced | None = None
) -> tuple[nn.Module, Cut]:
    """Build the body for ``cut`` (see :func:`autocut.create_body`). ``probe(body) -> Cut`` reads
    the layout of a body made by an int or a callable; ``traced`` is the model's traced eval
    graph when discovery made one (it is consumed)."""
    if isinstance(cut, Cut):
        if cut.method in ("fx", "user"):
            return _fx_body(model, cut, traced), cut
        if cut.method == "hooks":
            keep = {p.split(".")[0] for p in _kept_paths(model, cut)}
            return EarlyExitBody(model, cut, keep), cut
        raise CutError(f"unknown cut method {cut.method!r}")
    if isinstance(cut, bool) or not (isinstance(cut, int) or callable(cut)):
        raise CutError(f"cut must be None, a Cut, an int, a node name or a callable, got {cut!r}")
    if isinstance(cut, int):
        children = list(model.named_children())
        if not -len(children) <= cut <= len(children) or cut == 0:
            raise CutError(f"cut={cut} is out of range for {type(model).__name__}, which has {len(children)} children")
        body = SequentialBody(OrderedDict(children[:cut]))
    else:
        body = cut(model)
        if not isinstance(body, nn.Module):
            raise CutError(f"the cut callable returned {type(body).__name__}, not an nn.Module")
    found = probe(body)
    if found.layout != "NCHW":
        body = nn.Sequential(OrderedDict([("body", body), ("to_nchw", ToNCHW(found.layout, found.prefix_tokens, found.grid))]))
    return body, found


def _kept_paths(model: nn.Module, cut: Cut) -> set[str]:
    dropped = set(cut.dropped)
    return {name for name, _ in model.named_children() if name not in dropped} | {
        name for name, _ in model.named_parameters(recurse=False) if name not in dropped
    }
