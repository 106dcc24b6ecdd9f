"""The ``Cut`` record (``autocut.cut``): what a user reads when they ask where their model was cut,
the stride, and which modules a body leaves out."""

import dataclasses
import json

import pytest
from torch import nn

from autocut.cut import Cut, dropped_modules, stride_of
from autocut.layout import Layout

CUT = Cut(arch="resnet18", where="layer4.1.act2", nf=512, layout=Layout.NCHW, feature_shape=(512, 7, 7), stride=32,
          prefix_tokens=0, method="fx", input_size=(3, 224, 224), dropped=("fc",), after="layer4")


def test_a_cut_prints_where_what_and_what_was_dropped():
    assert str(CUT) == (
        "Cut of resnet18 at 'layer4.1.act2', the end of 'layer4' (found by fx)\n"
        "  features   512 channels, 7x7 (stride 32) for input (3, 224, 224)\n"
        "  layout     NCHW\n"
        "  dropped    fc"
    )
    vit = dataclasses.replace(CUT, where="norm", after="norm", layout="NLC", prefix_tokens=1, stride=(16, 12.5),
                              feature_shape=(512, 7, 9), dropped=(),
                              groups=(("(embeddings)", "blocks.5", 1000), ("head", "head", 10)))
    assert str(vit).splitlines()[0] == "Cut of resnet18 at 'norm' (found by fx)"
    assert str(vit).splitlines()[1:] == [
        "  features   512 channels, 7x9 (stride 16x12.5) for input (3, 224, 224)",
        "  layout     NLC, 1 prefix tokens dropped -> body returns NCHW",
        "  dropped    (nothing with parameters)",
        "  group 0    (embeddings) .. blocks.5 (1,000 parameters)",
        "  group 1    head (10 parameters)",
    ]


def test_a_cut_lists_every_dropped_module_and_whole_strides_in_full():
    text = str(dataclasses.replace(CUT, dropped=("head.fc", "head.norm"), stride=1024))
    assert "  dropped    head.fc, head.norm" in text.splitlines() and "(stride 1024)" in text


def test_a_cut_read_back_from_json_is_the_same_cut():
    record = json.loads(json.dumps(dataclasses.asdict(CUT)))
    assert record["layout"] == "NCHW"
    back = Cut(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
    assert back == CUT and back.layout is Layout.NCHW and back.grid == (7, 7)
    with pytest.raises(ValueError):
        dataclasses.replace(CUT, layout="HWC")


def test_stride_is_one_number_where_both_axes_agree():
    assert stride_of((3, 224, 224), (7, 7)) == 32 and isinstance(stride_of((3, 224, 224), (7, 7)), int)
    assert stride_of((3, 224, 320), (14, 20)) == 16
    assert stride_of((3, 224, 320), (14, 14)) == (16, 22.857)
    assert stride_of((3, 100, 100), (3, 3)) == 33.333


class Shared(nn.Module):
    """A backbone, a head, a module reached under two names, and bare parameters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.stage = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
        self.alias = self.stem
        self.token = nn.Parameter(nn.init.zeros_(nn.Parameter(nn.Linear(1, 4).weight.detach().clone())))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        self.norm = nn.LayerNorm(4)  # no parameters used by the body below


def test_dropped_modules_are_the_outermost_unused_ones():
    model = Shared()
    assert dropped_modules(model, {"stem", "stage"}) == ("head", "norm", "token")
    assert dropped_modules(model, {"alias", "stage.0"}) == ("stage.1", "head", "norm", "token")  # stem is alias
    assert dropped_modules(model, {"stem", "stage", "token", "head.1", "norm"}) == ()
    assert dropped_modules(model, {"stem", "stage", "nowhere"}) == ("head", "norm", "token")
