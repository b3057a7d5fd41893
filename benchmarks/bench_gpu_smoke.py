"""The GPU timing run of scripts/gpu_check.sh: device copy bandwidth, then fastce's forward,
backward and forward+backward against torch eager on the LLM and classifier shapes, as time
and achieved bandwidth, and the per-kernel times of one training step from torch.profiler.

    python benchmarks/bench_gpu_smoke.py --out OUTDIR [--reps 5] [--calls 20] [--dry-run]

Timing: `--calls` (>= 20) back-to-back calls between two CUDA events, the inputs cycled through
enough copies to exceed the L2 cache (an input larger than L2 is one copy), `--reps` such
windows: the median per call and the spread (min-max) over windows. Bytes counted: forward
reads the logits once; backward reads them and writes the gradient; forward+backward is the
sum (3x the logits: fastce's minimum without a fused gradient). % copy: of the measured
device-to-device copy (read + write). --dry-run: the same code on the CPU with tiny shapes
(wall-clock timer), to check the script without a GPU.
Writes OUTDIR/bench_smoke.json, OUTDIR/bench_smoke.md (the README's table) and
OUTDIR/kernels.md (torch.profiler: each kernel's time per step, fastce and eager).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import fastce

ops = torch.ops.fastce
L2_CYCLE_BYTES = 256 << 20  # inputs cycled per case: well past the H200's 50 MB L2
# (shape, dtypes): (rows, classes) or K-dimensional (N, C, d...) with the class dim second.
CASES = [
    ((4096, 32000), ("bfloat16", "float32")),
    ((1024, 128256), ("bfloat16", "float32")),
    ((16384, 128256), ("bfloat16", "float32")),
    ((4, 262144), ("bfloat16",)),
    ((1, 1 << 20), ("bfloat16",)),
    ((65536, 128), ("float32",)),
    ((1 << 20, 10), ("float32",)),
    ((5000, 32000), ("bfloat16",)),
    ((8, 32000, 256), ("bfloat16",)),      # K-dimensional: (batch, vocabulary, positions)
    ((16, 21, 256, 256), ("float32",)),    # K-dimensional: segmentation (N, C, H, W)
]
DRY_CASES = [((64, 1000), ("bfloat16", "float32")), ((2, 5000), ("float32",)), ((4, 10, 6), ("float32",))]


class Timer:
    """Per-call time of fn over `calls` back-to-back calls: CUDA events on a GPU, wall clock
    on the CPU (dry run)."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def window_ms(self, fn, inputs, calls):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                fn(inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for i in range(calls):
            fn(inputs[i % len(inputs)])
        return (time.perf_counter() - t0) * 1e3 / calls

    def measure(self, fn, inputs, calls, reps):
        """(median ms per call, min, max) over `reps` windows, after a warm-up window."""
        self.window_ms(fn, inputs, min(calls, 3))
        self.sync()
        times = [self.window_ms(fn, inputs, calls) for _ in range(reps)]
        return statistics.median(times), min(times), max(times)


def copy_bandwidth(timer, device, calls, reps, nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms, _, _ = timer.measure(lambda s: dst.copy_(s), [src], calls, reps)
    return 2 * nbytes / ms / 1e6  # GB/s, read + write


def make_inputs(shape, dtype, device, copies):
    n, c, rest = shape[0], shape[1], shape[2:]
    xs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(copies)]
    ts = [torch.randint(0, c, (n, *rest), device=device) for _ in range(copies)]
    return list(zip(xs, ts))


def train_step(ce):
    def run(p):
        x = p[0].detach().requires_grad_()
        ce(x, p[1]).backward()
    return run


def case(timer, shape, dtype, device, calls, reps):
    bytes_x = math.prod(shape) * torch.finfo(dtype).bits // 8
    copies = max(1, min(16, -(-L2_CYCLE_BYTES // bytes_x)))
    pairs = make_inputs(shape, dtype, device, copies)
    fwd = timer.measure(lambda p: ops.cross_entropy_forward(p[0], p[1], None), pairs, calls, reps)
    saved = [ops.cross_entropy_forward(x, t, None) for x, t in pairs]
    one = torch.ones((), device=device, dtype=dtype)
    bwd_inputs = [(x, t, s[2], s[3]) for (x, t), s in zip(pairs, saved)]
    bwd = timer.measure(lambda p: ops.cross_entropy_backward(one, one, p[0], p[1], None, p[2], p[3]), bwd_inputs,
                        calls, reps)
    ours = timer.measure(train_step(fastce.cross_entropy), pairs, calls, reps)
    try:
        eager_fwd = timer.measure(lambda p: F.cross_entropy(p[0], p[1]), pairs, calls, reps)
        eager = timer.measure(train_step(F.cross_entropy), pairs, calls, reps)
    except torch.OutOfMemoryError:
        eager_fwd = eager = (float("nan"),) * 3
    kernels = profile_step(pairs[0], device)
    del pairs, saved, bwd_inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""), bytes_x=bytes_x,
                copies=copies, fwd=fwd, bwd=bwd, fwd_bwd=ours, eager_fwd=eager_fwd, eager_fwd_bwd=eager,
                fwd_gbs=bytes_x / fwd[0] / 1e6, bwd_gbs=2 * bytes_x / bwd[0] / 1e6,
                fwd_bwd_gbs=3 * bytes_x / ours[0] / 1e6, kernels=kernels)


def profile_step(pair, device):
    """Per-kernel times (us, summed over one training step) of fastce's and eager's step."""
    from torch.profiler import ProfilerActivity, profile
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    out = {}
    for name, ce in (("fastce", fastce.cross_entropy), ("eager", F.cross_entropy)):
        step = train_step(ce)
        step(pair)  # warm
        with profile(activities=[activity]) as prof:
            step(pair)
            if device == "cuda":
                torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None) if device == "cuda" else e.self_cpu_time_total
            if device == "cuda" and t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if t and t > 0:
                rows.append((e.key, e.count, float(t)))
        rows.sort(key=lambda r: -r[2])
        out[name] = rows[:8]
    return out


def table(results, bw, info):
    lines = [f"GPU {info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}); device copy {bw:.0f} GB/s "
             f"(read + write); medians of {info['reps']} windows of {info['calls']} back-to-back calls "
             "(min-max), inputs cycled past L2", "",
             "| shape | dtype | fwd ms | fwd GB/s (% copy) | bwd ms | bwd GB/s (% copy) | fwd+bwd ms "
             "| fwd+bwd GB/s (% copy) | eager fwd ms | eager fwd+bwd ms | speed-up fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(t):
        return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"

    for r in results:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {ms(r['fwd'])} | {r['fwd_gbs']:.0f} ({100 * r['fwd_gbs'] / bw:.0f}%) "
            f"| {ms(r['bwd'])} | {r['bwd_gbs']:.0f} ({100 * r['bwd_gbs'] / bw:.0f}%) | {ms(r['fwd_bwd'])} "
            f"| {r['fwd_bwd_gbs']:.0f} ({100 * r['fwd_bwd_gbs'] / bw:.0f}%) | {ms(r['eager_fwd'])} "
            f"| {ms(r['eager_fwd_bwd'])} | {r['eager_fwd_bwd'][0] / r['fwd_bwd'][0]:.2f}x |")
    return lines


def kernel_table(results):
    lines = ["Per-kernel time of one training step (torch.profiler, us; top kernels)", "",
             "| shape | dtype | impl | kernel | calls | us |", "|---|---|---|---|---|---|"]
    for r in results:
        for impl, rows in r["kernels"].items():
            for name, count, us in rows:
                lines.append(f"| {r['shape']} | {r['dtype']} | {impl} | `{name[:90]}` | {count} | {us:.1f} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script itself")
    p.add_argument("--only", default="", help="comma-separated shapes to run, e.g. 4096x32000")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    calls = args.calls if args.dry_run else max(20, args.calls)
    torch.manual_seed(0)
    timer = Timer(device)
    bw = copy_bandwidth(timer, device, calls, args.reps, (16 << 20) if args.dry_run else (1 << 30))
    results = []
    for shape, dtypes in (DRY_CASES if args.dry_run else CASES):
        if args.only and "x".join(map(str, shape)) not in args.only.split(","):
            continue
        for name in dtypes:
            r = case(timer, shape, getattr(torch, name), device, calls, args.reps)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
    info = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "none (dry run on the CPU)",
                torch=torch.__version__, cuda=torch.version.cuda, copy_gbs=bw, reps=args.reps, calls=calls)
    with open(f"{args.out}/bench_smoke.json", "w") as f:
        json.dump(dict(info=info, results=results), f, indent=1)
    lines = table(results, bw, info)
    with open(f"{args.out}/bench_smoke.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"{args.out}/kernels.md", "w") as f:
        f.write("\n".join(kernel_table(results)) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
