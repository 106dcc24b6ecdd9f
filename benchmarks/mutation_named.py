"""The behaviour changes the suite was once blind to (issue 20), applied one at a time to the source,
each against the tests that must now catch it.

Each is a realistic one-line bug in what users depend on: exact values, which group gets which
rate, where a parameter lands, the init on every path, the scan's comparison. The source file is
restored after each, whatever happens. Writes a JSON list of ``{name, file, killed, tests}``.

    python benchmarks/mutation_named.py --out mutants/named.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (what the bug does, file, the line as it is, the line as the bug has it, the tests that must fail)
NAMED = [
    ("SigmoidRange computes sigmoid(x) * high + low", "autocut/layers.py",
     "return torch.sigmoid(x) * (self.high - self.low) + self.low", "return torch.sigmoid(x) * self.high + self.low",
     "tests/test_head.py"),
    ("apply_init no longer zeroes biases", "autocut/adapt.py",
     "                bias.zero_()", "                pass",
     "tests/test_adapt.py"),
    ("the init is not applied to a custom head", "autocut/adapt.py",
     "    apply_init(head, init)", "    apply_init(head, init) if custom_head is None else None",
     "tests/test_adapt.py"),
    ("a slice of learning rates spreads in reverse", "autocut/optim.py",
     "        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]",
     "        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)][::-1]",
     "tests/test_optim.py"),
    ("layer_decay reversed", "autocut/optim.py",
     "layer_decay ** (len(gs) - 1 - i)", "layer_decay ** i",
     "tests/test_optim.py"),
    ("loose parameters go to the last group", "autocut/groups.py",
     '        units.insert(0, Unit("(embeddings)"', '        units.insert(len(units), Unit("(embeddings)"',
     "tests/test_groups.py"),
    ("the scan's shape comparison ignores the batch dimension", "autocut/scan/check.py",
     "    if tuple(got) == tuple(expected):", "    if tuple(got)[1:] == tuple(expected)[1:]:",
     "tests/test_scan.py"),
]


def run(name: str, file: str, old: str, new: str, tests: str) -> dict:
    path = ROOT / file
    source = path.read_text()
    if source.count(old) != 1:
        return {"name": name, "file": file, "killed": None, "tests": tests, "error": f"{old.strip()!r} not found once"}
    path.write_text(source.replace(old, new))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(source)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"name": name, "file": file, "killed": done.returncode != 0, "tests": tests, "summary": last}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    results = []
    for entry in NAMED:
        result = run(*entry)
        print(f"{'KILLED  ' if result['killed'] else 'SURVIVED'} {result['name']} ({result.get('summary', result.get('error'))})",
              flush=True)
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["killed"] for r in results) else 1)


if __name__ == "__main__":
    main()
