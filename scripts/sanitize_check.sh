#!/usr/bin/env bash
# Builds fastce with AddressSanitizer + UndefinedBehaviorSanitizer (FASTCE_SANITIZE=1) in a
# temporary copy of this checkout and runs the CPU test suite against that build.
# Extra arguments go to pytest, e.g.  scripts/sanitize_check.sh -x tests/test_fuzz.py
# See docs/HARDENING.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/fastce-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Tracked and untracked (not ignored) files: the working tree as it is, without build outputs.
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 -I{} sh -c 'test -e "{}" && cp --parents "{}" "$0"' "$work")
cd "$work"

echo "building the sanitized extension in $work ..."
if ! FASTCE_SANITIZE=1 FASTCE_NO_CUDA=1 python setup.py build_ext --inplace >build.log 2>&1; then
  tail -n 40 build.log
  exit 1
fi

# The extension is instrumented but python is not: the ASan runtime must be loaded first,
# and libstdc++ with it (python does not link it, and ASan's __cxa_throw interceptor needs
# the real one at start-up, else the first C++ exception aborts). libubsan comes in as a
# dependency of the extension.
cxx=${CXX:-c++}
libasan=$($cxx -print-file-name=libasan.so)
libstdcxx=$($cxx -print-file-name=libstdc++.so)
test -f "$libasan" || { echo "libasan.so not found (install the compiler's libasan)"; exit 1; }

# detect_leaks=0: the interpreter and torch keep allocations alive until exit by design.
# RSS tests are deselected: ASan's quarantine and shadow memory make RSS meaningless.
# The huge-tensor test is deselected: ASan's redzones and -O0 would make it take minutes.
# --capture=sys: a sanitizer report goes to the real stderr even when it aborts the process.
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$work/python"

python -c "import fastce, sys; print('sanitized build loaded:', fastce.__file__, 'isa', fastce.cpu_isa())"
status=0
python -m pytest -q --capture=sys -p no:cacheprovider -m "not slow" -k "not grow_memory" "${@:-tests}" || status=$?
if [ "$status" -eq 0 ]; then
  echo "sanitize_check: OK (no ASan/UBSan report)"
else
  echo "sanitize_check: FAILED (exit $status)"
fi
exit "$status"
