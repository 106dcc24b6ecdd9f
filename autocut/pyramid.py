"""Feature pyramids: a :class:`~autocut.cut.Cut` per stride of any backbone, from its graph.

timm's ``feature_info``, torchvision's ``return_nodes`` and Hugging Face's backbones each say by
hand where every stride ends. The rule they encode is that each tap point is the latest point for
its stride; on the eval graph the cut was found on (:mod:`autocut.cut_graph`) it reads:

1. The maps on the path every input-to-output path goes through (the dominator chain), up to the
   cut, each at its stride.
2. Where the stride changes (the first map at a coarser stride), the outermost module that makes
   that change and no other (a stage, a downsampling block, a pooling layer) is where the finer
   stride ends: the map that module takes is the level (a ResNet's ``layer1`` output, an
   EfficientNet's ``blocks.0`` output rather than the expansion inside ``blocks.1.0``); where that
   module runs whole blocks before the part that changes the stride (Hugging Face's Swin stage:
   its blocks, then its downsampling), the map that part takes. Where no module makes the change
   alone (the model's own forward pools), the last map before it.
3. Where the path skips strides that parallel branches hold (HRNet runs a branch per stride and
   joins them in its head; a NASNet cell reads the two cells before it, so no map between its stem
   and its last cell is on every path), each such stride's level is where its branches meet: of
   the adds and concats of maps at that stride, the one most of the stride's maps flow into.
   Branches that only meet after pooling (crossvit) leave no cut, and no pyramid.
4. The deepest level is the cut. Strides strictly increase: a map at a finer stride than a later
   level (an upsampling branch) is no level.
5. A model at one stride throughout (ViT, DeiT, EVA, MLP-Mixer) gets levels at evenly spaced
   depths: the outputs of its repeated blocks, as timm's ``forward_intermediates`` indices pick
   them, the last one the cut.

:func:`discover_pyramid` returns the levels; :func:`create_pyramid` builds a module returning each
as an NCHW map. A model fx cannot trace (Hugging Face's) has its levels found on its graph of
ATen ops (:func:`~autocut.trace.trace_aten`), each named by the module that returns or takes it,
and kept by module hooks as its own forward runs (:class:`~autocut.cut_hooks.EarlyExitBody`); one only hooks can cut
(its forward reads values) gets rule 5 from its module calls where it runs at one stride
(:func:`~autocut.cut_hooks.levels_by_hooks`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import fx, nn

from autocut import _validate, zoo
from autocut.adapt import _check_n_in, _resolve, load_weights
from autocut.body import _fx_body
from autocut.channels import set_input_channels
from autocut.cut import Cut, format_stride, stride_of
from autocut.cut_export import module_cut
from autocut.cut_graph import (
    _dominator_chain,
    _features_on_chain,
    cut_at_node,
    find_cut,
    layout_hint,
    modules_ending,
    nodes_in,
    scopes_of,
)
from autocut.cut_hooks import EarlyExitBody, levels_by_hooks, probe_modules
from autocut.discover import discover_with_trace, discovery_target
from autocut.errors import CutError, first_line
from autocut.freeze import record_norms
from autocut.layers import Resample
from autocut.layout import Feature, Layout, feature_of
from autocut.probe import modes_kept
from autocut.trace import Traced, trace, trace_aten

__all__ = ["discover_pyramid", "create_pyramid", "pyramid_nodes", "Pyramid", "SIMPLE_PYRAMID_STRIDES"]

SIMPLE_PYRAMID_STRIDES = (4, 8, 16, 32)  # ViTDet's simple feature pyramid


def pyramid_nodes(traced: Traced, cut_node: fx.Node, depth_levels: int = 4) -> list[fx.Node]:
    """The nodes of the levels (see the module docstring), shallow to deep, the last ``cut_node``.

    Args:
        traced: the model's eval graph (:func:`autocut.trace.trace`).
        cut_node: the cut's node in it.
        depth_levels: how many levels a model at one stride gets.
    """
    chain, live = _dominator_chain(traced)
    features = _features_on_chain(traced, chain)
    order = list(features)
    if cut_node not in features:
        raise CutError(f"{traced.qualname.get(cut_node, cut_node.name)!r} is not a map on the path every input goes through")
    stride_group = _stride_groups([features[n] for n in order[: order.index(cut_node) + 1]])
    group = {n: g for n, g in zip(order, stride_group) if g is not None}
    maps = list(group)
    ends: list[fx.Node] = []
    for prev, node in zip(maps, maps[1:]):
        if group[node] != group[prev]:
            ends.append(_level_before(traced, chain, group, node) or prev)
            ends.extend(_branch_levels(traced, live, features, prev, node))
    levels = list(dict.fromkeys([*ends, cut_node]))
    if len(levels) == 1:
        return _evenly_spaced(traced, maps, cut_node, depth_levels)
    return levels


def _stride_groups(features: list[Feature]) -> list[int | None]:
    """For each map in order, the index of its stride: a new one where the grid has at most half
    the cells of the stride's first map (a valid-padded conv trims a few rows, it does not change
    the stride); ``None`` for a map on a finer grid than the stride reached (an attention's
    ``(B, heads, L, L)`` read as a map), which is no level."""
    out: list[int | None] = []
    ref, index = None, -1
    for feat in features:
        cells = feat.grid[0] * feat.grid[1]
        if ref is None or 2 * cells <= ref:
            ref, index = cells, index + 1
        out.append(index if cells < 2 * ref else None)
    return out


def _level_before(traced: Traced, chain: list[fx.Node], group: dict[fx.Node, int], coarser: fx.Node) -> fx.Node | None:
    """The map taken by the outermost module that changes the stride to ``coarser``'s and changes
    it only once; ``None`` where no module does (or it takes the image)."""
    position = {n: i for i, n in enumerate(chain)}
    to = group[coarser]
    scopes = scopes_of(traced, coarser)
    for depth, scope in enumerate(scopes):
        inside = nodes_in(traced, scope, chain)
        first = min(position[n] for n in inside)
        if first == 0:
            continue
        before = chain[first - 1]
        strides = {group[n] for n in inside if n in group}
        if before in group and group[before] == to - 1 and strides <= {to - 1, to}:
            return _blocks_first(traced, chain, position, group, scopes[depth + 1: depth + 2], first) or before
    return None


def _blocks_first(traced: Traced, chain: list[fx.Node], position: dict[fx.Node, int], group: dict[fx.Node, int],
                  child: list[str], first: int) -> fx.Node | None:
    """Where the module that changes the stride runs whole blocks at the finer stride before the
    child that changes it (Hugging Face's Swin stage: its blocks, then its downsampling; two convs
    and a pool), the map that child takes; ``None`` where what runs before it is one layer (a
    DenseNet transition's conv before its pool, an inverted residual's expansion before its
    strided depthwise conv) or nothing (a ResNet stage's first block)."""
    if not child:
        return None
    starts = min(position[n] for n in nodes_in(traced, child[0], chain))
    depth = child[0].count(".")  # the children of the module that changes the stride are this deep
    earlier = {scopes[depth] for n in chain[first:starts] if len(scopes := scopes_of(traced, n)) > depth}
    model = traced.model
    if sum(_weight_layers(model.get_submodule(path)) for path in earlier) < 2:
        return None
    taken = chain[starts - 1]
    return taken if group.get(taken) == group.get(chain[first - 1]) else None


def _weight_layers(module: nn.Module) -> int:
    """The layers with weights of their own in ``module``, norms aside: what runs before a block's
    strided conv (an expansion conv and its norm: one) is not whole blocks (a Swin stage: many)."""
    return sum(1 for m in module.modules() if next(m.parameters(recurse=False), None) is not None
               and "Norm" not in type(m).__name__)


def _branch_levels(traced: Traced, live: set[fx.Node], features: dict[fx.Node, Feature], prev: fx.Node,
                   coarser: fx.Node) -> list[fx.Node]:
    """The levels at the strides the path skips from ``prev`` to ``coarser`` that parallel
    branches between them hold (HRNet keeps a branch per stride and joins them in its head; a
    NASNet cell reads the two cells before it): for each such stride, shallow to deep, the map
    where that stride's branches meet: of the adds and concats of maps at that stride, the one
    most of the stride's maps flow into (the last of equals); with none, the last map there."""
    in_hw = traced.input_shape[2:]
    nodes = list(traced.graph.nodes)
    start, stop = nodes.index(prev), nodes.index(coarser)
    low, high = _octave(in_hw, features[prev].grid), _octave(in_hw, features[coarser].grid)
    if low is None or high is None or high - low < 2:
        return []
    known = [f.grid for n, f in features.items() if f.layout != Layout.NLC and nodes.index(n) <= start][::-1]
    octave_of: dict[fx.Node, int] = {}  # the maps at a stride strictly between prev's and coarser's
    flows_in: dict[fx.Node, int] = {}  # a bit per such map that a node is computed from
    for node in nodes[start + 1:stop]:
        if node not in live or node in features:
            continue
        feat = feature_of(traced.shapes.get(node), in_hw, known, hint=layout_hint(traced, node))
        octave = _octave(in_hw, feat.grid) if feat is not None else None
        bits = 0
        for a in node.all_input_nodes:
            bits |= flows_in.get(a, 0)
        if octave is not None and low < octave < high:
            octave_of[node] = octave
            bits |= 1 << len(octave_of)
        flows_in[node] = bits
    levels = []
    for octave in sorted(set(octave_of.values())):
        there = [n for n, o in octave_of.items() if o == octave]
        mask = sum(1 << (i + 1) for i, o in enumerate(octave_of.values()) if o == octave)
        merges = [n for n in there if sum(octave_of.get(a) == octave for a in set(n.all_input_nodes)) >= 2]
        candidates = merges or there
        levels.append(max(reversed(candidates), key=lambda n: (flows_in[n] & mask).bit_count()))
    return levels


def _octave(in_hw: tuple[int, int], grid: tuple[int, int]) -> int | None:
    """``log2`` of a map's stride, rounded, where both axes round to the same; else ``None``."""
    sh, sw = (round(math.log2(size / max(cells, 1))) for size, cells in zip(in_hw, grid))
    return sh if sh == sw else None


def _evenly_spaced(traced: Traced, maps: list[fx.Node], cut_node: fx.Node, n: int) -> list[fx.Node]:
    """``n`` levels of a model at one stride: the outputs of its most repeated blocks (the children
    of one module that end on the path: ``blocks.0`` .. ``blocks.11``) at evenly spaced depths, the
    last the cut; the cut alone where the model repeats no block."""
    ends = modules_ending(traced)
    block_end: dict[str, dict[str, fx.Node]] = {}  # parent path -> child path -> the map the child ends at
    for node in maps:
        for path in ends.get(node, ()):
            parent, _, child = path.rpartition(".")
            block_end.setdefault(parent, {})[child] = node
    blocks = max(block_end.values(), key=len, default={})
    if len(blocks) < 2:
        return [cut_node]
    nodes = list(blocks.values())
    n = min(n, len(nodes))
    picked = [nodes[round((k + 1) * len(nodes) / n) - 1] for k in range(n)]
    picked[-1] = cut_node
    return list(dict.fromkeys(picked))


# --- the public API ---------------------------------------------------------------------------


def _traced_levels(
    module: nn.Module, size: tuple[int, int, int], arch: str, rebuild, try_larger: bool, depth_levels: int
) -> tuple[list[Cut], Traced]:
    """The levels of ``module`` and the eval graph they are nodes of."""
    cut, traced = discover_with_trace(module, size, arch=arch, rebuild=rebuild, try_larger=try_larger)
    if cut.method == "export":
        return _exported_levels(module, cut, rebuild, depth_levels), None
    if cut.method == "hooks":
        return _hooked_levels(module, cut, rebuild, depth_levels), None
    if traced is None:
        traced = trace(rebuild(), cut.input_size)  # the cut came from a real copy: its graph
    return _level_cuts(traced, cut, depth_levels), traced


def _hooked_levels(module: nn.Module, cut: Cut, rebuild, depth_levels: int) -> list[Cut]:
    """The levels of a model only module hooks can cut (no graph: a forward that reads values),
    from its module calls: :func:`autocut.cut_hooks.levels_by_hooks` (a model at one stride)."""
    try:
        calls = probe_modules(module, cut.input_size)
    except Exception:  # the meta model's forward reads values: the real copy's calls
        if rebuild is None:
            raise
        calls = probe_modules(rebuild(), cut.input_size)
    return levels_by_hooks(module, calls, cut, depth_levels)


def _exported_levels(module: nn.Module, cut: Cut, rebuild, depth_levels: int) -> list[Cut]:
    """The levels of a model cut on its ATen graph (one fx cannot trace: Hugging Face's
    forwards): the rule on that graph, each level named, as the cut is, by the module that returns
    it or takes it (:func:`autocut.cut_export.module_cut`), which the body's hooks keep."""
    errors = []
    for candidate in (module, rebuild) if rebuild is not None else (module,):
        try:
            model = candidate if isinstance(candidate, nn.Module) else candidate()
            exported = trace_aten(model, cut.input_size)
            calls = probe_modules(model, cut.input_size)
        except Exception as err:  # the meta model does not export or run: the real copy, next
            errors.append(f"{type(err).__name__}: {first_line(err)[:200]}")
            continue
        found = find_cut(exported, cut.arch)
        nodes = pyramid_nodes(exported, exported.node_named(found.where), depth_levels)
        levels = []
        for node in nodes[:-1]:
            level = cut_at_node(exported, exported.qualname[node], cut.arch, method="export")
            try:
                levels.append(module_cut(model, exported, level, calls))
            except CutError as err:
                raise CutError(f"{cut.arch}'s level at stride {format_stride(level.stride)} ({level.where!r} in its "
                               f"exported graph) cannot be kept by a module hook: {err}") from None
        return [*levels, cut]
    raise CutError(f"{cut.arch} was cut on its exported graph, which could not be made again: {'; '.join(errors)}")


def _level_cuts(traced: Traced, cut: Cut, depth_levels: int) -> list[Cut]:
    """The levels, the last ``cut``. Where ``traced``'s input is smaller than the model's own size
    on a side, the levels are found at the larger size and each one's stride is read there
    (``stride_size``), as :func:`autocut.discover` reads the cut's: a small input shrinks the deep
    maps to 1x1 (resnet18 at 16 px: ``layer3`` and ``layer4`` both 1x1), which are then no maps
    and say nothing of their stride."""
    own = zoo.default_input_size(traced.model)
    hw = tuple(max(o, s) for o, s in zip(own[1:], traced.input_shape[2:]))
    if hw != tuple(traced.input_shape[2:]):
        try:
            big = trace(traced.model, (traced.input_shape[1], *hw))
            node = big.node_named(cut.where)
        except Exception:  # any failure at the larger size (it runs at the size given only): read there
            node = None
        if node is not None:
            nodes = pyramid_nodes(big, node, depth_levels)
            levels = [cut_at_node(traced, big.qualname[n], cut.arch, method=cut.method) for n in nodes[:-1]] + [cut]
            return [dataclasses.replace(level, stride=cut_at_node(big, level.where, cut.arch).stride, stride_size=hw)
                    for level in levels]
    nodes = pyramid_nodes(traced, traced.node_named(cut.where), depth_levels)
    return [cut_at_node(traced, traced.qualname[n], cut.arch, method=cut.method) for n in nodes[:-1]] + [cut]


def _depth_levels(value) -> int:
    n = _validate.positive_int("depth_levels", value)
    if n < 2:
        raise CutError(f"depth_levels must be at least 2 (the levels of a model at one stride), got {value!r}")
    return n


def discover_pyramid(model: str | nn.Module, input_size: tuple[int, int, int] | None = None, *,
                     depth_levels: int = 4) -> list[Cut]:
    """A :class:`Cut` per stride level of ``model``, shallow to deep: the last map at each stride
    on the path every input goes through (see the module docstring); the deepest is the model's
    cut (:func:`autocut.discover`).

    Args:
        model: a zoo name (built on the meta device: no weights are allocated) or an ``nn.Module``.
        input_size: as in :func:`autocut.discover`.
        depth_levels: the number of levels a model at one stride throughout (a ViT) gets, at
            evenly spaced depths.

    Returns:
        The levels, each with ``where``, ``nf``, ``stride``, ``layout``, ``feature_shape`` and
        ``prefix_tokens``; strides strictly increase, except for a model at one stride.

    Raises:
        CutError: the model has no cut (its branches only meet after pooling: crossvit), or
            only module hooks can cut it and it has several strides (only a graph tells them from
            branches), or a level of its exported graph is made between module calls, where no
            hook can keep it.

    Example:
        >>> [(level.where, level.nf, level.stride) for level in discover_pyramid("resnet18")][:3]
        [('act1', 64, 2), ('layer1.1.act2', 64, 4), ('layer2.1.act2', 128, 8)]
    """
    depth_levels = _depth_levels(depth_levels)
    target = discovery_target(model, input_size)
    return _traced_levels(target.module, target.input_size, target.arch, target.rebuild, target.try_larger,
                          depth_levels)[0]


class Pyramid(nn.Module):
    """A backbone's maps at several strides: ``forward`` returns a list of NCHW tensors, shallow to
    deep, one per level (``.levels``, each a :class:`Cut`).

    Attributes:
        body: the backbone up to the deepest level, returning the list (a graph body that shares
            the model's modules and keeps their names).
        levels: the :class:`Cut` of each map returned; with a simple pyramid, each at the stride
            it is resampled to.
        resample: for a simple pyramid, the :class:`~autocut.layers.Resample` of each level; else ``None``.
    """

    def __init__(self, body: nn.Module, levels: list[Cut], resample: nn.ModuleList | None = None):
        super().__init__()
        self.body = body
        self.levels = tuple(levels)
        self.resample = resample

    @property
    def strides(self) -> list[float | tuple[float, float]]:
        return [level.stride for level in self.levels]

    @property
    def channels(self) -> list[int]:
        return [level.nf for level in self.levels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body(x)
        if self.resample is not None:
            maps = [resample(m) for resample, m in zip(self.resample, maps)]
        return list(maps)


def _stride_matches(stride: float | tuple[float, float], wanted: float) -> bool:
    """Whether a level's stride is ``wanted`` up to what valid padding trims (inception's 2.03 is 2)."""
    axes = stride if isinstance(stride, tuple) else (stride,)
    return all(abs(s - wanted) <= 0.15 * wanted for s in axes)


def _shown_strides(levels: list[Cut]) -> str:
    return ", ".join(dict.fromkeys(format_stride(level.stride) for level in levels))


def _chosen(levels: list[Cut], strides, arch: str) -> list[Cut]:
    if strides is None:
        return levels
    if isinstance(strides, (str, bytes)) or not hasattr(strides, "__iter__"):
        raise CutError(f"strides must be a list of numbers such as [8, 16, 32], got {strides!r}")
    wanted = [_validate.number(f"strides[{i}]", s, "(0, inf)", example=16) for i, s in enumerate(strides)]
    missing = [s for s in wanted if not any(_stride_matches(level.stride, s) for level in levels)]
    if missing:
        raise CutError(f"{arch} has no level at stride {', '.join(f'{s:g}' for s in missing)}: its levels are at strides "
                       f"{_shown_strides(levels)} ({', '.join(repr(level.where) for level in levels)})")
    return [level for level in levels if any(_stride_matches(level.stride, s) for s in wanted)]


def _simple(levels: list[Cut], arch: str) -> tuple[list[Cut], nn.ModuleList]:
    """Each level of a model at one stride resampled to the next of :data:`SIMPLE_PYRAMID_STRIDES`."""
    native = {level.stride for level in levels}
    if len(native) != 1 or len(levels) != len(SIMPLE_PYRAMID_STRIDES):
        raise CutError(
            f"simple_pyramid=True resamples the {len(SIMPLE_PYRAMID_STRIDES)} levels of a model at one stride (a ViT) to "
            f"strides {', '.join(map(str, SIMPLE_PYRAMID_STRIDES))}; {arch} has {len(levels)} levels at strides "
            f"{_shown_strides(levels)}: leave simple_pyramid off"
            + (f" (or pass depth_levels={len(SIMPLE_PYRAMID_STRIDES)})" if len(native) == 1 else ""))
    stride = next(iter(native))
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    out, resample = [], []
    for level, target in zip(levels, SIMPLE_PYRAMID_STRIDES):
        module = Resample(((sh + sw) / 2) / target)
        grid = tuple(max(1, round(g * module.factor)) for g in level.grid) if module.factor != 1 else level.grid
        out.append(dataclasses.replace(level, stride=stride_of(level.input_size, grid), feature_shape=(level.nf, *grid)))
        resample.append(module)
    return out, nn.ModuleList(resample)


def create_pyramid(
    model: str | nn.Module,
    strides=None,
    input_size: tuple[int, int, int] | None = None,
    *,
    n_in: int | None = None,
    n_in_init: str | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    simple_pyramid: bool = False,
    depth_levels: int = 4,
) -> Pyramid:
    """The backbone's maps at each stride level (:func:`discover_pyramid`), as one module.

    Args:
        model: a zoo name (built with random weights on the CPU, or the zoo's own weights with
            ``pretrained``) or an ``nn.Module`` (its modules are shared, as :func:`create_body`'s).
        strides: the strides to return (``[8, 16, 32]``); default every level. The pyramid stops
            computing after the deepest one chosen.
        input_size, n_in, n_in_init: as in :func:`autocut.create_body`.
        pretrained, weights: the zoo's pretrained weights, or a local checkpoint of the original
            model loaded into the pyramid's body, as in :func:`autocut.adapt` (before ``n_in``
            rebuilds the input layer, so RGB checkpoints fit).
        simple_pyramid: for a model at one stride (a ViT): resample its levels to strides
            4, 8, 16 and 32 (ViTDet's simple feature pyramid, parameter-free here: upsampling is
            bilinear, downsampling max pooling).
        depth_levels: the number of levels a model at one stride gets (evenly spaced depths).

    Returns:
        A :class:`Pyramid`: ``pyramid(x)`` is a list of ``(B, nf, h, w)`` maps (NHWC maps permuted,
        tokens laid on their grid without prefix tokens), shallow to deep; ``.levels`` holds their
        :class:`Cut`\\ s. In the model's mode (a named model is built in eval mode).

    Raises:
        CutError: a stride the model has no level at (the message lists the ones there); a
            checkpoint that does not fit the body, or ``weights`` with ``pretrained``;
            ``simple_pyramid`` on a model with several strides; what :func:`discover_pyramid` raises.

    Example:
        >>> pyramid = create_pyramid("resnet18", strides=[8, 16, 32])
        >>> [tuple(m.shape) for m in pyramid(torch.randn(2, 3, 64, 64))]
        [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    """
    depth_levels = _depth_levels(depth_levels)
    n_in = _check_n_in(n_in, n_in_init)
    _validate.input_size(input_size, None)
    if pretrained and weights is not None:
        raise CutError("pass pretrained=True or weights=PATH, not both")
    resolved = _resolve(model, input_size, pretrained=pretrained)
    with modes_kept(resolved.module):
        levels, traced = _traced_levels(resolved.module, resolved.input_size, resolved.arch, None, resolved.guessed,
                                        depth_levels)
        levels = _chosen(levels, strides, resolved.arch)
        if levels[-1].method in ("export", "hooks"):  # the model's own forward, each level kept by a hook
            body = EarlyExitBody(resolved.module, levels)
        else:
            body = _fx_body(resolved.module, levels, traced if traced.model is resolved.module else None)
        body.train(resolved.module.training)
    record_norms(body, resolved.module)
    if weights is not None:
        load_weights(body, weights, resolved.arch)
    resample = None
    if simple_pyramid:
        levels, resample = _simple(levels, resolved.arch)
    if n_in is not None and n_in != levels[0].input_size[0]:
        set_input_channels(body, n_in, levels[0].input_size, n_in_init)
        levels = [dataclasses.replace(level, input_size=(n_in, *level.input_size[1:])) for level in levels]
    return Pyramid(body, levels, resample)
