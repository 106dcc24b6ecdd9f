"""The graph rule (``autocut.cut_graph``) on small traced models built to isolate each of its
parts: dominators, the last map, heads that hold a conv, head-like ops at the cut, modules
registered after the pool, cuts named by the user, and the per-channel ops (an activation, a norm, a
scale by parameters) a head runs on the map before its pool, which stay in the body."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocut
from autocut.cut_graph import cut_at_node, find_cut, resolve_node
from autocut.errors import CutError
from autocut.layout import Layout
from autocut.trace import trace

SIZE = (3, 32, 32)


def _cut(model, size=SIZE):
    return find_cut(trace(model, size), type(model).__name__)


def conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


class Merge(nn.Module):
    """Two branches that meet (add) before the pool: the cut is where they meet."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 8, 2)
        self.a, self.b = conv(8, 16, 2), conv(8, 16, 2)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = self.stem(x)
        x = self.a(x) + self.b(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MeetAfterPool(Merge):
    """Two branches pooled apart, then concatenated: no single map."""

    def forward(self, x):
        x = self.stem(x)
        pa, pb = self.a(x).mean((2, 3)), self.b(x).mean((2, 3))
        return self.fc(pa + pb)


def test_the_cut_is_the_last_map_every_path_goes_through():
    cut = _cut(Merge())
    assert (cut.where, cut.nf, cut.feature_shape, cut.stride, cut.layout) == ("add", 16, (16, 8, 8), 4, Layout.NCHW)
    assert cut.after == "" and cut.dropped == ("fc",) and cut.method == "fx"


def test_branches_that_meet_after_pooling_are_refused_with_their_last_maps():
    with pytest.raises(CutError, match=r"branches only meet after pooling \(last maps: 'a.0', 'a.1', 'b.0', 'b.1'\)\. Pass cut="):
        _cut(MeetAfterPool())


class ConvClassifier(nn.Module):
    """SqueezeNet's shape: the classifier is a conv on the map, then a pool; it is the head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv(3, 8, 2), conv(8, 16, 2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


class PoolToSeven(nn.Module):
    """VGG's shape: an adaptive pool to 7x7 (a map to a map) before the classifier: head-like."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv(3, 8, 2), conv(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Linear(16 * 49, 2)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_a_head_holding_a_conv_moves_the_cut_to_its_input():
    cut = _cut(ConvClassifier())
    assert (cut.where, cut.nf, cut.after) == ("features.1.1", 16, "features")
    assert cut.dropped == ("classifier",)


def test_an_adaptive_pool_at_the_cut_belongs_to_the_head():
    cut = _cut(PoolToSeven(), size=(3, 56, 56))
    assert (cut.where, cut.feature_shape, cut.after) == ("features.1.1", (16, 14, 14), "features")


class LateModule(nn.Module):
    """A conv registered after the pool but run before it (lowformer's ``in_conv``) is the head's;
    one registered before the pool (efficientnet's ``conv_head``) is the body's."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 8, 2)
        self.conv_head = conv(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.in_conv = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        x = self.in_conv(self.conv_head(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def test_a_module_registered_after_the_pool_is_the_heads():
    cut = _cut(LateModule())
    assert (cut.where, cut.nf, cut.after) == ("conv_head.1", 16, "conv_head")
    assert cut.dropped == ("in_conv", "fc")


def test_nothing_to_cut_and_an_output_that_ignores_the_input_are_refused():
    with pytest.raises(CutError, match=r"has none \(an MLP\?\)"):
        _cut(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)))

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.w * 2

    with pytest.raises(CutError, match="does not depend on its input"):
        _cut(Constant())


def test_a_named_cut_is_a_node_or_the_last_node_of_a_module():
    traced = trace(Merge(), SIZE)
    assert cut_at_node(traced, "stem", "Merge").where == "stem.1"  # a module path: its last node
    cut = cut_at_node(traced, "a.0", "Merge")
    assert (cut.where, cut.nf, cut.method, cut.after) == ("a.0", 16, "user", "a.0")
    assert resolve_node(traced, "a.1") is traced.node_named("a.1")
    with pytest.raises(CutError, match=r"no node or module 'stme'.*close: stem"):
        cut_at_node(traced, "stme", "Merge")
    with pytest.raises(CutError, match=r"'fc' in Merge gives shape \(11, 2\), not a feature map"):
        cut_at_node(traced, "fc", "Merge")


class EightBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), *(nn.Conv2d(8, 8, 3, 1, 1) for _ in range(7)))

    def forward(self, x):
        return self.blocks(x).mean((2, 3))


def test_a_named_cut_not_in_the_graph_lists_the_five_closest_names():
    traced = trace(EightBlocks(), SIZE)  # blocks.0 .. blocks.7, all about as close to blocks.9
    with pytest.raises(CutError) as err:
        resolve_node(traced, "blocks.9")
    assert str(err.value) == (
        "no node or module 'blocks.9' in the traced graph; close: blocks.7, blocks.6, blocks.5, blocks.4, blocks.3 "
        "(pass a node name from autocut.trace.trace(model, size).qualname, a module path, an int or a callable)")


def test_a_named_cut_accepts_a_one_by_one_map():
    traced = trace(Merge(), (3, 4, 4))  # stem: 2x2, branches: 1x1
    cut = cut_at_node(traced, "add", "Merge")
    assert cut.feature_shape == (16, 1, 1) and cut.stride == 4


class Tokens(nn.Module):
    """Patch embedding, a class token, a norm on the tokens, then the class token as the output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        return self.head(self.norm(x)[:, 0])


def test_token_maps_are_cut_with_their_prefix_tokens_counted():
    cut = _cut(Tokens())
    assert (cut.where, cut.layout, cut.nf, cut.feature_shape, cut.prefix_tokens) == ("norm", Layout.NLC, 8, (8, 8, 8), 1)
    assert cut.after == "norm" and cut.dropped == ("head",)


class ChannelsLast(nn.Module):
    """A square map with as many channels as its side: only the permute says it is NHWC."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.fc(x.mean((1, 2)))


def test_a_permute_to_channels_last_decides_an_ambiguous_layout():
    cut = _cut(ChannelsLast())
    assert (cut.where, cut.layout, cut.feature_shape) == ("permute", Layout.NHWC, (8, 8, 8))


# --- a head that runs ops on the map before its pool: what it runs per channel stays in the body ---


class Mean(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(self.dims)


class Classifier(nn.Module):
    """A head that runs ``prelude`` on a map of 16 channels, then its own pooling module and a Linear."""

    def __init__(self, dims=(2, 3)):
        super().__init__()
        self.pool, self.fc = Mean(dims), nn.Linear(16, 2)

    def prelude(self, x):
        return x

    def forward(self, x):
        return self.fc(self.pool(self.prelude(x)))


class FunctionalRelu(Classifier):
    def prelude(self, x):
        return F.relu(x)


class MethodRelu(Classifier):
    def prelude(self, x):
        return x.relu()


class NormAndScale(Classifier):
    """A norm by ``F.batch_norm`` on (C,) buffers, then a scale and a shift made of (C,) parameters."""

    def __init__(self):
        super().__init__()
        for name in ("mean", "var", "weight", "bias"):
            self.register_buffer(name, torch.rand(16) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.rand(16)), nn.Parameter(torch.rand(16))

    def prelude(self, x):
        x = F.batch_norm(x, self.mean, self.var, self.weight, self.bias)
        return x * self.gamma.view(1, -1, 1, 1) + self.beta[:, None, None]


class PositionBias(Classifier):
    """A parameter per position of the 8x8 map: constant, but not per channel."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.rand(64))

    def prelude(self, x):
        return x + self.pos.view(1, 1, 8, 8)


class ExcitationGate(Classifier):
    """A gate per image and channel, computed from the map (squeeze and excitation): not a constant."""

    def prelude(self, x):
        return x * x.mean((2, 3), keepdim=True).sigmoid()


class Headed(nn.Module):
    """``features`` make a 16 x 8 x 8 map at 32 px; ``head`` maps it to logits."""

    def __init__(self, head):
        super().__init__()
        self.features = nn.Sequential(conv(3, 8, 2), conv(8, 16, 2))
        self.head = head

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("head,where", [
    (FunctionalRelu, "head.relu"),
    (MethodRelu, "head.relu"),
    (NormAndScale, "head.add"),  # the norm, the scale and the shift
    (PositionBias, "features.1.1"),
    (ExcitationGate, "features.1.1"),
])
def test_the_body_keeps_what_the_head_runs_per_channel_before_its_pool(head, where):
    model = Headed(head()).eval()
    cut = _cut(model)
    assert (cut.where, cut.feature_shape, cut.layout) == (where, (16, 8, 8), Layout.NCHW)
    # the body ends where the map the head's own pool takes is made (the oracle: that map, in the
    # model's own forward), or at the head's input where the head begins with what is not per channel
    seen = []
    model.head.pool.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        model(x)
        kept = autocut.create_body(model, input_size=SIZE).eval()(x)
        torch.testing.assert_close(kept, model.features(x) if where == "features.1.1" else seen[0], rtol=0, atol=0)


class ChannelsLastHeaded(Headed):
    """The map permuted to channels-last (16 x 8 x 8 as 8 x 8 x 16) before the head."""

    def forward(self, x):
        return self.head(self.features(x).permute(0, 2, 3, 1))


class Tokened(nn.Module):
    """An 8 x 8 patch grid of 16-channel tokens (no class token), mixed by a Linear, then the head."""

    def __init__(self, head):
        super().__init__()
        self.proj, self.mix, self.head = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 16), head

    def forward(self, x):
        return self.head(self.mix(self.proj(x).flatten(2).transpose(1, 2)))


class LayerNormAndScale(Classifier):
    """``F.layer_norm`` over the last dim, then a (C,) scale: per channel in NHWC and tokens."""

    def __init__(self, dims):
        super().__init__(dims)
        self.weight, self.bias, self.gamma = (nn.Parameter(torch.rand(16)) for _ in range(3))

    def prelude(self, x):
        return F.layer_norm(x, (16,), self.weight, self.bias) * self.gamma


class FunctionalLinear(Classifier):
    """A Linear by ``F.linear`` on its 16 x 16 weight: it mixes channels, so the head begins there."""

    def __init__(self, dims):
        super().__init__(dims)
        self.weight = nn.Parameter(torch.rand(16, 16))

    def prelude(self, x):
        return F.relu(F.linear(x, self.weight))


@pytest.mark.parametrize("model,layout,where", [
    (lambda: ChannelsLastHeaded(LayerNormAndScale((1, 2))), Layout.NHWC, "head.mul"),
    (lambda: ChannelsLastHeaded(FunctionalLinear((1, 2))), Layout.NHWC, "permute"),
    (lambda: Tokened(LayerNormAndScale((1,))), Layout.NLC, "head.mul"),
    (lambda: Tokened(FunctionalLinear((1,))), Layout.NLC, "mix"),
])
def test_per_channel_ops_in_the_head_are_read_along_the_last_dim_of_channels_last_maps_and_tokens(model, layout, where):
    cut = _cut(model().eval())
    assert (cut.where, cut.layout, cut.feature_shape) == (where, layout, (16, 8, 8))


class ScaleThenMeanInOneModule(nn.Module):
    """A head whose own forward scales the map per channel, then pools with a function: the ops and
    the pool share one module, which is not a module registered after the pool."""

    def __init__(self):
        super().__init__()
        self.gamma, self.fc = nn.Parameter(torch.rand(16) + 0.5), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc((x * self.gamma.view(1, -1, 1, 1) - 0.5).relu().mean((2, 3)))


def test_per_channel_ops_before_a_functional_pool_in_the_same_module_stay_in_the_body():
    model = Headed(ScaleThenMeanInOneModule()).eval()
    cut = _cut(model)
    assert (cut.where, cut.feature_shape) == ("head.relu", (16, 8, 8))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():  # the oracle: the map the head's own forward pools
        expected = (model.features(x) * model.head.gamma.view(1, -1, 1, 1) - 0.5).relu()
        kept = autocut.create_body(model, input_size=SIZE).eval()(x)
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)


class MapAndTokens(nn.Module):
    """Returns its map twice: as tokens on the map's own grid (8x6 at 32x24: 48 tokens, which no
    square grid reads) and pooled, as image encoders return tokens and an embedding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, 1, 1)

    def forward(self, x):
        m = self.conv(x)
        return m.flatten(2).transpose(1, 2), m.mean((2, 3))


class TokensAndEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.encoder = MapAndTokens()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        tokens, pooled = self.encoder(self.stem(x))
        return self.fc(tokens.mean(1) + pooled)


def test_a_module_that_returns_its_map_as_tokens_on_the_grid_of_the_maps_before_is_no_head():
    # read as no map, the encoder would be a head (a map in, a pooled vector out) and the cut its input, the stem's
    cut = _cut(TokensAndEmbedding(), size=(3, 32, 24))
    assert (cut.where, cut.after, cut.layout, cut.nf, cut.feature_shape, cut.stride) == (
        "encoder.conv", "encoder.conv", Layout.NCHW, 16, (16, 8, 6), 4)
    assert cut.dropped == ("fc",)
    model = TokensAndEmbedding().eval()
    x = torch.randn(2, 3, 32, 24)
    torch.testing.assert_close(autocut.create_body(model, input_size=(3, 32, 24))(x), model.encoder.conv(model.stem(x)))
