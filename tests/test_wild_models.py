"""Model code as it is written in the wild, each shape on a small hand-written module: a forward
set on the instance (``features()`` + ``logits()``, ``fc`` renamed ``last_linear``), spatial layers
inside the classifier container (MONAI's ``class_layers.relu``), and per-channel ops the module
hooks cannot stop after. The oracle is the input of the model's own last global pooling in its
own eager forward, at the model's own size (224 px for a module that states none)."""

import functools
import types
from collections import OrderedDict
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocut
from autocut.cut_check import check_module_cut
from autocut.cut_hooks import EarlyExitBody, find_cut_by_hooks, probe_modules
from autocut.errors import CutError

SIZE = (3, 224, 224)  # the size a module that states none is described at


def _x(b=2):
    return torch.randn(b, *SIZE, generator=torch.Generator().manual_seed(0))


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Running statistics away from (0, 1), so that a body one BatchNorm short shows in the values."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _pool_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's last global pooling in its own eager forward: a pre-hook on every
    pooling module, and the pooling functions wrapped while it runs."""
    seen = []
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
    handles = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
               for m in model.modules() if isinstance(m, pools)]

    def spy(fn):
        @functools.wraps(fn)
        def pool(x, *args, **kwargs):
            seen.append(x.clone())
            return fn(x, *args, **kwargs)
        return pool

    try:
        with torch.no_grad(), mock.patch.object(F, "avg_pool2d", spy(F.avg_pool2d)), \
                mock.patch.object(F, "adaptive_avg_pool2d", spy(F.adaptive_avg_pool2d)):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen[-1]


def _assert_body_is_the_pool_input(model: nn.Module) -> nn.Module:
    body = autocut.create_body(model).eval()
    with torch.no_grad():
        got = body(_x())
    torch.testing.assert_close(got, _pool_input(model, _x()), rtol=0, atol=1e-5)
    return body


def _stem(width: int = 16) -> nn.Sequential:
    """224 px to a 7x7 map, ending with a BatchNorm (DenseNet's ``norm5``): no activation of its own."""
    layers = []
    for i, (cin, cout) in enumerate([(3, 8), (8, 8), (8, 16), (16, 16), (16, width)]):
        layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout)] + ([nn.ReLU()] if i < 4 else [])
    return nn.Sequential(*layers)


# --- 1. a forward set on the instance -----------------------------------------------------------


class DenseNetLike(nn.Module):
    """A model whose class forward reads ``self.fc`` and pools ``features`` as they are."""

    def __init__(self):
        super().__init__()
        self.features = _stem()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _features_and_logits(model: nn.Module, keep_fc: bool = False) -> nn.Module:
    """What pretrainedmodels does to it: ``fc`` renamed ``last_linear``, ``logits()`` (a ReLU
    before a fixed 7x7 average pool) and a forward bound on the instance. With ``keep_fc`` the
    class forward still runs, but it is not what the instance runs."""
    model.last_linear = model.fc
    if not keep_fc:
        del model.fc

    def logits(self, features):
        x = F.relu(features, inplace=True)
        x = F.avg_pool2d(x, kernel_size=7, stride=1)
        return self.last_linear(x.view(x.size(0), -1))

    def forward(self, x):
        return self.logits(self.features(x))

    model.logits = types.MethodType(logits, model)
    model.forward = types.MethodType(forward, model)
    return model


@pytest.mark.parametrize("keep_fc", [False, True], ids=["fc-renamed", "fc-kept"])
def test_a_forward_set_on_the_instance_is_traced_and_the_relu_in_its_logits_kept(keep_fc):
    model = _randomise_norms(_features_and_logits(DenseNetLike(), keep_fc))
    cut = autocut.discover(model)
    assert (cut.where, cut.method, cut.nf, cut.feature_shape, cut.input_size) == ("relu", "fx", 16, (16, 7, 7), SIZE)
    assert cut.dropped == (("fc",) if keep_fc else ("last_linear",))  # one Linear: named once, by its first name
    _assert_body_is_the_pool_input(model)
    adapted = autocut.adapt(model, n_out=3)  # the class forward (and its self.fc) never runs
    assert adapted.eval()(_x()).shape == (2, 3)


def test_a_closure_set_as_the_forward_is_traced_with_its_own_arguments():
    model = _randomise_norms(_features_and_logits(DenseNetLike()))
    model.forward = lambda x, scale=1.0: model.logits(model.features(x) * scale)
    cut = autocut.discover(model)
    assert (cut.where, cut.method, cut.feature_shape) == ("relu", "fx", (16, 7, 7))
    _assert_body_is_the_pool_input(model)


class DataDependent(nn.Module):
    """A class forward fx cannot trace (it branches on values) and that reads ``self.fc``."""

    def __init__(self):
        super().__init__()
        self.features = _stem()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > -1e30:
            x = F.relu(x)
        return self.fc(self.pool(x).flatten(1))


def test_the_hooks_body_runs_the_forward_set_on_the_instance():
    model = _randomise_norms(DataDependent())
    model.last_linear = model.fc
    del model.fc

    def forward(self, x):
        x = self.features(x)
        if x.sum() > -1e30:  # fx cannot trace this one either: the hooks rule runs it
            x = F.relu(x)
        return self.last_linear(self.pool(x).flatten(1))

    model.forward = types.MethodType(forward, model)
    cut = autocut.discover(model)
    assert (cut.where, cut.method, cut.feature_shape, cut.dropped) == ("pool:input", "hooks", (16, 7, 7), ("last_linear",))
    body = _assert_body_is_the_pool_input(model)
    assert isinstance(body, EarlyExitBody) and "last_linear.weight" not in body.state_dict()
    assert autocut.adapt(model, n_out=3).eval()(_x()).shape == (2, 3)


# --- 2. spatial layers inside the classifier container ------------------------------------------


class ClassLayers(nn.Module):
    """MONAI's DenseNet: ``features`` end with a BatchNorm; the ReLU is the classifier's."""

    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.features = _stem()
        self.class_layers = nn.Sequential(OrderedDict(
            relu=act or nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1), out=nn.Linear(16, 10)))

    def forward(self, x):
        return self.class_layers(self.features(x))


@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.PReLU(16)], ids=["relu", "prelu"])
def test_an_activation_inside_the_classifier_container_stays_in_the_body(act):
    model = _randomise_norms(ClassLayers(act()))
    cut = autocut.discover(model)
    assert (cut.where, cut.method, cut.nf, cut.feature_shape, cut.input_size) == (
        "class_layers.relu", "fx", 16, (16, 7, 7), SIZE)
    assert cut.dropped == ("class_layers.out",)  # only what really is dropped
    body = _assert_body_is_the_pool_input(model)
    assert {k.rsplit(".", 1)[0] for k in body.state_dict()} >= {"features.12"} | (
        {"class_layers.relu"} if isinstance(model.class_layers.relu, nn.PReLU) else set())
    assert not any(k.startswith("class_layers.out") for k in body.state_dict())


class ConvFirstClassifier(ClassLayers):
    """A norm, then a 1x1 conv that keeps the shape (16 to 16 channels), then the pool: the norm
    is per channel and stays; the conv mixes channels and begins the head, as SqueezeNet's does."""

    def __init__(self):
        super().__init__()
        self.class_layers = nn.Sequential(OrderedDict(
            norm=nn.BatchNorm2d(16), conv=nn.Conv2d(16, 16, 1), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1), out=nn.Linear(16, 10)))


def test_a_conv_in_the_classifier_container_begins_the_head_after_the_per_channel_norm():
    model = _randomise_norms(ConvFirstClassifier())
    cut = autocut.discover(model)
    assert (cut.where, cut.feature_shape) == ("class_layers.norm", (16, 7, 7))
    assert cut.dropped == ("class_layers.conv", "class_layers.out")


class GatedClassifier(nn.Module):
    """A head that weighs the map by a gate computed from it before pooling: not per channel."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Conv2d(16, 1, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc((x * self.gate(x).sigmoid()).mean((2, 3)))


def test_a_gate_made_from_the_map_begins_the_head():
    model = ClassLayers()
    model.class_layers = GatedClassifier()
    cut = autocut.discover(model.eval())
    assert (cut.where, cut.dropped) == ("features.13", ("class_layers",))


# --- 3. the hooks rule: per-channel ops after the cut are moved past or refused ------------------


class Untraceable(nn.Module):
    """``features`` then ``head``, with data-dependent control flow: only module hooks apply."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.features = _stem()
        self.head = head

    def forward(self, x):
        x = self.features(x)
        if x.sum() > -1e30:
            x = self.head(x)
        return x


class ReluThenPoolModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(F.relu(x)).flatten(1))


class ReluThenMean(ReluThenPoolModule):
    def forward(self, x):
        return self.fc(F.relu(x).mean((2, 3)))


def test_the_hooks_rule_keeps_a_relu_module_inside_the_classifier_container():
    model = _randomise_norms(Untraceable(ClassLayers().class_layers))
    cut = autocut.discover(model)
    assert (cut.where, cut.method, cut.feature_shape, cut.dropped) == ("head.relu", "hooks", (16, 7, 7), ("head.out",))
    _assert_body_is_the_pool_input(model)


def test_the_hooks_rule_stops_at_the_pool_after_a_functional_relu_in_the_head():
    model = _randomise_norms(Untraceable(ReluThenPoolModule()))
    calls = probe_modules(model, SIZE)
    first = find_cut_by_hooks(model, calls, SIZE, "Untraceable")
    assert first.where == "head:input"
    check = check_module_cut(model, first)
    assert check.problems and check.move_to == "head.pool:input"
    cut = autocut.discover(model)
    assert (cut.where, cut.method, cut.dropped) == ("head.pool:input", "hooks", ("head.fc",))
    _assert_body_is_the_pool_input(model)


def test_the_hooks_rule_refuses_a_functional_relu_no_module_can_stop_after():
    model = _randomise_norms(Untraceable(ReluThenMean()))
    with pytest.raises(CutError, match=r"at 'head:input' \(found by hooks\) does not hold: .*aten\.relu runs on the map "
                                       r"after it in 'head', before its pooling.* Pass cut= a callable model -> body"):
        autocut.discover(model)


def test_the_hooks_rule_refuses_a_functional_relu_in_the_models_own_forward_after_the_cut():
    class Functional(DataDependent):
        def forward(self, x):
            x = self.features(x)
            if x.sum() > -1e30:
                x = F.relu(x, inplace=True)
            return self.fc(x.mean((2, 3)))

    with pytest.raises(CutError, match=r"at 'features' \(found by hooks\) does not hold: .*aten\.relu_ runs on the map "
                                       r"after it in the model's own forward.*lambda m: nn\.Sequential\(m\.features, "):
        autocut.discover(_randomise_norms(Functional()))
