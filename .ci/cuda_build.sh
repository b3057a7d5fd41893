#!/usr/bin/env bash
# CI step: the CUDA build, without a GPU. In a temporary copy of the repository (so the CPU
# build of the working tree stays as it is): build fastce._C and fastce._C_cuda (the CUDA
# kernels, for sm_80 and sm_90) against torch 2.14.1+cu130 on the stable ABI, import them with no
# driver, check that every op with a CPU kernel has a CUDA kernel and that _C_cuda uses torch
# through the stable C shim only, and inspect the machine code with cuobjdump (SASS for both
# architectures, warp shuffles, 16-byte loads). Prints the registers/stack frame/spills table of
# every kernel and the instruction counts of each kernel's streaming loop (.ci/kernel_report.py),
# and runs the kernels' code on the CPU under an emulation of CUDA (tests/cuda_emulation).
#
# Environment: FASTCE_CUDA_VENV (default /work/venv-cuda: created with torch 2.14.1 when
# missing), CUDA_HOME (default: the toolkit the `nvcc` on PATH runs), MAX_JOBS.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FASTCE_CUDA_VENV:-/work/venv-cuda}
TORCH_VERSION=2.14.1
STEP_TIMEOUT=${FASTCE_CUDA_BUILD_TIMEOUT:-720}

fail() { echo "cuda_build: FAIL: $*" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "cuda_build: creating $VENV (torch $TORCH_VERSION)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" ninja setuptools wheel pytest numpy
fi
PY="$VENV/bin/python"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CUOBJDUMP="$SITE/triton/backends/nvidia/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || fail "no cuobjdump at $CUOBJDUMP (triton missing from the venv?)"

if [ -z "${CUDA_HOME:-}" ]; then
  # `nvcc` may be a wrapper outside the toolkit: ask it where it really runs from.
  nvcc_bin=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
  [ -n "$nvcc_bin" ] || fail "cannot locate the CUDA toolkit: set CUDA_HOME"
  CUDA_HOME=$(dirname "$nvcc_bin")
fi
export CUDA_HOME

WORK=$(mktemp -d /tmp/fastce-cuda-ci.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -cf - -T -) | tar -xf - -C "$WORK"
cd "$WORK"

echo "cuda_build: building in $WORK with $CUDA_HOME (sm_80, sm_90)"
start=$(date +%s)
if ! FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" FASTCE_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    timeout "$STEP_TIMEOUT" "$PY" setup.py build_ext --inplace > build.log 2>&1; then
  grep -E "error|Error" build.log | head -n 40 >&2 || true
  tail -n 20 build.log >&2
  fail "CUDA build failed"
fi
echo "cuda_build: built in $(( $(date +%s) - start )) s"
SO=$(ls python/fastce/_C_cuda*.so)

# The stable ABI: _C_cuda reaches torch through its C shim only (no C++ symbol of c10, ATen or
# torch), and exports its PyInit_ but nothing of fastce's (hidden symbols: its copy of the
# shared core cannot clash with _C's).
torch_cxx=$(nm -D --undefined-only "$SO" | c++filt | grep -cE "(c10|at|torch)::" || true)
[ "$torch_cxx" -eq 0 ] || { nm -D --undefined-only "$SO" | c++filt | grep -E "(c10|at|torch)::" | head >&2; fail "_C_cuda uses torch's C++ symbols"; }
exported=$(nm -D --defined-only "$SO" | c++filt)
grep -q " PyInit__C_cuda$" <<<"$exported" || fail "_C_cuda does not export PyInit__C_cuda"
! grep "fastce::" <<<"$exported" | head -n 5 | grep . >&2 || fail "_C_cuda exports fastce's symbols"
echo "cuda_build: $(basename "$SO"): torch through the stable C shim only; no fastce symbol exported"

# Import with no driver (this machine has none; hide any device to be sure), and the
# CPU/CUDA kernel coverage of every op.
CUDA_VISIBLE_DEVICES="" PYTHONPATH=python "$PY" - <<'EOF' || fail "import or op coverage check"
import torch
import fastce
assert fastce.has_cuda_kernels(), "fastce.has_cuda_kernels() is False (fastce._C_cuda did not load)"
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastce::"))
assert names, "no fastce ops registered"
has = torch._C._dispatch_has_kernel_for_dispatch_key
# A CompositeExplicitAutograd kernel (cpu_isa, empty_cache: no tensors) serves every device.
missing = [n for n in names if has(n, "CPU") and not has(n, "CUDA") and not has(n, "CompositeExplicitAutograd")]
assert not missing, f"ops with a CPU kernel but no CUDA kernel: {missing}"
print("cuda_build: import ok (no driver); CUDA kernels for", [n for n in names
      if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")])
EOF

# With a CPU-only torch (python3's, when it has one) the same build imports without its CUDA part.
if python3 -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
  PYTHONPATH=python python3 -c "import fastce, torch; assert not fastce.has_cuda_kernels(); \
print('cuda_build: import ok under torch', torch.__version__, '(CPU only): fastce._C_cuda left out')" \
    || fail "importing fastce under a CPU-only torch"
fi

# Machine code: real SASS for sm_80 and sm_90, with warp shuffles and 16-byte global loads.
"$CUOBJDUMP" -sass "$SO" > sass.txt || fail "cuobjdump -sass"
for arch in sm_80 sm_90; do
  section=$(awk -v a="arch = $arch" '/arch = sm_/ {on = index($0, a) > 0} on' sass.txt)
  [ -n "$section" ] || fail "no $arch SASS in $SO"
  shfl=$(grep -c "SHFL.BFLY" <<<"$section" || true)
  ldg=$(grep -c "LDG.E.128" <<<"$section" || true)
  stg=$(grep -c "STG.E.128" <<<"$section" || true)
  echo "cuda_build: $arch: $shfl SHFL.BFLY, $ldg LDG.E.128, $stg STG.E.128"
  [ "$shfl" -gt 0 ] || fail "$arch: no warp shuffles (SHFL.BFLY) in the SASS"
  [ "$ldg" -gt 0 ] || fail "$arch: no 16-byte loads (LDG.E.128) in the SASS"
done

# Registers, stack frames and spills per kernel (docs/CUDA.md keeps a copy of this table), and
# the instruction counts of each kernel's streaming loop in the sm_90 SASS.
"$PY" .ci/kernel_report.py build.log sass.txt || fail "kernel report"

# The CUDA tests must at least collect (they skip without a GPU).
PYTHONPATH=python "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > pytest.log 2>&1 \
  || { tail -n 20 pytest.log >&2; fail "tests/test_cuda.py did not collect/skip cleanly"; }
echo "cuda_build: $(tail -n 1 pytest.log)"

# The kernels' code itself, run on the CPU under an emulation of the CUDA execution model
# against the float64 reference and the CPU backend (tests/cuda_emulation, a few minutes).
FASTCE_CUDA_EMULATION=1 PYTHONPATH=python timeout 1500 "$PY" -m pytest -q -p no:cacheprovider \
  tests/cuda_emulation > emulation.log 2>&1 \
  || { tail -n 40 emulation.log >&2; fail "emulated CUDA kernels disagree with the reference"; }
echo "cuda_build: emulated kernels: $(tail -n 1 emulation.log)"
echo "cuda_build: OK"
