"""What a run scores on its validation set: accuracy for classification; pixel accuracy and mean
IoU for segmentation, from one confusion matrix summed over every pixel of every image (and every
process), as torchmetrics' and mmsegmentation's dataset-level mIoU are."""

from __future__ import annotations

import torch

__all__ = ["TASKS", "METRICS", "confusion_matrix", "segment_scores"]

TASKS = ("classify", "segment")
# the metrics each task's records hold, in the order the table shows them
METRICS = {"classify": ("accuracy", "error_rate"), "segment": ("pixel_accuracy", "miou")}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore: int | None = None) -> torch.Tensor:
    """``(n_classes, n_classes)`` int64 counts: row = true class, column = predicted class; pixels
    whose target is ``ignore`` left out.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
        tensor([[1, 1],
                [0, 1]])
    """
    target, pred = target.reshape(-1), pred.reshape(-1)
    if ignore is not None:
        keep = target != ignore
        target, pred = target[keep], pred[keep]
    return torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segment_scores(confusion: torch.Tensor) -> dict[str, float | list[float | None]]:
    """``pixel_accuracy``, ``miou`` and per-class ``iou`` of a confusion matrix. A class's IoU is
    ``TP / (TP + FP + FN)``; a class neither in the targets nor predicted has none (``None``) and
    is left out of the mean.

    Example:
        >>> segment_scores(torch.tensor([[3, 1], [0, 4]]))
        {'pixel_accuracy': 0.875, 'miou': 0.775, 'iou': [0.75, 0.8]}
    """
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    total = cm.sum().item()
    iou = [(t / u).item() if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    return {"pixel_accuracy": tp.sum().item() / total if total else 0.0,
            "miou": sum(present) / len(present) if present else 0.0, "iou": iou}
