"""Input channels (``autocut.channels``): the layer that reads the image found and rebuilt for
``n_in`` channels, against the model's own output (zero-initialised extra channels change nothing)
and timm's ``adapt_input_conv``."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import autocut


@pytest.mark.zoo
@pytest.mark.parametrize(
    "name,size",
    [("resnet18", (3, 64, 64)), ("densenet121", (3, 64, 64)), ("efficientnet_b0", (3, 64, 64)),
     ("convnext_atto", (3, 64, 64)), ("vit_tiny_patch16_224", (3, 224, 224)), ("swin_tiny_patch4_window7_224", (3, 224, 224))],
)
def test_zero_init_extra_channels_change_nothing(name, size):
    torch.manual_seed(0)
    original = timm.create_model(name).eval()
    reference = autocut.create_body(copy.deepcopy(original), input_size=size).eval()
    model = autocut.adapt(original, n_out=3, input_size=size, n_in=5, n_in_init="zero").eval()
    assert model.cut.input_size == (5, *size[1:])
    x = torch.randn(2, *size)
    x5 = torch.cat([x, torch.zeros(2, 2, *size[1:])], 1)
    with torch.no_grad():
        torch.testing.assert_close(model[0](x5), reference(x))
        assert model(x5).shape == (2, 3)


def test_repeat_sum_and_random_inits():
    torch.manual_seed(0)
    original = torchvision.models.resnet18().eval()
    w = original.conv1.weight.detach().clone()
    gray = autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=1)
    torch.testing.assert_close(gray.conv1.weight, w.sum(1, keepdim=True))
    four = autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=4)  # timm's default: repeat
    torch.testing.assert_close(four.conv1.weight[:, :3], w * 3 / 4)
    torch.testing.assert_close(four.conv1.weight[:, 3], w[:, 0] * 3 / 4)
    rnd = autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=2, n_in_init="random")
    assert rnd.conv1.weight.shape[1] == 2 and rnd(torch.randn(1, 2, 32, 32)).shape == (1, 512, 1, 1)
    with pytest.raises(autocut.CutError, match="use it with n_in=1"):
        autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=4, n_in_init="sum")
    with pytest.raises(autocut.CutError, match="n_in_init must be one of"):
        autocut.create_body(copy.deepcopy(original), input_size=(3, 32, 32), n_in=4, n_in_init="mean")


class _ScaledInput(nn.Module):
    """Reads the image through a per-pixel parameter, never a Conv2d/Linear on its channels."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 3, 1, 1))
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = (x * self.scale).sum(1, keepdim=True)
        return self.fc(self.conv(x).mean((2, 3)))


def test_model_without_an_input_layer_refuses_n_in():
    refusal = (r"^no Conv2d or Linear reads the 3 input channels of this model directly, so n_in cannot be changed "
               r"automatically: adapt the first layer yourself, or pass cut= a callable$")
    with pytest.raises(autocut.CutError, match=refusal):
        autocut.adapt(_ScaledInput(), n_out=2, input_size=(3, 16, 16), n_in=4)


class LinearStem(nn.Module):
    """Reads the image with a Linear over the channels (channels last), like an MLP-Mixer's stem."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_linear_input_layer_is_rebuilt_like_a_conv():
    from autocut.channels import find_input_layer, set_input_channels

    torch.manual_seed(0)
    model = LinearStem()
    w, b = model.embed.weight.detach().clone(), model.embed.bias.detach().clone()
    assert find_input_layer(copy.deepcopy(model), (3, 16, 16)) == "embed"
    for n_in, init, want in [
        (1, None, w.sum(1, keepdim=True)),  # "sum" by default for one channel
        (5, None, torch.cat([w, w[:, :2]], 1) * 3 / 5),  # timm's repeat-and-rescale
        (5, "zero", torch.cat([w, torch.zeros(8, 2)], 1)),
    ]:
        body = copy.deepcopy(model)
        assert set_input_channels(body, n_in, (3, 16, 16), init) == "embed"
        assert isinstance(body.embed, nn.Linear) and body.embed.in_features == n_in
        torch.testing.assert_close(body.embed.weight, want)
        torch.testing.assert_close(body.embed.bias, b)
    with pytest.raises(autocut.CutError, match="n_in_init='zero' keeps the 3 original channels: n_in must be >= 3, got 2"):
        set_input_channels(copy.deepcopy(model), 2, (3, 16, 16), "zero")
    for bad in (0, True, 2.0):
        with pytest.raises(autocut.CutError, match="n_in must be a positive int"):
            set_input_channels(copy.deepcopy(model), bad, (3, 16, 16))
    rnd = copy.deepcopy(model)
    set_input_channels(rnd, 4, (3, 16, 16), "random")
    assert rnd.embed.weight.shape == (8, 4) and rnd.embed.weight.std() > 0


def test_a_grouped_input_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(autocut.CutError, match="the input layer '0' is a grouped conv"):
        autocut.adapt(model, n_out=2, input_size=(4, 16, 16), n_in=3)


class NestedStem(nn.Module):
    """The input layer inside a container, without a bias: a conv, or a Linear on channels last."""

    def __init__(self, linear: bool):
        super().__init__()
        self.linear = linear
        self.embed = nn.Sequential(nn.Linear(3, 8, bias=False) if linear else nn.Conv2d(3, 8, 1, bias=False))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.linear else self.embed(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_a_nested_input_layer_is_replaced_where_it_sits_in_its_dtype_and_bias(linear):
    from autocut.channels import set_input_channels

    model = NestedStem(linear).double()
    first = model.embed[0]
    path = set_input_channels(model, 4, (3, 16, 16), "zero")
    new = model.get_submodule(path)
    assert path == "embed.0" and model.embed[0] is new and new is not first
    assert new.weight.dtype == torch.float64 and new.bias is None
    assert new.weight.shape[1] == 4 and not new.weight[:, 3].any()
    assert model(torch.randn(2, 4, 16, 16, dtype=torch.float64)).shape == (2, 2)


class PaddedStem(nn.Module):
    """A stem conv with a bias and reflect padding, as a hand-written model may have."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.stem(x).mean((2, 3)))


def test_the_rebuilt_conv_keeps_its_bias_padding_mode_and_device():
    from autocut.channels import set_input_channels

    torch.manual_seed(0)
    model = PaddedStem()
    old = model.stem
    set_input_channels(model, 4, (3, 16, 16), "zero")
    new = model.stem
    assert (new.padding_mode, new.in_channels) == ("reflect", 4)
    assert torch.equal(new.bias, old.bias) and torch.equal(new.weight[:, :3], old.weight)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # zero extra channels: the same output as the RGB model, at the borders too
        torch.testing.assert_close(new(torch.cat([x, torch.randn(2, 1, 16, 16)], 1)), old(x))
    meta = PaddedStem().to("meta")
    set_input_channels(meta, 2, (3, 16, 16))  # a meta body stays on meta (no copy out of it)
    assert meta.stem.weight.is_meta and meta.stem.weight.shape == (8, 2, 3, 3)
    linear = NestedStem(linear=True).to("meta")
    set_input_channels(linear, 2, (3, 16, 16))
    assert linear.embed[0].weight.is_meta and linear.embed[0].weight.shape == (8, 2)


def test_default_inits_and_the_same_channel_count():
    from timm.models import adapt_input_conv

    from autocut.channels import set_input_channels

    torch.manual_seed(0)
    model = PaddedStem()
    rgb = model.stem.weight.detach().clone()
    set_input_channels(model, 2, (3, 16, 16))  # two channels: timm's repeat-and-rescale by default
    torch.testing.assert_close(model.stem.weight, adapt_input_conv(2, rgb))
    model = PaddedStem()
    rgb = model.stem.weight.detach().clone()
    set_input_channels(model, 3, (3, 16, 16), "zero")  # zero init to the same count copies the weights
    assert torch.equal(model.stem.weight, rgb)
    with pytest.raises(autocut.CutError, match=r"^n_in_init must be one of \('repeat', 'sum', 'zero', 'random'\), "
                                               r"got 'spread'$"):
        set_input_channels(PaddedStem(), 2, (3, 16, 16), "spread")
