"""The token ops' CUDA kernels (csrc/cuda/token.cu) run on the CPU under the host emulation of
the CUDA execution model (shim.h), against float64 references from the definitions and against
the CPU backend: every dtype, K tokens per row, temperature, logit_scale and softcap, strided
and misaligned rows, masked (-inf) logits, gradients of both outputs, the device assert.
Opt-in, like test_emulation.py: FASTCE_CUDA_EMULATION=1 (needs g++ and the CUDA headers)."""
import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch

import fastce  # noqa: F401  (the CPU ops, to compare with)

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "..", "csrc", "cuda")
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

pytestmark = pytest.mark.skipif(
    os.environ.get("FASTCE_CUDA_EMULATION") != "1" or shutil.which("g++") is None
    or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
    reason="opt-in (FASTCE_CUDA_EMULATION=1), needs g++ and the CUDA headers (CUDA_HOME)")

DT = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # rules.h: Dtype
MAX_LEAD = 6  # token_launch.h: kTokenMaxLead
i64, dbl, ptr_t = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class EmuTokens(ctypes.Structure):  # token_api.cpp
    _fields_ = [("dtype", ctypes.c_int), ("x", ptr_t), ("lead", ctypes.c_int), ("sizes", i64 * MAX_LEAD),
                ("strides", i64 * MAX_LEAD), ("rows", i64), ("classes", i64), ("K", i64), ("index", ptr_t)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("token_emulation")
    common = open(os.path.join(CSRC, "common.cuh")).read()
    common = common.replace('#include "launch.h"', f'#include "{os.path.join(CSRC, "launch.h")}"')
    (out / "common.cuh").write_text('#include "shim.h"\n' + common)
    src = open(os.path.join(CSRC, "token.cu")).read()
    src = src.replace('#include "token_launch.h"', f'#include "{os.path.join(CSRC, "token_launch.h")}"')
    src = re.sub(r"(\w+(?:<[^;<>]*>)?)<<<([^>]*)>>>\(([^;]*)\);", r"emu_launch(\1, \2, \3);", src)
    assert "<<<" not in src, "a launch in token.cu the emulator cannot rewrite"
    (out / "token_emu.inc").write_text(src)
    so = out / "libtokenemu.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{out}", f"-I{HERE}",
                    f"-I{CUDA_INCLUDE}", os.path.join(HERE, "token_api.cpp"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.emu_token_forward.argtypes = [ptr_t, dbl, dbl, dbl, ptr_t, ptr_t, ptr_t, ptr_t]
    lib.emu_token_backward.argtypes = [ptr_t, dbl, dbl, dbl] + [ptr_t] * 5
    return lib


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Emulated:
    """The emulated kernels on logits (*, V) of unit class stride, as the driver calls them."""

    def __init__(self, lib, x, index, temperature=1.0, logit_scale=1.0, softcap=None):
        assert x.stride(-1) == 1 and x.dim() - 1 <= MAX_LEAD
        self.lib, self.x = lib, x
        self.index = (index if index.dim() == x.dim() else index.unsqueeze(-1)).long().contiguous()
        self.K = self.index.shape[-1]
        self.rows = x[..., 0].numel() if x.shape[-1] else int(torch.tensor(x.shape[:-1]).prod())
        lead = x.dim() - 1
        self.p = EmuTokens(DT[x.dtype], x.data_ptr(), lead, (i64 * MAX_LEAD)(*x.shape[:-1]),
                           (i64 * MAX_LEAD)(*x.stride()[:-1]), self.rows, x.shape[-1], self.K, self.index.data_ptr())
        self.opts = (temperature, logit_scale, 0.0 if softcap is None else softcap)

    def forward(self, entropy=True, argmax=False):
        lp = torch.full((self.rows, self.K), float("nan"), dtype=acc(self.x.dtype))
        h = torch.full((self.rows,), float("nan"), dtype=acc(self.x.dtype)) if entropy else None
        lse = torch.full((self.rows,), float("nan"), dtype=torch.float64)
        arg = torch.full((self.rows,), -2, dtype=torch.long) if argmax else None
        rc = self.lib.emu_token_forward(ctypes.byref(self.p), *self.opts, lp.data_ptr(),
                                        None if h is None else h.data_ptr(), lse.data_ptr(),
                                        None if arg is None else arg.data_ptr())
        return (rc, lp, h, lse, arg) if argmax else (rc, lp, h, lse)

    def backward(self, g_lp, g_h, lse, h):
        gx = torch.full((self.rows, self.x.shape[-1]), float("nan"), dtype=self.x.dtype)
        g_lp = None if g_lp is None else g_lp.double().contiguous()
        g_h = None if g_h is None else g_h.double().contiguous()
        rc = self.lib.emu_token_backward(ctypes.byref(self.p), *self.opts,
                                         *(None if t is None else t.data_ptr() for t in (g_lp, g_h, lse, h)),
                                         gx.data_ptr())
        return rc, gx


def reference(x, index, temperature, logit_scale, softcap):
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return logp.gather(-1, index), -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


TOL = {torch.float32: dict(rtol=1e-5, atol=3e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=1e-5, atol=3e-5), torch.float16: dict(rtol=1e-5, atol=3e-5)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12),
            torch.bfloat16: dict(rtol=1e-2, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=1e-5)}
OPTIONS = [(1.0, 1.0, None), (0.7, 1.0, None), (1.3, 0.6, 4.0)]


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("classes", [37, 3001])
@pytest.mark.parametrize("option", range(len(OPTIONS)))
@pytest.mark.parametrize("offset", [0, 3])  # misaligned rows
def test_against_reference_and_the_cpu_backend(lib, dtype, classes, option, offset):
    temperature, scale, cap = OPTIONS[option]
    full = (torch.randn(3, 4, classes + 7, dtype=torch.float64) * 3).to(dtype)
    x = full[:, :-1, offset:offset + classes]  # strided rows
    x[0, 0, : classes // 2] = float("-inf")  # masked vocabulary
    index = torch.randint(0, classes, (3, 3, 2))
    index[0, 0, 0] = 0  # a masked token
    index[1, 1] = 5     # the same token twice
    e = Emulated(lib, x, index, temperature, scale, cap)
    rc, lp, h, lse = e.forward()
    assert rc == 0
    want_lp, want_h = reference(x, index, temperature, scale, cap)
    torch.testing.assert_close(lp.double().reshape(3, 3, 2), want_lp, **TOL[dtype])
    torch.testing.assert_close(h.double().reshape(3, 3), want_h, **TOL[dtype])
    assert torch.isfinite(h).all()
    assert cap is not None or lp[0, 0] == float("-inf")  # (softcap maps -inf to -softcap)
    cpu_lp, cpu_h, cpu_lse, _ = torch.ops.fastce.token_logprobs_forward(x, index, temperature, scale, cap, True)
    torch.testing.assert_close(lse.reshape(3, 3), cpu_lse, rtol=1e-6, atol=1e-6)

    g_lp, g_h = torch.randn(9, 2, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    rc, gx = e.backward(g_lp, g_h, lse, h.double())
    assert rc == 0
    cpu_gx = torch.ops.fastce.token_logprobs_backward(g_lp.reshape(3, 3, 2), g_h.reshape(3, 3), x, index, cpu_lse,
                                                      cpu_h, temperature, scale, cap)
    xr = x.double().requires_grad_()
    r_lp, r_h = reference(xr, index, temperature, scale, cap)
    ref_gx, = torch.autograd.grad((r_lp * g_lp.reshape(3, 3, 2)).sum() + (r_h * g_h.reshape(3, 3)).sum(), xr)
    torch.testing.assert_close(gx.double().reshape(3, 3, classes), ref_gx, **GRAD_TOL[dtype])
    torch.testing.assert_close(gx.double().reshape(3, 3, classes), cpu_gx.double(), **GRAD_TOL[dtype])

    rc, gx_lp = e.backward(g_lp, None, lse, None)  # log-probs only
    cpu_only = torch.ops.fastce.token_logprobs_backward(g_lp.reshape(3, 3, 2), None, x, index, cpu_lse, cpu_h,
                                                        temperature, scale, cap)
    torch.testing.assert_close(gx_lp.double().reshape(3, 3, classes), cpu_only.double(), **GRAD_TOL[dtype])


def test_entropy_alone_and_empty_rows(lib):
    x = torch.randn(5, 300)
    e = Emulated(lib, x, torch.zeros(5, 0, dtype=torch.long))
    rc, lp, h, _ = e.forward()
    assert rc == 0 and lp.shape == (5, 0)
    torch.testing.assert_close(h, torch.ops.fastce.token_logprobs_forward(x, torch.zeros(5, 0, dtype=torch.long),
                                                                          1.0, 1.0, None, True)[1])


@pytest.mark.parametrize("dtype", list(DT))
def test_argmax_as_torch_argmax(lib, dtype):
    x = (torch.randn(8, 3001, dtype=torch.float64) * 3).to(dtype)
    x[0] = 1.0                          # ties everywhere: the first
    x[1, 2000] = x[1, 7] = 50.0         # a tie between lanes
    x[2, 3000] = 60.0                   # the last class
    x[3, 1500] = float("nan")
    x[3, 2500] = float("nan")
    x[4] = float("-inf")
    x[5, :1500] = float("-inf")
    x[6, 10] = float("inf")
    rc, _, _, _, arg = Emulated(lib, x, torch.zeros(8, 0, dtype=torch.long), 0.9, -0.7, None).forward(argmax=True)
    assert rc == 0
    assert torch.equal(arg, (x.double() * -0.7).argmax(-1))
    rc, _, _, _, arg = Emulated(lib, x, torch.zeros(8, 0, dtype=torch.long)).forward(argmax=True)
    assert torch.equal(arg, x.double().argmax(-1))
    rc, lp, h, lse = Emulated(lib, torch.full((2, 40), float("-inf")), torch.zeros(2, dtype=torch.long)).forward()
    assert rc == 0 and torch.isnan(lp).all() and torch.isnan(h).all()


def test_an_index_out_of_bounds_is_a_device_assert(lib):
    rc, *_ = Emulated(lib, torch.randn(3, 10), torch.tensor([1, 10, 2])).forward()
    assert rc == -1
