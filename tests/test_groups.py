"""Layer groups, freezing, param groups and input channels, against fastai's hand-written
splitters, timm's group_matcher, and the models' own outputs."""

import copy

import pytest
import timm
import torch
import torchvision
from hypothesis import given
from torch import nn

import autocut
from autocut import zoo
from zoo_strategies import model_and_size


def _ids(params):
    return [id(p) for p in params]


def _params(*modules):
    return [p for m in modules for p in m.parameters()]


# fastai's splitters, written out on the original torchvision model (the body shares its modules)
def _fastai_groups(name, original, head):
    if name == "resnet34":  # _resnet_split: L(m[0][:6], m[0][6:], m[1:])
        body = list(original.children())[:-2]
        return [_params(*body[:6]), _params(*body[6:]), _params(head)]
    # _densenet_split / _vgg_split / _alexnet_split: features[:k], features[k:]
    k = {"densenet121": 7, "vgg16": 22, "alexnet": 6}[name]
    kids = list(original.features.children())
    return [_params(*kids[:k]), _params(*kids[k:]), _params(head)]


@pytest.mark.parametrize("name", ["resnet34", "densenet121", "vgg16", "alexnet"])
def test_default_groups_match_fastais_splitters(name):
    original = torchvision.models.get_model(name)
    model = autocut.adapt(original, n_out=3, input_size=(3, 96, 96))
    ours = autocut.layer_groups(model)
    theirs = _fastai_groups(name, original, model[1])
    assert [_ids(g) for g in ours] == [_ids(g) for g in theirs]
    assert autocut.splitter(model) == ours


def test_squeezenet_differs_from_fastai_on_purpose():
    # fastai's _squeezenet_split cuts at features[5] (stride 4); autocut keeps its one rule and
    # starts the late body where the stride first reaches 16, like every other model.
    original = torchvision.models.squeezenet1_1()
    model = autocut.adapt(original, n_out=3, input_size=(3, 224, 224))
    early, late, head = autocut.layer_groups(model)
    features = original.features
    strides = {}
    x = torch.randn(1, 3, 224, 224)
    for i, layer in enumerate(features):
        x = layer(x)
        strides[i] = 224 / x.shape[-1]
    first_late = min(i for i, s in strides.items() if s >= 16 and any(True for _ in features[i].parameters()))
    assert _ids(late) == _ids(_params(*list(features)[first_late:]))
    assert _ids(early) == _ids(_params(*list(features)[:first_late]))
    assert first_late != 5


@pytest.mark.parametrize("name", ["resnet50", "convnext_atto", "efficientnet_b0", "swin_tiny_patch4_window7_224", "regnetx_002"])
def test_stage_boundaries_are_timm_group_matcher_boundaries(name):
    from timm.models._manipulate import group_parameters

    size = None if name.startswith("swin") else (3, 64, 64)
    model = autocut.adapt(name, n_out=3, input_size=size)
    original = timm.create_model(name)
    timm_groups = group_parameters(original, original.group_matcher(coarse=True))
    timm_starts = {names[0] for names in timm_groups.values()}
    name_of = {id(p): n for n, p in model[0].named_parameters()}
    stages = autocut.layer_groups(model, n=None)[:-1]
    assert len(stages) >= 3
    for stage in stages[1:]:
        assert name_of[id(stage[0])] in timm_starts, name_of[id(stage[0])]


@pytest.mark.parametrize("name", ["torchvision:densenet121", "convnext_atto", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "hrnet_w18_small"])
def test_groups_read_from_the_trace_equal_groups_from_a_hooked_forward(name):
    spec = zoo.resolve(name)
    meta = zoo.build(spec, device="meta")
    model = autocut.adapt(meta, n_out=3, input_size=tuple(zoo.default_input_size(spec, meta)))
    assert model[0].module_calls, "a discovered body carries its module calls"
    from_trace = [_ids(g) for g in autocut.layer_groups(model, n=None)]
    del model[0].module_calls, model._autocut_units  # now one forward with hooks on every module
    assert [_ids(g) for g in autocut.layer_groups(model, n=None)] == from_trace


@given(model_and_size())
def test_groups_partition_the_parameters_in_order(name_size):
    name, size = name_size
    model = autocut.adapt(zoo.build(zoo.resolve(name)), n_out=4, input_size=size)
    for n in (3, None, 2):
        groups = autocut.layer_groups(model, n=n)
        flat = [id(p) for g in groups for p in g]
        assert sorted(flat) == sorted(id(p) for p in model.parameters())
        assert len(flat) == len(set(flat))
        assert _ids(groups[-1]) == _ids(model[1].parameters())
        assert all(groups), "no empty group"
    summary = autocut.group_summary(model, n=None)
    strides = [g["stride"] for g in summary[:-1]]
    assert strides == sorted(strides), "stages run at growing strides"


def test_n_merges_stages_evenly_and_refuses_too_many():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    stages = autocut.layer_groups(model, n=None)
    assert len(stages) == 6  # stem, layer1..4, head
    merged = autocut.layer_groups(model, n=3 + 0)
    assert len(merged) == 3
    three_body = autocut.layer_groups(model, n=4)
    assert [len(g) for g in three_body[:-1]] == [sum(len(s) for s in stages[0:2]), sum(len(s) for s in stages[2:4]), len(stages[4])]
    with pytest.raises(autocut.CutError, match="at most 6"):
        autocut.layer_groups(model, n=7)
    with pytest.raises(autocut.CutError, match="made by autocut.adapt"):
        autocut.layer_groups(torchvision.models.resnet18())


def test_freeze_keeps_norms_trainable_and_unfreeze_restores():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    model.freeze()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("1.") or ".bn" in n or n.startswith("0.bn") or "downsample.1" in n for n in trainable)
    assert "0.conv1.weight" not in trainable and "0.layer4.1.conv2.weight" not in trainable
    assert "0.layer4.1.bn2.weight" in trainable and "1.4.weight" in trainable
    model.freeze_to(1)
    body = model[0]
    assert body.get_parameter("layer4.1.conv2.weight").requires_grad
    assert not body.get_parameter("layer1.0.conv1.weight").requires_grad
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    vit = autocut.adapt("vit_tiny_patch16_224", n_out=2).freeze()
    names = {n for n, p in vit.named_parameters() if p.requires_grad and n.startswith("0.")}
    assert names and all("norm" in n for n in names)  # LayerNorms of a graph body stay trainable


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


@pytest.mark.parametrize(
    "name,size",
    [("resnet18", (3, 64, 64)), ("densenet121", (3, 64, 64)), ("efficientnet_b0", (3, 64, 64)),
     ("convnext_atto", (3, 64, 64)), ("vit_tiny_patch16_224", (3, 224, 224)), ("swin_tiny_patch4_window7_224", (3, 224, 224))],
)
def test_zero_init_extra_channels_change_nothing(name, size):
    torch.manual_seed(0)
    original = timm.create_model(name).eval()
    reference = autocut.create_body(copy.deepcopy(original), input_size=size).eval()
    model = autocut.adapt(original, n_out=3, input_size=size, n_in=5, n_in_init="zero").eval()
    assert model.cut.input_size == (5, *size[1:])
    x = torch.randn(2, *size)
    x5 = torch.cat([x, torch.zeros(2, 2, *size[1:])], 1)
    with torch.no_grad():
        torch.testing.assert_close(model[0](x5), reference(x))
        assert model(x5).shape == (2, 3)


def test_repeat_sum_and_random_inits():
    torch.manual_seed(0)
    original = torchvision.models.resnet18().eval()
    w = original.conv1.weight.detach().clone()
    gray = autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=1)
    torch.testing.assert_close(gray.conv1.weight, w.sum(1, keepdim=True))
    four = autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=4)  # timm's default: repeat
    torch.testing.assert_close(four.conv1.weight[:, :3], w * 3 / 4)
    torch.testing.assert_close(four.conv1.weight[:, 3], w[:, 0] * 3 / 4)
    rnd = autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=2, n_in_init="random")
    assert rnd.conv1.weight.shape[1] == 2 and rnd(torch.randn(1, 2, 32, 32)).shape == (1, 512, 1, 1)
    with pytest.raises(autocut.CutError, match="use it with n_in=1"):
        autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=4, n_in_init="sum")
    with pytest.raises(autocut.CutError, match="n_in_init must be one of"):
        autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=4, n_in_init="mean")


class _ScaledInput(nn.Module):
    """Reads the image through a per-pixel parameter, never a Conv2d/Linear on its channels."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 3, 1, 1))
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = (x * self.scale).sum(1, keepdim=True)
        return self.fc(self.conv(x).mean((2, 3)))


def test_model_without_an_input_layer_refuses_n_in():
    with pytest.raises(autocut.CutError, match="no Conv2d or Linear reads"):
        autocut.adapt(_ScaledInput(), n_out=2, input_size=(3, 16, 16), n_in=4)


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
    decay = {id(p): g["weight_decay"] for g in autocut.param_groups(model, 1e-3, weight_decay=0.05) for p in g["params"]}
    for name, p in model.named_parameters():
        is_norm = ".bn" in name or "downsample.1" in name or (name.startswith("1.") and p.ndim == 1)
        expected = 0.0 if (is_norm or name.endswith(".bias")) else 0.05
        assert decay[id(p)] == expected, name


def test_loose_parameters_go_to_the_first_group():
    # a ViT's class token and position embedding belong to no module call: they run first, with
    # the patch embedding, so they are in the first group (timm's group_matcher puts them in stem)
    model = autocut.adapt("vit_tiny_patch16_224", n_out=2)
    body = model[0]
    for n in (3, None, 2):
        first = [id(p) for p in autocut.layer_groups(model, n=n)[0]]
        assert id(body.cls_token) in first and id(body.pos_embed) in first, n
        assert id(body.patch_embed.proj.weight) in first, n
    early, late, _ = autocut.layer_groups(model)
    assert [id(p) for p in early][:2] == [id(body.cls_token), id(body.pos_embed)]
