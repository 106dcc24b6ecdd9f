"""Feature pyramids: a :class:`~autocut.cut.Cut` per stride of any backbone, from its graph.

timm's ``feature_info``, torchvision's ``return_nodes`` and Hugging Face's backbones each say by
hand where every stride ends. The rule they encode is that each tap point is the latest point for
its stride; on the eval graph the cut was found on (:mod:`autocut.cut_graph`) it reads:

1. The maps on the path every input-to-output path goes through (the dominator chain), up to the
   cut, each at its stride.
2. Where the stride changes (the first map at a coarser stride), the outermost module that makes
   that change and no other (a stage, a downsampling block, a pooling layer) is where the finer
   stride ends: the map that module takes is the level (a ResNet's ``layer1`` output, an
   EfficientNet's ``blocks.0`` output rather than the expansion inside ``blocks.1.0``). Where no
   module makes the change alone (the model's own forward pools), the last map before it.
3. The deepest level is the cut. Strides strictly increase: a map at a finer stride than a later
   level (an upsampling branch) is no level.
4. A model at one stride throughout (ViT, DeiT, EVA, MLP-Mixer) gets levels at evenly spaced
   depths: the outputs of its repeated blocks, as timm's ``forward_intermediates`` indices pick
   them, the last one the cut.

:func:`discover_pyramid` returns the levels; :func:`create_pyramid` builds a module returning each
as an NCHW map.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from autocut import _validate, zoo
from autocut.adapt import _check_n_in, _resolve
from autocut.body import _fx_body
from autocut.channels import set_input_channels
from autocut.cut import Cut, format_stride, stride_of
from autocut.cut_graph import _dominator_chain, _features_on_chain, cut_at_node, modules_ending, nodes_in, scopes_of
from autocut.discover import discover_with_trace, discovery_target
from autocut.errors import CutError
from autocut.layers import Resample
from autocut.layout import Feature
from autocut.probe import modes_kept
from autocut.trace import Traced, trace

__all__ = ["discover_pyramid", "create_pyramid", "pyramid_nodes", "Pyramid", "SIMPLE_PYRAMID_STRIDES"]

SIMPLE_PYRAMID_STRIDES = (4, 8, 16, 32)  # ViTDet's simple feature pyramid


def pyramid_nodes(traced: Traced, cut_node: fx.Node, depth_levels: int = 4) -> list[fx.Node]:
    """The nodes of the levels (see the module docstring), shallow to deep, the last ``cut_node``.

    Args:
        traced: the model's eval graph (:func:`autocut.trace.trace`).
        cut_node: the cut's node in it.
        depth_levels: how many levels a model at one stride gets.
    """
    chain, _ = _dominator_chain(traced)
    features = _features_on_chain(traced, chain)
    order = list(features)
    if cut_node not in features:
        raise CutError(f"{traced.qualname.get(cut_node, cut_node.name)!r} is not a map on the path every input goes through")
    stride_group = _stride_groups([features[n] for n in order[: order.index(cut_node) + 1]])
    group = {n: g for n, g in zip(order, stride_group) if g is not None}
    maps = list(group)
    ends = [_level_before(traced, chain, group, node) or prev
            for prev, node in zip(maps, maps[1:]) if group[node] != group[prev]]
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
    for scope in scopes_of(traced, coarser):
        inside = nodes_in(traced, scope, chain)
        first = min(position[n] for n in inside)
        if first == 0:
            continue
        before = chain[first - 1]
        strides = {group[n] for n in inside if n in group}
        if before in group and group[before] == to - 1 and strides <= {to - 1, to}:
            return before
    return None


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
    if traced is None:
        if cut.method != "fx":
            raise CutError(
                f"{arch} was cut by {cut.method} ({cut.where!r}): fx could not trace it, and a pyramid is read off the "
                "fx graph. Make its forward traceable (or wrap the part that is), or use create_body for the last map"
            )
        traced = trace(rebuild(), cut.input_size)  # the cut came from a real copy: its graph
    names = _level_names(traced, cut, depth_levels)
    levels = [cut_at_node(traced, name, arch, method=cut.method) for name in names[:-1]]
    return [*levels, cut], traced


def _level_names(traced: Traced, cut: Cut, depth_levels: int) -> list[str]:
    """The levels' node names, found at the model's own size where ``traced`` is smaller: a small
    input shrinks the deep maps to 1x1 (resnet18 at 32 px), which are then no maps, as for the cut
    (:func:`autocut.discover._find_cut_at_own_size`)."""
    own = zoo.default_input_size(traced.model)
    if min(traced.input_shape[2:]) < min(own[1:]):
        try:
            at_own = trace(traced.model, (traced.input_shape[1], *own[1:]))
            node = at_own.node_named(cut.where)
            if node is not None:
                return [at_own.qualname[n] for n in pyramid_nodes(at_own, node, depth_levels)]
        except Exception:  # any failure at the own size (it runs at the size given only): the levels are read there
            pass
    return [traced.qualname[n] for n in pyramid_nodes(traced, traced.node_named(cut.where), depth_levels)]


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
        CutError: the model has no cut (its branches only meet after pooling: crossvit), or fx
            cannot trace it (a pyramid is read off the graph).

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
        simple_pyramid: for a model at one stride (a ViT): resample its levels to strides
            4, 8, 16 and 32 (ViTDet's simple feature pyramid, parameter-free here: upsampling is
            bilinear, downsampling max pooling).
        depth_levels: the number of levels a model at one stride gets (evenly spaced depths).

    Returns:
        A :class:`Pyramid`: ``pyramid(x)`` is a list of ``(B, nf, h, w)`` maps (NHWC maps permuted,
        tokens laid on their grid without prefix tokens), shallow to deep; ``.levels`` holds their
        :class:`Cut`\\ s. In the model's mode (a named model is built in eval mode).

    Raises:
        CutError: a stride the model has no level at (the message lists the ones there);
            ``simple_pyramid`` on a model with several strides; what :func:`discover_pyramid` raises.

    Example:
        >>> pyramid = create_pyramid("resnet18", strides=[8, 16, 32])
        >>> [tuple(m.shape) for m in pyramid(torch.randn(2, 3, 64, 64))]
        [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    """
    depth_levels = _depth_levels(depth_levels)
    n_in = _check_n_in(n_in, n_in_init)
    _validate.input_size(input_size, None)
    resolved = _resolve(model, input_size, pretrained=pretrained)
    with modes_kept(resolved.module):
        levels, traced = _traced_levels(resolved.module, resolved.input_size, resolved.arch, None, resolved.guessed,
                                        depth_levels)
        levels = _chosen(levels, strides, resolved.arch)
        body = _fx_body(resolved.module, levels, traced if traced.model is resolved.module else None)
        body.train(resolved.module.training)
    resample = None
    if simple_pyramid:
        levels, resample = _simple(levels, resolved.arch)
    if n_in is not None and n_in != levels[0].input_size[0]:
        set_input_channels(body, n_in, levels[0].input_size, n_in_init)
        levels = [dataclasses.replace(level, input_size=(n_in, *level.input_size[1:])) for level in levels]
    return Pyramid(body, levels, resample)
