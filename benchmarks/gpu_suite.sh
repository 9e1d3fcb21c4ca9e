#!/usr/bin/env bash
# Every GPU benchmark preset, inside 8 minutes on one H200, with JSON + one markdown table in $OUT.
#
#   bash benchmarks/wheels.sh                                   # here: diffusers, peft, ml_collections -> .whl/
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=590)     # the device tool
#   bash benchmarks/gpu_suite.sh --preset tiny                  # CPU fallback: the tiny preset of each
#
# Interpreter: $PYTHON if set, else the project's .venv/bin/python when it exists (`make install`), else
# python3; it must import jax (else the suite stops at once, exit 2, naming the interpreter). The suite
# exits 1 when any benchmark fails, runs out of its time box or writes no JSON (each is named on stderr).
#
# GPU (default): rollout flux-dev, update flux-dev, judge qwen3-vl-8b, iteration flux-dev, each in its own
# process under a time box (BUDGET_* seconds; a step that overruns is cut and the suite goes on), with the
# machine's own jax 0.11 / torch 2.11 / transformers and the carried wheels installed to /tmp/site.
# JAX and PyTorch share the GPU in the side-by-side steps (XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 each).
# Files in $OUT (default runs/benchmarks/suite_<preset>): <step>.json, suite.md, suite.json, suite.log.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) MODE="$2"; shift 2 ;;
    *) echo "usage: $0 [--preset gpu|tiny]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-runs/benchmarks/suite_$MODE}
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
if ! PYV=$("$PY" -c 'import sys, jax; print(sys.executable, "python", sys.version.split()[0], "jax", jax.__version__)' 2>/dev/null); then
  echo "gpu_suite.sh: the interpreter '$PY' cannot import jax; run with the project's: PYTHON=/path/to/.venv/bin/python bash $0 ... (make install creates .venv)" >&2
  exit 2
fi
echo "interpreter: $PYV"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
LOG="$OUT/suite.log"
: > "$LOG"
start=$(date +%s)
FAILED=()
{ echo "# suite $MODE  $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD 2>/dev/null)  load $(cut -d' ' -f1-3 /proc/loadavg)";
  echo "# interpreter: $PYV";
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; } >> "$LOG"

step() {  # step NAME BUDGET_S MEM_FRACTION SCRIPT ARGS...
  local name=$1 budget=$2 frac=$3; shift 3
  echo "## $name ($*), budget ${budget}s" >> "$LOG"
  local t0=$(date +%s)
  XLA_PYTHON_CLIENT_MEM_FRACTION=$frac timeout --kill-after=10 "$budget" "$PY" "$@" --out "$OUT/$name.json" >> "$LOG" 2>&1
  local rc=$?
  echo "## $name: exit $rc after $(( $(date +%s) - t0 ))s" >> "$LOG"
  if [ $rc -ne 0 ]; then
    FAILED+=("$name (exit $rc$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ": over its ${budget}s time box"))")
  elif [ ! -s "$OUT/$name.json" ]; then
    FAILED+=("$name (exit 0 but no $OUT/$name.json)")
  fi
  return 0
}

if [ "$MODE" = tiny ]; then
  step rollout 600 0.45 benchmarks/rollout.py --preset tiny --reps 1
  step update 600 0.45 benchmarks/update.py --preset tiny --reps 1
  step judge 600 0.45 benchmarks/judge.py --preset tiny --reps 1
  step iteration 600 0.9 benchmarks/iteration.py --preset tiny --iters 1 --against release
else
  step rollout "${BUDGET_ROLLOUT:-120}" 0.45 benchmarks/rollout.py --preset flux-dev
  step update "${BUDGET_UPDATE:-130}" 0.45 benchmarks/update.py --preset flux-dev
  step judge "${BUDGET_JUDGE:-100}" 0.45 benchmarks/judge.py --preset qwen3-vl-8b
  step iteration "${BUDGET_ITERATION:-120}" 0.9 benchmarks/iteration.py --preset flux-dev
fi
"$PY" benchmarks/report.py summary "$OUT" >> "$LOG" 2>&1 || FAILED+=("summary (benchmarks/report.py summary failed)")
echo "# suite done in $(( $(date +%s) - start ))s" >> "$LOG"
cat "$OUT/suite.md" 2>/dev/null
tail -n 5 "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "# FAILED: ${FAILED[*]}" >> "$LOG"
  echo "gpu_suite.sh: ${#FAILED[@]} step(s) failed: ${FAILED[*]} (details in $LOG)" >&2
  exit 1
fi
