"""The hooks rule (``autocut.cut_hooks``), for models fx cannot trace: module calls recorded in the
order they finish, the cut found on them, and the body that stops the model's own forward there."""

import copy
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocut
from autocut.cut_hooks import EarlyExitBody, ModuleCall, find_cut_by_hooks, levels_by_hooks, probe_modules
from autocut.errors import CutError
from autocut.layout import Layout
from autocut.probe import PROBE_BATCH

SIZE = (3, 16, 16)
B = PROBE_BATCH


class Pooled(nn.Module):
    """A stage, then the head as modules: an adaptive pool, a flatten, a Linear."""

    def __init__(self, pool: nn.Module | None = None):
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stage(x)
        if x.sum() > -1e30:  # data-dependent control flow: fx cannot trace this model
            x = self.pool(x)
        return self.fc(x.flatten(1))


def test_calls_are_recorded_in_the_order_they_finish_with_their_shapes():
    calls = probe_modules(Pooled(), SIZE)
    assert [(c.path, c.index, c.in_shape, c.out_shape) for c in calls] == [
        ("stage.0", 0, (B, 3, 16, 16), (B, 8, 8, 8)),
        ("stage.1", 1, (B, 8, 8, 8), (B, 8, 8, 8)),
        ("stage", 2, (B, 3, 16, 16), (B, 8, 8, 8)),
        ("pool", 3, (B, 8, 8, 8), (B, 8, 1, 1)),
        ("fc", 4, (B, 8), (B, 2)),
        ("", 5, (B, 3, 16, 16), (B, 2)),  # the model itself: a backbone's own output can be its last map
    ]


def test_the_cut_is_the_input_of_the_first_module_that_pools_the_map():
    model = Pooled()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Pooled")
    assert (cut.where, cut.after, cut.nf, cut.feature_shape, cut.stride) == ("pool:input", "", 8, (8, 8, 8), 2)
    assert cut.method == "hooks" and cut.dropped == ("fc",) and cut.layout == Layout.NCHW


def test_the_outermost_module_that_pools_is_the_head():
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
    model = Pooled(pool=head)
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Pooled")
    assert cut.where == "pool:input"


def test_pooling_by_a_function_cuts_at_the_last_map_a_module_returns():
    calls = [ModuleCall("stage", 0, (B, 3, 16, 16), (B, 8, 8, 8)), ModuleCall("fc", 1, (B, 8), (B, 2))]
    cut = find_cut_by_hooks(Pooled(), calls, SIZE, "Pooled")
    assert (cut.where, cut.after) == ("stage", "stage")
    # the last map a module returns, when that module is head-like, is cut at its input
    calls = [ModuleCall("stage", 0, (B, 3, 16, 16), (B, 8, 8, 8)), ModuleCall("pool", 1, (B, 8, 8, 8), (B, 8, 4, 4))]
    assert find_cut_by_hooks(Pooled(nn.Identity()), calls, SIZE, "Pooled").where == "pool:input"


def test_no_map_anywhere_is_refused():
    calls = [ModuleCall("fc", 0, (B, 3 * 16 * 16), (B, 2))]
    with pytest.raises(CutError, match="no module that returns a feature map"):
        find_cut_by_hooks(nn.Linear(1, 1), calls, SIZE, "MLP")


def test_tokens_are_read_on_the_grid_of_the_map_before_them():
    calls = [ModuleCall("proj", 0, (B, 3, 16, 16), (B, 8, 4, 4)), ModuleCall("blocks", 1, (B, 17, 8), (B, 17, 8)),
             ModuleCall("head", 2, (B, 8), (B, 2))]
    model = nn.Module()
    model.proj, model.blocks, model.head = nn.Conv2d(3, 8, 4, 4), nn.LayerNorm(8), nn.Linear(8, 2)
    cut = find_cut_by_hooks(model, calls, SIZE, "ViT")
    assert (cut.where, cut.layout, cut.prefix_tokens, cut.feature_shape) == ("blocks", Layout.NLC, 1, (8, 4, 4))


def test_the_body_stops_the_models_own_forward_at_the_cut():
    torch.manual_seed(0)
    model = Pooled().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Pooled")
    body = EarlyExitBody(model, cut)
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(body(x), model.stage(x))
    assert isinstance(body.fc, nn.Identity) and body.stage is model.stage
    assert set(body.state_dict()) == {"stage.0.weight", "stage.0.bias"}
    assert not body.pool._forward_pre_hooks, "the hook is removed after each call"
    clone = copy.deepcopy(body)
    torch.testing.assert_close(clone(x), model.stage(x))
    assert clone.stage is not model.stage and clone.cut_path == "pool" and clone.cut_input


def test_the_body_says_when_the_forward_never_reaches_the_cut():
    class Skips(Pooled):
        def forward(self, x):
            x = self.stage(x)
            if x.shape[-1] > 4:  # at a small input the pool is skipped
                x = self.pool(x)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    model = Skips()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Skips")
    body = EarlyExitBody(model, cut)
    assert body(torch.randn(1, 3, 16, 16)).shape == (1, 8, 8, 8)
    with pytest.raises(CutError, match="never reached the cut at 'pool'"):
        body(torch.randn(1, 3, 8, 8))


def test_the_body_keeps_the_models_methods_and_attributes():
    class WithMethod(Pooled):
        scale = 3

        def __init__(self):
            super().__init__()
            self.offset = 1.0

        @property
        def doubled(self):
            return 2 * self.offset

        @classmethod
        def factor(cls):
            return cls.scale

        def shift(self, x):
            return x * self.scale + self.offset

        def forward(self, x):  # (no super(): the body runs this function with itself as self)
            x = self.stage(self.shift(x))
            return self.fc(self.pool(x).flatten(1)) if x.sum() > -1e30 else x

    model = WithMethod().eval()
    body = EarlyExitBody(model, find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "WithMethod"))
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(body(x), model.stage(x * 3 + 1.0))
    assert body.offset == 1.0 and body.scale == 3 and body.doubled == 2.0 and body.factor() == 3
    with pytest.raises(AttributeError):
        _ = body.nowhere


def test_the_body_keeps_the_models_own_parameters_and_buffers():
    class Scaled(Pooled):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.full((1, 3, 1, 1), 2.0))
            self.register_buffer("shift", torch.full((1, 3, 1, 1), 0.5))
            self.temperature = nn.Parameter(torch.tensor(3.0))  # used after the pool only, yet hooks cannot tell

        def forward(self, x):
            x = self.stage(x * self.scale + self.shift)
            if x.sum() > -1e30:
                x = self.pool(x)
            return self.fc(x.flatten(1)) / self.temperature

    model = Scaled().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Scaled")
    assert cut.dropped == ("fc",)  # bare parameters stay: the hooks see modules run, not tensors used
    body = EarlyExitBody(model, cut)
    assert body.scale is model.scale and body.shift is model.shift and body.temperature is model.temperature
    assert set(body.state_dict()) == {"scale", "temperature", "shift", "stage.0.weight", "stage.0.bias"}
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(body(x), model.stage(x * 2.0 + 0.5))



class Gated(nn.Module):
    """A gate that pools the map to a vector mid-body (the main path goes on with maps), two
    sibling pools for the head, BatchNorm buffers: the head is the pools, not the gate."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8))
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.maxpool, self.avgpool = nn.AdaptiveMaxPool2d(1), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        x = self.stage1(x)
        x = x * self.gate(x).sigmoid()[:, :, None, None]
        x = self.stage2(x)
        if x.sum() > -1e30:  # fx cannot trace it
            x = torch.cat([self.maxpool(x), self.avgpool(x)], 1)
        return self.fc(x.flatten(1))


def test_a_module_that_pools_mid_body_is_not_the_head():
    torch.manual_seed(0)
    model = Gated().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Gated")
    assert (cut.where, cut.nf, cut.feature_shape, cut.after) == ("maxpool:input", 16, (16, 4, 4), "")
    assert cut.dropped == ("fc",)
    body = EarlyExitBody(model, cut)
    assert set(body.state_dict()) == {k for k in model.state_dict() if not k.startswith("fc.")}
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(body(x), model.stage2(model.stage1(x) * model.gate(model.stage1(x)).sigmoid()[:, :, None, None]))


def test_the_module_around_a_lone_pool_is_the_head_and_its_parameters_are_dropped():
    class AttnPoolHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.pool(x).flatten(1))

    model = Pooled(pool=nn.Sequential(nn.AdaptiveAvgPool2d(1)))
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Pooled")
    assert cut.where == "pool:input"  # the Sequential, not its one child
    model = Pooled(pool=AttnPoolHead())
    model.fc = nn.Linear(8, 2)
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Pooled")
    assert (cut.where, cut.dropped) == ("pool:input", ("pool", "fc"))


def test_a_cut_at_a_modules_output_keeps_that_module_and_returns_its_output():
    class FunctionalPool(Pooled):
        def forward(self, x):
            x = self.stage(x)
            if x.sum() > -1e30:
                x = x.mean((2, 3))
            return self.fc(x)

    torch.manual_seed(0)
    model = FunctionalPool().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "FunctionalPool")
    assert (cut.where, cut.after, cut.dropped) == ("stage", "stage", ("fc",))
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(EarlyExitBody(model, cut).eval()(x), model.stage(x))


def test_a_container_around_a_used_module_keeps_its_own_parameters():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 8, 8, 8))
            self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1))

        def forward(self, x):
            return self.blocks(x + self.pos)

    class Wrapped(Pooled):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()
            self.aux = nn.Module()
            self.aux.weight = nn.Parameter(torch.zeros(3))  # a container nothing calls

        def forward(self, x):
            x = self.encoder.blocks(self.stage(x) + self.encoder.pos)  # the container itself is never called
            if x.sum() > -1e30:
                x = self.pool(x)
            return self.fc(x.flatten(1))

    model = Wrapped()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Wrapped")
    assert (cut.where, cut.dropped) == ("pool:input", ("fc", "aux"))
    assert EarlyExitBody(model, cut).encoder.pos is model.encoder.pos


def test_a_token_body_drops_its_prefix_tokens():
    class TokenNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 4, 4)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.blocks = nn.Sequential(nn.Linear(8, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.proj(x).flatten(2).transpose(1, 2)
            x = self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))
            if x.sum() > -1e30:
                x = x[:, 0]
            return self.head(x)

    torch.manual_seed(0)
    model, size = TokenNet().eval(), (3, 16, 32)  # a 4x8 patch grid
    cut = find_cut_by_hooks(model, probe_modules(model, size), size, "TokenNet")
    assert (cut.where, cut.layout, cut.prefix_tokens, cut.feature_shape) == ("blocks", Layout.NLC, 1, (8, 4, 8))
    x = torch.randn(2, *size)
    tokens = model.blocks(torch.cat([model.cls.expand(2, -1, -1), model.proj(x).flatten(2).transpose(1, 2)], 1))
    torch.testing.assert_close(EarlyExitBody(model, cut)(x), tokens[:, 1:].transpose(1, 2).reshape(2, 8, 4, 8))


def test_tokens_lie_on_the_grid_of_the_nearest_map_before_them():
    # two maps the tokens fit (40 tokens: 8 cells + 32 prefix tokens, or 32 cells + 8): the nearest wins
    size = (3, 16, 32)
    model = nn.Module()
    model.a, model.b, model.blocks, model.pool = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.LayerNorm(8), nn.Linear(8, 8)
    calls = [ModuleCall("a", 0, (B, *size), (B, 8, 2, 4)), ModuleCall("b", 1, (B, 8, 2, 4), (B, 8, 4, 8)),
             ModuleCall("blocks", 2, (B, 40, 8), (B, 40, 8))]
    cut = find_cut_by_hooks(model, calls, size, "m")
    assert (cut.where, cut.feature_shape, cut.prefix_tokens, cut.input_size) == ("blocks", (8, 4, 8), 8, size)
    # the same reading for the tokens a head takes in (an attention pool: tokens in, a vector out)
    calls.append(ModuleCall("pool", 3, (B, 40, 8), (B, 8)))
    cut = find_cut_by_hooks(model, calls, size, "m")
    assert (cut.where, cut.feature_shape, cut.prefix_tokens) == ("pool:input", (8, 4, 8), 8)


def test_a_module_that_pools_just_before_the_next_map_is_not_the_head():
    model = nn.Module()
    for name in ("stem", "probe", "stage", "head", "fc"):
        setattr(model, name, nn.Linear(1, 1))
    calls = [ModuleCall("stem", 0, (B, *SIZE), (B, 8, 8, 8)), ModuleCall("probe", 1, (B, 8, 8, 8), (B, 8)),
             ModuleCall("stage", 2, (B, 8, 8, 8), (B, 16, 4, 4)), ModuleCall("head", 3, (B, 16, 4, 4), (B, 16)),
             ModuleCall("fc", 4, (B, 16), (B, 2))]
    cut = find_cut_by_hooks(model, calls, SIZE, "m")
    assert (cut.where, cut.feature_shape, cut.dropped) == ("head:input", (16, 4, 4), ("head", "fc"))
    probed = probe_modules(Pooled(), SIZE, batch=5)
    assert probed[0].in_shape == (5, *SIZE) and probed[-1].out_shape == (5, 2)


# --- structured outputs: tuples, dicts, dataclasses, transformers' ModelOutput ---------------------


@dataclasses.dataclass
class Maps:
    maps: tuple
    pooled: torch.Tensor | None = None


class Encoder(nn.Module):
    """Two stages returning a structure, as transformers' encoders do; ``kind`` picks which."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.stage1 = nn.Conv2d(8, 12, 3, 2, 1)
        self.stage2 = nn.Conv2d(12, 16, 3, 2, 1)

    def forward(self, hidden):
        early = self.stage1(hidden)
        late = self.stage2(early)
        if self.kind == "dict":
            return {"last_hidden_state": late, "hidden_states": (hidden, early, late)}
        if self.kind == "tuple":
            return late, (early,)
        if self.kind == "dataclass":  # the earlier map first: the cut is the one made last
            return Maps(maps=(early, late))
        return ModelOutput(last_hidden_state=late, hidden_states=(early, late))


def _model_output():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    return outputs.BaseModelOutputWithNoAttention


class ModelOutput:  # replaced by transformers' class in the test that uses it
    pass


class Structured(nn.Module):
    """A stem, an encoder returning a structure (called by keyword), a pool and a classifier;
    data-dependent control flow, so only the hooks rule applies."""

    def __init__(self, kind: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.encoder = Encoder(kind)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 2)

    def deepest(self, out):
        if isinstance(out, dict) or hasattr(out, "last_hidden_state"):
            return out["last_hidden_state"]
        return out.maps[-1] if isinstance(out, Maps) else out[0]

    def forward(self, x):
        out = self.encoder(hidden=self.stem(x))
        h = self.deepest(out)
        if h.sum() > -1e30:
            h = self.pool(h)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass", "model_output"])
def test_a_map_inside_a_structured_output_is_seen_and_the_cut_is_after_the_encoder(kind, monkeypatch):
    if kind == "model_output":
        monkeypatch.setitem(globals(), "ModelOutput", _model_output())
    torch.manual_seed(0)
    model = Structured(kind).eval()
    calls = probe_modules(model, SIZE)
    assert next(c for c in calls if c.path == "encoder").in_shape == (B, 8, 16, 16)  # passed by keyword
    cut = find_cut_by_hooks(model, calls, SIZE, "Structured")
    # read as no map, the encoder would be the head and the cut its input, the stem's output
    assert (cut.where, cut.nf, cut.feature_shape, cut.stride, cut.dropped) == ("pool:input", 16, (16, 4, 4), 4, ("fc",))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        want = model.encoder.stage2(model.encoder.stage1(model.stem(x)))
        assert torch.equal(EarlyExitBody(model, cut).eval()(x), want)


class Backbone(nn.Module):
    """A backbone: its own forward returns its maps, the last one made by the forward itself
    (windows of tokens put back on their grid) and a norm after the stage."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        m = self.stage(x)
        if m.sum() > -1e30:
            tokens = self.norm(m.flatten(2).transpose(1, 2))  # (B, 16, 8)
            return {"feature_maps": (m, tokens.transpose(1, 2).reshape(m.shape))}
        return {"feature_maps": (m,)}


def test_a_backbones_own_output_is_its_last_map_and_the_body_returns_it():
    torch.manual_seed(0)
    model = Backbone().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Backbone")
    assert (cut.where, cut.after, cut.nf, cut.feature_shape, cut.dropped) == (":feature_maps.1", "", 8, (8, 4, 4), ())
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(EarlyExitBody(model, cut).eval()(x), model(x)["feature_maps"][1])


class Stack(nn.Module):
    """transformers' ViT shape: the stack returns its blocks' output, the model adds a final norm
    and returns a structure whose ``last_hidden_state`` is the norm's output, and a pooler after."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.norm = nn.LayerNorm(8)
        self.pooler = nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(self.blocks(self.embed(x).flatten(2).transpose(1, 2)))
        return {"last_hidden_state": h, "pooler_output": self.pooler(h.mean(1))}


class StackClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = Stack()
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        h = self.vit(x)["last_hidden_state"]
        if h.sum() > -1e30:
            h = h.mean(1)
        return self.classifier(h)


def test_a_map_in_a_structure_is_cut_where_it_was_made_leaving_out_what_runs_after_it():
    torch.manual_seed(0)
    model = StackClassifier().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "StackClassifier")
    # not "vit:last_hidden_state": the body would run the pooler, whose parameters never get a gradient
    assert (cut.where, cut.layout, cut.feature_shape, cut.dropped) == ("vit.norm", Layout.NLC, (8, 4, 4),
                                                                         ("vit.pooler", "classifier"))
    x = torch.randn(2, *SIZE)
    body = EarlyExitBody(model, cut).eval()
    with torch.no_grad():
        want = model.vit(x)["last_hidden_state"].transpose(1, 2).reshape(2, 8, 4, 4)
        assert torch.equal(body(x), want)


class TokenMean(nn.Module):
    def forward(self, t):
        return t.mean(1)


@pytest.mark.parametrize("pooled_by", ["select", "module"])
def test_tokens_lie_on_the_nearest_grid_they_fit_not_only_the_nearest_grid(pooled_by):
    class ThreeGrids(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 4, 4)  # 16x32
            self.b = nn.Conv2d(8, 8, 2, 2)  # 8x16
            self.c = nn.Conv2d(8, 8, 2, 2)  # 4x8, not used
            self.cls = nn.Parameter(torch.zeros(1, 1, 8))  # a bare parameter of the model itself
            self.blocks = nn.Linear(8, 8)
            self.pool = TokenMean()
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            m = self.b(self.a(x))
            self.c(m)
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), m.flatten(2).transpose(1, 2)], 1)
            t = self.blocks(t)
            if t.sum() > -1e30:
                t = t[:, 0] if pooled_by == "select" else self.pool(t)
            return self.head(t)

    size = (3, 64, 128)
    model = ThreeGrids()
    cut = find_cut_by_hooks(model, probe_modules(model, size), size, "ThreeGrids")
    # 129 tokens: the 8x16 grid behind one class token (not the nearer 4x8, nor a square 11x11 behind 8),
    # read on the output of the last module that makes them, or on the input of the module that pools them
    where = "blocks" if pooled_by == "select" else "pool:input"
    assert (cut.where, cut.layout, cut.feature_shape, cut.prefix_tokens) == (where, Layout.NLC, (8, 8, 16), 1)
    assert cut.dropped == ("head",)  # the model's own class token stays with the body


def test_a_model_wrapped_whole_is_not_its_own_head():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.Conv2d(3, 8, 3, 2, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            m = self.stages(x)
            if m.sum() > -1e30:
                m = m.mean((2, 3))  # pooled by a function: no head module
            return self.fc(m)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Inner()

        def forward(self, x):
            return self.net(x)

    model = Wrapper()
    # `net` takes the image and returns no map, yet it is no head: the image is not a map it was given
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Wrapper")
    assert (cut.where, cut.feature_shape, cut.dropped) == ("net.stages", (8, 8, 8), ("net.fc",))


class _TwoStages(nn.Module):
    """Two stages; the second skipped at a small input (data-dependent: fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU())
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2)

    def forward(self, x):
        x = self.stage1(x)
        if x.shape[-1] > 4:
            x = self.stage2(x)
        else:
            x = torch.cat([x, x], 1)
        return self.fc(self.pool(x).flatten(1))


def test_a_body_of_several_cuts_keeps_each_map_as_the_forward_passes_it_and_stops_at_the_deepest():
    torch.manual_seed(0)
    model = _TwoStages().eval()
    deepest = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "TwoStages")
    level = dataclasses.replace(deepest, where="stage1", nf=4, feature_shape=(4, 8, 8), stride=2, dropped=())
    skipped = dataclasses.replace(deepest, where="stage2", dropped=())
    body = EarlyExitBody(model, [level, skipped, deepest])
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        first, second, last = body(x)
        torch.testing.assert_close(first, model.stage1(x), rtol=0, atol=0)
        torch.testing.assert_close(second, model.stage2(model.stage1(x)), rtol=0, atol=0)
        torch.testing.assert_close(last, second, rtol=0, atol=0)
    assert isinstance(body.fc, nn.Identity) and body.stage1 is model.stage1
    assert not model.stage1._forward_hooks and not model.pool._forward_pre_hooks  # every hook removed
    with pytest.raises(CutError, match="never reached the level.s. at 'stage2'"):  # skipped at 8 px
        body(torch.randn(1, 3, 8, 8))
    with pytest.raises(CutError, match="only the deepest can be"):  # a level in the model's own output
        EarlyExitBody(model, [dataclasses.replace(level, where=":logits"), deepest])


class _LayersReturningADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.GELU())

    def forward(self, h):
        return {"last_hidden_state": self.layers(h)}


class SharedStack(nn.Module):
    """transformers' ViT shape again, its stack an ``encoder`` returning a structure, and a dropout
    it shares with the model (registered on the model first, so its calls are named ``dropout``:
    outside the stack) run on the stack's map: identity in eval, it returns the very tensor."""

    def __init__(self, dropout: nn.Module):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.encoder = _LayersReturningADict()
        self.dropout = dropout
        self.pooler = nn.Linear(8, 8)

    def forward(self, x):
        h = self.encoder(self.embed(x).flatten(2).transpose(1, 2))["last_hidden_state"]
        h = self.dropout(h)
        return {"last_hidden_state": h, "pooler_output": self.pooler(h.mean(1))}


class SharedDropoutClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.1)
        self.vit = SharedStack(self.dropout)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        h = self.vit(x)["last_hidden_state"]
        if h.sum() > -1e30:
            h = h.mean(1)
        return self.classifier(self.dropout(h))


def test_a_map_passed_up_through_structures_is_cut_at_the_innermost_one_inside_the_outer_module():
    torch.manual_seed(0)
    model = SharedDropoutClassifier().eval()
    calls = probe_modules(model, SIZE)
    # the shared dropout finishes after the encoder, inside the stack's forward, and returns the same tensor:
    # it is not inside 'vit', so neither where the map was made nor a reason to stop looking
    assert [c.path for c in calls][3:7] == ["vit.encoder.layers", "vit.encoder", "dropout", "vit.pooler"]
    cut = find_cut_by_hooks(model, calls, SIZE, "SharedDropoutClassifier")
    # the outermost module inside 'vit' that returned the map; it returned a structure: the map's key in it
    assert (cut.where, cut.after, cut.layout, cut.feature_shape) == ("vit.encoder:last_hidden_state", "", Layout.NLC,
                                                                     (8, 4, 4))
    assert cut.dropped == ("vit.pooler", "classifier")
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        want = model.vit.encoder.layers(model.vit.embed(x).flatten(2).transpose(1, 2))
        assert torch.equal(EarlyExitBody(model, cut).eval()(x), want.transpose(1, 2).reshape(2, 8, 4, 4))


class _StemAndStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stage = nn.Conv2d(8, 16, 3, 2, 1)

    def forward(self, x):
        early = self.stem(x)
        return {"features": self.stage(early), "stem": early}  # the deeper map's key sorts first


def test_of_the_maps_in_a_structure_the_one_made_last_is_the_cut_whatever_their_keys():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _StemAndStage()
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            h = self.encoder(x)["features"]
            if h.sum() > -1e30:
                h = h.mean((2, 3))  # pooled by a function: the cut is in the encoder's structure
            return self.fc(h)

    torch.manual_seed(0)
    model = Named().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Named")
    assert (cut.where, cut.after, cut.nf, cut.feature_shape, cut.stride) == ("encoder.stage", "encoder.stage", 16,
                                                                               (16, 4, 4), 4)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(EarlyExitBody(model, cut).eval()(x), model.encoder.stage(model.encoder.stem(x)))


class _AttentionPool(nn.Module):
    """Pools tokens ``(B, L, C)`` weighted by scores ``(B, heads, L)``."""

    def forward(self, tokens, scores):
        return (scores.softmax(-1) @ tokens).mean(1)


class Flattened(nn.Module):
    """A stage whose map the forward flattens and transposes into tokens ``(B, 64, 8)`` for its
    head: the head's input is a re-laid view of the map. ``variant``: ``"pooled"`` (a token mean
    right after the stage), ``"scored"`` (a module scores the map before the head pools),
    ``"returned"`` (an image encoder returning its pooled embedding and its map), ``"own"`` (the
    map is made by the forward itself, not by a module; the model returns it with its logits)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.stage = nn.Conv2d(3, 8, 3, 2, 1)
        self.score = nn.Conv2d(8, 4, 1)
        self.attend, self.pool = _AttentionPool(), TokenMean()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        m = self.stage(x)
        if self.variant == "own":
            m = m * 2
        if m.sum() < -1e30:  # data-dependent control flow: fx cannot trace it
            return m
        tokens = m.flatten(2).transpose(1, 2)
        if self.variant == "scored":
            return self.fc(self.attend(tokens, self.score(m).flatten(2)))
        if self.variant == "returned":
            return self.pool(tokens), m
        logits = self.fc(self.pool(tokens))
        return (logits, m) if self.variant == "own" else logits


@pytest.mark.parametrize("variant, where, after, layout", [
    ("pooled", "stage", "stage", Layout.NCHW),
    ("scored", "stage", "stage", Layout.NCHW),  # the nearest module before the head that returned the map
    ("returned", "stage", "stage", Layout.NCHW),  # not the model, which returns it after the head
    ("own", "pool:input", "", Layout.NLC),  # no module returned it before the head: the head's input, as it is
])
def test_a_head_fed_a_re_laid_view_of_a_map_is_cut_where_the_map_was_returned_read_as_it_was(variant, where, after,
                                                                                                 layout):
    torch.manual_seed(0)
    model = Flattened(variant).eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Flattened")
    assert (cut.where, cut.after, cut.layout, cut.nf, cut.feature_shape) == (where, after, layout, 8, (8, 8, 8))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        want = model.stage(x) * (2 if variant == "own" else 1)
        torch.testing.assert_close(EarlyExitBody(model, cut).eval()(x), want, rtol=0, atol=0)


class _ReluThenPool(nn.Module):
    """A head that runs a functional ReLU on the map before its pooling module."""

    def __init__(self):
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(F.relu(x)).flatten(1))


@pytest.mark.parametrize("head, where, after, dropped", [
    # a ReLU module first in the head: the cut moves to its output, which the body ends with
    (lambda: nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)), "head.0", "head.0",
     ("head.3",)),
    # a functional ReLU: the cut moves to the pool's input, inside the head, which the body runs up to it
    (_ReluThenPool, "head.pool:input", "", ("head.fc",)),
])
def test_a_cut_moved_past_the_heads_per_channel_ops_says_what_the_body_ends_with_and_drops(head, where, after, dropped):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8))
            self.head = head()

        def forward(self, x):
            x = self.stage(x)
            if x.sum() > -1e30:
                x = self.head(x)
            return x

    torch.manual_seed(0)
    model = Net().eval()
    first = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Net")
    assert (first.where, first.after, first.dropped) == ("head:input", "", ("head",))
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.where, cut.after, cut.method, cut.dropped) == (where, after, "hooks", dropped)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(EarlyExitBody(model, cut).eval()(x), model.stage(x).relu(), rtol=0, atol=0)


def test_only_maps_made_before_the_cut_make_levels_or_refuse_them():
    # a token model at one stride whose head pools the tokens, and which also returns a mask per class at the
    # image's size, made from its logits: a map on another grid, after the cut, that neither refuses levels nor is one
    model = nn.Module()
    model.patch, model.blocks = nn.Conv2d(3, 8, 4, 4), nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
    model.norm, model.pool, model.head = nn.LayerNorm(8), TokenMean(), nn.Linear(8, 2)
    calls = [ModuleCall("patch", 0, (B, *SIZE), (B, 8, 4, 4)), ModuleCall("blocks.0", 1, (B, 16, 8), (B, 16, 8)),
             ModuleCall("blocks.1", 2, (B, 16, 8), (B, 16, 8)), ModuleCall("norm", 3, (B, 16, 8), (B, 16, 8)),
             ModuleCall("pool", 4, (B, 16, 8), (B, 8)), ModuleCall("head", 5, (B, 8), (B, 2)),
             ModuleCall("", 6, (B, *SIZE), {"logits": (B, 2), "masks": (B, 2, 16, 16)})]
    cut = find_cut_by_hooks(model, calls, SIZE, "m")
    assert (cut.where, cut.feature_shape, cut.stride) == ("pool:input", (8, 4, 4), 4)
    levels = levels_by_hooks(model, calls, cut, 4)
    assert [(level.where, level.after, level.feature_shape, level.stride, level.dropped) for level in levels] == [
        ("blocks.0", "blocks.0", (8, 4, 4), 4, ("blocks.1", "norm", "head")),  # (the pool holds no parameters)
        ("pool:input", "", (8, 4, 4), 4, ("head",))]


class _BoundMethodsStage(nn.Module):
    """A stage, then the head as modules; no forward of its own (it is set on the instance)."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2)


def test_methods_bound_on_the_instance_run_bound_to_the_body_that_runs_them():
    # what pretrainedmodels does: features() and logits() bound on the instance, and a forward that calls them
    def features(self, x):
        return self.stage(x)

    def logits(self, x):
        if x.sum() > -1e30:  # data-dependent control flow: fx cannot trace this model
            x = self.pool(x)
        return self.fc(x.flatten(1))

    def forward(self, x):
        return self.logits(self.features(x))

    torch.manual_seed(0)
    model = _BoundMethodsStage().eval()
    for name, fn in (("features", features), ("logits", logits), ("forward", forward)):
        setattr(model, name, types.MethodType(fn, model))
    body = EarlyExitBody(model, find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "Stage"))
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(body(x), model.stage(x))  # the body's forward called self.features
    assert body.features.__self__ is body and body.logits.__self__ is body
    clone = copy.deepcopy(body)  # bound to the copy, which runs its own (copied) stage
    assert clone.features.__self__ is clone and clone.stage is not model.stage
    torch.testing.assert_close(clone(x), model.stage(x))


class Unbranched(Pooled):
    """Pooled without its data-dependent branch: meta tensors run it."""

    def forward(self, x):
        return self.fc(self.pool(self.stage(x)).flatten(1))


@pytest.mark.parametrize("model, devices", [(Unbranched(), ["meta"]), (Pooled(), ["meta", "cpu", "cpu"])])  # (meta, fake, real)
def test_real_weights_are_probed_on_meta_stand_ins_and_where_values_are_read_on_real_zeros(model, devices):
    seen = []
    model.stage[0].register_forward_pre_hook(lambda m, args: seen.append((args[0].device.type, m.weight.device.type)))
    calls = probe_modules(model, SIZE)
    assert seen == [(d, d) for d in devices]  # input and weights alike
    assert [(c.path, c.index, c.out_shape) for c in calls] == [  # what the failed forward recorded is gone
        ("stage.0", 0, (B, 8, 8, 8)), ("stage.1", 1, (B, 8, 8, 8)), ("stage", 2, (B, 8, 8, 8)), ("pool", 3, (B, 8, 1, 1)),
        ("fc", 4, (B, 2)), ("", 5, (B, 2))]
    assert all(p.device.type == "cpu" for p in model.parameters())
