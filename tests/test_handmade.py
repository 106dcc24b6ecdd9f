"""Discovery and bodies on hand-written models, against features the tests compute themselves."""


import pytest
import torch

import autocut

from handmade import MLP, DataDependentNet, FunctionalPoolNet, GuardedPoolNet, NHWCBlockNet, TinyViT

SIZE = (3, 32, 32)


def _x(b=2):
    return torch.randn(b, *SIZE, generator=torch.Generator().manual_seed(0))


def test_functional_pooling_cut_is_the_map_before_the_pool():
    model = FunctionalPoolNet().eval()
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.nf, cut.layout, cut.feature_shape, cut.stride, cut.method) == (16, "NCHW", (16, 8, 8), 4, "fx")
    assert cut.dropped == ("fc",)
    body = autocut.create_body(model, input_size=SIZE).eval()
    torch.testing.assert_close(body(_x()), model.features(_x()), rtol=0, atol=0)


def test_nhwc_blocks_come_out_nchw_as_a_view():
    model = NHWCBlockNet().eval()
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.layout, cut.nf, cut.feature_shape) == ("NHWC", 12, (12, 8, 8))
    body = autocut.create_body(model, input_size=SIZE).eval()
    out = body(_x())
    expected = model.features(_x()).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out._base is not None  # a permuted view of the block's output, not a copy


def test_tiny_vit_drops_the_class_token_and_lays_tokens_on_the_grid():
    model = TinyViT().eval()
    cut = autocut.discover(model, input_size=SIZE)
    assert (cut.layout, cut.prefix_tokens, cut.nf, cut.feature_shape, cut.stride) == ("NLC", 1, 16, (16, 4, 4), 8)
    assert set(cut.dropped) == {"head"}
    body = autocut.create_body(model, input_size=SIZE).eval()
    tokens = model.features(_x())
    expected = tokens[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(body(_x()), expected)


def test_data_dependent_control_flow_falls_back_to_hooks():
    model = DataDependentNet().eval()
    cut = autocut.discover(model, input_size=SIZE)
    assert cut.method == "hooks"
    assert cut.where == "pool:input"
    assert (cut.nf, cut.feature_shape) == (8, (8, 16, 16))
    body = autocut.create_body(model, input_size=SIZE).eval()
    x = _x()
    y = model.body(x)
    expected = y * 2 if y.sum() > 0 else y
    torch.testing.assert_close(body(x), expected)
    assert not any(k.startswith("fc.") for k in body.state_dict()), "the old classifier must not be carried"
    adapted = autocut.adapt(model, n_out=3, input_size=SIZE).eval()
    assert adapted(x).shape == (2, 3)


def test_hooked_body_stops_at_the_cut_through_except_exception():
    """The hooked body stops the forward with an exception that ``except Exception`` cannot catch."""
    model = GuardedPoolNet().eval()
    body = autocut.create_body(model, input_size=SIZE).eval()
    assert body.cut.method == "hooks" and body.cut.where == "pool:input"
    x = _x()
    y = model.body(x)
    torch.testing.assert_close(body(x), y * 2 if y.sum() > 0 else y)


def test_mlp_has_nothing_to_cut():
    with pytest.raises(autocut.CutError, match="feature map"):
        autocut.discover(MLP(), input_size=(3, 8, 8))


def test_discovery_does_not_touch_real_weights():
    model = FunctionalPoolNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    autocut.discover(model, input_size=SIZE)
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu"
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
