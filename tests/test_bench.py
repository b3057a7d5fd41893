"""The benchmark suite runs end to end and reports consistent numbers (it asserts no speed)."""
import csv
import json

import pytest
import torch

from fastce import bench


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_grid_writes_consistent_results(tmp_path, capsys, keep_threads):
    # one thread: on a busy machine a parallel region can wait milliseconds for its second core
    bench.main(["--device", "cpu", "--quick", "--shapes", "8x16,3x1000", "--dtypes", "float32,bfloat16",
                "--variants", "eager,fastce,liger", "--repeats", "2", "--threads", "1",
                "--no-memory", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["results"]
    # every (shape, dtype, pass) for eager and fastce, the CUDA-only peer reported, not run
    timed = [r for r in rows if r["variant"] in ("eager", "fastce")]
    assert len(timed) == 2 * 2 * 2 * 2
    assert all(r["status"] == "ok" for r in timed), [r["status"] for r in timed]
    assert {r["status"] for r in rows if r["variant"] == "liger"} == {"n/a: CUDA only"}
    for r in timed:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["samples"] >= 2
        moved = r["logits_bytes"] * (1 if r["pass"] == "fwd" else 2)
        assert r["gbps"] == pytest.approx(moved / r["median_ms"] * 1e-6)
        assert r["logits_bytes"] == r["rows"] * r["classes"] * (4 if r["dtype"] == "float32" else 2)
    by = {(r["rows"], r["dtype"], r["pass"], r["variant"]): r for r in timed}
    for (n, d, p, v), r in by.items():
        assert r["fastce_speedup"] == pytest.approx(r["median_ms"] / by[(n, d, p, "fastce")]["median_ms"])
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    out = capsys.readouterr().out
    assert "roofline" in out and report["machine"]["cpu_isa"] in out and "3x1000" in out


def test_a_wrong_loss_is_flagged():
    assert bench.loss_check(torch.tensor(2.0), 2.0, torch.float32) == "ok"
    assert bench.loss_check(torch.tensor(2.1), 2.0, torch.float32).startswith("wrong loss")


def test_peak_memory_of_eager_and_fastce():
    # 256x8192 float32: 8 MiB of logits. torch eager keeps log-softmax, the NLL gradient and the
    # softmax-backward output; fastce needs only the gradient (the slack: 2 MiB huge pages).
    eager, fast = bench.BY_NAME["eager"], bench.BY_NAME["fastce"]
    mem = bench.measure_memory("cpu", [eager, fast], [(256, 8192, "float32")], 1)
    logits = 256 * 8192 * 4
    assert mem[(256, 8192, "float32", "eager")] >= 2 * logits
    assert 0.9 * logits <= mem[(256, 8192, "float32", "fastce")] <= 1.3 * logits


def test_variants_of_a_case_are_timed_interleaved():
    # One run of each in turn (slow drifts of the machine fall on all alike); a variant that
    # fails is reported as its exception and does not stop the others.
    calls = []

    def run(name):
        return (lambda: None), (lambda: calls.append(name) or name)

    def broken():
        raise RuntimeError("no kernel for this shape")
    timer = bench.Timer("cpu", repeats=5, budget_s=0.0)
    a, b, c = timer.run_interleaved([run("a"), (lambda: None, broken), run("b")])
    assert isinstance(b, RuntimeError)
    assert a[1] == "a" and c[1] == "b" and a[0]["samples"] == c[0]["samples"] == 5
    timed = calls[6:]  # after each one's first run and two estimates
    assert calls[:6] == ["a"] * 3 + ["b"] * 3 and timed == ["a", "b"] * 5


def test_a_single_timed_run_raises_its_error():
    def broken():
        raise MemoryError("out of memory")
    with pytest.raises(MemoryError, match="out of memory"):
        bench.Timer("cpu", repeats=2, budget_s=0.0).run(lambda: None, broken)
