"""Many Python threads at once, and many calls in a row.

The kernels release nothing shared between calls, so concurrent calls must give exactly
the single-threaded results (they are deterministic: bitwise equal), an error in one
thread must not disturb the others, and 10^4 calls must not grow the process's memory.
"""
import gc
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastce


def problems():
    """Varied problems: a long-row one (split into pieces across threads), K-dim, probability
    targets, reduced precision, label smoothing, weights and the LLM options."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    def idx(high, *shape):
        return torch.randint(0, high, shape, generator=gen)

    return [
        (rnd(64, 1000), idx(1000, 64), dict(label_smoothing=0.1, reduction="none")),
        (rnd(3, 70000, dtype=torch.bfloat16), idx(70000, 3), dict(softcap=20.0, lse_square_scale=1e-4)),
        (rnd(4, 9, 5, 3), idx(9, 4, 5, 3), dict(weight=torch.rand(9, generator=gen), ignore_index=2)),
        (rnd(32, 300, dtype=torch.float16), torch.rand(32, 300, generator=gen).half(), dict(reduction="sum")),
        (rnd(17, dtype=torch.float64), idx(17), dict(logit_scale=0.5)),
    ]


def loss_and_grad(x, target, kwargs):
    # autograd.grad, not .backward(): threads share the leaf, and .grad would race.
    loss = fastce.cross_entropy(x, target, **kwargs)
    grad, = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss.detach(), grad


def test_threads_give_single_threaded_results():
    cases = [(x.requires_grad_(), t, kw) for x, t, kw in problems()]
    expected = [loss_and_grad(*case) for case in cases]
    start = threading.Barrier(8)

    def worker(tid):
        start.wait()
        for step in range(6):
            i = (tid + step) % len(cases)
            loss, grad = loss_and_grad(*cases[i])
            assert torch.equal(loss, expected[i][0]), (tid, i)
            assert torch.equal(grad, expected[i][1]), (tid, i)

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(worker, tid) for tid in range(8)]:
            f.result()


def test_errors_in_one_thread_do_not_disturb_others():
    x, t, kwargs = problems()[0]
    x.requires_grad_()
    expected = loss_and_grad(x, t, kwargs)
    bad = t.clone()
    bad[7] = 1000
    start = threading.Barrier(4)

    def failing():
        start.wait()
        for _ in range(30):
            with pytest.raises(IndexError, match="Target 1000 is out of bounds."):
                fastce.cross_entropy(x, bad)

    def working():
        start.wait()
        for _ in range(10):
            loss, grad = loss_and_grad(x, t, kwargs)
            assert torch.equal(loss, expected[0]) and torch.equal(grad, expected[1])

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(failing), pool.submit(failing), pool.submit(working), pool.submit(working)]
        for f in futures:
            f.result()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def grow_during(calls, step):
    """RSS growth over `calls` calls of step(), after a warm-up that fills the caches."""
    for _ in range(500):
        step()
    gc.collect()
    before = rss_bytes()
    for _ in range(calls):
        step()
    gc.collect()
    return rss_bytes() - before


# Many rows and few classes: a leak per call of anything per-row (the driver's vectors)
# or per-element (a tensor) adds megabytes over 10^4 calls.
LIMIT = 8 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_repeated_calls_do_not_grow_memory(kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=gen).requires_grad_()
    if kind == "index":
        target = torch.randint(0, 32, (512,), generator=gen)
        kwargs = dict(weight=torch.rand(32, generator=gen), label_smoothing=0.1, lse_square_scale=1e-4)
    else:
        target = torch.rand(512, 32, generator=gen).requires_grad_()
        kwargs = dict(label_smoothing=0.1, softcap=10.0)

    def step():
        loss = fastce.cross_entropy(x, target, **kwargs)
        torch.autograd.grad(loss, [x, target] if kind == "prob" else [x])

    assert grow_during(10_000, step) < LIMIT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_repeated_errors_do_not_grow_memory():
    x = torch.randn(512, 32)
    bad = torch.randint(0, 32, (512,))
    bad[-1] = 32

    def step():
        try:
            fastce.cross_entropy(x, bad, reduction="none")
        except IndexError:
            pass
        else:
            raise AssertionError("out-of-range target accepted")

    assert grow_during(10_000, step) < LIMIT
