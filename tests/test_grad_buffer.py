"""CPU gradients of 4 MiB or more: mapped by fastce, the last freed one kept for the next
gradient of a similar size (no page faults of fresh memory per training step)."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastce

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux only")

ROWS, CLASSES = 64, 32768  # an 8 MiB float32 gradient


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _grad(x, t, **options):
    xa = x.clone().requires_grad_()
    fastce.cross_entropy(xa, t, **options).backward()
    return xa.grad


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("FASTCE_CPU_GRAD_CACHE", raising=False)
    fastce.empty_cache()
    yield
    fastce.empty_cache()


def test_a_freed_gradient_is_reused_for_the_next():
    x, t = torch.randn(ROWS, CLASSES), torch.randint(0, CLASSES, (ROWS,))
    first = _grad(x, t)
    address = first.data_ptr()
    del first
    second = _grad(x, t)
    assert second.data_ptr() == address
    torch.testing.assert_close(second, torch.func.grad(lambda v: F.cross_entropy(v, t))(x))


def test_reused_memory_is_fully_overwritten():
    # The kept buffer holds the previous gradient's values; every element of the next one,
    # ignored rows included (exact zeros), must be written.
    x, t = torch.randn(ROWS, CLASSES) * 5, torch.randint(0, CLASSES, (ROWS,))
    del_me = _grad(x, t, reduction="sum")
    del del_me
    t2 = t.clone()
    t2[::3] = -100
    got = _grad(x.bfloat16().float(), t2, label_smoothing=0.1)
    assert torch.equal(got[::3], torch.zeros_like(got[::3]))
    expected = torch.func.grad(lambda v: F.cross_entropy(v, t2, label_smoothing=0.1))(x.bfloat16().float())
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("sizes", [(64, 16, 64), (16, 64, 200)], ids=str)
def test_changing_sizes(sizes):
    # Larger, smaller, much larger: a kept buffer is reused only when it fits without wasting
    # more than half of it; results are right either way.
    for rows in sizes:
        x, t = torch.randn(rows, CLASSES), torch.randint(0, CLASSES, (rows,))
        g = _grad(x, t)
        assert g.shape == (rows, CLASSES)
        torch.testing.assert_close(g, torch.func.grad(lambda v: F.cross_entropy(v, t))(x))


def test_empty_cache_returns_the_memory():
    x, t = torch.randn(4 * ROWS, CLASSES), torch.randint(0, CLASSES, (4 * ROWS,))  # 32 MiB
    g = _grad(x, t)
    g.fill_(1.0)  # make sure every page is resident
    del g
    kept = _rss_bytes()
    fastce.empty_cache()
    assert kept - _rss_bytes() >= 24 << 20


def test_keeping_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTCE_CPU_GRAD_CACHE", "0")
    x, t = torch.randn(4 * ROWS, CLASSES), torch.randint(0, CLASSES, (4 * ROWS,))
    xa = x.requires_grad_()
    before = _rss_bytes()  # (only the gradient is measured: other frees may stay resident)
    fastce.cross_entropy(xa, t).backward()
    xa.grad.fill_(1.0)
    xa.grad = None
    assert _rss_bytes() - before < 16 << 20  # the 32 MiB gradient went back to the system


def test_a_gradient_outliving_others_and_threads():
    # Several large gradients alive at once, freed in any order, from several threads.
    import threading
    x, t = torch.randn(ROWS, CLASSES), torch.randint(0, CLASSES, (ROWS,))
    expected = torch.func.grad(lambda v: F.cross_entropy(v, t))(x)
    errors = []

    def work():
        try:
            kept = [_grad(x, t) for _ in range(3)]
            for g in reversed(kept):
                torch.testing.assert_close(g, expected)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
