"""Bodies (``autocut.body``): the model truncated at its cut, following ``.train()``/``.eval()``,
keeping the model's parameter names, surviving deepcopy, state dicts and torch.compile, and the
bodies a user asks for (an int, a node name, a callable)."""

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

import autocut

from handmade import ConstantsNet, FunctionalPoolNet, TrainBranchNet

SIZE = (3, 32, 32)


def _x(b=2):
    return torch.randn(b, *SIZE, generator=torch.Generator().manual_seed(0))


def test_body_follows_train_and_eval_graphs():
    model = TrainBranchNet()
    body = autocut.create_body(model, input_size=(3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    body.train()
    torch.testing.assert_close(body(x), model.conv(x) * 2)
    body.eval()
    torch.testing.assert_close(body(x), model.conv(x))
    for _ in range(2):  # each mode's compiled code is kept: switching back must not mix them up
        body.train()
        torch.testing.assert_close(body(x), model.conv(x) * 2)
        body.eval()
        torch.testing.assert_close(body(x), model.conv(x))
    clone = copy.deepcopy(body)
    assert not clone.training
    torch.testing.assert_close(clone(x), model.conv(x))
    torch.testing.assert_close(clone.train()(x), model.conv(x) * 2)
    assert body.train_graph is not body.eval_graph
    # a model whose forward is the same in both modes gets one graph for both
    plain = autocut.create_body(FunctionalPoolNet(), input_size=SIZE)
    assert plain.train_graph is plain.eval_graph
    plain_clone = copy.deepcopy(plain)
    assert plain_clone.train_graph is plain_clone.eval_graph


def test_tensors_made_in_forward_stay_off_the_users_model():
    """fx stores such tensors on the traced model; autocut moves them into the body."""
    model = ConstantsNet()
    attributes, keys = set(vars(model)), set(model.state_dict())
    for _ in range(2):
        autocut.discover(model, input_size=(3, 8, 8))
    body = autocut.create_body(model, input_size=(3, 8, 8))
    autocut.adapt(model, n_out=3, input_size=(3, 8, 8))
    assert set(vars(model)) == attributes and set(model.state_dict()) == keys
    x = torch.randn(2, 3, 8, 8)
    shift = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(body.eval()(x), model.conv(x) + shift)
    torch.testing.assert_close(body.train()(x), (model.conv(x) + shift) * 2)
    assert set(body.state_dict()) == {"conv.weight", "conv.bias"}  # the constants are not state
    torch.testing.assert_close(copy.deepcopy(body).eval()(x), model.conv(x) + shift)


def test_body_survives_deepcopy_state_dict_round_trip_and_compile():
    model = FunctionalPoolNet().eval()
    body = autocut.create_body(model, input_size=SIZE).eval()
    x = _x()
    expected = body(x)
    clone = copy.deepcopy(body)
    torch.testing.assert_close(clone(x), expected)
    buffer = io.BytesIO()
    torch.save(body.state_dict(), buffer)
    buffer.seek(0)
    fresh = autocut.create_body(FunctionalPoolNet().eval(), input_size=SIZE).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), expected)
    compiled = torch.compile(body)  # inductor: graph capture and code generation
    torch.testing.assert_close(compiled(x), expected)


def test_body_keeps_original_names_so_original_checkpoints_load():
    model = FunctionalPoolNet()
    body = autocut.create_body(model, input_size=SIZE)
    original = model.state_dict()
    assert set(body.state_dict()) == {k for k in original if not k.startswith("fc.")}
    other = FunctionalPoolNet()
    body2 = autocut.create_body(other, input_size=SIZE)
    body2.load_state_dict({k: v for k, v in original.items() if not k.startswith("fc.")})
    torch.testing.assert_close(body2.eval()(_x()), body.eval()(_x()))


def test_user_cuts_int_name_and_callable():
    model = FunctionalPoolNet().eval()
    by_int = autocut.create_body(model, cut=2, input_size=SIZE).eval()
    torch.testing.assert_close(by_int(_x()), model.stage(model.stem(_x())))
    assert by_int.cut.method == "user"
    by_name = autocut.create_body(model, cut="stem", input_size=SIZE).eval()
    torch.testing.assert_close(by_name(_x()), model.stem(_x()))
    assert by_name.cut.nf == 8
    by_callable = autocut.create_body(model, cut=lambda m: m.stem, input_size=SIZE).eval()
    torch.testing.assert_close(by_callable(_x()), model.stem(_x()))
    with pytest.raises(autocut.CutError, match="no node or module"):
        autocut.create_body(model, cut="nonexistent", input_size=SIZE)
    with pytest.raises(autocut.CutError, match="out of range"):
        autocut.create_body(model, cut=9, input_size=SIZE)
    with pytest.raises(autocut.CutError, match="not a feature map"):
        autocut.create_body(model, cut="fc", input_size=SIZE)


class TrainOnlyFails(TrainBranchNet):
    """fx can trace the eval forward but not the train one (control flow on a value in training)."""

    def forward(self, x):
        x = self.conv(x)
        if self.training and x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_a_train_graph_fx_cannot_trace_is_warned_and_the_eval_graph_serves_both():
    model = TrainOnlyFails()
    warning = r"TrainOnlyFails could not be traced in train mode \(TraceError: .*\); the body runs its eval graph in both modes"
    with pytest.warns(UserWarning, match=warning):
        body = autocut.create_body(model, input_size=(3, 8, 8))
    assert body.train_graph is body.eval_graph
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(body.train()(x), model.conv(x))


def test_the_body_keeps_input_checks_before_the_cut_and_nothing_after():
    class Checked(FunctionalPoolNet):
        def forward(self, x):
            torch._assert(x.shape[1] == 3, "needs RGB")
            return super().forward(x)

    body = autocut.create_body(Checked(), input_size=SIZE)
    code = body.eval_graph.python_code("self").src
    assert "torch._assert" in code and "fc" not in code and "adaptive" not in code
    with pytest.raises(AssertionError, match="needs RGB"):
        body(torch.randn(1, 4, 32, 32))


def test_a_graph_body_carries_each_module_calls_shape_for_the_layer_groups():
    body = autocut.create_body(FunctionalPoolNet(), input_size=SIZE)
    size, calls = body.module_calls
    assert size == (32, 32)
    assert calls[0] == ("stem.0", (11, 8, 16, 16)) and calls[-1] == ("stage.1", (11, 16, 8, 8))
    assert [path for path, _ in calls] == ["stem.0", "stem.1", "stem.2", "stage.0", "stage.1"]


class _FunctionalDown(nn.Module):
    """A stride-2 conv written as ``F.conv2d`` of its own weight: fx traces through it, so the graph
    has no call of this module, only the ops made inside it."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, stride=2, padding=1)


class _DownNet(nn.Module):
    image_size = 32  # its own size: the layer groups are read on the trace, not by a forward

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.down1, self.stage1 = _FunctionalDown(8, 16), nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.down2, self.stage2 = _FunctionalDown(16, 32), nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(self.stage2(self.down2(self.stage1(self.down1(self.stem(x))))).mean((2, 3)))


def test_a_module_fx_traces_through_is_called_where_its_ops_run_and_grouped_at_their_stride():
    from autocut.probe import PROBE_BATCH

    net = _DownNet()
    model = autocut.adapt(net, n_out=3)
    # the oracle: the original model's own calls, each module's output shape by a forward hook
    seen = {}
    for path in ("stem.0", "down1", "stage1.0", "down2"):
        net.get_submodule(path).register_forward_hook(lambda m, a, out, path=path: seen.__setitem__(path, tuple(out.shape)))
    net.eval()(torch.zeros(PROBE_BATCH, *SIZE))
    size, calls = model[0].module_calls
    assert [(p, s) for p, s in calls if p in seen] == list(seen.items())
    stages = [sorted({n.split(".")[1] for n, p in model[0].named_parameters(prefix="0") if id(p) in set(map(id, g))})
              for g in autocut.layer_groups(model, n=None)[:-1]]
    assert stages == [["stem"], ["down1", "stage1"], ["down2", "stage2"]]  # each down at the stride it makes


def test_a_body_made_by_a_callable_ends_in_nchw():
    from autocut.body import SequentialBody
    from autocut.layout import Layout, ToNCHW

    from handmade import NHWCBlockNet

    model = NHWCBlockNet().eval()

    class Features(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.features(x)

    body = autocut.create_body(model, cut=Features, input_size=SIZE).eval()
    assert body.cut.layout == Layout.NHWC and body.cut.method == "user"
    assert isinstance(body.to_nchw, ToNCHW) and body.to_nchw.layout == Layout.NHWC
    x = _x()
    torch.testing.assert_close(body(x), model.features(x).permute(0, 3, 1, 2))
    assert isinstance(autocut.create_body(FunctionalPoolNet(), cut=-1, input_size=SIZE), SequentialBody)


def test_bodies_refuse_what_they_cannot_build():
    from autocut.body import build_body

    model = FunctionalPoolNet()
    with pytest.raises(autocut.CutError, match="cut must be None, a Cut, an int, a node name or a callable, got True"):
        autocut.create_body(model, cut=True, input_size=SIZE)
    with pytest.raises(autocut.CutError, match="the cut callable returned Tensor, not an nn.Module"):
        autocut.create_body(model, cut=lambda m: torch.zeros(1), input_size=SIZE)
    with pytest.raises(autocut.CutError, match="cut=0 is out of range for FunctionalPoolNet, which has 3 children"):
        autocut.create_body(model, cut=0, input_size=SIZE)
    cut = autocut.discover(model, input_size=SIZE)
    with pytest.raises(autocut.CutError, match="unknown cut method 'magic'"):
        build_body(model, dataclasses.replace(cut, method="magic"), SIZE, "net")
    with pytest.raises(autocut.CutError, match="no node 'elsewhere' in the graph of FunctionalPoolNet"):
        build_body(model, dataclasses.replace(cut, where="elsewhere"), SIZE, "net")


def test_a_copied_body_keeps_its_record_its_mode_and_each_modules_mode():
    body = autocut.create_body(TrainBranchNet(), input_size=(3, 8, 8)).train()
    body.conv.eval()  # a module frozen on purpose (fastai's BnFreeze does this to norms)
    clone = copy.deepcopy(body)
    assert clone.cut == body.cut and clone.module_calls == body.module_calls
    assert clone.norm_parameter_names == body.norm_parameter_names
    assert clone.training and not clone.conv.training
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(clone(x), body(x))  # the train graph, without a .train() call
    torch.testing.assert_close(clone(x), body.conv(x) * 2)



class _ReadsTrainingInItsHead(torch.nn.Module):
    """Reads its training flag only after the map (dropout before the classifier, as timm's
    ``forward_head`` does)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(torch.nn.functional.dropout(x, 0.5, self.training))


class _ReadsTrainingBeforeTheMap(_ReadsTrainingInItsHead):
    def forward(self, x):
        x = self.conv(x)
        x = x * (1.0 if self.training else 1.0)  # the same either way: but read before the map is made
        return self.fc(torch.relu(x).mean((2, 3)))


class _OwnTrainingFlag(_ReadsTrainingInItsHead):
    training = property(lambda self: self.__dict__.get("_mode", True), lambda self, v: self.__dict__.update(_mode=v))


@pytest.mark.parametrize("model, train_traces", [(_ReadsTrainingInItsHead(), 0), (_ReadsTrainingBeforeTheMap(), 1),
                                                 (_OwnTrainingFlag(), 1)])
def test_the_train_graph_is_traced_only_where_code_before_the_map_reads_the_mode(monkeypatch, model, train_traces):
    from autocut import body as body_module

    calls = []
    real = body_module.trace_graph
    monkeypatch.setattr(body_module, "trace_graph", lambda m, training=False: calls.append(training) or real(m, training))
    body = autocut.create_body(model, input_size=(3, 8, 8))
    assert calls.count(True) == train_traces  # (a class with its own flag: its reads cannot be seen, so it is traced)
    assert body.train_graph is body.eval_graph
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(body.train()(x), torch.relu(model.conv(x)))


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                  "torchvision:inception_v3", "torchvision:mobilenet_v3_small", "mobilevitv2_050"])
def test_the_one_graph_for_both_modes_is_the_train_graph_a_second_trace_makes(monkeypatch, name):
    from autocut import body as body_module
    from autocut import zoo
    from autocut.body import _same_graph

    spec = zoo.resolve(name)
    one = autocut.create_body(zoo.build(spec, device="meta").train())
    monkeypatch.setattr(body_module, "_eval_graph_serves_training", lambda traced, cut: False)
    autocut.clear_cache()  # (not the recipe the first call kept: a second trace)
    two = autocut.create_body(zoo.build(spec, device="meta").train())
    assert _same_graph(one.train_graph, two.train_graph) and _same_graph(one.eval_graph, two.eval_graph)


class _TrainOnlyModule(torch.nn.Module):
    """A module only training runs before the map (a noise layer with a weight): the train graph
    calls it, the eval graph does not."""

    def __init__(self):
        super().__init__()
        self.noise = torch.nn.Conv2d(3, 3, 1)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        if self.training:
            x = self.noise(x)
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_body_made_in_eval_mode_traces_its_train_graph_when_first_trained(monkeypatch):
    from autocut import body as body_module

    calls = []
    real = body_module.trace_graph
    monkeypatch.setattr(body_module, "trace_graph", lambda m, training=False: calls.append(training) or real(m, training))
    x = torch.randn(2, 3, 8, 8)
    for make, expected in [(TrainBranchNet, lambda m: m.conv(x) * 2),
                           (ConstantsNet, lambda m: (m.conv(x) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)) * 2),
                           (_TrainOnlyModule, lambda m: m.conv(m.noise(x)))]:
        calls.clear()
        model = make().eval()
        model.fc.train()  # a flag of the user's own, on a module the body drops
        attributes, keys = set(vars(model)), set(model.state_dict())
        body = autocut.create_body(model, input_size=(3, 8, 8))
        assert calls == [] and not body.training  # an eval body: no second trace yet
        eval_out = body(x)
        assert calls == []
        body.train()
        assert calls == [True]  # traced once, when first needed
        torch.testing.assert_close(body(x), expected(model))
        body.eval()
        torch.testing.assert_close(body(x), eval_out)
        body.train()
        assert calls == [True] and body.train_graph is not body.eval_graph
        assert set(vars(model)) == attributes and set(model.state_dict()) == keys  # the user's model as it was
        assert model.fc.training  # the second trace left the user's flags as they were
    assert sorted(body.state_dict()) == ["conv.bias", "conv.weight", "noise.bias", "noise.weight"]  # noise: added


@pytest.mark.parametrize("make, expected", [
    (_TrainOnlyModule, lambda m, x: m.conv(m.noise(x))),
    (ConstantsNet, lambda m, x: (m.conv(x) + torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=x.dtype).view(1, 4, 1, 1)) * 2)])
def test_a_body_made_in_eval_mode_and_converted_before_it_is_first_trained_trains_converted(make, expected):
    model = make().eval()
    body = autocut.create_body(model, input_size=(3, 8, 8)).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    out = body.train()(x)  # what only training reads (the noise conv, the x2 constant) converted too
    assert out.dtype == torch.bfloat16 and {t.dtype for t in body.state_dict().values()} == {torch.bfloat16}
    torch.testing.assert_close(out, expected(model, x))


def test_a_copy_of_a_body_made_in_eval_mode_has_both_graphs_and_no_model():
    model = TrainBranchNet().eval()
    body = autocut.create_body(model, input_size=(3, 8, 8))
    clone = copy.deepcopy(body)
    assert "_pending_train_graph" not in vars(clone) and "_pending_train_graph" not in vars(body)
    assert not any(m is model.fc for m in clone.modules())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(clone.eval()(x), model.conv(x))
    torch.testing.assert_close(clone.train()(x), model.conv(x) * 2)


class _NestedTrainOnly(torch.nn.Module):
    """Training alone reads ``aux.inner`` (a buffer, a parameter and a module at nested paths)
    before the map; the eval graph reads only ``aux.conv``, so the body has ``aux`` but no
    ``aux.inner`` until its train graph is traced."""

    def __init__(self):
        super().__init__()
        inner = torch.nn.Module()
        inner.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
        inner.gain = torch.nn.Parameter(torch.tensor(0.5))
        inner.extra = torch.nn.Conv2d(3, 3, 1)
        self.aux = torch.nn.Module()
        self.aux.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.aux.inner = inner
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        if self.training:
            x = self.aux.inner.extra(x * self.aux.inner.scale) * self.aux.inner.gain
        return self.fc(self.aux.conv(x).mean((2, 3)))


def test_a_body_made_in_eval_mode_gets_what_only_training_reads_at_nested_paths_as_the_model_has_it():
    model = _NestedTrainOnly().eval()
    body = autocut.create_body(model, input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    inner = model.aux.inner
    torch.testing.assert_close(body.train()(x), model.aux.conv(inner.extra(x * inner.scale) * inner.gain))
    torch.testing.assert_close(body.eval()(x), model.aux.conv(x))  # the module the eval graph reads is still there
    # the same objects, each as the model holds it: the parameter trains (the model's own), the buffer is state
    assert body.get_submodule("aux.inner.extra") is inner.extra and body.get_submodule("aux.conv") is model.aux.conv
    assert body.get_parameter("aux.inner.gain") is inner.gain and body.get_buffer("aux.inner.scale") is inner.scale
    assert sorted(body.state_dict()) == ["aux.conv.bias", "aux.conv.weight", "aux.inner.extra.bias",
                                         "aux.inner.extra.weight", "aux.inner.gain", "aux.inner.scale"]


def test_a_hand_made_body_past_a_map_the_forward_makes_between_modules_names_the_node():
    # FunctionalPoolNet's map is F.relu in its own forward (node 'relu'), no module's output: the
    # refusal names the node, there being no module to end the body with
    with pytest.raises(autocut.CutError) as err:
        autocut.create_body(FunctionalPoolNet(), cut=lambda m: m, input_size=SIZE)
    assert str(err.value) == (
        "the body the cut callable <lambda> makes of FunctionalPoolNet returns shape (B, 10) for input (3, 32, 32), not "
        "the feature map the cut says: 16x8x8 at 'relu' (NCHW); it goes on after the node 'relu' (pooling or "
        "flattening): end the body there, or pass cut=None to find the cut")


class _PairStem(nn.Module):
    """Makes the map, and returns it twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x):
        m = self.conv(x).relu()
        return m, m


class _PairHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, pair):
        return self.fc(pair[1].mean((2, 3)))


class _PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = _PairStem(), _PairHead()

    def forward(self, x):
        return self.head(self.stem(x))


@pytest.mark.parametrize("cut", [1, -1])
def test_a_cut_whose_last_child_returns_more_than_the_map_is_not_told_to_pass_itself(cut):
    with pytest.raises(autocut.CutError) as err:
        autocut.create_body(_PairNet(), cut=cut, input_size=(3, 16, 16))
    assert str(err.value) == (
        f"the body cut={cut} makes of _PairNet (its first 1 children) returns [(11, 8, 8, 8), (11, 8, 8, 8)] for input "
        "(3, 16, 16), not the feature map the cut says: 8x8x8 at 'stem.relu' (NCHW); 'stem', the last child kept, makes "
        "the map but returns more than it: pass a callable that returns the map, or cut=None to find the cut")


def test_a_body_made_in_eval_mode_whose_train_forward_fx_cannot_trace_warns_when_first_trained_and_runs_its_eval_graph():
    model = TrainOnlyFails().eval()
    body = autocut.create_body(model, input_size=(3, 8, 8))
    warning = r"TrainOnlyFails could not be traced in train mode \(TraceError: .*\); the body runs its eval graph in both modes"
    with pytest.warns(UserWarning, match=warning):
        body.train()
    assert body.train_graph is body.eval_graph
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(body(x), model.conv(x))  # (the model's train forward would double it)
    torch.testing.assert_close(body.eval()(x), model.conv(x))


class _NormThenTrainScale(torch.nn.Module):
    """A conv and a batch norm, then a scale the forward applies in training only (before the map)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.training:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_a_module_replaced_in_a_body_made_in_eval_mode_stays_replaced_when_the_body_is_first_trained():
    # detection recipes freeze the norms of a pretrained backbone by swapping them for FrozenBatchNorm2d
    # before training: the train graph, traced then, runs the body's module, not the model's
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = _NormThenTrainScale().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    body = autocut.create_body(model, input_size=(3, 8, 8))
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(model.bn.state_dict())
    body.bn = frozen
    x = torch.randn(2, 3, 8, 8)
    body.train()
    assert body.bn is frozen and model.bn is not frozen
    with torch.no_grad():
        torch.testing.assert_close(body(x), frozen(model.conv(x)) * 2)  # running statistics, not the batch's
        model.bn.eval()
        torch.testing.assert_close(body(x), model.bn(model.conv(x)) * 2)


class _TrainScaledStages(torch.nn.Module):
    """Three stages at strides 2, 4 and 8; the forward scales the stem's map in training only."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.s1 = torch.nn.Conv2d(8, 16, 3, 2, 1)
        self.s2 = torch.nn.Conv2d(16, 32, 3, 2, 1)
        self.fc = torch.nn.Linear(32, 2)

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            x = x * 2
        return self.fc(self.s2(self.s1(x)).mean((2, 3)))


def test_a_pyramid_made_in_eval_mode_returns_each_levels_map_when_first_trained():
    torch.manual_seed(0)
    model = _TrainScaledStages().eval()
    pyramid = autocut.create_pyramid(model, input_size=SIZE)
    assert [level.stride for level in pyramid.levels] == [2, 4, 8]
    x = _x()
    with torch.no_grad():
        stem = model.stem(x)
        torch.testing.assert_close(pyramid(x), [stem, model.s1(stem), model.s2(model.s1(stem))])
        pyramid.train()
        trained = pyramid(x)
    assert isinstance(trained, list) and len(trained) == 3
    with torch.no_grad():
        torch.testing.assert_close(trained, [stem * 2, model.s1(stem * 2), model.s2(model.s1(stem * 2))])


def test_a_body_shares_the_models_modules_with_their_own_flags_and_makes_its_paths_in_its_mode():
    from autocut.body import build_body

    model = FunctionalPoolNet().eval()
    body, _ = build_body(model, autocut.discover(model, SIZE), SIZE, "FunctionalPoolNet")
    made = [path for path, m in body.named_modules() if type(m) is nn.Module]  # the paths' empty modules
    assert made == ["stem", "stage"] and not any(m.training for m in body.modules())
    model = FunctionalPoolNet().train()
    model.stem[1].eval()  # frozen on purpose: the body made without autocut's own restoring keeps it so
    body, _ = build_body(model, autocut.discover(model, SIZE), SIZE, "FunctionalPoolNet")
    assert [(path, m.training) for path, m in body.named_modules()][:4] == [
        ("", True), ("stem", True), ("stem.0", True), ("stem.1", False)]


def test_a_module_registration_hook_sees_each_module_a_body_installs():
    seen = []
    handle = nn.modules.module.register_module_module_registration_hook(
        lambda parent, name, module: seen.append((type(parent).__name__, name)))
    try:
        body = autocut.create_body(FunctionalPoolNet(), input_size=SIZE)
    finally:
        handle.remove()
    installed = [(type(m).__name__, name) for m in body.modules() for name in m._modules]
    assert len(installed) == 7 and set(installed) <= set(seen)
