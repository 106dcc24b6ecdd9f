"""``predict``: top-k classes of images, from a fine-tuning checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autocut._validate import POSITIVE_INT
from autocut.finetune.checkpoint import load_model
from autocut.finetune.data import convert_image, eval_transform, image_mode, open_image

__all__ = ["predict", "read_image"]


def read_image(path: str | os.PathLike, n_in: int = 3):
    """A PIL image with ``n_in`` channels, read as training reads it (16-bit grey scaled).

    Raises:
        ValueError: naming the file, if it cannot be read.
    """
    return open_image(path, image_mode(n_in))


@torch.no_grad()
def predict(
    checkpoint: str | os.PathLike | tuple[torch.nn.Module, dict[str, Any]],
    images: Sequence[Any],
    top_k: int = 5,
    bs: int = 64,
) -> list[list[tuple[str, float]]]:
    """The ``top_k`` classes and probabilities of each image, best first.

    Args:
        checkpoint: a run folder, its ``model.json``/``model.safetensors``, or the
            ``(model, meta)`` pair :func:`~autocut.finetune.load_model` returns.
        images: file paths or PIL images; resized, centre-cropped and normalised as in
            validation.
        top_k: how many classes per image, 1 or more (at most the number of classes are
            returned).
        bs: images per forward pass.

    Raises:
        ValueError: ``top_k`` or ``bs`` below 1, an image file that cannot be read, or a
            damaged checkpoint (each named).

    Example:
        >>> predict("runs/resnet18", ["seven.png"], top_k=2)
        [[('7', 0.97), ('1', 0.02)]]
    """
    POSITIVE_INT.check("top_k", top_k)
    POSITIVE_INT.check("bs", bs)
    model, meta = load_model(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    n_in, size = meta["input_size"][0], meta["input_size"][-1]
    tfm = eval_transform(size, meta["normalization"]["mean"], meta["normalization"]["std"])
    device = next(model.parameters()).device
    model.eval()
    classes, k = meta["classes"], min(top_k, len(meta["classes"]))
    results = []
    for start in range(0, len(images), bs):
        chunk = [read_image(im, n_in) if isinstance(im, (str, Path)) else convert_image(im, image_mode(n_in))
                 for im in images[start:start + bs]]
        probs = model(torch.stack([tfm(im) for im in chunk]).to(device)).float().softmax(-1)
        values, indices = probs.topk(k, dim=-1)
        results += [[(classes[i], float(p)) for p, i in zip(v.tolist(), ix.tolist())] for v, ix in zip(values, indices)]
    return results
