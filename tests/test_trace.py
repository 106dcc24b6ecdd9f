"""Tracing (``autocut.trace``): the graph and every value's shape at no weight-memory cost, with
torchvision's node names, and the user's model left as it was."""

import pytest
import torch
from torch import nn

from autocut import zoo
from autocut.trace import trace


@pytest.mark.parametrize(
    "name", ["swin_tiny_patch4_window7_224", "vit_tiny_patch16_224", "efficientnet_b0", "maxvit_tiny_tf_224"]
)
def test_tracer_makes_torchvisions_graph_and_node_names(name):
    # autocut's tracer caches fx's tensor-attribute lookups and bytecode reads and counts names
    # instead of scanning them: the graph and the names must be torchvision's tracer's own.
    from torchvision.models.feature_extraction import NodePathTracer

    from autocut.trace import trace_graph, tracer_kwargs

    graph, tracer, concrete = trace_graph(zoo.build(zoo.resolve(name), device="meta").eval())
    reference = NodePathTracer(**tracer_kwargs())  # on a fresh model: fx numbers the tensor
    model = zoo.build(zoo.resolve(name), device="meta").eval()  # constants it stores on the root
    expected = reference.trace(model, concrete_args=concrete or None)
    assert graph.python_code("self").src == expected.python_code("self").src
    assert list(tracer.node_to_qualname.values()) == list(reference.node_to_qualname.values())


class Net(nn.Module):
    """A conv, a functional pool, a tensor made in forward, and an optional argument."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale: float = 1.0, mask=None):
        y = self.conv(x) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
        return self.fc(y.mean((2, 3)) * scale)


def test_trace_records_every_shape_on_meta_or_fake_tensors():
    model = Net()
    weight = model.conv.weight.detach().clone()
    traced = trace(model, (3, 16, 16), batch=5)
    assert traced.shape_method == "weights on meta" and traced.input_shape == (5, 3, 16, 16)
    shapes = {traced.qualname[n]: s for n, s in traced.shapes.items() if n in traced.qualname}
    assert shapes["conv"] == (5, 4, 8, 8) and shapes["fc"] == (5, 2) and shapes["mean"] == (5, 4)
    assert traced.scope[traced.node_named("conv")] == "conv"
    assert traced.node_named("fc").op == "call_module" and traced.node_named("nowhere") is None
    assert traced.concrete_args == {"scale": 1.0, "mask": None}  # only the image is symbolic
    assert torch.equal(model.conv.weight, weight)
    meta = trace(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)).to("meta"), (3, 16, 16))
    assert meta.shape_method == "meta" and meta.shapes[meta.node_named("0")] == (11, 4, 7, 7)


def test_tensors_made_in_forward_travel_with_the_trace_not_the_model():
    model = Net()
    before = set(vars(model))
    traced = trace(model, (3, 16, 16))
    assert set(vars(model)) == before
    assert list(traced.constants) == ["_tensor_constant0"]
    assert torch.equal(traced.constants["_tensor_constant0"], torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1))


def test_trace_restores_the_models_mode_and_raises_what_tracing_raised():
    model = Net().train()
    trace(model, (3, 16, 16))
    assert model.training

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow: fx cannot trace it

    with pytest.raises(Exception, match="symbolically traced variables cannot be used as inputs to control flow"):
        trace(Branchy(), (3, 8, 8))


class _PlainShapes(torch.fx.Interpreter):
    """fx's own interpreter, every op run: the oracle for the shapes autocut's recorder makes
    without running norms, activations and attention."""

    def __init__(self, traced):
        super().__init__(traced.model, garbage_collect_values=False, graph=traced.graph)
        self.constants = traced.constants
        self.seen = {}

    def fetch_attr(self, target):
        return self.constants[target] if target in self.constants else super().fetch_attr(target)

    def run_node(self, n):
        out = super().run_node(n)
        self.seen[n] = (tuple(out.shape), out.stride(), out.dtype) if isinstance(out, torch.Tensor) else None
        return out


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "convnext_tiny", "vit_tiny_patch16_224",
                                  "swin_tiny_patch4_window7_224", "regnety_002", "mobilenetv3_small_050", "edgenext_xx_small",
                                  "poolformer_s12"])
def test_the_recorders_shortcuts_give_every_nodes_shape_stride_and_dtype_as_running_it(name):
    from autocut.probe import eval_mode
    from autocut.trace import _ShapeRecorder

    model = zoo.build(zoo.resolve(name), device="meta")
    size = zoo.default_input_size(zoo.resolve(name), model)
    traced = trace(model, size)
    shortcut = _ShapeRecorder(traced.model, traced.graph, traced.constants)
    plain = _PlainShapes(traced)
    x = torch.empty(11, *size, device="meta")
    with eval_mode(model), torch.no_grad():
        shortcut.run(x)
        plain.run(x)
    got = {n: (s, v.stride(), v.dtype) for n, s in shortcut.shapes.items() if isinstance(v := shortcut.env[n], torch.Tensor)}
    assert got == {n: v for n, v in plain.seen.items() if v is not None}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("fake", [False, True])
def test_each_shortcut_is_what_the_module_returns(layout, fake):
    import timm.layers

    from autocut.probe import probe_input
    from autocut.trace import _output_like

    device = torch.device("cpu" if fake else "meta")  # (modules moved before the fake mode starts)
    modules = [m.to(device).eval() for m in (
        nn.BatchNorm2d(8), timm.layers.BatchNormAct2d(8), nn.GroupNorm(2, 8), nn.ReLU(), nn.ReLU(inplace=True),
        nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Identity(), nn.Dropout(0.5))]
    last = [m.to(device).eval() for m in (nn.LayerNorm(8), nn.Linear(8, 5))]
    unfit = [m.to(device).eval() for m in (nn.BatchNorm2d(4), nn.Linear(4, 5), nn.LayerNorm(4), nn.GroupNorm(2, 4),
                                            nn.BatchNorm2d(8).half())]
    with probe_input((3, 8, 5, 7), device, fake=fake) as x:
        x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
             "permuted": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)}[layout]
        for module, v in [(m, x) for m in modules] + [(m, x.permute(0, 2, 3, 1)) for m in last]:
            got, want = _output_like(module, v), module(v)
            assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype), type(module)
            assert (got is v) == (want is v), type(module)  # the input itself where the module returns it
        for module in unfit:
            assert _output_like(module, x) is None  # does not fit: the module runs, and raises


class Plain(nn.Module):
    """Parameters and buffers only: nothing made in forward that a meta weight could meet."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.flatten(2).mean(-1))


def _tensor_shapes(recorded: dict) -> dict:
    return {n: s for n, s in recorded.items() if isinstance(s, tuple)}


def test_a_real_model_runs_with_its_weights_on_meta_and_is_left_untouched():
    from autocut.probe import eval_mode

    model = Plain()
    own = [(p, p.detach().clone()) for p in [*model.parameters(), *model.buffers()]]
    traced = trace(model, (3, 16, 16), batch=5)
    assert traced.shape_method == "weights on meta"
    oracle = _PlainShapes(traced)  # fx's own interpreter, on real tensors
    with eval_mode(model), torch.no_grad():
        oracle.run(torch.randn(5, 3, 16, 16))
    assert _tensor_shapes(traced.shapes) == {n: v[0] for n, v in oracle.seen.items() if v is not None}
    assert traced.shapes[traced.node_named("conv")] == (5, 4, 8, 8)
    assert all(t is u for t, (u, _) in zip([*model.parameters(), *model.buffers()], own))
    assert all(torch.equal(t, value) for t, value in own)
    assert [t.device.type for t in model.parameters()] == ["cpu"] * 6


class Repeats(nn.Module):
    """The same ops on the same shapes, again: views at an offset, tuples, sizes, convolutions of
    one configuration and of another, and an op that changes its input's shape in place."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)  # c1's configuration: made again
        self.c3 = nn.Conv2d(4, 4, 3, padding=1, stride=2)  # another stride: runs

    def forward(self, x):
        a, b = x[:, 1:], x[:, 1:] * 2
        c, d = x.chunk(2, dim=1)
        e, f = x.chunk(2, dim=1)
        y = x.flatten(2)
        y.unsqueeze_(1)  # in place: y is now (B, 1, C, HW); the next flatten is not this one
        z = x.flatten(2)
        return a, b, c, d, e, f, y, z, x.size(), x.size(), self.c1(x), self.c2(x), self.c3(x)


def test_ops_repeated_on_the_same_metadata_are_made_again_as_running_them_would(monkeypatch):
    from autocut.probe import eval_mode
    from autocut.trace import _ShapeRecorder

    runs = []
    forward = nn.Conv2d.forward
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: runs.append(self) or forward(self, x))
    model = Repeats().to("meta")
    traced = trace(model, (4, 6, 6), batch=3)
    assert runs == [model.c1, model.c3]  # c2's output made from c1's metadata

    class Seen(_ShapeRecorder):  # each value's metadata when it was made (unsqueeze_ changes one later)
        def run_node(self, n):
            out = super().run_node(n)
            self.seen[n] = (tuple(out.shape), out.stride(), out.dtype) if isinstance(out, torch.Tensor) else None
            return out

    shortcut = Seen(traced.model, traced.graph, traced.constants)
    shortcut.seen = {}
    plain = _PlainShapes(traced)
    x = torch.empty(3, 4, 6, 6, device="meta")
    with eval_mode(model), torch.no_grad():
        shortcut.run(x)
        plain.run(x)
    assert shortcut.seen == plain.seen
    shapes = {traced.qualname[n]: s for n, s in traced.shapes.items() if n in traced.qualname}
    assert shapes["unsqueeze_"] == (3, 1, 4, 36) and shapes["flatten_1"] == (3, 4, 36)
    assert shapes["c2"] == (3, 4, 6, 6) and shapes["c3"] == (3, 4, 3, 3)
    assert shortcut.env[traced.node_named("getitem_1")].storage_offset() == 36  # x[:, 1:] again, at its offset


def test_only_ops_that_change_no_metadata_and_keep_no_state_are_made_again():
    import operator

    from autocut.trace import _keeps_metadata

    assert _keeps_metadata("call_function", torch.add, {}) and _keeps_metadata("call_function", operator.getitem, {})
    assert _keeps_metadata("call_method", "view", {}) and _keeps_metadata("call_function", torch.nn.functional.gelu, {})
    assert not _keeps_metadata("call_method", "unsqueeze_", {})  # in place
    assert not _keeps_metadata("call_function", torch.relu_, {}) and not _keeps_metadata("call_function", operator.setitem, {})
    assert not _keeps_metadata("call_function", operator.iadd, {})
    assert not _keeps_metadata("call_function", torch.add, {"out": torch.empty(1)})
    assert not _keeps_metadata("call_function", Repeats.forward, {})  # the model's own code
    assert _keeps_metadata("call_module", nn.Conv2d(1, 1, 1), {})
    assert _keeps_metadata("call_module", nn.MultiheadAttention(4, 2), {})  # torch's modules all through
    assert not _keeps_metadata("call_module", Plain(), {})  # a module of the model's own (it may keep state)
    assert not _keeps_metadata("call_module", nn.Sequential(Plain()), {})  # one inside a torch module
    hooked = nn.Sequential(nn.ReLU())
    hooked[0].register_forward_hook(lambda *a: None)
    assert not _keeps_metadata("call_module", hooked, {})  # its hooks must fire


class ConvNormAct(nn.Sequential):
    """A leaf the tracer keeps whole, as torchvision's ``Conv2dNormActivation``: a Sequential."""

    def __init__(self, stride):
        super().__init__(nn.Conv2d(4, 4, 3, stride=stride, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def test_a_leaf_sequential_runs_child_by_child_and_a_childs_hooks_fire(monkeypatch):
    runs = []
    for kind in (nn.BatchNorm2d, nn.ReLU):  # shortcuts: never run
        forward = kind.forward
        monkeypatch.setattr(kind, "forward", lambda self, x, f=forward: runs.append(type(self)) or f(self, x))
    seen = []

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = ConvNormAct(1), ConvNormAct(2), ConvNormAct(1)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    model = Stem().to("meta").eval()
    model.c[2].register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    monkeypatch.setattr("autocut.trace.tracer_kwargs", lambda: {"leaf_modules": [ConvNormAct]})
    traced = trace(model, (4, 8, 8), batch=3)
    assert [n.op for n in traced.graph.nodes if n.op == "call_module"] == ["call_module"] * 3
    assert [traced.shapes[traced.node_named(k)] for k in "abc"] == [(3, 4, 8, 8), (3, 4, 4, 4), (3, 4, 4, 4)]
    assert runs == [nn.ReLU] and seen == [(3, 4, 4, 4)]  # only the hooked ReLU ran, and its hook saw its output


class Offset(nn.Module):
    """Keeps a tensor as a plain attribute (not a parameter, not a buffer)."""

    def __init__(self):
        super().__init__()
        self.offset = torch.arange(4.0).view(1, 4, 1, 1)

    def forward(self, x):
        return x + self.offset


def test_where_a_tensor_the_model_keeps_elsewhere_meets_a_meta_one_the_weights_run_as_fake_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), Offset(), nn.Flatten())
    traced = trace(model, (3, 16, 16), batch=5)  # inlined: fx keeps the offset as a constant, a meta stand-in runs
    assert traced.shape_method == "weights on meta" and traced.shapes[traced.node_named("2")] == (5, 256)
    model[1].register_forward_hook(lambda *args: None)  # a leaf now: it runs, and its CPU offset meets the map
    traced = trace(model, (3, 16, 16), batch=5)
    assert traced.shape_method == "fake" and traced.shapes[traced.node_named("2")] == (5, 256)
    assert model[1].offset.device.type == "cpu" and model[0].weight.device.type == "cpu"
