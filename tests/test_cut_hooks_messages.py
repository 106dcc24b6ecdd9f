"""The hooks rule (``autocut.cut_hooks``) on maps a module returns inside a structure and on the
model's own forward: where the cut of a head fed a re-laid view of such a map is, and what the
refusal of a pyramid says when the map on another grid is the one the model's forward returns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocut
from autocut.cut_hooks import EarlyExitBody, find_cut_by_hooks, probe_modules
from autocut.errors import CutError
from autocut.layout import Layout
from autocut.pyramid import discover_pyramid

SIZE = (3, 16, 16)


class TokenMean(nn.Module):
    def forward(self, t):
        return t.mean(1)


class _MapInADict(nn.Module):
    """A stage that returns its map in a dict, with the map pooled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x):
        m = self.conv(x)
        return {"map": m, "pooled": m.mean((2, 3))}


class _DictStageTokenHead(nn.Module):
    """The stage's map, flattened and transposed into tokens ``(B, 64, 8)`` for a head that pools
    them: the head's input is a re-laid view of the map inside the dict the stage returned."""

    def __init__(self):
        super().__init__()
        self.stage = _MapInADict()
        self.pool = TokenMean()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        m = self.stage(x)["map"]
        if m.sum() < -1e30:  # data-dependent control flow: fx cannot trace it
            return m
        return self.fc(self.pool(m.flatten(2).transpose(1, 2)))


def test_a_head_fed_a_re_laid_view_of_a_map_in_a_returned_dict_is_cut_at_that_key():
    torch.manual_seed(0)
    model = _DictStageTokenHead().eval()
    cut = find_cut_by_hooks(model, probe_modules(model, SIZE), SIZE, "_DictStageTokenHead")
    # the map as the stage returned it, NCHW (the tokens the head pools are a view of it), not the whole dict
    assert (cut.where, cut.after, cut.layout, cut.nf, cut.feature_shape, cut.stride) == (
        "stage:map", "", Layout.NCHW, 8, (8, 8, 8), 2)
    assert cut.dropped == ("fc",)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(EarlyExitBody(model, cut).eval()(x), model.stage.conv(x), rtol=0, atol=0)


class _CoarseContextFirst(nn.Module):
    """A token model (one stride, 4x4 at 16 px) whose forward reads values, and first calls the
    model itself for a coarse context of the image to subtract: that nested call's own forward
    returns a 2x2 map (no module makes it), before any map of the model's pass."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.pool, self.head = TokenMean(), nn.Linear(8, 2)

    def forward(self, x, context=False):
        if context:
            return F.adaptive_avg_pool2d(x, 2)
        x = x - F.interpolate(self(x, context=True), size=x.shape[-2:])  # the image less its coarse context
        t = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = block(t)
            if float(t.abs().max()) > 1e6:  # a value read
                t = t / 2
        return self.head(self.pool(t))


def test_a_hooked_pyramid_refused_for_a_map_the_models_own_forward_returns_names_its_forward():
    with pytest.raises(CutError) as info:
        discover_pyramid(_CoarseContextFirst(), input_size=SIZE)
    assert str(info.value) == (
        "_CoarseContextFirst was cut by hooks ('pool:input'): neither fx nor an ATen recording could capture its graph, and "
        "'its forward' returns a map on a 2x2 grid before its 4x4 cut: several strides, which only a graph tells from "
        "branches. Make its forward traceable, or use create_body for the last map")


def test_a_model_torch_export_cannot_capture_is_cut_by_hooks_without_torchs_partial_graph_on_stderr(capfd):
    from handmade import DataDependentNet

    cut = autocut.discover(DataDependentNet(), input_size=(3, 16, 16))
    assert (cut.where, cut.method) == ("pool:input", "hooks")
    err = capfd.readouterr().err
    assert "def forward(self" not in err and "Unable to find user code" not in err, err[:300]
