"""Images for fine-tuning: scikit-learn's handwritten digits (embedded, no download) and folders
of class sub-folders (torchvision's ``ImageFolder`` layout).

Every sample goes through the same PIL transforms (resize, crop, normalise with the model's own
statistics), so :func:`eval_transform` also serves prediction. Random augmentation is seeded per
``(seed, epoch, index)``: a sample looks the same whatever the number of processes, workers or
restarts, which is what lets a resumed or distributed run match a single uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "Data",
    "ImageFiles",
    "Tensors",
    "digits",
    "image_folder",
    "load_data",
    "eval_transform",
    "train_transform",
    "image_mode",
    "open_image",
    "convert_image",
    "channel_stats",
    "sample_seed",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_VALID_DIRS = ("valid", "val")


@dataclass
class Data:
    """A train/valid pair of datasets of ``(image tensor, class index)`` and the class names.

    ``source`` says where it came from (``"digits"`` or a folder), ``skipped`` how many files
    could not be read and were left out."""

    train: Dataset
    valid: Dataset
    classes: list[str]
    source: str
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def image_mode(n_in: int) -> str:
    """The PIL mode that gives ``n_in`` channels: ``"L"``, ``"RGB"`` or ``"RGBA"``."""
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if n_in not in modes:
        raise ValueError(f"image data has 1, 3 or 4 channels: n_in={n_in} fits none (pass n_in=1, 3 or 4)")
    return modes[n_in]


# grey integer modes PIL's own convert clips to 255 instead of scaling: 16-bit PNGs and TIFFs
# open as I;16*, and as 32-bit "I" in older Pillow and some TIFFs (taken as 16-bit data too)
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def convert_image(image, mode: str):
    """``image`` in the PIL ``mode`` (``"L"``, ``"RGB"``, ``"RGBA"``); 16-bit grey scaled to 8 bits
    first (``round(x / 257)``: 65535 is white), where PIL's own ``convert`` makes every value
    above 255 white."""
    from PIL import Image

    if image.mode in _WIDE_GREY:
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(pixels / 257), 0, 255).astype(np.uint8), "L")
    return image.convert(mode)


def open_image(path: str | Path, mode: str):
    """The image file ``path`` as a PIL image in ``mode`` (:func:`convert_image`); every image
    autocut reads, for training and for prediction, is read here.

    Raises:
        ValueError: naming the file, when PIL cannot read it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return convert_image(im, mode)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err})") from err


def channel_stats(stats: Sequence[float], n_in: int) -> tuple[float, ...]:
    """The model's per-channel mean or std for ``n_in`` channels: as is when the counts agree,
    else their average on every channel (a grey image fed to an RGB-trained stem)."""
    stats = tuple(float(s) for s in stats)
    return stats if len(stats) == n_in else (sum(stats) / len(stats),) * n_in


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize the shorter side to ``size``, centre-crop ``size x size``, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """fastai-like light augmentation: a random crop of 35-100% of the area, a horizontal flip."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.35, 1.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A well-mixed seed for sample ``index`` of ``epoch`` (``stream`` 0); other streams serve
    other draws (the training loop seeds each process's epoch with stream 1, index = rank)."""
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Tensors(Dataset):
    """Images already turned into tensors (no augmentation): ``(x[i], int(y[i]))``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: no augmentation."""


class ImageFiles(Dataset):
    """Image files with labels, read with PIL and transformed; random transforms are seeded by
    ``(seed, epoch, index)``. A file that fails to decode (it passed the scan's check) is
    replaced by the next readable one, with a warning, rather than crashing the run."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable, mode: str, seed: int = 0, random: bool = False):
        self.samples = list(samples)
        self.transform, self.mode, self.seed, self.random = transform, mode, seed, random
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentations (call before iterating; workers copy the dataset)."""
        self.epoch = epoch

    def _open(self, i: int):
        for step in range(len(self.samples)):
            path, label = self.samples[(i + step) % len(self.samples)]
            try:
                return open_image(path, self.mode), label
            except ValueError as err:
                why = err.__cause__ or err
                warnings.warn(f"skipping unreadable image {path} ({type(why).__name__}: {why})", stacklevel=2)
        raise RuntimeError("no image of the dataset can be read")

    def _seeded(self, i: int, make: Callable):
        """``make()``, under sample ``i``'s seed of this epoch where the transforms are random."""
        if not self.random:
            return make()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            return make()

    def __getitem__(self, i: int):
        img, label = self._open(i)
        return self._seeded(i, lambda: (self.transform(img), label))


def _split(n: int, valid_pct: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random train/valid split of ``range(n)``."""
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be between 0 and 1, got {valid_pct}")
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and valid, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_valid = min(max(1, round(n * valid_pct)), n - 1)
    return sorted(order[n_valid:]), sorted(order[:n_valid])


def digits(
    size: int = 32,
    n_in: int = 3,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    valid_pct: float = 0.2,
    seed: int = 0,
) -> Data:
    """scikit-learn's handwritten digits: 1,797 8x8 grey images of 10 classes, no download.

    Each digit becomes a PIL image (ink bright on black, as in the data: value / 16 * 255) and
    goes through :func:`eval_transform`, the same path a PNG of it takes in prediction.

    Example:
        >>> data = digits(size=32)
        >>> len(data.train), len(data.valid), data.classes[:3]
        (1438, 359, ['0', '1', '2'])
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    tfm = eval_transform(size, channel_stats(mean, n_in), channel_stats(std, n_in))
    mode = image_mode(n_in)
    x = torch.stack([tfm(convert_image(Image.fromarray(p, "L"), mode)) for p in pixels])
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train, valid = _split(len(y), valid_pct, seed)
    return Data(Tensors(x[train], y[train]), Tensors(x[valid], y[valid]), [str(c) for c in bunch.target_names], "digits")


def _visible_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _unreadable(path: Path) -> str | None:
    """Why PIL cannot read ``path``, or ``None`` (a cheap check: header and, for PNG, chunks)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # PIL raises many types for bad files; all mean "skip it"
        return f"{type(err).__name__}: {err}"
    return None


def _scan(root: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str], list[tuple[Path, str]]]:
    """``(samples, classes, skipped)`` of a folder of class sub-folders; ``classes`` given for a
    valid folder, which must not add classes the train folder lacks."""
    found = [d.name for d in _visible_dirs(root)]
    if not found:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = f" ({len(loose)} images lie directly in it: put them into one folder per class)" if loose else ""
        raise ValueError(f"no class folders in {root}: expected {root}/<class>/<image>{hint}")
    if classes is None:
        classes = found
    elif extra := sorted(set(found) - set(classes)):
        raise ValueError(f"{root} has classes the training folder lacks: {', '.join(extra)}")
    files = []
    for name in found:
        paths = sorted(
            p for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(s.startswith(".") for s in p.relative_to(root).parts)
        )
        if not paths:
            raise ValueError(f"class {name!r} is empty: {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.append((name, paths))
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = {name: list(pool.map(_unreadable, paths)) for name, paths in files}
    samples, skipped = [], []
    for name, paths in files:
        good = [p for p, why in zip(paths, reasons[name]) if why is None]
        skipped += [(p, why) for p, why in zip(paths, reasons[name]) if why is not None]
        if not good:
            raise ValueError(f"class {name!r} has no readable images: all {len(paths)} files in {root / name} are unreadable")
        samples += [(p, classes.index(name)) for p in good]
    return samples, classes, skipped


def image_folder(
    path: str | Path,
    size: int = 224,
    n_in: int = 3,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    valid_pct: float = 0.2,
    seed: int = 0,
    augment: bool = True,
) -> Data:
    """A folder of class sub-folders; with ``train/`` and ``valid/`` (or ``val/``) inside, those,
    else a seeded random split (``valid_pct``).

    Files that PIL cannot read are skipped and counted in one warning. A missing or empty
    folder, or a class without readable images, raises a ``ValueError`` saying which.

    Example:
        >>> data = image_folder("pets/", size=224)      # pets/cat/*.jpg, pets/dog/*.jpg
        >>> data.classes
        ['cat', 'dog']
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {root}: pass --data digits or a folder of class sub-folders")
    mode = image_mode(n_in)
    mean, std = channel_stats(mean, n_in), channel_stats(std, n_in)
    valid_root = next((root / d for d in _VALID_DIRS if (root / d).is_dir()), None)
    if (root / "train").is_dir():
        samples, classes, skipped = _scan(root / "train", None)
        if valid_root is not None:
            valid_samples, _, more = _scan(valid_root, classes)
            skipped += more
        else:
            train_idx, valid_idx = _split(len(samples), valid_pct, seed)
            samples, valid_samples = [samples[i] for i in train_idx], [samples[i] for i in valid_idx]
    else:
        everything, classes, skipped = _scan(root, None)
        train_idx, valid_idx = _split(len(everything), valid_pct, seed)
        samples, valid_samples = [everything[i] for i in train_idx], [everything[i] for i in valid_idx]
    if skipped:
        examples = "; ".join(f"{p}: {why}" for p, why in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {root} (e.g. {examples})", stacklevel=2)
    train_tfm = train_transform(size, mean, std) if augment else eval_transform(size, mean, std)
    return Data(
        ImageFiles(samples, train_tfm, mode, seed=seed, random=augment),
        ImageFiles(valid_samples, eval_transform(size, mean, std), mode, seed=seed),
        classes,
        str(root),
        skipped=len(skipped),
    )


def load_data(
    data: str | Path,
    size: int,
    n_in: int = 3,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    valid_pct: float = 0.2,
    seed: int = 0,
    augment: bool = True,
) -> Data:
    """``"digits"`` for the embedded digits (pass ``./digits`` for a folder of that name), else
    :func:`image_folder`."""
    if str(data) == "digits":
        return digits(size, n_in, mean, std, valid_pct, seed)
    return image_folder(data, size, n_in, mean, std, valid_pct, seed, augment)
