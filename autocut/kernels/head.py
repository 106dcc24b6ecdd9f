"""Moved to :mod:`autocut.kernels.fold` (it folds a head; it holds no kernel); this name keeps working."""

import warnings

from autocut.kernels.fold import *  # noqa: F403
from autocut.kernels.fold import __all__  # noqa: F401

warnings.warn("autocut.kernels.head moved to autocut.kernels.fold", DeprecationWarning, stacklevel=2)
