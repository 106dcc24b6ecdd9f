"""``autocut scan``: the parser, added to ``autocut``'s own by :func:`add_parser`."""

from __future__ import annotations

import argparse
import sys

from autocut._validate import NON_NEGATIVE, POSITIVE, POSITIVE_INT
from autocut.scan.runner import ZOOS

__all__ = ["add_parser"]


def _scan(args: argparse.Namespace) -> int:
    try:
        return _scan_and_report(args)
    except ValueError as err:  # --out a file, or no folder with --report-only
        print(f"autocut scan: {err}", file=sys.stderr)
        return 2


def _scan_and_report(args: argparse.Namespace) -> int:
    from autocut.scan.report import write_report
    from autocut.scan.runner import FAILED_STATUSES, scan, zoo_names

    if not args.report_only:
        names = zoo_names(args.zoo, args.filter or ())
        if not names:
            print(f"autocut scan: no {args.zoo} model matches {' '.join(args.filter)}", file=sys.stderr)
            return 2
        try:
            counts = scan(names, args.out, jobs=args.jobs, timeout=args.timeout, memory_limit_gb=args.memory_limit_gb or None,
                          retry=args.retry, progress=not args.quiet, argv=_command(args),
                          check="autocut.scan.check:check_model_values" if args.values else None,
                          recheck=_without_values if args.values else _without_pyramid)
        except KeyboardInterrupt:
            write_report(args.out)  # what is recorded so far
            print(f"autocut scan: interrupted; run the same command again to resume ({args.out}/results.jsonl)", file=sys.stderr)
            return 130
    paths = write_report(args.out)
    if not args.quiet:
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if args.report_only:
        return 0
    bad = sum(counts.get(s, 0) for s in ("mismatch", *FAILED_STATUSES))
    return 1 if bad else 0


def _without_pyramid(rec: dict) -> bool:
    """Recorded by an autocut without pyramids: the model's cut was verified, its pyramid never checked."""
    return rec.get("status") in ("ok", "differs") and "pyramid_check" not in rec and "recheck_failed" not in rec


def _without_values(rec: dict) -> bool:
    return (rec.get("status") == "ok" and "values" not in rec and "recheck_failed" not in rec) or _without_pyramid(rec)


def _command(args: argparse.Namespace) -> list[str]:
    """The command line that makes this scan, options spelled out (for the report)."""
    cmd = ["autocut", "scan", "--zoo", args.zoo]
    if args.filter:
        cmd += ["--filter", *(f"'{f}'" for f in args.filter)]
    cmd += ["--jobs", str(args.jobs), "--timeout", f"{args.timeout:g}", "--memory-limit-gb", f"{args.memory_limit_gb:g}"]
    if args.retry:
        cmd += ["--retry", *args.retry]
    if args.values:
        cmd += ["--values"]
    return cmd + ["--out", str(args.out)]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``scan`` to the ``autocut`` command's subparsers."""
    p = sub.add_parser(
        "scan",
        help="cut and verify every timm / torchvision / transformers model; write results.jsonl, model_meta.json, report.md",
        description="Cut every model of a zoo, each in its own process, check the body against the model's own "
        "code (timm: forward_features; torchvision: the input of its global pooling; transformers: the base model's "
        "last_hidden_state or a backbone's last feature map), and write results.jsonl "
        "(append-only: a rerun resumes), model_meta.json, report.md and plots into --out.",
    )
    p.add_argument("--zoo", choices=ZOOS, default="all", help="which zoo (default all)")
    p.add_argument("--values", action="store_true",
                   help="also compare the body's output values with the oracle's on real CPU weights (batch 2, the "
                   "model's own size); re-checks verified records that have no values yet")
    p.add_argument("--filter", nargs="+", metavar="GLOB", help="only names matching one of these globs ('resnet*' 'vit_*')")
    p.add_argument("--jobs", type=POSITIVE_INT, default=2, help="models checked at once (default 2)")
    p.add_argument("--timeout", type=POSITIVE, default=300.0, help="seconds per model before it is killed (default 300)")
    p.add_argument("--memory-limit-gb", type=NON_NEGATIVE, default=6.0,
                   help="memory a model's process may add above the warm worker (RLIMIT_AS; default 6; 0: none)")
    p.add_argument("--out", default="autocut-scan", help="output folder (default ./autocut-scan)")
    p.add_argument("--retry", nargs="+", default=(), choices=("failed", "timeout", "crashed", "oom", "mismatch"),
                   metavar="STATUS", help="check again the models recorded with these statuses")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from --out/results.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_scan)
    return p
