"""autocut: fine-tune any vision backbone without knowing where to cut it.

>>> import autocut
>>> cut = autocut.discover("resnet34")          # where, nf, layout, stride, how it was found
>>> model = autocut.adapt("resnet34", n_out=37)  # nn.Sequential(body, head)
"""

from autocut.adapt import AdaptedModel, adapt, apply_init, create_body
from autocut.cut import Cut
from autocut.discover import discover
from autocut.errors import CutError
from autocut.groups import group_summary, layer_groups, splitter
from autocut.layers import AdaptiveConcatPool2d, SigmoidRange, create_head, fuse_bn_dropout
from autocut.optim import param_groups

__all__ = [
    "AdaptedModel",
    "AdaptiveConcatPool2d",
    "Cut",
    "CutError",
    "SigmoidRange",
    "adapt",
    "apply_init",
    "create_body",
    "create_head",
    "discover",
    "finetune",
    "fuse_bn_dropout",
    "group_summary",
    "layer_groups",
    "param_groups",
    "splitter",
]

__version__ = "0.1.0"

from autocut.finetune import finetune  # noqa: E402  (last: it uses the API above)
