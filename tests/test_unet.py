"""autocut.unet against fastai's DynamicUnet (from a file fastai wrote), and on backbones of every
kind: outputs at the input's size, a training step that lowers the loss, layer groups, errors.

``tests/golden/fastai_unet.json`` (+ ``.safetensors``) holds what fastai 2.8's ``DynamicUnet``
built on small ``Sequential`` encoders for each of its options (``benchmarks/fastai_unet.py``
writes it): every tensor, statistics of their initial values, an input and fastai's output.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

import autocut
from autocut.unet import PixelShuffleICNR, SelfAttention, UnetBlock, icnr_init

ROOT = Path(__file__).resolve().parents[1]


def _load_recorder():
    spec = importlib.util.spec_from_file_location("fastai_unet_recorder", ROOT / "benchmarks" / "fastai_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rec = _load_recorder()
GOLDEN = json.loads(rec.GOLDEN.read_text())
TENSORS = load_file(str(rec.TENSORS))
CASES = {c["name"]: c for c in GOLDEN["cases"]}


def _autocut_unet(case, seed=0):
    torch.manual_seed(seed)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in case["options"].items()}
    return autocut.unet(rec.encoder(case["encoder"]), GOLDEN["n_out"], input_size=(3, GOLDEN["side"], GOLDEN["side"]),
                        **options)


def _fastai_state(case):
    prefix = f"{case['name']}/"
    return [(t["key"], TENSORS[prefix + t["key"]]) for t in case["tensors"]]


def test_the_file_is_fastais_over_its_options():
    assert GOLDEN["fastai"].startswith("2.8.") and len(CASES) == len(rec.CASES) == 9
    assert [c[0] for c in rec.CASES] == list(CASES)
    # fastai's own layer list: a final pixel shuffle only where the first level is not at the input's size
    assert "PixelShuffle_ICNR" in CASES["defaults"]["layers"] and "PixelShuffle_ICNR" not in CASES["full_resolution"]["layers"]
    assert "ResBlock" not in CASES["no_last_cross"]["layers"] and "SigmoidRange" in CASES["y_range"]["layers"]
    assert CASES["bottle"]["error"] and CASES["bottle"]["output_shape"] is None  # fastai's bottle=True fails


@pytest.mark.parametrize("name", list(CASES))
def test_same_tensors_in_the_same_order_as_fastai(name):
    case = CASES[name]
    ours = list(_autocut_unet(case).state_dict().items())
    theirs = [(k, tuple(t["shape"])) for k, t in zip((t["key"] for t in case["tensors"]), case["tensors"])]
    if name == "bottle":  # fastai's last conv takes the ResBlock's input channels; ours its output's
        assert tuple(ours[-2][1].shape) == (3, theirs[-2][1][1] // 2, 1, 1)
        ours, theirs = ours[:-2] + ours[-1:], theirs[:-2] + theirs[-1:]
    assert [tuple(v.shape) for _, v in ours] == [s for _, s in theirs], [(a, b) for (a, _), (b, _) in zip(ours, theirs)]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["error"] is None])
def test_fastais_weights_give_fastais_output(name):
    case = CASES[name]
    model = _autocut_unet(case)
    state = model.state_dict()
    assert len(state) == len(case["tensors"])
    model.load_state_dict({k: v for k, (_, v) in zip(state, _fastai_state(case))})
    model.eval()
    with torch.no_grad():
        out = model(TENSORS[f"{name}/:input"])
    torch.testing.assert_close(out, TENSORS[f"{name}/:output"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_initial_values_as_fastais(name):
    """Each decoder tensor starts as fastai's: the same constants (BatchNorm weight 1 or 0, bias
    1e-3, zeroed biases), the same spread elsewhere (kaiming-normal where fastai's apply_init
    reaches, ICNR, PyTorch's default for the last conv)."""
    case = CASES[name]
    ours = list(_autocut_unet(case, seed=1).state_dict().items())
    theirs = case["tensors"]
    if name == "bottle":
        ours, theirs = ours[:-2] + ours[-1:], theirs[:-2] + theirs[-1:]
    checked = 0
    for (key, value), stats in zip(ours, theirs):
        if key.startswith("body.") or "_u" in key.split(".")[-1] or "_v" in key.split(".")[-1]:
            continue  # the encoder is the test's; spectral norm's power-iteration vectors are random unit vectors
        value = value.double().flatten()
        constant = bool((value == value[0]).all())
        assert constant == stats["constant"], key
        if constant:
            assert value[0].item() == pytest.approx(stats["first"]), key
        elif value.numel() >= 200:
            assert value.std().item() == pytest.approx(stats["std"], rel=0.2), key
            checked += 1
    assert checked >= 8


def test_icnr_starts_as_nearest_upsampling():
    torch.manual_seed(0)
    shuffle = PixelShuffleICNR(6, 4, act_cls=None)
    x = torch.randn(2, 6, 5, 7)
    conv = nn.functional.conv2d(x, shuffle[0][0].weight, shuffle[0][0].bias)[:, ::4]  # one conv per output channel
    torch.testing.assert_close(shuffle(x), nn.functional.interpolate(conv, scale_factor=2, mode="nearest"))
    w = icnr_init(torch.empty(12, 3, 1, 1))
    assert all(torch.equal(w[i::4], w[0::4]) for i in range(4)) and not torch.equal(w[0::4][0], w[0::4][1])
    with pytest.raises(autocut.CutError, match="divisible by scale"):
        icnr_init(torch.empty(6, 3, 1, 1))


def test_self_attention_starts_as_the_identity_and_attends_once_gamma_moves():
    torch.manual_seed(0)
    sa = SelfAttention(16).eval()
    x = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(sa(x), x)
    with torch.no_grad():
        sa.gamma.fill_(0.5)
    flat = x.reshape(2, 16, -1)
    f, g, h = sa.query(flat), sa.key(flat), sa.value(flat)
    expected = 0.5 * h @ torch.softmax(f.transpose(1, 2) @ g, dim=1) + flat
    torch.testing.assert_close(sa(x), expected.reshape(x.shape))


def test_unet_block_resizes_the_upsampled_map_to_the_skip():
    block = UnetBlock(8, 4, final_div=False).eval()
    out = block(torch.randn(1, 8, 3, 3), torch.randn(1, 4, 7, 5))  # odd skip: 6x6 upsampled, resized to 7x5
    assert out.shape == (1, (8 // 2 + 4) // 2, 7, 5)


def _step_lowers_loss(model, x, y, steps=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(nn.functional.cross_entropy(model(x), y).item())
    return losses


class _Handmade(nn.Module):
    """A hand-written backbone no zoo knows: its own forward, a residual, a stride per stage."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Conv2d(8, 8, 3, 1, 1)
        self.down1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.relu(self.mid(x))
        x = self.down2(self.down1(x))
        return self.fc(x.mean((2, 3)))


def _hf_swin():
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                     window_size=2)
    return transformers.SwinForImageClassification(config)


BACKBONES = {
    "timm:resnet18": lambda: "resnet18",
    "timm:vit (one stride)": lambda: timm.create_model("vit_tiny_patch16_224", img_size=64),
    "timm:convnext (first level at 4)": lambda: "convnext_atto",
    "torchvision:mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "handmade": _Handmade,
    "transformers:swin (levels kept by hooks)": _hf_swin,
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_unet_on_any_backbone_outputs_the_input_size_and_learns(name):
    torch.manual_seed(0)
    size = 64
    model = autocut.unet(BACKBONES[name](), n_out=4, input_size=(3, size, size))
    x = torch.randn(2, 3, size, size)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    assert model(x).shape == (2, 4, size, size)
    if "vit" not in name and "swin" not in name:  # another size the backbone takes (a ViT's token grid is fixed)
        assert model(torch.randn(1, 3, size + 16, size - 16)).shape == (1, 4, size + 16, size - 16)
    losses = _step_lowers_loss(model, x, y)
    assert losses[-1] < losses[0], losses
    strides = [s if not isinstance(s, tuple) else s[0] for s in model.body.strides]
    assert strides == sorted(strides) and len(strides) >= 3
    # the decoder climbs from the shallowest level back to the input: one pixel shuffle per octave
    assert len(model.head.upsample) == round(math.log2(strides[0]))


def test_vit_levels_are_resampled_to_a_simple_pyramid():
    model = autocut.unet(timm.create_model("vit_tiny_patch16_224", img_size=64), n_out=3)
    assert model.body.strides == [4, 8, 16, 32] and model.body.resample is not None
    maps = model.body(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_the_pyramid_is_the_decoders_input_and_levels_match_create_pyramid():
    torch.manual_seed(0)
    model = autocut.unet("resnet18", n_out=2, input_size=(3, 64, 64)).eval()
    pyramid = autocut.create_pyramid("resnet18", input_size=(3, 64, 64))
    assert [lv.where for lv in model.levels] == [lv.where for lv in pyramid.levels]
    assert [b.bn.num_features for b in model.head.blocks] == [256, 128, 64, 64]  # skips, deep to shallow
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.body(x), x))


def test_layer_groups_early_body_late_body_decoder_and_freeze():
    model = autocut.unet("resnet18", n_out=3, input_size=(3, 64, 64))
    groups = autocut.layer_groups(model)
    body = {id(p) for p in model.body.parameters()}
    head = {id(p) for p in model.head.parameters()}
    assert [len(g) for g in groups][2] == len(head) and {id(p) for p in groups[2]} == head
    assert {id(p) for g in groups[:2] for p in g} == body
    names = {id(p): n for n, p in model.named_parameters()}
    assert names[id(groups[0][0])] == "body.body.conv1.weight" and names[id(groups[1][0])].startswith("body.body.layer3.")
    assert [g["first"] for g in autocut.group_summary(model)] == ["body.conv1", "body.layer3", "head"]
    assert model.cut.groups[-1][0] == "head" and model.cut.where == "layer4.1.act2"

    model.freeze()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {f"body.body.{n}" for n in model.body.body.norm_parameter_names}
    assert trainable == norms | {f"head.{n}" for n, _ in model.head.named_parameters()} and "body.body.bn1.weight" in norms
    assert "body.body.conv1.weight" not in trainable and "head.final.0.weight" in trainable
    model.freeze(train_bn=False)
    assert "body.body.bn1.weight" not in {n for n, p in model.named_parameters() if p.requires_grad}
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())

    pg = autocut.param_groups(model, slice(1e-5, 1e-3))
    lrs = {g["layer_group"]: g["lr"] for g in pg}
    assert lrs == pytest.approx({0: 1e-5, 1: 1e-4, 2: 1e-3})
    head_groups = [g for g in pg if g["layer_group"] == 2]
    assert {id(p) for g in head_groups for p in g["params"]} == head


def test_weights_load_into_the_body_and_n_in_after(tmp_path):
    torch.manual_seed(1)
    original = timm.create_model("resnet18", pretrained=False)
    torch.save(original.state_dict(), tmp_path / "r18.pth")
    model = autocut.unet("resnet18", n_out=2, input_size=(3, 64, 64), weights=tmp_path / "r18.pth", n_in=1)
    torch.testing.assert_close(model.body.body.get_submodule('layer3.0.conv1').weight, original.layer3[0].conv1.weight)
    torch.testing.assert_close(model.body.body.conv1.weight, original.conv1.weight.sum(1, keepdim=True))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    assert model.head.cross.convpath[0][0].in_channels == model.head.blocks[-1].out_channels + 1  # the grey image crosses
    bad = {k: v for k, v in original.state_dict().items() if not k.startswith("layer4.")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(autocut.CutError, match="missing"):
        autocut.unet("resnet18", n_out=2, input_size=(3, 64, 64), weights=tmp_path / "bad.pth")


def test_a_users_module_keeps_its_mode_and_hands_back_its_modules():
    backbone = _Handmade().eval()
    model = autocut.unet(backbone, n_out=2, input_size=(3, 32, 32))
    assert not model.training and not model.head.training
    assert model.body.body.get_submodule('stem.0') is backbone.stem[0]  # shared, as create_body's
    assert autocut.unet("resnet18", n_out=2, input_size=(3, 32, 32)).training


@pytest.mark.parametrize("kwargs, match", [
    ({"n_out": 0}, "n_out"),
    ({"n_out": 2, "norm_type": "group"}, "norm_type must be None"),
    ({"n_out": 2, "act_cls": nn.ReLU()}, "act_cls must be an nn.Module class"),
    ({"n_out": 2, "y_range": (1, 0)}, "y_range"),
    ({"n_out": 2, "init": "kaiming"}, "init"),
    ({"n_out": 2, "pretrained": True, "weights": "x.pth"}, "not both"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(autocut.CutError, match=match):
        autocut.unet("resnet18", input_size=(3, 32, 32), **kwargs)


def test_a_backbone_with_no_pyramid_says_why():
    with pytest.raises(autocut.CutError, match="crossvit|branch"):
        autocut.unet("crossvit_tiny_240", n_out=2)
