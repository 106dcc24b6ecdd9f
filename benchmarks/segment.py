"""``autocut.unet`` side by side with segmentation_models_pytorch's ``Unet``: same encoder, data and
schedule, in one run; then autocut on backbones smp cannot take.

For each pair, both models train from the same seed on the embedded shapes set
(``autocut.finetune.masks.shapes_data``) with one loop: AdamW, a one-cycle schedule, the same
batches. The report gives each one's validation mIoU and pixel accuracy, its median time per
training step, its parameter count, and the ratios autocut / smp. Backbones smp has no encoder
for (a ViT at one stride, a torchvision model, a hand-written module) run the same loop with
autocut alone; what smp says when asked for them is recorded.

segmentation_models_pytorch is a benchmark-only dependency (``pip install segmentation_models_pytorch``).

    python benchmarks/segment.py                          # writes benchmarks/reports/segment.md
    python benchmarks/segment.py --epochs 2 --n 160       # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPORT = Path(__file__).resolve().parent / "reports" / "segment.md"
# (autocut's name, smp's encoder name for the same backbone)
PAIRS = [("resnet34", "resnet34"), ("mobilenetv3_small_100", "tu-mobilenetv3_small_100")]


class Handmade(nn.Module):
    """A backbone no zoo knows: its own forward, a residual, a stride per stage."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32))
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.BatchNorm2d(2 * c), nn.ReLU())
                                  for c in (32, 64, 128))
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.mid(x))
        for d in self.down:
            x = d(x)
        return self.fc(x.mean((2, 3)))


def _others(size: int) -> list[tuple[str, Callable[[], nn.Module], str]]:
    """(label, backbone, what smp is asked for) of backbones smp has no encoder for."""
    import timm
    import torchvision

    return [
        ("timm vit_tiny_patch16_224 (one stride)", lambda: timm.create_model("vit_tiny_patch16_224", img_size=size),
         "tu-vit_tiny_patch16_224"),
        ("torchvision mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), "a torchvision module"),
        ("hand-written module", Handmade, "a hand-written module"),
    ]


def _smp_refusal(name: str, size: int) -> str:
    """What smp says when asked for a backbone (an encoder name, or a module it takes no module of)."""
    import segmentation_models_pytorch as smp

    if not name.startswith("tu-"):
        return "takes encoder names only, no module"
    try:
        model = smp.Unet(encoder_name=name, encoder_weights=None, classes=2)
        model(torch.zeros(1, 3, size, size))
    except Exception as err:  # whatever smp raises is the finding
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return "works"


def train(model: nn.Module, data, epochs: int, bs: int, lr: float, seed: int, n_classes: int) -> dict:
    """The shared loop: AdamW, one-cycle, the same batches for every model; validation scores."""
    from autocut.finetune.masks import IGNORE
    from autocut.finetune.metrics import confusion_matrix, segment_scores

    torch.manual_seed(seed)
    x, y = data.train.x, data.train.y
    steps_per_epoch = len(x) // bs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.25)
    times = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for step in range(steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            start = time.perf_counter()
            loss = F.cross_entropy(model(x[idx]), y[idx], ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        vx, vy = data.valid.x, data.valid.y
        pred = torch.cat([model(vx[i:i + 32]).argmax(1) for i in range(0, len(vx), 32)])
    scores = segment_scores(confusion_matrix(pred, vy, n_classes, IGNORE))
    return {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
            "step_s": statistics.median(times[steps_per_epoch // 2:] or times),
            "params": sum(p.numel() for p in model.parameters())}


def run(args) -> str:
    import segmentation_models_pytorch as smp
    import timm

    import autocut
    from autocut.finetune.masks import shapes_data

    torch.set_num_threads(args.threads)
    data = shapes_data(size=args.size, n=args.n, seed=args.seed)
    n_classes = len(data.classes)
    rows, extra = [], []
    common = dict(epochs=args.epochs, bs=args.bs, lr=args.lr, seed=args.seed, n_classes=n_classes)
    for ours, theirs in PAIRS:
        print(f"{ours} vs smp {theirs}", flush=True)
        torch.manual_seed(args.seed)
        a = train(autocut.unet(ours, n_out=n_classes, input_size=(3, args.size, args.size)), data, **common)
        torch.manual_seed(args.seed)
        b = train(smp.Unet(encoder_name=theirs, encoder_weights=None, classes=n_classes), data, **common)
        rows.append((ours, theirs, a, b))
    for label, make, asked in _others(args.size):
        print(label, flush=True)
        torch.manual_seed(args.seed)
        extra.append((label, train(autocut.unet(make(), n_out=n_classes, input_size=(3, args.size, args.size)), data,
                                   **common), _smp_refusal(asked, args.size)))

    lines = [
        "# autocut.unet vs segmentation_models_pytorch.Unet",
        "",
        f"Run {datetime.date.today()} on {platform.processor() or platform.machine()}, {args.threads} thread(s), CPU; "
        f"torch {torch.__version__}, timm {timm.__version__}, smp {smp.__version__}.",
        f"Data: the embedded shapes set, {len(data.train)} train / {len(data.valid)} valid images of {args.size} px, "
        f"{n_classes} classes. Schedule, the same for every model: {args.epochs} epochs, batch {args.bs}, AdamW one-cycle "
        f"to lr {args.lr:g}, seed {args.seed}, random initialisation (no pretrained weights here).",
        "Command: `python benchmarks/segment.py " + " ".join(args.argv) + "`",
        "",
        "## Same encoder, side by side",
        "",
        "| encoder | autocut mIoU | smp mIoU | mIoU ratio | autocut s/step | smp s/step | time ratio | autocut params "
        "| smp params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ours, theirs, a, b in rows:
        lines.append(f"| {ours} (smp `{theirs}`) | {a['miou']:.3f} | {b['miou']:.3f} | {a['miou'] / max(b['miou'], 1e-9):.2f}x "
                     f"| {a['step_s']:.3f} | {b['step_s']:.3f} | {a['step_s'] / b['step_s']:.2f}x | "
                     f"{a['params'] / 1e6:.1f}M | {b['params'] / 1e6:.1f}M |")
    lines += ["", "Ratios are autocut / smp: a mIoU ratio above 1 and a time ratio below 1 favour autocut. autocut's "
              "decoder is fastai's (wider than smp's default 256-128-64-32-16 channels), hence more parameters.", "",
              "## Backbones smp cannot take", "",
              "| backbone | autocut mIoU | pixel accuracy | s/step | params | smp, asked for it |", "|---|---|---|---|---|---|"]
    for label, a, refusal in extra:
        lines.append(f"| {label} | {a['miou']:.3f} | {a['pixel_accuracy']:.3f} | {a['step_s']:.3f} | "
                     f"{a['params'] / 1e6:.1f}M | {refusal} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n", type=int, default=640, help="images of the shapes set (a fifth for validation)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    text = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
