"""Models as users hand them in: on the meta device or in half precision, in eval mode, with
hooks, compiled, cut by hand, at the wrong size or channels, unknown by name, without a map,
returning a dataclass. Each is adapted correctly or refused with what to pass instead."""

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

import autocut

from handmade import FunctionalPoolNet

SIZE = (3, 32, 32)


def _x(b=2, c=3, dtype=torch.float32):
    return torch.randn(b, c, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


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
