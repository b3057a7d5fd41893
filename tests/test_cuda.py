"""CUDA-only tests: LLM vocabulary sizes, misaligned and strided rows, split rows, bf16/fp16
accuracy on confident rows, opcheck, torch.compile, CUDA graphs, CPU/CUDA agreement,
determinism and device-side target checks. Skipped without a GPU. The shared tests
(which take the `device` fixture) cover every option on CUDA as well."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce._ops import LossOptions
from reference import reference_cross_entropy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and fastce.has_cuda_kernels()),
                       reason="needs a GPU and a CUDA build of fastce"),
]

ops = torch.ops.fastce
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def fits(*shapes_bytes):
    """Whether tensors of these byte sizes (plus reference copies) fit in free GPU memory."""
    free, _ = torch.cuda.mem_get_info()
    return sum(shapes_bytes) < 0.8 * free


def ulp_slack(ref, dtype):
    """Half an ulp of the output dtype at each reference value: the rounding of the result."""
    fi = torch.finfo(dtype)
    return (ref.abs() * fi.eps).clamp_min(fi.smallest_normal * fi.eps) / 2


def check_against_float_torch(x, t, **kw):
    """fastce on x (any dtype) against torch's float32 cross-entropy on x.float()."""
    xf = x.detach().float().requires_grad_()
    ref = F.cross_entropy(xf, t, **kw)
    ref.backward()
    xx = x.detach().clone().requires_grad_()
    out = fastce.cross_entropy(xx, t, **kw)
    out.backward()
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xx.grad.float(), xf.grad.to(x.dtype).float(),
                               rtol=tol, atol=tol * xf.grad.abs().max().item())


# ---- LLM vocabularies ----------------------------------------------------------------
@pytest.mark.parametrize("V", [32000, 50257, 128256, 151936, 262144])
@pytest.mark.parametrize("N", [1, 77, 4096])
def test_vocab_sizes_bf16(N, V):
    if not fits(N * V * 2 * 2, N * V * 4 * 3):
        pytest.skip("not enough GPU memory")
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, V, (N,), device="cuda")
    t[1::7] = -100
    # lse is float64 (from float sums): compare it tightly with a float64 logsumexp.
    loss, _, lse, tw, _ = ops.cross_entropy_forward(x, t, None, *LossOptions(reduction=0))
    ref_lse = torch.logsumexp(x.double(), dim=1)
    keep = t != -100
    torch.testing.assert_close(lse[keep].double(), ref_lse[keep], rtol=2e-6, atol=1e-5)
    assert torch.all(lse[~keep] == 0) and torch.all(loss[~keep] == 0)
    assert tw.tolist() == [keep.sum().item()] * 2  # the total weight and the non-ignored rows
    check_against_float_torch(x, t)


@pytest.mark.parametrize("V", [32000, 50257, 262144])
@pytest.mark.parametrize("N", [1, 8, 77])
def test_vocab_sizes_fp32_options(N, V):
    """Few rows take the split-row path; every option on it against the float64 reference."""
    x = torch.randn(N, V, device="cuda") * 4
    t = torch.randint(0, V, (N,), device="cuda")
    w = torch.rand(V, device="cuda") + 0.5
    kw = dict(weight=w, label_smoothing=0.1, softcap=30.0, logit_scale=0.7, lse_square_scale=1e-3)
    xx = x.clone().requires_grad_()
    loss, z = fastce.cross_entropy(xx, t, return_z_loss=True, **kw)
    loss.backward()
    xr = x.double().requires_grad_()
    rloss, rz = reference_cross_entropy(xr, t, return_z_loss=True, **kw)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.double(), rz, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(xx.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("N", [1, 8])
def test_split_rows_probability_targets(N):
    V = 262144
    x = torch.randn(N, V, device="cuda") * 2
    y = torch.softmax(torch.randn(N, V, device="cuda") * 3, 1)
    w = torch.rand(V, device="cuda") + 0.5
    kw = dict(weight=w, label_smoothing=0.2, lse_square_scale=1e-2, reduction="sum")
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = fastce.cross_entropy(xx, yy, **kw)
    loss.backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    ref = reference_cross_entropy(xr, yr, **kw)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xx.grad.double(), xr.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(yy.grad.double(), yr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch(reduction):
    x = torch.randn(0, 50000, device="cuda", requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device="cuda")
    out = fastce.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x.detach(), t, reduction=reduction)
    torch.testing.assert_close(out.detach(), ref, equal_nan=True)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_more_than_2_pow_31_elements():
    """64-bit offsets: rows past element 2^31 give the right loss and gradient."""
    V = 262144
    N = (2**31) // V + 16
    if not fits(N * V * 2 * 2 + (1 << 30)):
        pytest.skip("not enough GPU memory")
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    xx = x.requires_grad_()
    loss = fastce.cross_entropy(xx, t, reduction="none")
    loss.sum().backward()
    tail = slice(N - 16, N)  # rows that start past element 2^31
    xf = x.detach()[tail].float().requires_grad_()
    ref = F.cross_entropy(xf, t[tail], reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss[tail].float(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xx.grad[tail].float(), xf.grad.bfloat16().float(), rtol=1e-2, atol=1e-4)


# ---- alignment and strides -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("V", [1000, 50257])
def test_misaligned_strided_rows(dtype, offset, V):
    """Row starts at every alignment (a view into a wider buffer), V not a multiple of 8."""
    N = 37
    buf = torch.randn(N, V + 13, device="cuda", dtype=dtype) * 2
    x = buf[:, offset:offset + V]
    assert x.stride(0) == V + 13 and not x.is_contiguous()
    t = torch.randint(0, V, (N,), device="cuda")
    t[3] = -100
    xr = x.detach().double().requires_grad_()
    ref = reference_cross_entropy(xr, t, reduction="none", label_smoothing=0.05)
    ref.sum().backward()
    tol = TOL[dtype]
    # The strided view itself (its gradient buffer is contiguous: a different alignment per
    # row), and a contiguous copy (same alignment for logits and gradient).
    for xx in (x.detach().requires_grad_(), x.detach().clone().requires_grad_()):
        out = fastce.cross_entropy(xx, t, reduction="none", label_smoothing=0.05)
        out.sum().backward()
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(xx.grad.double(), xr.grad.to(dtype).double(), rtol=tol, atol=tol / 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_probability_targets_misaligned_against_logits(dtype):
    """x and y with different alignments (targets and gradients at narrower widths), and the
    target gradient."""
    N, V = 9, 3001
    x = torch.randn(N, V + 5, device="cuda", dtype=dtype)[:, 1:V + 1]
    y = torch.softmax(torch.randn(N, V + 5, device="cuda"), 1).to(dtype)[:, 2:V + 2]
    xx = x.detach().requires_grad_()
    yy = y.detach().requires_grad_()
    out = fastce.cross_entropy(xx, yy, label_smoothing=0.1, lse_square_scale=1e-2)
    out.backward()
    xr = x.detach().double().requires_grad_()
    yr = y.detach().double().requires_grad_()
    ref = reference_cross_entropy(xr, yr, label_smoothing=0.1, lse_square_scale=1e-2)
    ref.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(xx.grad.double(), xr.grad, rtol=tol, atol=tol / 100)
    torch.testing.assert_close(yy.grad.double(), yr.grad, rtol=tol, atol=tol / 100)


# ---- accuracy on confident rows -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_confident_rows_true_class_gradient(dtype):
    """p_target close to 1: the target's gradient (p - 1) is no less accurate than torch's."""
    N, V = 512, 32000
    x = torch.randn(N, V, device="cuda") * 0.5
    t = torch.randint(0, V, (N,), device="cuda")
    rows = torch.arange(N, device="cuda")
    x[rows, t] = torch.linspace(12.0, 20.0, N, device="cuda")  # p_t from ~0.85 up to ~1 - 7e-5
    x = x.to(dtype)
    ref_x = x.double().requires_grad_()
    F.cross_entropy(ref_x, t, reduction="sum").backward()
    g_ref = ref_x.grad[rows, t]

    def target_grad(fn):
        xx = x.clone().requires_grad_()
        fn(xx, t, reduction="sum").backward()
        return xx.grad[rows, t].double()

    err_ours = (target_grad(fastce.cross_entropy) - g_ref).abs()
    err_torch = (target_grad(F.cross_entropy) - g_ref).abs()
    slack = 2 * ulp_slack(g_ref, dtype)
    assert torch.all(err_ours <= torch.maximum(1.5 * err_torch, slack)), (
        f"max error {err_ours.max().item():.3g} vs torch {err_torch.max().item():.3g}")


# ---- registration, compile, graphs ----------------------------------------------------------
def _opcheck_cases():
    x = torch.randn(6, 37, device="cuda", requires_grad=True)
    t = torch.randint(0, 37, (6,), device="cuda")
    y = torch.softmax(torch.randn(6, 37, device="cuda"), 1)
    w = torch.rand(37, device="cuda")
    return [
        (x, t, None, *LossOptions(1, -100, 0.0, 1.0, None, 0.0)),
        (x, t, w, *LossOptions(0, 2, 0.1, 2.0, 5.0, 1e-3)),
        (x, y, None, *LossOptions(2, -100, 0.2, 1.0, None, 0.0)),
        (torch.randn(2, 5, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True),
         torch.randint(0, 5, (2, 3), device="cuda"), None, *LossOptions()),
        (x, t + 30, None, *LossOptions(0, -100, 0.1, 0.8, 3.0, 1e-3, 40, 100)),  # a vocabulary slice
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck_cuda(case):
    args = _opcheck_cases()[case]
    torch.library.opcheck(ops.cross_entropy_forward.default, args)
    torch.library.opcheck(ops.cross_entropy_forward.default, args, {"compute_grad": True})
    torch.library.opcheck(ops.cross_entropy_forward.default, args, {"loss_dtype": torch.float64})


def test_opcheck_backward_cuda():
    x = torch.randn(6, 37, device="cuda")
    t = torch.randint(0, 37, (6,), device="cuda")
    _, _, lse, tw, _ = ops.cross_entropy_forward(x, t, None)
    g = torch.tensor(1.0, device="cuda")
    torch.library.opcheck(ops.cross_entropy_backward.default, (g, g, x, t, None, lse, tw, *LossOptions()))


def test_torch_compile_fullgraph_cuda():
    def f(x, t):
        return fastce.cross_entropy(x, t, label_smoothing=0.1, softcap=20.0) * 2

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(64, 5003, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 5003, (64,), device="cuda")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = f(xa, t), compiled(xb, t)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_graph_capture_forward_backward(inplace):
    N, V = 128, 32000
    static_logits = torch.randn(N, V, device="cuda", requires_grad=True)
    static_t = torch.randint(0, V, (N,), device="cuda")
    w = torch.rand(V, device="cuda")

    def step():
        h = static_logits * 1.0  # not a leaf: in-place backward may overwrite it
        h.retain_grad()
        loss = fastce.cross_entropy(h, static_t, weight=w, label_smoothing=0.1, inplace_backward=inplace)
        loss.backward()
        return loss, h.grad

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss, static_grad = step()

    for _ in range(2):
        with torch.no_grad():
            static_logits.copy_(torch.randn(N, V, device="cuda"))
        static_t.copy_(torch.randint(0, V, (N,), device="cuda"))
        static_t[::5] = -100
        g.replay()
        ref_loss, ref_grad = step()
        assert torch.equal(static_loss, ref_loss)
        assert torch.equal(static_grad, ref_grad)


# ---- CPU agreement, determinism, errors ----------------------------------------------------
CPU_CASES = [
    dict(),
    dict(reduction="sum", label_smoothing=0.2),
    dict(reduction="none", ignore_index=3),
    dict(weight=True, label_smoothing=0.1, lse_square_scale=1e-2),
    dict(softcap=10.0, logit_scale=1.5, reduction="none"),
    dict(prob=True, weight=True, label_smoothing=0.3),
    dict(kdim=True, weight=True),
    dict(target_dtype=torch.int32, ignore_index=0),
    dict(target_dtype=torch.uint8, reduction="sum"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_cpu_cuda_agree(dtype, case):
    kw = dict(CPU_CASES[case])
    prob, kdim = kw.pop("prob", False), kw.pop("kdim", False)
    target_dtype = kw.pop("target_dtype", torch.int64)
    N, V = 33, 700
    shape = (N, V, 3) if kdim else (N, V)
    x = torch.randn(shape, dtype=dtype) * 3
    if prob:
        t = torch.softmax(torch.randn(shape), 1).to(dtype)
    else:
        t = torch.randint(0, min(V, 200), (N, 3) if kdim else (N,)).to(target_dtype)
        if "ignore_index" not in kw and target_dtype == torch.int64:
            t[::4] = -100
    if kw.get("weight"):
        kw["weight"] = torch.rand(V, dtype=dtype) + 0.1
    outs = {}
    for dev in ("cpu", "cuda"):
        xx = x.to(dev).requires_grad_()
        dkw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kw.items()}
        loss, z = fastce.cross_entropy(xx, t.to(dev), return_z_loss=True, **dkw)
        loss.sum().backward()
        outs[dev] = (loss.detach().cpu(), z.detach().cpu(), xx.grad.cpu())
    tol = TOL[dtype] * (10 if dtype in (torch.float32, torch.float64) else 1)
    for a, b in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol)


SLICE_OPTIONS = [LossOptions(0, -100, 0.1, 0.8, 3.0, 0.0, 1000, 5000),
                 LossOptions(1, -100, 0.0, 1.0, None, 1e-3, 0, 3000),
                 LossOptions(2, 7, 0.2, 1.0, None, 0.0, 4000, 5000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("opt", SLICE_OPTIONS, ids=str)
@pytest.mark.parametrize("N", [5, 3000])  # few rows: split rows
def test_slice_options_and_loss_dtype_agree_with_cpu(dtype, opt, N):
    # The vocabulary-parallel ops' options (class_offset, vocab_size) and a float64 loss: the CUDA
    # kernels give the CPU backend's results (up to the order of float sums).
    C = 1000
    x = (torch.randn(N, C, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, opt.vocab_size, (N,))
    t[::3] = opt.class_offset + torch.randint(0, C, (len(t[::3]),))  # targets in the slice
    t[1::5] = opt.ignore_index
    out = {}
    for dev in ("cpu", "cuda"):
        xd, td = x.to(dev), t.to(dev)
        loss, z, lse, tw, grad = ops.cross_entropy_forward(xd, td, None, *opt, compute_grad=True,
                                                           loss_dtype=torch.float64)
        gen = torch.Generator().manual_seed(1)
        g = torch.rand(lse.shape[:-1] if opt.reduction == 0 else (), dtype=torch.float64, generator=gen).to(dev)
        gx, _ = ops.cross_entropy_backward(g, torch.zeros_like(g), xd, td, None, lse, tw, *opt)
        out[dev] = [v.cpu() for v in (loss, z, lse, tw, grad, gx)]
    tol = TOL[dtype] * (10 if dtype in (torch.float32, torch.float64) else 1)
    for a, b in zip(out["cpu"], out["cuda"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol)


def test_vocab_parallel_runs_the_cuda_kernels_on_one_rank():
    # One rank holding the whole vocabulary (gloo needs no second GPU): the same loss and gradient
    # as fastce.cross_entropy, through the slice options on CUDA.
    import tempfile
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            x = torch.randn(64, 5003, device="cuda", dtype=torch.bfloat16)
            t = torch.randint(0, 5003, (64,), device="cuda")
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            la = fastce.vocab_parallel_cross_entropy(xa, t, label_smoothing=0.1, vocab_start=0, vocab_size=5003)
            lb = fastce.cross_entropy(xb, t, label_smoothing=0.1)
            la.backward()
            lb.backward()
        finally:
            dist.destroy_process_group()
    torch.testing.assert_close(la.float(), lb.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 262144), (4096, 32000), (3, 5)])
def test_deterministic(shape):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, shape[1], shape[:1], device="cuda")
    results = []
    for _ in range(3):
        xx = x.clone().requires_grad_()
        loss = fastce.cross_entropy(xx, t, label_smoothing=0.1)
        loss.backward()
        results.append((loss, xx.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_many_rows_two_stage_reduction(reduction):
    """More rows than one reduction block takes (two stages of fixed ranges): the CPU backend's
    values, the same bits run to run; 'none' and loss_dtype written per row by the kernel."""
    N, V = 20000, 50
    x = torch.randn(N, V, device="cuda")
    t = torch.randint(0, V, (N,), device="cuda")
    t[::5] = -100
    w = torch.rand(V, device="cuda") + 0.5
    outs = [ops.cross_entropy_forward(x, t, w, *LossOptions(reduction={"none": 0, "mean": 1, "sum": 2}[reduction],
                                                            lse_square_scale=1e-3), False, torch.float64)
            for _ in range(2)]
    ref = ops.cross_entropy_forward(x.cpu(), t.cpu(), w.cpu(), *LossOptions(
        reduction={"none": 0, "mean": 1, "sum": 2}[reduction], lse_square_scale=1e-3), False, torch.float64)
    for a, b in zip(outs[0][:4], outs[1][:4]):
        assert torch.equal(a, b)
    for got, want in zip(outs[0][:4], ref[:4]):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


def test_no_host_sync():
    """Forward and backward queue work only: no device-to-host synchronization."""
    x = torch.randn(64, 3000, device="cuda", requires_grad=True)
    t = torch.randint(0, 3000, (64,), device="cuda")
    fastce.cross_entropy(x, t).backward()  # warm-up (first-call host queries)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fastce.cross_entropy(x, t, label_smoothing=0.1, weight=torch.ones(3000, device="cuda"))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_device_mismatch_is_an_error():
    x = torch.randn(4, 10, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        fastce.cross_entropy(x, torch.randint(0, 10, (4,)))


@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_target_device_assert(bad):
    """A class index out of range trips a device-side assert (in a child process, since it
    poisons the CUDA context), as torch's own kernel does."""
    code = textwrap.dedent(f"""
        import torch, fastce
        x = torch.randn(4, 10, device="cuda")
        t = torch.tensor([1, 2, {bad}, 3], device="cuda")
        fastce.cross_entropy(x, t)
        torch.cuda.synchronize()
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "device-side assert" in r.stderr or "Assertion" in r.stderr, r.stderr[-2000:]
