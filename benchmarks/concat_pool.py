"""Benchmark the fused concat pool against eager PyTorch, timm and torch.compile, on a CUDA GPU.

For every shape it times forward and forward+backward with ``triton.testing.do_bench`` (L2
cleared before each run; median and 20/80 percentiles), turns the median into effective GB/s from
the bytes that must move, and divides by a bandwidth probe (a 1 GiB device-to-device copy)
measured in the same run. Kernel launches are counted with ``torch.profiler``. It ends with one
end-to-end figure: a ResNet-50 training step (B=256, bf16 autocast, channels_last) with the eager
head vs the fused head. Every fused result is checked against eager before it is timed.

Writes ``concat_pool_<gpu>_<date>.{csv,md}`` and PNG plots into ``--out`` (default ``$OUT`` or
``benchmarks/reports/kernels``). Nothing runs without a CUDA device.

    PYTHONPATH=. python benchmarks/concat_pool.py --quick
    PYTHONPATH=. python benchmarks/concat_pool.py --compile subset --budget-s 150

``benchmarks/head.py`` imports the helpers below (environment tag, probe, timing, launch count,
report writing).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing autocut

QUANTILES = [0.5, 0.2, 0.8]
DEVICE = "cuda"
TARGET_SHAPE = (256, 2048, 7, 7)  # ResNet-50's last map at 224px
BIG_INPUT_MB = 50.0
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=1e-3)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- shared helpers (also used by benchmarks/head.py) ---------------------------------------


def require_cuda(script: str) -> None:
    """Exit with a clear message when there is no GPU: these scripts never invent a figure."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device found. This benchmark only measures on a GPU; nothing was "
                 "run and nothing was written. Run it (or benchmarks/gpu_all.sh) on a CUDA machine.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit(f"{script}: triton is not installed; the fused kernels need it.")


def environment() -> dict:
    """What the figures were measured on: GPU, driver, library versions, date."""
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi on the path: the CUDA runtime still knows the device
        driver = "unknown"
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm_version,
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def tag(env: dict) -> str:
    """``<gpu>_<date>`` for file names, e.g. ``NVIDIA-H200_2025-01-31``."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-")
    return f"{gpu}_{env['date'][:10]}"


def bench(fn, warmup_ms: float, rep_ms: float) -> tuple[float, float, float]:
    """``(median, p20, p80)`` in microseconds; ``do_bench`` clears the L2 before each run."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES)
    return med * 1e3, p20 * 1e3, p80 * 1e3


def bandwidth_probe(warmup_ms: float, rep_ms: float, nbytes: int = 1 << 30) -> float:
    """GB/s of a large device-to-device copy (read + write): the roof the kernels are held to."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    med_us, _, _ = bench(lambda: dst.copy_(src), warmup_ms, rep_ms)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (med_us * 1e-6) / 1e9


def count_launches(fn) -> int | str:
    """GPU kernels, copies and memsets one call of ``fn`` enqueues (``''`` if the profiler fails)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception as e:  # CUPTI missing or busy: report no count rather than a wrong one
        print(f"  (launch count unavailable: {e!r:.120})")
        return ""


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def env_section(env: dict, extra: dict) -> str:
    rows = [[k, v] for k, v in {**env, **extra}.items()]
    return md_table(["", ""], rows)


def make_input(shape, dtype, layout: str) -> torch.Tensor:
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def fmt(v, nd=1) -> str:
    return "" if v in ("", None) else f"{v:.{nd}f}"


# --- implementations ------------------------------------------------------------------------


def eager(x: torch.Tensor) -> torch.Tensor:
    """fastai's AdaptiveConcatPool2d: two pooling ops and a cat."""
    return torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)


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
    grid = [(b, c, h, w, d, l) for b, c, (h, w), d, l in itertools.product(bs, cs, hws, dtypes, layouts)]
    if quick:  # fp32 at the ResNet-50 shape only
        grid += [(*TARGET_SHAPE, "fp32", l) for l in layouts]
    order = lambda s: (s[:4] != TARGET_SHAPE, s[4] != "bf16", -s[0] * s[1] * s[2] * s[3] * (4 if s[4] == "fp32" else 2), s)
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
            runs = {"fwd": lambda fn=fn: fn(x), "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(xg), xg, g)}
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
        del x, xg, g, want
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
    del model, opt, x, y
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
        out.append([f"pool forward >= 85% of probed bandwidth, inputs >= {BIG_INPUT_MB:.0f} MB", "no such shape measured", "UNMEASURED"])
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
    out.append(["eval head <= pool time + 5 us", "see the head report (benchmarks/head.py)", "-"])
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
                text += ["", f"The {k} saves {d / 1e3:.3f} ms per step ({100 * d / e2e['eager head'][0]:.1f}%) over the eager head."]
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
    p.add_argument("--quick", action="store_true", help="reduced grid: B in {32, 256}, C in {512, 2048}, bf16 (+ fp32 at the ResNet-50 shape)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/reports/kernels"), help="report folder (default: $OUT or %(default)s)")
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
    require_cuda("benchmarks/concat_pool.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    stem = f"concat_pool_{tag(env)}"
    args.csv_path = out / f"{stem}.csv"
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
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
