#!/usr/bin/env bash
# Usage: scripts/install_wheel.sh VENV WHEEL
# Installs a fastce wheel into VENV as a user without a compiler would (CC=false CXX=false, and
# --only-binary so that pip cannot fall back to building anything), imports it from an empty
# directory, checks that the fastce imported is the venv's, and prints the compiled modules that
# loaded: "_C", or "_C _C_cuda" where the wheel has the CUDA kernels and the venv's torch can
# load them. pip's output goes to stderr.
set -euo pipefail

venv=$(realpath "${1:?venv}")
wheel=${2:?wheel}

CC=false CXX=false "$venv/bin/python" -m pip install -q --no-deps --only-binary=:all: --force-reinstall \
  "$wheel" >&2

run=$(mktemp -d "${TMPDIR:-/tmp}/fastce-import.XXXXXX")
trap 'rm -rf "$run"' EXIT
cd "$run"
"$venv/bin/python" - "$venv" <<'EOF'
import os
import sys

import fastce

venv = sys.argv[1]
if not os.path.realpath(fastce.__file__).startswith(venv + os.sep):
    sys.exit(f"install_wheel: imported {fastce.__file__}, not the wheel installed in {venv}")
print(" ".join(name for name in ("_C", "_C_cuda") if f"fastce.{name}" in sys.modules))
EOF
