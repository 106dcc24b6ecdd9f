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
    with pytest.raises(autocut.CutError, match="no Conv2d or Linear reads"):
        autocut.adapt(_ScaledInput(), n_out=2, input_size=(3, 16, 16), n_in=4)
