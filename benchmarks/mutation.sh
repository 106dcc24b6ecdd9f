#!/usr/bin/env bash
# Mutation testing of autocut's core: does the suite notice a realistic one-line bug?
#
#   bash benchmarks/mutation.sh                    # fresh: a seeded random sample of 300 mutants, then the report
#   SAMPLE=500 SEED=2 bash benchmarks/mutation.sh --continue
#                                                  # another sample among the mutants not checked yet, results kept
#   bash benchmarks/mutation.sh --all [--continue] # every mutant
#   bash benchmarks/mutation.sh --report           # the report only, from the last run's mutants/
#
# 1. mutmut (pyproject.toml's [tool.mutmut]: the core modules, the tests) mutates each function of
#    the core (about 6,200 mutants) and runs, for each mutant, only the tests that reached that
#    function when the suite ran once under mutmut's trampolines; fastest tests first, stopping at
#    the first failure.
# 2. benchmarks/mutation_named.py applies the realistic behaviour changes the suite was once
#    blind to (issue 20), one at a time, and runs the tests that must catch each.
# 3. benchmarks/mutation_report.py writes benchmarks/reports/mutation.md: mutants, killed,
#    survivors, each survivor with its reason from benchmarks/mutation_survivors.toml; the score of
#    the random sample alone, with its 95% interval, estimates the score over every mutant.
#
# Time on 2 cores: a sample of 300 takes about an hour (setup ~10 minutes: the suite runs once to
# learn which tests reach which function); every mutant takes about a day, because a surviving
# mutant of the discovery functions runs ~280 tests (~170 s). Not in CI. JOBS sets mutmut's
# parallel children (default: the CPU count).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-$(nproc)}"
SAMPLE="${SAMPLE:-300}"
SEED="${SEED:-$(date +%s)}"
REPORT=benchmarks/reports/mutation.md
all=0 keep=0 report_only=0
for arg in "$@"; do
    case "$arg" in
        --all) all=1 ;;
        --continue) keep=1 ;;
        --report) report_only=1 ;;
        *) echo "mutation.sh: unknown option $arg (expected --all, --continue or --report)" >&2; exit 2 ;;
    esac
done
mkdir -p benchmarks/reports
# the kernel tests run in this process only with Triton's interpreter on from the start (they
# cover the kernel dispatch in autocut/layers.py); CPU tensors still take PyTorch's ops
export TRITON_INTERPRET=1
if [ "$report_only" = 0 ]; then
    start=$SECONDS
    if [ "$keep" = 0 ]; then
        rm -rf mutants  # mutmut keeps results by function hash; a fresh run is one run
    fi
    if [ "$all" = 1 ]; then
        mutmut run --max-children "$JOBS"
    else
        # mutmut generates the mutants and learns which tests reach each function before it
        # looks for the names asked for: a name no mutant has stops it right after
        mkdir -p mutants
        if ! mutmut run "autocut.no_such_function__mutmut_0" > mutants/generate.log 2>&1; then
            grep -q "nothing matches" mutants/generate.log || { cat mutants/generate.log; exit 1; }
        fi
        echo "sampling $SAMPLE mutants (seed $SEED)"
        python benchmarks/mutation_sample.py --size "$SAMPLE" --seed "$SEED" > mutants/drawn.txt
        # shellcheck disable=SC2046
        mutmut run --max-children "$JOBS" $(cat mutants/drawn.txt)
    fi
    echo $(( $(cat mutants/wall_seconds 2>/dev/null || echo 0) + SECONDS - start )) > mutants/wall_seconds
fi
named=0
python benchmarks/mutation_named.py --out mutants/named.json || named=$?
python benchmarks/mutation_report.py --out "$REPORT"
echo "wrote $REPORT"
exit "$named"  # non-zero when a named behaviour change went unnoticed
