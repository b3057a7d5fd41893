"""The CUDA kernels (csrc/cuda/forward.cu, backward.cu) run on the CPU under a host emulation
of the CUDA execution model (shim.h: a thread per CUDA thread, barriers for warp shuffles),
against the float64 reference: every dtype and option, split rows, misaligned rows, in-place
backward, determinism, the target-gradient accuracy on confident rows, and the device assert.
For machines without a GPU; opt-in (about a minute on 2 cores): FASTCE_CUDA_EMULATION=1.
Needs g++ with C++20 and the CUDA headers (CUDA_HOME)."""
import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from reference import reference_cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "..", "csrc", "cuda")
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

pytestmark = pytest.mark.skipif(
    os.environ.get("FASTCE_CUDA_EMULATION") != "1" or shutil.which("g++") is None
    or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
    reason="opt-in (FASTCE_CUDA_EMULATION=1), needs g++ and the CUDA headers (CUDA_HOME)")

DT = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 3e-3}
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """Builds the kernels' sources, launches rewritten for the emulator, into a shared library."""
    out = tmp_path_factory.mktemp("cuda_emulation")
    common = open(os.path.join(CSRC, "common.cuh")).read()
    common = common.replace('#include "launch.h"', f'#include "{os.path.join(CSRC, "launch.h")}"')
    (out / "common_emu.cuh").write_text('#include "shim.h"\n' + common)
    for name in ("forward", "backward"):
        src = open(os.path.join(CSRC, name + ".cu")).read().replace('"common.cuh"', '"common_emu.cuh"')
        src = re.sub(r"(\w+<[^;<>]*>)<<<([^>]*)>>>\(([^;]*)\);", r"emu_launch(\1, \2, \3);", src)
        assert "<<<" not in src, f"a launch in {name}.cu the emulator cannot rewrite"
        (out / f"{name}_emu.inc").write_text(src)
    so = out / "libemu.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{HERE}/stub", f"-I{HERE}",
                    f"-I{out}", f"-I{CUDA_INCLUDE}", os.path.join(HERE, "api.cpp"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    i64, p, d = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    common_args = [ctypes.c_int, p, i64, p, i64, p, p, i64, i64, i64, d, d, d, d, ctypes.c_int, i64]
    lib.emu_forward.restype = lib.emu_backward.restype = i64
    lib.emu_forward.argtypes = common_args + [p] * 7
    lib.emu_backward.argtypes = common_args + [p] * 5 + [i64, p, i64]
    return lib


def ptr(t):
    return None if t is None else t.data_ptr()


def run(lib, x, t, w=None, eps=0.0, scale=1.0, cap=0.0, sq=0.0, red=1, sm=132, grad_y=False, gx=None):
    """Forward then backward (random upstream gradients) as the driver launches them.
    Returns (pieces per row, loss, z_loss, lse, total_weight, grad_loss, grad_z_loss, gx, gy)."""
    rows, C = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    prob = t.shape == x.shape
    tl = None if prob else t.long().contiguous()
    wa = None if w is None else w.to(acc).contiguous()
    lse = torch.empty(rows, dtype=torch.float64)
    rl, rz, rw = (torch.empty(rows, dtype=acc) for _ in range(3))
    loss, zl, tw = torch.empty((), dtype=x.dtype), torch.empty((), dtype=x.dtype), torch.empty((), dtype=acc)
    args = [DT[x.dtype], ptr(x), x.stride(0), ptr(t) if prob else None, t.stride(0) if prob else 0, ptr(tl),
            ptr(wa), rows, C, -100, eps, scale, cap, sq, sm, red]
    chunks = lib.emu_forward(*args, ptr(lse), ptr(rl), ptr(rz), ptr(rw), ptr(loss), ptr(zl), ptr(tw))
    if red == 0:
        loss, zl = rl.to(x.dtype), rz.to(x.dtype)
    gl = torch.rand(rows if red == 0 else 1, dtype=acc) + 0.5
    gz = torch.rand(rows if red == 0 else 1, dtype=acc)
    gx = torch.full((rows, C), float("nan"), dtype=x.dtype) if gx is None else gx
    gy = torch.full((rows, C), float("nan"), dtype=x.dtype) if grad_y else None
    chunks_b = lib.emu_backward(*args, ptr(gl), ptr(gz), ptr(lse), ptr(tw), ptr(gx), gx.stride(0), ptr(gy),
                                gy.stride(0) if grad_y else 0)
    assert chunks_b == chunks
    return chunks, loss, zl, lse, tw, gl, gz, gx, gy


OPTIONS = [  # prob, weight, label_smoothing, softcap, lse_square_scale, reduction
    (False, False, 0.0, 0.0, 0.0, 1), (False, True, 0.1, 0.0, 0.01, 0), (False, True, 0.0, 5.0, 0.0, 2),
    (True, False, 0.0, 0.0, 0.0, 1), (True, True, 0.2, 3.0, 0.01, 0)]
SHAPES = [(5, 37, 132), (3, 3001, 1), (2, 9000, 1), (1, 1, 132)]  # rows, classes, SMs (1: split rows)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", range(len(OPTIONS)))
@pytest.mark.parametrize("offsets", [(0, 0), (1, 3)])  # row start offsets of logits and targets
def test_against_reference(lib, dtype, shape, option, offsets):
    N, C, sm = shape
    prob, has_w, eps, cap, sq, red = OPTIONS[option]
    x = (torch.randn(N, C + 7, dtype=torch.float64) * 3).to(dtype)[:, offsets[0]:offsets[0] + C]
    if prob:
        t = torch.softmax(torch.randn(N, C + 7, dtype=torch.float64), 1).to(dtype)[:, offsets[1]:offsets[1] + C]
    else:
        t = torch.randint(0, C, (N,))
        t[1::4] = -100
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype) if has_w else None
    _, loss, zl, _, _, gl, gz, gx, gy = run(lib, x, t, w, eps, 1.3, cap, sq, red, sm, grad_y=prob)
    xr = x.double().requires_grad_()
    yr = t.double().requires_grad_() if prob else t
    rl, rz = reference_cross_entropy(xr, yr, weight=None if w is None else w.double(), reduction=REDUCTIONS[red],
                                     label_smoothing=eps, logit_scale=1.3, softcap=cap or None,
                                     lse_square_scale=sq, return_z_loss=True)
    ((rl * gl.double().reshape(rl.shape)).sum() + (rz * gz.double().reshape(rz.shape)).sum()).backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), rl.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(zl.double(), rz.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), xr.grad.to(dtype).double(), rtol=tol,
                               atol=tol * xr.grad.abs().max().item() * 0.1)
    if prob:
        torch.testing.assert_close(gy.double(), yr.grad.to(dtype).double(), rtol=tol,
                                   atol=tol * yr.grad.abs().max().item() * 0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset,sm", [(0, 132), (1, 1)])
def test_inplace_backward_matches(lib, dtype, offset, sm):
    N, C = 6, 4099
    x = (torch.randn(N, C + 5) * 3).to(dtype)[:, offset:offset + C]
    t = torch.randint(0, C, (N,))
    t[2] = -100
    torch.manual_seed(3)
    *_, gx, _ = run(lib, x.clone(), t, eps=0.1, sm=sm)
    inplace = x.clone()
    torch.manual_seed(3)
    run(lib, inplace, t, eps=0.1, sm=sm, gx=inplace)
    assert torch.equal(inplace, gx)


def test_deterministic_split_rows(lib):
    x = torch.randn(3, 20000).bfloat16()
    t = torch.randint(0, 20000, (3,))
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        results.append(run(lib, x, t, eps=0.1, sm=1))
    assert results[0][0] > 1
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][7], results[1][7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sm", [132, 1])
def test_confident_rows_target_gradient(lib, dtype, sm):
    N, V = 32, 32000
    x = torch.randn(N, V) * 0.5
    t = torch.randint(0, V, (N,))
    rows = torch.arange(N)
    x[rows, t] = torch.linspace(12.0, 20.0, N)
    x = x.to(dtype)
    xr = x.double().requires_grad_()
    F.cross_entropy(xr, t, reduction="sum").backward()
    g_ref = xr.grad[rows, t]
    *_, gl, _, gx, _ = run(lib, x, t, red=2, sm=sm)
    ours = gx[rows, t].double() / gl.double()
    fi = torch.finfo(dtype)
    assert torch.all((ours - g_ref).abs() <= (g_ref.abs() * fi.eps).clamp_min(fi.smallest_normal * fi.eps))


def test_out_of_range_target_asserts(lib):
    x = torch.randn(4, 50)
    t = torch.tensor([1, 2, 50, 3])
    outs = [torch.empty(4, dtype=torch.float64)] + [torch.empty(4) for _ in range(3)] + \
        [torch.empty(()) for _ in range(3)]  # lse (float64), per-row outputs, reductions
    assert lib.emu_forward(0, ptr(x), 50, None, 0, ptr(t), None, 4, 50, -100, 0.0, 1.0, 0.0, 0.0, 132, 1,
                           *map(ptr, outs)) == -1


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("C,sm,inplace", [(40, 132, False), (9000, 1, False), (9000, 1, True)])
@pytest.mark.parametrize("prob", [False, True])
def test_rows_whose_max_is_a_huge_tie(lib, dtype, eps, C, sm, inplace, prob):
    # Rows masked entirely with a huge constant, or whose largest logits tie at a huge value:
    # their max and log-sum are kept apart (recomputed before the gradient, also in place over
    # split rows); torch gives log(k) and 1/k.
    huge = {torch.float64: -1e300, torch.float32: -3e38, torch.bfloat16: -1e30, torch.float16: -65504.0}[dtype]
    x = torch.randn(5, C, dtype=torch.float64).to(dtype)
    x[1] = huge
    x[2, :3] = -huge / 4
    x[3] = 1e12 if dtype in (torch.float32, torch.float64) else huge
    x[4] = -3e5 if dtype != torch.float16 else -6e4  # below 2^19: a float lse would round log(sum) away
    t = torch.softmax(torch.randn(5, C, dtype=torch.float64), 1).to(dtype) if prob else torch.tensor([0, 1, 2, 3, 4])
    gx = x.clone() if inplace else None
    _, loss, _, _, _, gl, _, gx, _ = run(lib, x.clone(), t, eps=eps, red=0, sm=sm, gx=gx)
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, t.double() if prob else t, reduction="none", label_smoothing=eps)
    (ref * gl.double()).sum().backward()
    tol = TOL[dtype]
    # Row 4's loss with smoothing or probability targets subtracts float sums of z from the lse
    # (their rounding, |z| * 2^-24 relative, is not a huge row's): its gradient is checked.
    checked = slice(None) if eps == 0 and not prob else slice(0, 4)
    torch.testing.assert_close(loss.double()[checked], ref.detach().to(dtype).double()[checked], rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), xr.grad.to(dtype).double(), rtol=tol, atol=tol * 0.1)
