"""Run a kernel benchmark end to end on the CPU, to check the script, never to measure.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), on two tiny shapes; timing is
one wall-clock call, the bandwidth probe and launch counts are stand-ins, and the report is
tagged ``CPU smoke``. Every code path of the script runs (checks, grid, training head, ResNet-50
step, CSV, Markdown, plots), so a broken benchmark shows here rather than on a borrowed GPU.

    python -m benchmarks.kernels.smoke head --out /tmp/smoke --n-out 5
    python -m benchmarks.kernels.smoke concat_pool --out /tmp/smoke --compile none --e2e-batch 2 --e2e-size 32
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from benchmarks.kernels import common  # noqa: E402

SHAPES = [(4, 8, 3, 3, "fp32", "nchw"), (4, 8, 3, 3, "fp32", "channels_last")]


def _one_call(fn, warmup_ms: float, rep_ms: float) -> tuple[float, float, float]:
    start = time.perf_counter()
    fn()
    us = (time.perf_counter() - start) * 1e6
    return us, us, us


STAND_INS = {
    "DEVICE": "cpu",
    "bench": _one_call,
    "require_cuda": lambda script: None,
    "count_launches": lambda fn: "",
    "bandwidth_probe": lambda *args, **kwargs: 1.0,
    "environment": lambda: {"gpu": "CPU smoke", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("head", "concat_pool"):
        sys.exit("usage: python -m benchmarks.kernels.smoke {head,concat_pool} [the script's options]")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    for name, value in STAND_INS.items():
        setattr(common, name, value)
    if argv[0] == "head":
        from benchmarks.kernels import head as script
    else:
        from benchmarks.kernels import concat_pool as script
    for name, value in STAND_INS.items():  # the names the script imported from common
        if hasattr(script, name):
            setattr(script, name, value)
    script.cases = lambda quick: list(SHAPES)
    script.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
