#!/usr/bin/env bash
# Mutation testing of autocut's core: does the suite notice a realistic one-line bug?
#
#   bash benchmarks/mutation.sh            # a fresh run: every mutant, then the report
#   bash benchmarks/mutation.sh --report   # the report only, from the last run's mutants/
#
# 1. mutmut (pyproject.toml's [tool.mutmut]: the core modules, the tests) mutates each function of
#    the core and runs, for each mutant, only the tests that reached that function when the suite
#    ran once under mutmut's trampolines; fastest tests first, stopping at the first failure.
# 2. benchmarks/mutation_named.py applies the realistic behaviour changes the suite was once
#    blind to (issue 20), one at a time, and runs the tests that must catch each.
# 3. benchmarks/mutation_report.py writes benchmarks/reports/mutation.md: mutants, killed,
#    survivors, each survivor with its reason from benchmarks/mutation_survivors.toml.
#
# Time: about 2-3 hours with 2 jobs on 2 cores (the report says how long the run took). Not in
# CI. JOBS sets mutmut's parallel children (default: the CPU count).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-$(nproc)}"
REPORT=benchmarks/reports/mutation.md
mkdir -p benchmarks/reports
if [ "${1:-}" != "--report" ]; then
    start=$SECONDS
    rm -rf mutants  # mutmut keeps results by function hash; a fresh run is one run
    # the kernel tests run in this process only with Triton's interpreter on from the start (they
    # cover the kernel dispatch in autocut/layers.py); CPU tensors still take PyTorch's ops
    TRITON_INTERPRET=1 mutmut run --max-children "$JOBS"
    echo $((SECONDS - start)) > mutants/wall_seconds
fi
named=0
python benchmarks/mutation_named.py --out mutants/named.json || named=$?
python benchmarks/mutation_report.py --out "$REPORT"
echo "wrote $REPORT"
exit "$named"  # non-zero when a named behaviour change went unnoticed
