"""A short GPU timing run for scripts/gpu_check.sh: copy bandwidth, then fastce's forward and
backward kernels and torch eager on a few LLM shapes, as achieved bandwidth.

    python benchmarks/bench_gpu_smoke.py --out OUTDIR [--seconds-per-case 0.5]

Bytes counted: forward reads the logits once; backward reads them and writes the gradient;
fwd+bwd (torch eager's, and ours through autograd) is reported as time only. Every case
cycles through enough input copies to exceed the L2 cache. Medians of CUDA-event timings
after a warm-up. Writes OUTDIR/bench_smoke.json and OUTDIR/bench_smoke.md.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import fastce

ops = torch.ops.fastce
SHAPES = [(4096, 32000), (4096, 128256), (16384, 128256), (1024, 262144), (8, 262144), (8, 32000)]
DTYPES = [torch.bfloat16, torch.float32]
L2_BYTES = 256 << 20  # inputs cycled per case: comfortably more than the H200's 50 MB L2


def median_ms(fn, inputs, seconds):
    """Median time of fn(inp) over a cycle of inputs, CUDA events, after a warm-up."""
    for inp in inputs[:3]:
        fn(inp)
    torch.cuda.synchronize()
    times, total, i = [], 0.0, 0
    while (total < seconds * 1e3 or len(times) < 5) and len(times) < 200:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        inp = inputs[i % len(inputs)]
        start.record()
        fn(inp)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        total += times[-1]
        i += 1
    return statistics.median(times)


def copy_bandwidth(seconds):
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda s: dst.copy_(s), [src], seconds)
    return 2 * n / ms / 1e6  # GB/s


def case(n, v, dtype, seconds):
    bytes_x = n * v * torch.finfo(dtype).bits // 8
    copies = max(1, min(32, -(-L2_BYTES // bytes_x)))
    xs = [torch.randn(n, v, device="cuda", dtype=dtype) for _ in range(copies)]
    ts = [torch.randint(0, v, (n,), device="cuda") for _ in range(copies)]
    pairs = list(zip(xs, ts))
    fwd = median_ms(lambda p: ops.cross_entropy_forward(p[0], p[1], None), pairs, seconds)  # 'mean'
    saved = [ops.cross_entropy_forward(x, t, None) for x, t in pairs]
    one = torch.ones((), device="cuda", dtype=dtype)
    bwd_inputs = [(x, t, s[2], s[3]) for (x, t), s in zip(pairs, saved)]
    bwd = median_ms(lambda p: ops.cross_entropy_backward(one, one, p[0], p[1], None, p[2], p[3]), bwd_inputs,
                    seconds)

    def train_step(ce):
        def run(p):
            x = p[0].detach().requires_grad_()
            ce(x, p[1]).backward()
        return run

    ours = median_ms(train_step(fastce.cross_entropy), pairs, seconds)
    try:
        eager_fwd = median_ms(lambda p: F.cross_entropy(p[0], p[1]), pairs, seconds)
        eager = median_ms(train_step(F.cross_entropy), pairs, seconds)
    except torch.OutOfMemoryError:
        eager_fwd = eager = float("nan")
    del xs, ts, pairs, saved, bwd_inputs
    torch.cuda.empty_cache()
    return dict(rows=n, classes=v, dtype=str(dtype).replace("torch.", ""),
                fwd_ms=fwd, fwd_gbs=bytes_x / fwd / 1e6, bwd_ms=bwd, bwd_gbs=2 * bytes_x / bwd / 1e6,
                fwd_bwd_ms=ours, eager_fwd_ms=eager_fwd, eager_fwd_bwd_ms=eager)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds-per-case", type=float, default=0.3)
    args = p.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth(args.seconds_per_case)
    results = []
    for dtype in DTYPES:
        for n, v in SHAPES:
            r = case(n, v, dtype, args.seconds_per_case)
            r["fwd_pct_copy"] = 100 * r["fwd_gbs"] / bw
            r["bwd_pct_copy"] = 100 * r["bwd_gbs"] / bw
            results.append(r)
            print(json.dumps(r), flush=True)
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                copy_gbs=bw)
    with open(f"{args.out}/bench_smoke.json", "w") as f:
        json.dump(dict(info=info, results=results), f, indent=1)
    lines = [f"GPU {info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}); device copy "
             f"{bw:.0f} GB/s (read + write)", "",
             "| rows x classes | dtype | fwd ms | fwd GB/s (% copy) | bwd ms | bwd GB/s (% copy) "
             "| fwd+bwd ms | eager fwd ms | eager fwd+bwd ms | speed-up fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['rows']}x{r['classes']} | {r['dtype']} | {r['fwd_ms']:.3f} | {r['fwd_gbs']:.0f} "
            f"({r['fwd_pct_copy']:.0f}%) | {r['bwd_ms']:.3f} | {r['bwd_gbs']:.0f} ({r['bwd_pct_copy']:.0f}%) "
            f"| {r['fwd_bwd_ms']:.3f} | {r['eager_fwd_ms']:.3f} | {r['eager_fwd_bwd_ms']:.3f} "
            f"| {r['eager_fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x |")
    with open(f"{args.out}/bench_smoke.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
