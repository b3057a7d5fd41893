#!/usr/bin/env bash
# One prepared run on a GPU machine (made for an H200 with torch preinstalled and nothing
# to download): build fastce with its CUDA kernels, run the whole test suite (the shared
# tests run on CUDA too), measure copy bandwidth and time the kernels, and write logs and
# a results table to OUTDIR. Runs in well under 8 minutes; every step has a time limit,
# and a failing step does not stop the later ones (the exit status reports it).
#
#   scripts/gpu_check.sh OUTDIR
#
# Environment: PYTHON (default python3), CUDA_HOME (default: found from nvcc),
# TORCH_CUDA_ARCH_LIST (default: the GPU's own), GPU_CHECK_PYTEST_ARGS, GPU_CHECK_BUDGET_S
# (default 420: later steps are cut short or skipped so the run ends by then).
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.md"
status=0

DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-420} ))  # the whole run, whatever happens

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2 t0 rc left
  shift 2
  t0=$(date +%s)
  left=$(( DEADLINE - t0 ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped: out of time | 0 s |" >> "$SUMMARY"
    status=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") | $(( $(date +%s) - t0 )) s |" >> "$SUMMARY"
  [ $rc -eq 0 ] || { status=1; echo "gpu_check: $name failed (exit $rc), see $OUT/$name.log" >&2; }
  return $rc
}

{
  echo "# fastce GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>&1
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null
  echo '```'
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
} > "$SUMMARY"

if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_bin=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
  [ -n "$nvcc_bin" ] && export CUDA_HOME=$(dirname "$nvcc_bin")
fi

if step build 240 env FORCE_CUDA=1 FASTCE_PTXAS_VERBOSE=1 MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace; then
  step import 40 "$PY" -c "import fastce, torch; assert fastce.has_cuda_kernels(); \
assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
  # -p no:cacheprovider: the checkout may be read-only; --maxfail: one scarce run should
  # show more than the first failure.
  # shellcheck disable=SC2086
  step tests 240 "$PY" -m pytest tests -q -p no:cacheprovider --maxfail=25 -ra \
    ${GPU_CHECK_PYTEST_ARGS:-}
  grep -E "[0-9]+ (passed|failed|skipped|errors?)" "$OUT/tests.log" | tail -n 1 | sed "s/^/tests: /" >> "$SUMMARY"
  step bench_smoke 100 "$PY" benchmarks/bench_gpu_smoke.py --out "$OUT"
  if [ -f benchmarks/bench.py ]; then
    mkdir -p "$OUT/bench"
    step bench 100 "$PY" benchmarks/bench.py --device cuda --quick --out "$OUT/bench"
  fi
fi

{
  echo
  [ -f "$OUT/bench_smoke.md" ] && { echo "## Kernel timings"; echo; cat "$OUT/bench_smoke.md"; }
  echo
  echo "## Failures"
  echo
  echo '```'
  grep -hE "^(FAILED|ERROR)" "$OUT"/tests.log 2>/dev/null | head -n 40
  echo '```'
} >> "$SUMMARY"
cat "$SUMMARY"
exit $status
