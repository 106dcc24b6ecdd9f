"""The kernel benchmarks run end to end (on the CPU, kernels in Triton's interpreter): a script
broken by a change shows here, not on a borrowed GPU. No figure is checked: there is none."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


def _smoke(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernels.smoke", *args, "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_the_head_benchmark_runs_end_to_end(tmp_path):
    _smoke(tmp_path, "head", "--n-out", "5")
    (csv_path,) = tmp_path.glob("head_CPU-smoke_*.csv")
    impls = {r["impl"] for r in _rows(csv_path)}
    assert impls == {"pool_eager", "pool_fused", "head_eager", "head_eval", "head_folded",
                     "train_eager", "train_pool_fused", "train_fused"}
    report = next(tmp_path.glob("head_CPU-smoke_*.md")).read_text()
    assert "CPU smoke" in report and "head_folded" in report
    assert next(tmp_path.glob("head_CPU-smoke_*.png")).stat().st_size > 0


@pytest.mark.slow
def test_the_concat_pool_benchmark_runs_end_to_end(tmp_path):
    _smoke(tmp_path, "concat_pool", "--compile", "none", "--e2e-batch", "2", "--e2e-size", "32")
    rows = _rows(next(tmp_path.glob("concat_pool_CPU-smoke_*.csv")))
    assert {r["impl"] for r in rows} >= {"eager", "fused"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["matches_eager"] for r in rows if r["impl"] == "fused"} == {"True"}, "checked against eager first"
    report = next(tmp_path.glob("concat_pool_CPU-smoke_*.md")).read_text()
    assert "ResNet-50" in report and "UNMEASURED" in report


def _benchmark(name):
    """A script of benchmarks/ as a module (they are run as scripts, not imported as a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_the_adapt_benchmark_measures_each_way_that_applies(tmp_path):
    bench = _benchmark("adapt")
    out = tmp_path / "adapt.md"
    assert bench.main(["--models", "resnet10t", "torchvision:resnet18", "--repeat", "2", "--rounds", "1",
                       "--out", str(out)]) == 0
    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    lines = out.read_text().splitlines()
    header = cells(next(line for line in lines if line.startswith("| model")))
    rows = {cells(line)[0]: cells(line) for line in lines if line.startswith(("| resnet10t", "| torchvision:resnet18"))}
    assert set(rows) == {"resnet10t", "torchvision:resnet18"}
    for name, row in rows.items():
        got = dict(zip(header, row))
        assert float(got["timm s"]) > 0 and float(got["autocut s"]) > 0 and got["autocut / timm"].endswith("x")
        assert float(got["timm first s"]) > 0 and float(got["autocut first s"]) > 0
        ratio = float(got["autocut first s"]) / float(got["timm first s"])  # (of the cells, rounded to ms)
        assert got["first: autocut / timm"].endswith("x") and float(got["first: autocut / timm"][:-1]) == pytest.approx(
            ratio, rel=0.03, abs=0.01)
        assert (got["tv_fx s"] == "-") == (name == "resnet10t")  # torchvision's extractor: its own models only


def test_the_adapt_benchmark_keeps_the_best_of_its_rounds_and_skips_what_never_ran():
    best = _benchmark("adapt")._best
    one = {"first": 0.30, "seconds": 0.20, "all": [0.30, 0.20, 0.25], "peak_mb": 40.0}
    two = {"first": 0.28, "seconds": 0.22, "all": [0.28, 0.22], "peak_mb": 45.0}
    assert best([one, two]) == {"seconds": 0.20, "first": 0.28, "peak_mb": 45.0, "all": [0.30, 0.20, 0.25, 0.28, 0.22]}
    assert best([{"error": "timed out after 900 s"}, one])["seconds"] == 0.20  # a round that failed: the others
    assert best([{"error": "timed out"}, {"error": "killed"}]) == {"error": "timed out"}
    assert best([{"skip": "torchvision models only"}] * 2) == {"skip": "torchvision models only"}


@pytest.mark.slow
def test_the_pyramid_benchmark_compares_levels_with_feature_info(tmp_path):
    bench = _benchmark("pyramid")
    out = tmp_path / "pyramid.md"
    assert bench.main(["--models", "resnet10t", "xception41p", "--repeat", "1", "--out", str(out)]) == 0
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert rows["resnet10t"].rstrip().endswith("| agree |")
    assert "2 (64), 4 (64), 8 (128), 16 (256), 29.333 (512)" in rows["resnet10t"]
    assert "stride 1.993: blocks.0.stack.conv2 128 ch, autocut stem.1 64 ch" in rows["xception41p"]
    assert "- **xception41p**: timm taps each block's residual branch" in out.read_text()  # its reason
