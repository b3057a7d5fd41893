#!/usr/bin/env bash
# One prepared run on a GPU machine (made for an H200 with torch preinstalled and nothing to
# download), about 8 minutes, that settles correctness and bandwidth:
#   1. build fastce for sm_90 only (ptxas -v kept in build.log);
#   2. tests/test_cuda.py and every device-parametrized test on CUDA (`-k cuda`), a time limit
#      per test and a progress log that survives a kill (scripts/gpu_check_plugin.py);
#   3. compute-sanitizer memcheck, synccheck and initcheck over a prepared matrix (every dtype,
#      offsets 0-7, [:, :V] slices of a padded buffer, split rows, in place, misaligned
#      probability targets, ignored rows; scripts/gpu_check.py matrix), each case also checked
#      against the CPU backend;
#   4. copy bandwidth, and fastce vs torch eager on the LLM and classifier shapes from >= 20
#      back-to-back calls between CUDA events, inputs cycled past L2, with torch.profiler's
#      per-kernel times (benchmarks/bench_gpu_smoke.py);
#   5. ncu sections SpeedOfLight, Occupancy and WarpStateStats on the forward and gradient
#      kernels;
# and writes every log, summary.md (the steps) and results.md (the table the README takes) to
# OUTDIR. Every step has a time limit and the whole run a budget; a failing step does not stop
# the later ones (the exit status reports it). Split-row results depend on the GPU's SM count
# (docs/CUDA.md).
#
#   scripts/gpu_check.sh OUTDIR            # on the GPU machine
#   scripts/gpu_check.sh OUTDIR --dry-run  # anywhere: the same steps on the CPU, no build/sanitizer/ncu
#
# Environment: PYTHON (default python3), CUDA_HOME (default: found from nvcc), GPU_CHECK_BUDGET_S
# (default 480), GPU_CHECK_TEST_TIMEOUT (per test, default 60 s), GPU_CHECK_PYTEST_ARGS.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/python:$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # logs written line by line: a killed step keeps what it printed
SUMMARY="$OUT/summary.md"
status=0
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-480} ))  # the whole run, whatever happens

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2 t0 rc left
  shift 2
  t0=$(date +%s)
  left=$(( DEADLINE - t0 ))
  if [ "$left" -lt 15 ]; then
    echo "| $name | skipped: out of time | 0 s |" >> "$SUMMARY"
    status=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "gpu_check: $name (limit ${limit} s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ $rc -ge 124 ] && echo ', timed out'))") | $(( $(date +%s) - t0 )) s |" >> "$SUMMARY"
  [ $rc -eq 0 ] || { status=1; echo "gpu_check: $name failed (exit $rc), see $OUT/$name.log" >&2; }
  return $rc
}

{
  echo "# fastce GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')$([ $DRY -eq 1 ] && echo ' (dry run, CPU)')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -n 3
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>&1
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null
  echo '```'
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
} > "$SUMMARY"

if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
  nvcc_bin=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
  [ -n "$nvcc_bin" ] && export CUDA_HOME=$(dirname "$nvcc_bin")
fi
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
NCU=$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")
DRYARG=()
[ $DRY -eq 1 ] && DRYARG=(--dry-run)

# 1. Build, sm_90 only (the H200), with ptxas's registers/stack/spills in the log.
if [ $DRY -eq 1 ]; then
  echo "| build | dry run: not built (uses the in-place build) | 0 s |" >> "$SUMMARY"
  built=0
else
  step build 150 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 FASTCE_PTXAS_VERBOSE=1 MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
  built=$?
fi

if [ "$built" -eq 0 ]; then
  if [ $DRY -eq 0 ]; then
    step import 30 "$PY" -c "import fastce, torch; assert fastce.has_cuda_kernels(); \
assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
  fi

  # 2. Tests: the CUDA file and every test parametrized on the device, on CUDA.
  # -p no:cacheprovider: the checkout may be read-only; --maxfail: one scarce run should show
  # more than the first failure.
  : > "$OUT/tests.progress"
  # shellcheck disable=SC2086
  GPU_CHECK_PROGRESS="$OUT/tests.progress" step tests 120 "$PY" -m pytest tests -q -p no:cacheprovider \
    -p gpu_check_plugin -k "cuda" --maxfail=25 -ra --junitxml="$OUT/tests.xml" ${GPU_CHECK_PYTEST_ARGS:-}

  # 3. compute-sanitizer over the prepared matrix (memcheck: every offset; the others: 0, 1, 3, 7).
  for tool in memcheck synccheck initcheck; do
    quick=(--quick)
    limit=30
    [ $tool = memcheck ] && { quick=(); limit=75; }
    if [ $DRY -eq 1 ]; then
      step "sanitize_$tool" 120 "$PY" scripts/gpu_check.py matrix "${quick[@]}" --dry-run
    elif [ -x "$SANITIZER" ]; then
      step "sanitize_$tool" "$limit" "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
        "$PY" scripts/gpu_check.py matrix "${quick[@]}"
    else
      echo "| sanitize_$tool | skipped: no compute-sanitizer | 0 s |" >> "$SUMMARY"
    fi
  done

  # 4. Bandwidth and per-kernel times, fastce vs torch eager.
  step bench 90 "$PY" benchmarks/bench_gpu_smoke.py --out "$OUT" "${DRYARG[@]}"

  # 5. ncu on the forward and gradient kernels (a few launches of each).
  if [ $DRY -eq 1 ]; then
    step ncu 60 "$PY" scripts/gpu_check.py ncu-target --dry-run
  elif [ -x "$NCU" ]; then
    step ncu 40 "$NCU" --section SpeedOfLight --section Occupancy --section WarpStateStats \
      -k "regex:stats_kernel|grad_kernel" -c 6 "$PY" scripts/gpu_check.py ncu-target
    cp "$OUT/ncu.log" "$OUT/ncu.txt" 2>/dev/null
  else
    echo "| ncu | skipped: no ncu | 0 s |" >> "$SUMMARY"
  fi
fi

{
  echo
  echo "## Failures"
  echo
  echo '```'
  grep -hE "^(FAILED|ERROR)" "$OUT"/tests.log 2>/dev/null | head -n 40
  grep -hE "^FAIL " "$OUT"/sanitize_*.log 2>/dev/null | head -n 20
  grep -hE "^=+ (Invalid|Uninitialized|Barrier|Race)" "$OUT"/sanitize_*.log 2>/dev/null | sort | uniq -c | head -n 20
  echo '```'
} >> "$SUMMARY"
"$PY" scripts/gpu_check.py results "$OUT" > /dev/null 2>&1 || echo "gpu_check: results table failed" >&2
cat "$SUMMARY"
echo "gpu_check: results in $OUT/results.md"
exit $status
