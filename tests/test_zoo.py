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
