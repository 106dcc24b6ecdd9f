"""One model checked (``autocut.scan.check``), in this process: the record a scan writes equals the
committed full scan's record for the same model (statuses, cut, oracle shapes, groups), and each
path of the check (meta or CPU verification, known differences, failures, a reduced size) says
what happened."""

import json
from pathlib import Path

import pytest

from autocut.scan import check

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "reports" / "zoo" / "results.jsonl"
WORKER_KEYS = {"name", "zoo", "family", "base_mb", "peak_mb", "seconds", "at", "times"}  # the worker's, or timings


def _committed(name: str) -> dict:
    for line in COMMITTED.read_text().splitlines():
        record = json.loads(line)
        if record["name"] == name:
            return {k: v for k, v in record.items() if k not in WORKER_KEYS}
    raise KeyError(name)


@pytest.mark.parametrize("name", [
    "resnet18",  # ok on meta
    "pit_ti_224",  # a known difference: forward_features gives the class token only
    "crossvit_tiny_240",  # a known difference: branches meet after pooling, CutError
    "efficientvit_b0",  # the meta device cannot run it: verified and grouped on a real CPU copy
    "torchvision:mobilenet_v3_small",  # torchvision's oracle: the input of the model's own pooling
])
def test_a_check_records_what_the_committed_scan_recorded(name):
    record = check.check_model(name)
    times = record.pop("times")
    assert record == _committed(name)
    assert set(times) <= {"build", "oracle", "cut", "verify", "groups", "total"} and "total" in times
    assert times["total"] >= max(v for k, v in times.items() if k != "total")


def test_a_body_that_disagrees_with_the_oracle_is_a_mismatch(monkeypatch):
    import torch

    monkeypatch.setattr(check, "timm_expected", lambda model, x: torch.Size([x.shape[0], 512, 14, 14]))
    record = check.check_model("resnet18")
    assert record["status"] == "mismatch"
    assert record["reason"] == "body returns [3, 512, 7, 7], the oracle [3, 512, 14, 14]"
    assert record["expected_shape"] == [3, 512, 14, 14] and record["body_shape"] == [3, 512, 7, 7]


def test_a_model_that_does_not_build_fails_in_the_build_phase():
    record = check.check_model("no_such_model_anywhere")
    assert (record["status"], record["phase"], record["error_class"]) == ("failed", "build", "CutError")
    assert "unknown model 'no_such_model_anywhere'" in record["error"]


def test_an_out_of_memory_probe_is_checked_again_at_a_reduced_size(monkeypatch):
    calls = []
    real = check._check

    def fake(name, size, models):
        calls.append(size)
        if size is None:
            return {"times": {"total": 1.5}, "input_size": [3, 768, 768], "status": "oom", "phase": "cut",
                    "error_class": "MemoryError", "error": "out of memory"}
        return real(name, size, models)

    monkeypatch.setattr(check, "_check", fake)
    record = check.check_model("resnet18")
    assert calls == [None, (3, 96, 96)]
    assert record["status"] == "ok" and record["input_size"] == [3, 96, 96] and record["feature_shape"] == [512, 3, 3]
    assert record["reduced_from"] == [3, 768, 768]
    assert record["reduced_because"] == "MemoryError at 768x768: out of memory"
    assert record["times"]["total"] >= 1.5


def test_reduced_sizes_halve_each_side_while_it_is_even_and_over_the_limit():
    assert check._reduced([3, 768, 768]) == (3, 96, 96)
    assert check._reduced([3, 300, 256]) == (3, 75, 128)
    assert check._reduced([1, 257, 128]) == (1, 257, 128)


def test_a_record_keeps_a_stride_that_differs_by_axis():
    import dataclasses

    from autocut.cut import Cut

    cut = Cut("m", "stage", 8, "NHWC", (8, 14, 20), (16, 12.8), 0, "fx", (3, 224, 256), ("fc",), after="stage")
    assert check._cut_record(cut) == {"where": "stage", "after": "stage", "nf": 8, "layout": "NHWC",
                                      "feature_shape": [8, 14, 20], "stride": [16, 12.8], "prefix_tokens": 0,
                                      "method": "fx", "dropped": ["fc"]}
    assert check._cut_record(dataclasses.replace(cut, stride=16))["stride"] == 16

