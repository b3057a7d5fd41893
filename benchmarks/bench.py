"""fastce's benchmark suite: ``python benchmarks/bench.py --help`` (from a source checkout; it
imports the fastce that Python finds: an installed one, or ``PYTHONPATH=python`` after an in-place build).

Times cross-entropy forward and forward+backward over a grid of shapes against torch eager,
``torch.compile`` and, on CUDA, the peers that are installed; measures the device's bandwidth as
the roofline; measures the peak memory of forward+backward per variant, each in its own process;
prints a table and writes CSV, JSON and a PNG chart (when matplotlib is installed) to ``--out``.
``--group shapes`` runs instead the segmentation and few-class shapes ((N, C, H, W), 3-D volumes,
channels_last, binary rows): fwd+bwd against torch eager and torch.compile, with peak memory.

What is timed:
- fwd: ``loss = ce(logits, target)`` with logits that do not require grad (evaluation).
- fwd+bwd: ``torch.autograd.grad(ce(logits, target), logits)`` where the logits are a graph output
  (as an LM head's are): the loss and its gradient with respect to them, and no other node in the
  timed backward (the node that made the logits is not run: it would be a Python node here, which
  costs torch's all-C++ backward more than it costs fastce's, whose loss node is Python too). For ``fastce inplace`` (``inplace_backward=True``,
  which overwrites the logits with their gradient) the logits are a fresh copy made before the
  timer starts and freed after it stops: the copy stands for the LM head's output, whose
  allocation and release are not the loss's cost (the other variants' logits are not freed
  in the timer either). Every variant's own buffers are allocated and freed inside it, by
  its own allocator: on the CPU, torch's come from malloc (fresh pages for large blocks),
  fastce's large gradient from memory it kept from the previous run (as in a training loop;
  ``fastce.empty_cache()``). The memory probe empties that cache before its measured step.
The variants of a case are timed interleaved (one run of each in turn, after each one's warm-up
runs), so that the machine's slow drifts weigh on all of them alike.
"""
import argparse
import csv
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastce

CLASSIFIERS = [(64, 10), (512, 1000), (8192, 1000)]
GRIDS = {
    "quick": [(64, 10), (512, 1000), (256, 32000), (4, 262144)],
    "cpu": CLASSIFIERS + [(512, 32000), (4096, 32000), (2048, 50257), (256, 128256), (1024, 128256),
                          (1024, 151936), (4, 262144), (256, 262144)],
    "cpu-full": CLASSIFIERS + [(n, 32000) for n in (512, 2048, 4096, 8192)]
    + [(n, 50257) for n in (1024, 4096)] + [(n, 128256) for n in (256, 1024, 4096)]
    + [(n, 151936) for n in (1024, 4096)] + [(n, 262144) for n in (4, 64, 1024)],
    "cuda": CLASSIFIERS + [(n, v) for v in (32000, 128256, 262144) for n in (8, 1024, 4096, 16384)]
    + [(4096, 50257), (4096, 151936), (4, 262144)],
    # 32768 rows only up to 151936 classes: eager's fwd+bwd of 32768x262144 fp32 needs ~140 GB
    "cuda-full": CLASSIFIERS + [(n, v) for v in (32000, 50257, 128256, 151936, 262144)
                                for n in (4, 8, 1024, 4096, 16384, 32768) if n * v < 2**33],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("fwd", "fwd+bwd")
MAX_SAMPLES = 200
WARMUP = 3  # untimed runs of each variant after its first one (caches, kept buffers, clocks)
SPREAD_WARN = 0.25  # interquartile range / median above which a timing is flagged
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")  # git ignores it
CPU_MEMORY_MIN_BYTES = 8 << 20  # below this, resident-set noise swamps what is measured


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Variants: each `make()` returns `ce(logits, target) -> scalar loss`, or raises ImportError
# (reported "n/a") or NotApplicable (reported with its reason).

class NotApplicable(Exception):
    pass


def _mean(loss):
    # Some peers return per-row losses; the mean is part of what a trainer pays.
    return loss.mean() if loss.dim() else loss


def _compiled():
    torch._dynamo.reset()  # a fresh cache per case: static shapes, no recompile limit reached
    return torch.compile(F.cross_entropy, dynamic=False)


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss()


def _quack():
    from quack.cross_entropy import cross_entropy
    return lambda x, t: _mean(cross_entropy(x, t))


def _flash_attn():
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def ce(x, t):
        out = cross_entropy_loss(x, t)
        return _mean(out[0] if isinstance(out, tuple) else out)
    return ce


def _apex():
    from apex.contrib.xentropy import SoftmaxCrossEntropyLoss
    # (logits, labels, smoothing, padding_idx, half_to_float)
    return lambda x, t: _mean(SoftmaxCrossEntropyLoss.apply(x, t, 0.0, -100, False))


def _cut_cross_entropy():
    import cut_cross_entropy  # noqa: F401
    raise NotApplicable("takes hidden states and the classifier, not logits: "
                        "see benchmarks/bench_linear.py")


class Variant:
    def __init__(self, name, label, make, cuda_only=False, inplace=False, mutates_input=False):
        self.name, self.label, self.make, self.cuda_only = name, label, make, cuda_only
        # overwrites the logits with their gradient: fwd+bwd only, a fresh copy for every run
        self.inplace = inplace
        # writes into the logits whatever they hold: one copy for all its runs
        self.mutates_input = mutates_input

    def passes(self):
        return PASSES[1:] if self.inplace else PASSES


VARIANTS = [
    Variant("eager", "torch eager", lambda: F.cross_entropy),
    Variant("compile", "torch.compile", _compiled),
    Variant("fastce", "fastce", lambda: fastce.cross_entropy),
    Variant("fastce_inplace", "fastce inplace",
            lambda: functools.partial(fastce.cross_entropy, inplace_backward=True), inplace=True),
    # Liger computes the gradient in the forward pass and stores it in the logits.
    Variant("liger", "Liger-Kernel", _liger, cuda_only=True, mutates_input=True),
    Variant("quack", "quack", _quack, cuda_only=True),
    Variant("flash_attn", "flash-attn", _flash_attn, cuda_only=True),
    Variant("apex", "Apex xentropy", _apex, cuda_only=True),
    Variant("cce", "Cut Cross-Entropy", _cut_cross_entropy, cuda_only=True),
]
BY_NAME = {v.name: v for v in VARIANTS}


class _GraphOutput(torch.autograd.Function):
    """Makes `data` a non-leaf graph output: stands for an LM head's output, which
    `inplace_backward` accepts (it refuses leaves). The timed backward stops at it."""

    @staticmethod
    def forward(ctx, data, anchor):
        return data

    @staticmethod
    def backward(ctx, grad):
        return None, None


def make_step(ce, logits, target, pass_, inplace):
    """(setup, step): setup() prepares one run untimed, step() is the run that is timed."""
    if pass_ == "fwd":
        return (lambda: None), (lambda: ce(logits, target))
    anchor = torch.zeros((), device=logits.device, requires_grad=True)
    state = {}

    def setup():
        # The previous copy is freed here, untimed (releasing 100s of MB takes milliseconds).
        state["copy"] = logits.clone() if inplace else logits
        state["x"] = _GraphOutput.apply(state["copy"], anchor)

    def step():
        x = state.pop("x")
        loss = ce(x, target)
        torch.autograd.grad(loss, x)
        return loss
    return setup, step


# ---------------------------------------------------------------------------------------------
# Timing

def timing_stats(times_s):
    """Median, quartiles, extremes (ms) and spread of one cell's timed runs (seconds).

    spread = interquartile range / median: how much the middle half of the runs vary. A wide
    one (above SPREAD_WARN) says the machine was busy: that cell's median, and the ratios
    computed from it, may be far from the steady value."""
    median = statistics.median(times_s)
    q1, _, q3 = statistics.quantiles(times_s, n=4, method="inclusive") if len(times_s) > 1 else times_s * 3
    return {"median_ms": median * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "min_ms": min(times_s) * 1e3,
            "max_ms": max(times_s) * 1e3, "spread": (q3 - q1) / median if median > 0 else 0.0,
            "samples": len(times_s)}


def wide_spread(stats):
    return stats.get("spread", 0.0) > SPREAD_WARN


class Timer:
    """Medians of repeated single runs: perf_counter on CPU, CUDA events on CUDA.

    The variants of one case are timed interleaved (one run of each in turn), so that the
    machine's slow drifts (a noisy neighbour, frequency changes) fall on all of them alike and
    the ratios between them stay fair. On CUDA the L2 cache is flushed before every run, so
    each run reads its inputs from memory."""

    def __init__(self, device, repeats, budget_s, warmup=2):
        self.cuda = device == "cuda"
        self.repeats, self.budget_s, self.warmup = repeats, budget_s, max(1, warmup)
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
            self.flush_buf = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device="cuda")

    def _once(self, setup, step):
        setup()
        self.sync()
        t0 = time.perf_counter()
        out = step()
        self.sync()
        return time.perf_counter() - t0, out

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, setup, step):
        """(stats, output of the first run) of one (setup, step); raises what it raised."""
        result = self.run_interleaved([(setup, step)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def run_interleaved(self, runs):
        """For each (setup, step) of `runs`: (stats, output of its first run), or the exception
        its first runs raised. The first run (compilation, JIT, lazy initialization) is reported
        apart and never counted; then `warmup` untimed runs (the fastest of them estimates the
        run time), and as many timed runs as the time budget allows, at least `repeats`."""
        results, live, counts = [None] * len(runs), [], []
        for i, (setup, step) in enumerate(runs):
            try:
                first_s, out = self._once(setup, step)
                est = min(self._once(setup, step)[0] for _ in range(self.warmup))
            except Exception as e:  # a peer failing on a shape must not stop the others
                results[i] = e
                continue
            results[i] = (first_s, out)
            live.append(i)
            counts.append(max(self.repeats, min(MAX_SAMPLES, int(self.budget_s / max(est, 1e-6)))))
        samples = {i: [] for i in live}
        for r in range(max(counts, default=0)):
            for i, n in zip(live, counts):
                if r < n and not isinstance(results[i], Exception):
                    try:
                        samples[i].append(self._sample(*runs[i]))
                    except Exception as e:
                        results[i] = e
        if self.cuda:
            try:
                self.sync()
            except Exception as e:  # an asynchronous error: it cannot be told whose
                for i in live:
                    results[i] = e
        for i in live:
            if isinstance(results[i], Exception):
                continue
            times = [s.elapsed_time(e) / 1e3 for s, e in samples[i]] if self.cuda else samples[i]
            first_s, out = results[i]
            results[i] = ({**timing_stats(times), "first_call_s": first_s}, out)
        return results

    def _sample(self, setup, step):
        setup()
        if self.cuda:
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            return start, end
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0


def roofline(device, nbytes, timer):
    """The device's bandwidths (GB/s, 1e9 bytes) on buffers far larger than the caches."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.zeros_like(src)  # touched: pages mapped

    def gbps(moved, setup, step):
        return moved / timer.run(setup, step)[0]["median_ms"] * 1e-6

    none = lambda: None  # noqa: E731
    roof = {"buffer_bytes": n * 4,
            "read_gbps": gbps(n * 4, none, lambda: src.sum()),
            "copy_gbps": gbps(2 * n * 4, none, lambda: dst.copy_(src))}
    if device == "cpu":
        held = []  # the fresh buffer is freed in the next setup, untimed
        roof["fresh_write_gbps"] = gbps(n * 4, held.clear,
                                        lambda: held.append(torch.empty(n).fill_(1.0)))
    roof["exp_gelem_s"] = n / timer.run(none, lambda: torch.exp(src, out=dst))[0]["median_ms"] * 1e-6
    return roof


# ---------------------------------------------------------------------------------------------
# Peak memory, measured in a child process per variant (CUDA) or per case (CPU)

def _rss_hwm_bytes(reset=False):
    """Peak resident set of this process. Uses /proc's resettable VmHWM: getrusage's ru_maxrss
    cannot be reset and, in a child, starts at its parent's peak (it survives exec)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_extra_bytes(device, variant, rows, classes, dtype):
    logits = torch.randn(rows, classes, dtype=DTYPES[dtype], device=device)
    target = torch.randint(0, classes, (rows,), device=device)
    setup, step = make_step(variant.make(), logits, target, "fwd+bwd", variant.inplace)
    setup()
    step()  # warm-up: compilation, lazy initialization
    setup()
    fastce.empty_cache()  # the gradient buffer fastce kept from the warm-up counts in the step
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0)
    base = _rss_hwm_bytes(reset=True)
    step()
    return max(_rss_hwm_bytes() - base, 0)


def memory_probe(spec):
    """Child process: peak extra bytes of one fwd+bwd per case, over what exists before it
    (the logits, the target). Prints one JSON line per case."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    for rows, classes, dtype in spec["cases"]:
        try:
            extra = _peak_extra_bytes(spec["device"], BY_NAME[spec["variant"]], rows, classes, dtype)
        except Exception as e:  # e.g. out of memory: the next cases may still fit
            extra = f"error: {type(e).__name__}: {e}"[:160]
        print(json.dumps({"rows": rows, "classes": classes, "dtype": dtype,
                          "peak_extra_bytes": extra}), flush=True)


def measure_memory(device, variants, cases, threads):
    """{(rows, classes, dtype, variant): peak extra bytes or an error string}."""
    if device == "cpu":
        cases = [c for c in cases if c[0] * c[1] * DTYPES[c[2]].itemsize >= CPU_MEMORY_MIN_BYTES]
        # One process per case: freed memory need not leave the resident set.
        jobs = [(v, [c]) for v in variants for c in cases]
    else:
        jobs = [(v, cases) for v in variants]  # the allocator's peak counter resets exactly
    # A fixed mmap threshold makes glibc return every large free block to the system at once.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = {}
    for i, (v, job_cases) in enumerate(jobs, 1):
        label = f"{v.name} {job_cases[0][0]}x{job_cases[0][1]} {job_cases[0][2]}" \
            if len(job_cases) == 1 else f"{v.name} ({len(job_cases)} cases)"
        log(f"[memory {i}/{len(jobs)}] {label}")
        spec = {"device": device, "variant": v.name, "cases": job_cases, "threads": threads}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-probe", json.dumps(spec)],
                              capture_output=True, text=True, env=env)
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            out[(r["rows"], r["classes"], r["dtype"], v.name)] = r["peak_extra_bytes"]
        if proc.returncode:
            err = (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]
            for c in job_cases:
                out.setdefault((*c, v.name), "error: " + err)
    return out


# ---------------------------------------------------------------------------------------------
# The grid

def loss_check(loss, reference, dtype):
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    got = float(loss.detach().float())
    if math.isclose(got, reference, rel_tol=tol, abs_tol=tol):
        return "ok"
    return f"wrong loss {got:.6g} (torch {reference:.6g})"


def available(variants, device):
    """[(variant, None or the reason it is not run)]"""
    out = []
    for v in variants:
        if v.cuda_only and device != "cuda":
            out.append((v, "CUDA only"))
            continue
        try:
            v.make()
            out.append((v, None))
        except ImportError:
            out.append((v, "not installed"))
        except NotApplicable as e:
            out.append((v, str(e)))
        except Exception as e:  # e.g. a peer built for another torch or Triton
            out.append((v, f"unusable: {type(e).__name__}: {e}"[:160]))
    return out


def measure_case(variants, logits, target, pass_, timer, reference):
    """The variants on one case, timed interleaved: per variant its timing stats and the loss
    check, or an error status."""
    runs, rows = [], []
    for v in variants:
        try:
            data = logits.clone() if v.mutates_input else logits
            runs.append(make_step(v.make(), data, target, pass_, v.inplace))
        except Exception as e:
            runs.append(_failing_step(e))
    for v, result in zip(variants, timer.run_interleaved(runs)):
        if isinstance(result, Exception):
            log(f"{v.label}: error: {type(result).__name__}: {result}")
            rows.append({"status": f"error: {type(result).__name__}: {result}"[:200]})
            continue
        stats, loss = result
        first = stats["first_call_s"]
        log(f"{v.label}: {describe(stats)}" + (f" (first call {first:.1f} s)" if first > 1 else ""))
        rows.append({**stats, "status": loss_check(loss, reference, logits.dtype)})
    return rows


def _failing_step(error):
    def fail():
        raise error
    return fail, fail


def run_grid(args, variants, roof, timer):
    results = []
    total = len(args.shape_list) * len(args.dtype_list) * len(PASSES)
    done, t_start = 0, time.perf_counter()
    for rows, classes in args.shape_list:
        for dname in args.dtype_list:
            torch.manual_seed(0)
            logits = torch.randn(rows, classes, device=args.device, dtype=DTYPES[dname])
            target = torch.randint(0, classes, (rows,), device=args.device)
            reference = float(F.cross_entropy(logits.float(), target))
            nbytes = logits.numel() * logits.element_size()
            for pass_ in PASSES:
                traffic = nbytes if pass_ == "fwd" else 2 * nbytes
                roof_gbps = roof["read_gbps"] if pass_ == "fwd" else roof["copy_gbps"]
                floor_ms = traffic / roof_gbps * 1e-6
                base = {"device": args.device, "rows": rows, "classes": classes, "dtype": dname,
                        "pass": pass_, "logits_bytes": nbytes, "floor_ms": floor_ms}
                timed = [v for v, why in variants if why is None and pass_ in v.passes()]
                for v, why in variants:
                    if why is not None and pass_ in v.passes():
                        results.append({**base, "variant": v.name, "status": "n/a: " + why})
                done += 1
                log(f"[{done}/{total} {time.perf_counter() - t_start:.0f}s] {rows}x{classes} {dname} "
                    f"{pass_}: {', '.join(v.label for v in timed)}")
                for v, measured in zip(timed, measure_case(timed, logits, target, pass_, timer,
                                                           reference)):
                    row = {**base, "variant": v.name, **measured}
                    if "median_ms" in row:
                        row["gbps"] = traffic / row["median_ms"] * 1e-6
                        row["pct_of_roof"] = 100 * floor_ms / row["median_ms"]
                    results.append(row)
            del logits, target
    return results


def add_speedups(results):
    """fastce's speedup over each variant: that variant's time / fastce's, same case."""
    fastce_ms = {(r["rows"], r["classes"], r["dtype"], r["pass"]): r["median_ms"]
                 for r in results if r["variant"] == "fastce" and "median_ms" in r}
    for r in results:
        base = fastce_ms.get((r["rows"], r["classes"], r["dtype"], r["pass"]))
        if base and "median_ms" in r:
            r["fastce_speedup"] = r["median_ms"] / base


# ---------------------------------------------------------------------------------------------
# Report: machine, table, files, chart

def load_average():
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 1)
    except (AttributeError, OSError):
        return None


def machine_info(device, threads):
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": threads or torch.get_num_threads(), "cpu_isa": fastce.cpu_isa(),
            "torch": torch.__version__, "fastce": fastce.__version__,
            "python": platform.python_version(), "os": platform.platform(), "device": device,
            "load_avg": load_average()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    l2_bytes=getattr(p, "L2_cache_size", None), cuda=torch.version.cuda,
                    fastce_cuda_kernels=fastce.has_cuda_kernels())
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    return info


def print_header(report):
    m, roof = report["machine"], report["roofline"]
    keys = ["date", "cpu", "cores", "load_avg", "torch_threads", "cpu_isa", "torch", "fastce", "python", "device",
            "gpu", "gpu_memory_gib", "cuda", "driver", "fastce_cuda_kernels"]
    print("fastce benchmark  " + "  ".join(f"{k}={m[k]}" for k in keys if k in m))
    line = (f"roofline ({roof['buffer_bytes'] / 2**20:.0f} MiB buffers): read {roof['read_gbps']:.1f} GB/s, "
            f"copy (read+write) {roof['copy_gbps']:.1f} GB/s")
    if "fresh_write_gbps" in roof:
        line += f", write into fresh memory {roof['fresh_write_gbps']:.1f} GB/s (page faults)"
    print(line + f", torch.exp {roof['exp_gelem_s']:.2f} Gelem/s")
    print("floor = the fastest the device allows: fwd reads the logits once (read bandwidth); "
          "fwd+bwd reads them once and writes the gradient once (copy bandwidth). "
          "GB/s and %roof count those bytes.")


def describe(stats):
    """One timing in words: its median, spread and range."""
    return (f"{stats['median_ms']:.3f} ms, spread {100 * stats['spread']:.0f}% (IQR/median), "
            f"{stats['min_ms']:.3f}..{stats['max_ms']:.3f} ms over {stats['samples']} runs"
            + (" WIDE" if wide_spread(stats) else ""))


def _fmt_ms(r):
    """A table cell: median (spread %), * when the spread is wide, ! when the loss is wrong."""
    if r is None:
        return "-"
    if "median_ms" in r:
        spread = f" ({100 * r['spread']:.0f}%)" if "spread" in r else ""  # (older results.json: none)
        return (f"{r['median_ms']:.3f}{spread}" + ("*" if wide_spread(r) else "")
                + ("" if r["status"] == "ok" else "!"))
    return "n/a" if r["status"].startswith("n/a") else "err"


def print_spread_warning(results):
    """Names the timings whose repeats vary too much to trust their medians' ratios."""
    timed = [r for r in results if "spread" in r]
    if not timed:
        return
    wide = [r for r in timed if wide_spread(r)]
    if not wide:
        print(f"spread: every timing's IQR/median is within {100 * SPREAD_WARN:.0f}% "
              f"(largest {100 * max((r['spread'] for r in timed), default=0):.0f}%)")
        return
    shown = 8
    cells = ", ".join(f"{r['rows']}x{r['classes']} {r['dtype']} {r['pass']} {r['variant']} "
                      f"({100 * r['spread']:.0f}%)" for r in wide[:shown])
    if len(wide) > shown:
        cells += f" and {len(wide) - shown} more (marked *)"
    print(f"WARNING: {len(wide)} of {len(timed)} timings have a wide spread (IQR/median > "
          f"{100 * SPREAD_WARN:.0f}%): {cells}. Their runs varied (a busy machine): their medians "
          f"and the ratios built on them are not steady values. Rerun on a quieter machine, with "
          f"more --repeats, or with --threads 1.")


def _print_rows(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))  # noqa: E731
    print(line(header) + "\n" + "-" * len(line(header)))
    for r in rows:
        print(line(r))


def _case(r):
    return r["rows"], r["classes"], r["dtype"]


def print_load_warning(machine):
    """Other processes on the cores make a parallel region wait for a core in every run alike,
    often by a whole scheduler slice: a steady spread does not show it. The 1-minute load
    average before the timings counts the others; after them it counts this run's threads too."""
    if machine.get("device") != "cpu" or machine.get("load_avg") is None:
        return
    threads = machine["torch_threads"]
    others = max(machine["load_avg"], (machine.get("load_avg_end") or 0.0) - threads)
    if others + threads > machine["cores"] + 0.5:
        load = max(machine["load_avg"], machine.get("load_avg_end") or 0.0)
        print(f"WARNING: other processes kept the cores busy (load average {load:.1f} on {machine['cores']} "
              f"cores, {threads} timing threads): a parallel region waits for a core in every run (times in "
              f"multiples of the scheduler's slice, ratios near 1), which the spreads do not show. Use a "
              f"quiet machine, or --threads 1.")


def print_table(report):
    results = report["results"]
    by = {(*_case(r), r["pass"], r["variant"]): r for r in results}
    shown = [v for v in VARIANTS if any(r["variant"] == v.name and "median_ms" in r for r in results)]
    others = [v for v in shown if v.name not in ("fastce", "fastce_inplace")]
    inplace = BY_NAME["fastce_inplace"] in shown
    header = ["shape", "dtype", "pass"] + [f"{v.name} ms" for v in shown] + \
        [f"x {v.name}" for v in others] + (["inplace x eager"] if inplace else []) + \
        ["fastce GB/s", "%roof", "floor ms"]
    table = []
    for case in dict.fromkeys((*_case(r), r["pass"]) for r in results):
        cells = [f"{case[0]}x{case[1]}", case[2], case[3]]
        cells += [_fmt_ms(by.get((*case, v.name))) for v in shown]
        for v in others:
            s = by.get((*case, v.name), {}).get("fastce_speedup")
            cells.append(f"{s:.2f}" if s else "-")
        if inplace:
            ip, eager = by.get((*case, "fastce_inplace"), {}), by.get((*case, "eager"), {})
            ok = "median_ms" in ip and "median_ms" in eager
            cells.append(f"{eager['median_ms'] / ip['median_ms']:.2f}" if ok else "-")
        f = by.get((*case, "fastce"), {})
        floor = next(r["floor_ms"] for k, r in by.items() if k[:4] == case)
        cells += [f"{f['gbps']:.1f}" if "gbps" in f else "-",
                  f"{f['pct_of_roof']:.0f}" if "gbps" in f else "-", f"{floor:.3f}"]
        table.append(cells)
    print("\ntimes in ms: median (spread of the repeats: IQR/median), * = spread over "
          f"{100 * SPREAD_WARN:.0f}%; x V = fastce's speedup over V (V's time / fastce's); "
          "! = loss differs from torch's")
    _print_rows(header, table)
    for p in sorted({f"{r['variant']}: {r['status']}" for r in results
                     if r["status"] != "ok" and not r["status"].startswith("n/a")}):
        print("  ! " + p)
    missing = sorted({f"{BY_NAME[r['variant']].label}: {r['status'][5:]}" for r in results
                      if r["status"].startswith("n/a")})
    if missing:
        print("not run: " + "; ".join(missing))
    print_spread_warning(results)
    print_load_warning(report["machine"])
    print("fwd+bwd is timed from logits that are a graph output (as an LM head's) to the gradient "
          "w.r.t. them; fastce_inplace gets a fresh copy of the logits, made before the timer starts "
          "and freed after it stops (the copy stands for the LM head's output).")

    mem = [r for r in results if "peak_extra_bytes" in r]
    if not mem:
        return
    names = [v.name for v in VARIANTS if any(r["variant"] == v.name for r in mem)]
    mby = {(*_case(r), r["variant"]): r for r in mem}
    table = []
    for case in dict.fromkeys(_case(r) for r in mem):
        cells = [f"{case[0]}x{case[1]}", case[2], f"{case[0] * case[1] * DTYPES[case[2]].itemsize / 1e6:.1f}"]
        for n in names:
            r = mby.get((*case, n))
            cells.append("-" if r is None else f"{r['peak_extra_ratio']:.2f}x"
                         if r["peak_extra_ratio"] is not None else "err")
        table.append(cells)
    how = "RSS high-water mark" if report["machine"]["device"] == "cpu" else "max_memory_allocated"
    print(f"\npeak extra memory of fwd+bwd over the logits, as a multiple of the logits' size "
          f"({how}; each variant in its own process)")
    _print_rows(["shape", "dtype", "logits MB"] + names, table)


CSV_FIELDS = ["device", "rows", "classes", "dtype", "pass", "variant", "status", "median_ms", "q1_ms",
              "q3_ms", "min_ms", "max_ms", "spread", "samples", "first_call_s", "gbps", "pct_of_roof", "floor_ms",
              "fastce_speedup", "logits_bytes", "peak_extra_bytes", "peak_extra_ratio"]


def write_files(report, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(report["results"])
    log(f"wrote {out}/results.csv and {out}/results.json")


def draw_chart(report, path):
    """Speedup bars per case (one panel per pass) and, when measured, the memory multiples."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib, then "
            f"python benchmarks/bench.py --replot {os.path.dirname(path) or '.'})")
        return
    results = report["results"]
    panels = []
    for pass_ in PASSES:
        rows = [r for r in results if r["pass"] == pass_ and "median_ms" in r]
        series = {f"fastce vs {v.label}": {_case(r): r["fastce_speedup"] for r in rows
                                           if r["variant"] == v.name and "fastce_speedup" in r}
                  for v in VARIANTS if v.name not in ("fastce", "fastce_inplace")}
        eager = {_case(r): r["median_ms"] for r in rows if r["variant"] == "eager"}
        series["fastce inplace vs torch eager"] = {
            _case(r): eager[_case(r)] / r["median_ms"] for r in rows
            if r["variant"] == "fastce_inplace" and _case(r) in eager}
        panels.append((f"{pass_}: speedup (x, log scale)", True, series))
    memory = {v.label: {_case(r): r["peak_extra_ratio"] for r in results
                        if r["variant"] == v.name and r.get("peak_extra_ratio") is not None}
              for v in VARIANTS}
    panels.append(("fwd+bwd: peak extra memory / logits", False, memory))
    panels = [(t, log_y, {k: s for k, s in series.items() if s}) for t, log_y, series in panels]
    panels = [p for p in panels if p[2]]
    if not panels:
        return
    n_cases = max(len({c for s in p[2].values() for c in s}) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.9 * n_cases + 2), 3.6 * len(panels)),
                             squeeze=False)
    for ax, (ylabel, log_y, series) in zip(axes[:, 0], panels):
        cases = list(dict.fromkeys(c for s in series.values() for c in s))
        width = 0.8 / len(series)
        for i, (name, s) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j, c in enumerate(cases) if c in s]
            bars = ax.bar(xs, [s[c] for c in cases if c in s], width, label=name)
            ax.bar_label(bars, fmt="%.2g", fontsize=6)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{r}x{c}\n{d}" for r, c, d in cases], fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)  # parity; for memory: the gradient's size
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7, ncol=3)
        ax.grid(axis="y", alpha=0.3)
    m = report["machine"]
    axes[0, 0].set_title(f"fastce {m['fastce']} on {m.get('gpu', m['cpu'])}, "
                         f"torch {m['torch']}, {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# The shape group (--group shapes): segmentation (N, C, d1..dk) logits and rows of few classes,
# fastce against torch eager and torch.compile on forward+backward of a mean loss, with each
# variant's peak extra memory. Shapes are NxCxd1x..xdk (or ROWSxCLASSES); ":cl" = channels_last.

SHAPE_GROUPS = {
    "shapes": ["4x19x512x1024", "8x150x256x256", "16x2x512x512", "8388608x2", "65536x100",
               "2x4x128x128x128", "4x19x512x1024:cl"],
    "shapes-quick": ["2x19x128x256", "4x2x256x256", "262144x2", "2x4x32x32x32", "2x19x128x256:cl"],
}
SHAPE_VARIANTS = ("eager", "compile", "fastce")


def shape_case(spec, dtype, device="cpu"):
    """(logits, target) of one group shape."""
    dims, _, layout = spec.partition(":")
    shape = tuple(int(n) for n in dims.lower().split("x"))
    torch.manual_seed(0)
    logits = torch.randn(shape, dtype=DTYPES[dtype], device=device)
    if layout == "cl":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        logits = logits.contiguous(memory_format=fmt)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=device)
    return logits, target


def shape_memory_probe(spec):
    """Child process: peak extra bytes of one fwd+bwd of a group shape (see _peak_extra_bytes)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    logits, target = shape_case(spec["shape"], spec["dtype"])
    variant = BY_NAME[spec["variant"]]
    setup, step = make_step(variant.make(), logits, target, "fwd+bwd", variant.inplace)
    setup()
    step()
    setup()
    fastce.empty_cache()
    base = _rss_hwm_bytes(reset=True)
    step()
    print(json.dumps({"peak_extra_bytes": max(_rss_hwm_bytes() - base, 0)}), flush=True)


def _shape_peak_memory(spec, variant, dtype, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    job = {"shape": spec, "variant": variant, "dtype": dtype, "threads": threads}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--shape-memory-probe", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["peak_extra_bytes"]
    return None


def run_shape_group(args):
    """Times the group's shapes (fwd+bwd, the variants interleaved), measures peak memory, prints
    a table of medians (spreads), fastce's ratios and memory multiples; returns the rows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer("cpu", args.repeats, 0.5 if args.quick else 1.0, warmup=WARMUP)
    names = [v.name for v in args.variant_list if v.name in SHAPE_VARIANTS]
    results = []
    for spec in SHAPE_GROUPS[args.group]:
        for dname in args.dtype_list:
            logits, target = shape_case(spec, dname)
            reference = float(F.cross_entropy(logits.float(), target))
            log(f"{spec} {dname}: {', '.join(names)}")
            variants = [BY_NAME[v] for v in names]
            rows = measure_case(variants, logits, target, "fwd+bwd", timer, reference)
            nbytes = logits.numel() * logits.element_size()
            for v, r in zip(variants, rows):
                r.update(shape=spec, dtype=dname, variant=v.name, logits_bytes=nbytes)
                if not args.no_memory:
                    extra = _shape_peak_memory(spec, v.name, dname, args.threads)
                    r["peak_extra_ratio"] = None if extra is None else extra / nbytes
                results.append(r)
            del logits, target
    by = {(r["shape"], r["dtype"], r["variant"]): r for r in results}
    header = ["shape", "dtype", "logits MB"] + [f"{v} ms" for v in names] + \
        ["x eager", "x compile"] + ([f"mem {v}" for v in names] if not args.no_memory else [])
    table = []
    for spec, dname in dict.fromkeys((r["shape"], r["dtype"]) for r in results):
        cells = [spec.replace(":cl", " channels_last"), dname,
                 f"{by[(spec, dname, 'fastce')]['logits_bytes'] / 1e6:.1f}"]
        cells += [_fmt_ms(by.get((spec, dname, v))) for v in names]
        f = by.get((spec, dname, "fastce"), {})
        for peer in ("eager", "compile"):
            r = by.get((spec, dname, peer), {})
            ok = "median_ms" in r and "median_ms" in f
            cells.append(f"{r['median_ms'] / f['median_ms']:.2f}" if ok else "-")
        if not args.no_memory:
            for v in names:
                m = by.get((spec, dname, v), {}).get("peak_extra_ratio")
                cells.append("-" if m is None else f"{m:.2f}x")
        table.append(cells)
    print("\nfwd+bwd of a mean loss; times in ms: median (IQR/median of the repeats), * = spread over "
          f"{100 * SPREAD_WARN:.0f}%; x V = V's time / fastce's; mem V = V's peak extra memory (RSS "
          "high-water mark, own process) / the logits' size")
    _print_rows(header, table)
    print_spread_warning([{**r, "rows": r["shape"], "classes": "", "pass": "fwd+bwd"} for r in results])
    return results


# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small grid (about a minute on 2 cores)")
    size.add_argument("--full", action="store_true", help="the large grid")
    p.add_argument("--shapes", help="comma-separated ROWSxCLASSES, e.g. 4096x32000,4x262144")
    p.add_argument("--dtypes", help="comma-separated: float32,bfloat16,float16 "
                   "(default float32,bfloat16; --quick: float32)")
    p.add_argument("--variants", help="comma-separated subset of: " + ",".join(BY_NAME))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, help="fewest timed runs per cell (default 7; --quick 10); "
                   "fast cells run more, up to a time budget")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for results.csv/json and the chart")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--replot", metavar="DIR", help="print the table and draw the chart of DIR/results.json")
    p.add_argument("--group", choices=sorted(SHAPE_GROUPS),
                   help="run only a shape group: 'shapes' (segmentation NxCxHxW, channels_last, and rows "
                        "of few classes; fwd+bwd against torch eager and torch.compile), 'shapes-quick'")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: the child process
    p.add_argument("--shape-memory-probe", help=argparse.SUPPRESS)  # internal: the child process
    args = p.parse_args(argv)
    if args.shapes:
        args.shape_list = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        args.shape_list = GRIDS["quick" if args.quick else args.device + ("-full" if args.full else "")]
    args.dtype_list = (args.dtypes or ("float32" if args.quick or args.group else "float32,bfloat16")).split(",")
    for d in args.dtype_list:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    names = args.variants.split(",") if args.variants else list(BY_NAME)
    for n in names:
        if n not in BY_NAME:
            p.error(f"unknown variant {n!r}; choose from {', '.join(BY_NAME)}")
    args.variant_list = [BY_NAME[n] for n in names]
    args.repeats = args.repeats or (10 if args.quick else 7)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(json.loads(args.memory_probe))
    if args.shape_memory_probe:
        return shape_memory_probe(json.loads(args.shape_memory_probe))
    if args.group:
        return run_shape_group(args)
    if args.replot:
        with open(os.path.join(args.replot, "results.json")) as f:
            report = json.load(f)
        print_header(report)
        print_table(report)
        return draw_chart(report, os.path.join(args.replot, "speedup.png"))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"machine": machine_info(args.device, args.threads),
              "config": {"argv": sys.argv[1:], "shapes": args.shape_list, "dtypes": args.dtype_list,
                         "repeats": args.repeats}}
    # time spent per cell beyond the fewest repeats: GPU timings are steadier
    budget_s = 0.3 if args.device == "cuda" else 0.5 if args.quick else 1.0
    timer = Timer(args.device, args.repeats, budget_s, warmup=WARMUP)
    log("measuring the roofline")
    big = 4 << 30 if args.device == "cuda" else (128 << 20 if args.quick else 512 << 20)
    report["roofline"] = roofline(args.device, big, timer)
    print_header(report)
    variants = available(args.variant_list, args.device)
    results = run_grid(args, variants, report["roofline"], timer)
    add_speedups(results)
    if not args.no_memory:
        runnable = [v for v, why in variants if why is None]
        cases = list(dict.fromkeys((r["rows"], r["classes"], r["dtype"]) for r in results))
        mem = measure_memory(args.device, runnable, cases, args.threads)
        for r in results:
            extra = mem.get((r["rows"], r["classes"], r["dtype"], r["variant"]))
            if r["pass"] == "fwd+bwd" and extra is not None:
                r["peak_extra_bytes"] = extra
                r["peak_extra_ratio"] = extra / r["logits_bytes"] if isinstance(extra, int) else None
    report["machine"]["load_avg_end"] = load_average()
    report["results"] = results
    print_table(report)
    write_files(report, args.out)
    draw_chart(report, os.path.join(args.out, "speedup.png"))


if __name__ == "__main__":
    main()
