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
            args.arch, args.data, size=args.size, epochs=args.epochs, freeze_epochs=args.freeze_epochs, lr=args.lr,
            lr_mult=args.lr_mult, bs=args.bs, pretrained=args.pretrained, weights=args.weights, n_in=args.n_in,
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
        print(f"accuracy {history[-1]['accuracy']:.4f}; model in {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from autocut.finetune.checkpoint import load_model
    from autocut.finetune.predict import predict, read_image

    try:
        model, meta = load_model(args.checkpoint)
    except (ValueError, FileNotFoundError) as err:
        print(f"autocut predict: {err}", file=sys.stderr)
        return 2
    failed, records = 0, []
    for path in args.images:
        try:
            image = read_image(path, meta["input_size"][0])
        except ValueError as err:
            print(f"autocut predict: {err}", file=sys.stderr)
            failed += 1
            continue
        (top,) = predict((model, meta), [image], top_k=args.top_k)
        records.append({"image": path, "top": [{"class": c, "probability": p} for c, p in top]})
        if not args.json:
            print(f"{path}: " + ", ".join(f"{c} ({p:.1%})" for c, p in top))
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune`` and ``predict`` to ``autocut``'s subcommands."""
    from autocut._validate import AT_LEAST_ONE, COUNT, DROPOUT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT
    from autocut.finetune.train import DEFAULT_ARCH, DEFAULT_EPOCHS, DEFAULT_LR, DIGITS_SIZE, PRECISIONS

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a backbone end to end (digits by default; torchrun for several processes)",
        description="Fine-tune any timm/torchvision backbone: frozen-body epochs, then discriminative learning "
        "rates, one-cycle AdamW. Run with torchrun --nproc_per_node=N -m autocut finetune ... for DDP.",
    )
    ft.add_argument("--arch", default=DEFAULT_ARCH, help=f"timm name or torchvision:NAME (default {DEFAULT_ARCH})")
    ft.add_argument("--data", default="digits", help="'digits' (embedded, no download) or a folder of class sub-folders "
                    "(with train/ and valid/ inside, or split at random)")
    ft.add_argument("--size", type=POSITIVE_INT,
                    help=f"image side in pixels (default {DIGITS_SIZE} for digits, else the model's)")
    ft.add_argument("--epochs", type=COUNT, default=DEFAULT_EPOCHS, help=f"epochs of the whole model (default {DEFAULT_EPOCHS})")
    ft.add_argument("--freeze-epochs", type=COUNT,
                    help="epochs with the body frozen first (default 1 with pretrained weights, else 0)")
    ft.add_argument("--lr", type=POSITIVE, default=DEFAULT_LR, help=f"peak learning rate of the head (default {DEFAULT_LR})")
    ft.add_argument("--lr-mult", type=AT_LEAST_ONE,
                    help="first layer group's lr is lr / lr-mult (default 100 with pretrained weights, else 1)")
    ft.add_argument("--bs", type=POSITIVE_INT, default=64, help="global batch size, split over processes (default 64)")
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
    ft.add_argument("--ps", type=DROPOUT, default=0.5, help="dropout of the head (default 0.5)")
    ft.add_argument("--wd", type=NON_NEGATIVE, default=0.01, help="AdamW weight decay (default 0.01)")
    ft.add_argument("--valid-pct", type=FRACTION, default=0.2,
                    help="validation share when there is no valid/ folder (default 0.2)")
    ft.add_argument("--no-augment", action="store_true", help="no random crops and flips for folders")
    ft.add_argument("--workers", type=COUNT, help="data-loading processes (default 0 for digits, else up to 8)")
    ft.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cuda:LOCAL_RANK when there is a GPU)")
    ft.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="bf16: bf16 autocast (fp32 weights); fp32: none; auto (default): bf16 on CUDA, fp32 elsewhere")
    ft.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="model and batches in channels_last memory (default: on CUDA only)")
    ft.add_argument("--quiet", action="store_true", help="no bars and no table")
    ft.set_defaults(func=_finetune_with_out)

    pr = sub.add_parser("predict", help="top-k classes of images from a finetune checkpoint")
    pr.add_argument("checkpoint", help="a finetune run folder or its model.json / model.safetensors")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--top-k", type=POSITIVE_INT, default=5, help="classes per image (default 5)")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=_predict)


def _finetune_with_out(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = f"runs/{args.arch.replace(':', '-').replace('/', '-')}"
    return _finetune(args)
