"""Data for dense fine-tuning (``finetune(task="segment")``): images with masks of class indices.

Two sources:

- ``"shapes"``: the embedded set (:func:`autocut.finetune.shapes.shapes`), made on the spot, no
  download; with ``augment`` its training images are drawn afresh for each epoch (the
  augmentation a generated set allows: no image is seen twice), the validation images stay;
- a folder holding ``images/`` and ``masks/`` (or ``train/`` and ``valid/``, each holding both):
  each image's mask is the file of the same stem in ``masks/`` (``cat.jpg`` and ``cat.png``), a
  single-channel PNG (mode ``L``, ``P`` or 16-bit grey) whose pixels are class indices; the
  optional ``classes.txt`` names the classes, one per line, index 0 first. The value 255
  (:data:`IGNORE`, VOC's void border) is ignored by the loss and the metrics where there are
  fewer than 255 classes.

Everything a run would trip on is found before it starts, each a ``ValueError`` naming the file:
images without masks, masks of another size than their image, masks of several channels,
class indices out of range.

Images and masks go through the same geometric transforms (torchvision's ``transforms.v2``, which
resamples masks with nearest neighbours): resized to ``size x size`` (and, for training with
``augment``, a random crop of 35-100% of the area and a horizontal flip, seeded per
``(seed, epoch, index)`` as :mod:`autocut.finetune.data` does).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from autocut.finetune.data import (
    IMAGE_EXTENSIONS,
    Data,
    ImageFiles,
    Tensors,
    _split,
    channel_stats,
    convert_image,
    image_mode,
    open_image,
    sample_seed,
)

__all__ = ["IGNORE", "SHAPES", "MaskTensors", "ShapeDraws", "MaskFiles", "read_mask", "mask_transform", "shapes_data",
           "mask_folder", "load_masks"]

IGNORE = 255  # a mask value no class has: left out of the loss and the metrics
SHAPES = "shapes"
SHAPES_SIZE = 48  # the default run learns the shapes fastest per second at this size (README)
SHAPES_COUNT = 800
_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as an ``(H, W)`` int64 array of class indices.

    Raises:
        ValueError: naming the file, when PIL cannot read it or it has several channels (an RGB
            picture of the classes rather than their indices).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in _MASK_MODES:
                raise ValueError(f"mask {path} is a {mode} image: masks are single-channel PNGs of class indices "
                                 "(mode L or P, pixel value = class index), not colours")
            return np.asarray(im, dtype=np.int64)
    except ValueError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ... on bad files
        raise ValueError(f"cannot read mask {path} ({type(err).__name__}: {err})") from err


def mask_transform(size: int, mean: Sequence[float], std: Sequence[float], augment: bool = False) -> Callable:
    """``(image, mask) -> (normalised float image, int64 mask)``, both ``size x size``: resized, or
    with ``augment`` a random crop of 35-100% of the area and a horizontal flip, the same for both."""
    from torchvision.transforms import v2

    geometry = ([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()] if augment
                else [v2.Resize((size, size), antialias=True)])
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def _apply(tfm: Callable, image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms.v2 import functional as TF

    return _apply_batch(tfm, TF.pil_to_tensor(image), torch.from_numpy(mask))


def _apply_batch(tfm: Callable, pixels: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tfm`` on uint8 images ``([N,] C, H, W)`` and their masks ``([N,] H, W)`` together."""
    from torchvision import tv_tensors

    x, y = tfm(tv_tensors.Image(pixels), tv_tensors.Mask(masks))
    return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor).long()


class MaskTensors(Tensors):
    """Images and masks already turned into tensors: ``(x[i], y[i])``, ``y`` of class indices."""

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class MaskFiles(ImageFiles):
    """Image files and their masks (``pairs``), read and transformed together; random transforms
    are seeded by ``(seed, epoch, index)``, as :class:`~autocut.finetune.data.ImageFiles`' are."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], transform: Callable, mode: str, seed: int = 0,
                 random: bool = False):
        super().__init__(pairs, transform, mode, seed=seed, random=random)

    @property
    def pairs(self) -> list[tuple[Path, Path]]:
        return self.samples

    def __getitem__(self, i: int):
        image_path, mask_path = self.pairs[i]
        image, mask = open_image(image_path, self.mode), read_mask(mask_path)
        return self._seeded(i, lambda: _apply(self.transform, image, mask))


def _shape_tensors(n: int, size: int, n_in: int, mean: Sequence[float], std: Sequence[float],
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of shapes drawn from ``seed`` and their masks, transformed in one batch to the values a
    PNG of each read through :func:`mask_folder` gives."""
    from PIL import Image

    from autocut.finetune.shapes import shapes

    images, masks = shapes(n, size=size, seed=seed)
    tfm = mask_transform(size, channel_stats(mean, n_in), channel_stats(std, n_in))
    mode = image_mode(n_in)
    if mode != "RGB":
        images = np.stack([np.asarray(convert_image(Image.fromarray(im, "RGB"), mode)) for im in images])
    pixels = torch.from_numpy(images.reshape(n, size, size, -1)).permute(0, 3, 1, 2)
    return _apply_batch(tfm, pixels, torch.from_numpy(masks))


class ShapeDraws(MaskTensors):
    """The embedded set's training images, drawn afresh for each epoch: ``n`` images of shapes
    from the seed of ``(seed, epoch)``, so a run never sees an image twice (a generated set has
    no end) yet every process, and a resumed run, draws the same ones."""

    def __init__(self, n: int, size: int, n_in: int, mean: Sequence[float], std: Sequence[float], seed: int):
        self.n, self.size, self.n_in, self.mean, self.std, self.seed = n, size, n_in, mean, std, seed
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's images (call before iterating; workers copy the dataset)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.x, self.y = _shape_tensors(self.n, self.size, self.n_in, self.mean, self.std,
                                            sample_seed(self.seed, epoch, 0, stream=2))


def shapes_data(size: int = SHAPES_SIZE, n_in: int = 3, mean: Sequence[float] = (0.485, 0.456, 0.406),
                std: Sequence[float] = (0.229, 0.224, 0.225), valid_pct: float = 0.2, seed: int = 0,
                n: int = SHAPES_COUNT, redraw: bool = False) -> Data:
    """The embedded shapes set (:func:`~autocut.finetune.shapes.shapes`): ``n`` images drawn at
    ``size`` from ``seed``, split by ``valid_pct``; each image through the path a PNG of it takes.
    With ``redraw``, the training images are drawn afresh for each epoch (:class:`ShapeDraws`, as
    many as the split gives), the validation images stay.

    Example:
        >>> data = shapes_data(size=48)
        >>> len(data.train), len(data.valid), data.classes
        (640, 160, ['background', 'disc', 'square', 'triangle', 'ring'])
    """
    from autocut.finetune.shapes import CLASSES

    x, y = _shape_tensors(n, size, n_in, mean, std, seed)
    train, valid = _split(n, valid_pct, seed)
    drawn = ShapeDraws(len(train), size, n_in, mean, std, seed) if redraw else MaskTensors(x[train], y[train])
    return Data(drawn, MaskTensors(x[valid], y[valid]), list(CLASSES), SHAPES)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    """Each image of ``root/images`` with the mask of the same stem in ``root/masks``."""
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise ValueError(f"no {d.name}/ folder in {root}: a segmentation folder holds images/ and masks/ "
                             "(a mask per image, same file name stem), or train/ and valid/ holding both")
    images = _files(images_dir)
    if not images:
        raise ValueError(f"{images_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    masks: dict[str, Path] = {}
    for m in _files(masks_dir):
        if m.stem in masks and m.suffix.lower() != ".png":
            continue  # a PNG wins over another file of the same stem
        masks[m.stem] = m
    missing = [p for p in images if p.stem not in masks]
    if missing:
        examples = ", ".join(f"{p.name} (expected {masks_dir.name}/{p.stem}.png)" for p in missing[:3])
        raise ValueError(f"{len(missing)} of {len(images)} images in {images_dir} have no mask in {masks_dir}: {examples}")
    return [(p, masks[p.stem]) for p in images]


def _mask_facts(pair: tuple[Path, Path]) -> tuple[tuple[int, int], tuple[int, int], int, str | None]:
    """``(image size, mask size, largest index other than IGNORE, why the image is unreadable)``."""
    from PIL import Image

    image, mask = pair
    try:
        with Image.open(image) as im:
            image_size = im.size
    except Exception as err:  # PIL raises many types for bad files
        return (0, 0), (0, 0), -1, f"{type(err).__name__}: {err}"
    values = read_mask(mask)
    present = np.unique(values)
    present = present[present != IGNORE]
    return image_size, (values.shape[1], values.shape[0]), int(present.max()) if present.size else 0, None


def _classes(root: Path, largest: int) -> tuple[list[str], list[str]]:
    """The class names (from ``classes.txt``, else ``"0"`` to the largest index) and notes."""
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) < 2:
            raise ValueError(f"{listing} lists {len(names)} class: a segmentation needs at least 2 (the first is "
                             "usually the background)")
        return names, []
    return [str(i) for i in range(max(largest, 1) + 1)], [f"no classes.txt in {root}: classes named 0 to {max(largest, 1)}"]


def _check(pairs: list[tuple[Path, Path]], root: Path) -> tuple[list[tuple[Path, Path]], list[str], list[str], int]:
    """Sizes and indices of every mask against its image and the classes; unreadable images
    skipped (counted). Returns ``(pairs, classes, notes, skipped)``."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        facts = list(pool.map(_mask_facts, pairs))
    good = [(p, f) for p, f in zip(pairs, facts) if f[3] is None]
    skipped = [(p[0], f[3]) for p, f in zip(pairs, facts) if f[3] is not None]
    if not good:
        raise ValueError(f"no image in {root} can be read (e.g. {skipped[0][0]}: {skipped[0][1]})")
    if skipped:
        examples = "; ".join(f"{p}: {why}" for p, why in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {root} (e.g. {examples})", stacklevel=3)
    for (image, mask), (image_size, mask_size, _, _) in good:
        if image_size != mask_size:
            raise ValueError(f"image {image} is {image_size[0]}x{image_size[1]} but its mask {mask} is "
                             f"{mask_size[0]}x{mask_size[1]}: a mask has its image's size (one class index per pixel)")
    largest = max(f[2] for _, f in good)
    classes, notes = _classes(root, largest)
    if largest >= len(classes):
        (image, mask), _ = next((p, f) for p, f in good if f[2] == largest)
        raise ValueError(f"mask {mask} holds class index {largest}, but {root / 'classes.txt'} lists {len(classes)} "
                         f"classes (indices 0 to {len(classes) - 1}): add the missing class names, or fix the mask "
                         f"({IGNORE} marks pixels to ignore)")
    return [p for p, _ in good], classes, notes, len(skipped)


def mask_folder(path: str | Path, size: int = 224, n_in: int = 3, mean: Sequence[float] = (0.485, 0.456, 0.406),
                std: Sequence[float] = (0.229, 0.224, 0.225), valid_pct: float = 0.2, seed: int = 0,
                augment: bool = True) -> Data:
    """A folder of ``images/`` and ``masks/`` (see the module docstring); with ``train/`` and
    ``valid/`` (or ``val/``) inside, each holding both, those; else a seeded random split.

    Example:
        >>> data = mask_folder("streets/", size=256)   # streets/images/*.jpg, streets/masks/*.png
        >>> data.classes
        ['road', 'car', 'person']
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {root}: pass --data shapes or a folder of images/ and masks/")
    mode = image_mode(n_in)
    mean, std = channel_stats(mean, n_in), channel_stats(std, n_in)
    valid_root = next((root / d for d in ("valid", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and valid_root is not None:
        train_pairs, valid_pairs = _pairs(root / "train"), _pairs(valid_root)
        checked, classes, notes, skipped = _check(train_pairs + valid_pairs, root)
        kept = set(checked)
        train_pairs, valid_pairs = [p for p in train_pairs if p in kept], [p for p in valid_pairs if p in kept]
    else:
        base = root / "train" if (root / "train").is_dir() else root
        everything, classes, notes, skipped = _check(_pairs(base), root)
        train_idx, valid_idx = _split(len(everything), valid_pct, seed)
        train_pairs, valid_pairs = [everything[i] for i in train_idx], [everything[i] for i in valid_idx]
    return Data(
        MaskFiles(train_pairs, mask_transform(size, mean, std, augment), mode, seed=seed, random=augment),
        MaskFiles(valid_pairs, mask_transform(size, mean, std), mode, seed=seed),
        classes, str(root), skipped=skipped, notes=notes,
    )


def load_masks(data: str | Path, size: int, n_in: int = 3, mean: Sequence[float] = (0.485, 0.456, 0.406),
               std: Sequence[float] = (0.229, 0.224, 0.225), valid_pct: float = 0.2, seed: int = 0,
               augment: bool = True) -> Data:
    """``"shapes"`` for the embedded set (pass ``./shapes`` for a folder of that name; with
    ``augment``, training images drawn afresh for each epoch), else :func:`mask_folder`."""
    if str(data) == SHAPES:
        return shapes_data(size, n_in, mean, std, valid_pct, seed, redraw=augment)
    return mask_folder(data, size, n_in, mean, std, valid_pct, seed, augment)
