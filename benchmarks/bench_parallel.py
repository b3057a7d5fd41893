"""Vocabulary-parallel cross-entropy: bytes exchanged per row and time, against gathering
the full logits on every rank (gloo on CPU by default; NCCL with --backend nccl on GPUs).

    PYTHONPATH=python python benchmarks/bench_parallel.py --rows 1024 --vocab 32000

Per rank and step (forward + backward), median of --iters runs after a warm-up, with the
spread of the runs (interquartile range / median), on the slowest rank:
- fastce: vocab_parallel_cross_entropy on the shard (two all-reduces of O(rows) numbers);
- gather: all_gather the shards, fastce.cross_entropy on the full logits, slice the
  gradient (what a tensor-parallel head does without a vocab-parallel loss).
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
    """(median ms, spread = interquartile range / median) of `iters` runs after a warm-up."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return 1e3 * median, (q3 - q1) / median


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

    # Payload of the all-reduces per row, float64 whatever the logits' dtype: the max of the
    # slices' maxima, then the fused sums of exp(m_k - M + r_k), of the lse weights and of the
    # slices' losses (the exchange of the shard sizes adds `world` numbers per call, not per row).
    ours = 4 * 8
    theirs = (args.vocab - sizes[rank]) * full.element_size()  # what this rank receives
    t_ours = median_ms(fastce_step, args.iters)
    t_theirs = median_ms(gather_step, args.iters)
    times = [None] * world
    dist.all_gather_object(times, (t_ours, t_theirs))
    if rank == 0:
        (ours_ms, ours_spread), (theirs_ms, theirs_spread) = (max((t[i] for t in times), key=lambda m: m[0])
                                                              for i in (0, 1))
        print(f"{args.backend}, {world} ranks x {args.threads} thread(s), rows={args.rows}, "
              f"vocab={args.vocab} ({'/'.join(map(str, sizes))}), {args.dtype}, "
              f"label_smoothing={args.label_smoothing}")
        print(f"  bytes per row:  fastce {ours} (all-reduce payload)   gather {theirs} (received)"
              f"   ratio {theirs / ours:.0f}x")
        print(f"  fwd+bwd ms:     fastce {ours_ms:.1f} ({ours_spread:.0%})   gather {theirs_ms:.1f} "
              f"({theirs_spread:.0%})   speed-up {theirs_ms / ours_ms:.2f}x (slowest rank, median of "
              f"{args.iters}, spread IQR/median)")
    dist.destroy_process_group()


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


if __name__ == "__main__":
    main()
