"""Discovery and bodies on hand-written models, against features the tests compute themselves."""

import copy
import io

import pytest
import torch
from torch import nn

import autocut
from handmade import MLP, ConstantsNet, DataDependentNet, GuardedPoolNet, FunctionalPoolNet, NHWCBlockNet, TinyViT, TrainBranchNet

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


def test_body_follows_train_and_eval_graphs():
    model = TrainBranchNet()
    body = autocut.create_body(model, input_size=(3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    body.train()
    torch.testing.assert_close(body(x), model.conv(x) * 2)
    body.eval()
    torch.testing.assert_close(body(x), model.conv(x))
    for _ in range(2):  # each mode's compiled code is kept: switching back must not mix them up
        body.train()
        torch.testing.assert_close(body(x), model.conv(x) * 2)
        body.eval()
        torch.testing.assert_close(body(x), model.conv(x))
    clone = copy.deepcopy(body)
    assert not clone.training
    torch.testing.assert_close(clone(x), model.conv(x))
    torch.testing.assert_close(clone.train()(x), model.conv(x) * 2)
    assert body.train_graph is not body.eval_graph
    # a model whose forward is the same in both modes gets one graph for both
    plain = autocut.create_body(FunctionalPoolNet(), input_size=SIZE)
    assert plain.train_graph is plain.eval_graph
    plain_clone = copy.deepcopy(plain)
    assert plain_clone.train_graph is plain_clone.eval_graph


def test_tensors_made_in_forward_stay_off_the_users_model():
    """fx stores such tensors on the traced model; autocut moves them into the body."""
    model = ConstantsNet()
    attributes, keys = set(vars(model)), set(model.state_dict())
    for _ in range(2):
        autocut.discover(model, input_size=(3, 8, 8))
    body = autocut.create_body(model, input_size=(3, 8, 8))
    autocut.adapt(model, n_out=3, input_size=(3, 8, 8))
    assert set(vars(model)) == attributes and set(model.state_dict()) == keys
    x = torch.randn(2, 3, 8, 8)
    shift = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(body.eval()(x), model.conv(x) + shift)
    torch.testing.assert_close(body.train()(x), (model.conv(x) + shift) * 2)
    assert set(body.state_dict()) == {"conv.weight", "conv.bias"}  # the constants are not state
    torch.testing.assert_close(copy.deepcopy(body).eval()(x), model.conv(x) + shift)


def test_body_survives_deepcopy_state_dict_round_trip_and_compile():
    model = FunctionalPoolNet().eval()
    body = autocut.create_body(model, input_size=SIZE).eval()
    x = _x()
    expected = body(x)
    clone = copy.deepcopy(body)
    torch.testing.assert_close(clone(x), expected)
    buffer = io.BytesIO()
    torch.save(body.state_dict(), buffer)
    buffer.seek(0)
    fresh = autocut.create_body(FunctionalPoolNet().eval(), input_size=SIZE).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), expected)
    compiled = torch.compile(body)  # inductor: graph capture and code generation
    torch.testing.assert_close(compiled(x), expected)


def test_body_keeps_original_names_so_original_checkpoints_load():
    model = FunctionalPoolNet()
    body = autocut.create_body(model, input_size=SIZE)
    original = model.state_dict()
    assert set(body.state_dict()) == {k for k in original if not k.startswith("fc.")}
    other = FunctionalPoolNet()
    body2 = autocut.create_body(other, input_size=SIZE)
    body2.load_state_dict({k: v for k, v in original.items() if not k.startswith("fc.")})
    torch.testing.assert_close(body2.eval()(_x()), body.eval()(_x()))


def test_user_cuts_int_name_and_callable():
    model = FunctionalPoolNet().eval()
    by_int = autocut.create_body(model, cut=2, input_size=SIZE).eval()
    torch.testing.assert_close(by_int(_x()), model.stage(model.stem(_x())))
    assert by_int.cut.method == "user"
    by_name = autocut.create_body(model, cut="stem", input_size=SIZE).eval()
    torch.testing.assert_close(by_name(_x()), model.stem(_x()))
    assert by_name.cut.nf == 8
    by_callable = autocut.create_body(model, cut=lambda m: m.stem, input_size=SIZE).eval()
    torch.testing.assert_close(by_callable(_x()), model.stem(_x()))
    with pytest.raises(autocut.CutError, match="no node or module"):
        autocut.create_body(model, cut="nonexistent", input_size=SIZE)
    with pytest.raises(autocut.CutError, match="out of range"):
        autocut.create_body(model, cut=9, input_size=SIZE)
    with pytest.raises(autocut.CutError, match="not a feature map"):
        autocut.create_body(model, cut="fc", input_size=SIZE)


def test_discovery_does_not_touch_real_weights():
    model = FunctionalPoolNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    autocut.discover(model, input_size=SIZE)
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu"
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
