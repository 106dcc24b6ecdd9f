"""Optimiser param groups (``autocut.optim``): which layer group gets which learning rate
(fastai's slices, timm's layer decay), and which parameters get weight decay."""

import numpy as np
import pytest
import torch

import autocut


def test_param_groups_spread_lrs_and_skip_decay_on_norms_and_biases():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    groups = autocut.param_groups(model, slice(1e-5, 1e-3), weight_decay=0.05)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-5, 1e-4, 1e-3])
    for g in groups:
        for p in g["params"]:
            if p.ndim <= 1:
                assert g["weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.05 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    decayed = autocut.param_groups(model, 1e-3, layer_decay=0.5)
    assert sorted({g["lr"] for g in decayed}) == pytest.approx([2.5e-4, 5e-4, 1e-3])
    fastai_like = autocut.param_groups(model, slice(1e-3))
    assert sorted({g["lr"] for g in fastai_like}) == pytest.approx([1e-4, 1e-3])
    opt = torch.optim.AdamW(groups)
    model.eval()(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()


def _lr_of(param_groups):
    return {id(p): g["lr"] for g in param_groups for p in g["params"]}


def test_each_layer_group_gets_its_own_rate_early_body_lowest():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    early, late, head = autocut.layer_groups(model)
    body = model[0]
    assert id(body.conv1.weight) in map(id, early) and id(body.get_parameter("layer4.1.conv2.weight")) in map(id, late)
    cases = {
        "slice": (autocut.param_groups(model, slice(1e-5, 1e-3)), (1e-5, 1e-4, 1e-3)),
        "fastai slice(hi)": (autocut.param_groups(model, slice(1e-3)), (1e-4, 1e-4, 1e-3)),
        "layer_decay": (autocut.param_groups(model, 1e-3, layer_decay=0.5), (2.5e-4, 5e-4, 1e-3)),
        "float": (autocut.param_groups(model, 3e-4), (3e-4, 3e-4, 3e-4)),
    }
    for name, (groups, (lr_early, lr_late, lr_head)) in cases.items():
        lr = _lr_of(groups)
        assert [lr[id(p)] for p in early] == pytest.approx([lr_early] * len(early)), name
        assert [lr[id(p)] for p in late] == pytest.approx([lr_late] * len(late)), name
        assert [lr[id(p)] for p in head] == pytest.approx([lr_head] * len(head)), name
        assert [g["layer_group"] for g in groups] == sorted(g["layer_group"] for g in groups), name
    per_stage = autocut.param_groups(model, 1.0, layer_decay=0.5, n=None)  # 5 stages + head
    lr = _lr_of(per_stage)
    assert [lr[id(p[0])] for p in autocut.layer_groups(model, n=None)] == [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def test_weight_decay_spares_exactly_norms_and_biases():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64), first_bn=False)
    groups = autocut.param_groups(model, 1e-3, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()), "each parameter in exactly one group"
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        is_norm = ".bn" in name or "downsample.1" in name or (name.startswith("1.") and p.ndim == 1)
        expected = 0.0 if (is_norm or name.endswith(".bias")) else 0.05
        assert decay[id(p)] == expected, name


def test_param_groups_defaults_two_groups_and_refusals():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    assert {g["weight_decay"] for g in autocut.param_groups(model, 1e-3)} == {0.01, 0.0}
    two = autocut.param_groups(model, slice(1e-5, 1e-3), n=2)  # body, head
    assert [(g["layer_group"], g["lr"]) for g in two] == [(0, 1e-5), (0, 1e-5), (1, 1e-3), (1, 1e-3)]  # decay or not
    with pytest.raises(autocut.CutError, match=r"^lr=slice\(\.\.\.\) needs a stop: slice\(lo, hi\) or slice\(hi\)$"):
        autocut.param_groups(model, slice(1e-5, None))
    with pytest.raises(autocut.CutError, match=r"^give lr as a float with layer_decay \(the decay spreads it over the groups\)$"):
        autocut.param_groups(model, slice(1e-5, 1e-3), layer_decay=0.5)


def test_a_norm_with_a_matrix_of_weights_gets_no_decay_either():
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.LayerNorm((2, 2)), torch.nn.Flatten(),
                               torch.nn.Linear(2048, 2))
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64), custom_head=head, init=None)
    groups = autocut.param_groups(model, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert head[1].weight.ndim == 2 and decay[id(head[1].weight)] == 0.0 and decay[id(head[3].weight)] == 0.01



@pytest.fixture(scope="module")
def resnet():
    return autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))


_RATE = "must be a finite number > 0, got"


@pytest.mark.parametrize(("lr", "options", "message"), [
    (-1, {}, rf"^lr {_RATE} -1 \(int\): pass a learning rate such as 1e-3$"),
    (0.0, {}, rf"^lr {_RATE} 0\.0 \(float\)"),
    (float("nan"), {}, rf"^lr {_RATE} nan \(float\)"),
    (float("inf"), {}, rf"^lr {_RATE} inf \(float\)"),
    ("1e-3", {}, rf"^lr {_RATE} '1e-3' \(str\)"),
    (True, {}, rf"^lr {_RATE} True \(bool\)"),
    (slice(-1e-5, 1e-3), {}, rf"^the start of lr=slice\(\.\.\.\) {_RATE} -1e-05 \(float\)"),
    (slice(0, 1e-3), {}, rf"^the start of lr=slice\(\.\.\.\) {_RATE} 0 \(int\)"),
    (slice(1e-5, float("nan")), {}, rf"^the stop of lr=slice\(\.\.\.\) {_RATE} nan \(float\)"),
    (slice(-1e-3), {}, rf"^the stop of lr=slice\(\.\.\.\) {_RATE} -0\.001 \(float\)"),
    (slice(1e-3, 1e-5), {}, r"^lr=slice\(lo, hi\) gives lo to the first layer group and hi to the head, so lo <= hi; "
                            r"got slice\(0\.001, 1e-05\): pass slice\(1e-05, 0\.001\)$"),
    (slice(1e-5, 1e-3, 2), {}, r"^lr=slice\(lo, hi\) takes no step, got step=2: pass slice\(lo, hi\) or slice\(hi\)$"),
    (1e-3, {"layer_decay": -0.5},
     r"^layer_decay must be a number in \(0, 1\], got -0\.5 \(float\): pass a number such as 0\.75$"),
    (1e-3, {"layer_decay": 0}, r"^layer_decay must be a number in \(0, 1\], got 0 \(int\)"),
    (1e-3, {"layer_decay": 1.5}, r"^layer_decay must be a number in \(0, 1\], got 1\.5 \(float\)"),
    (1e-3, {"layer_decay": float("nan")}, r"^layer_decay must be a number in \(0, 1\], got nan \(float\)"),
    (float("nan"), {"layer_decay": 0.5}, rf"^lr {_RATE} nan \(float\)"),
    (1e-3, {"weight_decay": -0.01},
     r"^weight_decay must be a number in \[0, inf\), got -0\.01 \(float\): pass a number such as 0\.01$"),
    (1e-3, {"weight_decay": float("inf")}, r"^weight_decay must be a number in \[0, inf\), got inf \(float\)"),
])
def test_rates_that_would_not_train_are_refused_naming_the_argument(resnet, lr, options, message):
    with pytest.raises(autocut.CutError, match=message):
        autocut.param_groups(resnet, lr, **options)


def test_rates_at_the_edges_and_of_any_real_type_are_exact_floats(resnet):
    def lrs(*args, **kwargs):
        return [g["lr"] for g in autocut.param_groups(resnet, *args, **kwargs) if g["weight_decay"] == 0.0]

    assert lrs(slice(1e-3, 1e-3)) == [1e-3, 1e-3, 1e-3]
    assert lrs(1e-3, layer_decay=1) == [1e-3, 1e-3, 1e-3]
    assert lrs(np.float64(1e-3)) == lrs(1e-3) == [1e-3, 1e-3, 1e-3]
    assert lrs(slice(np.float64(1e-5), np.float64(1e-3))) == lrs(slice(1e-5, 1e-3)) == [1e-5, 1e-5 * 100 ** 0.5, 1e-3]
    assert all(type(x) is float for x in lrs(1) + lrs(slice(np.float32(1e-4), 1)))
    assert {g["weight_decay"] for g in autocut.param_groups(resnet, 1e-3, weight_decay=0)} == {0.0}
