#!/usr/bin/env bash
# Usage: scripts/build_wheel.sh [OUT_DIR]
# Builds fastce's wheel with `python -m build --wheel --no-isolation` against the torch installed
# for $PYTHON (default python3), tags and checks it with scripts/wheel_audit.sh, and prints the
# path of the result (fastce-<version>-cp310-abi3-manylinux_<glibc>_<arch>.whl in OUT_DIR, default
# dist/). FORCE_CUDA=1 and the other switches of setup.py apply (CUDA_HOME defaults to the
# toolkit of the `nvcc` on PATH); MAX_JOBS defaults to 2.
# The build reuses build/ (ninja keeps up-to-date objects), e.g. after `pip install .`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/dist}")
py=${PYTHON:-python3}

work=$(mktemp -d "${TMPDIR:-/tmp}/fastce-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ "${FORCE_CUDA:-0}" = 1 ] && [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  # `nvcc` may be a wrapper outside the toolkit: ask it where it really runs from.
  nvcc_bin=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
  [ -n "$nvcc_bin" ] && export CUDA_HOME=$(dirname "$nvcc_bin")
fi

versions=$("$py" -c "import sys, torch; print(f'torch {torch.__version__}, Python {sys.version.split()[0]}')")
start=$(date +%s)
if ! (cd "$root" && MAX_JOBS=${MAX_JOBS:-2} "$py" -m build --wheel --no-isolation --outdir "$work" . \
      > "$work/build.log" 2>&1); then
  grep -E "error|Error|ERROR" "$work/build.log" | head -n 40 >&2 || true
  tail -n 20 "$work/build.log" >&2
  echo "build_wheel: FAIL: python -m build (needs build, setuptools>=77, wheel, ninja and torch>=2.11 installed)" >&2
  exit 1
fi
echo "build_wheel: built $(basename "$work"/*.whl) in $(( $(date +%s) - start )) s ($versions)" >&2
"$root/scripts/wheel_audit.sh" "$work"/*.whl "$out"
