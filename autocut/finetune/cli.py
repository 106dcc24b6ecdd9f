"""``autocut finetune`` and ``autocut predict``: the parsers, added to ``autocut``'s own."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_parsers"]


def _finetune(args: argparse.Namespace) -> int:
    from autocut.errors import CutError
    from autocut.finetune.train import finetune

    try:
        _, history = finetune(
            args.arch, args.data, task=args.task, size=args.size, epochs=args.epochs, freeze_epochs=args.freeze_epochs,
            lr=args.lr, lr_mult=args.lr_mult, bs=args.bs, pretrained=args.pretrained, weights=args.weights, n_in=args.n_in,
            out=args.out, resume=args.resume, seed=args.seed, ps=args.ps, weight_decay=args.wd,
            valid_pct=args.valid_pct, augment=not args.no_augment, workers=args.workers, device=args.device,
            precision=args.precision, channels_last=args.channels_last, progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"autocut finetune: interrupted; rerun with --resume --out {args.out} to continue", file=sys.stderr)
        return 130
    except (CutError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"autocut finetune: {err}", file=sys.stderr)
        return 2
    if history and not args.quiet and os.environ.get("RANK", "0") == "0":
        last = history[-1]
        scores = (f"mIoU {last['miou']:.4f}, pixel accuracy {last['pixel_accuracy']:.4f}" if args.task == "segment"
                  else f"accuracy {last['accuracy']:.4f}")
        print(f"{scores}; model in {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from autocut.finetune.checkpoint import load_model
    from autocut.finetune.predict import predict

    try:
        model, meta = load_model(args.checkpoint)
    except (ValueError, FileNotFoundError) as err:
        print(f"autocut predict: {err}", file=sys.stderr)
        return 2
    if meta.get("task") == "segment":
        return _predict_masks(args, model, meta)
    if args.overlay:
        print("autocut predict: --overlay draws a segmentation's masks; this checkpoint is a classifier", file=sys.stderr)
        return 2
    failed: list[str] = []
    records = []
    for path, image in _images(args.images, meta["input_size"][0], failed):
        (top,) = predict((model, meta), [image], top_k=args.top_k)
        records.append({"image": path, "top": [{"class": c, "probability": p} for c, p in top]})
        if not args.json:
            print(f"{path}: " + ", ".join(f"{c} ({p:.1%})" for c, p in top))
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0


def _images(paths: list[str], n_in: int, failed: list[str]):
    """``(path, image)`` for each file that reads; each that does not is said on stderr and added
    to ``failed``."""
    from autocut.finetune.predict import read_image

    for path in paths:
        try:
            yield path, read_image(path, n_in)
        except ValueError as err:
            print(f"autocut predict: {err}", file=sys.stderr)
            failed.append(path)


def _predict_masks(args: argparse.Namespace, model, meta) -> int:
    from pathlib import Path

    from autocut.finetune.predict import class_shares, predict_masks, read_image, save_mask, save_overlay

    out = Path(args.out_dir)
    failed: list[str] = []
    records = []
    for path, image in _images(args.images, meta["input_size"][0], failed):
        (mask,) = predict_masks((model, meta), [image])
        stem = Path(path).stem
        written = [save_mask(mask, out / f"{stem}.png", len(meta["classes"]))]
        if args.overlay:
            written.append(save_overlay(read_image(path, 3), mask, out / f"{stem}_overlay.png", len(meta["classes"])))
        shares = class_shares(mask, meta["classes"])
        records.append({"image": path, "mask": str(written[0]), "overlay": str(written[1]) if args.overlay else None,
                        "classes": shares})
        if not args.json:
            top = ", ".join(f"{c} {p:.1%}" for c, p in list(shares.items())[:args.top_k])
            print(f"{path}: {' + '.join(map(str, written))} ({top})")
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune`` and ``predict`` to ``autocut``'s subcommands."""
    from autocut._validate import AT_LEAST_ONE, COUNT, DROPOUT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT
    from autocut.finetune.train import DEFAULTS, PRECISIONS, TASKS

    def per_task(field: str) -> str:
        return ", ".join(f"{getattr(DEFAULTS[t], field)} to {t}" for t in TASKS)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a backbone end to end, to classify or segment (embedded data by default; torchrun for DDP)",
        description="Fine-tune any timm/torchvision backbone to classify images (a concat-pool head) or segment them "
        "(a dynamic U-Net): frozen-body epochs, then discriminative learning rates, one-cycle AdamW. Run with "
        "torchrun --nproc_per_node=N -m autocut finetune ... for DDP.",
    )
    ft.add_argument("--task", choices=TASKS, default="classify",
                    help="classify: a class per image (default); segment: a class per pixel (a U-Net)")
    ft.add_argument("--arch", help=f"timm name or torchvision:NAME (default {per_task('arch')})")
    ft.add_argument("--data", help="classify: 'digits' (embedded, no download; the default) or a folder of class "
                    "sub-folders (with train/ and valid/ inside, or split at random); segment: 'shapes' (embedded; "
                    "the default) or a folder of images/ and masks/ (PNGs of class indices, same file stems; "
                    "classes.txt optional)")
    ft.add_argument("--size", type=POSITIVE_INT,
                    help=f"image side in pixels (default {per_task('size')}'s embedded data, else the model's)")
    ft.add_argument("--epochs", type=COUNT, help=f"epochs of the whole model (default {per_task('epochs')})")
    ft.add_argument("--freeze-epochs", type=COUNT,
                    help="epochs with the body frozen first (default 1 with pretrained weights, else 0)")
    ft.add_argument("--lr", type=POSITIVE, help=f"peak learning rate of the head (default {per_task('lr')})")
    ft.add_argument("--lr-mult", type=AT_LEAST_ONE,
                    help="first layer group's lr is lr / lr-mult (default 100 with pretrained weights, else 1)")
    ft.add_argument("--bs", type=POSITIVE_INT, help=f"global batch size, split over processes (default {per_task('bs')})")
    weights = ft.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="the zoo's pretrained weights (needs the network)")
    weights.add_argument("--weights", metavar="FILE",
                         help="a local checkpoint of the original model (.safetensors or state dict)")
    ft.add_argument("--n-in", type=POSITIVE_INT, default=3, help="input channels (default 3)")
    ft.add_argument("--out", help="checkpoint folder (default runs/ARCH); one that holds a run already is refused "
                    "without --resume: a run is never overwritten")
    ft.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last finished epoch (a finished run: rewrite its model files)")
    ft.add_argument("--seed", type=COUNT, default=0, help="seed of the split, the initialisation and each epoch (default 0)")
    ft.add_argument("--ps", type=DROPOUT, default=0.5, help="dropout of the classification head (default 0.5)")
    ft.add_argument("--wd", type=NON_NEGATIVE, default=0.01, help="AdamW weight decay (default 0.01)")
    ft.add_argument("--valid-pct", type=FRACTION, default=0.2,
                    help="validation share when there is no valid/ folder (default 0.2)")
    ft.add_argument("--no-augment", action="store_true", help="no random crops and flips for folders, no fresh shapes each epoch")
    ft.add_argument("--workers", type=COUNT, help="data-loading processes (default 0 for digits, else up to 8)")
    ft.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cuda:LOCAL_RANK when there is a GPU)")
    ft.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="bf16: bf16 autocast (fp32 weights); fp32: none; auto (default): bf16 on CUDA, fp32 elsewhere")
    ft.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="model and batches in channels_last memory (default: on CUDA only)")
    ft.add_argument("--quiet", action="store_true", help="no bars and no table")
    ft.set_defaults(func=_finetune_with_out)

    pr = sub.add_parser("predict", help="top-k classes of images, or their masks, from a finetune checkpoint")
    pr.add_argument("checkpoint", help="a finetune run folder or its model.json / model.safetensors")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--top-k", type=POSITIVE_INT, default=5, help="classes per image (default 5); for a segmentation, "
                    "the classes with the most pixels printed")
    pr.add_argument("--out-dir", default="predictions", help="segmentation: where the masks (IMAGE_STEM.png, a class "
                    "index per pixel, coloured by a palette) are written (default ./predictions)")
    pr.add_argument("--overlay", action="store_true", help="segmentation: also write IMAGE_STEM_overlay.png, the mask's "
                    "colours over the image")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=_predict)


def _finetune_with_out(args: argparse.Namespace) -> int:
    if args.out is None:
        from autocut.finetune.train import DEFAULTS

        arch = args.arch or DEFAULTS[args.task].arch
        args.out = f"runs/{arch.replace(':', '-').replace('/', '-')}{'-segment' if args.task == 'segment' else ''}"
    return _finetune(args)
