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



class Boom(Exception):
    pass


def _boom(*args, **kwargs):
    raise Boom("no")


def _failed(record: dict, phase: str) -> None:
    assert (record["status"], record["phase"], record["error_class"], record["error"]) == ("failed", phase, "Boom", "no")
    assert record["times"]["total"] >= max(v for k, v in record["times"].items() if k != "total") > 0


def test_each_phase_that_fails_is_named_with_its_error(monkeypatch):
    from autocut.scan.oracles import OracleError

    def oracle_error(model, x):
        raise OracleError("a map that cannot be laid out")

    with monkeypatch.context() as m:
        m.setattr(check, "timm_expected", oracle_error)
        record = check.check_model("resnet18")
        assert (record["status"], record["phase"], record["error_class"]) == ("failed", "oracle", "OracleError")
        assert record["input_size"] == [3, 224, 224] and record["params"] == 11689512 and "where" not in record
    with monkeypatch.context() as m:  # neither adapt nor discovery can cut it
        m.setattr(check, "adapt", _boom)
        m.setattr(check, "discover_module", _boom)
        _failed(check.check_model("resnet18"), "cut")
    build = check.zoo.build
    for failing, phase in [("build", "build (cpu)"), ("timm_expected", "oracle (cpu)"), ("create_body", "body (cpu)")]:
        with monkeypatch.context() as m:  # the meta check cannot run: the CPU check, and its failures
            m.setattr(check, "_verify_meta", lambda adapted, expected, x: None)
            if failing == "build":
                m.setattr(check.zoo, "build", lambda spec, device="meta": _boom() if device == "cpu" else build(spec, device))
            else:
                m.setattr(check, failing, _boom)
            record = check.check_model("resnet18")
            _failed(record, phase)
            assert record["where"] == "layer4.1.act2" and "verified_on" not in record


def test_a_model_adapted_only_through_discovery_is_checked_and_grouped_on_the_cpu(monkeypatch):
    real_adapt = check.adapt

    def meta_fails(model, *args, **kwargs):
        if next(model.parameters()).is_meta:
            raise Boom("meta")
        return real_adapt(model, *args, **kwargs)

    monkeypatch.setattr(check, "adapt", meta_fails)
    record = check.check_model("resnet18")
    record.pop("times")
    assert record == {**_committed("resnet18"), "verified_on": "cpu", "groups_on": "cpu", "body_shape": [1, 512, 7, 7],
                      "expected_shape": [1, 512, 7, 7]}
    monkeypatch.setattr(check, "group_summary", _boom)
    record = check.check_model("resnet18")
    assert "groups" not in record and record["groups_error"] == "cpu: Boom: no"


def test_a_body_whose_shape_is_not_its_cuts_is_a_mismatch(monkeypatch):
    monkeypatch.setattr(check, "compare_shapes", lambda expected, got: {"body_shape": [3, 512, 8, 8], "status": "ok"})
    record = check.check_model("resnet18")
    assert record["status"] == "mismatch" and record["reason"] == "body returns [512, 8, 8] but the cut says [512, 7, 7]"
    monkeypatch.setattr(check, "compare_shapes", lambda expected, got: {"body_shape": [3, 512, 7, 7], "status": "differs"})
    assert check.check_model("resnet18")["status"] == "differs"
    monkeypatch.setattr(check, "compare_shapes", lambda expected, got: {"body_shape": [3, 512, 8, 8], "status": "failed"})
    assert check.check_model("resnet18")["status"] == "failed", "only an ok or a known difference is second-guessed"
