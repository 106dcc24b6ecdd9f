"""The second graph capture: models torch.fx cannot trace get a graph of their ATen ops (one meta
forward recorded, else ``torch.export``, non-strict), are cut by the graph rule on it and made at a
module's output or input (``Cut.method == "export"``); what cannot be made there goes to the hooks
rule. Each model's own eager values are the oracle; for the recorded graph, torch.export's."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import autocut
from autocut.cut_export import module_cut
from autocut.cut_graph import ancestors, find_cut
from autocut.cut_hooks import probe_modules
from autocut.probe import weights_on_meta
from autocut.trace import trace, trace_aten, trace_dispatched, trace_exported

SIZE = (3, 32, 32)


def _even(x):
    if x.shape[-1] % 2:
        x = F.pad(x, (0, 1, 0, 1))
    return x


def _x(b=2):
    return torch.randn(b, *SIZE, generator=torch.Generator().manual_seed(0))


class ShapeBranch(nn.Module):
    """Branches on the input's shape: fx cannot trace it (a Proxy in a condition); torch.export
    can (the shape is known). The map is ``stage``'s output, pooled by a module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def features(self, x):
        return self.stage(self.stem(_even(x)))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class ScaledBeforePool(ShapeBranch):
    """The last map is made by the forward's own code (a scale) between ``stage`` and ``pool``:
    no module returns it, ``pool`` takes it."""

    def features(self, x):  # (no super(): a body that runs the model's forward is not an instance of its class)
        return self.stage(self.stem(_even(x))) * 2.0


class PooledByFunctions(ShapeBranch):
    """The last map is made and pooled by the forward's own code: no module returns or takes it."""

    def features(self, x):
        return F.gelu(self.stage(self.stem(_even(x))) + 1.0)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class KeepsItsLastMap(ShapeBranch):
    """Keeps the last map it computed in a dict (for the user to read, as a feature-extraction
    hook would): an export must not leave one of its fake tensors there."""

    def __init__(self):
        super().__init__()
        self.cache = {}

    def features(self, x):
        self.cache["last"] = self.stage(self.stem(_even(x)))
        return self.cache["last"]


class CastsItsInput(nn.Module):
    """A wrapper that casts the image and hands it to a whole classifier (transformers'
    ``TimmWrapper``): the cast image is no map, and the classifier is not a head to cut before."""

    def __init__(self, shape_branch: bool):
        super().__init__()
        self.inner = ShapeBranch() if shape_branch else nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.inner(x.to(torch.float32))


def test_fx_cannot_trace_the_shape_branch_and_export_can():
    with pytest.raises(fx.proxy.TraceError):
        trace(ShapeBranch(), SIZE)
    traced = trace_exported(ShapeBranch().eval(), SIZE)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["x"] and traced.input is placeholders[0]
    assert sorted(str(n.target) for n in traced.graph.nodes if n.op == "get_attr") == sorted(
        name for name, _ in (*ShapeBranch().named_parameters(), *ShapeBranch().named_buffers()))
    convs = [n for n in traced.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert [traced.scope[n] for n in convs] == ["stem.0", "stage.0"]
    assert [traced.shapes[n] for n in convs] == [(11, 8, 16, 16), (11, 16, 8, 8)]
    assert traced.capture == "export"


class WritesThroughAView(ShapeBranch):
    """The map's first row is written, through a view, from a second branch off the image: the
    output depends on ``side`` only through that write."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 16, 3, 4, 1)

    def features(self, x):
        x = _even(x)
        y = self.stage(self.stem(x)) * 1.0
        y[:, :, 0] = self.side(x)[:, :, 0]
        return y


class UpdatesABufferItReads(ShapeBranch):
    """Updates running statistics from a second branch (an op whose schema says it writes a buffer,
    and which returns other tensors) and adds them to the map: the output depends on ``side``
    through the buffer."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 16, 3, 4, 1)
        self.register_buffer("mean", torch.zeros(16))
        self.register_buffer("var", torch.ones(16))

    def features(self, x):
        x = _even(x)
        torch.ops.aten._native_batch_norm_legit.default(self.side(x), None, None, self.mean, self.var, True, 0.1, 1e-5)
        return self.stage(self.stem(x)) + self.mean[:, None, None]


class ReadsAWeightAndSplits(ShapeBranch):
    """Reads a parameter and a plain tensor in its own code (a position embedding, a scale) and
    splits the map (an op with several outputs)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 16, 8, 8))
        self.register_buffer("scale", torch.ones(16, 1, 1))

    def features(self, x):
        a, b = (self.stage(self.stem(_even(x))) + self.pos).split(8, dim=1)
        return torch.cat([b, a], 1) * self.scale


class KeepsAPlainTensor(ShapeBranch):
    """Adds a tensor that is neither parameter nor buffer: on meta stand-ins of the weights it
    stays a real one, which meta tensors cannot be mixed with."""

    def __init__(self):
        super().__init__()
        self.bias = torch.ones(16, 8, 8)

    def features(self, x):
        return self.stage(self.stem(_even(x))) + self.bias


class ChecksAMaskUnlessTraced(ShapeBranch):
    """Reads a mask's values unless it is a fake tensor, as transformers' mask checks do: meta
    tensors cannot run it, fake ones can."""

    def features(self, x):
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if not isinstance(mask, torch._subclasses.fake_tensor.FakeTensor) and not mask.all():
            x = x * 0
        return self.stage(self.stem(_even(x)))


def test_a_forward_that_reads_values_unless_traced_is_recorded_on_fake_tensors_and_the_weights_are_untouched():
    model = ChecksAMaskUnlessTraced().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traced = trace_dispatched(model, SIZE)
    assert (traced.capture, traced.shape_method) == ("dispatch", "fake")
    assert trace_dispatched(ShapeBranch().eval(), SIZE).shape_method == "meta"
    calls = probe_modules(model, SIZE)
    assert module_cut(model, traced, find_cut(traced, "m"), calls).where == "stage"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    meta = ChecksAMaskUnlessTraced().to("meta").eval()
    assert autocut.discover(meta, input_size=SIZE).where == "stage"


def test_a_tensor_the_forward_reads_that_is_no_weight_is_a_constant_of_the_graph():
    model = KeepsAPlainTensor().to("meta").eval()
    model.bias = torch.ones(16, 8, 8, device="meta")  # (.to() moves no plain attribute)
    traced = trace_dispatched(model, SIZE)
    assert list(traced.constants) == ["_tensor_constant0"] and traced.constants["_tensor_constant0"] is model.bias
    (node,) = [n for n in traced.graph.nodes if n.op == "get_attr" and n.target == "_tensor_constant0"]
    assert traced.shapes[node] == (16, 8, 8) and [u.target for u in node.users] == [torch.ops.aten.add.Tensor]


def test_a_forward_is_recorded_op_by_op_in_the_modules_it_ran_in():
    model = ShapeBranch().eval()
    traced = trace_dispatched(model, SIZE)
    assert traced.capture == "dispatch" and traced.input.op == "placeholder"
    assert [n for n in traced.graph.nodes if n.op == "placeholder"] == [traced.input]
    read = sorted(str(n.target) for n in traced.graph.nodes if n.op == "get_attr")
    assert read == sorted(n for n, _ in (*model.named_parameters(), *model.named_buffers()) if "num_batches" not in n)
    convs = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.convolution.default]
    assert [traced.scope[n] for n in convs] == ["stem.0", "stage.0"]
    assert [traced.shapes[n] for n in convs] == [(11, 8, 16, 16), (11, 16, 8, 8)]
    assert traced.shapes[traced.input] == (11, *SIZE)
    (out,) = [n for n in traced.graph.nodes if n.op == "output"]
    assert [traced.shapes[a] for a in out.args[0]] == [(11, 4)]
    assert convs[0] in ancestors(out) and traced.scope[out.args[0][0]] == "fc"


def _scopes_read(traced):
    (out,) = [n for n in traced.graph.nodes if n.op == "output"]
    return {traced.scope.get(n, "") for n in ancestors(out)} - {""}


@pytest.mark.parametrize("cls", [ShapeBranch, ScaledBeforePool, ReadsAWeightAndSplits, KeepsItsLastMap])
def test_the_recorded_graph_gives_the_cut_torch_export_gives(cls):
    model = cls().eval()
    recorded, exported = trace_dispatched(model, SIZE), trace_exported(model, SIZE)
    assert _scopes_read(recorded) == _scopes_read(exported)
    calls = probe_modules(model, SIZE)
    mine, theirs = [module_cut(model, t, find_cut(t, cls.__name__), calls) for t in (recorded, exported)]
    assert (mine.where, mine.nf, mine.feature_shape, mine.stride, mine.dropped) == (
        theirs.where, theirs.nf, theirs.feature_shape, theirs.stride, theirs.dropped)


def test_a_write_through_a_view_is_a_dependence_of_what_reads_the_tensor_after_it():
    traced = trace_dispatched(WritesThroughAView().eval(), SIZE)
    assert "side" in _scopes_read(traced)  # (torch.export's graph keeps the copy_ into the view, which nothing reads)
    assert "side" in _scopes_read(trace_dispatched(UpdatesABufferItReads().eval(), SIZE))
    cut = autocut.discover(WritesThroughAView().eval(), input_size=SIZE)
    assert (cut.method, cut.where) == ("export", "pool:input")  # the map after the write, not stage's output


def test_a_forward_meta_tensors_cannot_run_is_recorded_on_fake_tensors_and_exported_where_that_fails(monkeypatch):
    model = KeepsAPlainTensor().eval()
    with pytest.raises(RuntimeError, match="device"), weights_on_meta(model):
        model(torch.empty(2, *SIZE, device="meta"))
    traced = trace_aten(model, SIZE)
    assert (traced.capture, traced.shape_method) == ("dispatch", "fake")
    trace_module = importlib.import_module("autocut.trace")
    monkeypatch.setattr(trace_module, "trace_dispatched", lambda *args: (_ for _ in ()).throw(RuntimeError("no")))
    assert trace_aten(model, SIZE).capture == "export"
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.method, cut.where) == ("export", "pool:input")
    with torch.no_grad():
        assert torch.equal(autocut.create_body(model, input_size=SIZE).eval()(_x()), model.features(_x()))


def test_discovery_records_the_forward_and_does_not_export_a_model_meta_tensors_can_run(monkeypatch):
    trace_module = importlib.import_module("autocut.trace")

    def no_export(*args, **kwargs):
        raise AssertionError("torch.export ran")

    monkeypatch.setattr(trace_module, "trace_exported", no_export)
    cut = autocut.discover(ScaledBeforePool().eval(), input_size=SIZE)
    assert (cut.method, cut.where) == ("export", "pool:input")


def test_a_model_fx_cannot_trace_is_cut_on_its_exported_graph_and_the_body_is_its_own_map():
    model = ShapeBranch().eval()
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.method, cut.where, cut.after, cut.feature_shape, cut.stride) == ("export", "stage", "stage", (16, 8, 8), 4)
    assert cut.dropped == ("fc",)
    assert "(found by export)" in str(cut)
    body = autocut.create_body(model, input_size=SIZE).eval()
    with torch.no_grad():
        assert torch.equal(body(_x()), model.features(_x()))
    assert not any(k.startswith("fc.") for k in body.state_dict())


def test_a_map_made_between_modules_is_cut_at_the_input_of_the_module_that_takes_it():
    model = ScaledBeforePool().eval()
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.method, cut.where, cut.after) == ("export", "pool:input", "")
    body = autocut.create_body(model, input_size=SIZE).eval()
    with torch.no_grad():
        assert torch.equal(body(_x()), model.features(_x()))


def test_a_map_no_module_returns_or_takes_goes_to_the_hooks_rule():
    model = PooledByFunctions().eval()
    traced = trace_exported(model, SIZE)
    found = find_cut(traced, "PooledByFunctions")
    assert traced.scope[traced.node_named(found.where)] == ""  # made by the forward's own gelu
    with pytest.raises(autocut.CutError, match="made and used by code between module calls"):
        module_cut(model, traced, found, probe_modules(model, SIZE))
    with pytest.raises(autocut.CutError, match=r"found by hooks\) does not hold.*gelu.*runs on the map after it"):
        autocut.discover(model, input_size=SIZE)  # stage's output is not the map: the hooks rule refuses, naming why


def test_an_export_leaves_no_fake_tensor_in_the_models_caches():
    model = KeepsItsLastMap().eval()
    trace_exported(model, SIZE)  # (discovery runs the real forward again after it, which would hide one)
    assert not any(isinstance(v, torch._subclasses.fake_tensor.FakeTensor) for v in model.cache.values())
    assert autocut.discover(model, input_size=SIZE).method == "export"
    with torch.no_grad():
        assert torch.equal(autocut.create_body(model, input_size=SIZE).eval()(_x()), model.features(_x()))


@pytest.mark.parametrize("shape_branch, method, where", [(False, "fx", "inner.3"), (True, "export", "inner.stage")])
def test_an_input_only_cast_is_not_a_map_and_the_classifier_inside_is_cut(shape_branch, method, where):
    model = CastsItsInput(shape_branch).eval()
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.method, cut.where, cut.feature_shape) == (method, where, (16, 8, 8))
    body = autocut.create_body(model, input_size=SIZE).eval()
    inner = model.inner
    with torch.no_grad():
        expected = inner.features(_x()) if shape_branch else inner[:4](_x())
        assert torch.equal(body(_x()), expected)


class MeanPooledTokens(nn.Module):
    """Patch tokens, an MLP over them, pooled by a mean over the tokens: no class token, and no
    norm the per-channel rule would walk through."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))  # a module fx goes into
        self.head = nn.Linear(dim, 4)

    def features(self, x):
        return self.mlp(self.patch(x).flatten(2).transpose(1, 2))

    def forward(self, x):
        return self.head(self.features(x).mean(1))


@pytest.mark.parametrize("size", [(3, 224, 224), (3, 224, 400)])  # 28x50: no square grid with a few prefix tokens
def test_tokens_on_a_grid_that_is_not_square_are_a_map_and_the_last_block_stays_in_the_body(size):
    model = MeanPooledTokens().eval()
    cut = autocut.discover(model, input_size=size)
    h, w = size[1] // 8, size[2] // 8
    assert (cut.method, cut.where, cut.layout, cut.feature_shape) == ("fx", "mlp.2", "NLC", (16, h, w))
    x = torch.randn(2, *size)
    with torch.no_grad():
        expected = model.features(x).transpose(1, 2).reshape(2, 16, h, w)
        assert torch.equal(autocut.create_body(model, input_size=size).eval()(x), expected)
