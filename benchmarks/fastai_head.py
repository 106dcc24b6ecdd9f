"""fastai's own ``create_head`` over a grid of its options, recorded as the oracle of autocut's.

fastai is a benchmark-only dependency: this script records what fastai 2.8's ``create_head``
builds for every combination of :data:`GRID` (each layer's type, sizes, bias, dropout ``p``,
BatchNorm ``eps``/``momentum``, ``SigmoidRange`` bounds and parameter shapes; the output shape
of a fixed input, or the error fastai's head raised) and, for a part of the grid, the initial
values fastai gives it (``create_head`` then ``apply_init(head, nn.init.kaiming_normal_)``, as
``create_vision_model`` does). ``tests/test_fastai_head.py`` compares :func:`autocut.create_head`
with the file case by case, without fastai. The file comes from fastai alone: nothing here
imports autocut but ``--compare``.

    # once, in a separate venv: torch and torchvision pinned to the project's
    python3 -m venv /tmp/fastai-venv
    /tmp/fastai-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 fastai==2.8.12
    /tmp/fastai-venv/bin/python benchmarks/fastai_head.py          # writes tests/golden/fastai_head.json
    PYTHONPATH=. python benchmarks/fastai_head.py --compare        # autocut's tally against the file
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "fastai_head.json"

NF, N_OUT, BATCH, SIDE = 24, 7, 4, 3
SEED = 0

# Every option of create_head; ps of one value, of the right length for some lin_ftrs and the
# wrong length for others, and 0 (no Dropout built for it).
GRID: dict[str, list[Any]] = {
    "lin_ftrs": [None, [], [256], [512, 128]],
    "ps": [0.5, 0.0, [0.2, 0.4], [0.1, 0.2, 0.3]],
    "pool": [(True, True), (True, False), (False, True)],  # (pool, concat_pool)
    "first_bn": [True, False],
    "bn_final": [False, True],
    "lin_first": [False, True],
    "y_range": [None, (0.0, 5.0)],
}
# fastai's defaults, which a case's options leave out.
DEFAULTS: dict[str, Any] = dict(lin_ftrs=None, ps=0.5, pool=True, concat_pool=True, first_bn=True, bn_final=False,
                                lin_first=False, y_range=None)
# The part of the grid whose initial values are recorded: they depend on the layers, not on ps or y_range.
INIT_WHERE = {"ps": 0.5, "y_range": None}


def options_grid() -> Iterator[dict[str, Any]]:
    """Each combination of :data:`GRID`, as the ``create_head`` options that are not its defaults."""
    for combo in itertools.product(*GRID.values()):
        options = dict(zip(GRID, combo))
        options["pool"], options["concat_pool"] = options["pool"]
        yield {k: v for k, v in options.items() if v != DEFAULTS[k]}


def options_of(case: dict[str, Any]) -> dict[str, Any]:
    """Every option of a recorded case (the file holds those that are not the defaults)."""
    return {**DEFAULTS, **case["options"]}


def case_id(options: dict[str, Any]) -> str:
    """A case's name: its options, as a failing test shows them."""
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _call_options(options: dict[str, Any]) -> dict[str, Any]:
    """Fresh copies, in the kinds fastai takes (``lin_ftrs`` a list, ``y_range`` a tuple): fastai's
    ``lin_first`` pops the first value off the caller's own ``ps`` list."""
    out = copy.deepcopy({k: v for k, v in options.items() if k in DEFAULTS})
    if out.get("y_range") is not None:
        out["y_range"] = tuple(out["y_range"])
    return out


# --- describing a head, the same way for fastai's and autocut's ---------------------------------


def describe_layer(m: nn.Module) -> str:
    """One layer of a head as a line: its kind, what it is built with, its parameters' shapes."""
    kind = type(m).__name__
    if isinstance(m, nn.Linear):
        text = f"Linear({m.in_features}, {m.out_features}, bias={m.bias is not None})"
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        text = f"{kind}({m.num_features}, eps={m.eps}, momentum={m.momentum}"
        text += ("" if m.affine else ", affine=False") + ("" if m.track_running_stats else ", track_running_stats=False") + ")"
    elif isinstance(m, nn.Dropout):
        text = f"Dropout(p={float(m.p)})"
    elif isinstance(m, nn.ReLU):
        text = f"ReLU(inplace={m.inplace})"
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        text = f"AdaptiveAvgPool2d({m.output_size})"
    elif kind == "AdaptiveConcatPool2d":
        text = f"AdaptiveConcatPool2d(size={m.size})"
    elif kind == "SigmoidRange":
        text = f"SigmoidRange(low={float(m.low)}, high={float(m.high)})"
    else:  # Flatten (fastai's and nn's flatten (B, ...) to (B, -1) alike), or anything new: its name shows
        text = kind
    return " ".join([text, *(f"{name}{list(p.shape)}" for name, p in m.named_parameters())])


def describe(head: nn.Sequential) -> list[str]:
    return [describe_layer(m) for m in head]


def output_shape(head: nn.Module, options: dict[str, Any]) -> list[int] | str:
    """The eval-mode output shape of a fixed input, or the error the head raised on it."""
    shape = (BATCH, NF, SIDE, SIDE) if {**DEFAULTS, **options}["pool"] else (BATCH, NF)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))
    try:
        with torch.no_grad():
            return list(head.eval()(x).shape)
    except Exception as err:  # recorded: the oracle's failure is the datum
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"


def _value(t: torch.Tensor) -> float:
    return float(t.item())


def init_values(head: nn.Module) -> list[dict[str, Any]]:
    """Each parameter's initial values: the value where all are one, else statistics and the first values."""
    out = []
    for i, layer in enumerate(head):
        for name, p in layer.named_parameters():
            flat = p.detach().flatten().double()
            entry: dict[str, Any] = {"layer": i, "param": name}
            if bool((flat == flat[0]).all()):
                entry["const"] = _value(p.detach().flatten()[0])
            else:
                centred = flat - flat.mean()
                std = float(centred.pow(2).mean().sqrt())
                entry.update(n=flat.numel(), mean=round(float(flat.mean()), 8), std=round(std, 8),
                             kurtosis=round(float(centred.pow(4).mean() / std**4), 5),
                             first=[_value(v) for v in p.detach().flatten()[:4]])
            out.append(entry)
    return out


def initialised(create_head: Callable[..., nn.Module], apply_init: Callable[[nn.Module], Any],
                options: dict[str, Any]) -> nn.Module:
    """``create_head`` then ``apply_init`` from one seed, as fastai's ``create_vision_model`` does."""
    torch.manual_seed(SEED)
    head = create_head(NF, N_OUT, **_call_options(options))
    apply_init(head)
    return head


# --- recording fastai ---------------------------------------------------------------------------


def record() -> dict[str, Any]:
    """fastai's head for every case of the grid (needs fastai)."""
    import fastai
    from fastai.torch_core import apply_init
    from fastai.vision.learner import create_head

    cases = []
    for options in options_grid():
        case: dict[str, Any] = {"options": options}
        try:
            torch.manual_seed(SEED)
            head = create_head(NF, N_OUT, **_call_options(options))
        except Exception as err:
            case["error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            cases.append(case)
            continue
        case["layers"] = describe(head)
        case["output"] = output_shape(head, options)
        if all({**DEFAULTS, **options}[k] == v for k, v in INIT_WHERE.items()):
            case["init"] = init_values(initialised(create_head, lambda h: apply_init(h, nn.init.kaiming_normal_),
                                                   options))
        cases.append(case)
    return {
        "about": "fastai's create_head(nf, n_out, **options) per option combination: its layers, the output "
                 "shape of a fixed input (eval mode), and where recorded its initial values after "
                 "apply_init(head, nn.init.kaiming_normal_). Written by benchmarks/fastai_head.py; do not edit.",
        "fastai": fastai.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "nf": NF, "n_out": N_OUT, "input": [BATCH, NF, SIDE, SIDE], "seed": SEED,
        "grid": {k: v for k, v in GRID.items()},
        "cases": cases,
    }


def write(data: dict[str, Any], path: Path) -> None:
    """One case a line: small, and a changed case is a one-line diff."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {k: v for k, v in data.items() if k != "cases"}
    lines = [json.dumps(case, separators=(",", ":")) for case in data["cases"]]
    text = json.dumps(head, indent=1)[:-2] + ',\n "cases": [\n' + ",\n".join(lines) + "\n ]\n}\n"
    assert json.loads(text) == json.loads(json.dumps(data))
    path.write_text(text)


# --- comparing autocut --------------------------------------------------------------------------


def n_blocks(options: dict[str, Any]) -> int:
    """BatchNorm/Dropout/Linear blocks a head has: one per hidden width, plus the output layer."""
    lin_ftrs = {**DEFAULTS, **options}["lin_ftrs"]
    return 2 if lin_ftrs is None else len(lin_ftrs) + 1


def fastai_misbehaves(case: dict[str, Any]) -> str | None:
    """How fastai's head in ``case`` is not what its options asked for, or ``None``: it raised,
    its output is not ``(B, n_out)``, or its dropouts are not the ``ps`` given (one value spread
    over the blocks)."""
    if "error" in case:
        return f"create_head raised {case['error']}"
    if case["output"] != [BATCH, N_OUT]:
        return f"its output is {case['output']}, not {[BATCH, N_OUT]}"
    ps = given = options_of(case)["ps"]
    ps = [ps] if isinstance(ps, float) else ps
    if len(ps) == 1:
        ps = [ps[0] / 2] * (n_blocks(case["options"]) - 1) + ps
    used = [float(line.split("p=")[1].rstrip(")")) for line in case["layers"] if line.startswith("Dropout(")]
    if sorted(p for p in used if p) != sorted(p for p in ps if p):
        return f"its dropouts are {used} for ps={given}"
    return None


def verdict(case: dict[str, Any], create_head: Callable[..., nn.Module], error: type[Exception]) -> tuple[str, str]:
    """``("identical", "")``, ``("refused", message)`` (``error`` raised) or ``("differs", what)``:
    autocut's head against fastai's for one case."""
    options = case["options"]
    try:
        head = create_head(NF, N_OUT, **_call_options(options))
    except error as err:
        return "refused", str(err)
    ours = {"layers": describe(head), "output": output_shape(head, options)}
    theirs = {k: case.get(k) for k in ours}
    if ours == theirs:
        return "identical", ""
    return "differs", json.dumps({"autocut": ours, "fastai": theirs})


def compare(data: dict[str, Any]) -> Counter:
    import autocut

    tally: Counter = Counter()
    for case in data["cases"]:
        kind, detail = verdict(case, autocut.create_head, autocut.CutError)
        tally[kind] += 1
        if kind == "differs":
            print(f"differs: {case_id(case['options'])}\n  {detail}")
        if kind == "refused" and not fastai_misbehaves(case):
            print(f"refused where fastai is right: {case_id(case['options'])}: {detail}")
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN, help="the golden file to write (or read with --compare)")
    parser.add_argument("--compare", action="store_true", help="compare autocut.create_head with the file instead")
    args = parser.parse_args()
    if args.compare:
        data = json.loads(args.out.read_text())
        tally = compare(data)
        counts = ", ".join(f"{v} {k}" for k, v in sorted(tally.items()))
        print(f"{len(data['cases'])} cases against fastai {data['fastai']}: {counts}")
        return
    data = record()
    write(data, args.out)
    wrong = sum(fastai_misbehaves(c) is not None for c in data["cases"])
    print(f"{len(data['cases'])} cases of fastai {data['fastai']} ({wrong} where fastai is not what was asked) "
          f"-> {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
