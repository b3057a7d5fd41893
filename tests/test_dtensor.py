"""DTensor logits (torch's loss_parallel() pattern) on 2 and 3 gloo ranks: class-sharded logits
run the vocabulary-parallel path, batch-sharded ones reduce over the global batch, replicated
ones run locally; values and gradients against the float64 reference on the whole logits."""
import json
import os
import sys
import traceback
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import reference_cross_entropy  # noqa: E402

OPTIONS = {
    "plain": {},
    "smooth_ignore": dict(label_smoothing=0.1, ignore_index=-100),  # torch's loss_parallel() fails here
    "llm": dict(label_smoothing=0.05, logit_scale=1.3, softcap=5.0, lse_square_scale=1e-3, ignore_index=-100),
    "weight": dict(weight=True, lse_square_scale=1e-2, ignore_index=-100),
}


def _check(rank, world, mesh, placement, option, reduction):
    import fastce
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    opts = dict(OPTIONS[option])
    gen = torch.Generator().manual_seed(zlib.crc32(f"{placement}{option}{reduction}".encode()))  # same on every rank
    N, C = 7, 11
    x = torch.randn(N, C, generator=gen, dtype=torch.float64) * 3
    t = torch.randint(0, C, (N,), generator=gen)
    if "ignore_index" in opts:
        t[::3] = -100
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.3 if opts.pop("weight", False) else None
    d = distribute_tensor(x.clone(), mesh, [placement]).requires_grad_()
    # the target as a plain tensor (the global one) or a DTensor laid out like the rows
    target = t if reduction != "sum" else distribute_tensor(t, mesh, [placement if placement == Shard(0) else
                                                                      Replicate()])
    loss = fastce.cross_entropy(d, target, weight=w, reduction=reduction, **opts)
    assert type(loss).__name__ == "DTensor", type(loss)
    got = loss.full_tensor()
    xr = x.clone().requires_grad_()
    ref = reference_cross_entropy(xr, t, weight=w, reduction=reduction, **opts)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-10, atol=1e-10), (got, ref)
    g = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    (got * g).sum().backward()
    (ref * g).sum().backward()
    gx = d.grad.full_tensor()
    assert torch.allclose(gx, xr.grad, rtol=1e-10, atol=1e-12), (gx - xr.grad).abs().max()


def _check_against_loss_parallel(mesh):
    # The same values and gradients as torch's own loss_parallel() where that works.
    import torch.nn.functional as F
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel
    import fastce
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 13, generator=gen)
    t = torch.randint(0, 13, (6,), generator=gen)
    t[2] = -100
    a = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_()
    b = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_()
    with loss_parallel():
        ref = F.cross_entropy(a, t)
        ref.backward()
    got = fastce.cross_entropy(b, t)
    got.backward()
    assert got.placements == ref.placements
    assert torch.allclose(got.full_tensor(), ref.full_tensor(), rtol=1e-6, atol=1e-6)
    # (the gradient's placement is autograd's choice, which differs across torch versions:
    # 2.11 does not keep Shard(1); its values are compared)
    assert torch.allclose(b.grad.full_tensor(), a.grad.full_tensor(), rtol=1e-6, atol=1e-7)


def _worker(rank, world, port, out_path):
    import datetime
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    mesh = init_device_mesh("cpu", (world,))
    verdicts = {}
    for placement in (Shard(1), Shard(0), Replicate()):
        for option in OPTIONS:
            for reduction in ("mean", "sum", "none"):
                name = f"{placement}-{option}-{reduction}"
                try:
                    _check(rank, world, mesh, placement, option, reduction)
                    verdicts[name] = None
                except Exception:
                    verdicts[name] = f"rank {rank}: {traceback.format_exc()}"
                dist.barrier()
    try:
        _check_against_loss_parallel(mesh)
        verdicts["loss_parallel"] = None
    except Exception:
        verdicts["loss_parallel"] = f"rank {rank}: {traceback.format_exc()}"
    gathered = [None] * world
    dist.all_gather_object(gathered, verdicts)
    if rank == 0:
        merged = {k: "\n".join(v[k] for v in gathered if v.get(k)) or None for k in verdicts}
        with open(out_path, "w") as f:
            json.dump(merged, f)
    dist.destroy_process_group()
    os._exit(0)  # see tests/test_parallel.py: gloo's thread and Python's finalization


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_logits(world, tmp_path):
    from test_parallel import run_ranks
    out = tmp_path / "verdicts.json"
    run_ranks(_worker, world, str(out), timeout=300)
    verdicts = json.loads(out.read_text())
    failed = {k: v for k, v in verdicts.items() if v}
    assert len(verdicts) == 3 * len(OPTIONS) * 3 + 1
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
