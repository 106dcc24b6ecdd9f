"""Trace a model into a graph and learn the shape of every value, at no weight-memory cost.

Tracing uses torch.fx with timm's registry of non-traceable modules and functions, so timm models
trace as timm's own feature extraction traces them. Shapes come from running the graph on the
meta device (or on fake tensors when the model has real weights): no real compute, no copy of the
weights. A model fx cannot trace gets a graph of the ATen ops its forward runs instead
(:func:`trace_aten`: one meta forward recorded, else torch.export's), and one whose forward reads
values is probed with module hooks (:mod:`autocut.cut_hooks`).
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import io
import math
import operator
import re
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import feature_extraction as tv_fx

from autocut._gc import gc_paused
from autocut.probe import (
    PROBE_BATCH,
    eval_mode,
    meta_first,
    model_device,
    model_dtype,
    modes_kept,
    probe_input,
    quiet_loggers,
    set_mode,
    shape_of,
    weights_on_meta,
)

__all__ = ["Traced", "trace", "trace_exported", "trace_dispatched", "trace_aten", "trace_graph", "constants_attached",
           "tracer_kwargs", "concrete_args_of", "has_hooks", "forward_of", "op_name", "attribute_at"]


def forward_of(model: nn.Module) -> Callable[..., Any]:
    """The function ``model(x)`` runs, taking the module first: its class's ``forward``, or the
    one set on the instance (``model.forward = types.MethodType(fn, model)``, as packages that
    split a model into ``features()`` and ``logits()`` do), which Python calls instead.

    torch.fx traces the class's; autocut traces, probes and runs this one, so a class forward
    that reads an attribute the instance renamed (``fc``, now ``last_linear``) is never run.

    Example:
        >>> model.forward = types.MethodType(lambda self, x: self.logits(self.features(x)), model)
        >>> forward_of(model)(model, x)  # the same as model(x)
    """
    own = vars(model).get("forward")
    if own is None:
        return type(model).forward
    if isinstance(own, types.MethodType) and own.__self__ is model and isinstance(own.__func__, types.FunctionType):
        return own.__func__
    return _taking_module(own)


def _taking_module(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function of ``(module, *fn's parameters)`` that calls ``fn`` (a closure, a partial, another
    module's method set as the forward): fx names its placeholders after the parameters it reads."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = None
    plain = params is not None and all(
        p.kind == p.POSITIONAL_OR_KEYWORD and p.name.isidentifier() and p.name not in ("module", "_fn") for p in params
    )
    if not plain:
        def forward(module, *args, **kwargs):
            return fn(*args, **kwargs)

        return forward
    names = ", ".join(p.name for p in params)
    namespace: dict[str, Any] = {"_fn": fn}
    exec(f"def forward(module, {names}):\n    return _fn({names})", namespace)  # names checked: identifiers only
    forward = namespace["forward"]
    forward.__defaults__ = tuple(p.default for p in params if p.default is not p.empty) or None
    return forward


def tracer_kwargs() -> dict[str, Any]:
    """The leaf modules and wrapped functions the tracer treats as opaque: timm's registry plus
    torchvision's ops, as timm's and torchvision's own feature extractors use them."""
    from timm.models import get_notrace_functions, get_notrace_modules

    leaf = list(get_notrace_modules())
    for cls in tv_fx._get_leaf_modules_for_ops() if hasattr(tv_fx, "_get_leaf_modules_for_ops") else ():
        if cls not in leaf:
            leaf.append(cls)
    return {
        "leaf_modules": leaf,
        "autowrap_functions": list(get_notrace_functions()),
        "autowrap_modules": (math, torchvision.ops),
    }


class _ScopeTracer(tv_fx.NodePathTracer):
    """torchvision's NodePathTracer that also records the module each node was created in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.node_scope: dict[fx.Node, str] = {}
        self.constants: dict[str, torch.Tensor] = {}  # tensors made in forward: fx's _tensor_constantN
        self._name_counts: dict[str, int] = {}
        self._names: set[str] = set()
        self._forward: Callable[..., Any] | None = None  # the root's forward set on the instance, where it has one

    def _get_node_qualname(self, module_qualname: str, node: fx.Node) -> str:
        # torchvision's naming ("layer1.0.relu_1": fx's global suffix replaced by one counted
        # per name), with a dict instead of its scan over all earlier names, which is quadratic
        # and took half of the discovery time of a 40-block ViT.
        name = module_qualname
        if node.op != "call_module":
            name = f"{name}.{node}" if name else str(node)
        if re.match(r".+_[0-9]+$", name):
            name = name.rsplit("_", 1)[0]
        count = self._name_counts.get(name, 0)
        qual = name if count == 0 else f"{name}_{count}"
        while qual in self._names:
            count += 1
            qual = f"{name}_{count}"
        self._name_counts[name] = count + 1
        self._names.add(qual)
        return qual

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        # a module with hooks of its own (the user's) stays a call in the graph: inlined, its
        # hooks would run once while tracing and never again on the body's forwards
        return has_hooks(m) or super().is_leaf_module(m, module_qualname)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        # fx's Graph.create_node walks every argument of a call with pytree to warn of a raw
        # SymInt, which symbolic tracing never makes (a sixth of a trace): the node is made
        # without its arguments, then given them, as fx's own passes assign them
        if self.check_mutable_operations or not (args or kwargs):
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        node = super().create_node(kind, target, (), {}, name, type_expr)
        node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        self.node_scope[proxy.node] = self.current_module_qualname
        return proxy

    def trace(self, root, concrete_args=None):
        # fx finds a tensor's attribute name by scanning all of the root's parameters or
        # buffers each time one is used; a dict made once per trace gives the same first name
        self._tensors: dict[int, tuple[str, torch.Tensor]] = {}
        self._named: tuple[dict[int, tuple[str, torch.Tensor]], ...] = ({}, {})  # parameters, buffers: id -> first name
        self._forward = None
        search = list(self._autowrap_search)
        if isinstance(root, nn.Module):
            for named, names in zip((root.named_parameters(), root.named_buffers()), self._named):
                for qualname, t in named:
                    self._tensors.setdefault(id(t), (qualname, t))
                    names.setdefault(id(t), (qualname, t))
            if "forward" in vars(root):  # fx traces the class's forward; the instance runs its own
                self._forward = forward_of(root)
                home = sys.modules.get(getattr(vars(root)["forward"], "__module__", None) or "")
                if home is not None:  # wrap the functions (math, timm's) its own module calls, as fx does the class's
                    self._autowrap_search.append(home)
        try:
            with _cached_bytecode(), _training_reads(root, self) as reads:
                self.training_reads = reads
                return super().trace(root, concrete_args)
        finally:
            self._autowrap_search = search

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        # fx finds a parameter or buffer a forward reads (timm's LayerNorm: self.weight) by scanning
        # all of the root's parameters, then buffers, each time: the dicts made once per trace give
        # the same first name (and the same node, from the same cache)
        params, buffers = self._named
        found = None
        if isinstance(attr_val, nn.Parameter):
            found = params.get(id(attr_val))
        if found is None and self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor):
            found = buffers.get(id(attr_val))
        if found is None or found[1] is not attr_val:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name = found[0]
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        return super().create_args_for_root(self._forward if is_module and self._forward else root_fn, is_module,
                                            concrete_args)

    def create_arg(self, a: Any):
        # the commonest arguments first: fx checks each against parameters, tensors, modules and
        # a registry of opaque types (weak-dict lookups along the MRO) before it reaches them
        if isinstance(a, fx.Proxy):
            return a.node
        kind = type(a)
        if kind in _PLAIN_TYPES:
            return a
        if kind is tuple or kind is list:  # (not a namedtuple, which fx makes a node of)
            return kind(self.create_arg(v) for v in a)
        if isinstance(a, torch.Tensor):
            found = self._tensors.get(id(a))
            if found is not None and found[1] is a and attribute_at(self.root, found[0]) is a:
                return self.create_node("get_attr", found[0], (), {})
        return super().create_arg(a)


_PLAIN_TYPES = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                          torch.layout, type(Ellipsis)})
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre or backward hooks registered on it: it is
    traced as a leaf, so that they fire on each call of the body as they did on the model."""
    held = vars(module)  # (a module's own dict: memo keys every module of a model on each adapt)
    return any(held.get(name) for name in _HOOK_DICTS)


def attribute_at(root: nn.Module, qualname: str) -> Any:
    """``root``'s attribute at a dotted path (``"layer1.0.conv1"``), or ``None`` where there is none."""
    value: Any = root
    for part in qualname.split("."):
        value = getattr(value, part, None)
    return value


_READS_LOCK = threading.Lock()


@contextlib.contextmanager
def _training_reads(root: Any, tracer: fx.Tracer):
    """Within the block, every read of a module's ``training`` flag is recorded as the number of
    graph nodes ``tracer`` had made by then: where no code read it before the cut was made, the
    train-mode graph up to the cut is the eval-mode one (``GraphBody`` needs no second trace).
    Yields the list, or ``None`` where reads cannot all be seen: a module class with a
    ``training`` of its own or a ``train()`` that does more than set flags, another thread tracing."""
    modules = list(root.modules()) if isinstance(root, nn.Module) else []
    seen = all(type(m).train is nn.Module.train
               and not any("training" in vars(c) for c in type(m).__mro__ if c not in (nn.Module, object)) for m in modules)
    if not modules or not seen or not _READS_LOCK.acquire(blocking=False):
        yield None
        return
    reads: list[int] = []

    def read(module: nn.Module) -> bool:
        graph = getattr(tracer, "graph", None)
        reads.append(len(graph.nodes) if graph is not None else 0)
        try:
            return module.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None

    def write(module: nn.Module, value: bool) -> None:
        module.__dict__["training"] = value

    nn.Module.training = property(read, write)  # a data descriptor: found before the instance's own flag
    try:
        yield reads
    finally:
        del nn.Module.training
        _READS_LOCK.release()


class _CachedDis:
    """``dis`` for fx's proxies while autocut traces: ``x, y = proxy`` makes fx disassemble the
    calling function, once per unpacking (a fifth of a Swin trace); here once per function."""

    def __init__(self):
        self._cache: dict[Any, list] = {}

    def get_instructions(self, code, *args, **kwargs):
        if args or kwargs:
            return dis.get_instructions(code, *args, **kwargs)
        found = self._cache.get(code)
        if found is None:
            found = self._cache[code] = list(dis.get_instructions(code))
        return iter(found)

    def __getattr__(self, name: str) -> Any:
        return getattr(dis, name)


@contextlib.contextmanager
def _cached_bytecode():
    from torch.fx import proxy as fx_proxy

    saved = fx_proxy.dis
    fx_proxy.dis = _CachedDis()
    try:
        yield
    finally:
        fx_proxy.dis = saved


def concrete_args_of(model: nn.Module) -> dict[str, Any]:
    """Fix every optional forward argument to its default (``mask=None``, ``is_causal=False``):
    only the image is traced symbolically."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            out[p.name] = p.default
    return out


def _same_layout(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)``. Where ``x`` is dense in one memory format and has no size-1
    dimension, that keeps ``x``'s strides: made directly (on meta and fake tensors ``empty_like``
    works them out in Python, a fifth of a probe's ops)."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if dense and min(x.shape, default=0) > 1:
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _contiguous(x: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """A new contiguous tensor shaped like ``x`` (with ``last`` as its last dimension); without
    ``last``, what ``x.contiguous()`` would be laid out as (``x``'s own strides, size-1 dimensions
    included, where it already is)."""
    if last is None and x.is_contiguous():
        return _same_layout(x)
    shape = x.shape if last is None else (*x.shape[:-1], last)
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _dtype_fits(module: nn.Module, x: torch.Tensor) -> bool:
    own = vars(module)
    return all(t.dtype == x.dtype for t in (*own["_parameters"].values(), *own["_buffers"].values())
               if t is not None and t.is_floating_point())


def _output_like(module: nn.Module, x: Any) -> torch.Tensor | None:
    """What ``module(x)`` returns on meta or fake tensors, made without running it: the shape,
    dtype and strides of the module's own meta kernel, for the leaf modules whose meta kernels are
    slow Python decompositions (norms: half of a probe) or trivial (activations, dropout in eval).
    ``None`` where no rule applies or the input would not fit (the module then runs, and raises)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("meta", "cpu", "cuda") or not _dtype_fits(module, x):
        return None
    kind = type(module)
    if kind in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d):  # (in eval mode: the input itself)
        return x
    if kind in _ELEMENTWISE_MODULES:
        return x if getattr(module, "inplace", False) else _same_layout(x)
    if kind in _BATCH_NORMS:
        return _same_layout(x) if x.dim() >= 2 and x.shape[1] == module.num_features else None
    if kind is nn.LayerNorm:
        n = len(module.normalized_shape)
        return _contiguous(x) if tuple(x.shape[x.dim() - n:]) == tuple(module.normalized_shape) else None
    if kind is nn.GroupNorm:
        return _contiguous(x) if x.dim() >= 2 and x.shape[1] == module.num_channels else None
    if kind is nn.Linear:
        return _contiguous(x, module.out_features) if x.dim() >= 1 and x.shape[-1] == module.in_features else None
    return None


def _attention_like(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention(q, k, v)``'s output on the meta device (contiguous, as its
    meta kernel makes it; on fake tensors the backend chosen decides the strides: it runs)."""
    if len(args) != 3 or kwargs.get("attn_mask") is not None or set(kwargs) - {"attn_mask", "dropout_p", "is_causal",
                                                                                  "scale"}:
        return None
    q, k, v = args
    if not all(isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dtype == q.dtype and t.dim() == 4
               for t in (q, k, v)):
        return None
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return None
    return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device="meta")


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _binary_like(a: Any, b: Any) -> torch.Tensor | None:
    """``a + b`` (``-``, ``*``, ``/``) where the result is plainly ``a``'s layout: two tensors of the
    same shape, strides, dtype and device (a residual), or a floating-point tensor and a Python
    number. ``None`` for anything that broadcasts or promotes (it runs)."""
    if isinstance(b, torch.Tensor) and not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return None
    if isinstance(b, torch.Tensor):
        if (b.dtype, b.device) != (a.dtype, a.device) or not _dense(a):
            return None
        if (b.shape, b.stride()) == (a.shape, a.stride()):
            return _same_layout(a)
        # the other broadcast onto a map with no size-1 dimension (a per-channel scale): the map's layout
        if b.dim() <= a.dim() and min(a.shape) > 1 and torch.broadcast_shapes(a.shape, b.shape) == a.shape:
            return _same_layout(a)
        return None
    return _same_layout(a) if type(b) in (int, float) and _dense(a) else None


def _norm_classes() -> tuple[type, ...]:
    from timm.layers import BatchNormAct2d  # a BatchNorm2d and an activation: timm's leaf

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNormAct2d)


_BATCH_NORMS = frozenset(_norm_classes())
_ELEMENTWISE_MODULES = frozenset({
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.LeakyReLU,
    nn.ELU,
})
_BINARY_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                               torch.mul, torch.div})
_ELEMENTWISE_FUNCTIONS = frozenset({
    torch.nn.functional.gelu, torch.nn.functional.relu, torch.nn.functional.silu, torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid, torch.nn.functional.mish, torch.sigmoid, torch.tanh, torch.relu,
})


class _Unkeyed(Exception):
    """An argument :func:`_metadata_key` cannot stand for by its metadata alone."""


_KEY_SCALARS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                          torch.layout, type(Ellipsis)})


def _metadata_key(value: Any) -> Any:
    """A hashable stand-in for an op's argument, equal for two arguments a meta kernel cannot
    tell apart: a meta tensor by its shape, strides, offset and dtype; numbers and other plain
    values by type and value; containers of those. Raises :class:`_Unkeyed` for anything else
    (a fake or real tensor, whose values an op may read; a module; a function)."""
    kind = type(value)
    if kind in _KEY_SCALARS:
        return kind, value
    if isinstance(value, torch.Tensor):
        if kind not in (torch.Tensor, nn.Parameter) or value.device.type != "meta":
            raise _Unkeyed
        return value.shape, value.stride(), value.storage_offset(), value.dtype, value.requires_grad
    if isinstance(value, (tuple, list)):  # (fx's immutable_list and torch.Size among them)
        return kind, tuple(_metadata_key(v) for v in value)
    if isinstance(value, dict):
        return kind, tuple((k, _metadata_key(v)) for k, v in value.items())
    if kind is slice:
        return kind, _metadata_key(value.start), _metadata_key(value.stop), _metadata_key(value.step)
    raise _Unkeyed


def _metadata_of(out: Any) -> Any:
    """What :func:`_made_like` needs to make ``out`` again (a meta tensor's metadata, plain values,
    containers of those), or ``None`` where it cannot (any other object: it is not kept)."""
    kind = type(out)
    if kind is torch.Tensor and out.device.type == "meta":
        return "tensor", out.shape, out.stride(), out.storage_offset(), out.dtype
    if kind in _KEY_SCALARS and kind is not type(None) or kind is torch.Size:
        return "value", out
    if kind in (tuple, list):
        inner = [_metadata_of(v) for v in out]
        return None if any(m is None for m in inner) else (kind, inner)
    return None


def _made_like(meta: Any) -> Any:
    """A new value with the metadata :func:`_metadata_of` kept: a fresh meta tensor (its own
    storage, as large as its strides and offset reach), the same plain value, a new container."""
    kind = meta[0]
    if kind == "value":
        return meta[1]
    if kind == "tensor":
        _, shape, stride, offset, dtype = meta
        if offset == 0:
            return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        extent = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else offset
        return torch.empty(extent, dtype=dtype, device="meta").as_strided(shape, stride, offset)
    return kind(_made_like(m) for m in meta[1])


def _keeps_metadata(op: str, target: Any, kwargs: dict) -> bool:
    """Whether an op's result on meta tensors is a function of its arguments' metadata alone and
    changes no argument's metadata: torch's and Python's operators, not in place (``x.t_()``,
    ``operator.setitem``), not into ``out=``, and torch's own modules (a convolution, a pool,
    an attention made of torch's modules only, none with hooks; ``target``: the module); the
    model's own functions and modules (which may keep state) run."""
    if kwargs.get("out") is not None:
        return False
    if op == "call_module":
        inside = vars(target)["_modules"]
        return type(target).__module__.startswith("torch.nn.modules.") and not (inside and any(
            not type(m).__module__.startswith("torch.nn.modules.") or has_hooks(m) for m in target.modules()))
    if op == "call_method":
        return isinstance(target, str) and not (target.endswith("_") and not target.endswith("__"))
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return False
    home = getattr(target, "__module__", None) or ""
    if home == "_operator":
        return name not in _IN_PLACE_OPERATORS
    return (home == "torch" or home.startswith("torch.")) and target is not torch._assert


def _module_key(module: nn.Module) -> Any:
    """:func:`_metadata_key` of what a torch module's forward reads: the class, parameters, buffers
    and attributes (a convolution's stride, padding, groups) of it and of each module inside it."""
    def own(m: nn.Module) -> Any:
        held = vars(m)
        return (type(m), _metadata_key(held["_parameters"]), _metadata_key(held["_buffers"]),
                tuple((k, _metadata_key(v)) for k, v in held.items() if k not in _MODULE_INTERNALS))

    if not vars(module)["_modules"]:
        return own(module)
    return tuple((path, own(m)) for path, m in module.named_modules())


def _call(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    return module(*args, **kwargs)


_IN_PLACE_OPERATORS = frozenset({"setitem", "delitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
                                 "ipow", "imatmul", "iand", "ior", "ixor", "ilshift", "irshift", "iconcat"})


class _ShapeRecorder(fx.Interpreter):
    # Values are kept (garbage_collect_values=False): levit and efficientformer cache attention
    # biases across calls, and meta/fake values cost no memory.
    def __init__(self, root: nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor], meta_tensors: bool = False):
        # run the graph against the traced model itself: a GraphModule would be built (and its
        # code generated) only to be thrown away
        super().__init__(root, garbage_collect_values=False, graph=graph)
        self.shapes: dict[fx.Node, Any] = {}
        self.constants = constants
        # with meta_tensors, every tensor the graph reads (fx's constants, a tensor a module keeps
        # as a plain attribute: a Swin's attention mask) stands in as a meta tensor, as a meta
        # model's do (a scalar mixes with meta tensors as it is)
        self.meta_tensors = meta_tensors
        # an op's result on meta tensors, by what its arguments' metadata are: a model's repeated
        # blocks call each op with the same shapes again (five in six calls), and meta kernels
        # are Python (a group norm's: 2 ms)
        self.made: dict[Any, Any] = {}

    def fetch_attr(self, target: str) -> Any:
        found = self.constants.get(target)
        value = found if found is not None else super().fetch_attr(target)
        if self.meta_tensors and isinstance(value, torch.Tensor) and value.device.type != "meta" and value.dim():
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return value

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = shape_of(out)
        return out

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if has_hooks(module) or module.training:  # (a user's hooks, or batch statistics: it runs)
            return super().call_module(target, args, kwargs)
        return self._module_output(module, args, kwargs)

    def _module_output(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """What a leaf module (no hooks of its own, in eval mode) returns: a shortcut's output; for a
        leaf ``nn.Sequential`` (torchvision's ``Conv2dNormActivation``), each child's in turn; made
        again from an earlier call's metadata; else it runs."""
        if len(args) == 1 and not kwargs:
            out = _output_like(module, args[0])
            if out is not None:
                return out
            if type(module).forward is nn.Sequential.forward:  # (what Sequential.forward does)
                x = args[0]
                for child in vars(module)["_modules"].values():
                    x = child(x) if has_hooks(child) or child.training else self._module_output(child, (x,), {})
                return x
        return self._by_metadata("call_module", module, args, kwargs)
    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in _BINARY_FUNCTIONS and len(args) == 2 and not kwargs:
            out = _binary_like(*args)
            if out is not None:
                return out
        if target in _ELEMENTWISE_FUNCTIONS and len(args) == 1 and isinstance(args[0], torch.Tensor) and (
                set(kwargs) <= {"approximate", "inplace"}):
            return args[0] if kwargs.get("inplace") else _same_layout(args[0])
        if target is torch.nn.functional.scaled_dot_product_attention:
            out = _attention_like(args, kwargs)
            if out is not None:
                return out
        if target is torch.nn.functional.layer_norm and args and isinstance(args[0], torch.Tensor):
            x, weight = args[0], args[2] if len(args) > 2 else kwargs.get("weight")
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            fits = weight is None or (isinstance(weight, torch.Tensor) and weight.dtype == x.dtype)
            if fits and isinstance(shape, (tuple, list, torch.Size)) and tuple(x.shape[x.dim() - len(shape):]) == tuple(shape):
                return _contiguous(x)
        return self._by_metadata("call_function", target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._by_metadata("call_method", target, args, kwargs)

    def _by_metadata(self, op: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The op's result: made again from the metadata of an earlier call with arguments of the
        same metadata (:func:`_metadata_key`), else run (and its result's metadata kept). A
        module (``target`` of a ``call_module``: the module itself) is keyed by what each module of
        it holds (:func:`_module_key`), not by its name."""
        run = {"call_function": super().call_function, "call_method": super().call_method,
               "call_module": _call}[op]
        if not _keeps_metadata(op, target, kwargs):
            return run(target, args, kwargs)
        try:
            what = _module_key(target) if op == "call_module" else target
            key = (op, what, _metadata_key(args), _metadata_key(kwargs))
            made = self.made.get(key)
        except (_Unkeyed, TypeError):  # (TypeError: an unhashable target)
            return run(target, args, kwargs)
        if made is not None:
            return _made_like(made)
        out = run(target, args, kwargs)
        made = _metadata_of(out)
        if made is not None:
            self.made[key] = made
        return out


@dataclass
class Traced:
    """A traced model: its eval-mode graph, the module scope and the shape of every node."""

    model: nn.Module
    graph: fx.Graph
    qualname: dict[fx.Node, str]
    scope: dict[fx.Node, str]
    shapes: dict[fx.Node, Any]
    input: fx.Node
    input_shape: tuple[int, ...]
    concrete_args: dict[str, Any] = field(default_factory=dict)
    shape_method: str = "meta"  # "meta" (a meta model), "weights on meta" (a real one's, see trace()) or "fake"
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # the graph's _tensor_constantN
    # how the graph was captured: "fx" (symbolic trace); ATen ops by "dispatch" (one meta forward recorded) or "export"
    capture: str = "fx"
    training_reads: tuple[int, ...] | None = None  # graph length at each read of a module's training flag (fx)

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)

    def node_named(self, name: str) -> fx.Node | None:
        for node, qual in self.qualname.items():
            if qual == name:
                return node
        return None


@gc_paused()
def trace_graph(model: nn.Module, training: bool = False) -> tuple[fx.Graph, _ScopeTracer, dict[str, Any]]:
    """Trace ``model`` in train or eval mode with autocut's tracer (each module's own mode
    restored afterwards).

    Tensors the forward creates (``torch.tensor(...)``, index tables) become ``get_attr`` nodes of
    ``_tensor_constantN``; fx stores them on the model, autocut moves them to ``tracer.constants``
    so the user's model is left as it was. :func:`constants_attached` puts them back for a block.
    """
    concrete = concrete_args_of(model)
    before = set(vars(model))
    tracer = _ScopeTracer(**tracer_kwargs())
    try:
        with modes_kept(model):
            set_mode(model, training)
            _purge_proxies(model)
            graph = tracer.trace(model, concrete_args=concrete or None)
    finally:
        _purge_proxies(model)
        for name in [k for k in vars(model) if k not in before and k.startswith("_tensor_constant")]:
            tracer.constants[name] = vars(model).pop(name)
    return graph, tracer, concrete


@contextlib.contextmanager
def constants_attached(model: nn.Module, constants: dict[str, torch.Tensor]):
    """Within the block, ``constants`` (from :func:`trace_graph`) are attributes of ``model``, as
    fx left them: a GraphModule built from the graph copies them, and a new trace names its own
    constants past them. Removed on exit, with any constant a trace in the block left behind."""
    before = set(vars(model))
    added = [name for name in constants if name not in before]
    for name in added:
        vars(model)[name] = constants[name]
    try:
        yield model
    finally:
        for name in added + [k for k in vars(model) if k not in before and k.startswith("_tensor_constant")]:
            vars(model).pop(name, None)


def _purge_proxies(model: nn.Module) -> None:
    """Drop fx proxies that a trace left in module caches (levit's and efficientformer's
    attention-bias caches): a later trace would reuse a node of the old graph. (torch.export
    takes back the tensors it sees assigned itself.)"""
    for module in model.modules():
        if type(module).__module__.startswith("torch.nn."):  # (torch's own modules keep no caches)
            continue
        for name, value in list(vars(module).items()):
            # nn.Module's own dicts (parameters, buffers, submodules, hooks) never hold proxies
            if isinstance(value, dict) and name not in _MODULE_INTERNALS:
                for key in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                    del value[key]


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@gc_paused()
def trace(model: nn.Module, input_size: tuple[int, int, int], batch: int = PROBE_BATCH) -> Traced:
    """Trace ``model`` (eval graph) and record every node's output shape for a
    ``(batch, *input_size)`` input.

    Meta models run on meta tensors; so do models with real weights, each weight (and each tensor
    the graph reads) stood in for by a meta tensor of its shape while the graph runs
    (:func:`~autocut.probe.weights_on_meta`), and where that fails (code that reads a value, a
    tensor a leaf module keeps meeting a meta one), on fake tensors. Their weights are never
    copied or touched. Raises whatever tracing or propagation raised: callers fall back to module
    hooks (:mod:`autocut.cut_hooks`).
    """
    graph, tracer, concrete = trace_graph(model, training=False)
    device, dtype = model_device(model), model_dtype(model)
    shape = (batch, *input_size)
    method = "meta" if device.type == "meta" else "weights on meta"
    recorder = _ShapeRecorder(tracer.root, graph, tracer.constants, meta_tensors=method != "meta")
    with eval_mode(model), torch.no_grad():
        try:
            with weights_on_meta(model), probe_input(shape, torch.device("meta"), dtype=dtype) as x:
                recorder.run(x)
        except Exception:  # (any failure on meta tensors) the real weights as fake tensors, next; raises what they raise
            if method == "meta":
                raise
            recorder, method = _ShapeRecorder(tracer.root, graph, tracer.constants), "fake"
            with probe_input(shape, device, dtype=dtype) as x:
                recorder.run(x)
    return Traced(
        model=model,
        graph=graph,
        qualname=dict(tracer.node_to_qualname),
        scope=dict(tracer.node_scope),
        shapes=recorder.shapes,
        input=next(n for n in graph.nodes if n.op == "placeholder"),
        input_shape=shape,
        concrete_args=concrete,
        shape_method=method,
        constants=tracer.constants,
        training_reads=None if tracer.training_reads is None else tuple(tracer.training_reads),
    )


def op_name(node: fx.Node) -> str | None:
    """The ATen op a node of an exported graph calls (``"conv2d"``, ``"permute"``), else ``None``."""
    target = node.target
    return target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else None


def trace_exported(model: nn.Module, input_size: tuple[int, int, int], batch: int = PROBE_BATCH) -> Traced:
    """:func:`trace` by ``torch.export`` (non-strict), for models torch.fx cannot trace (a forward
    wrapped in decorators, ``**kwargs`` plumbing, structured outputs built in Python).

    The exported graph is of ATen ops, every module inlined; each node's module comes from the
    export's ``nn_module_stack`` and its shape from the export's own fake values, so there is no
    second run. Parameters, buffers and constants become ``get_attr`` nodes, as in an fx graph.
    A graph to find a cut on, not to run: a cut found on it is made with module hooks
    (:mod:`autocut.cut_export`). Raises whatever the export raised.
    """
    shape = (batch, *input_size)
    with eval_mode(model), torch.no_grad():
        try:
            x = torch.empty(shape, device=model_device(model), dtype=model_dtype(model))
            printed = io.StringIO()
            # a failed export logs why and prints the partial graph to stderr; the error says why
            # (listed in the CutError where every rule fails), and the hooks rule comes next
            with quiet_loggers("torch.fx.experimental.symbolic_shapes", "torch.export._trace"), \
                    contextlib.redirect_stderr(printed):
                program = torch.export.export(model, (x,), strict=False)
            sys.stderr.write(printed.getvalue())  # (what an export that worked printed is shown)
        finally:
            _purge_proxies(model)
    graph = program.graph
    signature = program.graph_signature
    attributes = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                  **signature.inputs_to_lifted_tensor_constants}
    constants = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node in placeholders:
        target = attributes.get(node.name)
        if target is None:
            continue
        if target in program.constants:  # a tensor the forward made: kept apart, as fx's constants are
            constants[target] = program.constants[target]
        with graph.inserting_before(first_op):
            attr = graph.create_node("get_attr", target)  # (graph.get_attr warns: the program holds no such attribute)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    source = next(n for n in graph.nodes if n.op == "placeholder" and n.name == signature.user_inputs[0])
    scope = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        scope[node] = list(stack.values())[-1][0] if stack else ""
    return Traced(
        model=model,
        graph=graph,
        qualname={n: n.name for n in graph.nodes},
        scope=scope,
        shapes={n: shape_of(n.meta.get("val")) for n in graph.nodes},
        input=source,
        input_shape=shape,
        shape_method="meta" if model_device(model).type == "meta" else "fake",
        constants=constants,
        capture="export",
    )


class _OpRecorder(TorchDispatchMode):
    """Records each ATen op a forward dispatches as a node of ``graph``: its arguments the nodes
    that made the tensors it reads (a parameter, buffer or other tensor the forward did not make: a
    ``get_attr`` node), its shape, and the module it ran in."""

    def __init__(self, graph: fx.Graph, names: dict[int, str]):
        super().__init__()
        self.graph = graph
        self.names = names  # id() of each parameter and buffer -> its qualified name
        self.made: dict[int, fx.Node] = {}  # id() of each tensor seen -> the node that made it (last wrote it)
        self.alive: list[torch.Tensor] = []  # every tensor seen, so that no id is reused while recording
        self.path: list[str] = [""]  # the modules running, innermost last
        self.scope: dict[fx.Node, str] = {}
        self.shapes: dict[fx.Node, Any] = {}
        self.constants: dict[str, torch.Tensor] = {}

    def node(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None, value: Any = None) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs or {})
        self.scope[node] = self.path[-1]
        self.shapes[node] = shape_of(value)
        return node

    def made_by(self, t: torch.Tensor) -> fx.Node:
        node = self.made.get(id(t))
        if node is None:  # a tensor no op made while recording: a weight, else a constant of the forward
            name = self.names.get(id(t))
            if name is None:
                name = f"_tensor_constant{len(self.constants)}"
                self.constants[name] = t
            node = self.keep(t, self.node("get_attr", name, value=t))
        return node

    def keep(self, t: torch.Tensor, node: fx.Node) -> fx.Node:
        self.made[id(t)] = node
        self.alive.append(t)
        return node

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        node_args, node_kwargs = pytree.tree_map_only(torch.Tensor, self.made_by, (args, kwargs))
        node = self.node("call_function", func, tuple(node_args), node_kwargs, value=out)
        if isinstance(out, torch.Tensor):
            self.keep(out, node)
        elif isinstance(out, (tuple, list)):  # each tensor of a multi-output op by its own getitem node, as fx has
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self.keep(t, self.node("call_function", operator.getitem, (node, i), value=t))
        for arg, spec in zip(args, func._schema.arguments):  # a tensor written in place holds the op's value from here on
            if isinstance(arg, torch.Tensor) and spec.alias_info is not None and spec.alias_info.is_write:
                if arg is not out:
                    self.keep(arg, node)
                base = arg._base
                if base is not None:  # written through a view: the base holds what was written from here on
                    self.keep(base, self.node("call_function", _written, (self.made_by(base), node), value=base))
        return out


def _written(base: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """Marks, in a recorded graph (:func:`trace_dispatched`), the tensor ``base`` after an in-place
    op wrote to a view of it (``x[:, 0] = cls``): it depends on both. Never run."""
    raise NotImplementedError("a recorded graph is read, not run")


def trace_dispatched(model: nn.Module, input_size: tuple[int, int, int], batch: int = PROBE_BATCH) -> Traced:
    """:func:`trace_exported` at the cost of one meta forward: each ATen op the eager forward
    dispatches on meta tensors (a model with real weights: meta stand-ins of them; a forward that
    reads values unless traced: fake tensors, :func:`~autocut.probe.meta_first`) recorded as a
    node, in the module it ran in (module hooks), with its shape. The graph is what the forward
    ran, ops as the dispatcher sees them (``linear`` as ``addmm`` and views, no dropout in eval);
    an in-place op makes a new node for the tensor it wrote (and for the base of a view it wrote
    to: torch.export's graph keeps such a write as an op nothing reads), as the op's schema says
    (``native_batch_norm`` writes running statistics in training without saying so: not seen). A
    tensor viewed before a write to its base keeps the node it had. Raises what the meta forward
    raised where fake tensors cannot run it either (code that reads values): callers fall back to
    :func:`trace_exported`."""
    shape = (batch, *input_size)

    def record() -> Traced:
        graph = fx.Graph()
        names = {id(t): name for name, t in [*model.named_parameters(remove_duplicate=False),
                                             *model.named_buffers(remove_duplicate=False)]}
        recorder = _OpRecorder(graph, names)
        x = torch.empty(shape, device=model_device(model), dtype=model_dtype(model))  # (meta, else a fake one)
        source = recorder.keep(x, recorder.node("placeholder", "x", value=x))

        def enter(path):
            return lambda module, args: recorder.path.append(path)

        def leave(module, args, output):
            recorder.path.pop()

        handles = []
        for path, module in model.named_modules():
            if path:
                handles += [module.register_forward_pre_hook(enter(path)), module.register_forward_hook(leave)]
        try:
            with recorder:
                out = model(x)
        finally:
            for h in handles:
                h.remove()
        graph.output(tuple(recorder.made_by(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)))
        return Traced(model=model, graph=graph, qualname={n: n.name for n in graph.nodes}, scope=recorder.scope,
                      shapes=recorder.shapes, input=source, input_shape=shape, constants=recorder.constants,
                      shape_method="fake" if isinstance(x, FakeTensor) else "meta", capture="dispatch")

    with eval_mode(model), torch.no_grad():
        return meta_first(model, record, real=False)  # (fake tensors where meta ones fail: code that reads values unless traced)


def trace_aten(model: nn.Module, input_size: tuple[int, int, int], batch: int = PROBE_BATCH) -> Traced:
    """The forward's graph of ATen ops, for models torch.fx cannot trace: one meta (else fake)
    forward recorded (:func:`trace_dispatched`), else torch.export's (:func:`trace_exported`).
    Raises what the export raised."""
    try:
        return trace_dispatched(model, input_size, batch)
    except Exception:  # (any failure of the forward on meta and fake tensors) torch.export, next; raises what it raises
        return trace_exported(model, input_size, batch)
