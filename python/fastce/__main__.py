"""`python -m fastce`: the worked example users know, then a quick speed check against torch."""
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastce


def worked_example():
    print("Cross-entropy of one row, step by step (target class 1):")
    score = torch.tensor([0.8982, 0.805, 0.6393, 0.9983, 0.5731, 0.0469, 0.556, 0.1476, 0.8404, 0.5544])
    target = torch.tensor(1)
    exp = torch.exp(score)
    total = torch.sum(exp)
    log_total = torch.log(total)
    by_hand = log_total - score[target.item()]
    print(f"  1. exp(scores)            = {[round(v, 4) for v in exp.tolist()]}")
    print(f"  2. sum                    = {total.item():.4f}")
    print(f"  3. log(sum)               = {log_total.item():.4f}")
    print(f"  4. minus the target score = {log_total.item():.4f} - {score[1].item():.4f} = {by_hand.item():.4f}")
    ours = fastce.cross_entropy(score, target)
    print(f"  fastce.cross_entropy      = {ours.item():.4f}   (torch: {F.cross_entropy(score, target).item():.4f})")

    print("\nA batch of 64 images x 10 classes gives one scalar, the mean of the 64 per-row losses:")
    batch, labels = torch.randn(64, 10), torch.randint(0, 10, (64,))
    per_row = fastce.cross_entropy(batch, labels, reduction="none")
    mean = fastce.cross_entropy(batch, labels)
    print(f"  per-row losses: shape {tuple(per_row.shape)}, mean {per_row.mean().item():.4f}")
    print(f"  fastce.cross_entropy(batch, labels) = {mean.item():.4f}   (torch: "
          f"{F.cross_entropy(batch, labels).item():.4f})")


SPREAD_WARN = 0.25  # interquartile range / median above which a timing is not trusted


def interleaved_timings(fns, repeats=15, warmup=3):
    """Seconds of `repeats` runs of each of fns, one run of each in turn (so that the machine's
    drifts fall on all alike), after `warmup` untimed runs of each."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def median_and_spread(times):
    """The median and the spread (interquartile range / median) of repeated timings."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, (q3 - q1) / median


def busy_cores_warning(load=None, cores=None, threads=None):
    """A warning when other processes keep the cores busy: the 1-minute load average, less this
    check's own threads, leaves fewer idle cores than the threads need. Parallel code then waits
    for a core in every run, which a steady spread does not show."""
    try:
        load = os.getloadavg()[0] if load is None else load
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() if cores is None else cores
    threads = torch.get_num_threads() if threads is None else threads
    others = max(0.0, load - threads)
    if cores and others + threads > cores + 0.5:
        return (f"  WARNING: load average {load:.1f} on {cores} cores: other processes are using the cores, "
                "so these times are not fastce's or torch's own; run again on a quieter machine")
    return None


def speed_check(rows=2048, vocab=32000, repeats=15):
    print(f"\nSpeed on an LLM-sized batch ({rows} x {vocab} float32 logits, {torch.get_num_threads()} threads, "
          f"CPU kernels: {fastce.cpu_isa()}): median of {repeats} runs (spread: IQR/median)")
    logits = torch.randn(rows, vocab)
    target = torch.randint(0, vocab, (rows,))

    def step(loss_fn):
        x = logits.detach().requires_grad_()
        loss_fn(x, target).backward()

    losses = {"torch.nn.functional.cross_entropy": F.cross_entropy, "fastce.cross_entropy": fastce.cross_entropy}
    runs = [run for fn in losses.values()
            for run in (lambda fn=fn: fn(logits, target), lambda fn=fn: step(fn))]
    stats = [median_and_spread(t) for t in interleaved_timings(runs, repeats)]
    measured = [(name, stats[2 * i], stats[2 * i + 1]) for i, name in enumerate(losses)]
    (_, (base_fwd, _), (base_both, _)) = measured[0]
    print(f"  {'':36s} {'forward':>16s} {'fwd+bwd':>16s}")
    for name, (fwd, fwd_spread), (both, both_spread) in measured:
        print(f"  {name:36s} {fwd * 1e3:7.1f}ms ({fwd_spread:4.0%}) {both * 1e3:7.1f}ms ({both_spread:4.0%})   "
              f"({base_fwd / fwd:.1f}x, {base_both / both:.1f}x vs torch)")
    busy = busy_cores_warning()
    if busy:
        print(busy)
    widest = max(spread for _, *cells in measured for _, spread in cells)
    if widest > SPREAD_WARN:
        print(f"  WARNING: the repeats vary by up to {widest:.0%} (IQR/median): the machine is busy, "
              "so these ratios are not steady values; run again on a quieter machine")
    print("  The benchmark suite (more shapes, torch.compile, memory): python benchmarks/bench.py "
          "in a source checkout (benchmarks/README.md)")
    return measured


if __name__ == "__main__":
    worked_example()
    speed_check()
