"""From a scan's ``results.jsonl`` to what people read: ``model_meta.json`` (fastai's hand-kept
table, generated), ``report.md`` (coverage per family, failures by cause, time and memory) and
two plots against parameter count.

Example:
    >>> paths = write_report("benchmarks/reports/zoo")
    >>> sorted(p.name for p in paths)
    ['memory_vs_params.png', 'model_meta.json', 'report.md', 'time_vs_params.png']
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from autocut.scan.runner import FAILED_STATUSES, RUNS, load_results, output_folder, read_jsonl

__all__ = ["write_report", "model_meta", "render_report", "cause_of"]

MODEL_META = "model_meta.json"
REPORT = "report.md"
TIME_PLOT = "time_vs_params.png"
MEMORY_PLOT = "memory_vs_params.png"
_STATUS_ORDER = ("ok", "differs", "mismatch", "failed", "timeout", "crashed", "oom")
_PYRAMID_VERIFIED = ("agree", "differ", "no oracle")  # ran, and every map is the shape its level says
_PYRAMID_ORDER = ("agree", "differ", "no oracle", "refused", "mismatch", "failed", "not checked")


def model_meta(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> where, after (the outermost module the body ends with, fastai's way of naming the
    cut; in records of scans that have it), nf, layout, stride, prefix tokens, input size, method
    and layer-group boundaries (``[first, last]`` module of each group, the head last), for every
    model whose cut was verified (``ok``) or differs from its oracle on purpose; ``levels``, its
    feature pyramid (where, after, nf and stride of each level), where the pyramid ran and returned
    what its levels say."""
    meta = {}
    for name in sorted(records):
        rec = records[name]
        if rec.get("status") not in ("ok", "differs") or "where" not in rec:
            continue
        meta[name] = {
            "where": rec["where"],
            **({"after": rec["after"]} if "after" in rec else {}),
            "nf": rec["nf"],
            "layout": rec["layout"],
            "stride": rec["stride"],
            "prefix_tokens": rec["prefix_tokens"],
            "input_size": rec["input_size"],
            "method": rec["method"],
            "groups": [g[:2] for g in rec.get("groups", [])] or None,
        }
        if rec.get("pyramid") and rec.get("pyramid_check") in _PYRAMID_VERIFIED:
            meta[name]["levels"] = [{k: level[k] for k in ("where", "after", "nf", "stride")} for level in rec["pyramid"]]
        if rec["status"] == "differs":
            meta[name]["differs"] = rec.get("reason")
    return meta


def cause_of(rec: dict[str, Any]) -> str:
    """A failure's cause, with names and numbers blanked so alike failures group together."""
    return f"{rec.get('error_class', '?')} in {rec.get('phase', '?')}: {_blanked(rec.get('error') or '')}"


def _blanked(text: str) -> str:
    """The first line of ``text``, quoted names and numbers blanked, at most 200 characters."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", first)
    return re.sub(r"\d+", "N", first)[:200]


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def _fmt_params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _seconds(rec: dict[str, Any]) -> float | None:
    return rec.get("seconds") if rec.get("seconds") is not None else rec.get("times", {}).get("total")


def _distribution_rows(label: str, values: list[float], total: bool = True) -> str:
    if not values:
        return f"| {label} | 0 | - | - | - | - |" + (" - |" if total else "") + "\n"
    return (f"| {label} | {len(values)} | {_pct(values, 50):.2f} | {_pct(values, 90):.2f} | {_pct(values, 95):.2f} "
            f"| {max(values):.2f} |" + (f" {sum(values):.0f} |" if total else "") + "\n")


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    header = list(header)
    out = "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|\n"
    for row in rows:
        out += "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |\n"
    return out


def _runs(out: Path) -> list[dict[str, Any]]:
    """The runs of ``out/scan_runs.jsonl``; a damaged line is left out (it only describes a run)."""
    path = out / RUNS
    if not path.exists():
        return []
    return [rec for _, rec, problem in read_jsonl(path) if rec is not None and not problem]


def render_report(records: dict[str, dict[str, Any]], runs: list[dict[str, Any]], plots: bool = True,
                  zoo_sizes: dict[str, int] | None = None) -> str:
    """``report.md``'s text; ``zoo_sizes`` (zoo -> names it has) says how much of each was scanned."""
    recs = [records[n] for n in sorted(records)]
    md = ["# autocut zoo scan\n"]
    md.append("Every model is cut by autocut (built on the meta device), and the body's output shape is checked "
              "against an oracle written from the model's own code: timm's `forward_features` after layout "
              "normalisation from timm's metadata, torchvision's input of the model's own global pooling, "
              "transformers' base-model `last_hidden_state` or a backbone's last feature map "
              "(`autocut/scan/oracles.py`). With `--values`, the body's output values are compared with the "
              "oracle's on real CPU weights too (the `values` column). Generated by `autocut scan` from "
              "`results.jsonl`; `model_meta.json` is the generated cut table.\n")
    if runs:
        md.append("## How it was made\n")
        rows = []
        for run in runs:
            argv = " ".join(run.get("argv") or ["(scan() from Python)"])
            versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
            checked = sum((run.get("counts") or {}).values())
            rows.append([f"`{argv}`", run.get("started", "?"), f"{checked} of {run.get('todo', '?')}",
                         f"{run.get('wall_s', '?')}",
                         f"{run.get('jobs')} jobs on {run.get('cpus')} CPUs ({run.get('cpu_model', '?')})",
                         f"{run.get('load_avg_start', '?')} → {run.get('load_avg_end', '?')}",
                         "interrupted" if run.get("interrupted") else "complete"])
        md.append(_table(["command", "started", "models checked", "wall (s)", "machine", "load average", "run"], rows))
        md.append(f"\nVersions: {versions}. Load average is the machine's (1 min) at start and end: other work "
                  "running at the same time slows every timing below.\n")
        whole = [run for run in runs if _whole_zoo(run)]
        if whole:
            md.append("\nWhole-zoo runs, from scratch (the speed target for timm is 15 minutes with 2 jobs on 2 cores):\n\n")
            for run in whole:
                wall = float(run["wall_s"])
                md.append(f"- {run['argv'][run['argv'].index('--zoo') + 1]}: {run['todo']} models in {wall / 60:.1f} min "
                          f"({wall / run['todo']:.2f} s of wall time per model, {run['jobs']} jobs)\n")

    md.append("## Summary\n")
    zoos = sorted({r.get("zoo", "?") for r in recs})
    if zoo_sizes:
        md.append("Scanned: " + "; ".join(f"{zoo} {sum(r.get('zoo') == zoo for r in recs)} of {zoo_sizes[zoo]} names"
                                         for zoo in sorted(zoo_sizes)) + " (`timm.list_models()`, "
                  "`torchvision.models.list_models(module=torchvision.models)`, the model types of transformers' "
                  "image-classification and backbone mappings).\n\n")
    rows = []
    for zoo in zoos + ["all"]:
        sel = [r for r in recs if zoo == "all" or r.get("zoo") == zoo]
        c = Counter(r["status"] for r in sel)
        verified = c["ok"] + c["differs"]
        rows.append([zoo, len(sel), *[c[s] for s in _STATUS_ORDER],
                     f"{100 * verified / len(sel):.1f}%" if sel else "-"])
    md.append(_table(["zoo", "models", *_STATUS_ORDER, "ok or known difference"], rows))
    md.append("\n`ok`: the body returns the oracle's shape; `differs`: a deliberate difference, with its reason; "
              "`mismatch`: both ran and disagree; `failed`: an exception (phase and error below); `timeout`, "
              "`crashed`, `oom`: the model's process was killed, died, or hit the memory limit.\n")
    md.append(_methods_section(recs, zoos))
    md.append(_values_section(recs, zoos))
    md.append(_phase_cost_section(recs, zoos))
    md.append(_pyramid_section(recs, zoos))

    md.append("## Coverage by family\n")
    fam: dict[tuple[str, str], Counter] = defaultdict(Counter)
    pyr: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in recs:
        fam[(r.get("zoo", "?"), r.get("family", "?"))][r["status"]] += 1
        pyr[(r.get("zoo", "?"), r.get("family", "?"))][_pyramid_of(r)] += 1
    rows = []
    for (zoo, family), c in sorted(fam.items()):
        total, p = sum(c.values()), pyr[(zoo, family)]
        stated = p["agree"] + p["differ"]
        rows.append([zoo, family, total, c["ok"], c["differs"], c["mismatch"],
                     sum(c[s] for s in FAILED_STATUSES), "✓" if c["ok"] + c["differs"] == total else "",
                     sum(p[s] for s in _PYRAMID_VERIFIED), f"{p['agree']} of {stated}" if stated else "-"])
    header = ["zoo", "family", "models", "ok", "differs", "mismatch", "failed/timeout/crashed/oom", "all verified",
              "pyramids", "agree with stated levels"]
    md.append(_table(header, rows))

    differs = [r for r in recs if r["status"] == "differs"]
    md.append(f"\n## Known differences ({len(differs)})\n")
    if differs:
        from autocut.scan.oracles import DIFFERS

        for reason in sorted({r.get("reason") for r in differs}):
            names = [r["name"] for r in differs if r.get("reason") == reason]
            md.append(f"- **{reason}** ({len(names)}): {DIFFERS.get(reason, '')}. {', '.join(names)}\n")
    else:
        md.append("None.\n")

    mismatches = [r for r in recs if r["status"] == "mismatch"]
    md.append(f"\n## Mismatches ({len(mismatches)})\n")
    if mismatches:
        md.append(_table(["model", "cut at", "body", "oracle", "reason"],
                         [[r["name"], f"`{r.get('where')}`", r.get("body_shape"), r.get("expected_shape", "-"),
                           r.get("reason", "")] for r in mismatches]))
    else:
        md.append("None.\n")

    failed = [r for r in recs if r["status"] in FAILED_STATUSES]
    md.append(f"\n## Failures by cause ({len(failed)})\n")
    if failed:
        causes: dict[str, list[dict]] = defaultdict(list)
        for r in failed:
            causes[f"[{r['status']}] {cause_of(r)}"].append(r)
        for cause, rs in sorted(causes.items(), key=lambda kv: -len(kv[1])):
            names = [r["name"] for r in rs]
            md.append(f"- **{len(rs)}** × {cause}\n  - e.g. {', '.join(names[:8])}{' …' if len(names) > 8 else ''}\n")
    else:
        md.append("None.\n")

    no_groups = [r for r in recs if r.get("groups_error")]
    if no_groups:
        md.append(f"\n## Layer groups not computed ({len(no_groups)})\n\nThe cut is verified; "
                  "`autocut.layer_groups` failed on the adapted model (meta, then CPU):\n\n")
        md.append(_table(["model", "error"], [[r["name"], r["groups_error"][:300]] for r in no_groups]))
    reduced = [r for r in recs if r.get("reduced_from")]
    if reduced:
        md.append(f"\nVerified at a smaller input than the model's own ({len(reduced)}): only a real forward can probe "
                  "them, and at their own size it ran out of the scan's memory limit.\n\n")
        md.append(_table(["model", "own size", "verified at", "status", "first attempt"],
                         [[r["name"], "x".join(map(str, r["reduced_from"][1:])), "x".join(map(str, r["input_size"][1:])),
                           r["status"], r.get("reduced_because", "")[:160]] for r in reduced]))
    real = [r["name"] for r in recs if r.get("verified_on") == "cpu"]
    if real:
        md.append(f"\nVerified on real CPU tensors (batch 1) because the meta device cannot run them "
                  f"({len(real)}): {', '.join(real)}.\n")

    timed = [r for r in recs if r.get("times", {}).get("total") is not None]
    md.append("\n## Time\n\nSeconds per model, in the model's own process (fork included in `process`), "
              "one CPU thread each:\n\n")
    md.append("| phase | models | median | p90 | p95 | max | total |\n|---|---|---|---|---|---|---|\n")
    for phase in ("build", "oracle", "cut", "verify", "groups", "pyramid", "total"):
        md.append(_distribution_rows(phase, [r["times"][phase] for r in timed if phase in r["times"]]))
    md.append(_distribution_rows("process", [s for r in recs if (s := _seconds(r)) is not None and r["status"] != "timeout"]))
    md.append("\n`build`: the model on the meta device; `oracle`: the oracle's forward; `cut`: "
              "`autocut.adapt(meta_model, n_out=2)` (discovery: trace, shapes, cut, body); `verify`: the body's "
              "forward; `groups`: `autocut.group_summary` on the adapted model; `pyramid`: what the zoo states for its "
              "levels, and `autocut.create_pyramid` built and run.\n")
    slow = sorted(timed, key=lambda r: -r["times"]["total"])[:10]
    md.append("\nSlowest:\n\n" + _table(["model", "params", "total (s)", "cut (s)"],
                                        [[r["name"], _fmt_params(r.get("params")), f"{r['times']['total']:.2f}",
                                          f"{r['times'].get('cut', float('nan')):.2f}"] for r in slow]))

    mem = [r for r in recs if r.get("peak_mb") is not None and r.get("base_mb") is not None and r["status"] != "timeout"]
    md.append("\n## Memory\n\nPeak RSS of the model's process (`ru_maxrss`), and above the warm worker it was "
              "forked from (torch, timm and autocut imported):\n\n")
    md.append("| MB | models | median | p90 | p95 | max |\n|---|---|---|---|---|---|\n")
    md.append(_distribution_rows("peak RSS", [r["peak_mb"] for r in mem], total=False))
    md.append(_distribution_rows("above the worker", [r["peak_mb"] - r["base_mb"] for r in mem], total=False))
    big = sorted(mem, key=lambda r: -(r["peak_mb"] - r["base_mb"]))[:10]
    md.append("\nLargest:\n\n" + _table(["model", "params", "above the worker (MB)", "verified on"],
                                        [[r["name"], _fmt_params(r.get("params")), f"{r['peak_mb'] - r['base_mb']:.0f}",
                                          r.get("verified_on", "-")] for r in big]))
    if plots:
        md.append(f"\n![time against parameters]({TIME_PLOT})\n\n![memory against parameters]({MEMORY_PLOT})\n")

    missing = [r for r in recs if r["status"] != "ok"]
    md.append(f"\n## Every model not `ok` ({len(missing)})\n\n")
    md.append(_table(["model", "status", "reason"],
                     [[r["name"], r["status"], r.get("reason") or cause_of(r)] for r in missing]) if missing else "None.\n")
    md = [m if m.endswith("\n") else m + "\n" for m in md]
    return _tidy("".join(md))


def _whole_zoo(run: dict[str, Any]) -> bool:
    """A complete run over a whole zoo (no --filter, no --retry) that checked every name."""
    argv = run.get("argv") or []
    return ("--zoo" in argv and "--filter" not in argv and "--retry" not in argv and not run.get("interrupted")
            and run.get("todo") == run.get("names") and bool(run.get("todo")) and run.get("wall_s") is not None)


def _tidy(text: str) -> str:
    """A blank line around every heading, and never two in a row."""
    lines: list[str] = []
    for line in text.split("\n"):
        if line.startswith("#"):
            lines += ([""] if lines and lines[-1] else []) + [line, ""]
        elif line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def _plots(records: dict[str, dict[str, Any]], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = [r for r in records.values() if r.get("params") and r.get("times", {}).get("total") is not None]
    colors = {"ok": "tab:green", "differs": "tab:blue", "mismatch": "tab:orange"}
    markers = {"timm": "o", "torchvision": "^"}
    for path, value, label in (
        (out / TIME_PLOT, lambda r: r["times"]["total"], "seconds per model (one thread)"),
        # above the warm worker, at least 1 MB so a log axis shows it
        (out / MEMORY_PLOT, lambda r: max(1.0, r["peak_mb"] - r["base_mb"]) if r.get("peak_mb") and r.get("base_mb") else None,
         "peak RSS above the worker (MB)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for status in sorted({r["status"] for r in recs}):
            for zoo in sorted({r.get("zoo", "?") for r in recs}):
                pts = [(r["params"], v) for r in recs if r["status"] == status and r.get("zoo", "?") == zoo
                       and (v := value(r)) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.scatter(xs, ys, s=12, alpha=0.6, label=f"{zoo} {status} ({len(pts)})",
                               color=colors.get(status, "tab:red"), marker=markers.get(zoo, "s"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.set_title(f"autocut scan: {label} against model size", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return True


_PHASES = ("build", "oracle", "cut", "verify", "values", "groups", "build_cpu")


def _phase_cost_section(recs: list[dict[str, Any]], zoos: list[str]) -> str:
    """Seconds spent in each phase, summed over a zoo's records (and over all, where there are
    several zoos), and what finding the cut costs against building the model and running its
    oracle (the scan-cost target is 1.0 or less)."""
    rows = []
    for zoo in zoos + (["all"] if len(zoos) > 1 else []):
        total = Counter()
        for r in recs:
            if zoo in ("all", r.get("zoo")):
                total.update({k: v for k, v in r.get("times", {}).items() if k in _PHASES})
        base = total["build"] + total["oracle"]
        rows.append([zoo, *[f"{total[p]:.1f}" for p in _PHASES], f"{total['cut'] / base:.2f}" if base else "-"])
    return ("\n## Phase cost\n\nSeconds per phase, summed over each zoo's records (one thread per model; the "
            "records' own runs, see above), and the cut phase against build and oracle together. `build_cpu`: "
            "building a real CPU copy, whichever phase needed it (a cut only a real forward can find, a real "
            "oracle, values); in records of scans that have it, the other phases leave it out:\n\n"
            + _table(["zoo", *_PHASES, "cut / (build + oracle)"], rows))


def _methods_section(recs: list[dict[str, Any]], zoos: list[str]) -> str:
    """How each verified cut was found (``Cut.method``), per zoo: the fx graph, the forward's ATen
    graph (models fx cannot trace), module hooks (models neither captures)."""
    from autocut.cut import METHODS

    rows = []
    for zoo in zoos + ["all"]:
        sel = [r for r in recs if r["status"] in ("ok", "differs") and r.get("method") and zoo in ("all", r.get("zoo"))]
        c = Counter(r["method"] for r in sel)
        rows.append([zoo, len(sel), *[c[m] for m in METHODS]])
    return ("\n## How each cut was found\n\nOf the verified cuts (`ok`, or a known difference that was cut), "
            "the path that found each (`Cut.method`): torch.fx's graph; `export`: the forward's graph of ATen ops, "
            "for models fx cannot trace (one forward recorded on meta or fake tensors, torch.export's where they "
            "cannot run it); module hooks, for models whose forward reads values:\n\n"
            + _table(["zoo", "cuts", *METHODS], rows))


def _values_section(recs: list[dict[str, Any]], zoos: list[str]) -> str:
    """Values (``autocut scan --values``) per zoo: of the verified models, how many were compared
    on real weights and how many agree within the tolerance; each that does not, listed."""
    from autocut.scan.check import VALUES_ATOL, VALUES_RTOL

    ok = [r for r in recs if r["status"] == "ok"]
    rows = []
    for zoo in zoos:
        sel = [r for r in ok if r.get("zoo") == zoo]
        c = Counter(_values_of(r) for r in sel)
        rows.append([zoo, len(sel), c["equal"], c["differ"], c["failed"], c["not compared"]])
    text = [f"\n## Values\n\nThe body's output against the oracle's on the same random input, real CPU weights (the "
            f"model's own seeded random init), batch 2 at the size checked; equal means `torch.allclose(rtol={VALUES_RTOL:g}, "
            f"atol={VALUES_ATOL:g})` (`autocut scan --values`).\n\n",
            _table(["zoo", "verified", "values equal", "differ", "could not compare", "not compared yet"], rows)]
    carried = Counter(r.get("zoo") for r in ok if r.get("values_from"))
    if carried:  # a later scan without --values found the same cut: the earlier comparison stands for it
        text.append("\nValues carried from an earlier `--values` run to a later record whose cut is the same (where, "
                    "nf, layout, feature shape, stride, prefix tokens, input size and groups identical; "
                    "`values_from` gives when they were compared): "
                    + ", ".join(f"{zoo} {n}" for zoo, n in sorted(carried.items())) + ".\n")
    from autocut.scan.oracles import VALUE_DIFFERENCES

    bad = [r for r in ok if _values_of(r) in ("differ", "failed")]
    if bad:
        text.append("\n" + _table(["model", "values", "largest difference", "oracle's largest value", "why"],
                                   [[r["name"], _values_of(r), f"{r.get('values_max_diff') or 0:.3g}",
                                     f"{r.get('values_scale') or 0:.3g}",
                                     VALUE_DIFFERENCES.get(r["name"], _values_error(r)[:200] or "not explained")]
                                    for r in bad]))
    return "".join(text)


def _values_of(rec: dict[str, Any]) -> str:
    """``equal``, ``differ``, ``failed`` (a re-check that died counts) or ``not compared``."""
    return rec.get("values", "failed" if rec.get("recheck_failed") else "not compared")


def _values_error(rec: dict[str, Any]) -> str:
    return rec.get("values_error") or rec.get("recheck_failed") or ""


def _pyramid_of(rec: dict[str, Any]) -> str:
    """The record's ``pyramid_check`` (see :func:`autocut.scan.pyramids.check_pyramid`); ``failed``
    where a re-check for it died; ``not checked`` in records of an autocut without pyramids."""
    return rec.get("pyramid_check", "failed" if rec.get("recheck_failed") else "not checked")


def _pyramid_section(recs: list[dict[str, Any]], zoos: list[str]) -> str:
    """Feature pyramids per zoo (``autocut.create_pyramid``, run on the model; see
    :mod:`autocut.scan.pyramids`): how many agree with the levels the zoo states, every
    difference with its explanation, every refusal with its reason."""
    from autocut.scan.pyramids import pyramid_explained

    rows = []
    for zoo in zoos:
        sel = [r for r in recs if r.get("zoo") == zoo]
        c = Counter(_pyramid_of(r) for r in sel)
        nchw = sum(1 for r in sel if r.get("pyramid_check") in _PYRAMID_VERIFIED)
        rows.append([zoo, len(sel), nchw, *[c[s] for s in _PYRAMID_ORDER]])
    text = ["\n## Feature pyramids\n\nEach model's `autocut.create_pyramid` built and run (meta tensors, else a real "
            "CPU copy): `pyramid` counts those whose every map is NCHW and the shape its level says. Checked against "
            "what the zoo's own code states (`autocut/scan/pyramids.py`): the maps timm's `features_only` module "
            "returns (strides and channels of each level, the last per stride, and where both are the deepest, "
            "autocut's being the cut by design, the stride only),"
            "torchvision's detection and segmentation backbones (ResNets' `layer1..layer4`, "
            "MobileNets' `mobilenet_backbone` stages, SSD's VGG stages), Hugging Face's `AutoBackbone` for the "
            "model's config (every stage it names). `no oracle`: the zoo states no levels for it "
            "(timm raises for `features_only`, torchvision builds no detection backbone from it, transformers has "
            "no backbone for the model type); `refused`: a "
            "`CutError` with its reason.\n\n",
            _table(["zoo", "models", "pyramid", *_PYRAMID_ORDER], rows)]
    noted = [r for r in recs if r.get("pyramid_oracle_note")]
    if noted:
        text.append(f"\ntimm's `feature_info` states channels or reductions its own `features_only` module does not "
                    f"return ({len(noted)}; checked against what the module returns, on meta tensors): "
                    + "; ".join(f"{r['name']} ({r['pyramid_oracle_note'].removeprefix('feature_info states ')})"
                                for r in noted) + ".\n")
    differ = [r for r in recs if r.get("pyramid_check") == "differ"]
    if differ:
        text.append(f"\n### Differences from the stated levels ({len(differ)})\n\n")
        by_why: dict[str, list[dict]] = defaultdict(list)
        for r in differ:
            by_why[pyramid_explained(r["name"]) or "not explained"].append(r)
        for why, rs in sorted(by_why.items(), key=lambda kv: (kv[0] == "not explained", -len(kv[1]))):
            text.append(f"- **{why}** ({len(rs)})\n")
            for r in rs:
                text.append(f"  - {r['name']}: {'; '.join(r.get('pyramid_diff', []))}\n")
    refused = [r for r in recs if _pyramid_of(r) in ("refused", "mismatch", "failed")]
    if refused:
        text.append(f"\n### No pyramid ({len(refused)})\n\n")
        causes: dict[str, list[str]] = defaultdict(list)
        for r in refused:
            why = r.get("pyramid_error") or "; ".join(r.get("pyramid_diff", [])) or r.get("recheck_failed", "")
            why = re.sub(rf"(?<![\w.:-]){re.escape(r['name'])}(?![\w.:-])", "…", why)  # the model's own name
            why = re.sub(r"^(no cut: )?\w+(?= was cut by )", r"\1…", why)  # or its class's
            causes[f"[{_pyramid_of(r)}] {_blanked(why)}"].append(r["name"])
        for cause, names in sorted(causes.items(), key=lambda kv: -len(kv[1])):
            text.append(f"- **{len(names)}** × {cause}\n  - {', '.join(names)}\n")
    return "".join(text)


def _zoo_sizes(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    from autocut import zoo

    sizes = {}
    for rec in records.values():
        if rec.get("zoo") == "timm" and "timm" not in sizes:
            sizes["timm"] = len(zoo.timm_names())
        elif rec.get("zoo") == "torchvision" and "torchvision" not in sizes:
            sizes["torchvision"] = len(zoo.torchvision_names())
        elif rec.get("zoo") == "transformers" and "transformers" not in sizes:
            sizes["transformers"] = len(zoo.transformers_names())
    return sizes


def write_report(out: str | os.PathLike) -> list[Path]:
    """Write ``model_meta.json``, ``report.md`` and the plots into ``out`` from its
    ``results.jsonl``; the paths written.

    Raises:
        ValueError: ``out`` is a file or no folder.
    """
    out = output_folder(out)
    records = load_results(out)
    written = [out / MODEL_META, out / REPORT]
    meta = model_meta(records)  # one line per model: readable, and diffs well
    lines = [f"  {json.dumps(name)}: {json.dumps(entry, sort_keys=True)}" for name, entry in meta.items()]
    (out / MODEL_META).write_text("{\n" + ",\n".join(lines) + ("\n" if lines else "") + "}\n")
    plots = _plots(records, out)
    if plots:
        written += [out / TIME_PLOT, out / MEMORY_PLOT]
    (out / REPORT).write_text(render_report(records, _runs(out), plots=plots, zoo_sizes=_zoo_sizes(records)))
    return written
