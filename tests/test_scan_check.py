"""One model checked (``autocut.scan.check``), in this process: the record a scan writes equals the
committed full scan's record for the same model (statuses, cut, oracle shapes, groups), and each
path of the check (meta or CPU verification, known differences, failures, a reduced size) says
what happened."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autocut.scan import check, worker

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "reports" / "zoo" / "results.jsonl"
WORKER_KEYS = {"name", "zoo", "family", "base_mb", "peak_mb", "seconds", "at", "times"}  # the worker's, or timings


def _committed(name: str) -> dict:
    """The committed scan's last record of ``name`` (a resumed scan appends), less the worker's
    keys and the values a ``--values`` run compared (a plain check compares none)."""
    found = None
    for line in COMMITTED.read_text().splitlines():
        record = json.loads(line)
        if record["name"] == name:
            found = record
    if found is None:
        raise KeyError(name)
    return {k: v for k, v in found.items() if k not in WORKER_KEYS and not k.startswith("values")}


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
    assert set(times) <= {"build", "oracle", "cut", "verify", "groups", "pyramid", "build_cpu", "total"} and "total" in times
    assert ("build_cpu" in times) == (name == "efficientvit_b0")  # the real copy, built only where it is needed
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

    def fake(name, size, models, values=False):
        calls.append(size)
        if size is None:
            return {"times": {"total": 1.5}, "input_size": [3, 768, 768], "status": "oom", "phase": "cut",
                    "error_class": "MemoryError", "error": "out of memory"}
        return real(name, size, models, values)

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


def test_a_real_copy_whose_weights_are_more_than_the_memory_limit_leaves_is_not_built(monkeypatch):
    built = []
    real_build = check.zoo.build
    monkeypatch.setattr(check.zoo, "build", lambda spec, device: built.append(device) or real_build(spec, device=device))
    monkeypatch.setattr(check, "address_space_left", lambda: 13 * 2**20)
    record = check.check_model("efficientvit_b0")  # only a real copy can probe it: 3.4M weights, 13.1 MiB
    assert (record["status"], record["phase"], record["error_class"]) == ("oom", "cut", "WeightsOverLimit")
    assert record["error"] == ("out of memory: a real CPU copy of efficientvit_b0 holds 13 MiB of weights, and the memory "
                               "limit leaves 13 MiB (not built)")
    assert built == ["meta"] and "build_cpu" not in record["times"]  # (no retry at a smaller size: the weights are the same)
    monkeypatch.setattr(check, "address_space_left", lambda: 14 * 2**20)
    assert check.check_model("efficientvit_b0")["status"] == "ok" and built == ["meta", "meta", "cpu"]


def test_the_address_space_left_is_the_limit_less_what_the_process_maps():
    assert worker.address_space_left() is None  # (no limit here)
    code = ("import resource; from autocut.scan import worker; mapped = worker._status_kb('VmSize') * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, resource.RLIM_INFINITY)); "
            "print(worker.address_space_left())")
    left = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 2**30 - 2**20 < left <= 2**30  # (the few pages mapped since read off it)


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


class Clock:
    """``time`` for the check, whose ``perf_counter`` moves on by ``step`` at every reading."""

    def __init__(self, step: float = 0.1234567):
        self.now, self.step = 100.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def test_each_phase_is_timed_to_a_tenth_of_a_millisecond_and_the_total_from_the_start(monkeypatch):
    from autocut.scan.oracles import OracleError

    monkeypatch.setattr(check, "time", Clock())
    lap, total = 0.1235, lambda n: round(n * 0.1234567, 4)  # every phase reads the clock once
    record = check.check_model("resnet18")
    assert record["times"] == {"build": lap, "oracle": lap, "cut": lap, "verify": lap, "groups": lap, "pyramid": lap,
                               "total": total(7)}

    def oracle_error(model, x):
        raise OracleError("no map")

    with monkeypatch.context() as m:
        m.setattr(check, "timm_expected", oracle_error)
        assert check.check_model("resnet18")["times"] == {"build": lap, "oracle": lap, "total": total(3)}
    with monkeypatch.context() as m:  # neither the meta adapt nor discovery cuts it
        m.setattr(check, "adapt", _boom)
        m.setattr(check, "discover_module", _boom)
        assert check.check_model("resnet18")["times"] == {"build": lap, "oracle": lap, "cut": lap, "total": total(4)}
    with monkeypatch.context() as m:  # the meta body cannot run: the CPU check fails in its build
        m.setattr(check, "_verify_meta", lambda adapted, expected, x: None)
        m.setattr(check, "create_body", _boom)
        # building the real copy reads the clock twice, and its time is a phase of its own, not verify's
        assert check.check_model("resnet18")["times"] == {"build": lap, "oracle": lap, "cut": lap, "verify": 0.2469,
                                                          "build_cpu": lap, "total": total(7)}
    with monkeypatch.context() as m:  # a known difference where autocut refuses
        m.setattr(check, "timm_expected", lambda model, x: (_ for _ in ()).throw(check.Differs("list features")))
        m.setattr(check, "adapt", _boom)
        m.setattr(check, "discover_module", lambda *a, **k: (_ for _ in ()).throw(
            check.CutError("its branches only meet after pooling")))
        record = check.check_model("resnet18")
        assert (record["status"], record["times"]) == ("differs", {"build": lap, "oracle": lap, "cut": lap, "total": total(4)})
        assert record["error"] == "its branches only meet after pooling"


def test_an_oracle_that_only_a_real_forward_can_run_is_run_on_the_cpu(monkeypatch):
    meta_oracle = check.timm_expected

    def value_dependent(model, x):
        if x.is_meta:
            raise RuntimeError("reads values")  # as .item() on meta tensors
        return meta_oracle(model, x)

    monkeypatch.setattr(check, "timm_expected", value_dependent)
    record = check.check_model("resnet18")
    assert (record["status"], record["verified_on"], record["expected_shape"]) == ("ok", "cpu", [1, 512, 7, 7])


def test_the_sizes_a_check_probes_are_the_models_own(monkeypatch):
    assert check.check_model("torchvision:inception_v3")["input_size"] == [3, 299, 299]  # its weights' crop
    # vit_h_14 is built for 224 px though its default weights' transforms crop 518
    monkeypatch.setattr(check, "adapt", _boom)  # (no need to adapt a 632M-parameter model here)
    monkeypatch.setattr(check, "discover_module", _boom)
    assert check.check_model("torchvision:vit_h_14")["input_size"] == [3, 224, 224]


def test_a_refusal_is_a_known_difference_only_where_the_oracle_expects_one(monkeypatch):
    refusal = "its branches only meet after pooling (last maps: 'a', 'b')" + " and more" * 300

    def refuse(*args, **kwargs):
        raise check.CutError(refusal)

    monkeypatch.setattr(check, "adapt", _boom)
    monkeypatch.setattr(check, "discover_module", refuse)
    record = check.check_model("resnet18")  # the oracle expects a map: a refusal is a failure
    assert (record["status"], record["phase"], record["error_class"]) == ("failed", "cut", "CutError")
    monkeypatch.setattr(check, "timm_expected", lambda model, x: (_ for _ in ()).throw(check.Differs("list features")))
    record = check.check_model("resnet18")
    assert (record["status"], record["reason"], record["error"]) == ("differs", "list features", refusal[:1500])
    monkeypatch.setattr(check, "discover_module", _boom)  # another error, where a refusal was expected
    assert check.check_model("resnet18")["status"] == "failed"


def test_a_model_that_discovery_cuts_and_adapt_then_adapts_on_meta_is_verified_there(monkeypatch):
    real_adapt = check.adapt

    def only_with_a_cut(model, *args, cut=None, **kwargs):
        if cut is None:
            raise Boom("no cut given")
        return real_adapt(model, *args, cut=cut, **kwargs)

    monkeypatch.setattr(check, "adapt", only_with_a_cut)
    record = check.check_model("resnet18")
    record.pop("times")
    assert record == {**_committed("resnet18"), "verified_on": "meta", "groups_on": "meta"}


def test_a_known_difference_verified_on_the_cpu_is_still_one(monkeypatch):
    monkeypatch.setattr(check, "_verify_meta", lambda adapted, expected, x: None)
    record = check.check_model("pit_ti_224")
    assert (record["status"], record["reason"], record["verified_on"]) == ("differs", "cls-only features", "cpu")


def test_groups_that_fail_on_meta_and_cpu_say_both(monkeypatch):
    def long_error(model):
        raise Boom("x" * 800)

    monkeypatch.setattr(check, "group_summary", long_error)
    record = check.check_model("resnet18")
    assert record["groups_error"] == "meta: Boom: " + "x" * 500 + "; cpu: Boom: " + "x" * 500


def test_a_known_difference_whose_body_is_not_its_cut_is_a_mismatch(monkeypatch):
    monkeypatch.setattr(check, "compare_shapes", lambda expected, got: {"body_shape": [3, 512, 8, 8], "status": "differs"})
    assert check.check_model("resnet18")["status"] == "mismatch"


def test_values_are_compared_on_real_weights_and_a_body_one_op_off_differs(monkeypatch):
    record = check.check_model_values("resnet18")  # what ``autocut scan --values`` runs in each worker
    assert (record["status"], record["values"], record["values_max_diff"]) == ("ok", "equal", 0.0)
    assert record["values_scale"] > 0 and list(record["times"])[-5:] == ["values", "build_cpu", "groups", "pyramid", "total"]
    real_create_body = check.create_body

    def one_op_off(model, cut, input_size):  # a body whose values are off, its shape right
        return _Minus(real_create_body(model, cut=cut, input_size=input_size))

    monkeypatch.setattr(check, "create_body", one_op_off)
    record = check.check_model("resnet18", values=True)
    assert record["status"] == "ok" and record["values"] == "differ" and record["values_max_diff"] > 1e-3


def test_values_that_cannot_be_compared_are_recorded_as_failed_with_the_error_named(monkeypatch):
    said = "cannot allocate " + "x" * 600  # a long message, kept to its first 500 characters

    def out_of_memory(spec, model, cut, size):
        raise MemoryError(said)

    monkeypatch.setattr(check, "compare_values", out_of_memory)
    record = check.check_model("resnet18", values=True)
    assert (record["status"], record["values"]) == ("ok", "failed")  # the shapes were checked; the values not
    assert record["values_error"] == "MemoryError: " + said[:500]


class _Minus(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x) - 1e-2


def _resnet18():
    spec = check.zoo.resolve("resnet18")
    return spec, check.zoo.build(spec, device="cpu")


def test_values_of_a_body_cut_elsewhere_differ_by_shape_with_both_shapes_named():
    spec, model = _resnet18()
    record = check.compare_values(spec, model, "layer3", (3, 64, 64))  # the cut given is the one checked
    assert record == {"values": "differ", "values_max_diff": None, "values_reason": "shapes [2, 256, 4, 4] and [2, 512, 2, 2]"}


def test_values_within_the_relative_tolerance_are_equal(monkeypatch):
    # a body off by 0.009% of each value: equal at rtol 1e-4 (VALUES_RTOL), not at torch's default 1e-5
    assert (check.VALUES_RTOL, check.VALUES_ATOL) == (1e-4, 1e-4)
    real_create_body, real_oracle = check.create_body, check._oracle
    monkeypatch.setattr(check, "create_body", lambda model, cut, input_size: _Times(
        real_create_body(model, cut=cut, input_size=input_size), 1000 * (1 + 9e-5)))
    monkeypatch.setattr(check, "_oracle", lambda spec, model, x, values: 1000 * real_oracle(spec, model, x, values=values))
    spec, model = _resnet18()
    record = check.compare_values(spec, model, None, (3, 64, 64))
    assert record["values_scale"] > 100  # where 9e-5 * |x| is past atol + 1e-5 * |x|
    assert record["values"] == "equal" and 0 < record["values_max_diff"] <= 1e-4 * record["values_scale"]


class _Times(torch.nn.Module):
    def __init__(self, body, factor):
        super().__init__()
        self.body, self.factor = body, factor

    def forward(self, x):
        return self.body(x) * self.factor


class _EightPixels(torch.nn.Module):
    """Runs at 8 px alone (a 4x4 position embedding on its 2-px patches) and states no size: a
    body cut at another size than the one checked is no body at all."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 2, 2)
        self.pos = torch.nn.Parameter(torch.randn(1, 8, 4, 4))
        self.fc = torch.nn.Linear(8, 2)

    def features(self, x):
        return torch.relu(self.proj(x) + self.pos)  # (B, 8, 4, 4), about half of it zeros

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class _Plus(torch.nn.Module):
    def __init__(self, body, shift):
        super().__init__()
        self.body, self.shift = body, shift

    def forward(self, x):
        return self.body(x) + self.shift


def _features_oracle(spec, model, x, values):
    return model.features(x)


def test_values_are_those_of_a_body_cut_at_the_size_checked_on_the_seeded_input(monkeypatch):
    monkeypatch.setattr(check, "_oracle", _features_oracle)
    model = _EightPixels()
    record = check.compare_values(None, model, None, (3, 8, 8))
    # the input a reader can make again: batch 2 of torch's normal draws from seed 0
    seeded = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = float(model.features(seeded).abs().max())
    assert record == {"values": "equal", "values_max_diff": 0.0, "values_scale": scale}


def test_values_within_the_absolute_tolerance_are_equal_where_the_map_is_zero(monkeypatch):
    # off by 5e-5 everywhere: where the ReLU gave 0, only VALUES_ATOL (1e-4) holds that equal
    monkeypatch.setattr(check, "_oracle", _features_oracle)
    real_create_body = check.create_body
    monkeypatch.setattr(check, "create_body", lambda model, cut, input_size: _Plus(
        real_create_body(model, cut=cut, input_size=input_size), 5e-5))
    record = check.compare_values(None, _EightPixels(), None, (3, 8, 8))
    assert record["values"] == "equal" and record["values_max_diff"] == pytest.approx(5e-5, rel=1e-2)
    monkeypatch.setattr(check, "create_body", lambda model, cut, input_size: _Plus(
        real_create_body(model, cut=cut, input_size=input_size), 2e-4))
    assert check.compare_values(None, _EightPixels(), None, (3, 8, 8))["values"] == "differ"  # past it: not equal
