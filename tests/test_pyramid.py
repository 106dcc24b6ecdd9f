"""Feature pyramids (autocut.pyramid): each level against the model's own code, never autocut's:
timm's ``feature_info`` (strides, channels, and the values its modules return), torchvision's
``IntermediateLayerGetter`` (the ResNet backbone of its detection models), timm's
``forward_intermediates`` for a model at one stride."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter

import autocut
from autocut import CutError, create_pyramid, discover_pyramid
from autocut.layers import Resample

# strides and channels of every level timm's feature_info lists but the deepest, where autocut's is
# the model's cut (after efficientnet's conv_head, swin's final norm); names cover the ways a
# stride ends: a stage (resnet, regnet), a downsampling module inside the next stage (convnext,
# swin, efficientformer), a block that expands before its strided conv (efficientnet, mobilenet),
# a transition (densenet), a pooling layer (vgg), valid-padded convs (inception), a token model
# whose stride changes in attention (levit)
AGREE_WITH_FEATURE_INFO = ["resnet50", "convnext_atto", "efficientnet_b0", "mobilenetv3_large_100", "densenet121",
                           "vgg11", "regnetx_002", "swin_tiny_patch4_window7_224", "efficientformer_l1",
                           "inception_v3", "levit_128", "cspdarknet53", "dla34"]


def _at(levels, reduction):
    """The levels at timm's (nominal) reduction: valid padding makes inception's 2.03."""
    return [i for i, level in enumerate(levels) if abs(level.stride - reduction) <= 0.15 * reduction]


def _agrees(name):
    levels = discover_pyramid(name)
    info = timm.create_model(name, features_only=True, pretrained=False).feature_info.get_dicts()
    for entry in info[:-1]:
        at = _at(levels, entry["reduction"])
        assert len(at) == 1, f"{name}: no level at stride {entry['reduction']} ({entry['module']})"
        assert levels[at[0]].nf == entry["num_chs"], (name, entry, levels[at[0]])
    assert levels[-1] == autocut.discover(name)
    return levels


@pytest.mark.parametrize("name", AGREE_WITH_FEATURE_INFO)
def test_levels_agree_with_timms_feature_info(name):
    levels = _agrees(name)
    strides = [level.stride for level in levels]
    assert strides == sorted(set(strides))  # strictly increasing


def test_the_resnet_levels_are_timms_modules_outputs():
    levels = discover_pyramid("resnet18")
    assert [(level.where, level.after, level.nf, level.stride) for level in levels] == [
        ("act1", "act1", 64, 2), ("layer1.1.act2", "layer1", 64, 4), ("layer2.1.act2", "layer2", 128, 8),
        ("layer3.1.act2", "layer3", 256, 16), ("layer4.1.act2", "layer4", 512, 32)]
    assert levels[1].dropped == ("layer2", "layer3", "layer4", "fc")


def test_a_block_that_expands_before_its_strided_conv_is_not_where_the_stride_ends():
    # the expansion (96 channels at stride 2) is the last map at stride 2, but inside the block
    # that changes the stride: the level is the map that block takes, timm's blocks.0
    levels = discover_pyramid("efficientnet_b0")
    assert [(level.nf, level.stride) for level in levels[:4]] == [(16, 2), (24, 4), (40, 8), (112, 16)]
    assert levels[0].after == "blocks.0"


@pytest.mark.parametrize("name, size", [("convnext_atto", 64), ("efficientnet_b0", 64), ("resnet18", 64),
                                        ("densenet121", 64), ("swin_tiny_patch4_window7_224", 224)])
def test_each_level_is_the_value_timms_feature_module_returns(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    info = timm.create_model(name, features_only=True, pretrained=False).feature_info.get_dicts()
    pyramid = create_pyramid(model, input_size=(3, size, size))
    returned = {}
    hooks = [model.get_submodule(e["module"]).register_forward_hook(
        lambda m, a, out, key=e["module"]: returned.__setitem__(key, out)) for e in info]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        model(x)
        maps = pyramid(x)
    for h in hooks:
        h.remove()
    assert len(maps) == len(pyramid.levels)
    for entry in info[:-1]:
        theirs = returned[entry["module"]]
        if theirs.shape[1] != entry["num_chs"]:  # swin's NHWC stages
            theirs = theirs.permute(0, 3, 1, 2)
        [level] = _at(pyramid.levels, entry["reduction"])
        torch.testing.assert_close(maps[level], theirs, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(maps[-1], autocut.create_body(model, input_size=(3, size, size))(x), rtol=0, atol=0)


def test_the_resnet_levels_are_torchvisions_detection_backbone():
    torch.manual_seed(0)
    model = resnet18().eval()
    getter = IntermediateLayerGetter(model, {f"layer{i}": str(i) for i in range(1, 5)}).eval()
    pyramid = create_pyramid(model, strides=[4, 8, 16, 32], input_size=(3, 96, 96))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        theirs, ours = getter(x), pyramid(x)
    assert [level.after for level in pyramid.levels] == ["layer1", "layer2", "layer3", "layer4"]
    for i, mine in enumerate(ours):
        torch.testing.assert_close(mine, theirs[str(i + 1)], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_the_mobilenet_levels_end_where_torchvisions_detection_backbone_starts_its_stages(name):
    # torchvision's mobilenet_backbone splits model.features at its stage indices (0, each block
    # that changes the stride, the last); a stride's last map is what the next stage's block takes
    from torchvision.models import get_model
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    torch.manual_seed(0)
    model = get_model(name).eval()
    n_stages = 2 + sum(getattr(block, "_is_cn", False) for block in model.features)  # returned_layers index them
    fpn = mobilenet_backbone(backbone_name=name, weights=None, fpn=True, trainable_layers=0,
                             returned_layers=list(range(n_stages)))
    stages = sorted(int(i) for i in fpn.body.return_layers)  # where each stage starts in model.features
    pyramid = create_pyramid(model, input_size=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = pyramid(x)
        theirs = [model.features[:start](x) for start in stages[1:-1]] + [model.features(x)]
    assert len(maps) == len(theirs)
    for mine, their in zip(maps, theirs):
        torch.testing.assert_close(mine, their, rtol=0, atol=0)
    assert [level.stride for level in pyramid.levels] == [2, 4, 8, 16, 32]


def _fastai_size_changes(children, x):
    """fastai's DynamicUnet rule on a Sequential body (``unet._get_sz_change_idxs``): the children
    whose output grid differs from the next child's, and the last child."""
    sizes = []
    with torch.no_grad():
        for child in children:
            x = child(x)
            sizes.append(x.shape[-1])
    return [i for i in range(len(sizes) - 1) if sizes[i] != sizes[i + 1]] + [len(sizes) - 1]


@pytest.mark.parametrize("name, body", [("resnet34", ""), ("densenet121", "features"), ("vgg16_bn", "features"),
                                        ("mobilenet_v2", "features")])
def test_levels_end_at_the_children_where_fastais_dynamic_unet_finds_a_size_change(name, body):
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(name).eval()
    if body:
        named = [(f"{body}.{n}", child) for n, child in model.get_submodule(body).named_children()]
    else:  # fastai's create_body: every child but the last two (avgpool, fc)
        named = list(model.named_children())[:-2]
    changes = _fastai_size_changes([child for _, child in named], torch.randn(1, 3, 64, 64))
    levels = discover_pyramid(model, input_size=(3, 64, 64))
    assert [level.after for level in levels][:-1] == [named[i][0] for i in changes][:-1]
    assert levels[-1] == autocut.discover(model, input_size=(3, 64, 64))


def test_a_model_at_one_stride_gets_levels_at_evenly_spaced_depths():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=8).eval()
    pyramid = create_pyramid(model)
    assert [(level.after, level.stride, level.prefix_tokens) for level in pyramid.levels] == [
        ("blocks.1", 16, 1), ("blocks.3", 16, 1), ("blocks.5", 16, 1), ("norm", 16, 1)]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = pyramid(x)
        theirs = model.forward_intermediates(x, indices=[1, 3, 5], norm=False, intermediates_only=True)
        features = model.forward_features(x)
    for mine, their in zip(maps, theirs):
        torch.testing.assert_close(mine, their, rtol=0, atol=0)
    torch.testing.assert_close(maps[-1], features[:, 1:].transpose(1, 2).reshape(2, 192, 14, 14), rtol=0, atol=0)
    assert [level.after for level in discover_pyramid(model, depth_levels=2)] == ["blocks.3", "norm"]


def test_a_simple_pyramid_resamples_one_stride_to_4_8_16_32():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=4).eval()
    plain, simple = create_pyramid(model), create_pyramid(model, simple_pyramid=True)
    assert [level.stride for level in simple.levels] == [4, 8, 16, 32]
    assert [level.feature_shape for level in simple.levels] == [(192, 56, 56), (192, 28, 28), (192, 14, 14), (192, 7, 7)]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps, native = simple(x), plain(x)
    torch.testing.assert_close(maps[0], F.interpolate(native[0], size=(56, 56), mode="bilinear"), rtol=0, atol=0)
    torch.testing.assert_close(maps[2], native[2], rtol=0, atol=0)
    torch.testing.assert_close(maps[3], F.max_pool2d(native[3], 2), rtol=0, atol=0)
    with pytest.raises(CutError, match="one stride"):
        create_pyramid("resnet18", simple_pyramid=True)


def test_levels_are_found_at_the_own_size_where_a_small_input_shrinks_the_deep_maps_to_1x1():
    levels = discover_pyramid("resnet18", input_size=32)
    assert [(level.after, level.feature_shape) for level in levels] == [
        ("act1", (64, 16, 16)), ("layer1", (64, 8, 8)), ("layer2", (128, 4, 4)), ("layer3", (256, 2, 2)),
        ("layer4", (512, 1, 1))]
    tiny = discover_pyramid("resnet18", input_size=16)  # layer3 and layer4 both 1x1: strides read at 224 px
    assert [(level.after, level.feature_shape[1:], level.stride, level.stride_size) for level in tiny] == [
        ("act1", (8, 8), 2, (224, 224)), ("layer1", (4, 4), 4, (224, 224)), ("layer2", (2, 2), 8, (224, 224)),
        ("layer3", (1, 1), 16, (224, 224)), ("layer4", (1, 1), 32, (224, 224))]
    assert tiny[-1] == autocut.discover("resnet18", input_size=16)
    assert [level.after for level in create_pyramid("resnet18", strides=[16, 32], input_size=16).levels] == ["layer3", "layer4"]


def test_chosen_strides_and_where_the_pyramid_stops():
    pyramid = create_pyramid("resnet18", strides=[8, 16])
    assert [level.stride for level in pyramid.levels] == [8, 16]
    kept = {name.split(".")[0] for name, _ in pyramid.body.named_parameters()}
    assert kept == {"conv1", "bn1", "layer1", "layer2", "layer3"}  # nothing after the deepest chosen
    with pytest.raises(CutError, match=r"no level at stride 64: its levels are at strides 2, 4, 8, 16, 32"):
        create_pyramid("resnet18", strides=[8, 64])
    with pytest.raises(CutError, match="strides must be a list"):
        create_pyramid("resnet18", strides=8)
    with pytest.raises(CutError, match="depth_levels"):
        discover_pyramid("resnet18", depth_levels=1)


def test_n_in_rebuilds_the_input_layer_as_create_body_does():
    pyramid = create_pyramid("resnet18", strides=[16, 32], n_in=1, input_size=(3, 64, 64))
    assert pyramid.body.conv1.in_channels == 1
    assert all(level.input_size == (1, 64, 64) for level in pyramid.levels)
    assert [tuple(m.shape) for m in pyramid(torch.randn(2, 1, 64, 64))] == [(2, 256, 4, 4), (2, 512, 2, 2)]


class _PoolsInForward(nn.Module):
    """Strides made by the model's own forward (no module changes them) and a first conv kept at stride 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.a(x)), 2)
        x = F.max_pool2d(torch.relu(self.b(x)), 2)
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_strides_changed_by_the_forward_itself_end_at_the_last_map_before():
    levels = discover_pyramid(_PoolsInForward(), input_size=(3, 32, 32))
    assert [(level.where, level.nf, level.stride) for level in levels] == [("relu", 8, 1), ("relu_1", 16, 2), ("relu_2", 32, 4)]


@pytest.mark.parametrize("name", ["hrnet_w18_small", "nasnetalarge"])
def test_strides_the_shared_path_skips_are_taken_where_the_branches_meet(name):
    # HRNet's path runs from layer1 (stride 4) to its head's stride 32: strides 8 and 16 live on
    # parallel branches, joined in the head; NASNet's cells each read the two before them, so no
    # map between the stem and the last cell is on every path: timm's channels, level by level
    levels = _agrees(name)
    assert [round(level.stride) for level in levels] == [2, 4, 8, 16, 30 if name == "nasnetalarge" else 32]


def test_hrnets_branch_levels_are_the_sums_its_head_makes():
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small").eval()
    pyramid = create_pyramid(model, strides=[4, 8, 16], input_size=(3, 64, 64))
    assert [(level.where, level.nf) for level in pyramid.levels] == [("layer1.0.act3", 128), ("add", 256), ("add_1", 512)]
    outputs = {}
    # timm calls each downsampling Sequential's forward itself (no hook fires): its last module's output
    modules = {"layer1": model.layer1, "down0": model.downsamp_modules[0][-1], "down1": model.downsamp_modules[1][-1],
               "incre1": model.incre_modules[1], "incre2": model.incre_modules[2]}
    hooks = [m.register_forward_hook(lambda m, a, out, key=key: outputs.__setitem__(key, out)) for key, m in modules.items()]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        maps = pyramid(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(maps[0], outputs["layer1"], rtol=0, atol=0)
    torch.testing.assert_close(maps[1], outputs["incre1"] + outputs["down0"], rtol=0, atol=0)
    torch.testing.assert_close(maps[2], outputs["incre2"] + outputs["down1"], rtol=0, atol=0)


def test_a_model_whose_branches_only_meet_after_pooling_has_no_pyramid():
    with pytest.raises(CutError, match="branches only meet after pooling"):
        discover_pyramid("crossvit_tiny_240")


def test_resample_factors():
    assert Resample(4)(torch.zeros(1, 2, 7, 7)).shape == (1, 2, 28, 28)
    assert Resample(1)(x := torch.randn(1, 2, 3, 3)) is x
    with pytest.raises(CutError, match="factor"):
        Resample(0)


def test_hand_written_models_levels_are_their_own_values():
    from handmade import FunctionalPoolNet, NHWCBlockNet

    torch.manual_seed(0)
    model = FunctionalPoolNet().eval()
    pyramid = create_pyramid(model, input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem, last = pyramid(x)
        torch.testing.assert_close(stem, model.stem(x), rtol=0, atol=0)
        torch.testing.assert_close(last, model.features(x), rtol=0, atol=0)
    assert [(level.after, level.stride) for level in pyramid.levels] == [("stem", 2), ("", 4)]
    nhwc = NHWCBlockNet().eval()
    [level] = create_pyramid(nhwc, input_size=(3, 32, 32)).levels  # one stride, no repeated block: the cut alone
    assert (level.layout, level.stride) == ("NHWC", 4)


def test_a_model_fx_cannot_trace_is_refused_with_why():
    from handmade import DataDependentNet

    with pytest.raises(CutError, match=r"was cut by hooks .*returns a map on a 32x32 grid before its 16x16 cut: several "
                                       r"strides, which only a graph tells from branches"):
        discover_pyramid(DataDependentNet(), input_size=(3, 32, 32))


class _TokensReadValues(nn.Module):
    """A token model at one stride whose forward reads values (fx and torch.export cannot capture
    it): only module hooks can cut it."""

    def __init__(self, depth=8):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 4)

    def tokens(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x)
            if float(x.abs().max()) > 1e6:  # a value read
                x = x / 2
        return x

    def forward(self, x):
        return self.head(self.norm(self.tokens(x)).mean(1))


def test_a_model_only_hooks_can_cut_gets_levels_at_evenly_spaced_blocks_where_it_runs_at_one_stride():
    torch.manual_seed(0)
    model = _TokensReadValues().eval()
    pyramid = create_pyramid(model, input_size=(3, 32, 32))
    assert [(level.where, level.after, level.method, level.stride, level.layout) for level in pyramid.levels] == [
        ("blocks.1", "blocks.1", "hooks", 8, "NLC"), ("blocks.3", "blocks.3", "hooks", 8, "NLC"),
        ("blocks.5", "blocks.5", "hooks", 8, "NLC"), ("norm", "norm", "hooks", 8, "NLC")]
    # what a body ending at each level leaves out: the blocks after it, the final norm, the head
    later = [f"blocks.{i}" for i in range(8)]
    assert [level.dropped for level in pyramid.levels] == [(*later[2:], "norm", "head"), (*later[4:], "norm", "head"),
                                                           (*later[6:], "norm", "head"), ("head",)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = pyramid(x)
        tokens = [model.patch(x).flatten(2).transpose(1, 2)]
        for block in model.blocks:
            tokens.append(tokens[-1] + block(tokens[-1]))
    # a block's output is its own (the residual add is the forward's): the level is what the block returns
    for mine, i in zip(maps[:3], (1, 3, 5)):
        theirs = model.blocks[i](tokens[i])
        torch.testing.assert_close(mine, theirs.transpose(1, 2).reshape(2, 16, 4, 4), rtol=0, atol=0)
    torch.testing.assert_close(maps[3], model.norm(tokens[-1]).transpose(1, 2).reshape(2, 16, 4, 4), rtol=0, atol=0)


def test_train_and_eval_switch_the_pyramids_graphs():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", drop_rate=0.0).train()
    pyramid = create_pyramid(model, strides=[8], input_size=(3, 32, 32))
    assert pyramid.training and model.layer2[0].bn1.training
    x = torch.randn(4, 3, 32, 32)
    train_out = pyramid(x)[0]
    pyramid.eval()
    with torch.no_grad():
        eval_out = pyramid(x)[0]
        stem = model.eval().maxpool(model.act1(model.bn1(model.conv1(x))))
        torch.testing.assert_close(eval_out, model.layer2(model.layer1(stem)), rtol=0, atol=0)
    assert not torch.allclose(train_out, eval_out)  # batch statistics in training


class _StagesEndInADownsample(nn.Module):
    """Stages written as their blocks, then a downsampling layer (Hugging Face's Swin, many
    hand-written encoders): a stride's last map is its blocks' output, inside the stage."""

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return x + torch.relu(self.norm(self.conv(x)))

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(self.Block(c), self.Block(c), nn.Conv2d(c, 2 * c, 2, stride=2)) for c in (8, 16))
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean((2, 3)))


def test_a_stage_that_ends_in_its_downsampling_ends_its_stride_at_its_blocks_output():
    torch.manual_seed(0)
    model = _StagesEndInADownsample().eval()
    pyramid = create_pyramid(model, input_size=(3, 32, 32))
    assert [(level.after, level.stride) for level in pyramid.levels] == [
        ("stages.0.1", 2), ("stages.1.1", 4), ("stages", 8)]  # each stage's second block; the cut
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = pyramid(x)
        s2 = model.stages[0][:2](model.stem(x))
        s4 = model.stages[1][:2](model.stages[0][2](s2))
    torch.testing.assert_close(maps[0], s2, rtol=0, atol=0)
    torch.testing.assert_close(maps[1], s4, rtol=0, atol=0)
    # a DenseNet transition (norm, conv, pool: single layers) still ends its stride at what it takes
    assert discover_pyramid("densenet121")[1].after == "features.denseblock1"


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                           layer_type="basic")
        return transformers.ResNetForImageClassification(config).eval()
    if kind == "swin":
        config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                         num_heads=[1, 1, 2, 2], window_size=2)
        return transformers.SwinForImageClassification(config).eval()
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=8, num_attention_heads=2, intermediate_size=32,
                                    image_size=64, patch_size=8)
    return transformers.ViTForImageClassification(config).eval()


def test_a_model_cut_on_its_exported_graph_gets_its_levels_kept_by_module_hooks():
    # Hugging Face's forwards are not fx-traceable: levels found on torch.export's graph, named by
    # module; the oracle, the model's own hidden states of each stage
    model = _hf("resnet")
    pyramid = create_pyramid(model, input_size=(3, 64, 64))
    assert [(level.where, level.method, level.stride) for level in pyramid.levels] == [
        ("resnet.embedder.embedder", "export", 2), ("resnet.encoder.stages.0", "export", 4),
        ("resnet.encoder.stages.1", "export", 8), ("resnet.encoder.stages.2", "export", 16),
        ("resnet.encoder:last_hidden_state", "export", 32)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = pyramid(x)
        hidden = model.resnet(x, output_hidden_states=True).hidden_states
        stem = model.resnet.embedder.embedder(x)
    torch.testing.assert_close(maps[0], stem, rtol=0, atol=0)
    for mine, theirs in zip(maps[1:], hidden[1:]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    deeper = create_pyramid(model, strides=[8], input_size=(3, 64, 64))  # stops there: the cut's modules are dropped
    assert [level.where for level in deeper.levels] == ["resnet.encoder.stages.1"]
    with torch.no_grad():
        torch.testing.assert_close(deeper(x)[0], hidden[2], rtol=0, atol=0)


def test_a_hugging_face_swin_ends_each_stride_before_its_stage_downsamples():
    model = _hf("swin")
    pyramid = create_pyramid(model, input_size=(3, 64, 64))
    assert [(level.where, level.stride) for level in pyramid.levels] == [  # a block returns a tuple: its first
        ("swin.encoder.layers.0.blocks.0:0", 4), ("swin.encoder.layers.1.blocks.0:0", 8),
        ("swin.encoder.layers.2.blocks.0:0", 16), ("swin.layernorm", 32)]
    # the oracle: what Hugging Face's SwinBackbone reads, each stage's output before its downsampling
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = pyramid(x)
        embedded, dims = model.swin.embeddings(x)
        theirs = model.swin.encoder(embedded, dims, output_hidden_states=True, return_dict=True,
                                    output_hidden_states_before_downsampling=True).reshaped_hidden_states[1:]
        last = model.swin(x).last_hidden_state  # after its final layernorm, the cut
    for mine, their in zip(maps[:3], theirs):
        torch.testing.assert_close(mine, their, rtol=0, atol=0)
    torch.testing.assert_close(maps[3], last.transpose(1, 2).reshape(2, 64, 2, 2), rtol=0, atol=0)


def test_a_hugging_face_vit_gets_its_hidden_states_at_evenly_spaced_depths():
    model = _hf("vit")
    pyramid = create_pyramid(model, input_size=(3, 64, 64))
    assert [level.stride for level in pyramid.levels] == [8, 8, 8, 8]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = pyramid(x)
        hidden = model.vit(x, output_hidden_states=True).hidden_states  # the embeddings, then each layer's output
    for mine, depth in zip(maps[:3], (2, 4, 6)):
        theirs = hidden[depth][:, 1:].transpose(1, 2).reshape(2, 16, 8, 8)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


class _Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class _Layer(_Block):
    """A residual block that returns a tuple, as Hugging Face's layers do."""

    def forward(self, x):
        return (super().forward(x),)


class _NeckedTokens(nn.Module):
    """A ViT as a detector's backbone (SAM's image encoder), whose forward reads values: a patch
    stem that is a Sequential (conv, norm), a class token, layers two deep returning tuples, then
    the class token dropped, the tokens laid on their 4x8 grid and a conv neck to 24 channels."""

    def __init__(self, depth=4):
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, 16, 8, 8), nn.BatchNorm2d(16))
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Layer(16) for _ in range(depth))
        self.neck = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 4)

    def tokens(self, x):
        m = self.patch(x)
        return torch.cat([self.cls.expand(len(x), -1, -1), m.flatten(2).transpose(1, 2)], 1)

    def forward(self, x):
        t = self.tokens(x)
        for layer in self.encoder.layers:
            t = layer(t)[0]
            if float(t.abs().max()) > 1e6:  # a value read
                t = t / 2
        grid = t[:, 1:].transpose(1, 2).reshape(len(x), 16, 4, 8)
        return self.head(self.neck(grid).mean((2, 3)))


def test_a_hooked_models_levels_are_its_layers_outputs_read_as_they_are_and_the_cut_as_it_is():
    torch.manual_seed(0)
    model = _NeckedTokens().eval()
    pyramid = create_pyramid(model, input_size=(3, 32, 64))
    layers = [f"encoder.layers.{i}" for i in range(4)]
    # the layers (the most repeated blocks: four, against the stem's two children), each the tensor in the
    # tuple it returns (so no module the body ends with), tokens behind one class token on the 4x8 grid
    assert [(level.where, level.after, level.nf, level.layout, level.feature_shape, level.prefix_tokens, level.stride,
             level.dropped) for level in pyramid.levels[:3]] == [
        (f"{layer}:0", "", 16, "NLC", (16, 4, 8), 1, 8, (*layers[i + 1:], "neck", "head"))
        for i, layer in enumerate(layers[:3])]
    # the deepest is the cut: the neck's NCHW map, its own channels, no class token
    assert pyramid.levels[3] == autocut.discover(model, input_size=(3, 32, 64))
    assert (pyramid.levels[3].where, pyramid.levels[3].after, pyramid.levels[3].nf, pyramid.levels[3].layout,
            pyramid.levels[3].feature_shape, pyramid.levels[3].prefix_tokens) == ("neck", "neck", 24, "NCHW", (24, 4, 8), 0)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        maps = pyramid(x)
        t = model.tokens(x)
        want = []
        for layer in model.encoder.layers:
            t = layer(t)[0]
            want.append(t[:, 1:].transpose(1, 2).reshape(2, 16, 4, 8))
        for mine, theirs in zip(maps[:3], want):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        torch.testing.assert_close(maps[3], model.neck(want[3]), rtol=0, atol=0)


class _TokenBlocks(nn.Module):
    """A token model whose forward reads values, its blocks run ``passes`` times over (weights
    shared across passes, as in ALBERT: each block then returns a map per pass, and a hook keeping
    a level could not tell which pass it meant)."""

    def __init__(self, depth, passes=1):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.blocks = nn.ModuleList(_Block(16) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 4)
        self.passes = passes

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for block in [*self.blocks] * self.passes:
            x = block(x)
            if float(x.abs().max()) > 1e6:  # a value read
                x = x / 2
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("depth, passes, wheres", [
    (2, 1, ["blocks.0", "norm"]),  # two blocks repeat: the first, then the cut
    (1, 1, ["norm"]),  # one block repeats nothing: the cut alone
    (2, 2, ["norm"]),  # blocks run twice are no levels
])
def test_a_hooked_model_gets_levels_only_at_blocks_that_repeat_and_run_once(depth, passes, wheres):
    levels = discover_pyramid(_TokenBlocks(depth, passes), input_size=(3, 32, 32), depth_levels=4)
    assert [level.where for level in levels] == wheres
    assert levels[-1].dropped == ("head",)


def test_a_hooked_model_at_several_strides_is_refused_naming_the_module_and_both_grids():
    from handmade import DataDependentNet

    with pytest.raises(CutError) as info:
        discover_pyramid(DataDependentNet(), input_size=(3, 32, 64))  # its first conv keeps the 32x64 grid
    assert str(info.value) == (
        "DataDependentNet was cut by hooks ('pool:input'): neither fx nor an ATen recording could capture its graph, and "
        "'body.0' returns a map on a 32x64 grid before its 16x32 cut: several strides, which only a graph tells from "
        "branches. Make its forward traceable, or use create_body for the last map")


class _TokensReadValuesConvHead(_TokensReadValues):
    """The one-stride token model, its tokens laid on their 4x4 grid for a head that starts with a
    stride-2 conv: the head's children, run after the cut at its input, make a 2x2 map."""

    def __init__(self):
        super().__init__(depth=4)
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        x = self.tokens(x)
        return self.head(self.norm(x).transpose(1, 2).reshape(len(x), 16, 4, 4))


def test_what_runs_inside_the_module_a_hooked_cut_takes_the_input_of_runs_after_the_cut():
    torch.manual_seed(0)
    model = _TokensReadValuesConvHead().eval()
    assert autocut.discover(model, input_size=(3, 32, 32)).where == "head:input"
    pyramid = create_pyramid(model, input_size=(3, 32, 32), depth_levels=3)
    assert [(level.where, level.stride, level.feature_shape) for level in pyramid.levels] == [
        ("blocks.0", 8, (16, 4, 4)), ("blocks.2", 8, (16, 4, 4)), ("head:input", 8, (16, 4, 4))]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.patch(x).flatten(2).transpose(1, 2)
        for block in model.blocks:
            tokens = tokens + block(tokens)
        torch.testing.assert_close(pyramid(x)[-1], model.norm(tokens).transpose(1, 2).reshape(2, 16, 4, 4),
                                   rtol=0, atol=0)
