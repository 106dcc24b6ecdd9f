"""create_head and AdaptiveConcatPool2d against fastai's published semantics and PyTorch's ops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocut
from autocut import AdaptiveConcatPool2d, SigmoidRange, create_head


def test_concat_pool_is_max_then_avg():
    x = torch.randn(3, 5, 4, 6)
    out = AdaptiveConcatPool2d()(x)
    assert out.shape == (3, 10, 1, 1)
    torch.testing.assert_close(out[:, :5], F.adaptive_max_pool2d(x, 1))
    torch.testing.assert_close(out[:, 5:], F.adaptive_avg_pool2d(x, 1))


def test_concat_pool_to_a_grid():
    x = torch.randn(2, 3, 6, 6)
    out = AdaptiveConcatPool2d(2)(x)
    assert out.shape == (2, 6, 2, 2) and repr(AdaptiveConcatPool2d(2)) == "AdaptiveConcatPool2d(size=2)"
    torch.testing.assert_close(out, torch.cat([F.adaptive_max_pool2d(x, 2), F.adaptive_avg_pool2d(x, 2)], 1))


def test_concat_pool_is_timm_catavgmax_with_halves_swapped():
    from timm.layers.adaptive_avgmax_pool import adaptive_catavgmax_pool2d

    x = torch.randn(2, 4, 5, 5)
    ours, timms = AdaptiveConcatPool2d()(x), adaptive_catavgmax_pool2d(x, 1)
    torch.testing.assert_close(ours, torch.cat([timms[:, 4:], timms[:, :4]], 1))


def _layers(head):
    return [type(m).__name__ for m in head]


def test_default_head_is_fastais():
    head = create_head(512, 10)
    assert _layers(head) == [
        "AdaptiveConcatPool2d", "Flatten",
        "BatchNorm1d", "Dropout", "Linear", "ReLU",
        "BatchNorm1d", "Dropout", "Linear",
    ]
    bn1, drop1, lin1, bn2, drop2, lin2 = head[2], head[3], head[4], head[6], head[7], head[8]
    assert bn1.num_features == 1024 and (lin1.in_features, lin1.out_features) == (1024, 512)
    assert bn2.num_features == 512 and (lin2.in_features, lin2.out_features) == (512, 10)
    assert (drop1.p, drop2.p) == (0.25, 0.5)  # ps spreads as [p/2]*(n-2) + [p]
    assert lin1.bias is None and lin2.bias is None  # no bias after BatchNorm
    assert head(torch.randn(4, 512, 7, 7)).shape == (4, 10)


def test_ps_spread_and_lin_ftrs():
    head = create_head(64, 3, lin_ftrs=[32, 16], ps=0.4)
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.4]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [32, 16, 3]
    head = create_head(64, 3, lin_ftrs=[32], ps=[0.1, 0.3])
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.1, 0.3]
    with pytest.raises(ValueError, match="ps has 3 values for 2 blocks"):
        create_head(64, 3, lin_ftrs=[32], ps=[0.1, 0.2, 0.3])


def test_options_avg_pool_no_first_bn_bn_final_no_pool():
    head = create_head(64, 3, concat_pool=False, first_bn=False, bn_final=True, ps=0.0)
    assert _layers(head) == ["AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU", "BatchNorm1d", "Linear", "BatchNorm1d"]
    assert head[2].in_features == 64 and head[2].bias is not None  # no BN before: keeps its bias
    assert head[-1].momentum == 0.01
    flat = create_head(64, 3, pool=False)
    assert flat[0].num_features == 64  # no pooling: nf is not doubled
    assert flat.eval()(torch.randn(2, 64)).shape == (2, 3)


def test_y_range_bounds_the_output():
    head = create_head(8, 2, y_range=(-1.0, 3.0)).eval()
    assert isinstance(head[-1], SigmoidRange)
    out = head(torch.randn(16, 8, 2, 2) * 100)
    assert out.min() >= -1.0 and out.max() <= 3.0


def test_lin_first_blocks():
    head = create_head(16, 4, lin_ftrs=[8], lin_first=True, ps=0.5)
    assert _layers(head) == ["AdaptiveConcatPool2d", "Flatten", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert head.eval()(torch.randn(2, 16, 3, 3)).shape == (2, 4)


def test_lin_first_without_first_bn_has_no_batch_norm_in_its_first_block():
    # fastai: the first block is Linear (keeping its bias), ReLU, Dropout; the others have their BatchNorm
    head = create_head(16, 4, lin_ftrs=[8, 6], lin_first=True, first_bn=False, ps=[0.1, 0.2, 0.3])
    assert _layers(head) == ["AdaptiveConcatPool2d", "Flatten", "Dropout", "Linear", "ReLU", "Dropout",
                             "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert [m.bias is not None for m in head if isinstance(m, nn.Linear)] == [True, False, True]
    assert head.eval()(torch.randn(2, 16, 3, 3)).shape == (2, 4)


def test_block_batch_norms_start_as_fastais_and_bn_final_as_a_plain_one():
    head = create_head(8, 3, bn_final=True)
    bns = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    for bn in bns[:-1]:  # fastai's BatchNorm: weight 1, bias 1e-3
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.full_like(bn.bias, 1e-3))
    assert torch.equal(bns[-1].bias, torch.zeros(3)) and bns[-1].momentum == 0.01


def test_sizes_of_any_integral_type_are_plain_ints():
    head = create_head(np.int64(8), np.int64(3), lin_ftrs=[np.int32(16)])
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(16, 16), (16, 3)]
    assert all(type(m.in_features) is int and type(m.out_features) is int for m in head if isinstance(m, nn.Linear))
    assert head.eval()(torch.randn(2, 8, 2, 2)).shape == (2, 3)


_NUMBER = "must be a number in"


@pytest.mark.parametrize(("options", "message"), [
    ({"nf": 0}, r"^nf must be a positive int, got 0 \(int\): pass a whole number >= 1 such as 3$"),
    ({"nf": 2.5}, r"^nf must be a positive int, got 2\.5 \(float\)"),
    ({"nf": 8.0}, r"^nf must be a positive int, got 8\.0 \(float\)"),
    ({"nf": True}, r"^nf must be a positive int, got True \(bool\)"),
    ({"n_out": -1}, r"^n_out must be a positive int, got -1 \(int\)"),
    ({"n_out": np.int64(0)}, r"^n_out must be a positive int, got np\.int64\(0\) \(int64\)"),
    ({"n_out": "10"}, r"^n_out must be a positive int, got '10' \(str\)"),
    ({"lin_ftrs": [0]}, r"^lin_ftrs\[0\] must be a positive int, got 0 \(int\)"),
    ({"lin_ftrs": [32, 2.5]}, r"^lin_ftrs\[1\] must be a positive int, got 2\.5 \(float\)"),
    ({"lin_ftrs": 512}, r"^lin_ftrs must be a list of ints >= 1, got 512 \(int\): pass a list such as \[512\]$"),
    ({"ps": 1.0}, rf"^ps {_NUMBER} \[0, 1\), got 1\.0 \(float\): pass a number such as 0\.5$"),
    ({"ps": -0.1}, rf"^ps {_NUMBER} \[0, 1\), got -0\.1 \(float\)"),
    ({"ps": float("nan")}, rf"^ps {_NUMBER} \[0, 1\), got nan \(float\)"),
    ({"ps": True}, rf"^ps {_NUMBER} \[0, 1\), got True \(bool\)"),
    ({"ps": [0.1, 1.5]}, rf"^ps\[1\] {_NUMBER} \[0, 1\), got 1\.5 \(float\): pass a number such as 0\.5$"),
    ({"ps": []}, r"^ps must be a dropout probability in \[0, 1\) or a list of them, one per block, got \[\]"),
    ({"ps": "0.5"}, r"^ps must be a dropout probability in \[0, 1\) or a list of them"),
    ({"y_range": (3.0, -1.0)}, r"^y_range must be \(low, high\) finite numbers with low < high, got \(3\.0, -1\.0\)"),
    ({"y_range": (0.0, float("inf"))}, rf"^y_range\[1\] {_NUMBER} \(-inf, inf\), got inf \(float\)"),
])
def test_bad_arguments_are_refused_naming_the_argument(options, message):
    args = {"nf": 8, "n_out": 3, **options}
    with pytest.raises(autocut.CutError, match=message):
        create_head(args.pop("nf"), args.pop("n_out"), **args)


def test_ps_of_any_real_type_spread_as_floats():
    head = create_head(8, 3, ps=np.float32(0.5))
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.25, 0.5]
    assert all(type(m.p) is float for m in head if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.Dropout) for m in create_head(8, 3, ps=0))


# --- BatchNorm + dropout as one module (fused on CUDA; PyTorch's ops here) --------------------


def _trained_pairs(head: nn.Sequential) -> None:
    """Give the head's BatchNorms non-default parameters, so sharing them is visible."""
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


def test_fuse_bn_dropout_keeps_parameters_names_and_outputs():
    from autocut.layers import BatchNormDropout1d, fuse_bn_dropout

    torch.manual_seed(0)
    head = create_head(16, 5)
    _trained_pairs(head)
    reference = create_head(16, 5)
    reference.load_state_dict(head.state_dict())
    params_before = list(head.parameters())
    keys_before = list(head.state_dict())

    assert fuse_bn_dropout(head) is head
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["AdaptiveConcatPool2d", "Flatten", "BatchNormDropout1d", "Identity", "Linear", "ReLU",
                     "BatchNormDropout1d", "Identity", "Linear"]
    assert [m.p for m in head if isinstance(m, BatchNormDropout1d)] == [0.25, 0.5]
    assert all(a is b for a, b in zip(head.parameters(), params_before, strict=True))
    assert list(head.state_dict()) == keys_before
    reference.load_state_dict(head.state_dict())  # and back

    x = torch.randn(8, 16, 3, 3)
    for train in (True, False):
        head.train(train), reference.train(train)
        torch.manual_seed(1)
        got = head(x)
        torch.manual_seed(1)
        want = reference(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(head.buffers(), reference.buffers(), strict=True):  # running stats, batch counts
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert head[2].num_batches_tracked.item() == 1


def test_fuse_bn_dropout_on_a_whole_model_and_an_existing_optimiser():
    from autocut.layers import BatchNormDropout1d, fuse_bn_dropout

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), create_head(8, 3, lin_ftrs=[6], ps=[0.0, 0.5]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fuse_bn_dropout(model)
    head = model[1]
    # p=0 builds no Dropout, so the first BatchNorm has no pair and stays as it is.
    assert type(head[2]) is nn.BatchNorm1d and isinstance(head[5], BatchNormDropout1d) and head[5].p == 0.5
    before = head[5].weight.detach().clone()
    loss = model(torch.randn(4, 3, 5, 5)).square().sum()
    loss.backward()
    opt.step()
    assert not torch.equal(head[5].weight, before), "the optimiser built before fusing must still train it"


def test_batch_norm_dropout_module_matches_batchnorm_options():
    from autocut.layers import BatchNormDropout1d

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 4, generator=g) * (i + 1) + i for i in range(3)]  # other statistics each step
    for kwargs in (dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(eps=0.5)):
        bn, fused = nn.BatchNorm1d(4, **kwargs), BatchNormDropout1d(4, p=0.0, **kwargs)
        for x in xs:
            torch.testing.assert_close(fused(x), bn(x))
        for a, b in zip(fused.buffers(), bn.buffers(), strict=True):
            torch.testing.assert_close(a, b)
        fused.eval(), bn.eval()
        torch.testing.assert_close(fused(xs[0]), bn(xs[0]))
    # statistics tracked, then no longer: eval still normalises with them, as BatchNorm1d does
    bn, fused = nn.BatchNorm1d(4), BatchNormDropout1d(4, p=0.0)
    bn(xs[1]), fused(xs[1])
    bn.track_running_stats = fused.track_running_stats = False
    bn.eval(), fused.eval()
    torch.testing.assert_close(fused(xs[2]), bn(xs[2]))
    assert "p=0.0" in repr(BatchNormDropout1d(4, p=0.0))
    assert BatchNormDropout1d(4, p=1.0).p == 1.0  # drops everything: allowed, as nn.Dropout allows it
    with pytest.raises(ValueError, match="between 0 and 1"):
        BatchNormDropout1d(4, p=1.5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNormDropout1d(4)(torch.randn(1, 4))


def test_fused_pairs_fold_like_the_originals():
    from autocut.kernels.fold import fold_head
    from autocut.layers import fuse_bn_dropout

    torch.manual_seed(0)
    head = create_head(8, 4)
    _trained_pairs(head)
    head.train()(torch.randn(16, 8, 2, 2))  # non-trivial running statistics
    head.eval()
    x = torch.randn(3, 8, 2, 2)
    want = head(x)
    torch.testing.assert_close(fold_head(fuse_bn_dropout(head))(x), want, rtol=1e-5, atol=1e-5)


def test_sigmoid_range_maps_exact_values():
    # sigmoid(0) = 1/2 sits at the middle of (low, high); the ends are the bounds themselves
    r = SigmoidRange(-1.0, 3.0)
    assert r(torch.tensor(0.0)).item() == 1.0
    torch.testing.assert_close(r(torch.tensor([-1e4, 1e4, math.log(3.0)])), torch.tensor([-1.0, 3.0, 2.0]))
    head = create_head(8, 2, y_range=(2.0, 6.0), ps=0.0).eval()
    with torch.no_grad():
        head[-2].weight.zero_()  # the last Linear (no bias after its BatchNorm) gives 0
    assert torch.equal(head(torch.randn(5, 8, 2, 2)), torch.full((5, 2), 4.0))


def test_resample_scales_the_height_and_the_width_of_a_map_that_is_not_square_apart():
    from autocut.layers import Resample

    x = torch.randn(1, 2, 6, 10)
    # the oracles: PyTorch's own scaling of each side by the factor, and 2x2 max pooling for a half
    torch.testing.assert_close(Resample(2)(x), F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    torch.testing.assert_close(Resample(0.5)(x), F.max_pool2d(x, 2))
    assert Resample(1 / 3)(x).shape == (1, 2, 2, 3)  # 6 / 3 and 10 / 3, rounded
    assert Resample(0.5)(torch.zeros(1, 2, 4, 2)).shape == (1, 2, 2, 1)  # each side on its own
    assert Resample(0.25)(torch.zeros(1, 2, 2, 2)).shape == (1, 2, 1, 1)  # never below 1
    with pytest.raises(autocut.CutError, match=r"factor must be a number in \(0, inf\), got 0"):
        Resample(0)


def test_batch_norm_dropout_is_batch_norm_then_dropout():
    from autocut.layers import batch_norm_dropout

    g = torch.Generator().manual_seed(0)
    x, rm, rv = torch.randn(8, 5, generator=g), torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    w, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    # eval: the running statistics and no dropout, whatever p is
    want = (x - rm) / torch.sqrt(rv + 0.25) * w + b
    torch.testing.assert_close(batch_norm_dropout(x, rm, rv, w, b, training=False, momentum=0.1, eps=0.25, p=0.9), want)
    # training: batch statistics, the running ones updated with the momentum, inverted dropout
    rm2, rv2 = rm.clone(), rv.clone()
    torch.manual_seed(3)
    got = batch_norm_dropout(x, rm2, rv2, w, b, training=True, momentum=0.3, eps=0.25, p=0.5)
    normed = F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.3, 0.25)
    kept = got != 0
    torch.testing.assert_close(got[kept], (normed * 2)[kept])
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(rm2, 0.7 * rm + 0.3 * x.mean(0))
    torch.testing.assert_close(rv2, 0.7 * rv + 0.3 * x.var(0, unbiased=True))


def test_a_fused_pair_keeps_every_batch_norm_option():
    from autocut.layers import BatchNormDropout1d, fuse_bn_dropout

    for kwargs in (dict(eps=0.5), dict(momentum=0.3), dict(affine=False), dict(track_running_stats=False)):
        bn = nn.BatchNorm1d(6, **kwargs)
        fused = BatchNormDropout1d.from_pair(bn, 0.25)
        assert (fused.eps, fused.momentum, fused.affine, fused.track_running_stats, fused.p) == (
            bn.eps, bn.momentum, bn.affine, bn.track_running_stats, 0.25), kwargs
    # the last pair of a Sequential is fused too; a BatchNorm without a Dropout after it is not
    head = fuse_bn_dropout(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.1)))
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNormDropout1d", "Identity"]
    head = fuse_bn_dropout(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Dropout(0.1)))
    assert [type(m).__name__ for m in head] == ["BatchNorm1d", "Linear", "Dropout"]


def test_batch_norm_dropout_without_running_statistics_in_eval_drops_nothing():
    from autocut.layers import BatchNormDropout1d

    x = torch.randn(8, 4)
    # no running statistics: batch statistics in eval too, as BatchNorm1d, but never dropout
    fused = BatchNormDropout1d(4, p=0.9, track_running_stats=False).eval()
    bn = nn.BatchNorm1d(4, track_running_stats=False).eval()
    torch.testing.assert_close(fused(x), bn(x))
    # tracking switched off after construction: training leaves the running statistics alone
    fused, bn = BatchNormDropout1d(4, p=0.0), nn.BatchNorm1d(4)
    fused.track_running_stats = bn.track_running_stats = False
    torch.testing.assert_close(fused(x), bn(x))
    for a, b in zip(fused.buffers(), bn.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(fused.running_mean, torch.zeros(4)) and torch.equal(fused.running_var, torch.ones(4))



# --- the head against fastai's own recipe ------------------------------------------------------


def _fastai_head_layers(nf, n_out, lin_ftrs=None, ps=0.5, pool=True, concat_pool=True, first_bn=True,
                        bn_final=False, y_range=None):
    """What fastai 2's ``create_head`` builds (``lin_first=False``), written from its source as a
    list of layer descriptions: its ``LinBnDrop`` blocks are BatchNorm (if ``bn``), Dropout (if
    ``p``), Linear (no bias after a BatchNorm), then the activation."""
    if pool and concat_pool:
        nf *= 2
    widths = [nf, 512, n_out] if lin_ftrs is None else [nf, *lin_ftrs, n_out]
    bns = [first_bn] + [True] * len(widths[1:])
    ps = [ps] if isinstance(ps, float) else list(ps)
    if len(ps) == 1:
        ps = [ps[0] / 2] * (len(widths) - 2) + ps
    acts = ["ReLU(inplace)"] * (len(widths) - 2) + [None]
    layers = (["AdaptiveConcatPool2d" if concat_pool else "AdaptiveAvgPool2d(1)", "Flatten"] if pool else [])
    for n_in, n_o, bn, p, act in zip(widths[:-1], widths[1:], bns, ps, acts):
        layers += [f"BatchNorm1d({n_in}, eps=1e-05, momentum=0.1)"] if bn else []
        layers += [f"Dropout({p})"] if p != 0 else []
        layers += [f"Linear({n_in}, {n_o}, bias={not bn})"] + ([act] if act else [])
    layers += [f"BatchNorm1d({widths[-1]}, eps=1e-05, momentum=0.01)"] if bn_final else []
    layers += [f"SigmoidRange({y_range[0]}, {y_range[1]})"] if y_range is not None else []
    return layers


def _describe(head):
    out = []
    for m in head:
        if isinstance(m, nn.BatchNorm1d):
            out.append(f"BatchNorm1d({m.num_features}, eps={m.eps}, momentum={m.momentum})")
        elif isinstance(m, nn.Dropout):
            out.append(f"Dropout({m.p})")
        elif isinstance(m, nn.Linear):
            out.append(f"Linear({m.in_features}, {m.out_features}, bias={m.bias is not None})")
        elif isinstance(m, nn.ReLU):
            out.append("ReLU(inplace)" if m.inplace else "ReLU")
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            out.append(f"AdaptiveAvgPool2d({m.output_size})")
        elif isinstance(m, SigmoidRange):
            out.append(f"SigmoidRange({m.low}, {m.high})")
        elif isinstance(m, AdaptiveConcatPool2d):
            assert m.size == 1
            out.append("AdaptiveConcatPool2d")
        else:
            out.append(type(m).__name__)
    return out


HEAD_OPTIONS = [
    {}, dict(lin_ftrs=[256]), dict(lin_ftrs=[512, 128]), dict(lin_ftrs=[]), dict(ps=0.2), dict(ps=0.0),
    dict(lin_ftrs=[256], ps=[0.1, 0.3]), dict(lin_ftrs=[512, 128], ps=[0.1, 0.2, 0.3]), dict(concat_pool=False),
    dict(pool=False), dict(first_bn=False), dict(first_bn=False, lin_ftrs=[256], ps=[0.0, 0.4]), dict(bn_final=True),
    dict(y_range=(0.0, 5.0)), dict(bn_final=True, y_range=(-1.0, 1.0), concat_pool=False, lin_ftrs=[64]),
]


@pytest.mark.parametrize("options", HEAD_OPTIONS, ids=[str(o) or "default" for o in HEAD_OPTIONS])
def test_the_head_is_fastais_layer_for_layer(options):
    head = create_head(40, 7, **options)
    assert _describe(head) == _fastai_head_layers(40, 7, **options)
    x = torch.randn(3, 40, 2, 2) if options.get("pool", True) else torch.randn(3, 40)
    assert head.eval()(x).shape == (3, 7)


def _signature(head):
    out = []
    for m in head:
        if isinstance(m, torch.nn.Linear):
            out.append(("Linear", m.in_features, m.out_features))
        elif isinstance(m, torch.nn.BatchNorm1d):
            out.append(("BatchNorm1d", m.num_features))
        elif isinstance(m, torch.nn.Dropout):
            out.append(("Dropout", m.p))
        else:
            out.append(type(m).__name__)
    return out


def test_a_lin_first_head_with_two_hidden_layers_spreads_its_dropouts_in_order():
    head = create_head(4, 3, lin_ftrs=[16, 8], ps=(0.1, 0.2, 0.3), lin_first=True)
    assert _signature(head) == [
        "AdaptiveConcatPool2d", "Flatten", ("Dropout", 0.1),
        ("Linear", 8, 16), "ReLU", ("BatchNorm1d", 16), ("Dropout", 0.2),
        ("Linear", 16, 8), "ReLU", ("BatchNorm1d", 8), ("Dropout", 0.3),
        ("Linear", 8, 3),
    ]


def test_the_smallest_head_has_one_feature_and_one_output():
    assert create_head(1, 1, pool=False)(torch.randn(4, 1)).shape == (4, 1)
    with pytest.raises(ValueError, match=r"^nf must be a positive int, got 0 \(int\)"):
        create_head(0, 1)
    with pytest.raises(ValueError, match=r"^n_out must be a positive int, got 0 \(int\)"):
        create_head(1, 0)
