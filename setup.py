"""Builds fastce._C (the CPU kernels) always, and fastce._C_cuda (the CUDA kernels) when asked for
or possible.

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

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name):
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def want_cuda():
    if flag("FASTCE_NO_CUDA"):
        return False
    if flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    debug, sanitize = flag("FASTCE_DEBUG"), flag("FASTCE_SANITIZE")
    opt = ["-O0", "-g"] if debug or sanitize else ["-O3"]
    stable = ["-DTORCH_TARGET_VERSION=0x020b000000000000", "-fvisibility=hidden"]
    cxx = opt + stable + ["-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
    link = ["-fopenmp"]
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx += san
        link += san
    return CppExtension("fastce._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
                        py_limited_api=True)


def cuda_extension():
    """fastce._C_cuda, the CUDA kernels (csrc/cuda/), or None when not built. A separate module on
    the stable ABI and Python's limited API, with hidden symbols (it carries its own copy of the
    shared core: csrc/cuda/core.cpp); fastce imports it where it loads (a CUDA build of torch)."""
    if not want_cuda():
        return None
    if torch.version.cuda is None or CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (set CUDA_HOME)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    opt = ["-O0", "-g"] if flag("FASTCE_DEBUG") else ["-O3"]
    stable = ["-DTORCH_TARGET_VERSION=0x020b000000000000"]  # (torch adds Py_LIMITED_API: py_limited_api)
    hidden = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    # USE_CUDA: the stable shim declares its CUDA entry points (the current stream) only under it.
    cxx = opt + stable + hidden + ["-DUSE_CUDA", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    # No fast-math: logf/tanhf stay exact.
    nvcc = opt + stable + [f"-Xcompiler={f}" for f in hidden] + ["--expt-relaxed-constexpr", "-lineinfo"]
    if flag("FASTCE_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    sources = sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension("fastce._C_cuda", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         py_limited_api=True)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[extension()] + [m for m in [cuda_extension()] if m is not None],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
