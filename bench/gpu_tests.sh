#!/usr/bin/env bash
# Every GPU-marked test in one run, logged for the commit it tested.
#
#   bench/gpu_tests.sh [COMMIT_SHA] [--part K/N] [pytest args...]
#
# Run on a CUDA machine from the repository root, on a clean checkout of COMMIT_SHA (default: git's HEAD;
# pass it when the tree travels without .git, as to the lent GPU machine). Writes docs/bench/gpu_tests.log
# (first line `commit: <sha>`), written to $OUT too as it goes when that is set. Exit status: pytest's.
#
# --part K/N runs every N-th GPU test from the K-th on (collection order), so N calls of a time-limited
# machine run the whole suite (41 tests took about 680 s of pytest on an H200 at 2012313, past one 600-s
# call). Part 1 starts the log; part K > 1 appends to docs/bench/gpu_tests.log, which must already name the
# same commit on its first line: put the log that part 1 sent back in place before the next call.
#
# The GPU image lacks some of the test suite's packages (diffusers, decord, ftfy). If they do not import,
# wheels in .whl/ are installed to /tmp/site first; fetch them on a machine with pip, in the repo root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 -d .whl \
#     diffusers==0.42.1 decord==0.6.0 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata lazy-importer
set -uo pipefail
cd "$(dirname "$0")/.."
# The commit: the first argument when it is a hex sha; else BENCH_COMMIT; else git's HEAD, marked "+modified"
# when tracked files outside docs/bench differ from it (the device machine's copy carries an older .git).
if [[ "${1:-}" =~ ^[0-9a-f]{7,40}$ ]]; then
  sha=$1; shift
elif [ -n "${BENCH_COMMIT:-}" ]; then
  sha=$BENCH_COMMIT
else
  sha=$(git rev-parse --verify -q HEAD 2>/dev/null) || sha=unknown
  if [ "$sha" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no -- . ':!docs/bench' 2>&1)" ]; then
    sha="$sha+modified"
  fi
fi
part=""
if [ "${1:-}" = "--part" ]; then
  part=${2:-}; shift 2 || shift
  if ! [[ "$part" =~ ^([1-9][0-9]*)/([1-9][0-9]*)$ ]] || [ "${BASH_REMATCH[1]}" -gt "${BASH_REMATCH[2]}" ]; then
    echo "gpu_tests: --part takes K/N with 1 <= K <= N, got '$part'" >&2
    exit 2
  fi
fi
PY=${PYTHON:-python3}

if ! "$PY" -c 'import diffusers, decord, ftfy' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_tests: diffusers, decord or ftfy missing and no .whl/ folder; see this script's header" >&2
    exit 2
  fi
fi

log=docs/bench/gpu_tests.log
mkdir -p docs/bench
selection=(tests)
if [ -n "$part" ]; then
  k=${part%/*} n=${part#*/}
  # Collection order is the files' and the tests' order, so each part is the same on every machine. The
  # verbosity is pinned (one -q lists node ids); a file that fails to import stops the run here, as it would
  # stop pytest's own run, rather than leaving its tests out of every part.
  collected=$("$PY" -m pytest -m gpu tests --collect-only -o addopts="" -q -p no:cacheprovider 2>&1)
  status=$?
  if [ $status -ne 0 ] && [ $status -ne 5 ]; then
    echo "$collected" >&2
    echo "gpu_tests: collecting the GPU tests failed (pytest exit $status); nothing run" >&2
    exit 2
  fi
  mapfile -t ids < <(grep '::' <<< "$collected")
  selection=()
  for i in "${!ids[@]}"; do
    if (( i % n == k - 1 )); then selection+=("${ids[$i]}"); fi
  done
  if [ ${#selection[@]} -eq 0 ]; then
    echo "gpu_tests: part $part holds no test (${#ids[@]} GPU tests collected)" >&2
    exit 2
  fi
fi
if [ -n "$part" ] && [ "$k" -gt 1 ]; then
  if [ "$(head -1 "$log" 2>/dev/null)" != "commit: $sha" ]; then
    echo "gpu_tests: part $part appends to $log, whose first line is not 'commit: $sha'; put part 1's log there" >&2
    exit 2
  fi
else
  echo "commit: $sha" > "$log"
fi
{
  [ -n "$part" ] && echo "===== part $part: ${#selection[@]} of ${#ids[@]} GPU tests ====="
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)' 2>&1
  what=tests
  [ -n "$part" ] && what="<part $part of the collected ids>"
  echo "command: $PY -m pytest -m gpu $what -vv -p no:cacheprovider -p no:logging -rA --durations=15 $*"
} >> "$log"
# -vv names each test as it finishes (pyproject's addopts has -q, which one -v only cancels), and the log
# streams into $OUT as well: a run cut by a time limit still records which tests passed (two were cut and
# only their dots survived).
copies=("$log")
if [ -n "${OUT:-}" ]; then cp "$log" "$OUT/"; copies+=("$OUT/$(basename "$log")"); fi
PYTHONUNBUFFERED=1 "$PY" -m pytest -m gpu "${selection[@]}" -vv -p no:cacheprovider -p no:logging -rA --durations=15 \
  "$@" 2>&1 | tee -a "${copies[@]}"
exit "${PIPESTATUS[0]}"
