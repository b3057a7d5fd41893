"""Per-token outputs (log-probs of chosen tokens + entropy), CPU: fastce against the torch-op
versions RL libraries use, side by side; time and peak memory, forward and forward+backward.

Variants (each written here from its library's definition with torch ops):
  fastce  lp, H = fastce.token_logprobs(logits, index, return_entropy=True)
  trl     TRL's selective_log_softmax (float32: gathered logits minus a logsumexp per sequence;
          16-bit: log_softmax per sequence, gathered) + entropy_from_logits (log_softmax over
          chunks of 128 rows, -sum(exp(logp) * logp))
  verl    verl's logprobs_from_logits_v2 (as TRL's) + entropy_from_logits_with_chunking (chunks
          of 2048 rows in float32: logsumexp - sum(softmax * logits))
The logits are (8, N/8, V), as a batch of 8 sequences. fwd: both outputs without gradients;
fwd+bwd: both outputs and the logits' gradient for random gradients of both.

--linear times fastce.linear_token_logprobs (hidden (N, H), weight (V, H)) against the
matmuls it runs: x @ W.T (forward), and again with g @ W and g.T @ x (backward).

Peak extra memory: the process's peak resident set during one step minus its resident set
before it (the inputs), with glibc returning large freed blocks at once
(MALLOC_MMAP_THRESHOLD_; the script re-executes itself to set it). Times: medians of
interleaved runs, with the spread (interquartile range / median).

    PYTHONPATH=python python benchmarks/bench_tokens.py [--shapes 4096x32000,1024x128256]
        [--dtypes float32,bfloat16] [--repeats 5] [--linear] [--json out.json]
"""
import argparse
import json
import os
import sys

import torch

import fastce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Timer, _rss_hwm_bytes, machine_info  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEQUENCES = 8


# ---- the peers, from their definitions ---------------------------------------------------------

def trl_selective_log_softmax(logits, index):
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(seq, dim=-1) for seq in logits])  # a sequence at a time
        return selected - lse
    out = []
    for seq_logits, seq_index in zip(logits, index):
        logp = torch.log_softmax(seq_logits, dim=-1)
        out.append(logp.gather(-1, seq_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def trl_entropy_from_logits(logits, chunk_size=128):
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = torch.log_softmax(chunk, dim=-1)
        parts.append(-(torch.exp(logp) * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


def verl_entropy_from_logits_with_chunking(logits, chunk_size=2048):
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start:start + chunk_size].float()
        pd = torch.softmax(chunk, dim=-1)
        parts.append(torch.logsumexp(chunk, dim=-1) - (pd * chunk).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


VARIANTS = {
    "fastce": lambda x, i: fastce.token_logprobs(x, i, return_entropy=True),
    "trl": lambda x, i: (trl_selective_log_softmax(x, i), trl_entropy_from_logits(x)),
    "verl": lambda x, i: (trl_selective_log_softmax(x, i), verl_entropy_from_logits_with_chunking(x)),
}


def make_step(fn, logits, index, mode):
    """(setup, step) of one pass; fwd+bwd takes the gradient of both outputs."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(logits, index)
        return (lambda: None), step
    leaf = logits.detach().requires_grad_()
    g_lp = torch.randn(index.shape)
    g_h = torch.randn(index.shape)

    def step():
        lp, h = fn(leaf, index)
        grad, = torch.autograd.grad((lp * g_lp).sum() + (h * g_h).sum(), leaf)
        return grad
    return (lambda: None), step


def peak_extra_bytes(setup, step):
    setup()
    fastce.empty_cache()
    before = _rss_now()
    _rss_hwm_bytes(reset=True)
    out = step()
    peak = _rss_hwm_bytes()
    del out
    return max(peak - before, 0)


def _rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def check(outputs, ref, dtype):
    """The largest difference of a variant's log-probs and entropy from fastce's."""
    lp, h = outputs[:2] if isinstance(outputs, tuple) else (None, None)
    if lp is None:
        return None
    return max((lp.float() - ref[0].float()).abs().max().item(), (h.float() - ref[1].float()).abs().max().item())


def run_case(rows, classes, dtype, modes, names, timer, memory):
    logits = (torch.randn(SEQUENCES, rows // SEQUENCES, classes) * 3).to(DTYPES[dtype])
    index = torch.randint(0, classes, (SEQUENCES, rows // SEQUENCES))
    ref = VARIANTS["fastce"](logits, index)
    results = []
    for mode in modes:
        runs = [make_step(VARIANTS[n], logits, index, mode) for n in names]
        timed = timer.run_interleaved(runs)
        for name, run, got in zip(names, runs, timed):
            row = {"rows": rows, "classes": classes, "dtype": dtype, "mode": mode, "variant": name}
            if isinstance(got, Exception):
                row["error"] = f"{type(got).__name__}: {got}"[:200]
            else:
                stats, out = got
                row.update(stats)
                if mode == "fwd":
                    row["max_diff_vs_fastce"] = check(out, ref, dtype)
                if memory:
                    row["peak_extra_bytes"] = peak_extra_bytes(*run)
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def run_linear(rows, classes, hidden, dtype, timer, chunk_size):
    d = DTYPES[dtype]
    x = torch.randn(rows, hidden, dtype=d)
    w = (torch.randn(classes, hidden) / hidden ** 0.5).to(d)
    index = torch.randint(0, classes, (rows,))
    g = torch.randn(rows, classes, dtype=d)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    g_lp, g_h = torch.randn(rows), torch.randn(rows)

    def fused_fwd():
        with torch.no_grad():
            return fastce.linear_token_logprobs(x, w, index, chunk_size=chunk_size)

    def fused_fwd_bwd():
        lp, h = fastce.linear_token_logprobs(xl, wl, index, chunk_size=chunk_size)
        return torch.autograd.grad((lp * g_lp).sum() + (h * g_h).sum(), (xl, wl))

    def matmuls_fwd():
        return x @ w.t()

    def matmuls_fwd_bwd():  # what the fused op multiplies: logits twice, then both gradients
        a = x @ w.t()
        del a
        b = x @ w.t()
        del b
        return g @ w, g.t().float() @ x.float()

    results = []
    for mode, pair in (("fwd", (fused_fwd, matmuls_fwd)), ("fwd+bwd", (fused_fwd_bwd, matmuls_fwd_bwd))):
        timed = timer.run_interleaved([((lambda: None), f) for f in pair])
        row = {"rows": rows, "classes": classes, "hidden": hidden, "dtype": dtype, "mode": mode}
        for name, got in zip(("fused", "matmuls"), timed):
            row[name + "_median_ms"] = got[0]["median_ms"]
            row[name + "_spread"] = got[0]["spread"]
        row["peak_extra_bytes"] = peak_extra_bytes(lambda: None, pair[0])
        row["ratio"] = row["fused_median_ms"] / row["matmuls_median_ms"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def print_table(results):
    print("\nrows x classes   dtype     pass     variant   median ms (spread)   vs fastce   peak extra MiB")
    by = {(r["rows"], r["classes"], r["dtype"], r["mode"], r["variant"]): r for r in results if "variant" in r}
    for key, r in by.items():
        if "error" in r:
            print(f"{r['rows']}x{r['classes']:<8} {r['dtype']:<9} {r['mode']:<8} {r['variant']:<9} {r['error']}")
            continue
        base = by.get((*key[:4], "fastce"))
        ratio = r["median_ms"] / base["median_ms"] if base and "median_ms" in base else float("nan")
        mem = r.get("peak_extra_bytes")
        print(f"{r['rows']}x{r['classes']:<8} {r['dtype']:<9} {r['mode']:<8} {r['variant']:<9} "
              f"{r['median_ms']:10.1f} ({100 * r['spread']:3.0f}%)   {ratio:8.1f}x   "
              f"{'' if mem is None else f'{mem / 2**20:10.0f}'}")
    for r in results:
        if "ratio" in r:
            print(f"linear {r['rows']}x{r['classes']} H={r['hidden']} {r['dtype']} {r['mode']}: fused "
                  f"{r['fused_median_ms']:.1f} ms, its matmuls {r['matmuls_median_ms']:.1f} ms: "
                  f"{r['ratio']:.2f}x; peak extra {r['peak_extra_bytes'] / 2**20:.0f} MiB")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/bench_tokens.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x32000,1024x128256")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--linear", action="store_true", help="also the fused LM head against its matmuls")
    p.add_argument("--linear-shape", default="4096x32000x256", help="ROWSxCLASSESxHIDDEN")
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None):
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed large blocks leave the resident set
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info("cpu", args.threads)
    print(json.dumps(machine), flush=True)
    timer = Timer("cpu", repeats=args.repeats, budget_s=0.0, warmup=1)
    names = args.variants.split(",")
    results = []
    for shape in args.shapes.split(","):
        rows, classes = (int(n) for n in shape.lower().split("x"))
        for dtype in args.dtypes.split(","):
            results += run_case(rows, classes, dtype, args.modes.split(","), names, timer, not args.no_memory)
    if args.linear:
        rows, classes, hidden = (int(n) for n in args.linear_shape.lower().split("x"))
        for dtype in args.dtypes.split(","):
            results += run_linear(rows, classes, hidden, dtype, timer, args.chunk_size)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
