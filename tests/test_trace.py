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
    assert traced.shape_method == "fake" and traced.input_shape == (5, 3, 16, 16)
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
