"""The ``autocut`` command line: ``autocut inspect NAME`` and ``autocut scan``."""

from __future__ import annotations

import argparse
import json
import sys

from autocut._validate import POSITIVE_INT

__all__ = ["main", "make_parser"]

DEFAULT_ARCH = "resnet34"


def _inspect(args: argparse.Namespace) -> int:
    from autocut import CutError, discover
    from autocut.cut import format_stride
    from autocut.layout import Layout

    try:
        cut = discover(args.name, input_size=tuple(args.input_size) if args.input_size else None)
    except (CutError, ValueError) as err:
        print(f"autocut inspect: {err}", file=sys.stderr)
        return 2
    levels = _pyramid_of(args.name, cut)
    if args.json:
        record = dict(cut.__dict__)
        record["groups"] = _groups_of(args.name, cut)
        record["pyramid"] = [{k: getattr(level, k) for k in _LEVEL_FIELDS} for level in levels]
        print(json.dumps(record, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"autocut: where to cut {cut.arch}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    stride = cut.stride if not isinstance(cut.stride, tuple) else "x".join(map(str, cut.stride))
    rows = [
        ("cut at", cut.where),
        ("end of module", cut.after or "- (the model's own forward, between modules)"),
        ("found by", cut.method),
        ("nf (channels)", str(cut.nf)),
        ("feature map", f"{cut.feature_shape[0]} x {cut.feature_shape[1]} x {cut.feature_shape[2]}"),
        ("input size", " x ".join(map(str, cut.input_size))),
        ("stride", str(stride)),
        ("layout at cut", f"{cut.layout}" + ("" if cut.layout == Layout.NCHW else " (body returns NCHW)")),
        ("prefix tokens", str(cut.prefix_tokens)),
        ("dropped head", ", ".join(cut.dropped) or "-"),
        ("head input", f"{2 * cut.nf} (concat pool: max + avg)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console = Console()
    console.print(table)
    groups = _groups_of(args.name, cut)
    if groups:
        gt = Table(title="layer groups (autocut.layer_groups, n=3)", title_justify="left")
        for col in ("group", "first", "last", "stride", "parameters"):
            gt.add_column(col, justify="right" if col in ("group", "stride", "parameters") else "left")
        for g in groups:
            stride = "-" if g["stride"] is None else f"{g['stride']:g}"
            gt.add_row(str(g["group"]), g["first"], g["last"], stride, f"{g['params']:,}")
        console.print(gt)
    if levels:
        pt = Table(title="feature pyramid (autocut.create_pyramid)", title_justify="left")
        for col in ("stride", "level at", "end of module", "channels", "map", "layout"):
            pt.add_column(col, justify="right" if col in ("stride", "channels") else "left")
        for level in levels:
            pt.add_row(format_stride(level.stride), level.where, level.after or "-", str(level.nf),
                       f"{level.feature_shape[1]} x {level.feature_shape[2]}", str(level.layout))
        console.print(pt)
    return 0


_LEVEL_FIELDS = ("where", "after", "nf", "stride", "layout", "feature_shape", "prefix_tokens")


def _pyramid_of(name: str, cut) -> list:
    """The pyramid's levels, or none (and why, on stderr) where the model has none."""
    from autocut import CutError, discover_pyramid

    try:
        return discover_pyramid(name, input_size=cut.input_size)
    except CutError as err:  # the pyramid is extra information: say why it is missing
        print(f"(no feature pyramid: {str(err).splitlines()[0]})", file=sys.stderr)
        return []


def _groups_of(name: str, cut) -> list[dict]:
    """The default layer groups, on a meta-device copy (no weights allocated), else on a CPU copy
    for models the meta device cannot run (efficientvit's autocast)."""
    from autocut import adapt, group_summary, zoo

    spec = zoo.resolve(name)
    errors = []
    for device in ("meta", "cpu"):
        try:
            model = zoo.build(spec, device=device)
            return group_summary(adapt(model, n_out=2, input_size=cut.input_size, cut=None if device == "meta" else cut))
        except Exception as err:  # groups are extra information: say why they are missing
            errors.append(f"{device}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    print(f"(no layer groups: {'; '.join(errors)})", file=sys.stderr)
    return []


def make_parser() -> argparse.ArgumentParser:
    """The ``autocut`` parser with every subcommand (numbers are checked by :mod:`autocut._validate`)."""
    parser = argparse.ArgumentParser(prog="autocut", description="Cut any vision backbone and attach a new head.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="show where a model is cut, nf, layout, stride, layer groups and feature pyramid")
    inspect.add_argument("name", nargs="?", default=DEFAULT_ARCH, help=f"timm or torchvision:NAME (default {DEFAULT_ARCH})")
    inspect.add_argument("--input-size", nargs=3, type=POSITIVE_INT, metavar=("C", "H", "W"),
                         help="probe size (default: the model's)")
    inspect.add_argument("--json", action="store_true", help="print the cut as JSON")
    inspect.set_defaults(func=_inspect)
    from autocut.finetune.cli import add_parsers

    add_parsers(sub)  # finetune, predict
    from autocut.scan.cli import add_parser as add_scan_parser

    add_scan_parser(sub)  # scan
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``autocut`` with ``argv`` (default: the command line); the exit status.

    A bad value of an option exits with status 2 and argparse's message naming it.
    """
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
