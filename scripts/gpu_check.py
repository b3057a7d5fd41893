"""Python parts of scripts/gpu_check.sh.

    python scripts/gpu_check.py matrix [--quick] [--dry-run]   # the sanitizer matrix, one pass
    python scripts/gpu_check.py ncu-target [--dry-run]         # the kernels ncu profiles
    python scripts/gpu_check.py results OUTDIR                 # OUTDIR/results.md from the steps

`matrix` runs every op (forward with its gradient, backward with the target gradient, in-place
backward) once per case over a prepared matrix, for compute-sanitizer's memcheck, synccheck and
initcheck: every dtype, row offsets 0-7 in a NaN-filled wider buffer (`x = buf[:, off:off + C]`),
`[:, :V]` slices of a padded vocabulary, whole and split rows, probability targets misaligned
against the logits, ignored rows, class weights, label smoothing and softcap. Each case is also
checked against the CPU backend (the same rules), so the pass is a correctness check too.
--dry-run runs the same code on the CPU against itself (checks the script without a GPU).
"""
import argparse
import json
import os
import re
import sys

import torch

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def padded(t, left, right):
    """t in a NaN-filled buffer with `left` columns before each row and `right` after."""
    n, c = t.shape
    buf = torch.full((n, left + c + right), float("nan"), dtype=t.dtype, device=t.device)
    buf[:, left:left + c] = t
    return buf[:, left:left + c]


def matrix_cases(quick):
    offsets = [0, 1, 3, 7] if quick else list(range(8))
    for dtype in DTYPES:
        for off in offsets:
            for rows, classes in ((6, 1000), (2, 20000)):  # whole rows; split rows (few rows, long)
                for prob in (False, True):
                    yield dict(dtype=dtype, offset=off, rows=rows, classes=classes, prob=prob,
                               right=(8 - off) if off else 3)  # off 0: a [:, :V] slice of a padded buffer


def run_case(c, device, gen):
    import fastce  # noqa: F401  (registers the ops)
    ops = torch.ops.fastce
    dtype, n, v = c["dtype"], c["rows"], c["classes"]
    x0 = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if c["prob"]:
        t0 = torch.softmax(torch.randn(n, v, generator=gen, dtype=torch.float64), 1).to(dtype)
    else:
        t0 = torch.randint(0, v, (n,), generator=gen)
        t0[1] = -100  # an ignored row
    w = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    opt = dict(reduction=0 if c["prob"] else 1, label_smoothing=0.1, softcap=5.0 if c["offset"] % 2 else None)
    opt_list = [opt.get("reduction"), -100, opt["label_smoothing"], 1.0, opt["softcap"], 1e-3, 0, -1]

    def on(dev):
        x = padded(x0.to(dev), c["offset"], c["right"])
        t = padded(t0.to(dev), (c["offset"] + 3) % 8, 2) if c["prob"] else t0.to(dev)
        ww = w.to(dev).to(dtype)
        loss, zl, lse, tw, gx_fwd = ops.cross_entropy_forward(x, t, ww, *opt_list, True, None)
        gl = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev) + 0.5
        gz = torch.zeros_like(gl)
        gx, gy = ops.cross_entropy_backward(gl, gz, x, t, ww, lse, tw, *opt_list, c["prob"])
        xi = padded(x0.to(dev), c["offset"], c["right"])  # its own padded buffer, written in place
        ops.cross_entropy_backward_inplace(gl, gz, xi, t, ww, lse, tw, *opt_list)
        return [r.cpu() for r in (loss, lse, tw, gx_fwd, gx, gy, xi)]

    got = on(device)
    want = on("cpu") if device != "cpu" else got
    tol = TOL[dtype]
    for name, a, b in zip(("loss", "lse", "total_weight", "grad (forward)", "grad", "grad_target", "grad (in place)"),
                          got, want):
        if a.numel() == 0:
            continue
        scale = b.double().abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(scale, 1e-30),
                                   msg=lambda m, name=name: f"{name}: {m}")
    if device != "cpu":
        torch.cuda.synchronize()


def cmd_matrix(args):
    device = "cpu" if args.dry_run else "cuda"
    gen = torch.Generator().manual_seed(0)
    cases = list(matrix_cases(args.quick))
    if args.dry_run:
        cases = cases[:: max(1, len(cases) // 12)]
    failed = 0
    for i, c in enumerate(cases):
        label = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in c.items()}
        try:
            run_case(c, device, gen)
            print(f"ok   {i} {label}", flush=True)
        except Exception as e:  # report every case, then fail
            failed += 1
            print(f"FAIL {i} {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"matrix: {len(cases) - failed}/{len(cases)} cases ok", flush=True)
    return 1 if failed else 0


def cmd_ncu_target(args):
    """The LLM case ncu looks at: bf16 4096 x 32000, class indices, forward with its gradient, then
    the backward op (stats_kernel, grad_kernel), and a split-row case (1 x 1M)."""
    import fastce  # noqa: F401
    ops = torch.ops.fastce
    device = "cpu" if args.dry_run else "cuda"
    shapes = [(64, 1000), (1, 5000)] if args.dry_run else [(4096, 32000), (1, 1 << 20)]
    for n, v in shapes:
        x = torch.randn(n, v, device=device, dtype=torch.bfloat16)
        t = torch.randint(0, v, (n,), device=device)
        loss, zl, lse, tw, _ = ops.cross_entropy_forward(x, t, None)
        one = torch.ones((), device=device)
        ops.cross_entropy_backward(one, torch.zeros_like(one), x, t, None, lse, tw)
    if device == "cuda":
        torch.cuda.synchronize()
    print("ncu-target: done")
    return 0


def last_match(path, pattern):
    if not os.path.exists(path):
        return None
    found = None
    for line in open(path, errors="replace"):
        m = re.search(pattern, line)
        if m:
            found = m
    return found


def cmd_results(args):
    """OUTDIR/results.md: the steps, the tests' counts, the sanitizers' verdicts, the timings."""
    out = args.outdir
    lines = ["# fastce GPU check: results", ""]
    summary = os.path.join(out, "summary.md")
    if os.path.exists(summary):
        lines += [line.rstrip("\n") for line in open(summary)] + [""]
    m = last_match(os.path.join(out, "tests.log"), r"(\d+ (passed|failed|skipped|deselected|errors?)\b.*) in [\d.]+s")
    lines.append(f"- tests: {m.group(1) if m else 'no summary line (see tests.log, tests.progress)'}")
    progress = os.path.join(out, "tests.progress")
    if os.path.exists(progress):
        started = [line.split()[1] for line in open(progress) if line.startswith("START ")]
        ended = {line.split()[1] for line in open(progress) if line.startswith("END ")}
        hung = [s for s in started if s not in ended]
        if hung:
            lines.append(f"- tests: killed during {hung[-1]}")
    for tool in ("memcheck", "synccheck", "initcheck"):
        log = os.path.join(out, f"sanitize_{tool}.log")
        if not os.path.exists(log):
            lines.append(f"- compute-sanitizer {tool}: not run")
            continue
        m = last_match(log, r"ERROR SUMMARY: (\d+) error")
        cases = last_match(log, r"matrix: (\d+/\d+) cases ok")
        lines.append(f"- compute-sanitizer {tool}: {m.group(1) + ' errors' if m else 'no summary'}"
                     f"{', ' + cases.group(1) + ' cases ok' if cases else ''}")
    for name, title in (("bench_smoke.md", "## Timings"), ("kernels.md", "## Kernels")):
        path = os.path.join(out, name)
        if os.path.exists(path):
            lines += ["", title, "", *[line.rstrip("\n") for line in open(path)]]
    ncu = os.path.join(out, "ncu.txt")
    if os.path.exists(ncu):
        keep = [line.rstrip("\n") for line in open(ncu, errors="replace")
                if re.search(r"stats_kernel|grad_kernel|Memory Throughput|DRAM Throughput|Achieved Occupancy|"
                             r"Registers Per Thread|Duration|Warp Cycles Per Issued", line)]
        lines += ["", "## ncu (SpeedOfLight, Occupancy, WarpStateStats): key lines", "", "```", *keep[:80], "```"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("matrix")
    m.add_argument("--quick", action="store_true", help="offsets 0, 1, 3, 7 only")
    m.add_argument("--dry-run", action="store_true")
    n = sub.add_parser("ncu-target")
    n.add_argument("--dry-run", action="store_true")
    r = sub.add_parser("results")
    r.add_argument("outdir")
    args = p.parse_args(argv)
    return {"matrix": cmd_matrix, "ncu-target": cmd_ncu_target, "results": cmd_results}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
