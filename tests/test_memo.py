"""autocut.memo: what adapt and create_body remember of an architecture, and when they must not."""

import copy
import gc
import importlib
import warnings
import weakref

import numpy as np
import pytest
import torch
from test_body import _TrainOnlyModule
from torch import nn

import autocut

from handmade import ConstantsNet, DataDependentNet, FunctionalPoolNet, TrainBranchNet

memo = importlib.import_module("autocut.memo")
adapt_module = importlib.import_module("autocut.adapt")

SIZE = (3, 16, 16)


@pytest.fixture
def discoveries(monkeypatch):
    """The sizes discovery ran at, in order (a call the memo answers adds none)."""
    ran = []
    discover = adapt_module.discover_with_trace

    def counted(module, input_size, *args, **kwargs):
        ran.append(tuple(input_size))
        return discover(module, input_size, *args, **kwargs)

    monkeypatch.setattr(adapt_module, "discover_with_trace", counted)
    return ran


@pytest.fixture
def no_probe(monkeypatch):
    """Makes any probe forward fail: a call answered from a recipe must make none."""
    def refuse(*args, **kwargs):
        raise AssertionError("a probe forward ran")

    def forbid():
        for name in ("autocut.body", "autocut.groups"):
            monkeypatch.setattr(importlib.import_module(name), "probe_forward", refuse)
    return forbid


def _cold(make, **kwargs):
    """What the call gives with nothing remembered."""
    memo.clear_cache()
    try:
        return make(**kwargs)
    finally:
        memo.clear_cache()


def test_a_second_model_of_an_architecture_gets_the_body_a_first_call_would_give_with_its_own_weights(discoveries):
    torch.manual_seed(0)
    first, second = FunctionalPoolNet(), FunctionalPoolNet()
    autocut.create_body(first, input_size=SIZE)
    remembered = autocut.create_body(second, input_size=SIZE)
    assert discoveries == [SIZE]  # the second made from the recipe
    cold = _cold(lambda: autocut.create_body(copy.deepcopy(second), input_size=SIZE))
    assert remembered.cut == cold.cut
    assert remembered.eval_graph.python_code("self").src == cold.eval_graph.python_code("self").src
    assert remembered.get_parameter("stem.0.weight") is second.stem[0].weight  # its own weights, shared
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(remembered.eval()(x), cold.eval()(x), rtol=0, atol=0)
    assert not torch.allclose(remembered(x), autocut.create_body(first, input_size=SIZE).eval()(x))


def test_a_remembered_adapt_has_the_groups_of_a_first_call_made_of_its_own_parameters(discoveries):
    autocut.adapt("resnet18", n_out=3, input_size=64)
    model = autocut.adapt("resnet18", n_out=3, input_size=64)
    assert discoveries == [(3, 64, 64)]
    cold = _cold(lambda: autocut.adapt("resnet18", n_out=3, input_size=64))
    assert model.cut == cold.cut
    assert [g[:2] for g in model.cut.groups] == [("conv1", "layer2"), ("layer3", "layer4"), ("head", "head")]
    own = {id(p) for p in model.parameters()}
    groups = autocut.layer_groups(model)
    assert [len(g) for g in groups] == [len(g) for g in autocut.layer_groups(cold)]
    assert all(id(p) in own for g in groups for p in g)
    names = {id(p): n for n, p in model.named_parameters()}
    cold_names = {id(p): n for n, p in cold.named_parameters()}
    assert [[names[id(p)] for p in g] for g in groups] == [[cold_names[id(p)] for p in g] for g in autocut.layer_groups(cold)]


def test_a_model_cut_by_hooks_is_made_again_without_a_probe(discoveries, no_probe):
    second_model = DataDependentNet()
    cold = _cold(lambda: autocut.create_body(copy.deepcopy(second_model), input_size=SIZE))
    first = autocut.adapt(DataDependentNet(), n_out=2, input_size=SIZE)
    assert first.cut.method == "hooks"
    no_probe()
    second = autocut.adapt(second_model, n_out=2, input_size=SIZE)  # no check forward, no groups forward
    assert discoveries == [SIZE, SIZE] and second.cut == first.cut
    assert second.cut.groups == first.cut.groups and second.cut.groups
    assert [len(g) for g in autocut.layer_groups(second)] == [len(g) for g in autocut.layer_groups(first)]
    assert all(p is q for p, q in zip(autocut.layer_groups(second)[0], second_model.body.parameters()))
    for sign in (1, -1):  # (the forward doubles the map past ``body`` where its sum is positive)
        x = sign * torch.ones(2, *SIZE)
        torch.testing.assert_close(second[0](x), cold(x), rtol=0, atol=0)


class Flagged(nn.Module):
    """A plain attribute decides the forward (traced as a Python bool): the same parameters, two cuts."""

    def __init__(self, late: bool):
        super().__init__()
        self.late = late
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 2)
        self.fc0 = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv1(x)
        if self.late:
            return self.fc(self.conv2(x).mean((2, 3)))
        return self.fc0(x.mean((2, 3)))


def test_what_the_key_tells_apart(discoveries):
    late, early = autocut.create_body(Flagged(True), input_size=SIZE), autocut.create_body(Flagged(False), input_size=SIZE)
    assert (late.cut.where, early.cut.where) == ("conv2", "conv1")  # a plain attribute
    autocut.create_body(Flagged(True), input_size=(3, 24, 24))  # the input size
    wide = FunctionalPoolNet()
    wide.stage[0], wide.stage[1], wide.fc = nn.Conv2d(8, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.Linear(24, 10)
    assert autocut.create_body(FunctionalPoolNet(), input_size=SIZE).cut.nf == 16
    assert autocut.create_body(wide, input_size=SIZE).cut.nf == 24  # a parameter's shape
    assert len(discoveries) == 5
    key = memo.architecture_key
    assert key(TrainBranchNet().train(), SIZE) != key(TrainBranchNet().eval(), SIZE)  # the training flags
    assert key(TrainBranchNet(), SIZE) == key(TrainBranchNet(), SIZE) != key(TrainBranchNet(), (3, 8, 8))
    assert key(FunctionalPoolNet(), SIZE) != key(FunctionalPoolNet().double(), SIZE)  # dtypes
    assert key(FunctionalPoolNet(), SIZE) != key(FunctionalPoolNet().to("meta"), SIZE)  # devices


class Configured(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(3, 4, 3)


class Config:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_a_config_keys_by_its_fields_and_what_cannot_be_keyed_is_not_remembered(discoveries):
    key = memo.architecture_key
    assert key(Configured(Config(depth=2, act="gelu"))) == key(Configured(Config(depth=2, act="gelu")))
    assert key(Configured(Config(depth=2, act="gelu"))) != key(Configured(Config(depth=3, act="gelu")))
    held = FunctionalPoolNet()
    object.__setattr__(held, "twin", FunctionalPoolNet())  # a module held by reference, not a child
    array = FunctionalPoolNet()
    array.table = np.arange(3)
    method = FunctionalPoolNet()
    method.act = method.forward
    hooked = FunctionalPoolNet()
    hooked.stem[0].register_forward_hook(lambda m, a, o: None)
    for model in (held, array, method, hooked):
        assert key(model, SIZE) is None
        autocut.create_body(model, input_size=SIZE)
        autocut.create_body(model, input_size=SIZE)
    assert len(discoveries) == 8  # none remembered: each call discovers
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert key(FunctionalPoolNet(), SIZE) is None  # a global hook
    finally:
        handle.remove()
    assert key(FunctionalPoolNet(), SIZE) is not None


def test_hooks_fire_on_every_call_as_before():
    model = FunctionalPoolNet()
    calls = []
    model.stem[0].register_forward_hook(lambda m, a, o: calls.append(o.shape))
    autocut.create_body(model, input_size=SIZE)
    once = len(calls)
    autocut.create_body(model, input_size=SIZE)
    assert once > 0 and len(calls) == 2 * once


class TrainOnlyFails(TrainBranchNet):
    """States a 64 px size its position embedding does not fit (discovery warns), and fx cannot
    trace its train forward (building the body warns)."""

    pretrained_cfg = {"input_size": (3, 64, 64)}

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 4, 8, 8))

    def forward(self, x):
        x = self.conv(x) + self.pos
        if self.training and x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_the_warnings_of_the_first_call_are_given_again_on_each_later_one(discoveries):
    for _ in range(2):
        with pytest.warns(UserWarning) as given:
            body = autocut.create_body(TrainOnlyFails(), input_size=(3, 8, 8))
        assert body.train_graph is body.eval_graph
        assert [str(w.message).split(" (")[0] for w in given] == [
            "TrainOnlyFails could not be traced at its own input size", "TrainOnlyFails could not be traced in train mode"]
    assert len(discoveries) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the filters in force apply to a replay
        with pytest.raises(UserWarning, match="could not be traced at its own input size"):
            autocut.create_body(TrainOnlyFails(), input_size=(3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("error", message=".*own input size")
        with pytest.raises(UserWarning, match="own input size"):  # given again, not only the body's own
            autocut.create_body(TrainOnlyFails(), input_size=(3, 8, 8))


def test_a_failed_cut_is_not_remembered(discoveries):
    from handmade import MLP

    for _ in range(2):
        with pytest.raises(autocut.CutError):
            autocut.create_body(MLP(), input_size=(3, 8, 8))
    assert len(discoveries) == 2


def test_the_least_recently_used_recipe_goes_first_and_clear_cache_forgets_all(monkeypatch, discoveries):
    monkeypatch.setattr(memo, "MAX_RECIPES", 2)
    for side in (8, 12, 8, 16, 12, 8):  # 16 pushes out 12, not 8 (used since); then 12 pushes out 8
        autocut.create_body(FunctionalPoolNet(), input_size=(3, side, side))
    assert [s[1] for s in discoveries] == [8, 12, 16, 12, 8]  # (first in, first out: 8, 12, 16, 8)
    autocut.clear_cache()
    autocut.create_body(FunctionalPoolNet(), input_size=(3, 8, 8))
    assert [s[1] for s in discoveries] == [8, 12, 16, 12, 8, 8]


def test_a_recipe_keeps_no_model_alive():
    model = FunctionalPoolNet()
    body = autocut.adapt(model, n_out=2, input_size=SIZE)
    gone = weakref.ref(model)
    del model, body
    gc.collect()
    assert gone() is None and len(memo._RECIPES) == 1


def test_a_build_on_the_cpu_is_on_the_cpu_whatever_the_default_device():
    from autocut import zoo

    spec = zoo.resolve("resnet18")
    with torch.device("meta"):
        model = zoo.build(spec, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    model = zoo.build(spec, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training


@pytest.fixture
def train_traces(monkeypatch):
    """Counts the train-mode traces bodies make."""
    body_module = importlib.import_module("autocut.body")
    made = []
    trace_graph = body_module.trace_graph

    def counted(model, training=False):
        made.append(training)
        return trace_graph(model, training)

    monkeypatch.setattr(body_module, "trace_graph", counted)
    return lambda: made.count(True)


@pytest.mark.parametrize("mode", ["eval", "train"])  # (made when first trained; made with the body)
@pytest.mark.parametrize("make, expected", [
    (TrainBranchNet, lambda m, x: m.conv(x) * 2),
    (ConstantsNet, lambda m, x: (m.conv(x) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)) * 2),
    (_TrainOnlyModule, lambda m, x: m.conv(m.noise(x)))])
def test_the_train_graph_one_body_traced_serves_the_next_body_of_the_architecture(train_traces, mode, make, expected):
    x = torch.randn(2, 3, 8, 8)
    first = make()
    autocut.create_body(getattr(first, mode)(), input_size=(3, 8, 8)).train()(x)
    assert train_traces() == 1
    model = getattr(make(), mode)()
    body = autocut.create_body(model, input_size=(3, 8, 8))
    if mode == "eval":  # what only training reads comes in when first trained, as for a first body
        assert sorted(body.state_dict()) == ["conv.bias", "conv.weight"]
    out = body.train()(x)
    assert train_traces() == 1  # a copy of the first body's, not a second trace
    torch.testing.assert_close(out, expected(model, x), rtol=0, atol=0)
    cold = _cold(lambda: autocut.create_body(copy.deepcopy(model), input_size=(3, 8, 8)).train())
    assert sorted(body.state_dict()) == sorted(cold.state_dict())
    torch.testing.assert_close(out, cold(x), rtol=0, atol=0)
    torch.testing.assert_close(body.eval()(x), cold.eval()(x), rtol=0, atol=0)
    if make is _TrainOnlyModule:
        assert body.noise is model.noise  # the new model's own module


def test_a_body_made_from_a_recipe_runs_the_code_the_first_made_and_regenerates_it_when_edited():
    x = torch.randn(2, *SIZE)
    first = autocut.create_body(TrainBranchNet(), input_size=SIZE)
    before = first.train()(x)
    model = TrainBranchNet()
    body = autocut.create_body(model, input_size=SIZE)
    assert type(body).forward is type(first).forward and body.code == first.code  # the code, not generated again
    torch.testing.assert_close(body.train()(x), model.conv(x) * 2, rtol=0, atol=0)
    torch.testing.assert_close(body.eval()(x), model.conv(x), rtol=0, atol=0)
    body.train()
    output = next(n for n in body.graph.nodes if n.op == "output")
    with body.graph.inserting_before(output):  # the user's own edit of the active graph, then recompile()
        halved = body.graph.call_function(torch.mul, (output.args[0], 0.5))
    output.args = (halved,)
    body.recompile()
    torch.testing.assert_close(body(x), model.conv(x), rtol=0, atol=0)  # (x2, halved)
    assert type(body).forward is not type(first).forward and "mul" in body.code
    torch.testing.assert_close(first.train()(x), before, rtol=0, atol=0)  # the first body's code untouched


class _BuffersNet(nn.Module):
    """Buffers persistent and not, a tensor the forward makes (an fx constant), norm layers deep
    in the tree and a module the forward calls twice: what a body made from a recipe must have
    as a first body has it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0))
        self.register_buffer("shift", torch.full((1, 4, 1, 1), 0.5), persistent=False)
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x) * self.scale + self.shift + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
        x = self.blocks[1](self.blocks(x))
        return self.fc(x.mean((2, 3)))


def test_a_body_from_a_recipe_has_the_tree_buffers_persistence_calls_and_norms_of_a_first_body(discoveries):
    torch.manual_seed(0)
    autocut.create_body(_BuffersNet(), input_size=SIZE)
    model = _BuffersNet()
    remembered = autocut.create_body(model, input_size=SIZE)
    third = autocut.create_body(copy.deepcopy(model), input_size=SIZE)
    assert discoveries == [SIZE]
    cold = _cold(lambda: autocut.create_body(copy.deepcopy(model), input_size=SIZE))

    def tree(body):
        return [(path, type(m).__name__, sorted(m._parameters), sorted(m._buffers), sorted(m._non_persistent_buffers_set))
                for path, m in body.named_modules()]

    assert tree(remembered) == tree(cold)
    assert list(remembered.state_dict()) == list(cold.state_dict())
    assert sorted(remembered.state_dict()) == [
        "blocks.0.0.bias", "blocks.0.0.weight", "blocks.0.1.bias", "blocks.0.1.weight", "scale", "stem.0.bias",
        "stem.0.weight", "stem.1.bias", "stem.1.num_batches_tracked", "stem.1.running_mean", "stem.1.running_var",
        "stem.1.weight"]  # the shift buffer and fx's constant not among them, as the model has neither
    assert remembered.get_buffer("shift") is model.shift and remembered.get_buffer("scale") is model.scale
    constant = next(name for name, _ in remembered.named_buffers() if name.startswith("_tensor_constant"))
    assert remembered.get_buffer(constant) is not third.get_buffer(constant)  # each body its own copy
    torch.testing.assert_close(remembered.get_buffer(constant), cold.get_buffer(constant), rtol=0, atol=0)
    assert remembered.module_calls == cold.module_calls
    assert remembered.module_calls[1][-1][0] == "blocks.1"  # the ReLU's second call, last
    assert remembered.norm_parameter_names == cold.norm_parameter_names == {
        "stem.1.weight", "stem.1.bias", "blocks.0.1.weight", "blocks.0.1.bias"}
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(remembered.eval()(x), cold.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(remembered.train()(x), cold.train()(x), rtol=0, atol=0)


def test_a_first_body_kept_in_a_recipe_is_not_changed_by_what_a_user_does_to_their_body(discoveries):
    torch.manual_seed(0)
    model = _BuffersNet()
    first = autocut.create_body(model, input_size=SIZE)
    for node in [n for n in first.graph.nodes if n.op == "call_function" and "add" in str(n.target)]:
        node.replace_all_uses_with(node.args[0])
        first.graph.erase_node(node)
    first.recompile()
    second = autocut.create_body(copy.deepcopy(model), input_size=SIZE)
    assert discoveries == [SIZE]
    x = torch.randn(2, *SIZE)
    cold = _cold(lambda: autocut.create_body(copy.deepcopy(model), input_size=SIZE))
    torch.testing.assert_close(second.eval()(x), cold.eval()(x), rtol=0, atol=0)
    assert not torch.allclose(first.eval()(x), second(x))
    assert second.graph.python_code("self").src == cold.graph.python_code("self").src
    second.recompile()  # (its code made again from its own graph)
    torch.testing.assert_close(second(x), cold(x), rtol=0, atol=0)


def test_a_body_from_a_recipe_shares_its_graph_until_read_then_edits_its_own_copy(discoveries):
    torch.manual_seed(0)
    model = _BuffersNet().eval()
    autocut.create_body(model, input_size=SIZE)
    second = autocut.create_body(copy.deepcopy(model), input_size=SIZE)
    third = autocut.create_body(copy.deepcopy(model), input_size=SIZE)
    assert discoveries == [SIZE]
    kept = next(iter(memo._RECIPES.values())).body.eval_graph
    x = torch.randn(2, *SIZE)
    expected = third(x)
    second.train(), second.eval()  # runs and switches modes without a copy
    assert second.__dict__["_graph"] is kept and third.__dict__["_graph"] is kept and kept.owning_module is None
    graph = second.graph  # a read: the body's own copy from now on
    assert graph is not kept and graph is second.eval_graph is second.train_graph and graph.owning_module is second
    for node in [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    second.recompile()
    assert not torch.allclose(second(x), expected)  # its edit runs
    torch.testing.assert_close(third(x), expected, rtol=0, atol=0)  # the others' graph and code untouched
    assert third.graph.python_code("self").src == kept.python_code("self").src
    fourth = autocut.create_body(copy.deepcopy(model), input_size=SIZE)
    torch.testing.assert_close(fourth(x), expected, rtol=0, atol=0)
    clone = copy.deepcopy(autocut.create_body(copy.deepcopy(model), input_size=SIZE))
    assert clone.graph is not kept
    torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])  # (the train graph made when first trained; made with the body)
def test_a_body_from_a_recipe_shares_both_graphs_until_read_in_either_mode(mode, monkeypatch):
    x = torch.randn(2, *SIZE)
    autocut.create_body(getattr(TrainBranchNet(), mode)(), input_size=SIZE).train().eval()  # both graphs compiled
    note = next(iter(memo._RECIPES.values())).body
    kept_eval, kept_train = note.eval_graph, note.graph
    assert kept_train is not None and not note.same
    copies = []
    deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(type(obj)) or deepcopy(obj, *a))
    model = getattr(TrainBranchNet(), mode)()
    body = autocut.create_body(model, input_size=SIZE)
    torch.testing.assert_close(body.train()(x), model.conv(x) * 2, rtol=0, atol=0)
    assert body.__dict__["_graph"] is kept_train and type(body).forward is note.code["train"][0]
    torch.testing.assert_close(body.eval()(x), model.conv(x), rtol=0, atol=0)
    assert body.__dict__["_graph"] is kept_eval and type(body).forward is note.code["eval"][0]
    assert fx_graphs(copies) == 0 and kept_eval.owning_module is None and kept_train.owning_module is None
    train_graph = body.train_graph  # a read: copies of its own, both
    assert fx_graphs(copies) == 2 and train_graph is not kept_train and body.eval_graph is not kept_eval
    assert train_graph.owning_module is body and body.eval_graph.owning_module is body
    torch.testing.assert_close(body.train()(x), model.conv(x) * 2, rtol=0, atol=0)  # (the code compiled serves the copies)
    torch.testing.assert_close(body.eval()(x), model.conv(x), rtol=0, atol=0)
    assert fx_graphs(copies) == 2 and body.__dict__["_graph"] is body.eval_graph
    assert type(body).forward is note.code["eval"][0]  # not generated again for the copy


def fx_graphs(types):
    return sum(t is torch.fx.Graph for t in types)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_each_body_from_a_recipe_has_its_own_copy_of_the_train_graphs_constants(mode):
    x = torch.randn(2, *SIZE)
    autocut.create_body(getattr(ConstantsNet(), mode)(), input_size=SIZE).train()  # the recipe takes the train graph
    second = autocut.create_body(getattr(ConstantsNet(), mode)(), input_size=SIZE).train()
    third = autocut.create_body(getattr(ConstantsNet(), mode)(), input_size=SIZE).train()
    scale = next(name for name, b in second.named_buffers() if b.shape == (1,))  # the train graph's tensor([2.0])
    second.get_buffer(scale).mul_(0)  # a user's edit of their body's constant
    torch.testing.assert_close(third(x), (third.conv(x) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)) * 2,
                               rtol=0, atol=0)
