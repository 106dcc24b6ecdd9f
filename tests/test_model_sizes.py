"""A module's own input size, however it says it, and a larger probe where it says nothing.

Each reproduction is a small module written the way third-party model packages write theirs: an
``input_size`` attribute in (C, H, W) or (H, W, C) order (Cadene's pretrainedmodels), a size held
only in a config object (a namespace, dataclass, namedtuple or dict, under any attribute name), or
nothing stated and a forward that fails at 224 px (a fixed ``F.avg_pool2d(x, 8)``). The oracle is
the input of the model's own last global pooling in its own eager forward, at its own size.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocut
from autocut import zoo
from autocut.discover import LARGER_SIDES


def _stages(chans: list[int], padding: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(a, b, 3, 2, padding), nn.BatchNorm2d(b), nn.ReLU())
                           for a, b in zip(chans, chans[1:])])


class FixedPool(nn.Module):
    """Inception's way: five stride-2 3x3 convs and a fixed ``F.avg_pool2d(x, kernel)`` sized for
    one input size; the map before the pool is kept in ``seen`` (the oracle)."""

    def __init__(self, kernel: int = 8, padding: int = 0, in_chans: int = 3):
        super().__init__()
        self.features = _stages([in_chans, 4, 6, 8, 8, 8], padding)
        self.kernel = kernel
        self.last_linear = nn.Linear(8, 5)

    def forward(self, x):
        x = self.features(x)
        self.seen = x
        x = F.avg_pool2d(x, self.kernel)
        return self.last_linear(x.view(x.size(0), -1))


class Table(nn.Module):
    """A map plus a learned table for one grid (``side // 16`` squared): it runs at no other."""

    def __init__(self, side: int = 208):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 16, 16)
        self.table = nn.Parameter(torch.randn(1, 8, side // 16, side // 16))
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.stem(x) + self.table)).flatten(1))


class AnySize(nn.Module):
    """Runs at any size (an adaptive pool): a stated size changes only how it is described."""

    def __init__(self):
        super().__init__()
        self.features = _stages([3, 4, 8], 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _pool_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's own last global pooling, in its own eager forward."""
    if isinstance(model, FixedPool):
        model(x)
        return model.seen
    seen = []
    handle = model.pool.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[-1]


def _check_body(model: nn.Module, size: tuple[int, int, int]) -> None:
    """The body's values at ``size`` equal the input of the model's last global pooling."""
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, *size)
    body = autocut.create_body(model).eval()
    assert body.cut.input_size == size
    with torch.no_grad():
        torch.testing.assert_close(body(x), _pool_input(model, x), atol=1e-5, rtol=0)


# --- (3) an input_size attribute, in either order ----------------------------------------------


@pytest.mark.parametrize("stated, want", [
    ([3, 331, 331], (3, 331, 331)),  # pretrainedmodels' way
    ((331, 331, 3), (3, 331, 331)),  # channels last
    ((331, 331, 1), (1, 331, 331)),
])
def test_an_input_size_attribute_is_read_in_either_order(stated, want):
    # 331 px: an 11x11 map for the fixed 11x11 pool. Without the attribute, the probe fails at 224
    # and the larger sizes stop at 384 (a 12x12 map pools to 1x1 too): the wrong size
    model = FixedPool(kernel=11, padding=1, in_chans=want[0]).eval()
    model.input_size = stated
    assert zoo.input_size_source(model) == (want, "input_size")
    cut = autocut.discover(model)
    assert (cut.where, cut.nf, cut.feature_shape, cut.input_size) == ("features.4.2", 8, (8, 11, 11), want)
    _check_body(model, want)


def test_an_input_size_attribute_of_a_submodule_is_read_and_one_int_or_an_unordered_triple_is_not():
    wrapper = nn.Sequential(FixedPool(kernel=11, padding=1))
    wrapper[0].input_size = (331, 331, 3)
    assert zoo.input_size_source(wrapper) == ((3, 331, 331), "0.input_size")
    for value in (512, (3, 3, 3), (224, 224, 224), (3, 8, 8), (1, 3, 224, 224), (3.0, 224, 224), "3x224x224"):
        model = AnySize()
        model.input_size = value
        assert zoo.input_size_source(model) is None, value
    rnn = nn.Sequential(nn.LSTM(input_size=64, hidden_size=8))  # its input_size counts features
    assert zoo.input_size_source(rnn) is None


# --- (4) a size held in a config object ---------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    lr: float = 0.1
    resolution: int = 208


GlobalParams = collections.namedtuple("GlobalParams", ["width_coefficient", "depth_coefficient", "image_size",
                                                       "dropout_rate", "num_classes"])


@pytest.mark.parametrize("attr, config, source", [
    ("args", argparse.Namespace(arch="table", img_size=208, epochs=90), "args.img_size"),
    ("cfg", types.SimpleNamespace(image_size=(208, 208)), "cfg.image_size"),
    ("config", TrainConfig(), "config.resolution"),
    ("_global_params", GlobalParams(1.1, 1.2, 208, 0.3, 1000), "_global_params.image_size"),
    ("hparams", {"input_size": (3, 208, 208), "lr": 0.1}, "hparams.input_size"),
    ("hparams", {"crop_size": [208, 208], "in_chans": 3}, "hparams.crop_size"),
    ("cfg", {"MODEL": {"NAME": "table"}, "DATA": {"IMG_SIZE": 208}}, "cfg.DATA.IMG_SIZE"),  # yacs' way
])
def test_a_size_held_in_a_config_object_is_the_models_own(attr, config, source):
    # without it: probed at 224 px, the 13x13 table does not broadcast, and no larger size fits
    model = Table(208).eval()
    setattr(model, attr, config)
    assert zoo.input_size_source(model) == ((3, 208, 208), source)
    cut = autocut.discover(model)
    assert (cut.where, cut.nf, cut.feature_shape, cut.input_size) == ("act", 8, (8, 13, 13), (3, 208, 208))
    _check_body(model, (3, 208, 208))


def test_a_model_that_runs_at_any_size_is_described_at_the_size_its_config_states():
    model = AnySize().eval()
    model._global_params = GlobalParams(1.1, 1.2, 260, 0.3, 1000)  # EfficientNet-PyTorch's: b2 runs at 260
    cut = autocut.discover(model)
    assert (cut.where, cut.nf, cut.feature_shape, cut.input_size) == ("features.1.2", 8, (8, 65, 65), (3, 260, 260))
    _check_body(model, (3, 260, 260))
    adapted = autocut.adapt(model, n_out=3)
    assert adapted.cut.input_size == (3, 260, 260)


@pytest.mark.parametrize("config", [
    {"resolution": 8, "lr": 0.1},  # a side too small to be an image's
    {"input_size": 784, "hidden": 128},  # an MLP's feature count
    {"image_size": 224.0},  # not an int
    {"img_size": "224"},
    {"image_size": (3, 3, 3)},  # no order to read
    {"a": {"b": {"c": {"image_size": 224}}}},  # deeper than configs nest
    TrainConfig,  # a class, not a config
    [224, 224],  # a list is no config
])
def test_fields_that_do_not_state_a_plausible_size_are_not_read(config):
    model = AnySize()
    model.cfg = config
    assert zoo.input_size_source(model) is None


def test_configs_come_after_the_places_a_model_states_its_size_directly():
    model = Table(208)
    model.cfg = {"image_size": 384}
    model.image_size = 208
    assert zoo.input_size_source(model) == ((3, 208, 208), "image_size")


# --- (5) nothing stated: larger sizes before refusing -------------------------------------------


def test_a_model_that_states_nothing_and_fails_at_224_is_cut_at_the_first_larger_size_it_runs_at():
    model = FixedPool().eval()  # 256 px: a 7x7 map, too small for the 8x8 pool; 299 px: 8x8
    real = []
    model.features[0].register_forward_pre_hook(
        lambda m, args: real.append(args[0].shape[-1]) if type(args[0]) is torch.Tensor and not args[0].is_meta else None)
    cut = autocut.discover(model)
    assert (cut.where, cut.nf, cut.feature_shape, cut.input_size) == ("features.4.2", 8, (8, 8, 8), (3, 299, 299))
    assert 256 not in real, "the larger sizes are probed on meta or fake tensors"
    _check_body(model, (3, 299, 299))
    adapted = autocut.adapt(model, n_out=3)
    assert adapted.cut.input_size == (3, 299, 299) and adapted.cut.groups
    assert adapted.eval()(torch.randn(2, 3, 299, 299)).shape == (2, 3)


def test_larger_sizes_are_tried_only_where_the_size_was_a_guess():
    with pytest.raises(autocut.CutError, match=r"could not probe FixedPool at input size \(3, 224, 224\)") as err:
        autocut.discover(FixedPool(), input_size=(3, 224, 224))  # asked for: no other size answers
    assert "larger sizes" not in str(err.value)
    stated = Table(208)
    stated.cfg = {"img_size": 256}  # stated, wrongly: refused at that size, not searched around
    with pytest.raises(autocut.CutError, match=r"at input size \(3, 256, 256\), the size it states \(cfg.img_size\)") as err:
        autocut.discover(stated)
    assert "larger sizes" not in str(err.value)


def test_a_model_that_runs_at_no_size_tried_is_refused_with_each_size_and_what_it_said():
    with pytest.raises(autocut.CutError) as err:
        autocut.discover(Table(208))
    message = str(err.value)
    assert message.startswith("could not probe Table at input size (3, 224, 224), the default 224 px; it states no "
                              "input size (read: ")
    tried = message.split("nor at the larger sizes tried: ", 1)[1]
    for side in LARGER_SIDES:
        grid = side // 16  # what the model said there: its 13x13 table against this grid (fake tensors' words)
        assert f"{side} px (RuntimeError: Attempting to broadcast a dimension of length 13" in tried
        assert f"broadcastable to [11, 8, {grid}, {grid}])" in tried
    assert message.endswith("Check the input size (input_size=(C, H, W)) or pass cut= explicitly")
    with pytest.raises(autocut.CutError, match="nor at the larger sizes tried: 256 px"):
        autocut.adapt(Table(208), n_out=2)


def test_a_model_that_fails_the_same_way_at_a_larger_size_is_not_tried_at_more():
    class Broken(AnySize):
        def forward(self, x):
            raise TypeError("this model cannot run")

    with pytest.raises(autocut.CutError) as err:
        autocut.discover(Broken())
    assert str(err.value).split("; nor at the larger sizes tried: ", 1)[1] == (
        "256 px (the same error: not a size failure, no larger size tried). Check the input size (input_size=(C, H, W)) "
        "or pass cut= explicitly")


def test_a_timm_model_built_for_another_size_is_probed_at_the_size_it_was_built_for():
    """timm's ``create_model(name, img_size=64)`` keeps the weights' 224 in ``pretrained_cfg``;
    its patch embedding only takes 64, so 64 is the size it states."""
    import timm

    from autocut import zoo

    model = timm.create_model("vit_tiny_patch16_224", img_size=64)
    size, source = zoo.input_size_source(model)
    assert size == (3, 64, 64) and source.startswith("patch_embed.img_size") and "224x224" in source
    assert autocut.discover(model).feature_shape == (192, 4, 4)
    assert zoo.input_size_source(timm.create_model("vit_tiny_patch16_224")) == ((3, 224, 224), "pretrained_cfg")
