"""Benchmark the fused concat pool against eager PyTorch, timm and torch.compile, on a CUDA GPU.

For every shape it times forward and forward+backward with ``triton.testing.do_bench`` (L2
cleared before each run; median and 20/80 percentiles), turns the median into effective GB/s from
the bytes that must move, and divides by a bandwidth probe (a 1 GiB device-to-device copy)
measured in the same run. Kernel launches are counted with ``torch.profiler``. It ends with one
end-to-end figure: a ResNet-50 training step (B=256, bf16 autocast, channels_last) with the eager
head vs the fused head. Every fused result is checked against eager before it is timed.

Writes ``concat_pool_<gpu>_<date>.{csv,md}`` and PNG plots into ``--out`` (default ``$OUT`` or
``benchmarks/reports/kernels``). Nothing runs without a CUDA device.

    python -m benchmarks.kernels.concat_pool --quick          # from the repository root
    python -m benchmarks.kernels.concat_pool --compile subset --budget-s 150
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kernels.common import (
    DEVICE,
    DTYPES,
    TOL,
    bandwidth_probe,
    bench,
    count_launches,
    eager,
    env_section,
    fmt,
    make_input,
    md_table,
    start_report,
    write_csv,
)

TARGET_SHAPE = (256, 2048, 7, 7)  # ResNet-50's last map at 224px
BIG_INPUT_MB = 50.0


# --- implementations ------------------------------------------------------------------------


def _grad_of(fn, x: torch.Tensor, g: torch.Tensor):
    return torch.autograd.grad(fn(x), x, g)


def implementations(compile_modes: bool) -> dict:
    """name -> callable ``x -> (B, 2C, 1, 1)``; compiled ones are built per shape (see ``main``)."""
    from autocut.kernels.concat_pool import concat_pool2d

    impls = {"eager": eager}
    try:
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveCatAvgMaxPool, adaptive_catavgmax_pool2d

        impls["timm_catavgmax"] = adaptive_catavgmax_pool2d  # [avg, max]
        impls["timm_fastcatavgmax"] = FastAdaptiveCatAvgMaxPool()  # mean + amax over (H, W)
    except ImportError:
        print("timm not installed: its two implementations are left out")
    if compile_modes:
        impls["compile_default"] = None
        impls["compile_max_autotune"] = None
    impls["fused"] = concat_pool2d
    return impls


COMPILE_MODES = {"compile_default": "default", "compile_max_autotune": "max-autotune-no-cudagraphs"}


def cases(quick: bool) -> list[tuple]:
    """``(B, C, H, W, dtype, layout)``: the ResNet-50 shape first, then large inputs first, so a
    run stopped by its time budget still has the rows the targets need."""
    bs = [32, 256] if quick else [32, 128, 256, 512]
    cs = [512, 2048] if quick else [512, 1024, 1280, 2048]
    hws = [(7, 7), (12, 12)]
    dtypes = ["bf16"] if quick else ["fp32", "bf16"]
    layouts = ["nchw", "channels_last"]
    grid = [(b, c, h, w, d, lay) for b, c, (h, w), d, lay in itertools.product(bs, cs, hws, dtypes, layouts)]
    if quick:  # fp32 at the ResNet-50 shape only
        grid += [(*TARGET_SHAPE, "fp32", lay) for lay in layouts]
    def order(s):
        return s[:4] != TARGET_SHAPE, s[4] != "bf16", -s[0] * s[1] * s[2] * s[3] * (4 if s[4] == "fp32" else 2), s

    return sorted(set(grid), key=order)


def compile_here(case, which: str) -> bool:
    """Whether torch.compile is measured at this shape: compiling every shape (dynamic=False,
    each its own graphs) would take far longer than the rest of the run."""
    b, c, h, w, dname, _ = case
    if which == "all":
        return True
    if which == "subset":
        return b == 256 and c == 2048
    if which == "target":
        return (b, c, h, w) == TARGET_SHAPE and dname == "bf16"
    return False


# --- the run --------------------------------------------------------------------------------


def run_grid(args, probe_gbps: float) -> tuple[list[dict], str]:
    import torch._dynamo

    impls = implementations(args.compile != "none")
    grid = cases(args.quick)
    rows: list[dict] = []
    started = time.time()
    stopped = ""
    for n, case in enumerate(grid):
        if args.budget_s and time.time() - started > args.budget_s:
            stopped = f"stopped by --budget-s {args.budget_s:.0f} after {n} of {len(grid)} shapes"
            print(stopped)
            break
        b, c, h, w, dname, layout = case
        dtype = DTYPES[dname]
        x = make_input((b, c, h, w), dtype, layout)
        xg = x.detach().requires_grad_()
        g = torch.randn(b, 2 * c, 1, 1, device=x.device, dtype=dtype)
        es = x.element_size()
        input_mb = x.numel() * es / 1e6
        # The bytes no implementation can avoid: read x, write out (+ read grad, write grad_x).
        must = {"fwd": x.numel() * es + 2 * b * c * es, "fwd+bwd": 2 * x.numel() * es + 4 * b * c * es}
        want = eager(x)
        profile = (b, c, h, w) == TARGET_SHAPE
        print(f"[{n + 1}/{len(grid)}] B={b} C={c} {h}x{w} {dname} {layout} ({input_mb:.1f} MB)", flush=True)
        torch._dynamo.reset()  # each shape compiles its own static graphs; keep the cache small
        for name, fn in impls.items():
            compile_s = ""
            if name in COMPILE_MODES:
                if not compile_here(case, args.compile):
                    continue
                fn = torch.compile(eager, mode=COMPILE_MODES[name], dynamic=False)
                t0 = time.time()
                fn(x)
                torch.autograd.grad(fn(xg), xg, g)
                torch.cuda.synchronize()
                compile_s = round(time.time() - t0, 1)
            ok = ""
            if name == "fused":
                try:
                    torch.testing.assert_close(fn(x), want, equal_nan=True, **TOL[dtype])
                    ok = True
                except AssertionError as e:
                    ok = False
                    print(f"  WARNING: fused result differs from eager: {str(e)[:200]}")
            runs = {"fwd": partial(fn, x), "fwd+bwd": partial(_grad_of, fn, xg, g)}
            for mode, run in runs.items():
                med, p20, p80 = bench(run, args.warmup, args.rep)
                gbps = must[mode] / (med * 1e-6) / 1e9
                rows.append({
                    "impl": name, "mode": mode, "B": b, "C": c, "H": h, "W": w, "hw": h * w, "dtype": dname,
                    "layout": layout, "input_MB": round(input_mb, 2), "median_us": round(med, 2),
                    "p20_us": round(p20, 2), "p80_us": round(p80, 2), "bytes": must[mode],
                    "GBps": round(gbps, 1), "pct_of_probe": round(100 * gbps / probe_gbps, 1),
                    "launches": count_launches(run) if profile else "", "compile_s": compile_s,
                    "matches_eager": ok,
                })
            print(f"  {name:22s} fwd {rows[-2]['median_us']:9.1f} us  fwd+bwd {rows[-1]['median_us']:9.1f} us"
                  f"  ({rows[-2]['pct_of_probe']:.0f}% / {rows[-1]['pct_of_probe']:.0f}% of probe)", flush=True)
        write_csv(rows, args.csv_path)  # after every shape, so a killed run keeps what it measured
    return rows, stopped


E2E_VARIANTS = ("eager head", "fused head", "fused head + bn-dropout")


def run_e2e(args) -> dict:
    """ResNet-50 training step (B=256, 224px, bf16 autocast, channels_last): the eager head, the
    head with the fused pool, and that head with its BatchNorm-dropout pairs fused too."""
    from torch import nn

    from autocut.layers import create_head, fuse_bn_dropout

    try:
        from autocut import adapt

        model, how = adapt("resnet50", n_out=1000), "autocut.adapt('resnet50', n_out=1000)"
    except Exception as e:  # the zoo or tracer failing must not cost the figure
        import timm

        body = timm.create_model("resnet50", num_classes=0, global_pool="")
        model, how = nn.Sequential(body, create_head(2048, 1000)), f"timm resnet50 body + create_head (adapt failed: {e!r:.100})"
    b, size = args.e2e_batch, args.e2e_size
    model = model.to(DEVICE, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(b, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    out = {"model": how, "batch": b, "size": size}
    before = os.environ.get("AUTOCUT_DISABLE_KERNELS")
    try:
        for name, disable in zip(E2E_VARIANTS, ("1", "0", "0")):
            os.environ["AUTOCUT_DISABLE_KERNELS"] = disable  # read at every call: one switch, same model
            if name == "fused head + bn-dropout":
                fuse_bn_dropout(model)  # in place, same parameters: the optimiser carries on
            out[name] = med, p20, p80 = bench(step, args.e2e_warmup, args.e2e_rep)
            print(f"  ResNet-50 step, {name}: {med / 1e3:.2f} ms ({b / (med * 1e-6):.0f} img/s)", flush=True)
    finally:
        if before is None:
            os.environ.pop("AUTOCUT_DISABLE_KERNELS", None)
        else:
            os.environ["AUTOCUT_DISABLE_KERNELS"] = before
    torch.cuda.empty_cache()
    return out


# --- the report -----------------------------------------------------------------------------


def _pick(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def targets(rows: list[dict]) -> list[list]:
    """``[target, measured, verdict]`` rows for the Markdown."""
    out = []
    big = [r for r in _pick(rows, impl="fused", mode="fwd") if r["input_MB"] >= BIG_INPUT_MB]
    if big:
        worst = min(big, key=lambda r: r["pct_of_probe"])
        med = sorted(r["pct_of_probe"] for r in big)[len(big) // 2]
        out.append([f"pool forward >= 85% of probed bandwidth, inputs >= {BIG_INPUT_MB:.0f} MB ({len(big)} shapes)",
                    f"worst {worst['pct_of_probe']}% (B={worst['B']} C={worst['C']} {worst['H']}x{worst['W']} "
                    f"{worst['dtype']} {worst['layout']}), median {med}%",
                    "PASS" if worst["pct_of_probe"] >= 85 else "FAIL"])
    else:
        out.append([f"pool forward >= 85% of probed bandwidth, inputs >= {BIG_INPUT_MB:.0f} MB", "no such shape measured",
                    "UNMEASURED"])
    b, c, h, w = TARGET_SHAPE
    for layout in ["nchw", "channels_last"]:
        sel = {r["impl"]: r["median_us"] for r in _pick(rows, mode="fwd+bwd", B=b, C=c, H=h, W=w, dtype="bf16", layout=layout)}
        name = f"pool fwd+bwd at B={b}, {c}x{h}x{w}, bf16, {layout}"
        if "fused" not in sel or "eager" not in sel:
            out.append([name + ": >= 3x eager, >= 2x torch.compile", "not measured", "UNMEASURED"])
            continue
        vs_eager = sel["eager"] / sel["fused"]
        out.append([name + ": >= 3x eager", f"{vs_eager:.2f}x ({sel['eager']:.1f} vs {sel['fused']:.1f} us)",
                    "PASS" if vs_eager >= 3 else "FAIL"])
        compiled = {k: v for k, v in sel.items() if k in COMPILE_MODES}
        if compiled:
            best = min(compiled, key=compiled.get)
            vs = compiled[best] / sel["fused"]
            out.append([name + ": >= 2x torch.compile (best mode)", f"{vs:.2f}x vs {best} ({compiled[best]:.1f} us)",
                        "PASS" if vs >= 2 else "FAIL"])
        else:
            out.append([name + ": >= 2x torch.compile", "torch.compile not measured", "UNMEASURED"])
    out.append(["eval head <= pool time + 5 us", "see the head report (benchmarks/kernels/head.py)", "-"])
    return out


def summary_tables(rows: list[dict]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    parts = []
    for mode in ["fwd", "fwd+bwd"]:
        for dname in ["fp32", "bf16"]:
            for layout in ["nchw", "channels_last"]:
                sel = _pick(rows, mode=mode, dtype=dname, layout=layout)
                if not sel:
                    continue
                shapes = sorted({(r["B"], r["C"], r["H"], r["W"]) for r in sel})
                body = []
                for s in shapes:
                    by = {r["impl"]: r for r in sel if (r["B"], r["C"], r["H"], r["W"]) == s}
                    fused = by.get("fused")
                    body.append([f"{s[0]}x{s[1]}x{s[2]}x{s[3]}", fmt(by[next(iter(by))]["input_MB"])]
                                + [fmt(by[i]["median_us"]) if i in by else "" for i in impls]
                                + [fmt(fused["pct_of_probe"]) if fused else ""])
                parts.append(f"### {mode}, {dname}, {layout} (median us)\n\n"
                             + md_table(["B x C x H x W", "MB"] + impls + ["fused % of probe"], body))
    return "\n\n".join(parts)


def launch_table(rows: list[dict]) -> str:
    sel = [r for r in rows if r["launches"] != ""]
    if not sel:
        return "(no launch counts: the profiler was unavailable or the ResNet-50 shape was not reached)"
    body = [[r["impl"], r["mode"], r["dtype"], r["layout"], r["launches"]] for r in sel]
    return md_table(["impl", "mode", "dtype", "layout", "GPU launches"], body)


def plots(rows: list[dict], out: Path, stem: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    files = []
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for mode in ["fwd", "fwd+bwd"]:
        fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharey=True)
        for ax, (dname, layout) in zip(axes.flat, itertools.product(["fp32", "bf16"], ["nchw", "channels_last"])):
            for impl in impls:
                sel = sorted(_pick(rows, impl=impl, mode=mode, dtype=dname, layout=layout), key=lambda r: r["input_MB"])
                if sel:
                    ax.plot([r["input_MB"] for r in sel], [r["pct_of_probe"] for r in sel], "o-" if len(sel) > 1 else "s",
                            label=impl, markersize=3)
            ax.set_xscale("log")
            ax.axhline(85, color="gray", linestyle=":", linewidth=1)
            ax.set_title(f"{mode}, {dname}, {layout}")
            ax.set_xlabel("input MB")
            ax.set_ylabel("effective bandwidth, % of copy probe")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        name = f"{stem}_{mode.replace('+', '')}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def e2e_plot(e2e: dict, out: Path, stem: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [k for k in E2E_VARIANTS if k in e2e]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    meds = [e2e[k][0] / 1e3 for k in names]
    errs = [[(e2e[k][0] - e2e[k][1]) / 1e3 for k in names], [(e2e[k][2] - e2e[k][0]) / 1e3 for k in names]]
    ax.bar(names, meds, yerr=errs, capsize=4, color=["#999999", "#3366cc", "#33aa66"][: len(names)])
    ax.set_ylabel("ms per training step (median, p20-p80)")
    ax.set_title(f"ResNet-50, B={e2e['batch']}, {e2e['size']}px, bf16 autocast, channels_last", fontsize=9)
    fig.tight_layout()
    name = f"{stem}_e2e_resnet50.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def write_report(args, env, probe, rows, stopped, e2e, path: Path, figures: list[str]) -> None:
    extra = {"bandwidth probe (1 GiB D2D copy)": f"{probe:.0f} GB/s",
             "do_bench": f"warmup {args.warmup} ms, rep {args.rep} ms, L2 cleared, median (p20/p80 in CSV)",
             "grid": "quick" if args.quick else "full", "torch.compile measured at": args.compile}
    text = [f"# Fused concat pool: {env['gpu']}, {env['date']}", "", env_section(env, extra), ""]
    if stopped:
        text += [f"**Incomplete:** {stopped}.", ""]
    text += ["## Targets", "", md_table(["target", "measured", "verdict"], targets(rows)), ""]
    if e2e:
        text += ["## End to end: ResNet-50 training step", "",
                 f"Model: {e2e['model']}; B={e2e.get('batch')}, {e2e.get('size')}px, bf16 autocast, channels_last, SGD.", ""]
        body = [[k, fmt(e2e[k][0] / 1e3, 2), fmt(e2e[k][1] / 1e3, 2), fmt(e2e[k][2] / 1e3, 2),
                 f"{e2e['batch'] / (e2e[k][0] * 1e-6):.0f}"] for k in E2E_VARIANTS if k in e2e]
        text += [md_table(["head", "median ms", "p20 ms", "p80 ms", "img/s"], body)]
        for k in E2E_VARIANTS[1:]:
            if "eager head" in e2e and k in e2e:
                d = e2e["eager head"][0] - e2e[k][0]
                share = 100 * d / e2e["eager head"][0]
                text += ["", f"The {k} saves {d / 1e3:.3f} ms per step ({share:.1f}%) over the eager head."]
        text += [""]
    text += ["## Kernel launches at the ResNet-50 shape", "", launch_table(rows), ""]
    text += ["## Times", "", "Effective bandwidth counts only the bytes that must move: read x and write "
             "(B, 2C) forward; also read the output grad and write grad_x backward. Every row is in the CSV.", "",
             summary_tables(rows), ""]
    if figures:
        text += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    path.write_text("\n".join(text))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="reduced grid: B in {32, 256}, C in {512, 2048}, bf16 (+ fp32 at the ResNet-50 shape)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/reports/kernels"),
                   help="report folder (default: $OUT or %(default)s)")
    p.add_argument("--warmup", type=float, default=5.0, help="do_bench warmup, ms (default %(default)s)")
    p.add_argument("--rep", type=float, default=20.0, help="do_bench repetition time, ms (default %(default)s)")
    p.add_argument("--compile", choices=["none", "target", "subset", "all"], default="subset",
                   help="shapes where torch.compile is measured: target = the ResNet-50 shape in bf16, subset = B=256 C=2048, "
                        "all = every shape (slow: each shape compiles its own graphs) (default %(default)s)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new shapes after this many seconds")
    p.add_argument("--no-e2e", action="store_true", help="skip the ResNet-50 training step")
    p.add_argument("--e2e-batch", type=int, default=256, help="ResNet-50 batch (default %(default)s)")
    p.add_argument("--e2e-size", type=int, default=224, help="ResNet-50 input size (default %(default)s)")
    p.add_argument("--e2e-warmup", type=float, default=500.0, help="ResNet-50 do_bench warmup, ms")
    p.add_argument("--e2e-rep", type=float, default=2000.0, help="ResNet-50 do_bench repetition time, ms")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, env, stem = start_report(args, "benchmarks/kernels/concat_pool.py", "concat_pool")
    probe = bandwidth_probe(args.warmup, max(args.rep, 50.0))
    print(f"bandwidth probe: {probe:.0f} GB/s")
    rows, stopped = run_grid(args, probe)
    e2e = {}
    if not args.no_e2e:
        try:
            e2e = run_e2e(args)
        except Exception as e:  # a failed end-to-end run must not lose the grid
            print(f"ResNet-50 step failed: {e!r}")
            e2e = {"model": f"failed: {e!r:.200}"}
    write_csv(rows, args.csv_path)
    figures = plots(rows, out, stem)
    if e2e and (name := e2e_plot(e2e, out, stem)):
        figures.append(name)
    write_report(args, env, probe, rows, stopped, e2e, out / f"{stem}.md", figures)
    print(f"wrote {args.csv_path} and {out / (stem + '.md')}")
    for t in targets(rows):
        print(f"  {t[2]:10s} {t[0]}: {t[1]}")


if __name__ == "__main__":
    main()
