"""autocut: fine-tune any vision backbone without knowing where to cut it.

>>> import autocut
>>> cut = autocut.discover("resnet34")          # where, nf, layout, stride, how it was found
>>> model = autocut.adapt("resnet34", n_out=37)  # nn.Sequential(body, head)
>>> pyramid = autocut.create_pyramid("resnet34")  # a map per stride: 2, 4, 8, 16, 32
>>> seg = autocut.unet("resnet34", n_out=5)        # fastai's dynamic U-Net on the pyramid
"""

from autocut.adapt import AdaptedModel, adapt, apply_init, create_body
from autocut.cut import Cut
from autocut.discover import discover
from autocut.errors import CutError
from autocut.groups import group_summary, layer_groups, splitter
from autocut.layers import AdaptiveConcatPool2d, SigmoidRange, create_head, fuse_bn_dropout
from autocut.memo import clear_cache
from autocut.optim import param_groups
from autocut.pyramid import Pyramid, create_pyramid, discover_pyramid
from autocut.unet import Unet, unet

__all__ = [
    "AdaptedModel",
    "AdaptiveConcatPool2d",
    "Cut",
    "CutError",
    "Pyramid",
    "SigmoidRange",
    "adapt",
    "apply_init",
    "clear_cache",
    "create_body",
    "create_head",
    "create_pyramid",
    "discover",
    "discover_pyramid",
    "finetune",
    "fuse_bn_dropout",
    "group_summary",
    "layer_groups",
    "param_groups",
    "splitter",
    "unet",
    "Unet",
]

__version__ = "0.1.0"

from autocut.finetune import finetune  # noqa: E402  (last: it uses the API above)
