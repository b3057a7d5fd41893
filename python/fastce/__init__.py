"""fastce: fast, exact cross-entropy for PyTorch (C++/CUDA kernels)."""
import torch

from . import _ops  # noqa: F401  (loads the kernels, registers fake kernels and autograd)
from .functional import cross_entropy
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import CrossEntropyLoss
from .parallel import vocab_parallel_cross_entropy

__version__ = "0.1.0"


def cpu_isa() -> str:
    """The instruction set the CPU kernels use (set FASTCE_CPU_ISA to force one)."""
    return torch.ops.fastce.cpu_isa()


def has_cuda_kernels() -> bool:
    """Whether this build carries the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastce::cross_entropy_forward", "CUDA")


__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss", "vocab_parallel_cross_entropy", "cpu_isa", "has_cuda_kernels", "__version__"]
