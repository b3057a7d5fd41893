"""Fused linear cross-entropy: time and peak memory of forward + backward, side by side.

Variants (each measured in its own process, so one's memory cannot hide another's):
  naive          F.linear + F.cross_entropy (the logits exist in full)
  torch_chunked  torch's F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())
                 (torch >= 2.13)
  fastce         fastce.linear_cross_entropy (gradients computed in the forward pass)
  fastce_none    fastce.linear_cross_entropy(reduction='none').sum(): the logits are
                 recomputed in backward (the other strategy, for comparison)

Peak extra memory is the process's peak resident set during one forward + backward minus
its resident set just before (the inputs), measured on the step after a warm-up step; it
includes the gradients themselves, and "workspace" is that minus their size. On Linux the peak is reset through
/proc/self/clear_refs; elsewhere the lifetime peak is used. Times are medians of wall
time and of process CPU time (all threads): on a shared machine the CPU time is the steadier.

    PYTHONPATH=python python benchmarks/bench_linear.py [--n 4096 --hidden 512 --vocab 32000]
        [--dtype float32] [--reps 3] [--chunk-size N] [--png linear.png]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ["naive", "torch_chunked", "fastce", "fastce_none"]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak():
    """Resets the kernel's peak-RSS counter; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset):
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _step_fn(variant, chunk_size):
    import torch
    import torch.nn.functional as F

    import fastce.linear as fl

    if variant == "naive":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if variant == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy"):
            return None
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=opts)
    if variant == "fastce":
        return lambda x, w, t: fl.linear_cross_entropy(x, w, t, chunk_size=chunk_size)
    return lambda x, w, t: fl.linear_cross_entropy(x, w, t, reduction="none",
                                                    chunk_size=chunk_size).sum()


def worker(args):
    import torch

    dtype = getattr(torch, args.dtype)
    step = _step_fn(args.variant, args.chunk_size)
    if step is None:
        print(json.dumps(None))
        return

    def make(n, h, v):
        torch.manual_seed(0)
        x = torch.randn(n, h, dtype=dtype).requires_grad_()
        w = torch.randn(v, h, dtype=dtype).mul_(h ** -0.5).requires_grad_()  # no temporary
        return x, w, torch.randint(0, v, (n,))

    def run(x, w, t):
        x.grad = w.grad = None
        start, cpu = time.perf_counter(), time.process_time()
        step(x, w, t).backward()
        return time.perf_counter() - start, time.process_time() - cpu

    x, w, t = make(args.n, args.hidden, args.vocab)
    first = run(x, w, t)  # warm-up: code pages and the BLAS's own buffers are not per step
    x.grad = w.grad = None
    base = _rss_bytes()
    reset = _reset_peak()
    run(x, w, t)
    peak = _peak_bytes(reset) - base
    grads = (x.numel() + w.numel()) * x.element_size()  # what every variant must return
    wall, cpu = zip(*[run(x, w, t) for _ in range(args.reps)])
    print(json.dumps({"variant": args.variant, "time_s": statistics.median(wall),
                      "cpu_s": statistics.median(cpu), "times_s": [first[0], *wall],
                      "peak_extra_mib": peak / 2 ** 20, "workspace_mib": (peak - grads) / 2 ** 20}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3, help="timed runs after the first (median)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--png", default=None, help="also draw a chart (needs matplotlib)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant here
    args = p.parse_args()
    if args.variant:
        worker(args)
        return

    print(f"N={args.n} H={args.hidden} V={args.vocab} {args.dtype}, forward+backward, "
          f"median of {args.reps}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    # A fixed mmap threshold: every buffer of 1 MiB or more is mapped when allocated and
    # unmapped when freed, so the resident set follows the live tensors (glibc would otherwise
    # keep some freed memory, depending on what ran before).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        res = json.loads(out.strip().splitlines()[-1])
        if res is None:
            print(f"{variant:14s} (not available in this torch)")
            continue
        results.append(res)
    base = next((r for r in results if r["variant"] == "naive"), results[0])
    print(f"{'variant':14s} {'wall s':>7s} {'vs naive':>9s} {'CPU s':>7s} {'vs naive':>9s} "
          f"{'peak extra MiB':>15s} {'workspace MiB':>14s}  wall runs (first: warm-up)")
    for r in results:
        runs = " ".join(f"{t:.2f}" for t in r["times_s"])
        print(f"{r['variant']:14s} {r['time_s']:7.2f} {r['time_s'] / base['time_s']:8.2f}x "
              f"{r['cpu_s']:7.2f} {r['cpu_s'] / base['cpu_s']:8.2f}x {r['peak_extra_mib']:15.0f} "
              f"{r['workspace_mib']:14.0f}  [{runs}]")
    if args.png:
        chart(results, args)


def chart(results, args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return
    names = [r["variant"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [r["cpu_s"] for r in results])
    a.set_ylabel("forward + backward, CPU s")
    b.bar(names, [r["peak_extra_mib"] for r in results], color="tab:orange")
    b.set_ylabel("peak extra memory, MiB")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"linear cross-entropy, N={args.n} H={args.hidden} V={args.vocab} {args.dtype}")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"chart: {args.png}")


if __name__ == "__main__":
    main()
