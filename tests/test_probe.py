"""The one-off forward (``autocut.probe``): meta tensors for meta models, fake tensors for real
weights, one small real forward only where the code reads values; modes and weights untouched."""

import collections
import dataclasses

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from autocut.probe import (
    PROBE_BATCH,
    leaf_at,
    meta_first,
    model_device,
    modes_kept,
    probe_forward,
    probe_input,
    set_mode,
    shape_of,
    shapes_inside,
    tensor_leaves,
    weights_on_meta,
)


class Recorder(nn.Module):
    """Records what its forward saw: the input's type, batch and device, and its own mode."""

    def __init__(self, reads_values: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.reads_values = reads_values
        self.seen = []

    def forward(self, x):
        self.seen.append((type(x).__name__, x.shape[0], x.device.type, self.training, torch.is_grad_enabled()))
        y = self.bn(self.conv(x))
        if self.reads_values and y.sum().item() > 1e30:  # .item(): fake tensors cannot answer
            return y * 2
        return y


def test_shape_of_nests_like_the_value():
    t = torch.zeros(2, 3)
    assert shape_of(t) == (2, 3)
    assert shape_of((t, [t, 1])) == [(2, 3), [(2, 3), None]]
    assert shape_of(torch.Size([2, 3])) is None and shape_of("x") is None


def test_model_device_reads_parameters_then_buffers():
    assert model_device(nn.Linear(2, 2, device="meta")).type == "meta"
    bn = nn.BatchNorm1d(2, affine=False, device="meta")
    assert model_device(bn).type == "meta"
    assert model_device(nn.ReLU()).type == "cpu"


def test_probe_input_matches_the_device():
    with probe_input((2, 3), torch.device("meta")) as x:
        assert x.is_meta
    with probe_input((2, 3), torch.device("cpu")) as x:
        assert type(x).__name__ == "FakeTensor" and x.shape == (2, 3)
    with probe_input((2, 3), torch.device("cpu"), fake=False) as x:
        assert torch.equal(x, torch.zeros(2, 3))


def test_real_weights_run_on_meta_stand_ins_untouched_in_eval_mode():
    torch.manual_seed(0)
    model = Recorder().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = [p for p in model.parameters()]
    weights_seen = []
    model.conv.register_forward_pre_hook(lambda m, args: weights_seen.append(m.weight.device.type))
    assert probe_forward(model, (3, 8, 8)) == PROBE_BATCH
    assert model.seen == [("Tensor", PROBE_BATCH, "meta", False, False)] and weights_seen == ["meta"]
    assert model.training, "the model's own mode comes back"
    assert all(p is q for p, q in zip(model.parameters(), own))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics included: eval mode


class MixesDevices(Recorder):
    """Adds a CPU tensor it makes: meta tensors cannot run it, fake ones can."""

    def forward(self, x):
        return super().forward(x) + torch.ones(4, 1, 1)


def test_where_meta_tensors_fail_fake_ones_run_after_a_clear():
    model, cleared = MixesDevices(), []
    assert probe_forward(model, (3, 8, 8), before_real=lambda: cleared.append(len(model.seen))) == PROBE_BATCH
    assert [s[:3] for s in model.seen] == [("Tensor", PROBE_BATCH, "meta"), ("FakeTensor", PROBE_BATCH, "cpu")]
    assert cleared == [1]


class ReadsValuesUnlessTraced(Recorder):
    """Reads a mask's values unless it is a fake tensor (transformers' ``padding_mask.all()``
    check, skipped while torch.export traces): meta tensors cannot run it, fake ones can."""

    def forward(self, x):
        y = super().forward(x)
        mask = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        if not isinstance(mask, FakeTensor) and not mask.all():
            return y * 0
        return y


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_forward_that_reads_values_unless_traced_runs_on_fake_tensors_and_never_on_the_real_weights(device):
    model, cleared = ReadsValuesUnlessTraced().to(device), []
    with weights_on_meta(model), pytest.raises(RuntimeError, match="meta tensors"):
        model(torch.empty(2, 3, 8, 8, device="meta"))
    model.seen.clear()
    before = {k: v.clone() for k, v in model.state_dict().items()} if device == "cpu" else {}
    fake = ("FakeTensor", PROBE_BATCH, device)  # (a real model's weights as fake tensors of themselves)
    for probe in (lambda: probe_forward(model, (3, 8, 8), before_real=lambda: cleared.append(len(model.seen))),
                  lambda: meta_first(model, lambda: probe_forward(model, (3, 8, 8), fake=False),  # (as probe_modules)
                                     before_real=lambda: cleared.append(len(model.seen)))):
        model.seen.clear()
        cleared.clear()
        assert probe() == PROBE_BATCH
        assert [s[:3] for s in model.seen] == [("Tensor", PROBE_BATCH, "meta"), fake] and cleared == [1]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_where_fake_tensors_fail_too_the_real_weights_run_unless_told_not_to():
    model = Recorder(reads_values=True)  # (.item(): no fake tensor answers it)
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):  # the meta run's error
        meta_first(model, lambda: probe_forward(model, (3, 8, 8), fake=False), real=False)
    meta, fake = ("Tensor", PROBE_BATCH, "meta"), ("FakeTensor", PROBE_BATCH, "cpu")
    assert [s[:3] for s in model.seen] == [meta, fake]
    model.seen.clear()
    assert meta_first(model, lambda: probe_forward(model, (3, 8, 8), fake=False)) == PROBE_BATCH
    assert [s[:3] for s in model.seen] == [meta, fake, ("Tensor", PROBE_BATCH, "cpu")]


class Tied(nn.Module):
    """A parameter used twice (a tied embedding), a buffer, an empty bias slot, a frozen weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(3)
        self.frozen = nn.Linear(3, 2)
        self.frozen.weight.requires_grad_(False)


def test_weights_on_meta_stands_in_for_each_tensor_and_gives_the_models_own_back():
    model = Tied()
    own = {name: t for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
    values = {name: t.detach().clone() for name, t in own.items()}
    with weights_on_meta(model) as same:
        assert same is model
        inside = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers()])
        assert set(inside) == set(own)
        for name, t in inside.items():
            assert t.device.type == "meta"
            mine = own[name]
            assert (t.shape, t.stride(), t.dtype, type(t)) == (mine.shape, mine.stride(), mine.dtype, type(mine))
            assert t.requires_grad == own[name].requires_grad, name
        assert model.b.weight is model.a.weight  # still tied
        assert model.b.bias is None
        assert model.a(torch.empty(5, 4, device="meta")).shape == (5, 3)
        with pytest.raises(ValueError, match="inside"):
            with weights_on_meta(model):
                raise ValueError("inside")
        assert model.a.weight.device.type == "meta"  # the inner block gave back what it found
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        assert t is own[name] and torch.equal(t, values[name]), name
    with pytest.raises(RuntimeError, match="boom"):
        with weights_on_meta(model):
            raise RuntimeError("boom")
    assert all(t is own[name] for name, t in model.named_parameters(remove_duplicate=False))


def test_meta_models_run_on_meta_tensors():
    model = Recorder().to("meta")
    assert probe_forward(model, (3, 8, 8), batch=3) == 3
    assert model.seen == [("Tensor", 3, "meta", False, False)]


def test_code_that_reads_values_gets_one_small_real_forward():
    model = Recorder(reads_values=True)
    cleared = []
    assert probe_forward(model, (3, 8, 8), before_real=lambda: cleared.append(len(model.seen))) == 1
    assert cleared == [1, 2]
    assert [s[:3] for s in model.seen] == [("Tensor", PROBE_BATCH, "meta"), ("FakeTensor", PROBE_BATCH, "cpu"),
                                           ("Tensor", 1, "cpu")]
    with pytest.raises(RuntimeError):
        probe_forward(Recorder(reads_values=True), (3, 8, 8), real_batch=None)
    meta, cleared = Recorder(reads_values=True).to("meta"), []
    with pytest.raises(RuntimeError):  # meta and fake tensors have no values either, and no real copy here
        probe_forward(meta, (3, 8, 8), before_real=lambda: cleared.append(True))
    assert cleared == [True] and [s[:3] for s in meta.seen] == [("Tensor", PROBE_BATCH, "meta"),
                                                                ("FakeTensor", PROBE_BATCH, "meta")]


def test_fake_false_runs_real_zeros_of_the_probe_batch():
    model = Recorder()
    assert probe_forward(model, (3, 8, 8), fake=False) == PROBE_BATCH
    assert model.seen == [("Tensor", PROBE_BATCH, "cpu", False, False)]


def test_a_stop_signal_and_other_errors_propagate_and_the_mode_comes_back():
    class Stop(BaseException):
        pass

    model = Recorder().train()
    model.conv.register_forward_hook(lambda *args: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        probe_forward(model, (3, 8, 8))
    assert model.training and len(model.seen) == 1  # no real retry for a stop signal

    class Refuses(Recorder):
        def forward(self, x):
            super().forward(x)
            raise TypeError("not this input")

    refuses = Refuses()
    with pytest.raises(TypeError, match="not this input"):  # not a RuntimeError of fake tensors: no real retry
        probe_forward(refuses, (3, 8, 8))
    assert [s[2] for s in refuses.seen] == ["meta", "cpu"]  # (meta, then fake tensors)


def test_meta_first_runs_on_meta_stand_ins_then_on_the_real_weights_after_a_clear():
    model, cleared = Recorder(), []
    assert meta_first(model, lambda: model.conv.weight.device.type) == "meta"
    assert model.conv.weight.device.type == "cpu"

    def run():
        model.seen.append(model.conv.weight.device.type)
        if model.conv.weight.is_meta:
            raise NotImplementedError("no meta kernel")
        return "real"

    assert meta_first(model, run, before_real=lambda: cleared.append(list(model.seen))) == "real"
    assert model.seen == ["meta", "cpu"] and cleared == [["meta"]]  # (fake tensors of the real weights: no meta kernel missing)
    tries = []

    def fails():
        tries.append(1)
        raise NotImplementedError("no meta kernel")

    with pytest.raises(NotImplementedError):
        meta_first(Recorder().to("meta"), fails)
    assert tries == [1, 1]  # a meta model runs on meta, then fake tensors: it has no real weights to try next


# --- structured outputs --------------------------------------------------------------------


@dataclasses.dataclass
class Features:
    maps: tuple
    pooled: torch.Tensor | None = None


Pair = collections.namedtuple("Pair", "logits features")


def test_tensor_leaves_look_inside_every_kind_of_structure_with_their_keys():
    a, b, c, d, e = (torch.zeros(i + 1) for i in range(5))
    value = {"x": a, "seq": [b, (c, None)], "data": Features(maps=(d,)), "pair": Pair(e, 3), "n": "text"}
    leaves = tensor_leaves(value)
    assert [k for k, _ in leaves] == ["x", "seq.0", "seq.1.0", "data.maps.0", "pair.logits"]
    assert all(t is want for (_, t), want in zip(leaves, (a, b, c, d, e)))
    assert tensor_leaves(a) == [("", a)] and tensor_leaves(None) == [] and tensor_leaves(3) == []


def test_a_transformers_model_output_is_read_by_its_keys():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    h, hidden = torch.zeros(2, 4, 3, 3), (torch.zeros(2, 4, 6, 6), torch.zeros(2, 4, 3, 3))
    out = outputs.BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=h, hidden_states=hidden)
    assert shapes_inside(out) == {"last_hidden_state": (2, 4, 3, 3), "hidden_states.0": (2, 4, 6, 6),
                                  "hidden_states.1": (2, 4, 3, 3)}
    assert leaf_at(out, "last_hidden_state") is h and leaf_at(out, "hidden_states.0") is hidden[0]


def test_shapes_inside_and_leaf_at():
    t = torch.zeros(2, 3)
    assert shapes_inside(t) == (2, 3) and shapes_inside({"a": None}) is None
    assert shapes_inside(Features(maps=(t,), pooled=t[:, 0])) == {"maps.0": (2, 3), "pooled": (2,)}
    assert leaf_at(t, "") is t
    with pytest.raises(KeyError, match=r"no tensor 'b' in the dict returned \(it holds \['a'\]\)"):
        leaf_at({"a": t}, "b")


class _FlagProperty(nn.Module):
    """Keeps its mode under another name (a ``training`` property): only ``train()`` sets it."""

    training = property(lambda self: self.__dict__.get("_mode", True), lambda self, v: self.__dict__.update(_mode=v))

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)


class _CountsSetattr(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.__dict__["sets"] = 0  # (not counting the constructor's)

    def __setattr__(self, name, value):
        self.__dict__["sets"] = self.__dict__.get("sets", 0) + (name == "training")
        super().__setattr__(name, value)


def test_set_mode_and_modes_kept_leave_a_flag_of_its_own_to_train():
    model = nn.Sequential(_FlagProperty(), _CountsSetattr(), nn.BatchNorm2d(4))
    set_mode(model, False)
    assert [m.training for m in model.modules()] == [False] * 6 and model[1].sets == 1
    with modes_kept(model):
        set_mode(model, True)
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [False] * 6 and model[1].sets == 3
