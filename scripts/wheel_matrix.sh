#!/usr/bin/env bash
# Usage: scripts/wheel_matrix.sh [WHEEL] [-- PYTEST_ARGS...]
# Tests one fastce wheel under many torch and Python versions, as a user without a compiler
# would get it. Without WHEEL, builds it first (scripts/build_wheel.sh, against the torch of
# python3); a given WHEEL is audited the same way (scripts/wheel_audit.sh).
#
# For each combination: a venv with that Python and torch (scripts/test_venv.sh creates it
# when missing), the wheel installed without a compiler (scripts/install_wheel.sh, which also
# says which compiled modules loaded), then the whole suite, tests/ by path, from an empty
# directory: the source tree's python/ is not on sys.path, so the installed wheel is what runs.
# Prints a table; exits non-zero if any combination failed (pytest's "no tests ran", exit 5,
# counts as failed).
#
# Environment:
#   FASTCE_MATRIX   the combinations, "PYTHON:TORCH ..." (default: the full matrix below)
#   FASTCE_VENVS    where the venvs live (default /work/venvs; a CUDA torch takes ~5 GB, shared
#                   across the Pythons of one torch where `hardlink` exists)
#   FASTCE_TEST_TIMEOUT  seconds per combination's suite (default 1200)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
PYTHONS="3.10 3.11 3.12"
TORCHES="2.11.0 2.12.1 2.13.0 2.14.1"

wheel=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then wheel=$1; shift; fi
[ "${1:-}" = "--" ] && shift
pytest_args=("$@")

if [ -z "${FASTCE_MATRIX:-}" ]; then
  FASTCE_MATRIX=$(for t in $TORCHES; do for p in $PYTHONS; do printf '%s:%s ' "$p" "$t"; done; done)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fastce-matrix.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -z "$wheel" ]; then
  wheel=$("$root/scripts/build_wheel.sh")
else
  wheel=$("$root/scripts/wheel_audit.sh" "$wheel" "$work/wheel")
fi
echo "wheel_matrix: $wheel"

rows=()
failed=0
for combo in $FASTCE_MATRIX; do
  py=${combo%%:*} torch_version=${combo#*:}
  log="$work/py$py-torch$torch_version.log"
  start=$(date +%s)
  result="" modules=""
  if ! venv=$("$root/scripts/test_venv.sh" "$py" "$torch_version" 2> "$log"); then
    result="FAIL: venv (torch $torch_version, Python $py)"
  elif ! modules=$("$root/scripts/install_wheel.sh" "$venv" "$wheel" 2>> "$log"); then
    result="FAIL: install or import"
  else
    mkdir -p "$work/run"
    set +e
    (cd "$work/run" && timeout "${FASTCE_TEST_TIMEOUT:-1200}" "$venv/bin/python" -m pytest -q \
      -p no:cacheprovider "$root/tests" "${pytest_args[@]}") >> "$log" 2>&1
    rc=$?
    set -e
    # pytest's closing line, e.g. "1090 passed, 12 skipped in 95.31s (0:01:35)".
    summary=$(grep -E " in [0-9.]+s( \([0-9:]+\))?( =+)?$" "$log" | tail -n1 | sed -E 's/^=+ *//; s/ in [0-9.]+s.*//')
    case $rc in
      0) result="ok: $summary" ;;
      5) result="FAIL: no tests ran" ;;
      124) result="FAIL: timed out; $summary" ;;
      *) result="FAIL (exit $rc): $summary" ;;
    esac
  fi
  secs=$(( $(date +%s) - start ))
  [[ $result == ok* ]] || { failed=1; tail -n 30 "$log" | sed "s/^/  [py$py torch$torch_version] /"; }
  echo "wheel_matrix: Python $py, torch $torch_version: $result (modules loaded: ${modules:-none}; $secs s)"
  rows+=("$(printf '| %-6s | %-7s | %-10s | %-60s | %5s |' "$py" "$torch_version" "$modules" "$result" "$secs")")
done

echo
echo "wheel_matrix: $(basename "$wheel")"
printf '| %-6s | %-7s | %-10s | %-60s | %5s |\n' Python torch loaded result "s"
echo "|--------|---------|------------|--------------------------------------------------------------|-------|"
printf '%s\n' "${rows[@]}"
exit $failed
