"""``autocut scan``: every outcome a model can have is recorded and the scan goes on (fake checks:
a model that raises, hangs, crashes the interpreter or eats memory), an interrupted scan resumes,
and a small real scan writes results, model_meta.json and the report.

Heavy imports stay inside the tests: the scan's workers import this module for the fake checks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAKE = "test_scan:fake_check"


def fake_check(name: str) -> dict:
    """A stand-in for check_model, whose behaviour the name picks."""
    if name.startswith("boom"):
        raise ValueError(f"{name} cannot be cut")
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hog"):
        hog = bytearray(4 * 2**30)  # over the 1 GiB limit the test sets
        return {"status": "ok", "size": len(hog)}
    if name.startswith("slow"):
        time.sleep(0.4)
    if name.startswith("odd"):
        return {"status": "mismatch", "reason": "body returns [3, 8, 7, 7], the oracle [3, 8, 14, 14]",
                "body_shape": [3, 8, 7, 7], "expected_shape": [3, 8, 14, 14], "where": "layer3", "params": 10}
    return {"status": "ok", "where": "layer4", "nf": 8, "layout": "NCHW", "stride": 32, "prefix_tokens": 0,
            "method": "fx", "input_size": [3, 224, 224], "groups": [["conv1", "layer2", 8.0, 10], ["head", "head", None, 4]],
            "params": 1000, "times": {"total": 0.01, "cut": 0.005}}


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_every_outcome_is_recorded_and_the_scan_goes_on(tmp_path):
    from autocut.scan.report import write_report
    from autocut.scan.runner import scan

    names = ["ok_a", "boom_b", "hang_c", "crash_d", "hog_e", "odd_f", "ok_g"]
    counts = scan(names, tmp_path, jobs=2, timeout=3, memory_limit_gb=1, check=FAKE, progress=False)
    records = {r["name"]: r for r in _lines(tmp_path)}
    assert set(records) == set(names)
    assert {n: r["status"] for n, r in records.items()} == {
        "ok_a": "ok", "boom_b": "failed", "hang_c": "timeout", "crash_d": "crashed", "hog_e": "oom",
        "odd_f": "mismatch", "ok_g": "ok",
    }
    assert counts == {"ok": 2, "failed": 1, "timeout": 1, "crashed": 1, "oom": 1, "mismatch": 1}
    assert records["boom_b"]["error_class"] == "ValueError" and "cannot be cut" in records["boom_b"]["error"]
    assert "SIGSEGV" in records["crash_d"]["error"]
    assert records["hog_e"]["error_class"] == "MemoryError"
    assert 3 <= records["hang_c"]["seconds"] < 10
    assert all(r["peak_mb"] > 0 for r in records.values())
    # the report copes with sparse records, and lists every model that is not ok with its reason
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    for name in names[1:6]:
        assert name in report.split("## Every model not `ok`")[1]
    assert "ValueError in check" in report and "[timeout]" in report
    meta = json.loads((tmp_path / "model_meta.json").read_text())
    assert set(meta) == {"ok_a", "ok_g"} and meta["ok_a"]["groups"] == [["conv1", "layer2"], ["head", "head"]]


def test_an_interrupted_scan_resumes_where_it_stopped(tmp_path):
    names = [f"slow_{i}" for i in range(8)]
    code = ("import sys; from autocut.scan.runner import scan; "
            f"scan({names!r}, {str(tmp_path)!r}, jobs=1, timeout=30, check={FAKE!r}, progress=False)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    results = tmp_path / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # as ^C: SIGINT may be ignored where the tests run in the background
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    first = [r["name"] for r in _lines(tmp_path)]
    assert 2 <= len(first) < len(names)
    with open(results, "a") as f:
        f.write('{"name": "slow_7", "sta')  # a line cut short by a hard kill is ignored

    from autocut.scan.runner import load_results, scan

    counts = scan(names, tmp_path, jobs=2, timeout=30, check=FAKE, progress=False)
    assert sum(counts.values()) == len(names) - len(first)
    assert set(load_results(tmp_path)) == set(names)
    recorded = [r["name"] for r in map(json.loads, results.read_text().splitlines()[:len(first)])]
    assert recorded == first  # earlier records are kept, none is checked twice
    runs = [json.loads(line) for line in (tmp_path / "scan_runs.jsonl").read_text().splitlines()]
    assert [r["interrupted"] for r in runs] == [True, False]
    # retry re-checks the chosen statuses only
    assert scan(names + ["boom_x"], tmp_path, jobs=1, timeout=30, check=FAKE, progress=False) == {"failed": 1}
    assert scan(names + ["boom_x"], tmp_path, jobs=1, timeout=30, check=FAKE, progress=False, retry=["failed"]) == {"failed": 1}


class _FakeTimm:
    """Just what the timm oracle reads: forward_features and timm's metadata."""

    def __init__(self, out, output_fmt="NCHW", num_prefix_tokens=None, reduction=None):
        self.out, self.output_fmt = out, output_fmt
        if num_prefix_tokens is not None:  # some timm models do not say (pit, coat)
            self.num_prefix_tokens = num_prefix_tokens
        self.feature_info = [{"reduction": reduction}] if reduction else None

    def forward_features(self, x):
        return self.out


def test_the_timm_oracle_normalises_layouts_and_names_the_known_differences():
    import torch

    from autocut.scan.oracles import Differs, OracleError, timm_expected

    x = torch.empty(3, 3, 224, 224, device="meta")
    t = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    assert timm_expected(_FakeTimm(t(3, 512, 7, 7)), x) == (3, 512, 7, 7)
    assert timm_expected(_FakeTimm(t(3, 7, 7, 768), output_fmt="NHWC"), x) == (3, 768, 7, 7)  # swin
    assert timm_expected(_FakeTimm(t(3, 197, 192), num_prefix_tokens=1), x) == (3, 192, 14, 14)  # vit
    assert timm_expected(_FakeTimm(t(3, 196 + 5, 192), num_prefix_tokens=5), x) == (3, 192, 14, 14)  # registers
    assert timm_expected(_FakeTimm(t(3, 28, 64), reduction=32), torch.empty(3, 3, 128, 224)) == (3, 64, 4, 7)
    with pytest.raises(Differs) as cls_only:  # pit: the class (and distillation) tokens only
        timm_expected(_FakeTimm(t(3, 2, 256)), x)
    assert cls_only.value.reason == "cls-only features" and cls_only.value.channels == 256
    with pytest.raises(Differs, match="list features"):  # crossvit, coat
        timm_expected(_FakeTimm([t(3, 401, 96), t(3, 197, 192)]), x)
    assert timm_expected(_FakeTimm(t(3, 50, 320)), x) == (3, 320, 7, 7)  # coat-lite: a class token, undeclared
    with pytest.raises(OracleError, match="no grid"):
        timm_expected(_FakeTimm(t(3, 99, 64), num_prefix_tokens=0), x)


def test_a_small_real_scan_writes_results_model_meta_and_report(tmp_path):
    from autocut.cli import main

    argv = ["scan", "--zoo", "all", "--filter", "resnet18", "squeezenet1_1", "pit_ti_224", "--jobs", "1",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    records = {r["name"]: r for r in _lines(tmp_path)}
    assert set(records) == {"resnet18", "torchvision:resnet18", "torchvision:squeezenet1_1", "pit_ti_224"}
    tv = records["torchvision:resnet18"]
    assert tv["status"] == "ok" and tv["family"] == "resnet" and tv["zoo"] == "torchvision"
    assert tv["where"].startswith("layer4") and tv["nf"] == 512 and tv["stride"] == 32 and tv["n_groups"] == 3
    assert tv["expected_shape"] == tv["body_shape"] == [3, 512, 7, 7] and tv["method"] == "fx"
    assert tv["peak_mb"] >= tv["base_mb"] > 0 and tv["times"]["total"] > 0
    assert records["pit_ti_224"]["status"] == "differs" and records["pit_ti_224"]["reason"] == "cls-only features"
    assert records["resnet18"]["family"] == "resnet" and records["resnet18"]["zoo"] == "timm"
    meta = json.loads((tmp_path / "model_meta.json").read_text())
    assert meta["torchvision:squeezenet1_1"]["nf"] == 512 and meta["pit_ti_224"]["differs"] == "cls-only features"
    assert meta["resnet18"]["groups"][0][0] == "conv1" and meta["resnet18"]["groups"][-1] == ["head", "head"]
    # fastai's way of naming the cut: resnet keeps children up to layer4, squeezenet its features
    assert meta["torchvision:resnet18"]["after"] == "layer4" and meta["torchvision:squeezenet1_1"]["after"] == "features"
    report = (tmp_path / "report.md").read_text()
    assert "autocut scan --zoo all --filter 'resnet18'" in report and "| timm | pit |" in report
    assert (tmp_path / "time_vs_params.png").stat().st_size > 1000 and (tmp_path / "memory_vs_params.png").exists()
    # a second run finds everything recorded and checks nothing
    assert main(argv) == 0 and len(_lines(tmp_path)) == 4


def test_a_model_whose_real_probe_runs_out_of_memory_is_checked_again_smaller(monkeypatch):
    from autocut.scan import check
    from autocut.scan.report import render_report

    sizes = []

    def fake(name, size, real, values=False):
        sizes.append(size)
        if size is None:
            real.append("the real copy")  # built by the first attempt: the second reuses it
            return {"input_size": [3, 768, 768], "status": "oom", "phase": "cut", "error_class": "CutError",
                    "error": "could not probe ... can't allocate memory", "times": {"total": 2.0}}
        assert real == ["the real copy"]
        return {"name": name, "input_size": list(size), "status": "ok", "times": {"total": 1.0}}

    monkeypatch.setattr(check, "_check", fake)
    rec = check.check_model("big_vit")
    assert sizes == [None, (3, 96, 96)]  # halved, so sizes that must divide by 48 still do
    assert rec["status"] == "ok" and rec["input_size"] == [3, 96, 96] and rec["reduced_from"] == [3, 768, 768]
    assert "CutError at 768x768" in rec["reduced_because"] and rec["times"]["total"] == 3.0
    report = render_report({"big_vit": {**rec, "zoo": "timm", "family": "vit"}}, [], plots=False)
    assert "| big_vit | 768x768 | 96x96 | ok |" in report
    # an out-of-memory that a smaller input cannot help (already small, or not in the cut) stays as it is
    monkeypatch.setattr(check, "_check", lambda name, size, real, values=False: {"input_size": [3, 112, 112], "status": "oom",
                                                                   "phase": "cut", "times": {"total": 1.0}})
    assert check.check_model("small_vit")["status"] == "oom"


def test_the_report_states_whole_zoo_runs_against_the_speed_target():
    from autocut.scan.report import render_report

    run = {"argv": ["autocut", "scan", "--zoo", "timm", "--jobs", "2"], "names": 1317, "todo": 1317, "jobs": 2,
           "wall_s": 866.3, "counts": {"ok": 1317}, "interrupted": False}
    partial = {**run, "argv": ["autocut", "scan", "--zoo", "timm", "--filter", "vit_*"], "wall_s": 60.0}
    resumed = {**run, "todo": 100, "wall_s": 50.0}
    report = render_report({}, [run, partial, resumed], plots=False)
    assert "- timm: 1317 models in 14.4 min (0.66 s of wall time per model, 2 jobs)" in report
    assert report.count("- timm:") == 1


def test_the_scan_compares_every_dimension_of_the_shape():
    import torch

    from autocut.scan.check import compare_shapes
    from autocut.scan.oracles import Differs

    assert compare_shapes(torch.Size([3, 8, 7, 7]), torch.Size([3, 8, 7, 7])) == {
        "body_shape": [3, 8, 7, 7], "expected_shape": [3, 8, 7, 7], "status": "ok"}
    for got in ([1, 8, 7, 7], [3, 16, 7, 7], [3, 8, 7, 6], [3, 8, 7], [3, 8, 7, 7, 1]):
        rec = compare_shapes(torch.Size([3, 8, 7, 7]), torch.Size(got))
        assert rec["status"] == "mismatch" and rec["reason"] == f"body returns {got}, the oracle [3, 8, 7, 7]", got
    assert compare_shapes(Differs("cls-only features", channels=8), torch.Size([3, 8, 7, 7]))["status"] == "differs"
    for got in ([3, 9, 7, 7], [3, 8, 49]):
        rec = compare_shapes(Differs("cls-only features", channels=8), torch.Size(got))
        assert rec["status"] == "mismatch" and rec["reason"].startswith("cls-only features (forward_features"), got
    assert compare_shapes(Differs("list features"), torch.Size([3, 8, 7, 7]))["status"] == "mismatch"
    for reason in ("cls-only features", "latent array", "soft tokens"):  # known differences a body is made on
        assert compare_shapes(Differs(reason, channels=8), torch.Size([3, 8, 7, 7])) == {
            "body_shape": [3, 8, 7, 7], "status": "differs", "reason": reason}
    for reason in ("latent array", "soft tokens"):  # ... as a map
        rec = compare_shapes(Differs(reason), torch.Size([3, 49, 8]))
        assert (rec["status"], rec["reason"]) == ("mismatch", f"{reason} ({check_differs()[reason]}), but the body "
                                                               "returns [3, 49, 8]")


def check_differs():
    from autocut.scan.oracles import DIFFERS

    return DIFFERS


def test_a_recheck_that_dies_keeps_the_record_it_rechecked(tmp_path):
    from autocut.scan.runner import load_results, scan

    (tmp_path / "results.jsonl").write_text(
        json.dumps({"name": "hog_a", "zoo": "timm", "status": "ok", "where": "layer4"}) + "\n"
        + json.dumps({"name": "crash_b", "zoo": "timm", "status": "ok", "where": "layer3", "values": "equal"}) + "\n")
    counts = scan(["hog_a", "crash_b"], tmp_path, jobs=1, timeout=30, memory_limit_gb=1, check=FAKE, progress=False,
                  recheck=lambda rec: rec["status"] == "ok" and "values" not in rec)
    assert counts == {"ok": 1}  # crash_b has values already: not checked again
    rec = load_results(tmp_path)["hog_a"]
    assert (rec["status"], rec["where"]) == ("ok", "layer4")
    assert rec["recheck_failed"].startswith("oom: ")
    assert "values" not in rec


def test_a_damaged_results_line_is_skipped_with_a_warning_and_its_model_checked_again(tmp_path):
    from autocut.scan.report import write_report
    from autocut.scan.runner import load_results, scan

    good = {"status": "ok", "zoo": "timm", "family": "?", "where": "layer4", "nf": 8, "layout": "NCHW", "stride": 32,
            "prefix_tokens": 0, "method": "fx", "input_size": [3, 224, 224]}
    results = tmp_path / "results.jsonl"
    results.write_bytes(
        (json.dumps({"name": "ok_a", **good}) + "\n").encode()
        + b'{"name": "ok_b", "status": "ok", "where": "layer\xff4"}\n'  # not UTF-8
        + (json.dumps({"name": "ok_c", "zoo": "timm", "where": "layer4"}) + "\n").encode()  # no status
        + (json.dumps({"name": "ok_d", **good}) + "\n").encode())
    with pytest.warns(UserWarning) as caught:
        paths = write_report(tmp_path)  # the report of what is there, without the damaged lines
    assert [str(w.message) for w in caught if "damaged" in str(w.message)] == [
        f"{results}:2: skipped a damaged line (not UTF-8 (invalid start byte at byte 48)); ok_b will be checked again",
        f"{results}:3: skipped a damaged line (a record without a status); ok_c will be checked again"]
    assert set(json.loads(paths[0].read_text())) == {"ok_a", "ok_d"}
    with pytest.warns(UserWarning, match="skipped a damaged line"):
        counts = scan(["ok_a", "ok_b", "ok_c", "ok_d"], tmp_path, jobs=1, timeout=30, check=FAKE, progress=False)
    assert counts == {"ok": 2}  # ok_b and ok_c, checked again
    with pytest.warns(UserWarning, match="skipped a damaged line"):  # the damaged lines stay, quarantined by the reader
        records = load_results(tmp_path)
    assert {n: r["status"] for n, r in records.items()} == {"ok_a": "ok", "ok_b": "ok", "ok_c": "ok", "ok_d": "ok"}
    assert records["ok_b"]["where"] == "layer4" and records["ok_a"]["family"] == "?"


def test_bad_scan_arguments_are_refused_by_name(tmp_path, capsys):
    from autocut.cli import main
    from autocut.scan.runner import scan

    file = tmp_path / "report.txt"
    file.write_text("mine")
    # refused before any worker starts (and before the fix, mkdir failed there too)
    for argv in (["--zoo", "torchvision", "--filter", "resnet18"], ["--report-only"]):
        assert main(["scan", *argv, "--out", str(file), "--quiet"]) == 2
        assert capsys.readouterr().err == (f"autocut scan: --out {file} is a file, not a folder: pass the scan's folder "
                                           "(new, or one to resume)\n")
    assert file.read_text() == "mine"
    assert main(["scan", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert f"--out {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    for option, value, what in [("jobs", 0, "an integer of 1 or more"), ("timeout", 0.0, "a number above 0"),
                                ("memory_limit_gb", -1.0, "a number above 0")]:
        with pytest.raises(ValueError, match=rf"^{option} must be {what}, got {value!r}$"):
            scan([], tmp_path, check=FAKE, progress=False, **{option: value})  # no name: nothing to run if let through


def test_the_report_counts_which_path_found_each_verified_cut():
    from autocut.scan.report import render_report

    recs = {f"m{i}": {"name": f"m{i}", "zoo": zoo, "family": "f", "status": status, "method": method, "times": {}}
            for i, (zoo, status, method) in enumerate([
                ("timm", "ok", "fx"), ("timm", "ok", "fx"), ("timm", "differs", "hooks"), ("timm", "failed", None),
                ("transformers", "ok", "export"), ("transformers", "ok", "hooks"), ("transformers", "mismatch", "fx")])}
    report = render_report(recs, [], plots=False)
    assert ("| zoo | cuts | fx | export | hooks | user |\n|---|---|---|---|---|---|\n| timm | 3 | 2 | 0 | 1 | 0 |\n"
            "| transformers | 2 | 0 | 1 | 1 | 0 |\n| all | 5 | 2 | 1 | 2 | 0 |\n") in report


def test_the_report_sums_each_phase_per_zoo_and_over_all_and_prints_the_cut_against_build_and_oracle():
    from autocut.scan.report import render_report

    def rec(name, zoo, **times):
        return {"name": name, "zoo": zoo, "family": "f", "status": "ok", "method": "fx", "times": times}

    recs = {"a": rec("a", "timm", build=1.0, oracle=2.0, cut=1.5, verify=0.25, total=9.0),
            "b": rec("b", "timm", build=0.5, oracle=0.5, cut=0.5, groups=0.125),
            "c": rec("c", "transformers", build=1.0, oracle=0.25, cut=3.5, build_cpu=2.0)}
    report = render_report(recs, [], plots=False)
    assert ("| zoo | build | oracle | cut | verify | values | groups | build_cpu | cut / (build + oracle) |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            "| timm | 1.5 | 2.5 | 2.0 | 0.2 | 0.0 | 0.1 | 0.0 | 0.50 |\n"
            "| transformers | 1.0 | 0.2 | 3.5 | 0.0 | 0.0 | 0.0 | 2.0 | 2.80 |\n"
            "| all | 2.5 | 2.8 | 5.5 | 0.2 | 0.0 | 0.1 | 2.0 | 1.05 |\n") in report
    assert "| all |" not in render_report({"a": recs["a"]}, [], plots=False).split("## Phase cost")[1]


def test_the_report_says_which_values_were_carried_from_an_earlier_run():
    from autocut.scan.report import render_report

    base = {"zoo": "timm", "family": "f", "status": "ok", "method": "fx", "times": {}, "values": "equal"}
    recs = {"a": {**base, "name": "a", "values_from": "2026-12-04T15:11:32"}, "b": {**base, "name": "b"}}
    report = render_report(recs, [], plots=False)
    assert "| timm | 2 | 2 | 0 | 0 | 0 |" in report
    assert "identical; `values_from` gives when they were compared): timm 1." in report
    assert "carried" not in render_report({"b": recs["b"]}, [], plots=False)


def test_building_the_real_copy_is_its_own_phase_whichever_phase_asks_for_it(monkeypatch):
    import time

    from autocut import zoo
    from autocut.scan.check import check_model

    real_build = zoo.build

    def slow_on_cpu(spec, device="cpu"):
        if str(device) == "cpu":
            time.sleep(1.5)  # a model whose weights take long to initialise
        return real_build(spec, device=device)

    monkeypatch.setattr(zoo, "build", slow_on_cpu)
    rec = check_model("efficientvit_b0")  # value-dependent code: its cut needs the real copy
    assert rec["status"] == "ok" and rec["verified_on"] == "cpu"
    times = rec["times"]
    assert times["build_cpu"] >= 1.5 and times["cut"] < 1.5  # (the copy is built once, while the cut is found)
    assert times["build"] < 1.5  # the meta build
    assert abs(sum(v for k, v in times.items() if k != "total") - times["total"]) < 0.05
