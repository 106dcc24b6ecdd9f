"""Discovery cost against fastai's way, on a ladder of models up to a >1B-parameter ViT.

autocut: build on the meta device, trace, propagate shapes on meta tensors (``autocut.discover``).
fastai's way (``num_features_model``): build the model with real weights and run a real dummy
forward to read ``nf``. Each measurement runs in its own subprocess, so peak memory (max RSS
above the process's baseline after imports) is the measurement's own.

    python benchmarks/discovery.py                     # the default ladder, report to stdout
    python benchmarks/discovery.py --out benchmarks/reports/discovery.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys

LADDER = [
    "resnet18",
    "resnet50",
    "convnext_base",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
    "vit_giant_patch14_224",  # 1.0B parameters
]

_CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, timm, autocut
from autocut import zoo
torch.set_num_threads({threads})
name, way = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if way == "autocut":
    cut = autocut.discover(name)
    nf, params = cut.nf, None
else:  # fastai's num_features_model: real weights, real dummy forward at the model's size
    spec = zoo.resolve(name)
    model = timm.create_model(name, pretrained=False).eval()
    size = zoo.default_input_size(spec)
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, *size))
    nf = feats.shape[1] if feats.ndim == 4 else feats.shape[-1]
    params = sum(p.numel() for p in model.parameters())
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"nf": nf, "seconds": seconds, "peak_mb": (peak - base) / 1024, "params": params}}))
"""


def _params(name: str) -> int:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def _run(name: str, way: str, threads: int, timeout: float) -> dict:
    code = _CHILD.format(threads=threads)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, name, way], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=LADDER, help="timm names (default: the ladder)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each measurement")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    parser.add_argument("--out", help="also write the Markdown report here")
    args = parser.parse_args(argv)

    import timm
    import torch

    rows = []
    for i, name in enumerate(args.models, 1):
        params = _params(name)
        print(f"[{i}/{len(args.models)}] {name} ({params / 1e6:.0f}M params) ...", file=sys.stderr, flush=True)
        ours = _run(name, "autocut", args.threads, args.timeout)
        theirs = _run(name, "fastai", args.threads, args.timeout)
        rows.append((name, params, ours, theirs))

    lines = [
        "# Discovery cost: autocut (meta device) vs fastai's way (real weights + real forward)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads available, "
        f"measurements with {args.threads} threads; CPU only",
        f"- python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}",
        f"- command: `python benchmarks/discovery.py{' --out ' + args.out if args.out else ''}`",
        "- memory: peak RSS above the subprocess's baseline after imports",
        "",
        "| model | params | nf | autocut s | autocut MB | fastai s | fastai MB | time ratio | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, params, ours, theirs in rows:
        if "error" in ours or "error" in theirs:
            lines.append(f"| {name} | {params / 1e6:.0f}M | | {ours.get('error', '')} | | {theirs.get('error', '')} | | | |")
            continue
        same = "" if ours["nf"] == theirs["nf"] else f" (fastai: {theirs['nf']})"
        t_ratio = theirs["seconds"] / max(ours["seconds"], 1e-9)
        m_ratio = theirs["peak_mb"] / max(ours["peak_mb"], 1.0)
        lines.append(
            f"| {name} | {params / 1e6:.0f}M | {ours['nf']}{same} | {ours['seconds']:.2f} | {ours['peak_mb']:.0f} "
            f"| {theirs['seconds']:.2f} | {theirs['peak_mb']:.0f} | {t_ratio:.1f}x | {m_ratio:.0f}x |"
        )
    lines += [
        "",
        "Target: discovery cost independent of parameter count; >= 10x less time and memory than",
        "fastai's way on the largest rung. (Memory ratio divides by at least 1 MB.)",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
