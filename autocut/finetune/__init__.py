"""Fine-tune any backbone end to end: ``finetune`` (one process or ``torchrun``), checkpoints
that load without unpickling (``load_model``), and ``predict``.

>>> from autocut.finetune import finetune, predict
>>> model, history = finetune("resnet18", "digits", out="runs/digits")
>>> predict("runs/digits", ["seven.png"], top_k=3)
>>> model, history = finetune(task="segment", out="runs/shapes")  # a U-Net on the embedded shapes
>>> predict_masks("runs/shapes", ["scene.png"])                     # a class index per pixel
"""

from autocut.finetune.checkpoint import load_model
from autocut.finetune.predict import predict, predict_masks
from autocut.finetune.train import Options, finetune

__all__ = ["finetune", "load_model", "predict", "predict_masks", "Options"]
