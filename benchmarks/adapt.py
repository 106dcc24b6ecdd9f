"""What a user pays to get a model to fine-tune: ``autocut.adapt(name, n_out)`` side by side with
the tools they would pick instead, on a ladder of timm models (small to 1B parameters), torchvision
models and transformers model types, all with real (randomly initialised) weights on the CPU.

Ways, each where it applies:

- ``timm``: ``timm.create_model(name, num_classes=n)`` (timm names); ``torchvision.models.get_model(
  name, num_classes=n)``; ``AutoModelForImageClassification.from_config(config, num_labels=n)``:
  the zoo's own constructor with a new classifier, the floor ``adapt`` is measured against;
- ``fastai``: ``create_timm_model`` / ``create_vision_model`` (fastai's body and head), where
  fastai is installed (a benchmark-only dependency) and can build the model;
- ``tv_fx``: torchvision's ``create_feature_extractor`` at the node autocut cuts at, plus a
  Linear head: the user names the node (found beforehand, not timed);
- ``autocut``: ``autocut.adapt(name, n_out=n)``.

Each way builds the model six times in a subprocess, twice (``--rounds``; the ways take turns, so
that a slow spell of the machine does not fall on one way): the first build of a subprocess (what
a script that builds one model pays), then the best of the others (a notebook or a sweep building the model again: timm's
registry and autocut's recipes, :mod:`autocut.memo`, are warm); the report gives both, the peak
RSS above the subprocess's baseline after imports, and each way's time over ``timm``'s. Every
subprocess runs with glibc's mmap threshold fixed (:data:`ALLOCATOR`), so that a way's repeated
builds do not move with the allocator's adaptive threshold.

    python benchmarks/adapt.py --out benchmarks/reports/adapt.md
    python benchmarks/adapt.py --models resnet18 torchvision:resnet18 --repeat 1   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# run as a script, this folder comes first on the path, where its ``kernels`` package would shadow
# the one transformers imports by that name
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

LADDER = [
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "regnety_016",
    "convnext_tiny",
    "swin_tiny_patch4_window7_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_giant_patch14_224",  # 1.0B parameters
    "torchvision:resnet50",
    "torchvision:mobilenet_v3_large",
    "transformers:resnet",
    "transformers:vit",
]
WAYS = ("timm", "fastai", "tv_fx", "autocut")
N_OUT = 10
# glibc's malloc raises its mmap threshold after the first large free: whether a later build then
# reuses freed heap memory or faults in fresh pages depends on the order of frees, which moves a
# way's repeated builds by up to 30% between two runs (resnet50: 191 or 255 ms for the same way).
# Every way runs with the threshold fixed at glibc's default (each large tensor a fresh mapping).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}

_CHILD = r"""
import gc, json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads({threads})
name, way, repeat, node, nf = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
import timm, torchvision, autocut
from autocut import zoo
spec = zoo.resolve(name)
if way == "fastai":
    from fastai.vision.learner import create_timm_model, create_vision_model
if spec.source == "transformers":
    import transformers


def build():
    if way == "autocut":
        return autocut.adapt(name, n_out={n_out})
    if way == "timm":
        if spec.source == "timm":
            return timm.create_model(spec.name, num_classes={n_out})
        if spec.source == "torchvision":
            return torchvision.models.get_model(spec.name, num_classes={n_out})
        config = transformers.AutoConfig.for_model(spec.name, num_labels={n_out})
        return transformers.AutoModelForImageClassification.from_config(config)
    if way == "fastai":
        if spec.source == "timm":
            return create_timm_model(spec.name, {n_out}, pretrained=False)
        return create_vision_model(getattr(torchvision.models, spec.name), {n_out}, pretrained=False)
    if way == "tv_fx":  # the body at the node named, and the head a user writes around it
        from torchvision.models.feature_extraction import create_feature_extractor

        class WithHead(torch.nn.Module):
            def __init__(self, body):
                super().__init__()
                self.body, self.head = body, torch.nn.Linear(nf, {n_out})

            def forward(self, x):
                return self.head(self.body(x)["features"].mean((2, 3)))

        return WithHead(create_feature_extractor(zoo.build(spec, device="cpu"), {{node: "features"}}))
    raise SystemExit(f"unknown way {{way}}")


base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeat):
    gc.collect()
    start = time.perf_counter()
    model = build()
    times.append(time.perf_counter() - start)
    del model
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"first": times[0], "seconds": min(times[1:] or times), "all": times, "peak_mb": (peak - base) / 1024}}))
"""


def _applies(name: str, way: str) -> str | None:
    """Why ``way`` does not apply to ``name`` (``None`` where it does)."""
    source = name.split(":", 1)[0] if ":" in name else "timm"
    if way == "fastai":
        try:
            import fastai  # noqa: F401
        except ImportError:
            return "fastai not installed"
        return "no fastai builder" if source == "transformers" else None
    if way == "tv_fx":
        return None if source == "torchvision" else "torchvision models only"
    return None


def _run(name: str, way: str, threads: int, repeat: int, cut, timeout: float) -> dict:
    code = _CHILD.format(threads=threads, n_out=N_OUT)
    try:
        proc = subprocess.run([sys.executable, "-c", code, name, way, str(repeat), cut.where, str(cut.nf)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **ALLOCATOR})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    """One way's runs as one: the best repeated and the best first build, the highest peak; a
    skip or an error where no run measured anything."""
    measured = [r for r in runs if "seconds" in r]
    if not measured:
        return runs[0]
    return {"seconds": min(r["seconds"] for r in measured), "first": min(r["first"] for r in measured),
            "peak_mb": max(r["peak_mb"] for r in measured), "all": [t for r in measured for t in r["all"]]}


def _versions(libraries: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(library, version)`` of each library installed."""
    from importlib import metadata

    found = []
    for lib in libraries:
        try:
            found.append((lib, metadata.version(lib)))
        except metadata.PackageNotFoundError:
            continue
    return found


def _params(name: str) -> int:
    from autocut import zoo

    return sum(p.numel() for p in zoo.build(zoo.resolve(name), device="meta").parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=LADDER, help="zoo names (default: the ladder)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each measurement")
    parser.add_argument("--repeat", type=int, default=6, help="builds per measurement: the first, and the best of the rest")
    parser.add_argument("--rounds", type=int, default=2,
                        help="subprocesses per way, the ways taking turns; the best of them is reported")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--out", help="also write the Markdown report here")
    args = parser.parse_args(argv)

    import timm
    import torch

    import autocut
    from autocut.scan.runner import cpu_model

    rows = []
    for i, name in enumerate(args.models, 1):
        params = _params(name)
        cut = autocut.discover(name)  # the node torchvision's extractor is given (not timed)
        print(f"[{i}/{len(args.models)}] {name} ({params / 1e6:.0f}M params) ...", file=sys.stderr, flush=True)
        runs: dict[str, list[dict]] = {way: [] for way in WAYS}
        for _ in range(args.rounds):  # the ways take turns: a slow spell of the machine does not fall on one way
            for way in WAYS:
                skip = _applies(name, way)
                runs[way].append({"skip": skip} if skip else _run(name, way, args.threads, args.repeat, cut, args.timeout))
        rows.append((name, params, {way: _best(r) for way, r in runs.items()}))

    header = ["model", "params"] + [f"{w} s" for w in WAYS] + [f"{w} / timm" for w in WAYS if w != "timm"] + \
             ["timm first s", "autocut first s", "first: autocut / timm"] + [f"{w} MB" for w in WAYS]
    lines = [
        "# What `autocut.adapt` costs against the tools a user would pick instead",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()} ({cpu_model()}), measurements with {args.threads} torch threads; CPU only",
        f"- python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}"
        + "".join(f", {lib} {version}" for lib, version in _versions(("torchvision", "transformers", "fastai"))),
        f"- command: `python benchmarks/adapt.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- each way: {args.rounds} subprocesses (the ways taking turns), {args.repeat} builds in each (real, randomly "
        f"initialised weights, {N_OUT} classes); `s`: the best build after a subprocess's first (built again in one "
        "process: timm's registry and autocut's recipes warm); `first s`: the best first build; memory: peak RSS "
        "above the subprocess's baseline after imports; "
        f"every subprocess with {' '.join(f'{k}={v}' for k, v in ALLOCATOR.items())} (glibc's mmap threshold fixed "
        "at its default: otherwise it moves with the order of frees, and repeated builds by up to 30%)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if j == 0 else "---:" for j in range(len(header))) + "|",
    ]
    def cell(r: dict, key: str, fmt: str) -> str:
        if "skip" in r:
            return "-"
        return r["error"][:40] if "error" in r else fmt.format(r[key])

    def ratio(r: dict, floor: dict, key: str) -> str:
        got, base = r.get(key), floor.get(key)
        return f"{got / base:.2f}x" if got and base else "-"

    for name, params, results in rows:
        timm_r, auto = results["timm"], results["autocut"]
        lines.append("| " + " | ".join(
            [name, f"{params / 1e6:.0f}M"] + [cell(results[w], "seconds", "{:.3f}") for w in WAYS]
            + [ratio(results[w], timm_r, "seconds") for w in WAYS if w != "timm"]
            + [cell(timm_r, "first", "{:.3f}"), cell(auto, "first", "{:.3f}"), ratio(auto, timm_r, "first")]
            + [cell(results[w], "peak_mb", "{:.0f}") for w in WAYS]) + " |")
    skipped = sorted({r["skip"] for _, _, res in rows for r in res.values() if "skip" in r})
    lines += ["", "`-`: the way does not apply (" + "; ".join(skipped) + ")." if skipped else "",
              "Target (issue 16): `autocut / timm` at most 1.3x on every rung, and no more than fastai's way where "
              "fastai can build the model."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
