"""Models as users hand them in: on the meta device or in half precision, in eval mode, with
hooks, compiled, cut by hand, at the wrong size or channels, unknown by name, without a map,
returning a dataclass. Each is adapted correctly or refused with what to pass instead."""

import dataclasses
import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

import autocut

from handmade import FunctionalPoolNet

SIZE = (3, 32, 32)


def _x(b=2, c=3, dtype=torch.float32):
    return torch.randn(b, c, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


# --- where the head is built: the body's device and dtype ---------------------------------------


def test_a_meta_model_gets_a_meta_head():
    model = autocut.adapt(FunctionalPoolNet().to("meta"), n_out=3, input_size=SIZE)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model(torch.empty(2, *SIZE, device="meta")).shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_a_head_in_its_dtype(dtype):
    net = FunctionalPoolNet().to(dtype)
    model = autocut.adapt(net, n_out=3, input_size=SIZE)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.cut.feature_shape == (16, 8, 8) and model.cut.groups  # discovery and groups ran in the dtype
    if dtype == torch.bfloat16:  # CPU kernels for bfloat16 convs and norms
        out = model.eval()(_x(dtype=dtype))
        assert out.dtype == dtype and out.shape == (2, 3)
        torch.testing.assert_close(model[0](_x(dtype=dtype)), net.features(_x(dtype=dtype)))


def test_a_custom_head_moves_to_the_bodys_dtype():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    model = autocut.adapt(FunctionalPoolNet().to(torch.bfloat16), n_out=2, input_size=SIZE, custom_head=head)
    assert model[1] is head and head[2].weight.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_model_gets_a_cuda_head():
    model = autocut.adapt(FunctionalPoolNet().cuda(), n_out=3, input_size=SIZE)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model(_x().cuda()).shape == (2, 3)


# --- the user's training flags ------------------------------------------------------------------


def _flags(model):
    return [(name, m.training) for name, m in model.named_modules()]


def test_a_model_in_eval_mode_is_adapted_in_eval_mode_and_its_flags_stay():
    net = FunctionalPoolNet().eval()
    before = _flags(net)
    model = autocut.adapt(net, n_out=3, input_size=SIZE)
    assert _flags(net) == before and all(not t for _, t in before)
    assert not model.training and not model.head.training and not model.body.training
    body = autocut.create_body(net, cut=2, input_size=SIZE)  # a body of its children too
    assert _flags(net) == before and not body.training


def test_a_norm_frozen_in_eval_mode_inside_a_training_model_stays_frozen():
    net = FunctionalPoolNet().train()
    net.stem[1].eval()  # fastai's BnFreeze does this
    before = _flags(net)
    model = autocut.adapt(net, n_out=3, input_size=SIZE)
    assert _flags(net) == before and not net.stem[1].training
    assert model.training and model.head.training and model.body.training
    autocut.discover(net, input_size=SIZE)
    assert _flags(net) == before


def test_a_named_model_is_adapted_in_train_mode():
    model = autocut.adapt("resnet18", n_out=3, input_size=(3, 32, 32))
    assert all(m.training for m in model.modules())


# --- hooks and wrappers ---------------------------------------------------------------------------


def test_hooks_on_a_module_inside_the_model_fire_on_every_forward_of_the_adapted_model():
    net = FunctionalPoolNet()
    seen, before = [], []
    net.stage.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))  # not a leaf
    net.stem.register_forward_pre_hook(lambda m, args: before.append(tuple(args[0].shape)))
    model = autocut.adapt(net, n_out=3, input_size=SIZE).eval()
    seen.clear(), before.clear()  # discovery runs the model too
    for _ in range(3):
        model(_x())
    assert seen == [(2, 16, 8, 8)] * 3 and before == [(2, 3, 32, 32)] * 3
    torch.testing.assert_close(model[0](_x()), net.features(_x()))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_a_wrapped_model_is_adapted_as_the_module_it_wraps(wrap):
    net = FunctionalPoolNet().eval()
    model = autocut.adapt(wrap(net), n_out=3, input_size=SIZE)
    assert model.cut.arch == "FunctionalPoolNet" and model.cut.where == "relu"
    assert model[0].get_submodule("stem.0") is net.stem[0]  # the modules it wraps, shared
    torch.testing.assert_close(model[0](_x()), net.features(_x()))
    assert model(_x()).shape == (2, 3)
    assert autocut.discover(wrap(net), input_size=SIZE).arch == "FunctionalPoolNet"


# --- cuts given by hand ---------------------------------------------------------------------------


def _pooled_net():
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()),
        stage=nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(16, 10),
    ))


@pytest.mark.parametrize("cut, message", [
    (-1, "the body cut=-1 makes of Sequential (its first 4 children) returns shape (B, 16) for input (3, 32, 32), "
         "not the feature map the cut says: 16x8x8 at 'stage.1' (NCHW); it goes on after 'stage' (pooling or "
         "flattening): pass cut=-3 (the children up to 'stage') or cut=None to find the cut"),
    (3, "the body cut=3 makes of Sequential (its first 3 children) returns shape (B, 16, 1, 1) for input (3, 32, 32), "
        "not the feature map the cut says: 16x8x8 at 'stage.1' (NCHW); it goes on after 'stage' (pooling or "
        "flattening): pass cut=2 (the children up to 'stage') or cut=None to find the cut"),
    (lambda m: m, "the body the cut callable <lambda> makes of Sequential returns shape (B, 10) for input (3, 32, 32), "
                  "not the feature map the cut says: 16x8x8 at 'stage.1' (NCHW); it goes on after 'stage' (pooling or "
                  "flattening): end the body there, or pass cut=None to find the cut"),
], ids=["int-vector", "int-pooled", "callable"])
def test_a_hand_cut_body_that_pools_after_its_map_is_refused(cut, message):
    with pytest.raises(autocut.CutError) as err:
        autocut.adapt(_pooled_net(), n_out=3, input_size=SIZE, cut=cut)
    assert str(err.value) == message
    assert autocut.adapt(_pooled_net(), n_out=3, input_size=SIZE, cut=2)(_x()).shape == (2, 3)  # what it says works


def test_a_cut_record_of_another_size_is_refused():
    net = FunctionalPoolNet()
    cut = autocut.discover(net, input_size=(3, 64, 64))
    with pytest.raises(autocut.CutError) as err:
        autocut.create_body(net, cut=dataclasses.replace(cut, input_size=SIZE), input_size=SIZE)
    assert str(err.value) == (
        "the body cut at 'relu' returns shape (B, 16, 8, 8) for input (3, 32, 32), not the feature map the cut says: "
        "16x16x16 at 'relu' (NCHW); is the Cut of another model or input size? Pass cut='relu' (or cut=None) to read "
        "it again"
    )


# --- what a refusal says --------------------------------------------------------------------------


def test_one_channel_images_on_a_three_channel_model_are_told_to_pass_n_in():
    with pytest.raises(autocut.CutError) as err:
        autocut.adapt(FunctionalPoolNet(), n_out=3, input_size=(1, 32, 32))
    assert str(err.value) == (
        "FunctionalPoolNet reads 3-channel images, not 1 (input_size=(1, 32, 32)): pass n_in=1 (adapt, create_body) "
        "to rebuild its input layer for 1 channel, keeping its weights (see n_in_init), with input_size=(3, 32, 32): "
        "the channels the model itself reads"
    )
    model = autocut.adapt(FunctionalPoolNet(), n_out=3, input_size=SIZE, n_in=1)  # as the message says
    assert model.eval()(_x(c=1)).shape == (2, 3)


@pytest.mark.parametrize("cut", [None, "blocks"])
def test_a_vit_at_another_size_is_told_its_own_size(cut):
    with pytest.raises(autocut.CutError) as err:
        autocut.create_body("vit_tiny_patch16_224", cut=cut, input_size=(3, 64, 64))
    assert str(err.value) == (
        "vit_tiny_patch16_224 does not run at 64x64: it needs its own input size, (3, 224, 224), which its "
        "pretrained_cfg states. Pass input_size=(3, 224, 224) (and resize your images to 224x224), or build the model "
        "for 64x64 and pass the module (timm.create_model('vit_tiny_patch16_224', img_size=64))"
    )


def test_a_torchvision_vit_at_another_size_is_told_how_torchvision_builds_it():
    with pytest.raises(autocut.CutError, match=r"^torchvision:vit_b_16 does not run at 64x64: it needs its own input "
                                               r"size, \(3, 224, 224\), which its image_size states\. .* pass the "
                                               r"module \(torchvision\.models\.vit_b_16\(image_size=64\)\)$"):
        autocut.discover("torchvision:vit_b_16", input_size=(3, 64, 64))


@pytest.mark.parametrize("name, message", [
    ("resnet18x", "unknown model 'resnet18x'; close matches: resnet18, resnet18d"),
    ("RESNET18", "unknown model 'RESNET18'; close matches: resnet18, resnet18d"),
    ("resnet18.badtag", "unknown pretrained tag 'badtag' of timm's resnet18 in 'resnet18.badtag': close matches: "
                        "resnet18.tv_in1k, resnet18.a3_in1k, resnet18.a2_in1k, resnet18.a1_in1k; pass one of its 7 "
                        "tagged names (timm.list_pretrained('resnet18.*')) or 'resnet18' alone"),
])
def test_an_unknown_name_is_a_cut_error_and_a_value_error(name, message):
    with pytest.raises(ValueError) as err:  # callers that catch ValueError still do
        autocut.adapt(name, n_out=3)
    assert isinstance(err.value, autocut.CutError) and str(err.value).startswith(message)


def test_a_model_without_a_map_is_refused_without_torchs_log(capfd, caplog):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.ReLU(), nn.Linear(10, 2))
    with caplog.at_level(logging.DEBUG), pytest.raises(autocut.CutError, match=r"it has none \(an MLP\?\)"):
        autocut.adapt(mlp, n_out=3, input_size=(3, 8, 8))  # traced at 224 px too, where its Linear fails
    assert capfd.readouterr().err == ""
    assert not [r for r in caplog.records if r.name.startswith("torch")]
    assert logging.getLogger("torch._subclasses.fake_tensor").level == logging.NOTSET  # put back


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    note: str = "a dataclass"


class DataclassNet(FunctionalPoolNet):
    def forward(self, x):
        return Output(super().forward(x))


def test_a_model_returning_a_dataclass_is_read_as_a_structure():
    net = DataclassNet()
    model = autocut.adapt(net, n_out=3, input_size=SIZE)
    assert (model.cut.where, model.cut.method, model.cut.dropped) == ("relu", "fx", ("fc",))
    torch.testing.assert_close(model[0].eval()(_x()), net.eval().features(_x()))
