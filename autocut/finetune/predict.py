"""``predict``: top-k classes of images; ``predict_masks``: a class per pixel (a segmentation's
checkpoint), written as palette PNGs by ``save_mask`` and drawn over the image by ``save_overlay``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autocut._validate import POSITIVE_INT
from autocut.finetune.checkpoint import load_model
from autocut.finetune.data import convert_image, eval_transform, image_mode, open_image

__all__ = ["predict", "read_image", "predict_masks", "save_mask", "save_overlay", "palette", "class_shares"]


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
    model, meta = _model_and_meta(checkpoint)
    if meta.get("task") == "segment":
        raise ValueError("predict gives classes of whole images; this checkpoint segments them: use predict_masks()")
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


def _model_and_meta(checkpoint) -> tuple[torch.nn.Module, dict[str, Any]]:
    return load_model(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint


@torch.no_grad()
def predict_masks(
    checkpoint: str | os.PathLike | tuple[torch.nn.Module, dict[str, Any]],
    images: Sequence[Any],
    bs: int = 16,
) -> list[np.ndarray]:
    """The class of each pixel of each image: an ``(H, W)`` array at the image's own size.

    Each image is resized to the training size and normalised as in validation; the model's
    scores are resized back (bilinear) before the most likely class is taken.

    Args:
        checkpoint: a segmentation run's folder (``finetune(task="segment")``), its
            ``model.json``/``model.safetensors``, or ``(model, meta)`` from :func:`~autocut.finetune.load_model`.
        images: file paths or PIL images.
        bs: images per forward pass.

    Raises:
        ValueError: a classification checkpoint, ``bs`` below 1, an unreadable image (named).

    Example:
        >>> (mask,) = predict_masks("runs/shapes", ["scene.png"])
        >>> mask.shape, mask.dtype
        ((480, 640), dtype('uint8'))
    """
    from autocut.finetune.masks import mask_transform

    POSITIVE_INT.check("bs", bs)
    model, meta = _model_and_meta(checkpoint)
    if meta.get("task") != "segment":
        raise ValueError("predict_masks needs a segmentation checkpoint (finetune(task='segment')); this one classifies: "
                         "use predict()")
    n_in, size = meta["input_size"][0], meta["input_size"][-1]
    tfm = mask_transform(size, meta["normalization"]["mean"], meta["normalization"]["std"])
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), bs):
        chunk = [read_image(im, n_in) if isinstance(im, (str, Path)) else convert_image(im, image_mode(n_in))
                 for im in images[start:start + bs]]
        from torchvision.transforms.v2 import functional as TF

        scores = model(torch.stack([tfm(TF.pil_to_tensor(im)) for im in chunk]).to(device)).float()
        for s, im in zip(scores, chunk):
            s = torch.nn.functional.interpolate(s[None], size=(im.height, im.width), mode="bilinear", align_corners=False)
            out.append(s[0].argmax(0).to(torch.uint8 if s.shape[1] <= 256 else torch.int64).cpu().numpy())
    return out


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, class 0 black: PASCAL VOC's colour map (bits of the index
    spread over the channels), so masks look as VOC's do."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def save_mask(mask: np.ndarray, path: str | os.PathLike, n_classes: int) -> Path:
    """Write ``mask`` as a PNG whose pixel values are the class indices (mode ``P`` with
    :func:`palette` for up to 256 classes, 16-bit grey beyond), the format training reads."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if n_classes <= 256:
        image = Image.fromarray(mask.astype(np.uint8), "P")
        image.putpalette(palette(256).reshape(-1).tolist())
    else:
        image = Image.fromarray(mask.astype(np.uint16), "I;16")
    image.save(path)
    return path


def save_overlay(image, mask: np.ndarray, path: str | os.PathLike, n_classes: int, alpha: float = 0.5) -> Path:
    """Write the RGB ``image`` with each pixel not of class 0 blended with its class's colour."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = palette(max(n_classes, 2)).astype(np.float32)[np.minimum(mask, max(n_classes, 2) - 1)]
    blend = np.where((mask > 0)[..., None], (1 - alpha) * rgb + alpha * colours, rgb)
    Image.fromarray(np.round(blend).astype(np.uint8), "RGB").save(path)
    return path


def class_shares(mask: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """The share of the pixels each class has in ``mask``, largest first (classes absent left out)."""
    counts = np.bincount(mask.reshape(-1).astype(np.int64), minlength=len(classes))
    order = np.argsort(-counts, kind="stable")
    return {classes[i]: counts[i] / mask.size for i in order if counts[i]}
