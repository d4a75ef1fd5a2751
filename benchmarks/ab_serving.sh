#!/usr/bin/env bash
# A/B of benchmarks/serving.py between older commits and the working tree, the sides alternated in one device call
# (the H200's run-to-run spread is large: one run of each side says little). Several old commits bisect a change.
#   here:        bash benchmarks/ab_serving.sh prepare COMMIT [COMMIT...]   # writes ab_old/ (git-ignored: carry it)
#   the device:  bash benchmarks/ab_serving.sh run [REPS] [serving.py args...]   (run with carry ["ab_old"])
# Prints each run's offline row and step-trace groups, then a table of all runs (ab_summary.py); each run's JSON
# goes under $OUT/<side><i>/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    shift
    [ $# -ge 1 ] || { echo "prepare needs at least one commit" >&2; exit 2; }
    rm -rf ab_old && mkdir ab_old
    for c in "$@"; do
        sha=$(git rev-parse --short=7 "$c")
        mkdir "ab_old/$sha"
        git archive "$c" cpm4 'benchmarks/*.py' | tar -x -C "ab_old/$sha"  # every benchmark script, not the results
        echo "$sha" >> ab_old/SIDES
    done
    echo "ab_old/ holds $(tr '\n' ' ' < ab_old/SIDES)"
    ;;
run)
    reps=${2:-2}
    shift $(( $# < 2 ? $# : 2 ))
    [ -f ab_old/SIDES ] || { echo "ab_old/ missing: run 'prepare COMMIT' here and carry ab_old" >&2; exit 2; }
    echo "old = $(tr '\n' ' ' < ab_old/SIDES), new = the working tree"
    for i in $(seq "$reps"); do
        for side in $(cat ab_old/SIDES) new; do
            s=benchmarks/serving.py
            [ "$side" = new ] || s=ab_old/$side/benchmarks/serving.py
            # serving.py puts its parent directory first on sys.path: each side imports its own cpm4.
            timeout 300 python3 "$s" --config minicpm4-0.5b --trace --skip server --out "${OUT:-/tmp}/$side$i" "$@" \
                2>&1 | grep -E "^  (prefill|decode)|^offline" | sed "s/^/$side$i /"
        done
    done
    python3 benchmarks/ab_summary.py "${OUT:-/tmp}" || true  # the runs side by side
    ;;
*)
    echo "usage: $0 prepare COMMIT [COMMIT...] | run [REPS] [serving.py args...]" >&2
    exit 2
    ;;
esac
