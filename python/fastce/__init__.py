"""fastce: fast, exact cross-entropy for PyTorch (C++/CUDA kernels)."""
import torch

from . import _C, _ops  # noqa: F401  (_ops: loads the kernels, registers fake kernels and autograd)

try:  # the CUDA kernels: a separate library, built only with a CUDA toolkit and loadable only
    from . import _C_cuda  # noqa: F401  with a CUDA build of torch
except ImportError:
    _C_cuda = None
from .functional import cross_entropy
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import CrossEntropyLoss
from .parallel import vocab_parallel_cross_entropy
from .token import CrossEntropyOutput, entropy, linear_token_logprobs, token_logprobs

__version__ = "0.1.0"


def cpu_isa() -> str:
    """The instruction set the CPU kernels use (set FASTCE_CPU_ISA to force one)."""
    return torch.ops.fastce.cpu_isa()


def empty_cache() -> None:
    """Unmaps the CPU gradient buffer that fastce keeps for reuse, if any.

    A CPU gradient of 4 MiB or more lives in memory fastce maps itself (with transparent huge
    pages); when it is freed, fastce keeps that memory, one buffer at a time, for the next
    gradient of a similar size, so that a training step does not pay the page faults of fresh
    memory. ``FASTCE_CPU_GRAD_CACHE=0`` turns the keeping off."""
    torch.ops.fastce.empty_cache()


def has_cuda_kernels() -> bool:
    """Whether this build carries the CUDA kernels."""
    return _C_cuda is not None


__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss", "vocab_parallel_cross_entropy", "token_logprobs", "entropy", "linear_token_logprobs", "CrossEntropyOutput", "cpu_isa", "empty_cache", "has_cuda_kernels", "__version__"]
