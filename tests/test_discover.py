"""Discovery (``autocut.discover``): the order of attempts and what each failure says, the input
size checked, and the cut located at the model's own size when the input is smaller."""

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import autocut
from autocut.discover import check_input_size, discover_module, discover_with_trace, discovery_target


def test_input_size_is_checked_before_anything_runs():
    assert check_input_size(None, [3, 224, 224]) == (3, 224, 224)
    assert check_input_size([1, 32, 48], None) == (1, 32, 48)
    for bad in [(224, 224), (3, 0, 32), (3, 32.0, 32), (True, 32, 32), "3x32x32"]:
        with pytest.raises(autocut.CutError, match="input_size must be \\(C, H, W\\) positive ints"):
            check_input_size(bad, None)


class ReadsValues(nn.Module):
    """``.item()`` in the forward: meta and fake tensors cannot run it; a real forward can."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stage(x)
        if x.mean().item() > 1e30:
            x = x * 2
        return self.fc(self.pool(x).flatten(1))


def test_a_meta_model_falls_back_to_its_real_copy_then_to_hooks():
    built = []

    def rebuild():
        built.append(ReadsValues())
        return built[-1]

    meta = ReadsValues().to("meta")
    cut, traced = discover_with_trace(meta, (3, 16, 16), arch="reads_values", rebuild=rebuild)
    assert len(built) == 1, "one real copy, for both the graph and the hooks attempts"
    assert (cut.method, cut.where, cut.arch, cut.nf) == ("hooks", "pool:input", "reads_values", 8)
    assert traced is None


def test_when_every_attempt_fails_the_error_lists_each():
    class Broken(ReadsValues):
        def forward(self, x):
            raise TypeError("this model cannot run")

    with pytest.raises(autocut.CutError) as err:
        discover_module(Broken().to("meta"), (3, 16, 16), rebuild=Broken)
    message = str(err.value)
    assert message.startswith("could not probe Broken at input size (3, 16, 16), the size given; it states no input "
                              "size (read: pretrained_cfg / default_cfg input_size; config.image_size (or a nested "
                              "vision_config's); an image_size / img_size attribute (the model's or a patch "
                              "embedding's); an input_size attribute in (C, H, W) or (H, W, C) order; a config the "
                              "model holds (a namespace, dataclass, namedtuple or dict attribute) with an image_size / "
                              "img_size / input_size / resolution / crop_size field; positional embedding length x "
                              "patch size) (fx: TypeError: this model cannot run; ")
    assert message.count("fx: TypeError") == 2 and message.count("hooks: TypeError: this model cannot run") == 2
    assert message.endswith("Check the input size (input_size=(C, H, W)) or pass cut= explicitly")


def test_a_named_cut_needs_a_graph():
    with pytest.raises(autocut.CutError, match=r"cannot cut ReadsValues at 'stage': it cannot be traced \(fx: "):
        discover_module(ReadsValues().to("meta"), (3, 16, 16), where="stage")


def test_the_trace_is_handed_on_only_when_it_is_of_the_module_given():
    model = torchvision.models.resnet18()
    cut, traced = discover_with_trace(model, (3, 64, 64))
    assert traced is not None and traced.model is model and cut.method == "fx"


def test_a_small_input_is_cut_where_the_model_is_cut_at_its_own_size():
    model = torchvision.models.resnet18()
    own = autocut.discover(model)
    small = autocut.discover(model, input_size=(3, 32, 32))  # layer4's map is 1x1 here
    assert own.where == small.where == "layer4.1.relu_1"
    assert small.feature_shape == (512, 1, 1) and small.stride == 32


class FixedGrid(nn.Module):
    """States a 64 px input size, but its position embedding only fits 8 px."""

    pretrained_cfg = {"input_size": (3, 64, 64)}

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 2, 2)
        self.pos = nn.Parameter(torch.zeros(1, 8, 4, 4))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc((self.proj(x) + self.pos).mean((2, 3)))


def test_a_model_that_fails_at_its_stated_size_is_cut_at_the_size_given_with_a_warning():
    with pytest.warns(UserWarning, match=r"FixedGrid could not be traced at its own input size \(3, 64, 64\)"):
        cut = autocut.discover(FixedGrid(), input_size=(3, 8, 8))
    assert (cut.where, cut.feature_shape) == ("add", (8, 4, 4))
    del FixedGrid.pretrained_cfg  # no stated size: 224 px is a guess, failing there is no news
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert autocut.discover(FixedGrid(), input_size=(3, 8, 8)).where == "add"
    finally:
        FixedGrid.pretrained_cfg = {"input_size": (3, 64, 64)}


def test_a_named_model_is_discovered_on_the_meta_device_and_only_there(monkeypatch):
    from autocut import zoo

    built = []
    build = zoo.build

    def recording(spec, device="meta", pretrained=False):
        built.append((str(spec), str(device)))
        return build(spec, device=device, pretrained=pretrained)

    monkeypatch.setattr(zoo, "build", recording)
    cut = autocut.discover("resnet18")
    assert built == [("resnet18", "meta")] and cut.method == "fx" and cut.where == "layer4.1.act2"
    built.clear()
    assert autocut.discover("torchvision:inception_v3").input_size == (3, 299, 299)  # the weights' crop size
    built.clear()
    cut = autocut.discover("efficientvit_b0")  # its forward needs values: one real CPU copy, for the trace
    assert built == [("efficientvit_b0", "meta"), ("efficientvit_b0", "cpu")] and cut.method == "fx"
    assert cut.nf == 128


def test_a_module_states_its_own_input_size():
    from autocut import zoo

    vit = zoo.build(zoo.resolve("vit_tiny_patch16_384"))  # a built module: its pretrained_cfg says 384
    cut = autocut.discover(vit)
    assert cut.input_size == (3, 384, 384) and cut.feature_shape == (192, 24, 24)



def test_a_named_model_is_probed_at_the_size_the_built_model_insists_on():
    # torchvision's vit_h_14 is built for 224 px; its default weights' transforms crop 518
    assert autocut.discover("torchvision:vit_h_14").input_size == (3, 224, 224)


def test_discover_takes_one_int_for_a_square_size_with_the_models_own_channels():
    cut = autocut.discover("resnet18", input_size=64)
    assert cut.input_size == (3, 64, 64) and cut.feature_shape == (512, 2, 2)


@pytest.mark.parametrize("name, side", [("resnet50", 16), ("convnext_atto", 32)])
def test_the_stride_at_a_small_size_is_timms_reduction_read_at_the_models_own_size(name, side):
    reduction = timm.create_model(name, pretrained=False).feature_info[-1]["reduction"]
    small = autocut.discover(name, input_size=(3, side, side))
    assert (small.stride, small.stride_size, small.grid) == (reduction, (224, 224), (1, 1))
    own = autocut.discover(name)
    assert (own.stride, own.stride_size) == (reduction, None)


@pytest.mark.parametrize("size", [(3, 200, 224), (3, 224, 200)])
def test_the_stride_of_an_input_smaller_on_one_side_is_read_at_the_models_own_size_on_that_side(size):
    # resnet18's 7x7 map at 200 px on one side would say 200 / 7 = 28.6 there; its reduction is 32
    reduction = timm.create_model("resnet18", pretrained=False).feature_info[-1]["reduction"]
    cut = autocut.discover("resnet18", input_size=size)
    assert (cut.stride, cut.stride_size, cut.grid) == (reduction, (224, 224), (7, 7))


class StatesItsSize(nn.Module):
    """States 16 px (an ``image_size`` attribute, as a ViT's does) and runs only there: its
    position embedding is a 4x4 grid. Not a timm or torchvision model."""

    image_size = 16

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 8, 4, 4))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc((self.proj(x) + self.pos).mean((2, 3)))


def test_a_model_of_no_known_zoo_at_another_size_is_told_its_own_size_and_no_zoos_way_to_build_it():
    with pytest.raises(autocut.CutError) as err:
        autocut.discover(StatesItsSize(), input_size=(3, 32, 32))
    assert str(err.value) == (
        "StatesItsSize does not run at 32x32: it needs its own input size, (3, 16, 16), which its image_size states. "
        "Pass input_size=(3, 16, 16) (and resize your images to 16x16), or build the model for 32x32 and pass the module"
    )


def test_a_model_at_another_size_and_channel_count_is_told_both():
    with pytest.raises(autocut.CutError) as err:
        autocut.discover(StatesItsSize(), input_size=(1, 32, 32))  # runs at neither (3, 32, 32) nor (1, 16, 16)
    assert str(err.value) == (
        "StatesItsSize does not run at 32x32: it needs its own input size, (3, 16, 16), which its image_size states. "
        "Pass input_size=(3, 16, 16) (and resize your images to 16x16), or build the model for 32x32 and pass the module. "
        "Also pass n_in=1 (adapt, create_body) to rebuild its input layer for 1 channel, keeping its weights (see "
        "n_in_init), with input_size=(3, 16, 16): the channels the model itself reads"
    )


class StatesNoSize(nn.Module):
    """States no input size and runs only at the default 224 px: its position embedding is the 14x14
    grid of 16-px patches there."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 16, 16)
        self.pos = nn.Parameter(torch.zeros(1, 8, 14, 14))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc((self.proj(x) + self.pos).mean((2, 3)))


def test_a_model_that_states_no_size_is_told_it_runs_at_the_default_size():
    with pytest.raises(autocut.CutError) as err:
        autocut.discover(StatesNoSize(), input_size=(3, 32, 32))
    assert str(err.value) == (
        "StatesNoSize does not run at 32x32: it needs its own input size, (3, 224, 224) (the default size). "
        "Pass input_size=(3, 224, 224) (and resize your images to 224x224), or build the model for 32x32 and pass the module"
    )
    assert autocut.discover(StatesNoSize(), input_size=(3, 224, 224)).feature_shape == (8, 14, 14)  # as it says


def test_a_timm_model_at_a_size_that_is_not_square_is_told_to_build_it_for_that_height_and_width():
    with pytest.raises(autocut.CutError) as err:
        autocut.discover("vit_tiny_patch16_224", input_size=(3, 64, 96))
    assert str(err.value).endswith(
        "or build the model for 64x96 and pass the module (timm.create_model('vit_tiny_patch16_224', img_size=(64, 96)))")
    built = timm.create_model("vit_tiny_patch16_224", img_size=(64, 96))  # as the message says: it runs at 64x96
    assert autocut.discover(built, input_size=(3, 64, 96)).feature_shape == (192, 4, 6)


def test_the_target_of_a_wrapped_module_is_the_module_it_wraps_reported_under_its_class_name():
    net = StatesNoSize()
    guessed = discovery_target(nn.DataParallel(net), None)  # no size given or stated: the 224 px guess
    assert guessed == (net, "StatesNoSize", (3, 224, 224), (3, 224, 224), None, True)
    assert discovery_target(net, 32) == (net, "StatesNoSize", (3, 32, 32), (3, 224, 224), None, False)


class FixedTokens(nn.Module):
    """Reads a value (``.item()``: fake tensors cannot run it, a real forward can), then lays its
    16-px patches out as a fixed 13x13 grid: it runs at 208 px alone, which no size tried is."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 16, 16)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        m = self.proj(x)
        m = m * (1.0 if m.mean().item() < 1e30 else 0.0)
        return self.fc(m.reshape(x.shape[0], 8, 13, 13).mean((2, 3)))


def test_a_model_that_reads_values_is_tried_at_larger_sizes_by_one_real_forward_of_batch_one_each():
    with pytest.raises(autocut.CutError) as err:
        autocut.discover(FixedTokens())  # no size given or stated: 224 px is a guess, larger ones are tried
    # what each real forward said: batch 1, and the 16-px patches of that size (8 x (side // 16)^2 values)
    said = [f"{side} px (RuntimeError: shape '[1, 8, 13, 13]' is invalid for input of size {8 * (side // 16) ** 2})"
            for side in (256, 299, 320, 384, 448, 512)]
    assert str(err.value).split("; nor at the larger sizes tried: ", 1)[1] == (
        ", ".join(said) + ". Check the input size (input_size=(C, H, W)) or pass cut= explicitly")
