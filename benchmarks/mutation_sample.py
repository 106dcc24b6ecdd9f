"""Draw a seeded random sample of the mutants a mutmut run has not checked yet.

A full run of the core takes a day on 2 cores: a surviving mutant runs every test that reaches its
function (up to ~170 s of tests for the discovery functions), and about one mutant in five survives
until a test is written for it. A simple random sample of the mutants still unchecked estimates the
score over all of them (mutation_report.py gives its 95% interval); each sampled result is a real
result that a later full or continued run keeps. The sample drawn is appended to
``mutants/sample.txt`` (the report scores it on its own), and printed, one name per line, after
the members of earlier samples still unchecked (a run stopped before its end): those come first
and count towards ``--size``.

    python benchmarks/mutation_sample.py --size 300 --seed 1 > names.txt
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unchecked(mutants: Path) -> list[str]:
    """Every mutant of the last generation with no result yet, in a stable order."""
    names = []
    for meta in sorted(mutants.rglob("*.py.meta")):
        names += sorted(k for k, code in json.loads(meta.read_text())["exit_code_by_key"].items() if code is None)
    return names


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    p.add_argument("--size", type=int, required=True, help="how many mutants to draw (all, when fewer are left)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size < 1:
        p.error(f"--size must be at least 1, got {args.size}")
    if not any(args.mutants.rglob("*.py.meta")):
        p.error(f"no mutants under {args.mutants}: generate them first (mutmut run)")
    left = unchecked(args.mutants)
    earlier = args.mutants / "sample.txt"
    sampled = set(earlier.read_text().split()) if earlier.exists() else set()
    pending = [name for name in left if name in sampled]
    rest = [name for name in left if name not in sampled]
    drawn = sorted(random.Random(args.seed).sample(rest, min(max(args.size - len(pending), 0), len(rest))))
    with open(earlier, "a") as f:
        f.writelines(f"{name}\n" for name in drawn)
    print("\n".join([*pending, *drawn]))


if __name__ == "__main__":
    main()
