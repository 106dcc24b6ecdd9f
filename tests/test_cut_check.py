"""The check every found cut passes before it is returned (``autocut.cut_check``): nothing
bypasses the cut, the output reads it, and no map is computed after it outside the head; on the
traced graph and on the eager forward alike."""

import dataclasses

import pytest
import torch
from torch import nn

from autocut.cut import Cut
from autocut.cut_check import check_graph_cut, check_module_cut
from autocut.cut_graph import cut_at_node
from autocut.discover import discover
from autocut.errors import CutError
from autocut.layout import Layout
from autocut.trace import trace

SIZE = (3, 16, 16)
BYPASS = "the output still depends on the input when the value at the cut is held fixed"
UNUSED = "the output does not depend on the value at the cut"
LATER = "feature maps are computed after it outside a pooling head"


def module_cut(where: str, nf: int = 8, grid: tuple[int, int] = (8, 8), size=SIZE) -> Cut:
    return Cut(arch="M", where=where, nf=nf, layout=Layout.NCHW, feature_shape=(nf, *grid), stride=size[1] // grid[0],
               prefix_tokens=0, method="hooks", input_size=size)


def graph_cut(model: nn.Module, node: str) -> Cut:
    return cut_at_node(trace(model, SIZE), node, "M")


def problems(check) -> list[str]:
    return [p.split(" (")[0] for p in check.problems]


class Skip(nn.Module):
    """A skip connection around ``block``: its output alone is no cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.block = nn.Conv2d(8, 8, 3, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        s = self.stem(x)
        return self.fc(self.pool(self.block(s) + s).flatten(1))


class ValueSkip(Skip):
    """Skip, reading a value on the way: its check runs on real zeros, not on meta stand-ins."""

    def forward(self, x):
        s = self.stem(x)
        if s.sum() > -1e30:
            s = s + 0
        return self.fc(self.pool(self.block(s) + s).flatten(1))


@pytest.mark.parametrize("model, devices", [(Skip(), ["meta"]), (ValueSkip(), ["meta", "cpu", "cpu"])])  # (meta, fake, real)
def test_a_module_cut_of_real_weights_is_checked_on_meta_stand_ins_and_where_values_are_read_on_real_zeros(
        model, devices):
    seen = []
    model.stem.register_forward_pre_hook(lambda m, args: seen.append(m.weight.device.type))
    assert problems(check_module_cut(model.eval(), module_cut("block"))) == [BYPASS, LATER]
    assert problems(check_module_cut(model, module_cut("pool:input"))) == []
    assert seen == devices * 2 and all(p.device.type == "cpu" for p in model.parameters())


def test_a_skip_connection_around_the_cut_is_a_bypass():
    model = Skip().eval()
    # the sum after it is a map computed after the cut too
    assert problems(check_module_cut(model, module_cut("block"))) == [BYPASS, LATER]
    assert problems(check_module_cut(model, module_cut("pool:input"))) == []
    traced = trace(model, SIZE)
    assert problems(check_graph_cut(traced, cut_at_node(traced, "block", "M"))) == [BYPASS, LATER]
    assert problems(check_graph_cut(traced, cut_at_node(traced, "add", "M"))) == []


class SecondBranch(nn.Module):
    """The head also reads the image's mean colour: a branch around every map. Data-dependent
    control flow: only the hooks rule applies, and it finds ``pool:input``."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.colour = nn.Linear(3, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        m = self.stage(x)
        if m.sum() > -1e30:
            m = self.pool(m)
        return self.fc(m.flatten(1) + self.colour(x.mean((2, 3))))


def test_a_second_branch_that_bypasses_the_cut_is_refused_with_cut_named():
    with pytest.raises(CutError, match=r"the cut of SecondBranch at 'pool:input' \(found by hooks\) does not hold: "
                                       + BYPASS + r".*Pass cut="):
        discover(SecondBranch().eval(), SIZE)


class Aux(nn.Module):
    """``aux`` makes a map nothing reads."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 3, 2, 1)
        self.aux = nn.Conv2d(3, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        self.aux(x)
        return self.fc(self.stage(x).mean((2, 3)))


def test_a_cut_the_output_never_reads_is_unused_and_bypassed():
    model = Aux().eval()
    assert problems(check_module_cut(model, module_cut("aux"))) == [BYPASS, UNUSED]
    assert problems(check_graph_cut(trace(model, SIZE), graph_cut(model, "aux"))) == [BYPASS, UNUSED]
    assert problems(check_module_cut(model, module_cut("stage"))) == []


class Encoded(nn.Module):
    """A stem, then an encoder that hides its maps in a dict: a cut at the stem misses them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.encoder = nn.ModuleDict({"stage1": nn.Conv2d(8, 12, 3, 2, 1), "stage2": nn.Conv2d(12, 16, 3, 1, 1)})
        self.fc = nn.Linear(16, 2)

    def encode(self, h):
        early = self.encoder["stage1"](h)
        return {"last_hidden_state": self.encoder["stage2"](early), "hidden_states": (early,)}

    def forward(self, x):
        return self.fc(self.encode(self.stem(x))["last_hidden_state"].mean((2, 3)))


def test_a_cut_before_maps_hidden_in_a_dict_names_where_they_are_made():
    model = Encoded().eval()
    check = check_module_cut(model, module_cut("stem"))
    assert problems(check) == [LATER]
    assert [(where, op, shape[1:]) for where, op, shape in check.later_maps] == [
        ("encoder.stage1", "aten.convolution", (12, 4, 4)), ("encoder.stage2", "aten.convolution", (16, 4, 4))]
    with pytest.raises(CutError, match=r"feature maps are computed after it outside a pooling head \(2: .* The feature "
                                       r"maps it misses are made in 'encoder.stage1', 'encoder.stage2'. Pass cut="):
        check.raise_for(module_cut("stem"))
    at_stem = graph_cut(model, "stem")
    # on the graph, modules the body drops are the head's (the graph rule's own choice): a rule
    # that dropped nothing after the stem would have the same maps named
    assert problems(check_graph_cut(trace(model, SIZE), at_stem)) == []
    graph = check_graph_cut(trace(model, SIZE), dataclasses.replace(at_stem, dropped=()))
    assert problems(graph) == [LATER] and [w for w, _, _ in graph.later_maps] == ["encoder.stage1", "encoder.stage2"]
    assert problems(check_module_cut(model, module_cut("encoder.stage2", nf=16, grid=(4, 4)))) == []


class Windows(nn.Module):
    """After ``stage``, ``windowed`` mixes windows of tokens (no map: the batch holds the windows)
    and puts them back on the grid: a map computed after the stage. ``relaid`` only re-lays it."""

    def __init__(self, windowed: bool):
        super().__init__()
        self.windowed = windowed
        self.stage = nn.Conv2d(3, 8, 4, 4)  # (B, 8, 4, 4)
        self.mix = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        m = self.stage(x)
        b = m.shape[0]
        tokens = m.flatten(2).transpose(1, 2)  # (B, 16, 8): the map, re-laid
        if self.windowed:
            windows = self.mix(tokens.reshape(b * 4, 4, 8))
            tokens = windows.reshape(b, 16, 8)  # back on the grid
        return self.fc(tokens.transpose(1, 2).reshape(b, 8, 4, 4).mean((2, 3)))


@pytest.mark.parametrize("windowed", [False, True])
def test_re_laying_the_cut_is_no_new_map_but_windows_put_back_on_the_grid_are(windowed):
    model = Windows(windowed).eval()
    want = [LATER] if windowed else []
    assert problems(check_module_cut(model, module_cut("stage", grid=(4, 4)))) == want
    assert problems(check_graph_cut(trace(model, SIZE), graph_cut(model, "stage"))) == want


class AttentionPool(nn.Module):
    """A head that attends over the map's tokens: keys and values are token maps, inside it."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, 8))
        self.kv = nn.Linear(8, 16)

    def forward(self, m):
        k, v = self.kv(m.flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        attn = (self.query @ k.transpose(1, 2)).softmax(-1)
        return (attn @ v).squeeze(1)


class Attended(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 4, 4)
        self.head = AttentionPool()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.head(self.stage(x)))


def test_maps_computed_inside_a_pooling_head_are_the_heads_business():
    model = Attended().eval()
    assert problems(check_module_cut(model, module_cut("head:input", grid=(4, 4)))) == []
    assert problems(check_graph_cut(trace(model, SIZE), graph_cut(model, "stage"))) == []


class Score(nn.Module):
    """A score map, from the map: no parameters."""

    def forward(self, m):
        return m * m.mean(1, keepdim=True)


class WeightedSum(nn.Module):
    """Each position's features weighted by the softmax of their sum: a map in, a vector out."""

    def forward(self, s):
        return (s.flatten(2) * s.sum(1, keepdim=True).flatten(2).softmax(-1)).sum(-1)


class SoftPool(nn.Module):
    """A pooling head with no parameters (so no cut drops it), all its work done by modules of
    its own: a score map (computed after the cut, inside the head), then a weighted sum."""

    def __init__(self):
        super().__init__()
        self.score, self.pool = Score(), WeightedSum()

    def forward(self, m):
        return self.pool(self.score(m))


class SoftPooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 4, 4)
        self.head = SoftPool()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.head(self.stage(x)))


def test_a_pooling_head_with_no_parameters_is_known_by_taking_a_map_and_returning_none():
    model = SoftPooled().eval()
    traced = trace(model, SIZE)
    cut = graph_cut(model, "stage")
    assert cut.dropped == ("fc",)  # nothing excuses the score map but the head it is made in
    assert problems(check_graph_cut(traced, cut)) == []
    assert discover(model, input_size=SIZE).where == "stage"
    # the score module alone takes a map and returns one: no head; the weighted sum is one
    from autocut.cut_check import _scope_is_head

    assert [_scope_is_head(traced, s, cut) for s in ("head", "head.score", "head.pool", "fc")] == [True, False, True, False]
    assert not _scope_is_head(traced, "unused", cut)  # a module the forward never runs takes no map: no head


class _Copy(nn.Module):
    def forward(self, m):
        return m.clone()


class _ReluHead(nn.Module):
    """A head whose first op is a ReLU on the map it takes, in one of three ways, before pooling."""

    def __init__(self, relu: str, nf: int = 8):
        super().__init__()
        self.relu = relu
        self.act = nn.Sequential(nn.ReLU())  # a ReLU module inside a container: both return the map
        self.idt = nn.Identity()  # returns what it takes: it makes nothing
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(nf, 2)

    def forward(self, m):
        if self.relu == "module":
            m = self.act(m)
        elif self.relu == "functional, then an identity":
            m = self.idt(torch.relu(m))
        else:
            m = torch.relu(m)
        return self.fc(self.pool(m).flatten(1))


class _Headed(nn.Module):
    def __init__(self, head: nn.Module, stage: bool = True):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 3, 2, 1) if stage else nn.Identity()
        self.head = head

    def forward(self, x):
        return self.head(self.stage(x))


class _CopyThenConv(nn.Module):
    """A copy of the map (no new map: re-laid), then a conv outside any head: a real later map."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 3, 2, 1)
        self.copy = _Copy()
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(self.conv(self.copy(self.stage(x)))).flatten(1))


@pytest.mark.parametrize("model, cut, move_to", [
    # the innermost module that returned the ReLU's map: the ReLU, not its container
    (_Headed(_ReluHead("module")), module_cut("head:input"), "head.act.0"),
    # a functional ReLU: the first module to take its map, though the pool takes the same tensor
    # (an identity returns what it took: it made nothing, so the cut is at its input, not output)
    (_Headed(_ReluHead("functional, then an identity")), module_cut("head:input"), "head.idt:input"),
    # a model that is all head: the ReLU on the image is the forward's very first op
    (_Headed(_ReluHead("functional", nf=3), stage=False), module_cut("head:input", nf=3, grid=(16, 16)), "head.pool:input"),
], ids=["relu-module", "functional-relu", "first-op"])
def test_a_cut_before_per_channel_ops_in_the_head_moves_to_the_module_call_that_ends_them(model, cut, move_to):
    check = check_module_cut(model.eval(), cut)
    assert problems(check) == [LATER]
    assert (check.move_to, check.unreachable) == (move_to, None)


def test_a_copy_of_the_map_is_no_per_channel_op_to_move_past_when_a_conv_follows():
    # moving the cut to the copy's output would leave the conv's map after it: no move is offered
    check = check_module_cut(_CopyThenConv().eval(), module_cut("stage"))
    assert problems(check) == [LATER] and [(w, op) for w, op, _ in check.later_maps] == [("conv", "aten.convolution")]
    assert (check.move_to, check.unreachable) == (None, None)


class _ScaleHead(nn.Module):
    """A head that scales the map it takes by a parameter of ``shape`` (an identity then takes the
    result: a module call to move the cut to), then pools."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(shape) + 0.5)
        self.idt = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, m):
        return self.fc(self.pool(self.idt(m * self.gamma)).flatten(1))


@pytest.mark.parametrize("shape, per_channel", [
    ((1, 8, 1, 1), True), ((8, 1, 1), True),  # a scale per channel of the 8 x 8 x 8 map: the body keeps it
    ((1, 8, 8, 8), False), ((1, 1, 8, 8), False),  # a scale per position: the head's own, as a mask is
])
def test_a_scale_per_channel_in_the_head_moves_the_cut_past_it_and_a_scale_per_position_does_not(shape, per_channel):
    check = check_module_cut(_Headed(_ScaleHead(shape)).eval(), module_cut("head:input"))
    if per_channel:
        assert problems(check) == [LATER] and [(w, op) for w, op, _ in check.later_maps] == [("head", "aten.mul")]
        assert (check.move_to, check.unreachable) == ("head.idt:input", None)
    else:
        assert problems(check) == [] and check.move_to is None


class _TokenWritten(nn.Module):
    """Writes a learned token into the first two channels of the map in place (a slice, then a
    copy into it) before pooling: constants put into the map make no new map of the input."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Conv2d(3, 8, 3, 2, 1)
        self.token = nn.Parameter(torch.zeros(1, 2, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        m = self.stage(x)
        m[:, :2] = self.token
        return self.fc(self.pool(m).flatten(1))


def test_a_parameter_written_into_the_map_in_place_is_no_later_map():
    check = check_module_cut(_TokenWritten().eval(), module_cut("stage"))
    assert (problems(check), check.later_maps, check.move_to) == ([], [], None)
