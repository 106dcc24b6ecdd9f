"""timm: for one model of every timm model module, the body's output shape equals
``forward_features`` after layout normalisation (shapes on the meta device); for a dozen small
ones the values are equal too (random weights, real CPU tensors).

The oracle's layout normalisation uses timm's own metadata (``output_fmt``,
``num_prefix_tokens``, ``feature_info``), not autocut's graph reading.
"""

import math

import pytest
import timm
import torch

import autocut
from autocut import zoo

from timm_subset import TIMM_SUBSET

pytestmark = pytest.mark.zoo  # a sweep over many models: out of the mutation run (see pyproject.toml)

# Where autocut deliberately differs from forward_features, and why.
DIFFERS = {
    # forward_features returns the class token(s) only, (B, 1, C): autocut cuts at the last
    # token map before the class token is split off, so the head sees a spatial map.
    "pit_ti_224": "cls-only features",
    # forward_features returns a list of per-branch token maps on different grids; there is no
    # single map every path goes through, so autocut refuses and asks for cut=.
    "crossvit_tiny_240": "list features",
    "coat_tiny": "list features",
}
# forward_features cannot run on the meta device (value-dependent code): the oracle runs real,
# at a smaller input where the default one is large.
NEEDS_REAL = {"efficientvit_b0": None, "csatv2": (3, 128, 128), "gemma4_vit_167m": (3, 128, 128)}


def test_subset_covers_every_timm_module():
    assert set(TIMM_SUBSET) == set(timm.list_modules())
    for module, name in TIMM_SUBSET.items():
        assert name in timm.list_models(module=module)


def _normalise(model, feats, size):
    """forward_features output -> (B, C, h, w), from timm's own metadata."""
    if feats.ndim == 4:
        fmt = str(getattr(model, "output_fmt", "NCHW"))
        return feats.permute(0, 3, 1, 2) if fmt.endswith("NHWC") else feats
    assert feats.ndim == 3, feats.shape
    prefix = getattr(model, "num_prefix_tokens", 0)
    b, n, c = feats.shape
    tokens = n - prefix
    red = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else None
    h = w = math.isqrt(tokens)
    if h * w != tokens and red:
        h, w = math.ceil(size[1] / red), math.ceil(size[2] / red)
    return feats.new_empty((b, c, h, w))


def _shapes(name, device):
    spec = zoo.resolve(name)
    model = zoo.build(spec, device=device)
    size = NEEDS_REAL.get(name) or zoo.default_input_size(spec, model)
    x = torch.empty(3, *size, device=device) if device == "meta" else torch.randn(3, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
    return model, size, x, feats


@pytest.mark.parametrize("module", sorted(TIMM_SUBSET))
def test_body_shape_matches_forward_features(module):
    name = TIMM_SUBSET[module]
    if DIFFERS.get(name) == "list features":
        with pytest.raises(autocut.CutError, match="branches only meet after pooling"):
            autocut.discover(name)
        return
    device = "cpu" if name in NEEDS_REAL else "meta"
    model, size, x, feats = _shapes(name, device)
    body = autocut.create_body(model, input_size=size).eval()
    with torch.no_grad():
        out = body(x)
    assert out.shape[1:] == body.cut.feature_shape
    if DIFFERS.get(name) == "cls-only features":
        assert feats.shape[1] == 1 and out.ndim == 4 and out.shape[1] == feats.shape[2]
        return
    assert out.shape == _normalise(model, feats, size).shape


SMALL_VALUES = {
    "resnet18": (3, 64, 64),
    "efficientnet_b0": (3, 64, 64),
    "convnext_atto": (3, 64, 64),
    "mobilenetv3_small_050": (3, 64, 64),
    "regnetx_002": (3, 64, 64),
    "densenet121": (3, 64, 64),
    "vit_tiny_patch16_224": (3, 224, 224),
    "deit_tiny_distilled_patch16_224": (3, 224, 224),
    "swin_tiny_patch4_window7_224": (3, 224, 224),
    "beit_base_patch16_224": (3, 224, 224),
    "levit_128s": (3, 224, 224),
    "edgenext_xx_small": (3, 64, 64),
    "nest_tiny": (3, 224, 224),
}


def _real_normalise(model, feats):
    if feats.ndim == 4:
        fmt = str(getattr(model, "output_fmt", "NCHW"))
        return feats.permute(0, 3, 1, 2) if fmt.endswith("NHWC") else feats
    prefix = getattr(model, "num_prefix_tokens", 0)
    tokens = feats[:, prefix:]
    side = math.isqrt(tokens.shape[1])
    return tokens.reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", sorted(SMALL_VALUES))
def test_body_values_equal_forward_features(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = SMALL_VALUES[name]
    x = torch.randn(2, *size)
    body = autocut.create_body(model, input_size=size).eval()
    with torch.no_grad():
        expected = _real_normalise(model, model.forward_features(x))
        out = body(x)
    torch.testing.assert_close(out, expected)
