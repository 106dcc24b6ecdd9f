"""Feature pyramids: what autocut finds against what timm's ``features_only`` states by hand, and
what each costs, side by side in one run on the CPU.

For each model (default: one per timm family, ``tests/timm_subset.py``):

- ``timm s``: ``timm.create_model(name, features_only=True)`` (real, randomly initialised weights),
  or why timm has no ``features_only`` for it;
- ``discover s``: ``autocut.discover_pyramid(name)`` (the meta device: no weights);
- ``create s``: ``autocut.create_pyramid(name)`` (real weights, the graph body returning every level);
- agreement: the scan's (:func:`autocut.scan.pyramids.pyramid_differences`): each map timm's
  feature module returns (the last per stride) against autocut's level at that stride, channels
  compared, but where both are the deepest (autocut's is the model's cut by design: after
  efficientnet's ``conv_head``, swin's final norm), compared on stride only; each difference
  with its reason (:data:`autocut.scan.pyramids.PYRAMID_DIFFERENCES`).

    python benchmarks/pyramid.py --out benchmarks/reports/pyramid.md
    python benchmarks/pyramid.py --models resnet18 efficientnet_b0 --repeat 1    # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def agreement(name: str, levels) -> list[str]:
    """Where autocut's levels and the maps timm's ``features_only`` module returns differ (empty
    where they agree): the scan's oracle and comparison (:mod:`autocut.scan.pyramids`)."""
    import torch

    from autocut import zoo
    from autocut.scan.pyramids import level_record, pyramid_differences, pyramid_expected

    spec = zoo.resolve(name)
    x = torch.empty(1, *zoo.default_input_size(spec), device="meta")
    _, stated = pyramid_expected(spec, None, x)
    return pyramid_differences([level_record(level) for level in levels], stated)


def _stride(stride) -> str:
    return "x".join(f"{s:g}" for s in stride) if isinstance(stride, tuple) else f"{stride:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="timm names (default: one per timm family)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported")
    parser.add_argument("--max-params", type=float, default=150, help="skip models with more parameters (millions)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import timm
    import torch

    import autocut
    from autocut import zoo
    from autocut.scan.runner import cpu_model

    torch.set_num_threads(args.threads)
    if args.models:
        names = args.models
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from timm_subset import TIMM_SUBSET

        names = sorted(set(TIMM_SUBSET.values()))
    rows, skipped = [], []
    for i, name in enumerate(names, 1):
        params = sum(p.numel() for p in zoo.build(zoo.resolve(name), device="meta").parameters()) / 1e6
        if params > args.max_params:
            skipped.append(f"{name} ({params:.0f}M)")
            continue
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        row = {"name": name, "params": params}
        try:
            row["timm"], _ = _best(lambda n=name: timm.create_model(n, features_only=True, pretrained=False), args.repeat)
        except Exception as err:  # timm states no levels for it: the row says why
            row["timm_error"] = str(err).splitlines()[0][:70]
        try:
            row["discover"], levels = _best(lambda n=name: autocut.discover_pyramid(n), args.repeat)
            row["create"], _ = _best(lambda n=name: autocut.create_pyramid(n), args.repeat)
            row["levels"] = levels
            row["diff"] = agreement(name, levels) if "timm" in row else None
        except Exception as err:  # autocut finds no pyramid: the row says why
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
        rows.append(row)

    timed = [r for r in rows if "timm" in r and "discover" in r]
    agree = [r for r in timed if not r["diff"]]
    lines = [
        "# Feature pyramids: autocut against timm's `features_only`",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()} ({cpu_model()}), {args.threads} torch threads; CPU only",
        f"- python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}",
        f"- command: `python benchmarks/pyramid.py{' --out ' + args.out if args.out else ''}`; best of {args.repeat}",
        f"- models: {len(rows)}" + (f"; skipped above {args.max_params:g}M parameters: {', '.join(skipped)}" if skipped else ""),
        "",
        "## Summary",
        "",
        f"- with `features_only` in timm and a pyramid from autocut: {len(timed)}; levels agree with the maps its module "
        f"returns (strides and channels; the deepest on stride): {len(agree)}; differ: {len(timed) - len(agree)} "
        "(explained below)",
        f"- no `features_only` in timm, a pyramid from autocut: {sum('timm_error' in r and 'discover' in r for r in rows)}",
        f"- no pyramid from autocut: {sum('error' in r for r in rows)}",
    ]
    if timed:
        discover = statistics.median(r["discover"] / r["timm"] for r in timed)
        create = statistics.median(r["create"] / r["timm"] for r in timed)
        lines.append(f"- median time over `features_only`'s: `discover_pyramid` {discover:.2f}x, `create_pyramid` {create:.2f}x")
    from autocut.scan.pyramids import pyramid_explained

    differing = [r for r in timed if r["diff"]]
    if differing:
        lines += ["", "## Differences, explained", ""]
        reasons: dict[str, list[str]] = {}
        for r in differing:
            reasons.setdefault(pyramid_explained(r["name"]) or "not explained", []).append(r["name"])
        lines += [f"- **{', '.join(names)}**: {why}" for why, names in reasons.items()]
    lines += ["", "## Per model", "",
              "| model | params | autocut strides (channels) | timm s | discover s | create s | discover / timm | create / timm |"
              " differences from timm's maps |",
              "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        levels = r.get("levels")
        shown = ", ".join(f"{_stride(lv.stride)} ({lv.nf})" for lv in levels) if levels else r.get("error", "")
        t, d, c = r.get("timm"), r.get("discover"), r.get("create")
        diff = r.get("diff")
        note = r.get("timm_error", "") if diff is None else ("; ".join(diff) if diff else "agree")
        secs = " | ".join(f"{v:.3f}" if v else "-" for v in (t, d, c))
        lines.append(f"| {r['name']} | {r['params']:.1f}M | {shown} | {secs} | "
                     + (f"{d / t:.2f}x | {c / t:.2f}x" if t and d else "- | -") + f" | {note} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
