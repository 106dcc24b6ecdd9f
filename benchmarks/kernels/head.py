"""Benchmark the head on a GPU: eval (unfolded vs folded) and training (eager vs fused kernels).

Eval implementations, all under ``torch.inference_mode``:

* ``pool_eager`` / ``pool_fused``: the concat pool alone, PyTorch's two ops or the fused kernel;
* ``head_eager``: the head in eval mode with ``AUTOCUT_DISABLE_KERNELS=1`` (all PyTorch);
* ``head_eval``: the head in eval mode with the fused pool (BatchNorm, Linear, ReLU unfolded);
* ``head_folded``: :func:`autocut.kernels.fold.fold_head` (pool, GEMM+ReLU, GEMM);
* ``head_compiled``: ``torch.compile`` of the eager head (at the ResNet-50 shape only).

Training implementations, forward and backward (grads of the input and every parameter), in train
mode with dropout on:

* ``train_eager``: the head with ``AUTOCUT_DISABLE_KERNELS=1``;
* ``train_pool_fused``: the fused pool, BatchNorm and Dropout as PyTorch's modules;
* ``train_fused``: the fused pool and :func:`autocut.layers.fuse_bn_dropout` (one kernel each
  way per BatchNorm-dropout pair);
* ``train_compiled``: ``torch.compile`` of the eager head (at the ResNet-50 shape only).

Before timing, the fused training head is checked against the eager one with dropout off.

Target: ``head_folded`` within 5 us of ``pool_fused``. Writes ``head_<gpu>_<date>.{csv,md,png}``
into ``--out`` (default ``$OUT`` or ``benchmarks/reports/kernels``). Nothing runs without CUDA.

    python -m benchmarks.kernels.head --quick          # from the repository root
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.kernels.common import (
    DTYPES,
    bench,
    count_launches,
    eager,
    env_section,
    fmt,
    make_input,
    md_table,
    over_budget,
    pytorch_only,
    start_report,
    write_csv,
)

TARGET = (256, 2048, 7, 7)
SLACK_US = 5.0


def cases(quick: bool) -> list[tuple]:
    bs = [256] if quick else [32, 256]
    cs = [2048] if quick else [512, 2048]
    dtypes = ["bf16"] if quick else ["fp32", "bf16"]
    grid = [(b, c, 7, 7, d, lay) for b, c, d, lay in itertools.product(bs, cs, dtypes, ["nchw", "channels_last"])]
    return sorted(grid, key=lambda s: (s[:4] != TARGET, s[4] != "bf16", s))


def randomised_head(c: int, n_out: int, dtype, device) -> torch.nn.Module:
    """create_head with non-trivial BatchNorm statistics, so folding is not a no-op."""
    from autocut.layers import create_head

    head = create_head(c, n_out)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return head.to(device, dtype).eval()


def train_step(head: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    """One forward and backward, returning the grads (nothing accumulates between timed calls)."""
    params = [p for p in head.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(head(x), [x, *params], g)


def check_fused_training(head: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> float:
    """Max error of the fused training head's output and grads against eager, dropout off, relative to scale."""
    import copy

    from autocut.layers import BatchNormDropout1d

    a, b = copy.deepcopy(head), copy.deepcopy(fused)  # keep the timed heads' running statistics
    for m in list(a.modules()) + list(b.modules()):
        if isinstance(m, (torch.nn.Dropout, BatchNormDropout1d)):
            m.p = 0.0
    g = torch.randn(x.shape[0], head[-1].out_features, device=x.device, dtype=x.dtype)
    with pytorch_only(True):
        want = train_step(a, x, g)()
    got = train_step(b, x, g)()
    return max(((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-12)).item()
               for u, v in zip(got, want))


def time_impls(impls: dict, args, shape: tuple, compile_s: dict, rel_err: dict, inference: bool) -> list[dict]:
    """Time each ``name -> (fn, pytorch only)`` of one shape; a CSV row each. ``compile_s`` and
    ``rel_err`` give those columns for the implementations they name."""
    b, c, h, w, dname, layout = shape
    rows = []
    for name, (fn, disable) in impls.items():
        with pytorch_only(disable), (torch.inference_mode() if inference else contextlib.nullcontext()):
            med, p20, p80 = bench(fn, args.warmup, args.rep)
            launches = count_launches(fn)
        rows.append({"impl": name, "B": b, "C": c, "H": h, "W": w, "dtype": dname, "layout": layout,
                     "n_out": args.n_out, "median_us": round(med, 2), "p20_us": round(p20, 2),
                     "p80_us": round(p80, 2), "launches": launches, "compile_s": compile_s.get(name, ""),
                     "rel_err": f"{rel_err[name]:.2e}" if name in rel_err else ""})
        print(f"  {name:16s} {med:9.1f} us  launches {launches}", flush=True)
    return rows


def run_train(args, rows: list[dict]) -> str:
    """Append the training head's rows to ``rows`` (the CSV is rewritten with all of them after
    each shape); returns why it stopped early, or ``''``."""
    import copy

    import torch._dynamo

    from autocut.layers import fuse_bn_dropout

    stopped, started = "", time.time()
    grid = cases(args.quick)
    for n, (b, c, h, w, dname, layout) in enumerate(grid):
        if stopped := over_budget(args.budget_s, started, n, len(grid), "training head"):
            break
        dtype = DTYPES[dname]
        x = make_input((b, c, h, w), dtype, layout).requires_grad_()
        head = randomised_head(c, args.n_out, dtype, x.device).train()
        fused = fuse_bn_dropout(copy.deepcopy(head))
        g = torch.randn(b, args.n_out, device=x.device, dtype=dtype)
        rel_err = check_fused_training(head, fused, x)
        if rel_err > (1e-3 if dtype == torch.float32 else 5e-2):
            print(f"  WARNING: fused training head differs from eager by {rel_err:.2e} of its scale")
        impls = {
            "train_eager": (train_step(head, x, g), True),
            "train_pool_fused": (train_step(head, x, g), False),
            "train_fused": (train_step(fused, x, g), False),
        }
        compile_s = ""
        if (b, c, h, w) == TARGET and args.compile:
            torch._dynamo.reset()
            compiled = torch.compile(head, dynamic=False)
            with pytorch_only(True):
                t0 = time.time()
                train_step(compiled, x, g)()
                torch.cuda.synchronize()
                compile_s = round(time.time() - t0, 1)
            impls["train_compiled"] = (train_step(compiled, x, g), True)
        print(f"[train {n + 1}/{len(grid)}] B={b} C={c} {h}x{w} {dname} {layout}", flush=True)
        rows += time_impls(impls, args, (b, c, h, w, dname, layout), {"train_compiled": compile_s},
                           {"train_fused": rel_err}, inference=False)
        write_csv(rows, args.csv_path)
    return stopped


def run(args) -> tuple[list[dict], str]:
    import torch._dynamo

    from autocut.kernels.concat_pool import concat_pool2d
    from autocut.kernels.fold import fold_head

    rows, stopped, started = [], "", time.time()
    grid = cases(args.quick)
    for n, (b, c, h, w, dname, layout) in enumerate(grid):
        if stopped := over_budget(args.budget_s, started, n, len(grid), "eval head"):
            break
        dtype = DTYPES[dname]
        x = make_input((b, c, h, w), dtype, layout)
        head = randomised_head(c, args.n_out, dtype, x.device)
        folded = fold_head(head)
        impls = {
            "pool_eager": (partial(eager, x), True),
            "pool_fused": (partial(concat_pool2d, x), False),
            "head_eager": (partial(head, x), True),
            "head_eval": (partial(head, x), False),
            "head_folded": (partial(folded, x), False),
        }
        compile_s = ""
        if (b, c, h, w) == TARGET and args.compile:
            torch._dynamo.reset()
            compiled = torch.compile(head, dynamic=False)
            with pytorch_only(True), torch.inference_mode():
                t0 = time.time()
                compiled(x)
                torch.cuda.synchronize()
                compile_s = round(time.time() - t0, 1)
            impls["head_compiled"] = (partial(compiled, x), True)
        with torch.inference_mode():
            with pytorch_only(True):
                want = head(x).float()
            got = folded(x).float()
        # Max error relative to the output's scale: two GEMMs in the input dtype, weights folded once.
        rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if rel_err > (1e-4 if dtype == torch.float32 else 3e-2):
            print(f"  WARNING: folded head differs from the head by {rel_err:.2e} of its scale")
        print(f"[{n + 1}/{len(grid)}] B={b} C={c} {h}x{w} {dname} {layout}", flush=True)
        rows += time_impls(impls, args, (b, c, h, w, dname, layout), {"head_compiled": compile_s},
                           {"head_folded": rel_err}, inference=True)
        write_csv(rows, args.csv_path)
    return rows, stopped


def verdicts(rows: list[dict]) -> list[list]:
    out = []
    for key in sorted({(r["B"], r["C"], r["H"], r["W"], r["dtype"], r["layout"]) for r in rows}):
        by = {r["impl"]: r for r in rows if (r["B"], r["C"], r["H"], r["W"], r["dtype"], r["layout"]) == key}
        if "head_folded" not in by or "pool_fused" not in by:
            continue
        head, pool = by["head_folded"]["median_us"], by["pool_fused"]["median_us"]
        out.append([f"B={key[0]} C={key[1]} {key[2]}x{key[3]} {key[4]} {key[5]}", fmt(pool), fmt(head),
                    fmt(head - pool), "PASS" if head <= pool + SLACK_US else "FAIL"])
    return out


def write_report(args, env, rows, stopped, path: Path, figure: str | None) -> None:
    extra = {"do_bench": f"warmup {args.warmup} ms, rep {args.rep} ms, L2 cleared, median (p20/p80 in CSV)",
             "head": f"create_head(C, {args.n_out}): pool, BN, Dropout, Linear, ReLU, BN, Dropout, Linear",
             "grid": "quick" if args.quick else "full"}
    text = [f"# Head (eval and training): {env['gpu']}, {env['date']}", "", env_section(env, extra), ""]
    if stopped:
        text += [f"**Incomplete:** {stopped}.", ""]
    v = verdicts(rows)
    overall = "UNMEASURED" if not v else ("PASS" if all(r[-1] == "PASS" for r in v) else "FAIL")
    text += [f"## Target: folded eval head <= fused pool + {SLACK_US:.0f} us: {overall}", "",
             md_table(["shape", "pool_fused us", "head_folded us", "difference us", "verdict"], v), ""]
    eval_rows = [r for r in rows if not r["impl"].startswith("train_")]
    train_rows = [r for r in rows if r["impl"].startswith("train_")]
    text += ["## Eval head: median us (GPU launches)", "", launches_table(eval_rows), ""]
    if train_rows:
        text += ["## Training head, forward + backward: median us (GPU launches)", "",
                 "Dropout on; grads of the input and every parameter. `speed-up` is train_eager / "
                 "train_fused; the last column is the fused head's largest error against eager with "
                 "dropout off, relative to scale.", "", launches_table(train_rows, speedup=("train_eager", "train_fused")), ""]
    if figure:
        text += [f"![{figure}]({figure})", ""]
    path.write_text("\n".join(text))


def launches_table(rows: list[dict], speedup: tuple[str, str] | None = None) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    shapes = list(dict.fromkeys((r["B"], r["C"], r["H"], r["W"], r["dtype"], r["layout"]) for r in rows))
    body = []
    for s in shapes:
        by = {r["impl"]: r for r in rows if (r["B"], r["C"], r["H"], r["W"], r["dtype"], r["layout"]) == s}
        line = [f"B={s[0]} C={s[1]} {s[2]}x{s[3]} {s[4]} {s[5]}"]
        line += [f"{fmt(by[i]['median_us'])} ({by[i]['launches']})" if i in by else "" for i in impls]
        if speedup:
            base, new = (by.get(k) for k in speedup)
            line += [f"{base['median_us'] / new['median_us']:.2f}x" if base and new else "",
                     new["rel_err"] if new else ""]
        body.append(line)
    return md_table(["shape"] + impls + (["speed-up", "error"] if speedup else []), body)


def plot(rows: list[dict], out: Path, stem: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    shapes = list(dict.fromkeys((r["B"], r["C"], r["dtype"], r["layout"]) for r in rows))
    if not shapes:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes)), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ys = []
        for s in shapes:
            r = [r for r in rows if r["impl"] == impl and (r["B"], r["C"], r["dtype"], r["layout"]) == s]
            ys.append(r[0]["median_us"] if r else 0)
        ax.bar([k + i * width for k in range(len(shapes))], ys, width, label=impl)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(shapes))])
    ax.set_xticklabels([f"B={s[0]}\nC={s[1]}\n{s[2]} {s[3]}" for s in shapes], fontsize=7)
    ax.set_ylabel("median us")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Head, 7x7 map: eval (inference), train_* (forward + backward)")
    fig.tight_layout()
    name = f"{stem}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced grid: B=256, C=2048, bf16, both layouts")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/reports/kernels"),
                   help="report folder (default: $OUT or %(default)s)")
    p.add_argument("--warmup", type=float, default=5.0, help="do_bench warmup, ms (default %(default)s)")
    p.add_argument("--rep", type=float, default=20.0, help="do_bench repetition time, ms (default %(default)s)")
    p.add_argument("--n-out", type=int, default=1000, help="classes of the head (default %(default)s)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the eager head")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training head")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new shapes after this many seconds (each part)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, env, stem = start_report(args, "benchmarks/kernels/head.py", "head")
    rows, stopped = run(args)
    write_csv(rows, args.csv_path)
    write_report(args, env, rows, stopped, out / f"{stem}.md", None)  # kept if the training part is killed
    if args.train:
        try:
            train_stopped = run_train(args, rows)
        except Exception as e:  # a failing training part must not cost the eval report
            train_stopped = f"training head failed: {e!r:.300}"
            print(train_stopped)
        stopped = "; ".join(x for x in (stopped, train_stopped) if x)
    write_csv(rows, args.csv_path)
    figure = plot(rows, out, stem)
    write_report(args, env, rows, stopped, out / f"{stem}.md", figure)
    print(f"wrote {args.csv_path} and {out / (stem + '.md')}")
    for v in verdicts(rows):
        print(f"  {v[-1]:5s} {v[0]}: folded head {v[2]} us vs fused pool {v[1]} us")


if __name__ == "__main__":
    main()
