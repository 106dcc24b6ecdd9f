"""Layouts (``autocut.layout``): reading a shape as a feature map, and the one conversion to NCHW,
checked directly on shapes and tensors (as timm's ``tests/test_layers_pool.py`` checks pools)."""

import json
import math

import pytest
import torch

from autocut.layout import (
    MAX_PREFIX_TOKENS,
    Feature,
    Layout,
    ToNCHW,
    feature_of,
    nhwc_to_nchw,
    per_channel,
    to_nchw,
    tokens_to_nchw,
)
from autocut.probe import PROBE_BATCH

B = PROBE_BATCH
IN = (224, 224)


def test_layout_is_a_string_everywhere_a_user_reads_it():
    assert Layout.NHWC == "NHWC" and Layout("NLC") is Layout.NLC
    assert f"{Layout.NCHW}" == str(Layout.NCHW) == "NCHW"
    assert json.dumps({"layout": Layout.NHWC}) == '{"layout": "NHWC"}'
    with pytest.raises(ValueError):
        Layout("CHW")


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((B, 512, 7, 7), Feature(Layout.NCHW, 512, (7, 7))),
        ((B, 7, 7, 768), Feature(Layout.NHWC, 768, (7, 7))),
        ((B, 64, 56, 56), Feature(Layout.NCHW, 64, (56, 56))),
        ((B, 2048, 7, 10), None),  # 7x10 is not the input's aspect
        ((B, 196, 384), Feature(Layout.NLC, 384, (14, 14), 0)),
        ((B, 197, 384), Feature(Layout.NLC, 384, (14, 14), 1)),  # class token
        ((B, 201, 384), Feature(Layout.NLC, 384, (14, 14), 5)),  # class + 4 registers
        ((B, 1, 384), None),  # one token: a pooled vector
        ((B, 512, 1, 1), None),  # pooled: no spatial extent
        ((B, 1000), None),
        ((3, 512, 7, 7), None),  # not the probe batch
        ((B, 1, 7, 7), None),  # one channel: a mask, not features
        ([(B, 512, 7, 7)], None),  # a list of values is not a value
        (None, None),
    ],
)
def test_feature_of_reads_maps_tokens_and_refuses_the_rest(shape, expected):
    assert feature_of(shape, IN) == expected


def test_feature_of_reads_an_ambiguous_shape_by_the_hint_else_as_nchw():
    shape = (B, 7, 7, 7)
    assert feature_of(shape, IN).layout == Layout.NCHW
    assert feature_of(shape, IN, hint=Layout.NHWC) == Feature(Layout.NHWC, 7, (7, 7))
    assert feature_of((B, 7, 7, 7), IN, hint=Layout.NCHW) == Feature(Layout.NCHW, 7, (7, 7))


def test_feature_of_keeps_the_input_aspect_to_within_a_cell():
    assert feature_of((B, 96, 14, 21), (224, 336)) == Feature(Layout.NCHW, 96, (14, 21))
    assert feature_of((B, 96, 14, 22), (224, 336)) == Feature(Layout.NCHW, 96, (14, 22))  # a cell of rounding
    assert feature_of((B, 96, 14, 24), (224, 336)) is None
    assert feature_of((B, 96, 300, 300), (224, 224)) is None  # larger than the input


def test_tokens_lie_on_the_grid_seen_before_them():
    # 8x12 = 96 tokens after 2 prefix tokens: only the earlier map's grid says it is not square
    assert feature_of((B, 98, 64), (128, 192), grids=[(8, 12)]) == Feature(Layout.NLC, 64, (8, 12), 2)
    # more leading tokens than prefix tokens can be: not laid on that grid
    assert feature_of((B, 96 + 40, 64), (128, 192), grids=[(8, 12)]) is None  # (and 136 - p is no square)
    assert feature_of((B, 96 + MAX_PREFIX_TOKENS, 64), (128, 192), grids=[(8, 12)]).prefix_tokens == MAX_PREFIX_TOKENS
    # the nearest grid first
    assert feature_of((B, 17, 8), IN, grids=[(4, 4), (2, 8)]).grid == (4, 4)
    assert feature_of((B, 17, 8), IN, grids=[(2, 8), (4, 4)]).grid == (2, 8)


def test_min_cells_admits_a_one_by_one_map_on_request():
    assert feature_of((B, 512, 1, 1), (32, 32)) is None
    assert feature_of((B, 512, 1, 1), (32, 32), min_cells=1) == Feature(Layout.NCHW, 512, (1, 1))


def test_feature_of_takes_another_batch():
    assert feature_of((3, 512, 7, 7), IN, batch=3) == Feature(Layout.NCHW, 512, (7, 7))
    assert feature_of((B, 512, 7, 7), IN, batch=3) is None


def test_nhwc_to_nchw_is_a_view_in_channels_last_memory():
    x = torch.randn(2, 3, 4, 5)
    y = nhwc_to_nchw(x)
    assert y.shape == (2, 5, 3, 4) and y.data_ptr() == x.data_ptr()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[1, 4, 2, 3], x[1, 2, 3, 4])


def test_tokens_to_nchw_drops_prefix_tokens_and_keeps_positions():
    x = torch.arange(2 * (1 + 6) * 4, dtype=torch.float32).reshape(2, 7, 4)
    y = tokens_to_nchw(x, 1, (2, 3))
    assert y.shape == (2, 4, 2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(y[:, :, i, j], x[:, 1 + i * 3 + j])  # row-major patches after the class token


def test_tokens_to_nchw_rederives_a_square_grid_and_refuses_others():
    assert tokens_to_nchw(torch.zeros(1, 1 + 25, 8), 1, (4, 4)).shape == (1, 8, 5, 5)  # a larger square input
    with pytest.raises(ValueError, match=r"cut for a 2x3 token grid \(6 tokens after 1 prefix tokens\) but got 9 tokens"):
        tokens_to_nchw(torch.zeros(1, 1 + 9, 8), 1, (2, 3))
    with pytest.raises(ValueError, match="got 10 tokens"):
        tokens_to_nchw(torch.zeros(1, 1 + 10, 8), 1, (3, 3))


def test_to_nchw_dispatches_on_the_layout():
    x = torch.randn(2, 3, 4, 5)
    assert to_nchw(x, Layout.NCHW) is x
    assert torch.equal(to_nchw(x, "NHWC"), x.permute(0, 3, 1, 2))
    t = torch.randn(2, 1 + 4, 6)
    assert torch.equal(to_nchw(t, "NLC", 1, (2, 2)), tokens_to_nchw(t, 1, (2, 2)))
    with pytest.raises(ValueError, match="^unknown layout 'CHW': one of NCHW, NHWC, NLC$"):
        to_nchw(x, "CHW")


def test_to_nchw_module_says_what_it_does():
    m = ToNCHW("NLC", 1, [2, 3])
    assert m.layout is Layout.NLC and m.grid == (2, 3) and not list(m.parameters())
    assert repr(m) == "ToNCHW(NLC, prefix_tokens=1, grid=(2, 3))"
    assert repr(ToNCHW(Layout.NHWC)) == "ToNCHW(NHWC)"
    t = torch.randn(2, 7, 6)
    assert torch.equal(m(t), tokens_to_nchw(t, 1, (2, 3)))
    t = torch.randn(2, 4, 6)
    assert torch.equal(ToNCHW("NLC", grid=(2, 2))(t), tokens_to_nchw(t, 0, (2, 2)))  # no prefix tokens by default



def test_token_grids_at_their_edges():
    f = Feature
    # a grid seen before takes tokens that fill it exactly, or with up to MAX_PREFIX_TOKENS ahead
    assert feature_of((B, 32, 8), IN, grids=[(4, 8)]) == f(Layout.NLC, 8, (4, 8), 0)  # not the 5x5 after 7
    assert feature_of((B, 3, 8), IN, grids=[(2, 1)]) == f(Layout.NLC, 8, (2, 1), 1)  # two cells are a grid
    assert feature_of((B, 5, 8), IN, grids=[(1, 1)]) == f(Layout.NLC, 8, (2, 2), 1)  # one cell is not
    # else a square grid behind at most 8 prefix tokens, of at least 2x2
    assert feature_of((B, 4, 8), IN) == f(Layout.NLC, 8, (2, 2), 0)
    assert feature_of((B, 25 + 8, 8), IN) == f(Layout.NLC, 8, (5, 5), 8)
    assert feature_of((B, 25 + 9, 8), IN) is None
    assert feature_of((B, 4 + 3, 8), IN) == f(Layout.NLC, 8, (2, 2), 3)  # more prefix tokens than the grid's side
    assert feature_of((B, 2, 8), IN) is None and feature_of((B, 3, 8), IN) is None  # fewer tokens than prefixes tried


def test_to_nchw_drops_no_token_unless_told():
    t = torch.randn(2, 4, 6)
    assert torch.equal(to_nchw(t, "NLC", grid=(2, 2)), t.transpose(1, 2).reshape(2, 6, 2, 2))


def _varies_along_channels_at_most(shape, map_shape, layout):
    """Broadcasting's answer: a tensor of ``shape`` holding distinct numbers, broadcast against the
    map, is the same along every axis but the map's channels (counted from the right, as
    broadcasting lines axes up)."""
    t = torch.arange(math.prod(shape)).reshape(shape)
    out = t.expand(torch.broadcast_shapes(shape, map_shape))
    channels = 1 - len(map_shape) if layout == Layout.NCHW else -1
    rows = out.movedim(channels, 0).reshape(out.shape[channels], -1)
    return bool((rows == rows[:, :1]).all())


NCHW_MAP, NHWC_MAP, NLC_MAP = (2, 16, 8, 6), (2, 8, 6, 16), (2, 1 + 48, 16)


@pytest.mark.parametrize(
    "shape,map_shape,layout,expected",
    [
        ((), NCHW_MAP, Layout.NCHW, True),  # a number
        ((1,), NCHW_MAP, Layout.NCHW, True),
        ((1, 1, 1, 1, 1), NCHW_MAP, Layout.NCHW, True),  # a number, of more dimensions than the map
        ((1, 16, 1, 1), NCHW_MAP, Layout.NCHW, True),  # a per-channel scale
        ((16, 1, 1), NCHW_MAP, Layout.NCHW, True),  # the same, without the batch dimension
        ((2, 1, 1, 1), NCHW_MAP, Layout.NCHW, False),  # a scale per image (two numbers)
        ((2, 16, 1, 1), NCHW_MAP, Layout.NCHW, False),  # a squeeze-excitation gate: per image
        ((1, 1, 8, 6), NCHW_MAP, Layout.NCHW, False),  # a mask or a position bias: per position
        ((16, 8, 6), NCHW_MAP, Layout.NCHW, False),  # per channel and position
        ((6,), NCHW_MAP, Layout.NCHW, False),  # one number per column
        ((3, 1, 16, 1, 1), NCHW_MAP, Layout.NCHW, False),  # per channel, but a new leading axis too
        ((1, 1, 1, 16), NHWC_MAP, Layout.NHWC, True),
        ((1, 16), NHWC_MAP, Layout.NHWC, True),
        ((1, 1, 1, 1, 1), NHWC_MAP, Layout.NHWC, True),
        ((1, 16, 1, 1), (2, 16, 16, 16), Layout.NHWC, False),  # NCHW's scale lies on NHWC's rows
        ((1, 8, 6, 1), NHWC_MAP, Layout.NHWC, False),
        ((8, 1, 16), NHWC_MAP, Layout.NHWC, False),  # per row and channel
        ((2, 1, 1, 16), NHWC_MAP, Layout.NHWC, False),
        ((1, 1, 16), NLC_MAP, Layout.NLC, True),
        ((1, 1, 1, 1), NLC_MAP, Layout.NLC, True),
        ((49, 1), NLC_MAP, Layout.NLC, False),  # per token
        ((1, 49, 16), NLC_MAP, Layout.NLC, False),  # a position embedding
    ],
)
def test_per_channel_is_what_broadcasting_against_the_map_varies_only_along_channels(shape, map_shape, layout, expected):
    assert _varies_along_channels_at_most(shape, map_shape, layout) is expected  # the oracle agrees with the table
    assert per_channel(shape, map_shape, layout) is expected


@pytest.mark.parametrize("map_shape,layout", [(NCHW_MAP, Layout.NCHW), ((2, 16, 6, 8), Layout.NCHW),
                                              (NHWC_MAP, Layout.NHWC), (NLC_MAP, Layout.NLC)])
def test_a_norms_weight_of_shape_c_is_per_channel_in_every_layout(map_shape, layout):
    # F.batch_norm takes its (C,) weight along NCHW's second axis, though (C,) does not broadcast there
    channels = map_shape[1] if layout == Layout.NCHW else map_shape[-1]
    assert per_channel((channels,), map_shape, layout)
    if layout == Layout.NCHW:
        assert not per_channel((map_shape[2],), map_shape, layout)  # a row's length: not the channels
        assert not per_channel((map_shape[3],), map_shape, layout)
