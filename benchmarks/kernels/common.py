"""What the kernel benchmarks share: the environment tag, the timing and bandwidth probe, launch
counting, report writing, the eager reference, and running with autocut's kernels switched off.

Never run on its own; ``python -m benchmarks.kernels.concat_pool`` and ``... .head`` use it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing autocut

QUANTILES = [0.5, 0.2, 0.8]
DEVICE = "cuda"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=1e-3)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    src = dst = None  # free the 2 GiB before the kernels are timed
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


def eager(x: torch.Tensor) -> torch.Tensor:
    """fastai's AdaptiveConcatPool2d: two pooling ops and a cat."""
    return torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)


def over_budget(budget_s: float | None, started: float, done: int, total: int, what: str) -> str:
    """The message to stop with once ``budget_s`` seconds have passed since ``started``, else ``''``."""
    if not budget_s or time.time() - started <= budget_s:
        return ""
    message = f"{what} stopped by --budget-s {budget_s:.0f} after {done} of {total} shapes"
    print(message)
    return message


@contextlib.contextmanager
def pytorch_only(on: bool = True):
    """Within the block, with ``on``, autocut runs PyTorch's ops instead of its kernels
    (``AUTOCUT_DISABLE_KERNELS=1``, read by :func:`autocut.kernels.kernels_disabled`)."""
    before = os.environ.get("AUTOCUT_DISABLE_KERNELS")
    os.environ["AUTOCUT_DISABLE_KERNELS"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("AUTOCUT_DISABLE_KERNELS", None)
        else:
            os.environ["AUTOCUT_DISABLE_KERNELS"] = before


def start_report(args, script: str, name: str) -> tuple[Path, dict, str]:
    """What every benchmark does first: refuse without a GPU, make ``args.out``, read the
    environment, name the report (``<name>_<gpu>_<date>``, the CSV in ``args.csv_path``)."""
    require_cuda(script)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    stem = f"{name}_{tag(env)}"
    args.csv_path = out / f"{stem}.csv"
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    return out, env, stem

