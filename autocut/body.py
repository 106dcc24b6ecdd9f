"""Truncate a model at its cut and make the result return an NCHW map.

:func:`build_body` makes the body a :class:`~autocut.cut.Cut` describes:

- a cut found on the graph (or named by the user) gives a :class:`GraphBody`, a ``torchvision``
  ``DualGraphModule``: the model's train and eval graphs, each ending at the cut, so
  ``.train()``/``.eval()`` switch graphs like the original's control flow would. It keeps the
  model's own parameter names and shares its modules (as fastai's ``create_body`` shares
  children); the dropped head's parameters are not in it;
- a cut found by module hooks gives an :class:`~autocut.cut_hooks.EarlyExitBody`;
- an int gives fastai's body, the first children (:class:`SequentialBody`); a callable gives
  whatever it returns. Either is probed once to read what it returns.

A cut the user gives (a :class:`Cut`, an int, a callable) is held to what a found one is: the
body's own output on the probe must be the map its :class:`Cut` describes, ``(B, nf, h, w)``;
a body that pools or flattens after its last map is refused with the cut to pass instead.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _WrappedCall
from torch.nn.modules.module import _global_module_registration_hooks as _MODULE_REGISTRATION_HOOKS
from torchvision.models.feature_extraction import DualGraphModule

from autocut._gc import gc_paused
from autocut.cut import METHODS, Cut
from autocut.cut_graph import ancestors
from autocut.cut_hooks import EarlyExitBody
from autocut.discover import discover_module
from autocut.errors import CutError, first_line
from autocut.layout import Layout, ToNCHW, to_nchw
from autocut.probe import modes_kept, probe_forward, set_mode, shape_of
from autocut.trace import Traced, attribute_at, constants_attached, trace_graph

__all__ = ["build_body", "GraphBody", "SequentialBody"]


def _append_to_nchw(graph: fx.Graph, node: fx.Node, cut: Cut) -> fx.Node:
    if cut.layout == Layout.NCHW:
        return node
    with graph.inserting_after(node):
        return graph.call_function(to_nchw, (node, cut.layout.value, cut.prefix_tokens, cut.grid))


def _truncate(
    graph: fx.Graph, qualname: dict[fx.Node, str], cuts: list[Cut], train_only: set[str] | None = None, as_list: bool = False
) -> fx.Graph:
    """End ``graph`` at each cut's ``where``: a new output (the one map, or with ``as_list`` the list
    of them), each converted to NCHW; everything else removed except asserts (and what they read)
    that run before the last cut.

    With ``train_only`` (the eval graph's node names), ops that only the train graph has and
    that directly follow a cut stay in the body: they act on the feature map in training."""
    ends = []
    for cut in cuts:
        node = next((n for n, q in qualname.items() if q == cut.where), None)
        if node is None:
            raise CutError(f"no node {cut.where!r} in the graph of {cut.arch}: is the Cut of another model?")
        while train_only is not None and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "output" or qualname.get(user) in train_only:
                break
            node = user
        ends.append((node, cut))
    for out in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(out)
    results = [_append_to_nchw(graph, node, cut) for node, cut in ends]
    graph.output(results if as_list else results[0])
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last = max(position[node] for node, _ in ends)
    # the output, and the input checks (torch._assert) that precede the cut
    live = ancestors(nodes[-1], *(n for n in nodes[:last] if n.op == "call_function" and n.is_impure()))
    for n in reversed(nodes):
        if n not in live and n.op != "placeholder":
            graph.erase_node(n)
    graph.lint()
    return graph


# each body's recipe note, kept off the body (a copy or a pickle of the body does not carry it)
_NOTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call_wrapped(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self._wrapped_call(self, *args, **kwargs)  # (as GraphModule.recompile's own)


# what GraphModule.recompile sets on the instance (the forward itself goes on its own class)
_COMPILED_ATTRS = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")


class GraphBody(DualGraphModule):
    """A body made from the model's train and eval graphs; ``.train()``/``.eval()`` switch.

    Each graph's Python code is generated once: DualGraphModule regenerates and re-executes it
    on every switch (25-50 ms on a ViT or a Swin), which adds up in loops that toggle modes.
    Edit a graph with ``body.graph`` while it is the active one, then call ``body.recompile()``.

    ``module_calls``, when discovery's trace made the body: ``((H, W), ((module path, output
    shape), ...))``, each module call of the eval graph in order, at that input size (what the
    layer groups read instead of running a forward; see :func:`_module_calls`).
    """

    @property
    def train_graph(self) -> fx.Graph:
        """The graph ``.train()`` runs: traced on first use where the body was made in eval mode
        from a model whose code reads its mode before the cut (:class:`_PendingTrainGraph`)."""
        self._make_pending()
        self._own_graph()
        return self.__dict__["train_graph"]

    def _make_pending(self) -> None:
        """The train graph a body made in eval mode has not traced (or copied) yet, made now."""
        pending = self.__dict__.pop("_pending_train_graph", None)
        if pending is not None:
            pending.make(self)

    @train_graph.setter
    def train_graph(self, graph: fx.Graph) -> None:
        self.__dict__["train_graph"] = graph  # (under its own name: DualGraphModule's deepcopy reads it there)

    @property
    def eval_graph(self) -> fx.Graph:
        """The graph ``.eval()`` runs."""
        self._own_graph()
        return self.__dict__["eval_graph"]

    @eval_graph.setter
    def eval_graph(self, graph: fx.Graph) -> None:
        self.__dict__["eval_graph"] = graph

    @property
    def _graph(self) -> fx.Graph:  # (GraphModule's own, read by its graph property, recompile, ...)
        self._own_graph()
        try:
            return self.__dict__["_graph"]
        except KeyError:
            raise AttributeError("_graph") from None

    @_graph.setter
    def _graph(self, graph: fx.Graph) -> None:
        self.__dict__["_graph"] = graph

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str = "GraphModule",
                 note: BodyNote | None = None, training: bool = True):
        """The graphs that are ``note``'s (a recipe's) are shared: the body runs their code and
        copies them only when something reads a graph (:meth:`_own_graph`).
        ``training``: the mode the body starts in (its own flag and graph, and the flag of each
        empty module made for a path; the modules installed are the model's, with their own flags)."""
        if note is not None:  # (read by the first compile of each graph)
            _NOTES[self] = note
        vars(self)["_from_note"] = {id(g) for g in (train_graph, eval_graph)} if note is not None and note.code else set()
        # DualGraphModule.__init__'s work, each target installed once (it walks both graphs, one
        # graph twice where the body has one)
        nn.Module.__init__(self)
        vars(self)["training"] = training  # (the modules installed are the model's, with their own flags)
        self.__class__.__name__ = class_name
        self.train_graph, self.eval_graph = train_graph, eval_graph
        graphs = [train_graph] if train_graph is eval_graph else [train_graph, eval_graph]
        _install(root, self, [n.target for g in graphs for n in g.nodes if n.op in ("get_attr", "call_module")])
        current = train_graph if training else eval_graph
        if note is not None:
            self.__dict__["_shared_graphs"] = {id(g): g for g in graphs if g is note.eval_graph or g is note.graph}
        if id(current) in self.__dict__.get("_shared_graphs", ()):
            self.__dict__["_graph"] = current  # (not its owning module: the recipe's graph)
            self.recompile()
        else:
            self.graph = current
        if eval_graph._tracer_cls != train_graph._tracer_cls:
            raise TypeError("the train and eval graphs of a body come from tracers of different classes")
        tracer = train_graph._tracer_cls
        self._tracer_cls = tracer if tracer and "<locals>" not in tracer.__qualname__ else None

    def _own_graph(self) -> None:
        """Replace the recipe's graphs the body shares by copies of its own (first read of a
        graph: the body's graphs are the user's to edit; a body that is only run, in either
        mode, never copies them). The code compiled for a shared graph serves its copy."""
        held = self.__dict__
        shared = held.pop("_shared_graphs", None)
        if not shared:
            return
        copies = {}
        for key, graph in shared.items():
            copies[key] = copy.deepcopy(graph)
            copies[key].owning_module = self
        for name in ("_graph", "train_graph", "eval_graph"):
            if id(held.get(name)) in shared:
                held[name] = copies[id(held[name])]
        compiled, from_note = held.get("_compiled", {}), held.get("_from_note", set())
        for key, own in copies.items():
            if key in compiled:
                compiled[id(own)] = (own, *compiled.pop(key)[1:])
            if key in from_note:
                from_note.discard(key)
                from_note.add(id(own))

    def recompile(self):
        held = self.__dict__
        note, graph = _NOTES.get(self), held["_graph"]
        role = "eval" if graph is held.get("eval_graph") else "train"
        given = note.code.get(role) if note is not None and id(graph) in held.get("_from_note", ()) else None
        if given is not None:  # a copy of the graph a first body of the architecture compiled: its code
            held["_from_note"].discard(id(graph))
            code = self._use_code(*given)
        else:
            self._own_graph()  # (the code is generated from the body's own graph)
            code = super().recompile()
            if note is not None and not self.__dict__.get("_from_note") and role not in note.code:
                note.code[role] = (type(self).forward, {k: self.__dict__[k] for k in _COMPILED_ATTRS if k in self.__dict__},
                                   code)
        compiled = {k: held[k] for k in _COMPILED_ATTRS if k in held}
        held.setdefault("_compiled", {})[id(held["_graph"])] = (held["_graph"], type(self).forward, compiled)
        return code

    def _use_code(self, forward: Callable, attributes: dict, code: object) -> object:
        """What ``GraphModule.recompile`` sets up, with code generated before for the same graph."""
        cls = type(self)
        self.__dict__.update(attributes)
        cls.forward = forward
        if "_wrapped_call" not in vars(cls):
            cls._wrapped_call = _WrappedCall(cls, cls.__call__ if "__call__" in vars(cls) else None)
        self._recompile_submodules()
        cls.__call__ = _call_wrapped
        return code

    def train(self, mode: bool = True):
        held = self.__dict__  # (not the graph properties: a shared graph stays shared)
        if mode:
            self._make_pending()
        graph = held.get("train_graph" if mode else "eval_graph")
        current = held.get("_graph")
        if current is not None and current is not graph:
            cached = held.get("_compiled", {}).get(id(graph))
            shared = id(graph) in held.get("_shared_graphs", ())
            if cached is None and shared:
                held["_graph"] = graph
                self.recompile()  # (the code the recipe's first body compiled for it, where there is one)
            elif cached is None:
                self.graph = graph  # generates the code, and recompile caches it
            else:
                held["_graph"] = graph
                if not shared:
                    graph.owning_module = self
                type(self).forward = cached[1]
                held.update(cached[2])
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        vars(self)["training"] = mode  # nn.Module.train's work, each module's flag set directly
        for child in self.children():
            set_mode(child, mode)
        return self

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda(): a pending train graph first, so that what only training reads
        # (a module, a tensor the forward makes) is converted with the rest
        self._make_pending()
        return super()._apply(fn, recurse)

    def __reduce__(self):
        self._own_graph()
        return super().__reduce__()

    def __deepcopy__(self, memo):
        # GraphModule's deepcopy re-runs __init__, which resets every training flag to True
        self.train_graph  # (a copy gets both graphs, not the model a pending one would trace)  # noqa: B018
        res = super().__deepcopy__(memo)
        for mine, theirs in zip(self.modules(), res.modules()):
            theirs.training = mine.training
        res.graph = res.train_graph if self.training else res.eval_graph
        for attr in ("cut", "norm_parameter_names", "module_calls"):  # set by create_body; __init__ drops them
            if attr in self.__dict__:
                setattr(res, attr, self.__dict__[attr])
        return res


@dataclass
class BodyNote:
    """What the first graph body of an architecture made, kept in a recipe (:mod:`autocut.memo`)
    for the later bodies of that architecture, which copy it instead of tracing and truncating:

    - its eval graph, truncated at the cut (a copy taken before any body owned it), with the
      tensor constants the trace made, whether it serves training too (``one_graph``), the
      names of the eval trace's nodes (a train trace keeps what only it has past the cut), what
      each module call returns (``module_calls``) and the buffers made non-persistent;
    - the train graph once a body traced one (``same``: the eval graph serves) and its constants;
    - the Python code each graph compiled to (``code``: ``"eval"``/``"train"``).
    """

    eval_graph: fx.Graph | None = None
    eval_constants: dict[str, Any] = field(default_factory=dict)
    eval_names: frozenset[str] = frozenset()
    one_graph: bool = False
    module_calls: tuple | None = None
    non_persistent: tuple[tuple[str, str], ...] = ()
    graph: fx.Graph | None = None
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    same: bool = False
    code: dict[str, tuple] = field(default_factory=dict)  # "eval"/"train" -> what the first body's compile made

    @property
    def kept(self) -> bool:
        """Whether a first body's eval graph is here."""
        return self.eval_graph is not None

    def keep(self, eval_graph: fx.Graph, constants: dict, eval_names: set[str], one_graph: bool) -> None:
        """Keep a copy of a first body's truncated eval graph and what comes with it."""
        self.eval_graph = copy.deepcopy(eval_graph)
        self.eval_constants = _cloned(constants)
        self.eval_names, self.one_graph = frozenset(eval_names), one_graph

    def given_eval(self) -> tuple[fx.Graph, dict, frozenset[str], bool]:
        """The eval graph kept, for a body to share until it reads it
        (:meth:`GraphBody._own_graph`), a copy of its constants, the eval names, ``one_graph``."""
        return self.eval_graph, _cloned(self.eval_constants), self.eval_names, self.one_graph

    @property
    def taken(self) -> bool:
        return self.same or self.graph is not None

    def take(self, graph: fx.Graph, constants: dict, same: bool) -> None:
        """Keep a copy of ``graph`` (a body may edit its own) and of the constants it reads."""
        if not same:
            self.graph = copy.deepcopy(graph)
            self.constants = _cloned(constants)
        self.same = same

    def given(self, constants: dict) -> fx.Graph | None:
        """The train graph kept, for a body to share until it reads it (``None`` where the eval
        graph serves), copies of its constants added to ``constants`` (each body its own, as of
        the eval graph's)."""
        if self.same:
            return None
        constants.update(_cloned(self.constants))
        return self.graph


def _cloned(constants: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in constants.items()}


class _PendingTrainGraph:
    """The train graph of a body made in eval mode, traced when the body first needs it (see
    :attr:`GraphBody.train_graph`): a body used for inference never pays for a second trace.
    Holds the model until then (its modules are the body's; the dropped head's too, until then).
    With a ``note`` taken, its copy instead of a trace; an empty ``note`` takes the trace."""

    def __init__(self, model: nn.Module, cuts: list[Cut], as_list: bool, constants: dict, eval_names: set[str],
                 note: BodyNote | None = None):
        self.model, self.cuts, self.as_list, self.constants, self.eval_names = model, cuts, as_list, constants, eval_names
        self.note = note

    def make(self, body: GraphBody) -> None:
        """Trace the model in train mode into ``body.train_graph`` (the eval graph where the two are
        the same or the train mode cannot be traced); what the train graph reads that the body
        does not have yet (a tensor made in forward, a module only training calls) is added."""
        from_note = self.note is not None and self.note.taken
        eval_graph = body.__dict__["eval_graph"]  # (not the property: a shared graph stays shared)
        with modes_kept(self.model):  # (a trace sets every module's mode; the user's flags stay)
            graph = _noted_train_graph(self.model, self.cuts, self.as_list, self.constants, self.eval_names,
                                       eval_graph, self.note)
        if from_note and graph is not None:  # the recipe's graph: shared, and run with the code a first body made
            body.__dict__.setdefault("_shared_graphs", {})[id(graph)] = graph
            if self.note.code:
                body.__dict__.setdefault("_from_note", set()).add(id(graph))
        elif graph is None or _same_graph(graph, eval_graph):
            body.train_graph = eval_graph
            return
        with constants_attached(self.model, self.constants):
            _install(self.model, body, [n.target for n in graph.nodes
                                        if n.op in ("get_attr", "call_module") and attribute_at(body, n.target) is None])
        _match_persistence(body, set(self.model.state_dict(keep_vars=True)))
        body.train_graph = graph


def _install(source: nn.Module, body: nn.Module, targets: list[str]) -> None:
    """fx's ``_copy_attr`` for each of ``targets`` (``GraphModule``'s way of making its module
    tree): ``source``'s attribute at the target's path is put into ``body`` at the same path (a
    module, a parameter, or a tensor as a buffer, persistent as it is there), with empty modules
    made for the path where ``body`` has none (in ``body``'s mode); nothing below a module
    already installed whole. Each path is walked once for all the targets (fx walks it again for
    each)."""
    at: dict[str, tuple[Any, nn.Module]] = {"": (source, body)}  # path -> (source's module there, body's)
    for target in dict.fromkeys(targets):
        path, _, name = target.rpartition(".")
        src, into = at.get(path) or _installed_path(at, path, body.training)
        if src is into:  # (a module installed whole holds everything below it)
            continue
        value = getattr(src, name)
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            into.register_buffer(name, value, persistent=name not in getattr(src, "_non_persistent_buffers_set", ()))
        else:
            _put(into, name, value)
        if isinstance(value, nn.Module):
            at[target] = (value, value)


def _installed_path(at: dict[str, tuple[Any, nn.Module]], path: str, training: bool) -> tuple[Any, nn.Module]:
    """:func:`_install`'s pair at ``path``, its parents' first: the body's module there made
    empty where there is none."""
    parent, _, part = path.rpartition(".")
    src, into = at.get(parent) or _installed_path(at, parent, training)
    if src is not into:
        inner = vars(into)["_modules"].get(part)
        if inner is None:
            inner = nn.Module()
            vars(inner)["training"] = training
            _put(into, part, inner)
        src, into = getattr(src, part), inner
    at[path] = (src, into)
    return src, into


def _put(into: nn.Module, name: str, value: Any) -> None:
    """``setattr(into, name, value)``; a module put straight into ``into._modules`` where that is
    all ``nn.Module.__setattr__`` would do (no plain attribute of that name, no global module
    registration hook): a body installs hundreds."""
    if isinstance(value, nn.Module) and name not in vars(into) and not _MODULE_REGISTRATION_HOOKS:
        vars(into)["_modules"][name] = value
    else:
        setattr(into, name, value)


@gc_paused()
def _fx_body(model: nn.Module, cut: Cut | list[Cut], traced: Traced | None = None,
             note: BodyNote | None = None) -> nn.Module:
    """A :class:`GraphBody` ending at ``cut``; for a list of cuts (a pyramid's levels), one
    returning the list of their maps. ``note``: a recipe's (:class:`BodyNote`), where the graphs
    come from (kept) or go to (empty)."""
    as_list = isinstance(cut, list)
    cuts = cut if as_list else [cut]
    cut = cuts[-1]
    kept = note is not None and note.kept
    if kept:  # a later body of the architecture: the first one's graph, nothing traced or truncated
        eval_graph, constants, eval_names, one_graph = note.given_eval()
    else:
        if traced is not None:  # discovery's eval graph: no need to trace it again
            eval_graph, eval_names_of, constants = traced.graph, traced.qualname, dict(traced.constants)
            one_graph = all(_eval_graph_serves_training(traced, c) for c in cuts)
        else:
            eval_graph, eval_tracer, _ = trace_graph(model, training=False)
            eval_names_of, constants = eval_tracer.node_to_qualname, dict(eval_tracer.constants)
            one_graph = False
        eval_names = set(eval_names_of.values())
        _truncate(eval_graph, eval_names_of, cuts, as_list=as_list)
        if note is not None:
            note.keep(eval_graph, constants, eval_names, one_graph)
    # where no code read a training flag before the cut, the train graph is this one: no second
    # trace; a body made in eval mode traces it when it first needs it
    pending = None
    if one_graph:
        train_graph = None
    elif model.training:
        train_graph = _noted_train_graph(model, cuts, as_list, constants, eval_names, eval_graph, note)
    else:
        train_graph, pending = None, _PendingTrainGraph(model, cuts, as_list, dict(constants), eval_names, note)
    if train_graph is None or (train_graph is not (note and note.graph) and _same_graph(train_graph, eval_graph)):
        train_graph = eval_graph  # one graph, one compile, free .train()/.eval() (a noted train graph is another)
    # The graphs' tensor constants sit on the model only while the body is built (the body keeps
    # its own copies): the user's model is left without fx's _tensor_constantN attributes.
    with constants_attached(model, constants):
        body = GraphBody(model, train_graph, eval_graph, class_name=f"{type(model).__name__}Body", note=note,
                         training=model.training)
    if pending is not None:
        body.__dict__["_pending_train_graph"] = pending
    if kept:
        if note.module_calls is not None:
            body.module_calls = note.module_calls
        for path, name in note.non_persistent:
            body.get_submodule(path)._non_persistent_buffers_set.add(name)
    else:
        if traced is not None:  # what each module call returns, for the layer groups (no forward needed)
            body.module_calls = (tuple(traced.input_shape[2:]), _module_calls(traced, eval_graph))
        _match_persistence(body, set(model.state_dict(keep_vars=True)))
        if note is not None:
            note.module_calls = body.__dict__.get("module_calls")
            note.non_persistent = tuple((path, name) for path, m in body.named_modules()
                                        for name in sorted(m._non_persistent_buffers_set))
    return body


def _noted_train_graph(model: nn.Module, cuts: list[Cut], as_list: bool, constants: dict, eval_names: set[str],
                       eval_graph: fx.Graph, note: BodyNote | None) -> fx.Graph | None:
    """The train graph of :func:`_train_graph`, or the one ``note`` took, for the body to share
    (``None``: the eval graph serves; its constants added to ``constants``); an empty ``note``
    takes (a copy of) the one traced (not a failed trace: each body warns of its own)."""
    if note is not None and note.taken:
        return note.given(constants)
    graph = _train_graph(model, cuts, as_list, constants, eval_names)
    if graph is not None and note is not None:
        note.take(graph, constants, _same_graph(graph, eval_graph))
    return graph


def _train_graph(model: nn.Module, cuts: list[Cut], as_list: bool, constants: dict, eval_names: set[str]) -> fx.Graph | None:
    """The train-mode graph truncated at ``cuts`` (as :func:`_truncate`; its tensor constants added to ``constants``); where
    it cannot be traced, a warning and ``None``: the eval graph serves both modes."""
    with constants_attached(model, constants):
        try:
            train_graph, train_tracer, _ = trace_graph(model, training=True)  # names constants past the eval ones
            constants.update(train_tracer.constants)
            _truncate(train_graph, train_tracer.node_to_qualname, cuts, train_only=eval_names, as_list=as_list)
            return train_graph
        except Exception as err:  # any trace failure: warned, and the eval graph serves both modes
            warnings.warn(
                f"{cuts[-1].arch} could not be traced in train mode ({type(err).__name__}: {first_line(err)}); the body runs "
                "its eval graph in both modes: code that branches on self.training outside leaf modules (dropout, "
                "drop path, batch norm modules still switch) keeps its eval branch",
                stacklevel=4,
            )
            return None


def _eval_graph_serves_training(traced: Traced, cut: Cut) -> bool:
    """Whether the train-mode graph, truncated at ``cut``, is the eval-mode one: no module's
    training flag was read (:attr:`Traced.training_reads`) before the cut's node and every node
    that uses it were made. Up to the first read, a trace runs the same code in either mode (leaf
    modules, dropout and batch norm among them, are calls whose mode switches at run time); after
    it, nothing the body keeps can differ (not even a train-only op applied to the map after the
    cut, which would be a later user of it)."""
    reads = traced.training_reads
    if reads is None or traced.capture != "fx":
        return False
    node = traced.node_named(cut.where)
    if node is None:
        return False
    index = {n: i for i, n in enumerate(traced.graph.nodes)}
    made = max([index[node]] + [index[u] for u in node.users])
    return all(read > made for read in reads)


def _module_calls(traced: Traced, graph: fx.Graph) -> tuple[tuple[str, object], ...]:
    """``(module path, output shape)`` of each module call of ``graph``, in order.

    A module fx traced through that calls no module itself (timm's ``LayerNorm``, which runs as
    ``F.layer_norm``) has no call of its own in the graph: each op made inside it counts as a call
    of it, so its parameters run where it runs (a ViT's final norm at the last stage, not first)."""
    calling = set()  # each module called and every module it sits in
    for n in graph.nodes:
        if n.op == "call_module":
            parts = str(n.target).split(".")
            calling.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    out = []
    for n in graph.nodes:
        if n.op == "call_module":
            out.append((str(n.target), traced.shapes.get(n)))
        elif n.op in ("call_function", "call_method") and (scope := traced.scope.get(n)) and scope not in calling:
            out.append((scope, traced.shapes.get(n)))
    return tuple(out)


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
    except (RuntimeError, TypeError, ValueError):  # tensor arguments compare elementwise: keep both graphs
        return False
    return True


def _match_persistence(body: nn.Module, model_keys: set[str]) -> None:
    """fx copies tensor attributes (constants, non-persistent buffers) as persistent buffers;
    keep in the state dict only what the model's own state dict has, so checkpoints fit."""
    for path, module in body.named_modules():
        for name in list(module._buffers):
            if (f"{path}.{name}" if path else name) not in model_keys:
                module._non_persistent_buffers_set.add(name)


class SequentialBody(nn.Sequential):
    """fastai's body for an int cut: the first children of the model, with their own names."""


def build_body(
    model: nn.Module,
    cut: Cut | int | Callable[[nn.Module], nn.Module],
    input_size: tuple[int, int, int],
    arch: str,
    traced: Traced | None = None,
    checked: bool = False,
    note: BodyNote | None = None,
) -> tuple[nn.Module, Cut]:
    """The body for ``cut`` (see :func:`autocut.create_body`) and the :class:`Cut` it answers to.

    Args:
        model: the model to cut (its modules are shared with the body).
        cut: a :class:`Cut` of ``model``; an int (the first children, fastai's way); or a callable
            ``model -> body``. An int- or callable-made body is probed once at ``input_size`` to
            read what it returns (``Cut.method`` is ``"user"``) and ends with a :class:`ToNCHW`.
        traced: the model's traced eval graph, when discovery made one (it is consumed).
        checked: ``cut`` was found on this model's architecture at this size (a remembered
            recipe, :mod:`autocut.memo`): the body is not probed to check its output.
        note: a graph body's graphs, from a recipe or for one (:class:`BodyNote`).
    """
    if isinstance(cut, Cut):
        if cut.method in ("fx", "user"):
            body = _fx_body(model, cut, traced, note)
        elif cut.method in ("export", "hooks"):
            body = EarlyExitBody(model, cut)
        else:
            raise CutError(f"unknown cut method {cut.method!r}: one of {', '.join(METHODS)}")
        if traced is None and not checked:  # a Cut given, not one discovery just found on this very trace
            _check_output(body, cut, f"the body cut at {cut.where!r}", "is the Cut of another model or input size? "
                          f"Pass cut={cut.where!r} (or cut=None) to read it again")
        return body, cut
    if isinstance(cut, bool) or not (isinstance(cut, int) or callable(cut)):
        raise CutError(f"cut must be None, a Cut, an int, a node name or a callable, got {cut!r}")
    if isinstance(cut, int):
        children = list(model.named_children())
        if not -len(children) <= cut <= len(children) or cut == 0:
            raise CutError(f"cut={cut} is out of range for {type(model).__name__}, which has {len(children)} children")
        body = SequentialBody(OrderedDict(children[:cut]))
        what = f"the body cut={cut} makes of {arch} (its first {len(body)} children)"
    else:
        body = cut(model)
        if not isinstance(body, nn.Module):
            raise CutError(f"the cut callable returned {type(body).__name__}, not an nn.Module")
        what = f"the body the cut callable {getattr(cut, '__name__', type(cut).__name__)} makes of {arch}"
    found = dataclasses.replace(discover_module(body, input_size, arch=arch), method="user")
    if found.layout != Layout.NCHW:
        body = nn.Sequential(OrderedDict([("body", body), ("to_nchw", ToNCHW(found.layout, found.prefix_tokens, found.grid))]))
    _check_output(body, found, what, _instead(model, cut, found))
    return body, found


def _check_output(body: nn.Module, cut: Cut, what: str, instead: str) -> None:
    """Refuse a body whose output on the probe is not the ``(B, nf, h, w)`` map ``cut`` says."""
    shapes: list[object] = []
    handle = body.register_forward_hook(lambda module, args, out: shapes.append(shape_of(out)))
    try:
        batch = probe_forward(body, cut.input_size, before_real=shapes.clear)
    except Exception as err:  # any failure of the body's forward: refused, naming it
        raise CutError(f"{what} fails on a {cut.input_size} input ({type(err).__name__}: {first_line(err)}); {instead}") from err
    finally:
        handle.remove()
    got, want = shapes[-1] if shapes else None, (batch, *cut.feature_shape)
    if got != want:
        shown = f"shape (B, {', '.join(map(str, got[1:]))})" if isinstance(got, tuple) and got else f"{got!r}"
        raise CutError(
            f"{what} returns {shown} for input {cut.input_size}, not the feature map the cut says: "
            f"{cut.nf}x{cut.grid[0]}x{cut.grid[1]} at {cut.where!r} ({cut.layout.value}); {instead}"
        )


def _instead(model: nn.Module, cut: int | Callable, found: Cut) -> str:
    """What cut to pass where a user's body goes on past the map found in it (pools, flattens)."""
    names = [name for name, _ in model.named_children()]
    child = found.after.split(".")[0]
    if isinstance(cut, int) and found.after == child and child in names:  # the cut ends a whole child
        n = names.index(child) + 1
        instead = n if cut > 0 else n - len(names)
        if instead == cut:  # the last child kept makes the map, then returns more than it
            return (f"{child!r}, the last child kept, makes the map but returns more than it: "
                    f"pass a callable that returns the map, or cut=None to find the cut")
        return (f"it goes on after {child!r} (pooling or flattening): pass cut={instead} "
                f"(the children up to {child!r}) or cut=None to find the cut")
    end = f"{found.after!r}" if found.after else f"the node {found.where!r}"
    return f"it goes on after {end} (pooling or flattening): end the body there, or pass cut=None to find the cut"
