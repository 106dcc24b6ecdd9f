"""``finetune``: fastai's fine-tuning recipe as one small loop.

Train the head (and the body's norms) with the body frozen for ``freeze_epochs``, then the
whole model with discriminative learning rates over the layer groups; each phase is a one-cycle
schedule (``OneCycleLR``, per-group ``max_lr``) with AdamW. On CUDA by default (anywhere on
request): bf16 autocast and channels_last. Under ``torchrun``: ``DistributedDataParallel``, the same global batch as one
process (``bs / world_size`` each) and batch norm over all of it.

Two tasks: ``"classify"`` (:func:`autocut.adapt`'s concat-pool head; accuracy) and
``"segment"`` (:func:`autocut.unet`'s decoder, a class per pixel; pixel accuracy and mean IoU),
each with its embedded default data (digits, shapes) and the same loop, checkpoints and resume.

Reproducible by construction: the model is built from ``seed``, and every epoch reseeds torch,
numpy, ``random``, the sampler and the augmentations from ``(seed, epoch, rank)``, so resuming
at an epoch boundary (weights, optimiser, scheduler restored) repeats an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from autocut import adapt, param_groups, unet, zoo
from autocut._validate import AT_LEAST_ONE, COUNT, DROPOUT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT
from autocut.cut import format_stride
from autocut.finetune import checkpoint
from autocut.finetune.data import Data, Tensors, channel_stats, load_data, sample_seed
from autocut.finetune.distributed import Processes, all_sum, setup, synced_batch_norm, teardown
from autocut.finetune.masks import IGNORE, SHAPES, SHAPES_SIZE, load_masks
from autocut.finetune.metrics import METRICS, TASKS, confusion_matrix, segment_scores
from autocut.finetune.report import Report

__all__ = ["finetune", "Options", "DEFAULT_ARCH", "DEFAULT_EPOCHS", "DEFAULT_LR", "DIGITS_SIZE", "PRECISIONS", "TASKS",
           "DEFAULTS"]

DIGITS_SIZE = 32


@dataclass(frozen=True)
class TaskDefaults:
    """What a task runs with where the caller says nothing: its embedded data, and a model and
    schedule that finish there in minutes on 2 CPU cores (the README gives each one's figures)."""

    arch: str
    data: str
    size: int
    epochs: int
    lr: float
    bs: int


DEFAULTS = {
    "classify": TaskDefaults(arch="resnet10t", data="digits", size=DIGITS_SIZE, epochs=4, lr=3e-3, bs=64),
    "segment": TaskDefaults(arch="test_efficientnet", data=SHAPES, size=SHAPES_SIZE, epochs=44, lr=5e-3, bs=16),
}
DEFAULT_ARCH = DEFAULTS["classify"].arch
DEFAULT_EPOCHS = DEFAULTS["classify"].epochs
DEFAULT_LR = DEFAULTS["classify"].lr
PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 autocast on CUDA, fp32 elsewhere


@dataclass(frozen=True)
class Options:
    """What defines a run's result; saved with its checkpoints, and ``resume`` must agree."""

    arch: str
    data: str
    size: int
    epochs: int
    freeze_epochs: int
    lr: float
    lr_mult: float
    bs: int
    pretrained: bool
    weights: str | None
    n_in: int
    seed: int
    ps: float
    weight_decay: float
    valid_pct: float
    augment: bool
    precision: str
    task: str = "classify"  # last: a run saved before tasks existed was a classification


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class _Compute:
    """How batches run: on ``device``, under bf16 autocast or not, in channels_last or not."""

    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def choose(cls, device: torch.device, precision: str, channels_last: bool | None) -> _Compute:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        cuda = device.type == "cuda"
        bf16 = precision == "bf16" or (precision == "auto" and cuda)
        return cls(device, bf16, cuda if channels_last is None else channels_last)

    def autocast(self):
        # Weights stay fp32; matmuls and convolutions run in bf16 (no loss scaling needed, unlike fp16).
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    def describe(self) -> str:
        return ", ".join([self.device.type] + ["bf16 autocast"] * self.bf16 + ["channels_last"] * self.channels_last)


def _loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a class per image, or per pixel (masks' :data:`~autocut.finetune.masks.IGNORE`
    pixels left out)."""
    return F.cross_entropy(out, y, reduction=reduction, ignore_index=IGNORE if y.dim() > 1 else -100)


def _train_epoch(net: nn.Module, loader: DataLoader, optimizer, scheduler, procs: Processes, compute: _Compute,
                 advance: Callable) -> float:
    """One pass over the training data; the mean loss over every process's samples."""
    net.train()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = compute.to_device(x), y.to(procs.device, non_blocking=True)
        with compute.autocast():
            loss = _loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value = loss.item()
        total, count = total + value * len(y), count + len(y)
        advance(value)
    total, count = all_sum(torch.tensor([total, count], dtype=torch.float64), procs).tolist()
    return total / count


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader, procs: Processes, compute: _Compute, task: str,
              n_classes: int) -> tuple[float, dict[str, float]]:
    """``(loss, metrics)`` over the whole validation set (each process scores its share): the mean
    loss per image (per scored pixel for a segmentation) and the task's :data:`METRICS`."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss, scored items (images or pixels), correct images
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.float64)
    for x, y in loader:
        x, y = compute.to_device(x), y.to(procs.device, non_blocking=True)
        with compute.autocast():
            out = model(x).float()
        pred = out.argmax(1)
        scored = (y != IGNORE).sum().item() if task == "segment" else len(y)
        sums += torch.tensor([_loss(out, y, "sum").item(), scored, (pred == y).sum().item()], dtype=torch.float64)
        if task == "segment":
            confusion += confusion_matrix(pred, y, n_classes, IGNORE).cpu().double()
    loss, count, correct = all_sum(sums, procs).tolist()
    if task == "segment":
        scores = segment_scores(all_sum(confusion, procs))
        return loss / max(count, 1), {"pixel_accuracy": scores["pixel_accuracy"], "miou": scores["miou"]}
    return loss / count, {"accuracy": correct / count, "error_rate": 1 - correct / count}


def _loaders(data: Data, bs: int, seed: int, workers: int | None, procs: Processes) -> tuple[DataLoader, DataLoader]:
    """Training batches of ``bs / world_size`` from one seeded permutation per epoch (the same
    global batches for any number of processes; the last partial batch is dropped), and each
    process's share of the validation set."""
    if bs % procs.world_size:
        raise ValueError(f"bs={bs} does not split over {procs.world_size} processes: pass a multiple of {procs.world_size}")
    if workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", procs.world_size))
        workers = 0 if isinstance(data.train, Tensors) else min(8, max(1, (os.cpu_count() or 1) // local))
    per_process = bs // procs.world_size
    sampler = DistributedSampler(data.train, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    common = dict(num_workers=workers, pin_memory=procs.device.type == "cuda")
    train = DataLoader(data.train, batch_size=per_process, sampler=sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common)
    if len(train) == 0:
        raise ValueError(f"bs={bs} is more than the {len(data.train)} training images: pass a smaller bs")
    share = Subset(data.valid, range(procs.rank, len(data.valid), procs.world_size))
    valid = DataLoader(share, batch_size=per_process * 2, shuffle=False, **common)
    return train, valid


def _build_model(options: Options, n_out: int, procs: Processes, compute: _Compute) -> nn.Module:
    if options.pretrained and not procs.main:
        procs.barrier()  # rank 0 downloads the weights first; the others read its cache
    _seed_everything(options.seed)
    input_size = (zoo.default_input_size(zoo.resolve(options.arch))[0], options.size, options.size)
    common = dict(n_out=n_out, pretrained=options.pretrained, weights=options.weights, input_size=input_size,
                  n_in=options.n_in)
    model = unet(options.arch, **common) if options.task == "segment" else adapt(options.arch, ps=options.ps, **common)
    if options.pretrained and procs.main:
        procs.barrier()
    model = model.to(procs.device)
    if compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _model_meta(model: nn.Module, options: Options, data: Data, history: list[dict], interrupted: bool = False) -> dict[str, Any]:
    mean, std = zoo.normalization(zoo.resolve(options.arch))
    return {
        "arch": model.cut.arch,
        "cut": asdict(model.cut),
        "n_in": options.n_in,
        "task": options.task,
        "head_options": {} if options.task == "segment" else {"ps": options.ps},
        "classes": data.classes,
        "input_size": [options.n_in, options.size, options.size],
        "normalization": {"mean": channel_stats(mean, options.n_in), "std": channel_stats(std, options.n_in)},
        "epoch": len(history),
        "epochs": options.freeze_epochs + options.epochs,
        "interrupted": interrupted,
        "history": history,
        "options": asdict(options),
    }


def _check_resumable(saved: dict[str, Any], options: Options, out: Path) -> None:
    mine = asdict(options)
    # An option the run predates (saved by an older autocut) ran with what is now its default.
    differ = [f"{k}={saved[k]!r} (now {v!r})" for k, v in mine.items() if k in saved and saved[k] != v]
    if differ:
        raise ValueError(f"cannot resume the run in {out} with other options: it ran with {', '.join(differ)}")


def _check_arguments(**values: Any) -> None:
    """Every numeric argument against its :mod:`autocut._validate` bound (``None``: its default;
    ``lr_mult`` at least 1: ``slice(lr / lr_mult, lr)`` must not give the body more than the head)."""
    bounds = {"size": POSITIVE_INT, "epochs": COUNT, "freeze_epochs": COUNT, "lr": POSITIVE, "lr_mult": AT_LEAST_ONE,
              "bs": POSITIVE_INT, "n_in": POSITIVE_INT, "seed": COUNT, "ps": DROPOUT, "weight_decay": NON_NEGATIVE,
              "valid_pct": FRACTION, "workers": COUNT}
    for name, value in values.items():
        if value is not None:
            bounds[name].check(name, value)


def finetune(
    arch: str | None = None,
    data: str | os.PathLike | Data | None = None,
    *,
    task: str = "classify",
    size: int | None = None,
    epochs: int | None = None,
    freeze_epochs: int | None = None,
    lr: float | None = None,
    lr_mult: float | None = None,
    bs: int | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    n_in: int = 3,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    ps: float = 0.5,
    weight_decay: float = 0.01,
    valid_pct: float = 0.2,
    augment: bool = True,
    workers: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    channels_last: bool | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fine-tune ``arch`` on ``data``, end to end; returns ``(model, history)``.

    Args:
        arch: a timm name or ``"torchvision:NAME"``; default the task's (:data:`DEFAULTS`).
        data: for ``"classify"``, ``"digits"`` (scikit-learn's 8x8 digits, embedded, the
            default) or a folder of class sub-folders (with ``train/`` and ``valid/`` inside, or
            split by ``valid_pct``); for ``"segment"``, ``"shapes"`` (embedded, the default) or a
            folder of ``images/`` and ``masks/`` (:mod:`autocut.finetune.masks`); or a :class:`Data`.
        task: ``"classify"`` (a class per image: :func:`autocut.adapt`) or ``"segment"`` (a
            class per pixel: :func:`autocut.unet`).
        size: image side in pixels; default 32 for digits, 48 for shapes, else the model's own
            input size.
        epochs: epochs with the whole model training, after ``freeze_epochs`` with the body
            frozen (norms trainable) and the head training; ``freeze_epochs`` defaults to 1
            with pretrained weights, else 0.
        lr: the head's peak learning rate; the layer groups get ``slice(lr / lr_mult, lr)``
            spread geometrically; ``lr_mult`` defaults to 100 with pretrained weights, else 1.
        bs: global batch size (``bs / world_size`` per process under ``torchrun``).
        epochs, lr, bs: default the task's (:data:`DEFAULTS`).
        pretrained, weights: the zoo's pretrained weights (needs the network) or a local
            checkpoint of the original model.
        n_in: input channels (1 for grey images).
        out: folder for checkpoints (weights + JSON after every epoch and on Ctrl-C); ``None``
            writes nothing. A folder that holds a run already is refused unless ``resume``:
            a run is never overwritten. Temporary files a killed save left there are removed.
        resume: continue the run in ``out`` from its last finished epoch (same options);
            starts afresh when ``out`` holds none. A finished run trains nothing more, and
            its ``model.safetensors`` and ``model.json`` are rewritten from its state.
        seed: seeds the split, the model's initialisation and every epoch's randomness.
        ps: dropout of the classification head (a segmentation has none); with dropout, runs
            on different numbers of processes agree in distribution, not bit for bit.
        augment: random crops and flips for folders, the same for an image and its mask; for
            the embedded shapes, training images drawn afresh for each epoch (digits are never
            augmented).
        workers: data-loading processes; default 0 for in-memory data, else up to 8.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default ``cuda:LOCAL_RANK`` when there
            is a GPU, else the CPU.
        precision: ``"bf16"`` trains and validates under bf16 autocast (fp32 weights),
            ``"fp32"`` without; ``"auto"`` is bf16 on CUDA, fp32 elsewhere.
        channels_last: model and batches in channels_last memory; default on CUDA only.
        progress: show bars and the results table (main process only).
        on_epoch_end: called with each epoch's record after its checkpoint is written.

    Returns:
        The trained model (eval mode) and one record per epoch: ``epoch``, ``phase``,
        ``train_loss``, ``valid_loss``, the task's metrics (``accuracy`` and ``error_rate``;
        ``pixel_accuracy`` and ``miou``, mean IoU over the classes present), ``time`` (seconds).

    Raises:
        ValueError: an argument out of range (it is named), nothing to train (``epochs`` and
            ``freeze_epochs`` both 0), fewer than 2 classes, ``out`` a file or a folder that
            holds a run (without ``resume``), or a damaged checkpoint in ``out`` (named, with
            what to do); :class:`~autocut.errors.CutError` for the model and ``weights``.
        KeyboardInterrupt: after saving the current weights to ``out``.

    Example:
        >>> model, history = finetune("resnet18", "digits", epochs=3, out="runs/digits")
        >>> history[-1]["accuracy"] > 0.95
        True
        >>> model, history = finetune(task="segment", out="runs/shapes")  # a U-Net on the shapes
        >>> sorted(history[-1])
        ['epoch', 'miou', 'phase', 'pixel_accuracy', 'time', 'train_loss', 'valid_loss']
    """
    procs = setup(device)
    try:
        compute = _Compute.choose(procs.device, precision, channels_last)
        return _finetune(procs, compute, task, arch, data, size, epochs, freeze_epochs, lr, lr_mult, bs, pretrained,
                         weights, n_in, out, resume, seed, ps, weight_decay, valid_pct, augment, workers, progress,
                         on_epoch_end)
    finally:
        teardown(procs)


def _finetune(procs, compute, task, arch, data, size, epochs, freeze_epochs, lr, lr_mult, bs, pretrained, weights, n_in,
              out, resume, seed, ps, weight_decay, valid_pct, augment, workers, progress, on_epoch_end):
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    defaults = DEFAULTS[task]
    arch = defaults.arch if arch is None else arch
    data = defaults.data if data is None else data
    epochs, lr, bs = (defaults.epochs if epochs is None else epochs, defaults.lr if lr is None else lr,
                      defaults.bs if bs is None else bs)
    _check_arguments(size=size, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, lr_mult=lr_mult, bs=bs, n_in=n_in,
                     seed=seed, ps=ps, weight_decay=weight_decay, valid_pct=valid_pct, workers=workers)
    tuned = pretrained or weights is not None
    if freeze_epochs is None:
        freeze_epochs = 1 if tuned else 0
    if epochs + freeze_epochs == 0:
        raise ValueError("nothing to train: epochs=0 and freeze_epochs=0; pass epochs=1 (--epochs 1) or more")
    if pretrained and weights is not None:
        raise ValueError("pass pretrained=True or weights=PATH, not both")
    if resume and out is None:
        raise ValueError("resume needs out=, the folder of the run to resume")
    report = Report(show=progress and procs.main)
    if out is not None:  # before any work: a run is never overwritten, nor found unwritable after an epoch
        out = Path(out)
        for stale in checkpoint.prepare_out(out, resume, clean=procs.main):
            report.line(f"removed {stale}, left by a save that was killed")
    spec = zoo.resolve(arch)
    if size is None:
        embedded = {DEFAULTS[t].data: DEFAULTS[t].size for t in TASKS}
        size = embedded.get(str(data), zoo.default_input_size(spec)[-1])
    if not isinstance(data, Data):
        mean, std = zoo.normalization(spec)
        with warnings.catch_warnings():
            if not procs.main:  # one warning about skipped files, not one per process
                warnings.simplefilter("ignore")
            load = load_masks if task == "segment" else load_data
            data = load(data, size, n_in, mean, std, valid_pct, seed, augment)
    for note in data.notes:
        report.line(note)
    if task == "segment" and len(data.classes) < 2:
        raise ValueError(f"{data.source} has {len(data.classes)} class: a segmentation needs at least 2 (list them in "
                         "classes.txt, index 0 first)")
    if len(data.classes) < 2:
        raise ValueError(f"{data.source} has {len(data.classes)} class ({', '.join(data.classes) or 'none'}): fine-tuning "
                         "a classifier needs at least 2 classes: add a sub-folder of images for each other class")
    options = Options(
        arch=str(spec), data=data.source, size=size, epochs=epochs,
        freeze_epochs=freeze_epochs,
        lr=lr, lr_mult=(100.0 if tuned else 1.0) if lr_mult is None else float(lr_mult), bs=bs,
        pretrained=pretrained, weights=None if weights is None else str(weights), n_in=n_in, seed=seed, ps=ps,
        weight_decay=weight_decay, valid_pct=valid_pct, augment=augment, precision="bf16" if compute.bf16 else "fp32",
        task=task,
    )
    state = checkpoint.load_state(out) if resume else None
    if state is not None:
        _check_resumable(state["meta"]["options"], options, out)
    model = _build_model(options, len(data.classes), procs, compute)
    history: list[dict[str, Any]] = []
    if state is not None:
        checkpoint.load_weights(model, state["model"], out / checkpoint.STATE,
                                "this run cannot be resumed: start afresh with another --out")
        history = state["meta"]["history"]
        report.line(f"resuming {out} after epoch {len(history) - 1}")
    elif resume:
        report.line(f"nothing to resume in {out}: starting afresh")
    resumed_after = len(history)
    train_loader, valid_loader = _loaders(data, bs, seed, workers, procs)
    cut = model.cut
    what = (f"a U-Net over {len(model.levels)} levels (strides {', '.join(format_stride(s) for s in model.body.strides)})"
            if task == "segment" else "")
    report.line(
        f"{cut.arch} cut at {cut.where!r} ({cut.nf} channels, {cut.feature_shape[1]}x{cut.feature_shape[2]}) -> "
        f"{what + ' -> ' if what else ''}{len(data.classes)} classes{' per pixel' if what else ''} | "
        f"{data.source}: {len(data.train)} train, {len(data.valid)} valid, {size}px | "
        f"{compute.describe()}, {procs.world_size} process{'es' if procs.world_size > 1 else ''}, bs {bs}"
    )

    def save(interrupted: bool = False) -> None:
        if out is not None and procs.main:
            checkpoint.save_model(out, model, _model_meta(model, options, data, history, interrupted))

    try:
        first = 0
        for phase, length in (("frozen", options.freeze_epochs), ("unfrozen", options.epochs)):
            last = first + length
            if len(history) < last:
                resumed = state if state is not None and state["meta"]["phase"] == phase and len(history) > first else None
                _fit_phase(model, phase, first, last, options, data, train_loader, valid_loader, procs, compute,
                           report, history, resumed, out, save, on_epoch_end)
            first = last
        if state is not None and len(history) == resumed_after:
            # a finished run resumed: nothing trained, but its model files are rewritten from the
            # state, so a model.json or model.safetensors damaged since is repaired, never kept
            save()
            report.line(f"the run in {out} was finished: nothing to train; rewrote {checkpoint.MODEL_WEIGHTS} and "
                        f"{checkpoint.MODEL_META} from {checkpoint.STATE}")
    except KeyboardInterrupt:
        save(interrupted=True)
        if out is not None:
            after = f"from the end of epoch {len(history) - 1}" if history else "from scratch (no epoch finished)"
            report.line(f"interrupted: saved the current weights to {out / checkpoint.MODEL_WEIGHTS}; --resume continues {after}")
        raise
    return model.eval(), history


def _fit_phase(model, phase, first, last, options, data, train_loader, valid_loader, procs, compute, report, history,
               resumed, out, save, on_epoch_end) -> None:
    """Epochs ``first``..``last - 1`` of one phase: one optimiser, one one-cycle schedule."""
    frozen = phase == "frozen"
    if frozen:
        model.freeze()  # all but the head; the body's norms still train
    else:
        model.unfreeze()
    lrs = options.lr if frozen or options.lr_mult == 1 else slice(options.lr / options.lr_mult, options.lr)
    groups = [g for g in param_groups(model, lrs, weight_decay=options.weight_decay) if g["params"]]
    optimizer = torch.optim.AdamW(groups)
    steps = (last - first) * len(train_loader)
    if steps < 2:
        raise ValueError(f"a one-cycle schedule needs 2 steps or more, this phase has {steps}: pass a smaller bs")
    # OneCycleLR divides by zero unless the warm-up ends strictly inside (0, steps - 1)
    pct_start = min(max(0.99 if frozen else 0.25, 1.5 / steps), 1 - 0.5 / steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=pct_start
    )
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
    what = "body frozen (norms train), head training" if frozen else f"whole model, lr {_fmt_lr(lrs)}"
    report.line(f"epochs {max(first, len(history))}-{last - 1}: {what}, one-cycle AdamW")
    report.header(METRICS[options.task])
    with synced_batch_norm(model, procs):
        net = model
        if procs.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
        for epoch in range(max(first, len(history)), last):
            _seed_everything(sample_seed(options.seed, epoch, procs.rank, stream=1))
            train_loader.sampler.set_epoch(epoch)
            if hasattr(data.train, "set_epoch"):
                data.train.set_epoch(epoch)
            start = time.perf_counter()
            with report.bar(len(train_loader), f"epoch {epoch}") as advance:
                train_loss = _train_epoch(net, train_loader, optimizer, scheduler, procs, compute, advance)
            valid_loss, metrics = _validate(model, valid_loader, procs, compute, options.task, len(data.classes))
            record = {"epoch": epoch, "phase": phase, "train_loss": train_loss, "valid_loss": valid_loss, **metrics,
                      "time": time.perf_counter() - start}
            history.append(record)
            report.row(record)
            if out is not None and procs.main:
                checkpoint.save_state(out, model, optimizer, scheduler,
                                      {"epoch": len(history), "phase": phase, "options": asdict(options), "history": history})
                save()
            procs.barrier()
            if on_epoch_end is not None:
                on_epoch_end(record)


def _fmt_lr(lrs) -> str:
    return f"slice({lrs.start:.3g}, {lrs.stop:.3g})" if isinstance(lrs, slice) else f"{lrs:.3g}"
