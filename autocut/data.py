"""Moved to :mod:`autocut.finetune.data` (it serves fine-tuning only); this name keeps working."""

import warnings

from autocut.finetune.data import *  # noqa: F403
from autocut.finetune.data import __all__  # noqa: F401

warnings.warn("autocut.data moved to autocut.finetune.data", DeprecationWarning, stacklevel=2)
