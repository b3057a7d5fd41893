#!/usr/bin/env bash
# Usage: scripts/test_venv.sh PYTHON_VERSION TORCH_VERSION [EXTRA_PACKAGE...]
# Prints the path of a virtualenv with that Python (a pyenv interpreter, e.g. 3.10 or 3.10.13),
# torch==TORCH_VERSION and the test suite's dependencies, creating it when missing or when its
# torch is not that version. Everything else goes to stderr, so that
#   venv=$(scripts/test_venv.sh 3.12 2.14.1)
# works. Venvs live in $FASTCE_VENVS (default /work/venvs), named py312-torch2.14.
#
# A CUDA build of torch takes about 5 GB. Several Pythons with the same torch share most of those
# files (CUDA libraries, libtorch): where util-linux's `hardlink` exists, the new venv's identical
# files become hard links to the other venvs' copies.
set -euo pipefail

py=${1:?python version, e.g. 3.10}
torch_version=${2:?torch version, e.g. 2.11.0}
shift 2
root=${FASTCE_VENVS:-/work/venvs}

pyshort=$(cut -d. -f1,2 <<<"$py")
venv="$root/py${pyshort//./}-torch$(cut -d. -f1,2 <<<"$torch_version")"

has_torch() {
  "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null
}

if ! has_torch; then
  # The interpreter: pyenv's newest install of that version, else pythonX.Y on PATH.
  interp=""
  if command -v pyenv >/dev/null; then
    v=$(pyenv versions --bare 2>/dev/null | grep -E "^${pyshort//./\\.}(\.[0-9]+)?$" | sort -V | tail -n1 || true)
    [ -n "$v" ] && interp="$(pyenv root)/versions/$v/bin/python"
  fi
  [ -n "$interp" ] || interp=$(command -v "python$pyshort" || true)
  [ -n "$interp" ] || { echo "test_venv: no Python $pyshort (pyenv install $pyshort, or put python$pyshort on PATH)" >&2; exit 1; }
  echo "test_venv: creating $venv ($interp, torch $torch_version)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$interp" -m venv "$venv"
  start=$(date +%s)
  if ! "$venv/bin/python" -m pip install "torch==$torch_version" pytest hypothesis numpy "$@" \
      > "$venv/install.log" 2>&1 || ! has_torch; then
    tail -n 20 "$venv/install.log" >&2
    echo "test_venv: torch $torch_version did not install into $venv (log: $venv/install.log)" >&2
    exit 1
  fi
  echo "test_venv: installed in $(( $(date +%s) - start )) s" >&2
  if command -v hardlink >/dev/null; then
    hardlink -q --ignore-time --respect-name --minimum-size 64K "$root" >&2 || true
  fi
elif [ $# -gt 0 ]; then
  "$venv/bin/python" -m pip install -q "$@" > "$venv/install.log" 2>&1 \
    || { tail -n 20 "$venv/install.log" >&2; exit 1; }
fi
echo "$venv"
