#!/usr/bin/env bash
# wanlora front door.
#   ./launch.sh demo       the whole job on the embedded default (tiny random Wan model, bundled demo clips)
#   ./launch.sh test       the test suite (CPU; GPU tests are skipped)
#   ./launch.sh setup      only make the virtual environment (.venv)
#   ./launch.sh prepare RECIPE    |  train RECIPE [args]  |  sample [args]  |  evaluate [args]
# Every verb makes .venv on first use. Set WANLORA_VENV to use another folder.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${WANLORA_VENV:-.venv}

setup() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import wan_model, torch, peft, diffusers, decord' 2>/dev/null; then
    return
  fi
  echo "[wanlora] making the virtual environment in $VENV (about 2 minutes)" >&2
  python3 -m venv "$VENV"
  # torch first, pinned: the CPU build of 2.13.0 lies on this machine's disk; an unpinned torch
  # would pull a multi-GB CUDA build. On a GPU machine, install the torch you want before running this.
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
}

verb=${1:-help}
[ $# -gt 0 ] && shift
case "$verb" in
  setup) setup ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@" ;;
  demo)
    setup
    exec "$VENV/bin/python" -m train.demo "$@" ;;
  prepare)
    setup
    exec "$VENV/bin/python" -m train.prepare "$@" ;;
  train)
    setup
    exec "$VENV/bin/accelerate" launch train_lora.py "$@" ;;
  sample)
    setup
    exec "$VENV/bin/python" sample.py "$@" ;;
  evaluate)
    setup
    exec "$VENV/bin/python" sample.py evaluate "$@" ;;
  help|-h|--help)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    echo "unknown verb '$verb'; run ./launch.sh help" >&2; exit 2 ;;
esac
