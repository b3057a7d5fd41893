"""Hugging Face training step through fastce.hf: peak memory and time of the loss part.

One training step (forward + backward, no optimizer) of a small Llama-style LlamaForCausalLM
with Llama 3's vocabulary (128256), one sequence of 1024 tokens by default. Variants, each
measured in processes of its own (so that one's memory cannot hide another's):

  unpatched      the model as transformers builds it: logits, then ForCausalLMLoss
  fastce_logits  fastce.hf.patch(model, keep_logits=True): the same logits, then
                 fastce.cross_entropy ("logits then a fast loss", as Liger's cross_entropy patch)
  fastce_fused   fastce.hf.patch(model): fastce.linear_cross_entropy, no logits
                 (fastce_fused@N: patch(model, chunk_size=N))
  no_head        the same step without LM head and loss (loss = mean square of the decoder's
                 output): the baseline the loss part is measured against

The loss part of a variant is its step minus no_head's: peak memory and time. Peak memory is
the process's peak resident set during the step minus its resident set just before, on the
kernel's own count (VmHWM, reset through /proc/self/clear_refs), so it sees every allocation:
torch's, and the gradient buffer fastce maps itself (emptied before the step with
fastce.empty_cache(), so that it is counted). Every buffer of 1 MiB or more is mapped and unmapped
with its tensor (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors. Times:
wall and process CPU time (all threads; the steadier on a shared machine), medians over all
timed steps of all rounds, with min-max.

    PYTHONPATH=python python benchmarks/bench_hf.py [--batch 1 --seq 1024 --hidden 512]
        [--layers 2 --vocab 128256 --dtype float32 --rounds 3 --reps 3 --threads N]
        [--variants unpatched,fastce_fused@128,no_head --json raw.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import transformers

import fastce
import fastce.hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import _peak_bytes, _reset_peak, _rss_bytes  # noqa: E402  (same measurement)

VARIANTS = ["unpatched", "fastce_logits", "fastce_fused", "fastce_fused@256", "no_head"]


def build(args):
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256),
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype)).train()


def step_fn(variant, model):
    """The variant's training step: a loss whose backward fills the parameters' .grad."""
    if variant == "no_head":
        return lambda batch: model.model(**batch).last_hidden_state.float().square().mean()
    if variant == "fastce_logits":
        fastce.hf.patch(model, keep_logits=True)
    elif variant.startswith("fastce_fused"):  # fastce_fused@N: chunk_size=N
        chunk = variant.partition("@")[2]
        fastce.hf.patch(model, chunk_size=int(chunk) if chunk else None)
    return lambda batch: model(**batch).loss


def worker(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    loss_of = step_fn(args.variant, model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 8] = -100  # a prompt that is not trained on
    batch = {"input_ids": ids, "labels": labels}
    if args.variant == "no_head":
        del batch["labels"]

    def run():
        model.zero_grad(set_to_none=True)
        start, cpu = time.perf_counter(), time.process_time()
        loss = loss_of(batch)
        loss.backward()
        return time.perf_counter() - start, time.process_time() - cpu, loss.item()

    first = run()  # warm-up: code pages and the BLAS's own buffers are not per step
    model.zero_grad(set_to_none=True)
    fastce.empty_cache()
    base = _rss_bytes()
    reset = _reset_peak()
    run()
    peak = _peak_bytes(reset) - base
    wall, cpu, losses = zip(*[run() for _ in range(args.reps)])
    print(json.dumps({"variant": args.variant, "wall_s": wall, "cpu_s": cpu,
                      "first_s": first[0], "peak_mib": peak / 2 ** 20, "loss": losses[-1]}))


def spread(values, fmt):
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def ratio(a, b):
    return a / b if b > 0 else float("nan")


def medians(runs):
    return {"peak": statistics.median(r["peak_mib"] for r in runs),
            "wall": statistics.median(t for r in runs for t in r["wall_s"]),
            "cpu": statistics.median(t for r in runs for t in r["cpu_s"])}


def print_steps(by):
    print(f"\n{'variant':17s} {'loss':>9s} {'step peak MiB':>24s} {'step wall s':>22s} "
          f"{'step CPU s':>22s}")
    for v, rs in by.items():
        print(f"{v:17s} {rs[0]['loss']:9.5f} "
              f"{spread([r['peak_mib'] for r in rs], '{:.0f}'):>24s} "
              f"{spread([t for r in rs for t in r['wall_s']], '{:.3f}'):>22s} "
              f"{spread([t for r in rs for t in r['cpu_s']], '{:.3f}'):>22s}")


def print_loss_part(med):
    """Each variant's step minus no_head's, and how it compares with unpatched's."""
    base, ref = med["no_head"], med["unpatched"]
    part = {v: {k: m[k] - base[k] for k in m} for v, m in med.items() if v != "no_head"}
    ref_part = part["unpatched"]
    print("\nloss part (step minus no_head, medians) and unpatched / variant:")
    print(f"{'variant':17s} {'peak MiB':>9s} {'x less':>7s} {'wall s':>8s} {'x faster':>9s} "
          f"{'CPU s':>8s} {'x faster':>9s}")
    for v, p in part.items():
        print(f"{v:17s} {p['peak']:9.0f} {ratio(ref_part['peak'], p['peak']):7.1f} "
              f"{p['wall']:8.3f} {ratio(ref_part['wall'], p['wall']):9.2f} "
              f"{p['cpu']:8.3f} {ratio(ref_part['cpu'], p['cpu']):9.2f}")
    for v in (v for v in med if v.startswith("fastce_fused")):
        print(f"whole step, unpatched / {v}: peak {ratio(ref['peak'], med[v]['peak']):.1f}x, "
              f"wall {ratio(ref['wall'], med[v]['wall']):.2f}x, "
              f"CPU {ratio(ref['cpu'], med[v]['cpu']):.2f}x")


def summarize(results, args):
    by = {v: [r for r in results if r["variant"] == v] for v in args.variants.split(",")}
    print_steps(by)
    med = {v: medians(rs) for v, rs in by.items()}
    if "no_head" in med and "unpatched" in med:
        print_loss_part(med)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant, interleaved")
    p.add_argument("--reps", type=int, default=3, help="timed steps per process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1: CPU times that other load on the machine barely changes)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant here
    args = p.parse_args()
    if args.variant:
        worker(args)
        return

    print(f"LlamaForCausalLM V={args.vocab} H={args.hidden} layers={args.layers} "
          f"batch={args.batch} seq={args.seq} "
          f"{args.dtype}, {args.threads or torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.rounds} rounds x {args.reps} steps; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    results = []
    for r in range(args.rounds):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {variant}: peak {results[-1]['peak_mib']:.0f} MiB, "
                  f"wall {statistics.median(results[-1]['wall_s']):.3f} s", file=sys.stderr,
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    summarize(results, args)


if __name__ == "__main__":
    main()
