"""Vocabulary-parallel cross-entropy: bytes exchanged per row and time, against gathering
the full logits on every rank (gloo on CPU by default; NCCL with --backend nccl on GPUs).

    PYTHONPATH=python python benchmarks/bench_parallel.py --rows 1024 --vocab 32000

Per rank and step (forward + backward), median of --iters runs:
- fastce: vocab_parallel_cross_entropy on the shard (two all-reduces of O(rows) numbers);
- gather: all_gather the shards, fastce.cross_entropy on the full logits, slice the
  gradient (what a tensor-parallel head does without a vocab-parallel loss);
and, in one process, the shard passes with the CPU row kernels against the same passes
written in ATen ops (the device-generic kernels), which justifies the C++ CPU path.
"""
import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastce
from fastce.parallel import vocab_parallel_cross_entropy


def median_ms(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def shard_of(full, rank, world):
    sizes = [full.shape[1] // world + (r < full.shape[1] % world) for r in range(world)]
    start = sum(sizes[:rank])
    return full[:, start:start + sizes[rank]].contiguous(), sizes


def worker(rank, world, port, args):
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(args.rows, args.vocab, generator=gen).to(dtype)
    target = torch.randint(0, args.vocab, (args.rows,), generator=gen).to(device)
    shard, sizes = shard_of(full, rank, world)
    shard = shard.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fastce_step():
        x = shard.detach().requires_grad_()
        vocab_parallel_cross_entropy(x, target, label_smoothing=args.label_smoothing).backward()
        sync()

    def gather_step():
        x = shard.detach().requires_grad_()
        parts = [torch.empty(args.rows, s, dtype=dtype, device=device) for s in sizes]
        dist.all_gather(parts, x.detach())
        logits = torch.cat(parts, 1).requires_grad_()
        fastce.cross_entropy(logits, target, label_smoothing=args.label_smoothing).backward()
        start = sum(sizes[:rank])
        x.grad = logits.grad[:, start:start + sizes[rank]]
        sync()

    acc_bytes = 8 if dtype == torch.float64 else 4
    fields = 3 if args.label_smoothing > 0 else 2  # sum-exp, target logit (, smoothing sum)
    # Payload of the all-reduces per row: the max of the lse, then the fused sums (the shard
    # sizes add `world` numbers per call, not per row).
    ours = (1 + fields) * acc_bytes
    theirs = (args.vocab - sizes[rank]) * full.element_size()  # what this rank receives
    t_ours = median_ms(fastce_step, args.iters)
    t_theirs = median_ms(gather_step, args.iters)
    times = [None] * world
    dist.all_gather_object(times, (t_ours, t_theirs))
    if rank == 0:
        ours_ms = max(t[0] for t in times)
        theirs_ms = max(t[1] for t in times)
        print(f"{args.backend}, {world} ranks x {args.threads} thread(s), rows={args.rows}, "
              f"vocab={args.vocab} ({'/'.join(map(str, sizes))}), {args.dtype}, "
              f"label_smoothing={args.label_smoothing}")
        print(f"  bytes per row:  fastce {ours} (all-reduce payload)   gather {theirs} (received)"
              f"   ratio {theirs / ours:.0f}x")
        print(f"  fwd+bwd ms:     fastce {ours_ms:.1f}   gather {theirs_ms:.1f}"
              f"   speed-up {theirs_ms / ours_ms:.2f}x (slowest rank, median of {args.iters})")
    dist.destroy_process_group()


def shard_passes(args):
    """The two passes over one shard: CPU row kernels vs the same math in ATen ops."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shard = torch.randn(args.rows, args.vocab // args.world).to(dtype)
    target = torch.randint(0, args.vocab, (args.rows,))
    start, classes = torch.tensor(0), torch.tensor(args.vocab)
    ops = torch.ops.fastce
    lse, _ = ops.vocab_parallel_stats(shard, target, -100, 1.0, None)
    grad = torch.full_like(lse, 1.0 / args.rows)
    generic = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    calls = {
        "stats": (ops.vocab_parallel_stats.default, (shard, target, -100, 1.0, None)),
        "backward": (ops.vocab_parallel_backward.default,
                     (grad, shard, target, start, classes, lse, -100, args.label_smoothing, 1.0, None, 0.0)),
    }
    print(f"one shard {tuple(shard.shape)} {args.dtype}, {args.threads} thread(s): "
          f"CPU row kernels vs ATen ops")
    for name, (op, op_args) in calls.items():
        kernel = median_ms(lambda: op(*op_args), args.iters)
        aten = median_ms(lambda: op.redispatch(generic, *op_args), args.iters)
        print(f"  {name:9s} kernels {kernel:7.1f} ms   ATen {aten:7.1f} ms   {aten / kernel:.1f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args.world, port, args), nprocs=args.world, start_method="spawn")
    if args.backend == "gloo":
        shard_passes(args)


if __name__ == "__main__":
    main()
