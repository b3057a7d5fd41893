import pytest
import torch

import fastce

CUDA = torch.cuda.is_available() and fastce.has_cuda_kernels()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test that takes `device` runs on the CPU, and on CUDA when a GPU is present."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
