"""Properties over the zoos (hypothesis): adapted output is (B, n_out); the head's input width is
2*nf (nf without concat pooling); the body's parameters are a subset of the model's; discovery
is deterministic (built on the meta device: shape properties); each pyramid level is the model's own
value at its node, strides strictly increase and the deepest level is the body (real CPU weights)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import autocut
from autocut import zoo

from zoo_strategies import head_options, model_and_size

pytestmark = pytest.mark.zoo  # a sweep over many models: out of the mutation run (see pyproject.toml)


def _first_width(head):
    for m in head:
        if isinstance(m, nn.BatchNorm1d):
            return m.num_features
        if isinstance(m, nn.Linear):
            return m.in_features
    raise AssertionError("head has no BatchNorm1d or Linear")


@given(model_and_size(), st.integers(1, 50), st.sampled_from([1, 3]), head_options())
def test_adapted_model_maps_images_to_n_out(name_size, n_out, batch, options):
    name, size = name_size
    spec = zoo.resolve(name)
    model = zoo.build(spec, device="meta")
    adapted = autocut.adapt(model, n_out=n_out, input_size=size, **options).to("meta").eval()
    out = adapted(torch.empty(batch, *size, device="meta"))
    assert out.shape == (batch, n_out)
    nf = adapted.cut.nf
    assert _first_width(adapted[1]) == (2 * nf if options.get("concat_pool", True) else nf)
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in adapted[0].parameters()} <= model_params
    assert len(list(adapted[0].parameters())) < len(list(model.parameters()))


@given(model_and_size())
def test_discovery_is_deterministic(name_size):
    name, size = name_size
    assert autocut.discover(name, input_size=size) == autocut.discover(name, input_size=size)


@given(model_and_size())
def test_each_pyramid_level_is_the_models_own_value_there(name_size):
    # the oracle: torchvision's feature extractor at the same node names, run on the model itself
    from torchvision.models.feature_extraction import create_feature_extractor

    from autocut.layout import to_nchw

    name, size = name_size
    torch.manual_seed(0)
    model = zoo.build(zoo.resolve(name), device="cpu").eval()
    pyramid = autocut.create_pyramid(model, input_size=size)
    levels = pyramid.levels
    strides = [level.stride if isinstance(level.stride, tuple) else (level.stride, level.stride) for level in levels]
    if len(set(strides)) > 1:  # several strides: strictly increasing on both axes
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(strides, strides[1:])), strides
    extractor = create_feature_extractor(model, return_nodes={level.where: str(i) for i, level in enumerate(levels)})
    x = torch.randn(2, *size)
    with torch.no_grad():
        maps, theirs = pyramid(x), extractor(x)
        body = autocut.create_body(model, input_size=size)(x)
    for i, (level, mine) in enumerate(zip(levels, maps)):
        assert mine.shape == (2, *level.feature_shape)
        torch.testing.assert_close(mine, to_nchw(theirs[str(i)], level.layout, level.prefix_tokens, level.grid), rtol=0, atol=0)
    torch.testing.assert_close(maps[-1], body, rtol=0, atol=0)
