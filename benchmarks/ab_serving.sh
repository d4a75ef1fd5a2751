#!/usr/bin/env bash
# A/B of benchmarks/serving.py between an older commit and the working tree, the two sides alternated in one
# device call (the H200's run-to-run spread is large: one run of each side says little).
#   here:        bash benchmarks/ab_serving.sh prepare COMMIT    # writes ab_old/ (git-ignored: carry it)
#   the device:  bash benchmarks/ab_serving.sh run [REPS] [serving.py args...]   (run with carry ["ab_old"])
# Prints each run's offline row and step-trace groups; each run's JSON goes under $OUT/<side><i>/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    rm -rf ab_old && mkdir ab_old
    git archive "$2" cpm4 'benchmarks/*.py' | tar -x -C ab_old  # every benchmark script, not the results
    git rev-parse "$2" > ab_old/COMMIT
    echo "ab_old/ holds $(cat ab_old/COMMIT)"
    ;;
run)
    reps=${2:-2}
    shift $(( $# < 2 ? $# : 2 ))
    [ -d ab_old ] || { echo "ab_old/ missing: run 'prepare COMMIT' here and carry ab_old" >&2; exit 2; }
    echo "old = $(cat ab_old/COMMIT)"
    for i in $(seq "$reps"); do
        for side in old new; do
            s=benchmarks/serving.py
            [ "$side" = old ] && s=ab_old/benchmarks/serving.py
            # serving.py puts its parent directory first on sys.path: each side imports its own cpm4.
            timeout 300 python3 "$s" --config minicpm4-0.5b --trace --skip server --out "${OUT:-/tmp}/$side$i" "$@" \
                2>&1 | grep -E "^  (prefill|decode)|^offline" | sed "s/^/$side$i /"
        done
    done
    ;;
*)
    echo "usage: $0 prepare COMMIT | run [REPS] [serving.py args...]" >&2
    exit 2
    ;;
esac
