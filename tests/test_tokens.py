"""Per-token outputs (fastce.token_logprobs, fastce.entropy, fastce.linear_token_logprobs)
against float64 references written from the definitions, their gradients, the registered ops
(opcheck, torch.compile) and the fused LM head's memory."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastce
from fastce.token import TokenOptions

ops = torch.ops.fastce
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ---- references from the definitions ---------------------------------------------------------

def ref_z(x, temperature=1.0, logit_scale=1.0, softcap=None):
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_logprobs(z, index):
    logp = torch.log_softmax(z, -1)
    if index.dim() == z.dim() - 1:
        return logp.gather(-1, index.long().unsqueeze(-1)).squeeze(-1)
    return logp.gather(-1, index.long())


def ref_entropy(z):
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    # 0 log 0 = 0 for masked classes (also in the gradient: logp is masked, not the product)
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def tol(dtype):
    # The kernels read the same (rounded) logits as the reference and accumulate in float.
    return dict(rtol=1e-5, atol=3e-5) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)


def logits_of(shape, dtype, scale=4.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


# ---- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [None, 1, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("classes", [7, 100, 5003])
def test_logprobs_and_entropy_match_the_definitions(dtype, K, temperature, classes):
    x = logits_of((3, 4, classes), dtype)
    index = torch.randint(0, classes, (3, 4) if K is None else (3, 4, K))
    lp, h = fastce.token_logprobs(x, index, temperature=temperature, return_entropy=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == h.dtype == acc
    assert lp.shape == index.shape and h.shape == (3, 4)
    z = ref_z(x, temperature)
    torch.testing.assert_close(lp.double(), ref_logprobs(z, index), **tol(dtype))
    torch.testing.assert_close(h.double(), ref_entropy(z), **tol(dtype))
    torch.testing.assert_close(fastce.entropy(x, temperature=temperature), h, rtol=0, atol=0)
    torch.testing.assert_close(fastce.token_logprobs(x, index, temperature=temperature), lp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set_gives_the_same_results(dtype, isa, monkeypatch):
    if isa != "generic":
        monkeypatch.setenv("FASTCE_CPU_ISA", isa)
        try:
            fastce.cpu_isa()
            assert fastce.cpu_isa() == isa
        except Exception:
            pytest.skip(f"{isa} is not supported here")
    else:
        monkeypatch.setenv("FASTCE_CPU_ISA", "generic")
    x = logits_of((9, 2061), dtype)
    x[0, :50] = float("-inf")
    index = torch.randint(0, 2061, (9, 2))
    lp, h = fastce.token_logprobs(x, index, temperature=0.8, return_entropy=True)
    z = ref_z(x, 0.8)
    torch.testing.assert_close(lp.double(), ref_logprobs(z, index), **tol(dtype))
    torch.testing.assert_close(h.double(), ref_entropy(z), **tol(dtype))
    xg = x.detach().requires_grad_()
    lp, h = fastce.token_logprobs(xg, index, temperature=0.8, return_entropy=True)
    (lp.sum() + h.sum()).backward()
    zr = (x.double() / 0.8).requires_grad_()
    (ref_logprobs(zr, index).sum() + ref_entropy(zr).sum()).backward()
    torch.testing.assert_close(xg.grad.double(), zr.grad / 0.8, **grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_logit_scale_softcap_then_temperature(dtype, softcap):
    x = logits_of((5, 301), dtype)
    index = torch.randint(0, 301, (5, 2))
    lp, h, lse, _ = ops.token_logprobs_forward(x, index, 0.7, 1.7, softcap, True)
    z = ref_z(x, 0.7, 1.7, softcap)
    torch.testing.assert_close(lp.double(), ref_logprobs(z, index), **tol(dtype))
    torch.testing.assert_close(h.double(), ref_entropy(z), **tol(dtype))
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), **tol(dtype))


def test_strided_logits_and_index():
    # RL code gathers from logits[:, :-1] and input_ids[:, 1:]; also transposed logits (class
    # stride != 1), an expanded index and int32 indices.
    full = logits_of((3, 9, 257), torch.float32)
    ids = torch.randint(0, 257, (3, 9))
    x, index = full[:, :-1], ids[:, 1:]
    assert not x.is_contiguous() and not index.is_contiguous()
    lp, h = fastce.token_logprobs(x, index, return_entropy=True)
    torch.testing.assert_close(lp.double(), ref_logprobs(ref_z(x), index), **tol(torch.float32))
    torch.testing.assert_close(h.double(), ref_entropy(ref_z(x)), **tol(torch.float32))

    xt = logits_of((257, 6), torch.float32).t()  # (6, 257) with class stride 6
    it = torch.randint(0, 257, (1, 4)).expand(6, 4)
    torch.testing.assert_close(fastce.token_logprobs(xt, it).double(), ref_logprobs(ref_z(xt), it),
                               **tol(torch.float32))
    i32 = index.to(torch.int32)
    torch.testing.assert_close(fastce.token_logprobs(x, i32), lp, rtol=0, atol=0)

    xg = full.clone().requires_grad_()
    lp, h = fastce.token_logprobs(xg[:, :-1], index, return_entropy=True)
    (lp * torch.rand_like(lp)).sum().backward()
    assert xg.grad[:, -1].abs().sum() == 0 and xg.grad[:, :-1].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_vocabulary(dtype):
    # -inf logits: probability 0. The entropy stays finite, a masked token's log-prob is -inf
    # (not NaN), and no gradient is NaN.
    x = logits_of((4, 1000), dtype)
    x[:, 500:] = float("-inf")
    x[1] = float("-inf")
    x[1, 999] = 0.5  # one class left: entropy 0
    index = torch.tensor([[3, 700], [999, 10], [0, 499], [600, 1]])
    lp, h = fastce.token_logprobs(x, index, return_entropy=True)
    z = ref_z(x)
    assert torch.isfinite(h).all()
    assert h[1] == 0
    assert lp[0, 1] == float("-inf") and lp[1, 1] == float("-inf") and lp[3, 0] == float("-inf")
    assert lp[1, 0] == 0
    torch.testing.assert_close(h.double(), ref_entropy(z), **tol(dtype))
    torch.testing.assert_close(lp.double(), ref_logprobs(z, index), **tol(dtype))
    xg = x.detach().requires_grad_()
    lp, h = fastce.token_logprobs(xg, index[:, :1].clone(), return_entropy=True)
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(xg.grad).all()
    zr = ref_z(x).requires_grad_()  # (a masked token chosen: d log p / dz = 1 there, as torch's)
    (ref_logprobs(zr, index[:, :1]).sum() + ref_entropy(zr).sum()).backward()
    torch.testing.assert_close(xg.grad.double(), zr.grad, **grad_tol(dtype))


def test_rows_without_mass_are_nan_like_log_softmax():
    x = torch.full((2, 5), float("-inf"))
    x[1] = torch.randn(5)
    x[1, 2] = float("nan")
    lp, h = fastce.token_logprobs(x, torch.tensor([0, 1]), return_entropy=True)
    assert torch.isnan(lp).all() and torch.isnan(h).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logit_scale", [1.0, -0.5])
def test_argmax_as_torch_argmax_of_z(dtype, logit_scale):
    # The forward op's optional argmax: first index on ties, a NaN first, the first class of an
    # all -inf row, across blocks of the row (the largest value in a later block, ties between).
    x = (torch.randn(9, 5000, dtype=torch.float64) * 3).to(dtype)
    x[0] = 1.0                            # ties everywhere
    x[1, 4000] = x[1, 100] = 50.0         # a tie across blocks
    x[2, 4999] = 60.0                     # the last class
    x[3, 3000] = float("nan")
    x[3, 4000] = float("nan")
    x[4] = float("-inf")
    x[5, :2500] = float("-inf")
    x[6, 10] = float("inf")
    x[7, 2047:2049] = 70.0                # a tie at a block boundary
    index = torch.zeros(9, 0, dtype=torch.long)
    _, _, _, argmax = ops.token_logprobs_forward(x, index, 0.8, logit_scale, None, False, True)
    z = x.double() * logit_scale
    assert argmax.dtype == torch.long
    assert torch.equal(argmax, z.argmax(-1))
    _, _, _, none = ops.token_logprobs_forward(x, index, 1.0, 1.0, None, False, False)
    assert none.numel() == 0


# ---- gradients -------------------------------------------------------------------------------

def grad_tol(dtype):
    return {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6),
            torch.bfloat16: dict(rtol=1e-2, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=1e-5)}[dtype]


@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
@pytest.mark.parametrize("K", [None, 3])
def test_gradcheck_float64(which, K):
    x = torch.randn(3, 4, 23, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 23, (4, 3) if K is None else (4, 3, K))
    if K:
        index[0, 0] = torch.tensor([5, 5, 7])  # the same token twice

    def f(x):
        lp, h = fastce.token_logprobs(x.transpose(0, 1), index, temperature=0.7, return_entropy=True)
        return {"logprobs": (lp,), "entropy": (h,), "both": (lp, h)}[which]
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradcheck_through_the_op_options(softcap):
    x = torch.randn(5, 17, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 17, (5, 2))
    assert torch.autograd.gradcheck(lambda x: ops.token_logprobs_forward(x, index, 1.3, 0.8, softcap, True)[:2],
                                    (x,))
    assert torch.autograd.gradcheck(lambda x: fastce.entropy(x, temperature=2.0), (x,))


def test_gradcheck_with_masked_logits():
    x = torch.randn(4, 19, dtype=torch.float64)
    x[:, :5] = float("-inf")
    x.requires_grad_()
    index = torch.randint(5, 19, (4,))
    assert torch.autograd.gradcheck(lambda x: fastce.token_logprobs(x, index, return_entropy=True), (x,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_of_every_dtype(dtype):
    x = logits_of((6, 3001), dtype).requires_grad_()
    index = torch.randint(0, 3001, (6, 2))
    lp, h = fastce.token_logprobs(x, index, temperature=1.4, return_entropy=True)
    g_lp, g_h = torch.randn_like(lp), torch.randn_like(h)
    (lp * g_lp).sum().add((h * g_h).sum()).backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    z = ref_z(x.detach(), 1.4).requires_grad_()
    (ref_logprobs(z, index) * g_lp.double()).sum().add((ref_entropy(z) * g_h.double()).sum()).backward()
    torch.testing.assert_close(x.grad.double(), z.grad / 1.4, **grad_tol(dtype))


def test_double_backward_is_refused():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(fastce.entropy(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---- errors ----------------------------------------------------------------------------------

def test_argument_errors():
    x = torch.randn(2, 5)
    with pytest.raises(IndexError, match="index 5 is out of bounds for dimension 1 with size 5"):
        fastce.token_logprobs(x, torch.tensor([0, 5]))
    with pytest.raises(IndexError, match="out of bounds"):
        fastce.token_logprobs(x, torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="does not match logits"):
        fastce.token_logprobs(x, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="int64 or int32"):
        fastce.token_logprobs(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="temperature"):
        fastce.token_logprobs(x, torch.tensor([0, 1]), temperature=0.0)
    with pytest.raises(NotImplementedError):
        fastce.token_logprobs(torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="class dimension"):
        fastce.entropy(torch.tensor(1.0))


def test_token_options_match_the_schemas():
    for op in (ops.token_logprobs_forward, ops.token_logprobs_backward, ops.linear_token_logprobs_forward,
               ops.linear_token_logprobs_backward):
        names = [a.name for a in op.default._schema.arguments]
        first = names.index("temperature")
        assert tuple(names[first:first + len(TokenOptions._fields)]) == TokenOptions._fields, op


# ---- the fused LM head -----------------------------------------------------------------------

def unfused(h, w, b, index, temperature=1.0, logit_scale=1.0, softcap=None):
    logits = torch.nn.functional.linear(h, w, b)
    z = ref_z(logits, temperature, logit_scale, softcap)
    return ref_logprobs(z, index), ref_entropy(z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", [None, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_unfused(dtype, K, bias):
    h = (torch.randn(3, 5, 32, dtype=torch.float64)).to(dtype).requires_grad_()
    w = (torch.randn(301, 32, dtype=torch.float64) / 4).to(dtype).requires_grad_()
    b = (torch.randn(301, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    index = torch.randint(0, 301, (3, 5) if K is None else (3, 5, K))
    kw = dict(temperature=0.9, logit_scale=1.3, softcap=8.0)
    lp, ent = fastce.linear_token_logprobs(h, w, index, linear_bias=b, chunk_size=4, **kw)
    params = [h, w] + ([b] if bias else [])
    hd, wd, bd = (t.detach().double().requires_grad_() if t is not None else None for t in (h, w, b))
    lp_ref, ent_ref = unfused(hd, wd, bd, index, **kw)
    t = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    if dtype == torch.bfloat16:  # the logits themselves are rounded to bfloat16 (as unfused)
        lp_ref, ent_ref = unfused(h.detach(), w.detach(), None if b is None else b.detach(), index, **kw)
        t = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp.double(), lp_ref.double(), **t)
    torch.testing.assert_close(ent.double(), ent_ref.double(), **t)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), params)
    lp_ref, ent_ref = unfused(hd, wd, bd, index, **kw)
    ref = torch.autograd.grad((lp_ref * g_lp.double()).sum() + (ent_ref * g_ent.double()).sum(),
                              [hd, wd] + ([bd] if bias else []))
    gt = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else \
        dict(rtol=1e-3, atol=2e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for got, want, p in zip(grads, ref, params):
        assert got.dtype == p.dtype and got.shape == p.shape
        torch.testing.assert_close(got.double(), want, **gt)


def test_linear_equals_token_logprobs_on_the_logits():
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    index = torch.randint(0, 97, (40,))
    lp, ent = fastce.linear_token_logprobs(h, w, index, temperature=0.5, chunk_size=7)
    lp2, ent2 = fastce.token_logprobs(h @ w.t(), index, temperature=0.5, return_entropy=True)
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    only = fastce.linear_token_logprobs(h, w, index, temperature=0.5, return_entropy=False)
    torch.testing.assert_close(only, lp, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(lp.sum() - ent.sum(), (h, w))
    g2 = torch.autograd.grad(lp2.sum() - ent2.sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_linear_gradcheck_float64():
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 13, (6, 2))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fastce.linear_token_logprobs(h, w, index, linear_bias=b, softcap=4.0, temperature=0.8,
                                                     chunk_size=4), (h, w, b))


def test_linear_argument_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="in_features"):
        fastce.linear_token_logprobs(h, torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="does not match hidden"):
        fastce.linear_token_logprobs(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(IndexError, match="out of bounds"):
        fastce.linear_token_logprobs(h, w, torch.full((4,), 10))
    with pytest.raises(ValueError, match="chunk_size"):
        fastce.linear_token_logprobs(h, w, torch.zeros(4, dtype=torch.long), chunk_size=0)


_PEAK_PROBE = r"""
import json, sys, torch, fastce
def hwm(reset=False):
    if reset:
        open("/proc/self/clear_refs", "w").write("5")
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
rows, classes, hidden = 4096, 32768, 32
h = torch.randn(rows, hidden, requires_grad=True)
w = (torch.randn(classes, hidden) / 8).requires_grad_()
index = torch.randint(0, classes, (rows,))
def step():
    lp, ent = fastce.linear_token_logprobs(h, w, index)
    (lp.sum() + ent.sum()).backward()
step()
h.grad = w.grad = None
fastce.empty_cache()
base = hwm(reset=True)
step()
print(json.dumps({"extra": hwm() - base, "logits": rows * classes * 4}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable VmHWM")
def test_linear_never_allocates_the_logits():
    # 4096 x 32768 float32 logits would be 512 MiB; the fused op holds a chunk of them (and of
    # their gradient) and the parameters' gradients (4 MiB here).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["extra"] < r["logits"] / 4, r


# ---- the registered ops ----------------------------------------------------------------------

def op_cases():
    x = torch.randn(4, 3, 11, requires_grad=True)
    i1 = torch.randint(0, 11, (4, 3))
    i3 = torch.randint(0, 11, (4, 3, 3))
    return [
        (x, i1, 1.0, 1.0, None, False, False),
        (x, i3, 0.7, 1.0, None, True, True),
        (x.detach().double().requires_grad_(), i3, 1.3, 0.5, 4.0, True, False),
        (x.detach().bfloat16().requires_grad_(), i1.int(), 1.0, 1.0, None, True, True),
        (x, i1[..., :0].reshape(4, 3, 0), 1.0, 1.0, None, True, True),
    ]


def test_opcheck_token_ops():
    for args in op_cases():
        torch.library.opcheck(ops.token_logprobs_forward, args)
        with torch.no_grad():
            lp, h, lse, _ = ops.token_logprobs_forward(*args)
        x, index = args[0].detach(), args[1]
        bargs = (torch.rand_like(lp), torch.rand_like(h) if args[5] else None, x, index, lse, h, *args[2:5])
        torch.library.opcheck(ops.token_logprobs_backward, bargs)
        torch.library.opcheck(ops.token_logprobs_backward, (None, *bargs[1:]))


def test_opcheck_linear_ops():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    for index, bias, ent in ((torch.randint(0, 13, (6,)), None, True), (torch.randint(0, 13, (6, 2)), b, False)):
        args = (h, w, bias, index, 0.9, 1.0, 3.0, ent, 4)
        torch.library.opcheck(ops.linear_token_logprobs_forward, args)
        with torch.no_grad():
            lp, e, lse = ops.linear_token_logprobs_forward(*args)
        bargs = (torch.rand_like(lp), torch.rand_like(e) if ent else None, h.detach(), w.detach(),
                 None if bias is None else bias.detach(), index, lse, e, 0.9, 1.0, 3.0, 4, True, True, bias is not None)
        torch.library.opcheck(ops.linear_token_logprobs_backward, bargs)


def test_compile_fullgraph_dynamic():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()

    def f(x, index, h, w, j):
        lp, ent = fastce.token_logprobs(x[:, :-1], index, temperature=0.7, return_entropy=True)
        lp2, ent2 = fastce.linear_token_logprobs(h, w, j, temperature=0.7)
        return (lp.sum() + fastce.entropy(x).sum() - ent.mean() + lp2.sum() + ent2.sum()) * 0.5

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (7, 11):
        x = torch.randn(n, 6, 31, requires_grad=True)
        index = torch.randint(0, 31, (n, 5))
        h = torch.randn(n, 8, requires_grad=True)
        w = torch.randn(31, 8, requires_grad=True)
        j = torch.randint(0, 31, (n, 2))
        got = compiled(x, index, h, w, j)
        grads = torch.autograd.grad(got, (x, h, w))
        want = f(x, index, h, w, j)
        want_grads = torch.autograd.grad(want, (x, h, w))
        torch.testing.assert_close(got, want)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


# ---- token accuracy, predicted tokens, token scaling on the losses ---------------------------

def ref_accuracy(logits, target, ignore_index, reduction, class_dim=1):
    valid = target != ignore_index
    pred = torch.where(valid, logits.argmax(class_dim), -1)
    correct = ((pred == target) & valid).float()
    return (correct if reduction == "none" else correct.sum() / valid.sum()), pred


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(12, 9), (3, 9, 4)])
def test_token_accuracy_and_predicted_tokens(reduction, shape):
    x = torch.randn(shape)
    x[0, :] = 1.0  # a tie everywhere: argmax is the lowest index
    if len(shape) == 2:
        x[4, 3] = x[4, 5] = 10.0
    target = torch.randint(0, 9, (shape[0], *shape[2:]))
    target.view(-1)[1] = -100
    target.view(-1)[2] = x.movedim(1, -1).reshape(-1, 9)[2].argmax()  # at least one right
    out = fastce.cross_entropy(x, target, reduction=reduction, return_token_accuracy=True,
                               return_predicted_tokens=True)
    assert isinstance(out, fastce.token.CrossEntropyOutput) and out.z_loss is None
    acc, pred = ref_accuracy(x, target, -100, reduction)
    torch.testing.assert_close(out.token_accuracy, acc)
    assert torch.equal(out.predicted_tokens, pred)
    assert out.predicted_tokens.view(-1)[0] == 0 or len(shape) != 2
    if len(shape) == 2:
        assert out.predicted_tokens[4] == 3
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(x, target, reduction=reduction))
    loss, acc_only = fastce.cross_entropy(x, target, reduction=reduction, return_token_accuracy=True)[::2]
    torch.testing.assert_close(acc_only, acc)


def test_return_z_loss_alone_keeps_its_pair():
    x, t = torch.randn(4, 7), torch.randint(0, 7, (4,))
    result = fastce.cross_entropy(x, t, lse_square_scale=1e-3, return_z_loss=True)
    assert type(result) is tuple and len(result) == 2
    loss, z_loss = result
    out = fastce.cross_entropy(x, t, lse_square_scale=1e-3, return_z_loss=True, return_token_accuracy=True)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.z_loss, z_loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_token_scaling(reduction, dtype, weighted):
    x = (torch.randn(10, 13, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, 13, (10,))
    t[3] = -100
    w = torch.rand(13, dtype=dtype) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    out = fastce.cross_entropy(x, t, use_token_scaling=True, softcap=5.0, **kw)
    assert out.token_accuracy is None and out.predicted_tokens is None
    # reference: each token's loss times its detached p(target), reduced as the loss
    xd = x.detach().double().requires_grad_()
    z = 5.0 * torch.tanh(xd / 5.0)
    rows = torch.nn.functional.cross_entropy(z, t, weight=None if w is None else w.double(), reduction="none",
                                             label_smoothing=0.1)
    p = torch.softmax(z.detach(), 1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)
    scaled = rows * p
    wt = (t != -100).double() if w is None else torch.where(t != -100, w.double()[t.clamp(min=0)], 0)
    want = {"none": scaled, "sum": scaled.sum(), "mean": scaled.sum() / wt.sum()}[reduction]
    t_ = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-3) \
        if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), want, **t_)
    g = torch.rand_like(out.loss)
    got, = torch.autograd.grad(out.loss, x, g)
    ref, = torch.autograd.grad(want, xd, g.double())
    torch.testing.assert_close(got.double(), ref, **(t_ if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-6)))


def test_per_token_outputs_take_class_indices():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="class-index targets"):
        fastce.cross_entropy(x, torch.softmax(x, 1), return_token_accuracy=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_per_token_outputs(reduction):
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 37, (2, 9))
    t[0, 0] = -100
    out = fastce.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=5, return_token_accuracy=True,
                                      return_predicted_tokens=True, use_token_scaling=True, softcap=10.0)
    ref = fastce.cross_entropy((h @ w.t()).transpose(1, 2), t, reduction=reduction, return_token_accuracy=True,
                               return_predicted_tokens=True, use_token_scaling=True, softcap=10.0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_accuracy, ref.token_accuracy)
    assert torch.equal(out.predicted_tokens, ref.predicted_tokens)
    g1 = torch.autograd.grad(out.loss.sum(), (h, w))
    g2 = torch.autograd.grad(ref.loss.sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_per_token_outputs_with_shift_and_loss_dtype(reduction):
    # shift=1 pairs position p with target p + 1: the same outputs as slicing both by hand
    # (positions without a target dropped), loss_dtype applied to the loss.
    h = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    w = torch.randn(37, 16, dtype=torch.bfloat16)
    t = torch.randint(0, 37, (2, 9))
    t[1, 4] = -100
    kw = dict(reduction=reduction, return_token_accuracy=True, return_predicted_tokens=True,
              use_token_scaling=True, loss_dtype=torch.float32)
    out = fastce.linear_cross_entropy(h, w, t, shift=1, **kw)
    ref = fastce.linear_cross_entropy(h[:, :-1], w, t[:, 1:], **kw)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.token_accuracy, ref.token_accuracy)
    assert torch.equal(out.predicted_tokens, ref.predicted_tokens)
