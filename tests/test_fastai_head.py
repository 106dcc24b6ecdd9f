"""create_head against fastai's own, case by case, from a file fastai wrote: no fastai needed here.

``tests/golden/fastai_head.json`` holds what fastai 2.8's ``create_head`` built for every
combination of its options (``benchmarks/fastai_head.py``, run with fastai installed, writes it):
each layer, the output shape, and for part of the grid the initial values after fastai's
``apply_init``. Each case is either fastai's head exactly, or a refusal where fastai's head is
not what the options asked for.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import autocut
from autocut.adapt import apply_init

ROOT = Path(__file__).resolve().parents[1]


def _load_recorder():
    spec = importlib.util.spec_from_file_location("fastai_head_recorder", ROOT / "benchmarks" / "fastai_head.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rec = _load_recorder()
GOLDEN = json.loads(rec.GOLDEN.read_text())
CASES = GOLDEN["cases"]
INIT_CASES = [c for c in CASES if "init" in c]


def _wrong_length_ps(options):
    """The one deliberate refusal of the grid: ``ps`` neither one value nor one per block."""
    ps = options["ps"]
    return isinstance(ps, list) and len(ps) not in (1, rec.n_blocks(options))


def test_the_file_is_fastais_over_the_whole_grid():
    assert GOLDEN["fastai"].startswith("2.8.") and (GOLDEN["nf"], GOLDEN["n_out"]) == (rec.NF, rec.N_OUT)
    assert [c["options"] for c in CASES] == json.loads(json.dumps(list(rec.options_grid())))
    assert len(CASES) == 768 and len(INIT_CASES) == 96
    # every option of create_head takes each of its values somewhere in the grid
    for name, default in rec.DEFAULTS.items():
        assert any(name in c["options"] for c in CASES), name
        assert any(rec.options_of(c)[name] == json.loads(json.dumps(default)) for c in CASES), name


@pytest.mark.parametrize("case", CASES, ids=[rec.case_id(c["options"]) for c in CASES])
def test_the_head_is_fastais_or_a_refusal_naming_ps(case):
    options = rec.options_of(case)
    kind, detail = rec.verdict(case, autocut.create_head, autocut.CutError)
    if _wrong_length_ps(options):
        assert kind == "refused" and detail.startswith(f"ps has {len(options['ps'])} values for "), detail
        assert f"give one value or {rec.n_blocks(options)}" in detail
        assert rec.fastai_misbehaves(case), "a refusal only where fastai's head is not what was asked"
    else:
        assert kind == "identical", detail
        assert rec.fastai_misbehaves(case) is None


def _close(ours, theirs, n, what):
    """Two samples of one distribution: statistics within 6 standard errors of each other."""
    std = theirs["std"]
    assert abs(ours["mean"] - theirs["mean"]) <= 6 * std * (2 / n) ** 0.5, what
    assert abs(ours["std"] - std) <= 6 * std / n**0.5, what
    assert abs(ours["kurtosis"] - theirs["kurtosis"]) <= 6 * (48 / n) ** 0.5, what


@pytest.mark.parametrize("case", INIT_CASES, ids=[rec.case_id(c["options"]) for c in INIT_CASES])
def test_initial_values_are_fastais(case):
    # what adapt does: create_head, then apply_init with kaiming normal
    ours = rec.init_values(rec.initialised(autocut.create_head, apply_init, case["options"]))
    theirs = case["init"]
    assert [(e["layer"], e["param"]) for e in ours] == [(e["layer"], e["param"]) for e in theirs]
    same_rng = torch.__version__.split("+")[0] == GOLDEN["torch"].split("+")[0]
    for mine, want in zip(ours, theirs, strict=True):
        what = f"layer {want['layer']} {want['param']}"
        if "const" in want:  # BatchNorm weight 1 and bias 1e-3 (0 in bn_final's), Linear biases 0
            assert mine.get("const") == want["const"], what
            continue
        assert "const" not in mine and mine["n"] == want["n"], what
        _close(mine, want, want["n"], what)
        if same_rng:  # same seed, same layers built in the same order: the very same values
            assert mine["first"] == want["first"], what


def test_the_recorded_init_is_kaiming_normal_and_fastais_batch_norm():
    # the file itself, read against the recipe: so a wrong file cannot make a wrong head pass
    case = next(c for c in INIT_CASES if c["options"] == {"bn_final": True})
    by_layer = {(e["layer"], e["param"]): e for e in case["init"]}
    layers = case["layers"]
    for (i, param), e in by_layer.items():
        if layers[i].startswith("Linear(") and param == "weight":
            fan_in = int(layers[i].split("(")[1].split(",")[0])
            assert abs(e["std"] / (2 / fan_in) ** 0.5 - 1) < 0.05 and abs(e["kurtosis"] - 3) < 0.5
        elif layers[i].startswith("BatchNorm1d("):
            final = i == len(layers) - 1
            assert e["const"] == (1.0 if param == "weight" else 0.0 if final else torch.tensor(1e-3).item())
    assert "momentum=0.01" in layers[-1]


def test_ps_is_never_changed():
    # fastai's lin_first pops the first value off the caller's own list
    ps = [0.1, 0.2]
    autocut.create_head(8, 3, lin_ftrs=[16], ps=ps, lin_first=True)
    assert ps == [0.1, 0.2]
