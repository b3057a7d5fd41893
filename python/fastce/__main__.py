"""`python -m fastce`: the worked example users know, then a quick speed check against torch."""
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


def median_time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def speed_check(rows=2048, vocab=32000):
    print(f"\nSpeed on an LLM-sized batch ({rows} x {vocab} float32 logits, {torch.get_num_threads()} threads, "
          f"CPU kernels: {fastce.cpu_isa()}), median of 5:")
    logits = torch.randn(rows, vocab)
    target = torch.randint(0, vocab, (rows,))

    def step(loss_fn):
        x = logits.detach().requires_grad_()
        loss_fn(x, target).backward()

    rows_out = []
    for name, fn in [("torch.nn.functional.cross_entropy", F.cross_entropy), ("fastce.cross_entropy", fastce.cross_entropy)]:
        fwd = median_time(lambda: fn(logits, target))
        both = median_time(lambda: step(fn))
        rows_out.append((name, fwd, both))
    base = rows_out[0]
    print(f"  {'':36s} {'forward':>10s} {'fwd+bwd':>10s}")
    for name, fwd, both in rows_out:
        print(f"  {name:36s} {fwd * 1e3:8.1f}ms {both * 1e3:8.1f}ms   "
              f"({base[1] / fwd:.1f}x, {base[2] / both:.1f}x vs torch)")
    print("  Full benchmark: python -m fastce.bench")


if __name__ == "__main__":
    worked_example()
    speed_check()
