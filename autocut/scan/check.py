"""One model, checked: where autocut cuts it, whether the body returns what the model's own code
says it should (:mod:`autocut.scan.oracles`), its layer groups, and what that cost.

:func:`check_model` runs inside a scan worker (:mod:`autocut.scan.runner`), one model at a time;
it never raises for a model's own failure: the record says what failed, where, and why.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from autocut import zoo
from autocut.adapt import adapt, create_body
from autocut.discover import discover_module
from autocut.errors import CutError
from autocut.groups import group_summary
from autocut.scan.oracles import (
    DIFFERS,
    Differs,
    OracleError,
    timm_expected,
    timm_reduced,
    torchvision_expected,
    torchvision_reduced,
    transformers_expected,
    transformers_reduced,
)
from autocut.scan.pyramids import check_pyramid, refused_pyramid
from autocut.scan.worker import address_space_left, error_record

__all__ = ["check_model", "check_model_values", "compare_shapes", "compare_values", "STATUSES"]

# ok: the body's output shape is the oracle's; differs: a known deliberate difference (reason);
# mismatch: both ran and disagree; failed: an exception (phase, error); timeout / crashed / oom:
# the worker was killed, died, or ran out of its memory limit (set by the runner).
STATUSES = ("ok", "differs", "mismatch", "failed", "timeout", "crashed", "oom")

META_BATCH = 3  # as the zoo tests: not 1, so a dropped batch dimension shows
REAL_BATCH = 1  # real tensors only where the meta device cannot run the model: keep them cheap
# where a model can only be probed with a real forward and that forward does not fit in memory at
# the model's own input size (gemma4's encoders at 768 px), it is verified at its size halved until
# no side is over this (a real forward at 224 px still takes a minute for the 570M one)
REDUCED_SIZE = 128


# known differences where autocut refuses the model: the CutError it must raise (a part of its message)
REFUSALS = {
    "list features": "branches only meet after pooling",
    "no image input": "",
    "anisotropic map": "does not hold",
    "soft tokens": "does not hold",
}


VALUES_BATCH = 2
VALUES_RTOL, VALUES_ATOL = 1e-4, 1e-4  # float32, the same ops in the same order: only summation order may differ


def _oracle(spec: zoo.ModelSpec, model: torch.nn.Module, x: torch.Tensor, values: bool = False) -> Any:
    """The oracle of ``spec``'s zoo: the shape of the map it expects, or with ``values`` the map."""
    if spec.source == zoo.TORCHVISION:
        return (torchvision_reduced if values else torchvision_expected)(model, spec.name, x)
    by_zoo = {zoo.TIMM: (timm_expected, timm_reduced), zoo.TRANSFORMERS: (transformers_expected, transformers_reduced)}
    return by_zoo[spec.source][values](model, x)


def compare_values(spec: zoo.ModelSpec, model: torch.nn.Module, cut, size: tuple[int, int, int]) -> dict[str, Any]:
    """The body's output against the oracle's on the same random input (batch 2, the size
    checked), real CPU weights (the model's own random init, seeded): ``values`` is ``"equal"``
    within ``VALUES_RTOL``/``VALUES_ATOL`` (``torch.allclose``), else ``"differ"``; with the
    largest absolute difference and the oracle's largest magnitude, for scale."""
    torch.manual_seed(0)
    x = torch.randn(VALUES_BATCH, *size)
    model = model.eval()
    with torch.no_grad():
        expected = _oracle(spec, model, x, values=True)
        got = create_body(model, cut=cut, input_size=size).eval()(x)
    if got.shape != expected.shape:
        shapes = f"shapes {list(got.shape)} and {list(expected.shape)}"
        return {"values": "differ", "values_max_diff": None, "values_reason": shapes}
    diff = float((got - expected).abs().max())
    equal = torch.allclose(got, expected, rtol=VALUES_RTOL, atol=VALUES_ATOL)
    return {"values": "equal" if equal else "differ", "values_max_diff": diff, "values_scale": float(expected.abs().max())}


def _cut_record(cut) -> dict[str, Any]:
    return {
        "where": cut.where,
        "after": cut.after,
        "nf": cut.nf,
        "layout": cut.layout,
        "feature_shape": list(cut.feature_shape),
        "stride": list(cut.stride) if isinstance(cut.stride, tuple) else cut.stride,
        "prefix_tokens": cut.prefix_tokens,
        "method": cut.method,
        "dropped": list(cut.dropped),
    }


def check_model_values(name: str) -> dict[str, Any]:
    """:func:`check_model`, and the body's output values against the oracle's on real CPU
    weights (``autocut scan --values``): see :func:`compare_values`."""
    return check_model(name, values=True)


def check_model(name: str, values: bool = False) -> dict[str, Any]:
    """Discover, verify and group ``name`` (a zoo name); a JSON-ready record.

    Steps, timed: build on the meta device; the oracle on meta tensors; the cut and body
    (``autocut.adapt(meta_model, n_out=2, input_size=size)``, falling back to :func:`autocut.discover`'s
    real-copy probe where the meta model cannot be probed); the body's output against the oracle
    (on meta tensors, else real CPU tensors of batch 1); the layer groups of the adapted model;
    the feature pyramid, run and checked against the zoo's stated levels
    (:func:`autocut.scan.pyramids.check_pyramid`).
    A model that only a real forward can probe, and whose real forward at its own input size
    runs out of memory, is checked again at a smaller size (:func:`_reduced`; ``reduced_from`` and
    ``reduced_because`` in the record say so).

    Example:
        >>> check_model("resnet18")["status"], check_model("resnet18")["where"]
        ('ok', 'layer4.1.act2')
    """
    real: list[torch.nn.Module] = []  # the real CPU copy, built once for both attempts
    rec = _check(name, None, real, values)
    size = rec.get("input_size")
    if (rec.get("status") == "oom" and rec.get("phase") == "cut" and rec.get("error_class") != WeightsOverLimit.__name__
            and size and max(size[1:]) > REDUCED_SIZE):
        # only a real forward can probe it (value-dependent code), and at its own size that forward
        # does not fit: verify it at a smaller size (its weights fit, or no copy would be built), and say so
        retry = _check(name, _reduced(size), real, values)
        retry["reduced_from"] = size
        retry["reduced_because"] = f"{rec['error_class']} at {size[1]}x{size[2]}: {rec['error'][:300]}"
        retry["times"]["total"] = round(retry["times"]["total"] + rec["times"]["total"], 4)
        return retry
    return rec


def _reduced(size: list[int]) -> tuple[int, int, int]:
    """The model's size halved until each side is at most ``REDUCED_SIZE``: halving keeps the
    divisibility a model may insist on (gemma4's encoders: 768 px, multiples of 48 -> 96 px)."""
    sides = []
    for side in size[1:]:
        while side > REDUCED_SIZE and side % 2 == 0:
            side //= 2
        sides.append(side)
    return (size[0], *sides)


def _check(name: str, size: tuple[int, int, int] | None, real: list[torch.nn.Module], values: bool = False) -> dict[str, Any]:
    times: dict[str, float] = {}
    clock = time.perf_counter()

    building = [0.0]  # seconds spent building the real CPU copy since the last lap: a phase of its own

    def lap(key: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[key] = round(times.get(key, 0.0) + now - clock - building[0], 4)
        if building[0]:
            times["build_cpu"] = round(times.get("build_cpu", 0.0) + building[0], 4)
            building[0] = 0.0
        clock = now

    rec: dict[str, Any] = {"times": times}
    started = clock
    try:
        spec = zoo.resolve(name)
        meta = zoo.build(spec, device="meta")
        size = tuple(size or zoo.default_input_size(spec, meta))
    except Exception as err:  # the worker's boundary: any failure is this model's record
        return {**rec, **error_record("build", err)}
    rec["input_size"] = list(size)
    rec["params"] = sum(p.numel() for p in meta.parameters())
    lap("build")

    def rebuild() -> torch.nn.Module:
        if not real:
            _fits_in_memory(spec, meta)
            started_build = time.perf_counter()
            real.append(zoo.build(spec, device="cpu"))
            building[0] += time.perf_counter() - started_build
        return real[0]

    # the oracle first, on the untouched model
    x = torch.empty(META_BATCH, *size, device="meta")
    expected: torch.Size | Differs | Exception
    try:
        expected = _oracle(spec, meta, x)
    except Differs as differs:
        expected = differs
    except OracleError as err:  # no map to compare with, on any device
        lap("oracle")
        rec["times"]["total"] = round(time.perf_counter() - started, 4)
        return {**rec, **error_record("oracle", err)}
    except Exception as err:  # value-dependent code: retried on real tensors below
        expected = err
    lap("oracle")

    # the cut and the body, as a user gets them
    adapted = None
    try:
        adapted = adapt(meta, n_out=2, input_size=size)
        cut = dataclasses.replace(adapted.cut, arch=str(spec))
    except Exception:  # the meta model cannot be adapted: discovery's real-copy path, next
        try:  # what autocut.discover(name) does when the meta model cannot be probed
            cut = discover_module(meta, size, arch=str(spec), rebuild=rebuild)
        except Exception as err:  # recorded: the cut phase failed
            lap("cut")
            rec["times"]["total"] = round(time.perf_counter() - started, 4)
            if isinstance(err, CutError):
                rec.update(refused_pyramid(spec, meta, size, err, META_BATCH))
            if isinstance(expected, Differs) and isinstance(err, CutError) and REFUSALS.get(expected.reason, "\0") in str(err):
                return {**rec, "status": "differs", "reason": expected.reason, "error_class": type(err).__name__,
                        "error": str(err)[:1500]}
            return {**rec, **error_record("cut", err)}
        try:
            adapted = adapt(meta, n_out=2, input_size=size, cut=cut)
        except Exception:  # the meta body cannot be built: the real one is, below
            adapted = None
    rec.update(_cut_record(cut))
    lap("cut")

    # the body's output against the oracle: meta tensors, else real ones
    status = _verify_meta(adapted, expected, x)
    if status is None:
        phase = "build (cpu)"
        try:
            model = rebuild()
            xr = torch.randn(REAL_BATCH, *size)
            phase = "oracle (cpu)"
            try:
                expected = _oracle(spec, model, xr)
            except Differs as differs:
                expected = differs
            phase = "body (cpu)"
            body = create_body(model, cut=cut, input_size=size).eval()
            with torch.no_grad():
                out = body(xr)
            status = compare_shapes(expected, out.shape)
            rec["verified_on"] = "cpu"
        except Exception as err:  # recorded: the phase that failed says where
            lap("verify")
            rec["times"]["total"] = round(time.perf_counter() - started, 4)
            return {**rec, **error_record(phase, err)}
    else:
        rec["verified_on"] = "meta"
    rec.update(status)
    if rec["status"] in ("ok", "differs") and tuple(rec["body_shape"][1:]) != tuple(cut.feature_shape):
        rec.update(status="mismatch", reason=f"body returns {rec['body_shape'][1:]} but the cut says {list(cut.feature_shape)}")
    lap("verify")

    if values and rec["status"] == "ok":
        try:
            rec.update(compare_values(spec, rebuild(), cut, size))
        except Exception as err:  # recorded: the values could not be compared (memory, a real forward failing)
            rec.update(values="failed", values_error=f"{type(err).__name__}: {str(err)[:500]}")
        lap("values")

    # layer groups on the meta adapt (the real one where the meta body could not be built)
    groups, errors = None, []
    for device in ("meta", "cpu"):
        if device == "meta" and adapted is None:
            continue
        try:
            if device == "cpu":
                adapted = adapt(rebuild(), n_out=2, input_size=size, cut=cut)
            groups = group_summary(adapted)
            rec["groups_on"] = device
            break
        except Exception as err:  # recorded in groups_error if the CPU copy fails too
            errors.append(f"{device}: {type(err).__name__}: {str(err)[:500]}")
    if groups is not None:
        rec["groups"] = [[g["first"], g["last"], g["stride"], g["params"]] for g in groups]
        rec["n_groups"] = len(groups)
    else:
        rec["groups_error"] = "; ".join(errors)
    lap("groups")

    rec.update(check_pyramid(spec, meta, size, rebuild, real_needed=bool(real), batches=(META_BATCH, REAL_BATCH)))
    lap("pyramid")
    rec["times"]["total"] = round(time.perf_counter() - started, 4)
    return rec


class WeightsOverLimit(MemoryError):
    """A real CPU copy's weights alone are more than the memory limit leaves: not built."""


def _fits_in_memory(spec: zoo.ModelSpec, meta: torch.nn.Module) -> None:
    """Raise :class:`WeightsOverLimit` where a real CPU copy's weights alone are more than the memory limit
    leaves (:func:`~autocut.scan.worker.address_space_left`): building one would fill memory
    for seconds before failing the same way."""
    left = address_space_left()
    need = sum(t.numel() * t.element_size() for t in (*meta.parameters(), *meta.buffers()))
    if left is not None and need > left:
        raise WeightsOverLimit(f"out of memory: a real CPU copy of {spec} holds {need / 2**20:,.0f} MiB of weights, and the "
                               f"memory limit leaves {left / 2**20:,.0f} MiB (not built)")


def _verify_meta(adapted, expected, x: torch.Tensor) -> dict[str, Any] | None:
    """The comparison on meta tensors; None where the meta device cannot run it."""
    if adapted is None or (isinstance(expected, Exception) and not isinstance(expected, Differs)):
        return None
    try:
        with torch.no_grad():
            out = adapted.body.eval()(x)
    except Exception:  # the meta device cannot run it: the caller verifies on the CPU
        return None
    return compare_shapes(expected, out.shape)


def compare_shapes(expected: torch.Size | Differs, got: torch.Size) -> dict[str, Any]:
    """The status of a body that returned ``got`` where the oracle expected ``expected`` (every
    dimension, the batch included), or a known difference (:class:`Differs`) it must match."""
    rec: dict[str, Any] = {"body_shape": list(got)}
    if isinstance(expected, Differs):
        if expected.reason == "cls-only features" and len(got) == 4 and got[1] == expected.channels:
            return {**rec, "status": "differs", "reason": expected.reason}
        if expected.reason in ("latent array", "soft tokens") and len(got) == 4:  # a body is made, on them
            return {**rec, "status": "differs", "reason": expected.reason}
        return {**rec, "status": "mismatch", "reason": f"{expected.reason} ({DIFFERS[expected.reason]}), but the body "
                f"returns {list(got)}"}
    rec["expected_shape"] = list(expected)
    if tuple(got) == tuple(expected):
        return {**rec, "status": "ok"}
    return {**rec, "status": "mismatch", "reason": f"body returns {list(got)}, the oracle {list(expected)}"}
