"""Layer groups, freezing, param groups and input channels, against fastai's hand-written
splitters, timm's group_matcher, and the models' own outputs."""


import pytest
import timm
import torch
import torchvision
from hypothesis import given
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

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


@pytest.mark.zoo
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


@pytest.mark.zoo
@pytest.mark.parametrize(
    "name", ["torchvision:densenet121", "convnext_atto", "swin_tiny_patch4_window7_224", "hrnet_w18_small"]
)
def test_groups_read_from_the_trace_equal_groups_from_a_hooked_forward(name):
    spec = zoo.resolve(name)
    meta = zoo.build(spec, device="meta")
    model = autocut.adapt(meta, n_out=3, input_size=tuple(zoo.default_input_size(spec, meta)))
    assert model[0].module_calls, "a discovered body carries its module calls"
    from_trace = [_ids(g) for g in autocut.layer_groups(model, n=None)]
    del model[0].module_calls, model._autocut_units  # now one forward with hooks on every module
    assert [_ids(g) for g in autocut.layer_groups(model, n=None)] == from_trace


# (not hrnet: its stages return one map per branch, and a hook reads the first, the finest)
@pytest.mark.zoo
@pytest.mark.parametrize(
    "name", ["torchvision:densenet121", "convnext_atto", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]
)
def test_groups_read_from_the_trace_equal_groups_from_a_hooked_forward_of_the_model(name):
    from autocut.probe import probe_forward, shape_of

    spec = zoo.resolve(name)
    meta = zoo.build(spec, device="meta")
    size = tuple(zoo.default_input_size(spec, meta))
    model = autocut.adapt(meta, n_out=3, input_size=size)
    assert model[0].module_calls, "a discovered body carries its module calls"
    from_trace = [_ids(g) for g in autocut.layer_groups(model, n=None)]
    # the oracle: every module of the original model, traced through or not, reports its own call
    calls = []
    for path, module in meta.named_modules():
        if path:
            module.register_forward_hook(lambda m, args, out, path=path: calls.append((path, shape_of(out))))
    probe_forward(meta, size)
    model[0].module_calls = (size[1:], tuple(calls))
    del model._autocut_units
    assert [_ids(g) for g in autocut.layer_groups(model, n=None)] == from_trace


def test_a_module_fx_traced_through_runs_where_it_runs():
    # timm's LayerNorm runs as F.layer_norm in the graph, no call of its own: a ViT's final norm
    # still runs after the last block, so it goes with the late body (timm's group_matcher: last)
    model = autocut.adapt("vit_tiny_patch16_224", n_out=2)
    early, late, _ = autocut.layer_groups(model)
    norm = [id(model[0].norm.weight), id(model[0].norm.bias)]
    assert [id(p) for p in late][-2:] == norm and not set(norm) & set(map(id, early))
    assert model.cut.groups[1][:2] == ("blocks.6", "norm")


@pytest.mark.zoo
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


def test_layer_groups_are_read_once_per_model_and_asked_again_run_no_forward():
    from handmade import FunctionalPoolNet

    # at 32 px, under its own 224, the groups are read by one forward at 224 px (not on the trace)
    model = autocut.adapt(FunctionalPoolNet(), n_out=2, input_size=(3, 32, 32))
    assert model.cut.stride_size == (224, 224)
    runs = []
    model[0].get_submodule("stem.0").register_forward_pre_hook(lambda m, args: runs.append(tuple(args[0].shape)))
    asked = [[_ids(g) for g in autocut.layer_groups(model, n=n)] for n in (3, None, 3)]
    assert runs == [] and asked[0] == asked[2]  # adapt read them; asking again (as freeze_to does) reuses them
    del model._autocut_units  # the oracle: reading them afresh runs the body once, at 224 px
    assert [_ids(g) for g in autocut.layer_groups(model)] == asked[0] and len(runs) == 1 and runs[0][2:] == (224, 224)


def test_n_merges_stages_evenly_and_refuses_too_many():
    model = autocut.adapt("resnet18", n_out=2, input_size=(3, 64, 64))
    stages = autocut.layer_groups(model, n=None)
    assert len(stages) == 6  # stem, layer1..4, head
    merged = autocut.layer_groups(model, n=3 + 0)
    assert len(merged) == 3
    three_body = autocut.layer_groups(model, n=4)
    expected = [sum(len(s) for s in stages[0:2]), sum(len(s) for s in stages[2:4]), len(stages[4])]
    assert [len(g) for g in three_body[:-1]] == expected
    with pytest.raises(autocut.CutError, match="at most 6"):
        autocut.layer_groups(model, n=7)
    with pytest.raises(autocut.CutError, match="made by autocut.adapt"):
        autocut.layer_groups(torchvision.models.resnet18())


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


def test_a_vit_splits_between_its_blocks_whatever_runs_around_them():
    # CLIP's ViT has a norm before its blocks too: four units, but `blocks` holds nearly all the
    # parameters, so the halves are found between blocks, not between `blocks` and the final norm
    for name in ("vit_base_patch16_clip_224", "vit_tiny_patch16_224"):
        meta = zoo.build(zoo.resolve(name))
        model = autocut.adapt(meta, n_out=2)
        assert [g[:2] for g in model.cut.groups] == [("(embeddings)", "blocks.5"), ("blocks.6", "norm"), ("head", "head")]
        early, late = (sum(p.numel() for p in g) for g in autocut.layer_groups(model)[:2])
        assert abs(early - late) < 0.05 * (early + late), name


class Ladder(nn.Module):
    """A stem at stride 2, then stages that halve the map, a parameter-free pool between two of
    them, and a stage whose first conv runs before its downsampling: strides known by construction."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 8, 1, 1))  # loose: no module call owns it
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.s1 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.s2 = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 2, 1))  # 8 -> 16 inside
        self.s3 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 32, 3, 1, 1))
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        x = self.stem(x) + self.cls
        x = self.s3(self.s2(self.pool(self.s1(x))))
        return self.fc(x.mean((2, 3)))


def test_groups_follow_the_strides_modules_run_at():
    model = autocut.adapt(Ladder(), n_out=3, input_size=(3, 64, 64))
    body = model[0]
    summary = autocut.group_summary(model, n=None)
    assert [(g["first"], g["last"], g["stride"]) for g in summary] == [
        ("(embeddings)", "stem", 2.0), ("s1", "s1", 4.0), ("s2.0", "s2.0", 8.0), ("s2.1", "s2.1", 16.0),
        ("s3", "s3", 32.0), ("head", "head", None)]
    assert [g["params"] for g in summary[:-1]] == [8 + 224, 584, 1168, 2320, 4640 + 9248]
    early, late, head = autocut.layer_groups(model)  # late from the first module at stride 16
    assert [id(p) for p in early] == [id(p) for p in (body.cls, body.stem.weight, body.stem.bias,
                                                      *body.s1.parameters(), *body.get_submodule("s2.0").parameters())]
    assert [id(p) for p in late] == [id(p) for p in (*body.get_submodule("s2.1").parameters(), *body.s3.parameters())]
    assert [g["first"] for g in autocut.group_summary(model, n=3)] == ["(embeddings)", "s2.1", "head"]
    # n merges the stages evenly into n - 1 body groups
    assert [(g["first"], g["last"]) for g in autocut.group_summary(model, n=3 + 1)] == [
        ("(embeddings)", "s1"), ("s2.0", "s2.1"), ("s3", "s3"), ("head", "head")]
    assert [(g["first"], g["last"]) for g in autocut.group_summary(model, n=2)] == [("(embeddings)", "s3"), ("head", "head")]
    with pytest.raises(autocut.CutError, match="n must be None or an int >= 2"):
        autocut.layer_groups(model, n=1)


class Tower(nn.Module):
    """One stride throughout: a patch embedding, then containers of blocks, one holding its own
    parameter (a position embedding) and one with exactly two blocks: split into blocks for halves."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.stack = nn.Sequential(*[nn.Conv2d(8, 8, 3, 1, 1) for _ in range(2)])
        self.stack.pos = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.patch(x)
        x = self.stack(x + self.stack.pos)
        return self.fc(self.tail(x).mean((2, 3)))


def test_a_model_at_one_stride_splits_its_containers_into_blocks():
    model = autocut.adapt(Tower(), n_out=2, input_size=(3, 32, 32))
    body = model[0]
    early, late, _ = autocut.layer_groups(model)
    # units after splitting: patch (392), stack.0 (+ pos: 592), stack.1 (584), tail.0 (72), tail.1 (72)
    assert [id(p) for p in early] == [id(p) for p in (*body.patch.parameters(), body.stack.pos,
                                                      *body.get_submodule("stack.0").parameters())]
    assert [id(p) for p in late] == [id(p) for p in (*body.get_submodule("stack.1").parameters(), *body.tail.parameters())]
    assert [g[:2] for g in model.cut.groups] == [("patch", "stack.0"), ("stack.1", "tail.1"), ("head", "head")]
    # the blocks a container was split into run at its stride
    assert [g["stride"] for g in autocut.group_summary(model)] == [4, 4, None]


class PairBody(nn.Module):
    """A body whose middle module returns a tuple (its map first), on a non-square input."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return y, y.mean((2, 3))

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.pair = self.Pair()
        self.stage = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        return self.stage(self.pair(self.stem(x))[0])


@pytest.mark.parametrize("size", [(3, 32, 64), (3, 64, 32)], ids=["wide", "tall"])
def test_units_run_at_the_stride_of_their_output_a_tuples_first_map_on_any_aspect(size):
    from autocut.groups import body_units

    units = body_units(PairBody(), size)
    assert [(u.path, u.stride) for u in units] == [("stem", 2), ("pair", 4), ("stage", 8)]


class VectorFirst(nn.Module):
    """Returns ``(pooled vector, map)``: its output's first value, the one read, is no map. With
    ``own`` its conv is a weight of its own (no inner module), else an inner ``nn.Conv2d``."""

    def __init__(self, cin: int, own: bool):
        super().__init__()
        if own:
            self.weight = nn.Parameter(torch.randn(8, cin, 3, 3))
        else:
            self.conv = nn.Conv2d(cin, 8, 3, 2, 1)

    def forward(self, x):
        y = torch.nn.functional.conv2d(x, self.weight, stride=2, padding=1) if hasattr(self, "weight") else self.conv(x)
        return y.mean((2, 3)), y


class VectorFirstBody(nn.Module):
    def __init__(self, first: bool):
        super().__init__()
        self.stem = VectorFirst(3, own=True) if first else nn.Conv2d(3, 8, 3, 2, 1)
        self.mid = nn.Conv2d(8, 8, 3, 2, 1) if first else VectorFirst(8, own=False)
        self.stage = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.mid(x[1] if isinstance(x, tuple) else x)
        return self.stage(x[1] if isinstance(x, tuple) else x)


@pytest.mark.parametrize("first, strides", [
    (False, [2, 4, 8]),  # mid returns no map: it runs at the stride of the map its inner conv makes
    (True, [4, 4, 8]),  # the first unit returns no map and holds no module that does: it runs with the first stage
])
def test_a_unit_whose_output_is_no_map_runs_at_the_stride_of_its_inner_map_or_with_the_first_stage(first, strides):
    from autocut.groups import body_units

    units = body_units(VectorFirstBody(first), (3, 32, 32))
    assert [(u.path, u.stride) for u in units] == list(zip(["stem", "mid", "stage"], strides))


@pytest.mark.parametrize("size, n_in, read_at", [((3, 16, 16), None, (224, 224)), ((3, 40, 40), None, (224, 224)),
                                                  ((3, 64, 320), 1, (224, 320))], ids=["16px", "40px", "wide-1ch"])
def test_groups_and_stride_at_a_small_size_are_read_at_the_models_own(size, n_in, read_at):
    # at 16 px a ResNet's map is 1x1 from layer3 on: the strides there say 16 where they are 32,
    # which once put layer4.0 in the early group (trained at lr/100 when fine-tuning at 16 px)
    original = torchvision.models.resnet34()
    model = autocut.adapt(original, n_out=3, input_size=size, n_in=n_in)
    assert model.cut.stride == 32 and model.cut.stride_size == read_at
    assert model.cut.feature_shape == (512, -(-size[1] // 32), -(-size[2] // 32))
    assert "stride 32, read at" in str(model.cut)
    at_own_size = autocut.adapt(torchvision.models.resnet34(), n_out=3, n_in=n_in)
    assert model.cut.groups == at_own_size.cut.groups
    if n_in is None:  # the stem rebuilt for n_in is not the original's
        theirs = _fastai_groups("resnet34", original, model[1])
        assert [_ids(g) for g in autocut.layer_groups(model)] == [_ids(g) for g in theirs]


class OneSize(nn.Module):
    """Runs only at 32 px: a learned map the size of its 8x8 stride-4 grid is added."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1)
        self.pos = nn.Parameter(torch.zeros(1, 16, 8, 8))
        self.last = nn.Conv2d(16, 32, 3, 2, 1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(self.last(self.mid(self.stem(x)) + self.pos).mean((2, 3)))


def test_a_model_that_runs_only_at_the_given_size_has_its_strides_read_there():
    model = autocut.adapt(OneSize(), n_out=2, input_size=(3, 32, 32))
    assert model.cut.stride == 8 and model.cut.stride_size is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


class ReadsValues(nn.Module):
    """``.item()`` in the forward: fake tensors cannot run it; records the sizes it ran on for real."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.real_sizes = []

    def forward(self, x):
        if not isinstance(x, FakeTensor) and x.device.type != "meta":
            self.real_sizes.append(tuple(x.shape[-2:]))
        y = self.conv(x)
        return y * float(y.mean().item() > -1e9)


def test_strides_are_never_read_by_a_real_forward_at_a_size_bigger_than_asked():
    # a smaller size may have been chosen to spare memory (the scan's reduced sizes)
    from autocut.groups import stride_size

    body = ReadsValues()
    assert stride_size(body, (3, 32, 32), (3, 224, 224)) is None and (224, 224) not in body.real_sizes
    assert stride_size(nn.Conv2d(3, 8, 3, 2, 1), (3, 32, 32), (3, 224, 224)) == ((224, 224), (112, 112))
    # at the model's own size, or bigger on both sides: strides are read at the input size itself (None)
    assert stride_size(nn.Conv2d(3, 8, 3, 2, 1), (3, 224, 224), (3, 224, 224)) is None
    assert stride_size(nn.Conv2d(3, 8, 3, 2, 1), (3, 224, 320), (3, 224, 224)) is None


@pytest.mark.parametrize("made_by", ["create_body", "the model itself"])
def test_units_are_in_the_order_they_run_the_loose_parameters_before_any_module_call(made_by):
    from autocut.groups import body_units

    # Ladder's class token is added to the stem's output: no module call owns it, and it goes first
    body = autocut.create_body(Ladder(), input_size=(3, 64, 64)) if made_by == "create_body" else Ladder()
    units = body_units(body, (3, 64, 64))
    paths = ["(embeddings)", "stem", "s1", "s2.0", "s2.1", "s3"] + (["fc"] if made_by == "the model itself" else [])
    assert [u.path for u in units] == paths
    assert [u.path for u in sorted(units, key=lambda u: u.order)] == paths  # each unit's order is where it runs
    assert units[0].order < min(u.order for u in units[1:])
