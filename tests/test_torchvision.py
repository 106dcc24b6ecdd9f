"""Every torchvision classification model: the body returns exactly the tensor the model's own
forward reduces globally (the input of its pooling, mean or class-token select), in NCHW.

The oracle is written here from torchvision's source, family by family, independently of
autocut's graph rule; shapes are checked on the meta device for all models, values on real CPU
tensors for small ones. Where fastai's model_meta has a cut, autocut agrees or improves on it.
"""

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import autocut
from autocut import zoo

pytestmark = pytest.mark.zoo  # a sweep over many models: out of the mutation run (see pyproject.toml)

MODELS = torchvision.models.list_models(module=torchvision.models)


def _vit_tokens_to_map(tokens):
    b, n, c = tokens.shape
    side = int((n - 1) ** 0.5)
    return tokens[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)


# family regex -> (module, "input" | "output", transform): where torchvision's forward reduces
ORACLE = [
    (r"^(alexnet|vgg)", "avgpool", "input", None),
    (r"^(resnet|resnext|wide_resnet|regnet|googlenet|inception_v3|efficientnet|mobilenet_v3|convnext|swin)",
     "avgpool", "input", None),
    (r"^densenet", "features", "output", F.relu),  # forward applies F.relu, then pools
    (r"^mnasnet", "layers", "output", None),  # x.mean([2, 3])
    (r"^mobilenet_v2", "features", "output", None),  # F.adaptive_avg_pool2d
    (r"^shufflenet", "conv5", "output", None),  # x.mean([2, 3])
    (r"^(squeezenet|maxvit)", "classifier", "input", None),  # conv classifier / pool inside
    (r"^vit", "encoder", "output", _vit_tokens_to_map),  # x[:, 0] after the encoder
]


def _oracle(name):
    for pattern, module, at, transform in ORACLE:
        if re.search(pattern, name):
            return module, at, transform
    raise AssertionError(f"no oracle for torchvision model {name}: add its family to ORACLE")


def _reduced_tensor(model, name, x):
    module, at, transform = _oracle(name)
    seen = {}
    target = model.get_submodule(module)
    if at == "input":
        handle = target.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    else:
        handle = target.register_forward_hook(lambda m, args, out: seen.setdefault("x", out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return transform(seen["x"]) if transform else seen["x"]


def test_every_family_has_an_oracle():
    for name in MODELS:
        _oracle(name)


@pytest.mark.parametrize("name", MODELS)
def test_body_shape_matches_the_tensor_the_model_reduces(name):
    spec = zoo.resolve(f"torchvision:{name}")
    model = zoo.build(spec, device="meta")
    size = zoo.default_input_size(spec, model)
    x = torch.empty(3, *size, device="meta")
    expected = _reduced_tensor(model, name, x)
    body = autocut.create_body(model, input_size=size).eval()
    with torch.no_grad():
        out = body(x)
    assert out.shape == expected.shape
    assert out.shape[1:] == body.cut.feature_shape
    assert not any(p.device.type != "meta" for p in body.parameters())


SMALL = {
    "resnet18": (3, 64, 64),
    "densenet121": (3, 64, 64),
    "squeezenet1_1": (3, 64, 64),
    "mobilenet_v2": (3, 64, 64),
    "mobilenet_v3_small": (3, 64, 64),
    "shufflenet_v2_x0_5": (3, 64, 64),
    "mnasnet0_5": (3, 64, 64),
    "efficientnet_b0": (3, 64, 64),
    "regnet_x_400mf": (3, 64, 64),
    "googlenet": (3, 64, 64),
    "alexnet": (3, 96, 96),
    "convnext_tiny": (3, 64, 64),
    "swin_t": (3, 64, 64),
    "vit_b_16": (3, 224, 224),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_body_values_equal_the_tensor_the_model_reduces(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = SMALL[name]
    x = torch.randn(2, *size)
    expected = _reduced_tensor(model, name, x)
    body = autocut.create_body(model, input_size=size).eval()
    with torch.no_grad():
        torch.testing.assert_close(body(x), expected)


# fastai's model_meta: resnet/vgg/alexnet cut -2, densenet/squeezenet cut -1
FASTAI_CUTS = {"resnet18": -2, "vgg11": -2, "alexnet": -2, "squeezenet1_1": -1, "densenet121": -1}


@pytest.mark.parametrize("name", sorted(FASTAI_CUTS))
def test_agrees_with_fastai_model_meta_or_improves_on_it(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 96, 96)
    fastai_body = nn.Sequential(*list(model.children())[: FASTAI_CUTS[name]]).eval()
    body = autocut.create_body(model, input_size=(3, 96, 96)).eval()
    with torch.no_grad():
        ours, theirs = body(x), fastai_body(x)
    last_kept = list(dict(model.named_children()))[FASTAI_CUTS[name] - 1]
    if name.startswith("densenet"):
        # fastai's cut loses the ReLU that densenet's forward applies after `features`
        assert (theirs < 0).any()
        torch.testing.assert_close(ours, F.relu(theirs))
        assert body.cut.after == ""  # the ReLU belongs to no module
    else:
        torch.testing.assert_close(ours, theirs)
        assert body.cut.after == last_kept  # "the end of layer4": fastai's last kept child
