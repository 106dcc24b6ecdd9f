"""Write the mutation-testing report from the last ``mutmut run`` (``mutants/``).

Every mutant's status comes from mutmut's own records (``mutants/**/*.py.meta``); each survivor's
reason comes from ``benchmarks/mutation_survivors.toml``, keyed by mutant name and checked against
the mutated line, so a reason left over from other code shows as stale rather than silently
applying. The score counts a timeout as a kill (the mutant made a test hang, which a test run
notices) and leaves equivalent mutants out. Mutants not checked yet are counted apart; the seeded
random sample (``mutants/sample.txt``, drawn by mutation_sample.py) is also scored on its own, with
its 95% Wilson interval: an estimate of the score over every mutant of the core.

    python benchmarks/mutation_report.py --out benchmarks/reports/mutation.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
from collections import Counter, defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SURVIVORS = ROOT / "benchmarks" / "mutation_survivors.toml"
TARGET = 0.90

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "type check", None: "not checked"}
KINDS = {
    "equivalent": "no input can tell it from the original: left out of the score",
    "gpu": "runs only on a CUDA device (kernel dispatch): counts as not killed until a GPU run",
    "gap": "a behaviour no test pins yet: counts as not killed",
}


def load_statuses(mutants: Path) -> dict[str, tuple[str, str]]:
    """mutant name -> (source file, status)."""
    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        source = str(meta.relative_to(mutants))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = (source, STATUS.get(code, "suspicious"))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def pct(ratio: float) -> str:
    return "-" if math.isnan(ratio) else f"{100 * ratio:.1f}%"


def mutated_line(name: str) -> tuple[str, str]:
    """The first removed and added lines of the mutant's diff (mutmut's own diff)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name)
    removed = next((line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")), "")
    added = next((line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")), "")
    return removed, added


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import os

    os.chdir(ROOT)  # mutmut reads mutants/ relative to the working directory
    statuses = load_statuses(args.mutants)
    entries = tomllib.loads(SURVIVORS.read_text()).get("survivor", []) if SURVIVORS.exists() else []
    reasons = {}
    for entry in entries:  # one mutant (`mutant`, with its `line`) or several sharing a reason (`mutants`)
        for name in entry.get("mutants", [entry.get("mutant")]):
            reasons[f"autocut.{name}" if not name.startswith("autocut.") else name] = entry

    by_file: dict[str, Counter] = defaultdict(Counter)
    rows = []
    for name, (source, status) in sorted(statuses.items()):
        kind = None
        if status in ("survived", "no tests", "suspicious"):
            removed, added = mutated_line(name)
            reason = reasons.get(name)
            if reason is None:
                kind, text = "unexplained", "no reason recorded"
            elif "line" in reason and reason["line"] != added:
                kind, text = "unexplained", f"stale reason (recorded for `{reason['line']}`): {reason['reason']}"
            else:
                kind, text = reason["kind"], reason["reason"]
            rows.append((source, name, status, kind, removed, added, text))
        by_file[source][status] += 1
        by_file[source][f"kind:{kind}"] += 1 if kind else 0

    def score(c: Counter) -> tuple[int, int, float]:
        caught = c["killed"] + c["timeout"]
        counted = sum(v for k, v in c.items() if not k.startswith("kind:")) - c["kind:equivalent"] - c["not checked"]
        return caught, counted, caught / counted if counted else math.nan

    total = sum(by_file.values(), Counter())
    caught, counted, ratio = score(total)
    sample_path = args.mutants / "sample.txt"
    sampled = set(sample_path.read_text().split()) if sample_path.exists() else set()
    kinds = {r[1]: r[3] for r in rows}
    in_sample = Counter()
    for name in sampled & statuses.keys():
        in_sample[statuses[name][1]] += 1
        in_sample[f"kind:{kinds.get(name)}"] += 1
    s_caught, s_counted, s_ratio = score(in_sample)
    checked = sum(v for k, v in total.items() if not k.startswith("kind:")) - total["not checked"]
    named_path = args.mutants / "named.json"
    named = json.loads(named_path.read_text()) if named_path.exists() else []
    wall = args.mutants / "wall_seconds"
    import mutmut

    md = ["# Mutation testing of the core", "",
          f"Generated by `bash benchmarks/mutation.sh` (mutmut {mutmut.__version__ if hasattr(mutmut, '__version__') else ''}, "
          f"python {platform.python_version()}) on {dt.date.today().isoformat()}"
          + (f"; the mutmut run took {int(wall.read_text()) / 3600:.1f} h" if wall.exists() else "") + ".",
          "",
          "Each mutant is one small change to one function of the core (an operator, a constant, a string, an "
          "argument dropped...), run against the tests that reach that function. **Killed** means a test failed; "
          "a timeout counts as killed. Survivors are listed below with why each survives.",
          "",
          f"**Score: {caught} of {counted} non-equivalent mutants checked killed ({pct(ratio)}; "
          f"target {100 * TARGET:.0f}%).** "
          f"{total['kind:equivalent']} equivalent mutants are left out; {checked} of "
          f"{checked + total['not checked']} mutants are checked.",
          ""]
    if sampled and s_counted:
        lo, hi = wilson(s_caught, s_counted)
        md += [f"**Random sample: {s_caught} of {s_counted} non-equivalent mutants killed ({100 * s_ratio:.1f}%; 95% interval "
               f"{100 * lo:.1f}-{100 * hi:.1f}%)**, a seeded simple random sample of {len(sampled)} mutants drawn from "
               f"those not checked before it (`benchmarks/mutation_sample.py`), {in_sample['not checked']} of them "
               "not checked yet (mutmut runs the cheapest first: those left are the ones the most tests reach): "
               "the estimate of the score over every mutant. The other checked mutants were run cheapest first, so "
               "their share is not an estimate.", ""]
    md += [
          "| module | mutants | killed | timeout | survived | no tests | equivalent | not checked | score |",
          "|---|---|---|---|---|---|---|---|---|"]
    for source, c in sorted(by_file.items()):
        k, n, r = score(c)
        md.append(f"| `{source}` | {sum(v for key, v in c.items() if not key.startswith('kind:'))} | {c['killed']} | "
                  f"{c['timeout']} | {c['survived']} | {c['no tests']} | {c['kind:equivalent']} | {c['not checked']} | "
                  f"{pct(r)} |")
    n_all = sum(v for key, v in total.items() if not key.startswith("kind:"))
    md.append(f"| **all** | {n_all} | {total['killed']} | {total['timeout']} | {total['survived']} | {total['no tests']} | "
              f"{total['kind:equivalent']} | {total['not checked']} | {pct(ratio)} |")
    if named:
        md += ["", "## Named behaviour changes (issue 20)", "",
               "Realistic bugs the suite once missed, each applied alone (`benchmarks/mutation_named.py`):", "",
               "| change | file | caught | by |", "|---|---|---|---|"]
        md += [f"| {r['name']} | `{r['file']}` | {'yes' if r['killed'] else 'NO'} | `{r['tests']}` |" for r in named]
    md += ["", "## Survivors", "", "Kinds: " + "; ".join(f"**{k}**: {v}" for k, v in KINDS.items()) + ".", ""]
    counts = Counter(r[3] for r in rows)
    md.append(", ".join(f"{counts[k]} {k}" for k in [*KINDS, "unexplained"] if counts[k]) + ".")
    current = None
    for source, name, status, kind, removed, added, text in rows:
        if source != current:
            md += ["", f"### `{source}`", ""]
            current = source
        short = name.rsplit(".", 1)[-1]
        md.append(f"- `{short}` ({status}, **{kind}**): `{removed}` → `{added}`. {text}")
    unused = sorted(n for n in reasons if statuses.get(n, ("", "gone"))[1] not in ("survived", "no tests", "suspicious"))
    if unused:
        md += ["", "## Reasons no longer needed", "",
               "These mutants have a recorded reason but are killed now or gone: the reasons can go.", ""]
        md += [f"- `{n}`: {statuses.get(n, ('', 'gone'))[1]}" for n in unused]
    args.out.write_text("\n".join(md) + "\n")
    print(f"{caught} of {counted} killed ({100 * ratio:.1f}%); sample {s_caught} of {s_counted}; "
          f"{counts['unexplained']} survivors unexplained")


if __name__ == "__main__":
    main()
