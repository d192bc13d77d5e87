#!/usr/bin/env bash
# One bench, two trees, one machine: an A/B of a code change where machines differ more than the change.
#
#   bench/ab_trees.sh prepare REV              # here: REV's code into .ab/REV (git-excluded), to carry
#   bench/ab_trees.sh run REV BENCH [ARGS...]  # on the GPU machine: BENCH ARGS in .ab/REV, then in this tree
#
# REV: a short sha (it names the folder and the files). `run` writes $OUT/ab_REV.json and $OUT/ab_head.json
# (BENCH must take --json) and their logs, with ${PYTHON:-python3}, each run under
# its own tree's PYTHONPATH (plus /tmp/site, where carried wheels install). The old tree runs first so that a
# warm-up advantage, if any, goes to the old code. Why: on the lent H200s the same A14B step measured 7.77 s
# on one machine and 8.04 s on another (the bf16 matmul rate 817.7 vs 786.5 TFLOP/s), more than most levers
# move it (docs/benchmarks.md, sixth 2026-12-04 session).
#
# Example (carry: [".whl", ".ab"]):
#   bench/ab_trees.sh run 9259457 bench/train_step.py --preset t2v-A14B --size 480x832 --frames 81 \
#       --impl ours --compile --save-attention all --fp8 matmul_dgrad --attention cudnn_fp8 --warmup 1 --steps 2
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:?prepare or run}; rev=${2:?a git revision}; shift 2
case "$mode" in
  prepare)
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.ab/' "$exclude" 2>/dev/null || echo '/.ab/' >> "$exclude"
    rm -rf ".ab/$rev" && mkdir -p ".ab/$rev"
    git archive "$rev" wan_model train bench data | tar -x -C ".ab/$rev"
    echo "prepared .ab/$rev ($(du -sh ".ab/$rev" | cut -f1)); carry \".ab\""
    ;;
  run)
    bench=${1:?a bench script}; shift
    out=$(cd "${OUT:-.}" && pwd)
    [ -d ".ab/$rev" ] || { echo "ab_trees: .ab/$rev missing: run 'bench/ab_trees.sh prepare $rev' and carry .ab" >&2; exit 2; }
    (cd ".ab/$rev" && PYTHONPATH=/tmp/site:$PWD "${PYTHON:-python3}" "$bench" "$@" --json "$out/ab_$rev.json") \
      > "$out/ab_$rev.log" 2>&1
    echo "$rev: rc=$? $(grep -m1 -o '"s_per_step": [0-9.]*' "$out/ab_$rev.log" || true)"
    PYTHONPATH=/tmp/site:$PWD "${PYTHON:-python3}" "$bench" "$@" --json "$out/ab_head.json" > "$out/ab_head.log" 2>&1
    echo "head: rc=$? $(grep -m1 -o '"s_per_step": [0-9.]*' "$out/ab_head.log" || true)"
    ;;
  *) echo "ab_trees: mode is prepare or run, got $mode" >&2; exit 2 ;;
esac
