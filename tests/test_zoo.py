"""The zoos (``autocut.zoo``): names resolved with close matches, meta builds that allocate and
initialise nothing yet keep every tensor's layout, input sizes, and checkpoints read safely."""

import subprocess
import sys

import pytest
import torch

import autocut
from autocut import zoo


def test_pretrained_offline_says_so(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no network timeouts
    with pytest.raises(RuntimeError, match="could not load pretrained weights.*weights=PATH"):
        autocut.adapt("resnet18", n_out=2, pretrained=True)


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match="close matches: .*resnet34"):
        autocut.discover("resnet43")
    with pytest.raises(ValueError, match="unknown zoo"):
        autocut.discover("keras:resnet50")


def test_meta_builds_and_discovery_allocate_no_weights():
    # in a fresh process, whose peak resident memory is what these calls cost (tracemalloc
    # cannot see torch's allocator)
    code = """
import resource, autocut
from autocut import zoo
autocut.discover("resnet18")  # imports and caches
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
autocut.discover("vit_large_patch16_224")  # 300M parameters: 1.2 GB if materialised
model = zoo.build(zoo.resolve("regnety_1280"))  # 645M, and its constructor needs the CPU
assert {p.device.type for p in model.parameters()} == {"meta"}
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 300, f"{out.stdout.split()[-1]} MB"


def _layout(model):
    """Every module's type and every parameter's and buffer's shape, dtype, flags and device."""
    out = []
    for path, module in model.named_modules():
        out.append((path, type(module).__name__, module.training))
        for name, p in module._parameters.items():
            out.append((path, name, type(p).__name__, p is None or (p.shape, p.dtype, p.requires_grad, p.device.type)))
        for name, b in module._buffers.items():
            out.append((path, name, b is None or (b.shape, b.dtype, b.device.type, name in module._non_persistent_buffers_set)))
    return out


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientnet_b0", "regnetx_002", "torchvision:regnet_y_400mf"])
def test_meta_builds_skip_init_but_keep_every_tensors_layout(name):
    from autocut import zoo

    spec = zoo.resolve(name)
    builder = zoo._build_timm if spec.source == zoo.TIMM else zoo._build_torchvision
    reference = builder(spec.name, False).to("meta").eval()  # built and initialised on the CPU
    assert _layout(zoo.build(spec)) == _layout(reference)


def test_names_resolve_to_their_zoo():
    assert zoo.resolve("resnet18") == zoo.ModelSpec("timm", "resnet18")
    assert str(zoo.resolve("torchvision:resnet18")) == "torchvision:resnet18"
    assert zoo.resolve("timm:resnet18") == zoo.resolve("resnet18")
    assert zoo.resolve("vgg11_bn") == zoo.ModelSpec("timm", "vgg11_bn")
    assert zoo.resolve("squeezenet1_1") == zoo.ModelSpec("torchvision", "squeezenet1_1")  # timm has none
    assert zoo.resolve("resnet18.a1_in1k") == zoo.ModelSpec("timm", "resnet18.a1_in1k")  # a pretrained tag
    for bad in ("", None, 3):
        with pytest.raises(autocut.CutError, match="expected a model name or an nn.Module"):
            zoo.resolve(bad)
    with pytest.raises(autocut.CutError, match="unknown model 'torchvision:resnet1'; close matches: torchvision:resnet18"):
        zoo.resolve("torchvision:resnet1")


def test_input_size_and_normalisation_come_from_the_models_own_config():
    vit = zoo.resolve("vit_base_patch16_384")
    assert zoo.stated_input_size(vit) == zoo.default_input_size(vit) == (3, 384, 384)
    assert zoo.stated_input_size(zoo.resolve("torchvision:inception_v3")) == (3, 299, 299)
    tv_vit = zoo.resolve("torchvision:vit_b_16")
    assert zoo.default_input_size(tv_vit, zoo.build(tv_vit)) == (3, 224, 224)
    assert zoo.normalization(zoo.resolve("torchvision:resnet18")) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert zoo.normalization(zoo.resolve("vit_base_patch16_224.augreg_in21k")) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    class Plain(torch.nn.Module):
        pass

    assert zoo.stated_input_size(Plain()) is None and zoo.default_input_size(Plain()) == (3, 224, 224)
    stated = Plain()
    stated.pretrained_cfg = {"input_size": (1, 64, 96)}
    assert zoo.default_input_size(stated) == (1, 64, 96)
    fixed = Plain()
    fixed.image_size = 160  # a size the model insists on (torchvision's ViTs)
    assert zoo.default_input_size(fixed) == (3, 160, 160)


def test_checkpoints_are_unwrapped_and_refused_when_they_hold_anything_but_tensors(tmp_path):
    from safetensors.torch import save_file

    state = {"a.weight": torch.ones(2), "b.bias": torch.zeros(3)}
    for i, wrapped in enumerate([state, {"state_dict": state}, {"model": state}, {"model_state_dict": state},
                                 {f"module.{k}": v for k, v in state.items()}]):
        torch.save(wrapped, tmp_path / f"{i}.pt")
        loaded = zoo.load_checkpoint(tmp_path / f"{i}.pt")
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items()), i
    save_file(state, str(tmp_path / "s.safetensors"))
    assert zoo.load_checkpoint(tmp_path / "s.safetensors").keys() == state.keys()
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(autocut.CutError, match="does not hold a state dict of tensors"):
        zoo.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        zoo.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(autocut.CutError, match="is not a plain tensor checkpoint"):
        zoo.load_checkpoint(tmp_path / "garbage.pt")


def test_pretrained_weights_are_never_loaded_on_meta():
    with pytest.raises(autocut.CutError, match="cannot be loaded on the meta device"):
        zoo.build(zoo.resolve("resnet18"), device="meta", pretrained=True)


# --- a module's own input size: every place it can state it --------------------------------------


class PatchEmbed(torch.nn.Module):
    def __init__(self, patch: int, img_size=None):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, patch, patch)
        if img_size is not None:
            self.img_size = img_size


class FixedGrid(torch.nn.Module):
    """A token model whose positional embedding fixes its grid: it fails at any other size."""

    def __init__(self, side: int = 256, patch: int = 16, prefix: int = 1, img_size=None, pos_name: str = "pos_embed"):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, img_size)
        self.pos_name = pos_name
        setattr(self, pos_name, torch.nn.Parameter(torch.zeros(1, prefix + (side // patch) ** 2, 8)))
        self.prefix = prefix
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([t.new_zeros(t.shape[0], self.prefix, 8), t], 1) + getattr(self, self.pos_name)
        return self.head(t[:, 0])


class Config:
    def __init__(self, **kw):
        vars(self).update(kw)


@pytest.mark.parametrize("state, want, source", [
    (lambda m: setattr(m, "pretrained_cfg", {"input_size": (3, 256, 256)}), (3, 256, 256), "pretrained_cfg"),
    (lambda m: setattr(m, "default_cfg", {"input_size": (3, 256, 256)}), (3, 256, 256), "default_cfg"),
    (lambda m: setattr(m, "config", Config(image_size=256, num_channels=3)), (3, 256, 256), "config.image_size"),
    (lambda m: setattr(m, "config", Config(vision_config=Config(image_size=[256, 256]))), (3, 256, 256),
     "config.vision_config.image_size"),
    (lambda m: setattr(m, "image_size", 256), (3, 256, 256), "image_size"),
    (lambda m: setattr(m.patch_embed, "img_size", (256, 256)), (3, 256, 256), "patch_embed.img_size"),
    (lambda m: None, (3, 256, 256), "pos_embed (257 positions) x patch 16"),
])
def test_a_module_states_its_input_size_in_each_of_these_places(state, want, source):
    model = FixedGrid()
    state(model)
    assert zoo.input_size_source(model) == (want, source)
    cut = autocut.discover(model)  # probed at 224 px, its 14x14 tokens would not add to 16x16 positions
    assert (cut.input_size, cut.feature_shape, cut.prefix_tokens) == (want, (8, 16, 16), 1)


def test_the_first_place_wins_and_a_plain_module_states_nothing():
    model = FixedGrid(side=384)
    model.config = Config(image_size=320)
    model.pretrained_cfg = {"input_size": (3, 288, 288)}
    assert zoo.input_size_source(model) == ((3, 288, 288), "pretrained_cfg")
    del model.pretrained_cfg
    assert zoo.input_size_source(model) == ((3, 320, 320), "config.image_size")
    del model.config
    assert zoo.input_size_source(model) == ((3, 384, 384), "pos_embed (577 positions) x patch 16")
    assert zoo.input_size_source(torch.nn.Conv2d(3, 8, 16, 16)) is None  # a patch conv and no positions


def test_a_probe_that_fails_says_which_size_was_tried_and_what_the_model_said():
    with pytest.raises(autocut.CutError, match=r"FixedGrid does not run at 224x224: it needs its own input size, "
                                               r"\(3, 256, 256\), which its pos_embed \(257 positions\) x patch 16 "
                                               r"states. Pass input_size=\(3, 256, 256\)"):
        autocut.discover(FixedGrid(), input_size=(3, 224, 224))
    with pytest.raises(autocut.CutError, match=r"could not probe FixedGrid at input size \(3, 384, 384\), the size "
                                               r"it states \(config.image_size\)"):
        model = FixedGrid()
        model.config = Config(image_size=384)  # wrong: its positions are for 256 px
        autocut.discover(model)
    unnamed = FixedGrid(side=208, pos_name="table")  # positions named as no model names them, for no size tried
    with pytest.raises(autocut.CutError, match=r"at input size \(3, 224, 224\), the default 224 px; it states no "
                                               r"input size \(read: pretrained_cfg / default_cfg input_size; config.*"
                                               r"nor at the larger sizes tried: 256 px \(RuntimeError: "):
        autocut.discover(unnamed)
    cut = autocut.discover(FixedGrid(pos_name="table"))  # for 256 px: the first larger size tried
    assert (cut.input_size, cut.feature_shape) == ((3, 256, 256), (8, 16, 16))


def test_num_classes_sizes_each_zoos_own_classifier(monkeypatch):
    assert zoo.build(zoo.resolve("resnet18"), num_classes=7).fc.out_features == 7
    assert zoo.build(zoo.resolve("resnet18")).fc.out_features == 1000
    assert zoo.build(zoo.resolve("torchvision:mobilenet_v3_small"), num_classes=5).classifier[-1].out_features == 5
    hf = zoo.build(zoo.resolve("transformers:resnet"), num_classes=3)
    assert hf.config.num_labels == 3 and hf.classifier[-1].out_features == 3
    with pytest.raises(autocut.CutError, match="num_classes"):
        zoo.build(zoo.resolve("resnet18"), num_classes=0)
    # pretrained torchvision weights come with their classifier: its size is not asked for
    import torchvision

    asked = []
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kwargs: asked.append(kwargs) or torch.nn.Linear(2, 2))
    zoo.build(zoo.resolve("torchvision:resnet18"), device="cpu", pretrained=True, num_classes=7)
    zoo.build(zoo.resolve("torchvision:resnet18"), device="cpu", num_classes=7)
    assert asked == [{"weights": "DEFAULT"}, {"weights": None, "num_classes": 7}]
