"""Builds fastce's compiled modules on LibTorch's stable ABI and CPython's limited API, so that
one wheel (tag cp310-abi3) loads under every torch from 2.11 on and every Python from 3.10 on:

  fastce._C       the CPU kernels; always built.
  fastce._C_cuda  the CUDA kernels; built when FORCE_CUDA=1, or when a GPU, a CUDA build of torch
                  and a CUDA toolkit are all present. fastce imports it only where it loads, so
                  the same wheel works with a CPU-only torch.

Neither module links libtorch_python or uses pybind11: each registers its ops with
STABLE_TORCH_LIBRARY and has a PyInit_ that makes an empty module, for `import` to load it.

Environment switches:
  FORCE_CUDA=1            build the CUDA kernels even without a GPU (needs nvcc and a CUDA torch)
  FASTCE_NO_CUDA=1        never build them
  TORCH_CUDA_ARCH_LIST    CUDA targets (default without a GPU: "8.0;9.0", real SASS for both)
  FASTCE_PTXAS_VERBOSE=1  print registers and spills of every CUDA kernel (-Xptxas -v)
  CUDA_HOME               the toolkit whose nvcc builds the kernels (see docs/CUDA.md)
  FASTCE_SANITIZE=1       AddressSanitizer + UndefinedBehaviorSanitizer build (CPU tests)
  FASTCE_DEBUG=1          -O0 -g
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Each module's sources, as globs relative to this directory: the one place to change when a
# file moves from one module to the other.
SOURCES = {
    "fastce._C": ["csrc/*.cpp", "csrc/cpu/*.cpp"],
    "fastce._C_cuda": ["csrc/cuda/*.cpp", "csrc/cuda/*.cu"],
}

# The oldest torch whose stable ABI the modules may use, encoded as TORCH_TARGET_VERSION wants
# it (one byte each for major, minor, patch, then five bytes of ABI tag): torch 2.11.0. The
# headers of a newer torch then hide whatever 2.11 lacks, so the binary loads in 2.11 and later.
TORCH_TARGET_VERSION = "0x020b000000000000"
# The oldest CPython whose limited API the modules may use (3.10), and the wheel tag it gives.
# Spelled as torch.utils.cpp_extension spells the Py_LIMITED_API it adds for py_limited_api
# extensions, so that the two definitions are the same and the compiler does not warn.
PY_LIMITED_API = "0x030A0000"
ABI3_TAG = "cp310"
STABLE_ABI = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", f"-DPy_LIMITED_API={PY_LIMITED_API}"]


def flag(name):
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def want_cuda():
    if flag("FASTCE_NO_CUDA"):
        return False
    if flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def sources(module):
    return sorted(path for pattern in SOURCES[module] for path in glob.glob(pattern))


def extensions():
    debug, sanitize = flag("FASTCE_DEBUG"), flag("FASTCE_SANITIZE")
    opt = ["-O0", "-g"] if debug or sanitize else ["-O3"]
    # Hidden symbols: a module exports only its PyInit_ (torch reaches the kernels through the
    # registrations), so nothing in it can interpose on, or be interposed by, the other module or
    # another extension in the process.
    hidden = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    cxx = opt + STABLE_ABI + hidden + ["-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
    # Debug information is 90% of an optimized build's size (python's own CFLAGS add -g): a wheel
    # ships without it, FASTCE_DEBUG and FASTCE_SANITIZE keep it.
    link = [] if debug or sanitize else ["-Wl,--strip-debug"]
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx += san
        link += san
    # libstdc++ first on the link line: libc10.so and libtorch_cpu.so re-export some of its symbols
    # (the C++20 std::stringstream members among them), and a reference bound to their copies has no
    # symbol version, so auditwheel would under-state the libstdc++ the wheel needs.
    libraries = ["stdc++"]
    # OpenMP for the CPU module only. Its libgomp.so.1 is the one torch ships in torch/lib and has
    # loaded before fastce._C, so the wheel must not bundle one of its own (see scripts/wheel_audit.sh).
    modules = [CppExtension("fastce._C", sources("fastce._C"), extra_compile_args={"cxx": cxx + ["-fopenmp"]},
                            extra_link_args=link + ["-fopenmp"], libraries=list(libraries), py_limited_api=True)]
    if want_cuda():
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (set CUDA_HOME)")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        # USE_CUDA: the stable shim declares its CUDA entry points (the current stream, among
        # others) only under it. No fast-math: logf/tanhf stay exact.
        nvcc = opt + STABLE_ABI + [f"-Xcompiler={f}" for f in hidden] + ["-DUSE_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        if flag("FASTCE_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        modules.append(CUDAExtension(
            "fastce._C_cuda", sources("fastce._C_cuda"),
            extra_compile_args={"cxx": cxx + ["-DUSE_CUDA"], "nvcc": nvcc}, extra_link_args=link,
            libraries=list(libraries), py_limited_api=True,
        ))
    return modules


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Also deletes the file of a module this build leaves out (fastce._C_cuda, after a CUDA build in
    the same tree): setuptools would package the stale copy from build/lib, and an --inplace one
    would be imported from python/fastce."""

    def run(self):
        super().run()
        for name in SOURCES.keys() - {ext.name for ext in self.extensions}:
            stem = os.path.join(os.path.dirname(self.get_ext_fullpath(name)), name.rsplit(".", 1)[1])
            for stale in glob.glob(stem + ".*so"):
                os.remove(stale)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    # The wheel's tag: cp310-abi3 (the modules above are built with py_limited_api=True).
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
)
