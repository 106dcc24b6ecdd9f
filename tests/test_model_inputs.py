"""Models as users hand them in: on the meta device or in half precision, in eval mode, with
hooks, compiled, cut by hand, at the wrong size or channels, unknown by name, without a map,
returning a dataclass. Each is adapted correctly or refused with what to pass instead."""


import pytest
import torch

import autocut

SIZE = (3, 32, 32)


def _x(b=2, c=3, dtype=torch.float32):
    return torch.randn(b, c, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


# --- what a refusal says --------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("resnet18x", "unknown model 'resnet18x'; close matches: resnet18, resnet18d"),
    ("RESNET18", "unknown model 'RESNET18'; close matches: resnet18, resnet18d"),
    ("resnet18.badtag", "unknown pretrained tag 'badtag' of timm's resnet18 in 'resnet18.badtag': close matches: "
                        "resnet18.tv_in1k, resnet18.a3_in1k, resnet18.a2_in1k, resnet18.a1_in1k; pass one of its 7 "
                        "tagged names (timm.list_pretrained('resnet18.*')) or 'resnet18' alone"),
])
def test_an_unknown_name_is_a_cut_error_and_a_value_error(name, message):
    with pytest.raises(ValueError) as err:  # callers that catch ValueError still do
        autocut.adapt(name, n_out=3)
    assert isinstance(err.value, autocut.CutError) and str(err.value).startswith(message)
