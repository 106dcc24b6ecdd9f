"""adapt / create_body on zoo models: heads, init, checkpoints, errors."""


import pytest
import timm
import torch
import torchvision
from torch import nn

import autocut

from handmade import FunctionalPoolNet


def test_adapt_builds_body_and_head_with_fastai_init():
    model = autocut.adapt("resnet18", n_out=37, input_size=(3, 64, 64))
    assert isinstance(model, nn.Sequential) and len(model) == 2
    assert model.cut.nf == 512 and model.cut.arch == "resnet18"
    assert [g[:2] for g in model.cut.groups] == [("conv1", "layer2"), ("layer3", "layer4"), ("head", "head")]
    assert sum(g[2] for g in model.cut.groups) == sum(p.numel() for p in model.parameters())
    assert "group 1    layer3 .. layer4" in str(model.cut)
    assert model.training
    head = model[1]
    bns = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)  # norms skipped
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 2 * model.cut.nf
    assert all(lin.bias is None or torch.equal(lin.bias, torch.zeros_like(lin.bias)) for lin in linears)
    # kaiming_normal_ (fan_in, relu gain): std ~ sqrt(2 / fan_in)
    w = linears[0].weight
    assert abs(w.std().item() - (2 / w.shape[1]) ** 0.5) < 0.1 * (2 / w.shape[1]) ** 0.5
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 37)
    assert not any(k.startswith("fc.") for k in model[0].state_dict())


def test_custom_head_and_init_none():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    before = head[2].weight.clone()
    model = autocut.adapt(FunctionalPoolNet(), n_out=2, input_size=(3, 32, 32), custom_head=head, init=None)
    assert model[1] is head and torch.equal(head[2].weight, before)
    with pytest.raises(autocut.CutError, match="do nothing with custom_head"):
        autocut.adapt(FunctionalPoolNet(), n_out=2, input_size=(3, 32, 32), custom_head=head, ps=0.1)


def test_weights_from_a_safetensors_checkpoint_load_into_the_body(tmp_path):
    from safetensors.torch import save_file

    source = torchvision.models.resnet18(num_classes=7)  # another head size: its keys are ignored
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = autocut.adapt("torchvision:resnet18", n_out=3, weights=path, input_size=(3, 64, 64)).eval()
    torch.testing.assert_close(model[0].state_dict()["layer4.1.conv2.weight"], source.layer4[1].conv2.weight)
    x = torch.randn(2, 3, 64, 64)
    expected = nn.Sequential(*list(source.children())[:-2]).eval()(x)
    torch.testing.assert_close(model[0](x), expected)


def test_weights_from_a_torch_state_dict_with_wrappers(tmp_path):
    source = FunctionalPoolNet()
    path = tmp_path / "net.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = autocut.adapt(FunctionalPoolNet(), n_out=2, weights=path, input_size=(3, 32, 32))
    torch.testing.assert_close(model[0].state_dict()["stem.0.weight"], source.stem[0].weight)


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoints_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(autocut.CutError, match="never unpickles"):
        autocut.adapt(FunctionalPoolNet(), n_out=2, weights=path, input_size=(3, 32, 32))


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(autocut.CutError, match="does not fit the body"):
        autocut.adapt(FunctionalPoolNet(), n_out=2, weights=path, input_size=(3, 32, 32))


def test_bad_arguments_are_refused_with_what_to_pass():
    with pytest.raises(autocut.CutError, match="n_out must be a positive int"):
        autocut.adapt("resnet18", n_out=0)
    with pytest.raises(autocut.CutError, match="input_size must be"):
        autocut.discover("resnet18", input_size=(224, 224))
    with pytest.raises(autocut.CutError, match="not both"):
        autocut.adapt("resnet18", n_out=2, pretrained=True, weights="x.pt")
    with pytest.raises(autocut.CutError, match=r"needs its own input size, \(3, 224, 224\)"):
        autocut.discover("vit_tiny_patch16_224", input_size=(3, 64, 64))


def test_cut_prints_what_a_user_asks_for():
    text = str(autocut.discover("torchvision:densenet121"))
    assert "densenet121" in text and "1024 channels" in text and "stride 32" in text and "classifier" in text


def _linears(head):
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


def test_init_zeroes_the_biases_of_heads_that_have_them():
    # first_bn=False: the first Linear has no BatchNorm before it, so it keeps a bias (nn.Linear's
    # own init makes it non-zero); fastai's apply_init zeroes it, and kaiming-inits the weight
    model = autocut.adapt(FunctionalPoolNet(), n_out=3, input_size=(3, 32, 32), first_bn=False)
    first = _linears(model[1])[0]
    assert first.bias is not None and torch.equal(first.bias, torch.zeros_like(first.bias))
    fan_in = first.weight.shape[1]
    assert abs(first.weight.std().item() - (2 / fan_in) ** 0.5) < 0.25 * (2 / fan_in) ** 0.5
    ones = autocut.adapt(FunctionalPoolNet(), n_out=3, input_size=(3, 32, 32), first_bn=False, init=nn.init.ones_)
    assert all(torch.equal(lin.weight, torch.ones_like(lin.weight)) for lin in _linears(ones[1]))
    assert torch.equal(_linears(ones[1])[0].bias, torch.zeros(512))


def test_init_reaches_a_custom_head_but_not_its_norms():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with torch.no_grad():
        head[2].weight.fill_(2.0)
    model = autocut.adapt(FunctionalPoolNet(), n_out=2, input_size=(3, 32, 32), custom_head=head, init=nn.init.ones_)
    assert model[1] is head
    assert torch.equal(head[3].weight, torch.ones(2, 8)) and torch.equal(head[3].bias, torch.zeros(2))
    assert torch.equal(head[2].weight, torch.full((8,), 2.0)) and torch.equal(head[2].bias, torch.zeros(8))


class _Positive(nn.Module):
    def forward(self, x):
        return x.abs()


def test_init_reaches_the_weight_of_parametrized_layers_whatever_tensor_is_parametrized():
    from torch.nn.utils import parametrizations, parametrize

    normed = parametrizations.spectral_norm(nn.Linear(8, 8))  # the weight parametrized: init its original
    positive = nn.Linear(8, 2)
    parametrize.register_parametrization(positive, "bias", _Positive())  # the bias alone parametrized
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8), normed, positive)
    autocut.adapt(FunctionalPoolNet(), n_out=2, input_size=(3, 32, 32), custom_head=head, init=nn.init.ones_)
    assert torch.equal(normed.parametrizations.weight.original, torch.ones(8, 8))
    assert torch.equal(positive.weight, torch.ones(2, 8)) and torch.equal(normed.bias, torch.zeros(8))


def test_init_reaches_the_head_with_n_in_and_leaves_the_new_input_layer_to_n_in_init():
    torch.manual_seed(0)
    original = torchvision.models.resnet18()
    w = original.conv1.weight.detach().clone()
    model = autocut.adapt(original, n_out=2, input_size=(3, 32, 32), n_in=4, n_in_init="zero", init=nn.init.ones_)
    assert all(torch.equal(lin.weight, torch.ones_like(lin.weight)) for lin in _linears(model[1]))
    conv1 = model[0].conv1
    assert conv1.weight.shape == (64, 4, 7, 7)
    assert torch.equal(conv1.weight[:, :3], w) and not conv1.weight[:, 3].any()


def test_a_checkpoint_that_does_not_fit_says_which_keys_and_shapes(tmp_path):
    state = FunctionalPoolNet().state_dict()
    short = {k: v for k, v in state.items() if not k.startswith("stage.")}
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(autocut.CutError, match=r"short.pt does not fit the body of FunctionalPoolNet: 7 missing "
                                               r"\(e.g. stage.0.weight, stage.0.bias, stage.1.weight\)\. Is it a checkpoint"):
        autocut.adapt(FunctionalPoolNet(), n_out=2, weights=tmp_path / "short.pt", input_size=(3, 32, 32))
    wide = dict(state, **{"stem.0.weight": torch.zeros(8, 3, 5, 5), "stage.1.weight": torch.zeros(3)})
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(autocut.CutError, match=r"2 of another shape \(e.g. stem.0.weight: \(8, 3, 5, 5\) vs \(8, 3, 3, 3\)\)"):
        autocut.adapt(FunctionalPoolNet(), n_out=2, weights=tmp_path / "wide.pt", input_size=(3, 32, 32))
    both = {k: v for k, v in wide.items() if not k.startswith("stage.0.")}
    torch.save(both, tmp_path / "both.pt")
    with pytest.raises(autocut.CutError, match=r": 2 missing \(e.g. stage.0.weight, stage.0.bias\); 2 of another shape"):
        autocut.adapt(FunctionalPoolNet(), n_out=2, weights=tmp_path / "both.pt", input_size=(3, 32, 32))



def test_a_model_whose_layer_groups_cannot_be_found_is_adapted_with_a_warning_quoting_the_error(monkeypatch):
    import importlib

    def fails(model, n=3):  # as a groups' forward that fails would
        raise RuntimeError("the groups' forward failed\nand this second line is not quoted")

    monkeypatch.setattr(importlib.import_module("autocut.adapt"), "group_summary", fails)
    with pytest.warns(UserWarning) as caught:
        model = autocut.adapt(FunctionalPoolNet(), n_out=3, input_size=(3, 32, 32))
    assert [str(w.message) for w in caught] == [
        "the layer groups of FunctionalPoolNet could not be found (RuntimeError: the groups' forward failed); "
        "model.cut.groups is empty and layer_groups(model) raises"]
    assert model.cut.groups == () and model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_a_head_whose_init_is_torchs_skips_the_default_init_it_would_redraw(monkeypatch):
    backbones = [FunctionalPoolNet(), FunctionalPoolNet()]
    drawn = []
    reset = nn.Linear.reset_parameters

    def counted(self):  # (a Linear made on the meta device draws nothing)
        if not self.weight.is_meta:
            drawn.append(tuple(self.weight.shape))
        reset(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", counted)
    model = autocut.adapt(backbones[0], n_out=3, input_size=(3, 32, 32), first_bn=False)
    assert drawn == []  # kaiming_normal_ draws every weight, apply_init zeroes every bias
    first = _linears(model[1])[0]
    assert torch.equal(first.bias, torch.zeros_like(first.bias))
    fan_in = first.weight.shape[1]
    assert abs(first.weight.std().item() - (2 / fan_in) ** 0.5) < 0.25 * (2 / fan_in) ** 0.5
    from functools import partial

    autocut.adapt(backbones[1], n_out=3, input_size=(3, 32, 32), init=partial(nn.init.normal_, std=0.01))
    assert drawn == []
    autocut.adapt(FunctionalPoolNet(), n_out=3, input_size=(3, 32, 32), init=lambda w: nn.init.ones_(w))
    assert drawn == [(10, 16), (512, 32), (3, 512)]  # the backbone's own, then the head's two (default init kept)


def test_an_init_of_the_users_own_gets_a_head_initialised_as_pytorch_does_first(monkeypatch):
    # a callable that leaves a weight as it finds it must find PyTorch's init there, not empty memory
    model = autocut.adapt(FunctionalPoolNet(), n_out=3, input_size=(3, 32, 32), first_bn=False, init=lambda w: None)
    for lin in _linears(model[1]):
        bound = 1 / lin.weight.shape[1] ** 0.5  # nn.Linear's kaiming_uniform_(a=sqrt(5)) bound
        assert lin.weight.abs().max() <= bound and lin.weight.std() > bound / 4
    first = _linears(model[1])[0]
    assert torch.equal(first.bias, torch.zeros_like(first.bias))  # biases zeroed all the same


def test_a_named_model_is_built_with_a_classifier_of_n_out_as_its_zoo_would_build_it():
    torch.manual_seed(0)
    expected = torchvision.models.resnet18(num_classes=7)  # its convolutions re-initialised after the fc is made
    torch.manual_seed(0)
    model = autocut.adapt("torchvision:resnet18", n_out=7)
    assert torch.equal(model[0].conv1.weight, expected.conv1.weight)
    assert torch.equal(model[0].get_parameter("layer4.1.conv2.weight"), expected.layer4[1].conv2.weight)
    assert model.cut.nf == 512 and model.cut.dropped == autocut.discover("torchvision:resnet18").dropped
    torch.manual_seed(0)
    timm_model = timm.create_model("resnet18", num_classes=7)
    torch.manual_seed(0)
    assert torch.equal(autocut.adapt("resnet18", n_out=7)[0].conv1.weight, timm_model.conv1.weight)
