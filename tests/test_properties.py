"""Properties over the zoos (hypothesis): adapted output is (B, n_out); the head's input width is
2*nf (nf without concat pooling); the body's parameters are a subset of the model's; discovery
is deterministic. Models are built on the meta device: these are shape properties."""

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
