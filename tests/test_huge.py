"""Tensors with more than 2^31 elements: every offset past the 2^31st element must be
computed in 64 bits. 16400 x 131072 bf16 logits (2.15e9 elements, 4.3 GB; 8.6 GB with the
gradient) — the rows past element 2^31 are compared with torch computed on just those rows.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastce

N, C = 16400, 131072
FIRST_PAST = 2**31 // C  # 16384: the first row that starts at or past element 2^31
CHECKED = slice(FIRST_PAST - 4, N)  # a few rows before the boundary, all rows after it


def huge_problem(device):
    """Zero logits everywhere except the checked rows (random, with large entries)."""
    gen = torch.Generator().manual_seed(0)
    rows = N - CHECKED.start
    x = torch.zeros(N, C, dtype=torch.bfloat16, device=device)
    tail = torch.randn(rows, C, generator=gen) * 3
    tail[:, -1] += 8.0  # the last class (the highest offsets) matters in every checked row
    x[CHECKED] = tail.to(device, torch.bfloat16)
    target = torch.randint(0, C, (N,), generator=gen)
    target[-1], target[-2], target[-3] = C - 1, 0, -100
    return x, target.to(device)


@pytest.mark.slow
def test_rows_past_2_31_elements(device):
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs 24 GB of GPU memory")
    x, target = huge_problem(device)
    assert x.numel() > 2**31
    gen = torch.Generator().manual_seed(1)
    grad_out = (torch.rand(N, generator=gen) + 0.5).to(device, torch.bfloat16)

    x.requires_grad_()
    loss = fastce.cross_entropy(x, target, reduction="none")
    loss.backward(grad_out)
    loss = loss.detach()

    # Torch on just the checked rows, in float64.
    xs = x.detach()[CHECKED].double().requires_grad_()
    ref = F.cross_entropy(xs, target[CHECKED], reduction="none")
    ref.backward(grad_out[CHECKED].double())
    torch.testing.assert_close(loss[CHECKED].double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad[CHECKED].double(), xs.grad, rtol=1.6e-2, atol=1e-7)

    # Zero rows, on both sides of the boundary: loss log(C), gradient g * (1/C - onehot).
    zero_rows = torch.tensor([0, FIRST_PAST // 2, CHECKED.start - 1], device=device)
    assert torch.all(loss[zero_rows] == torch.tensor(math.log(C), dtype=torch.bfloat16))
    g = x.grad[zero_rows].double()
    expected = grad_out[zero_rows].double()[:, None] * (
        torch.full_like(g, 1.0 / C) - F.one_hot(target[zero_rows], C).double())
    torch.testing.assert_close(g, expected, rtol=1e-2, atol=0)
    del x.grad

    # The reduced loss over every row (the 'mean' divisor counts 16399 rows).
    with torch.no_grad():
        mean = fastce.cross_entropy(x, target)
    valid = (target != -100).to(torch.float64)
    ref_rows = torch.full((N,), math.log(C), dtype=torch.float64, device=device)
    ref_rows[CHECKED] = ref.detach()
    expected_mean = (ref_rows * valid).sum() / valid.sum()
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-2, atol=0)
