"""The benchmark suite (benchmarks/bench.py) and `python -m fastce`'s speed check run end to end
and report consistent numbers and spreads (they assert no speed)."""
import csv
import importlib.util
import json
import pathlib

import pytest
import torch

import fastce.__main__ as quick_check


def _load_bench():
    # benchmarks/ is not a package and is not installed: load the script by its path.
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("fastce_benchmarks_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


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
        assert 0 < r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
        assert r["spread"] == pytest.approx((r["q3_ms"] - r["q1_ms"]) / r["median_ms"])
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
    # every timed cell shows its spread; a verdict on the spreads follows the table
    fastce_cell = by[(3, "float32", "fwd", "fastce")]
    assert f"{fastce_cell['median_ms']:.3f} ({100 * fastce_cell['spread']:.0f}%)" in out
    wide = [r for r in timed if r["spread"] > bench.SPREAD_WARN]
    assert (f"WARNING: {len(wide)} of {len(timed)} timings" in out) == bool(wide)
    assert ("spread: every timing's IQR/median is within 25%" in out) == (not wide)


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


def test_timing_stats_and_spread():
    steady = bench.timing_stats([0.010, 0.0101, 0.0099, 0.0100, 0.0102])
    assert steady["median_ms"] == pytest.approx(10.0)
    assert steady["min_ms"] == pytest.approx(9.9) and steady["max_ms"] == pytest.approx(10.2)
    assert steady["q1_ms"] == pytest.approx(10.0) and steady["q3_ms"] == pytest.approx(10.1)
    assert steady["spread"] == pytest.approx(0.01) and not bench.wide_spread(steady)
    # half the runs slowed down by a busy neighbour: the median says little
    noisy = bench.timing_stats([0.010, 0.010, 0.030, 0.030])
    assert noisy["spread"] == pytest.approx((0.030 - 0.010) / 0.020) and bench.wide_spread(noisy)
    assert bench.timing_stats([0.005])["spread"] == 0.0


def _row(variant, median, spread, **extra):
    return {"device": "cpu", "rows": 512, "classes": 1000, "dtype": "float32", "pass": "fwd",
            "variant": variant, "status": "ok", "median_ms": median, "spread": spread,
            "floor_ms": 0.01, **extra}


def test_table_shows_spreads_and_warns_when_wide(capsys):
    report = {"machine": {"device": "cpu"},
              "results": [_row("eager", 0.3, 0.40, fastce_speedup=3.0), _row("fastce", 0.1, 0.05, gbps=20.0,
                                                                             pct_of_roof=10.0)]}
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "0.300 (40%)*" in out and "0.100 (5%)" in out and "0.100 (5%)*" not in out
    assert "WARNING: 1 of 2 timings have a wide spread" in out and "512x1000 float32 fwd eager (40%)" in out

    report["results"][0]["spread"] = 0.10
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "WARNING" not in out and "*" not in out.split("\n", 3)[3]
    assert "spread: every timing's IQR/median is within 25% (largest 10%)" in out


def test_a_loaded_machine_is_named(capsys):
    # Every run of a parallel region waiting for a busy core: a steady spread, a wrong time.
    # load_avg: before the timings (others only); load_avg_end: after them, counting the
    # benchmark's own torch_threads
    machine = {"device": "cpu", "cores": 2, "torch_threads": 2, "load_avg": 0.3, "load_avg_end": 6.6}
    bench.print_load_warning(machine)
    assert "WARNING: other processes kept the cores busy (load average 6.6 on 2 cores" in capsys.readouterr().out
    bench.print_load_warning({**machine, "load_avg": 1.2, "load_avg_end": 0.4})
    assert "load average 1.2 on 2 cores" in capsys.readouterr().out
    bench.print_load_warning({**machine, "load_avg_end": 2.2})
    bench.print_load_warning({**machine, "device": "cuda"})
    bench.print_load_warning({"device": "cpu", "cores": 2, "torch_threads": 2, "load_avg": None})
    assert capsys.readouterr().out == ""


def test_quick_check_of_the_package_reports_spreads(capsys):
    # `python -m fastce` runs from an installed package: its speed check needs no benchmarks/.
    measured = quick_check.speed_check(rows=16, vocab=64, repeats=5)
    out = capsys.readouterr().out
    assert [name for name, *_ in measured] == ["torch.nn.functional.cross_entropy", "fastce.cross_entropy"]
    for _, (fwd, fwd_spread), (both, both_spread) in measured:
        assert fwd > 0 and both > 0 and fwd_spread >= 0 and both_spread >= 0
        assert f"{fwd * 1e3:7.1f}ms ({fwd_spread:4.0%})" in out
    widest = max(s for _, *cells in measured for _, s in cells)
    assert ("WARNING: the repeats vary" in out) == (widest > quick_check.SPREAD_WARN)
    assert "python benchmarks/bench.py" in out


def test_quick_check_names_busy_cores():
    # the load average counts the check's own threads: 2 of them on an idle 2-core machine give ~2
    assert "load average 6.6 on 2 cores" in quick_check.busy_cores_warning(load=6.6, cores=2, threads=2)
    assert quick_check.busy_cores_warning(load=2.3, cores=2, threads=2) is None
    assert quick_check.busy_cores_warning(load=2.0, cores=2, threads=1) is None  # one core left for one thread
    assert "load average 3.0 on 2 cores" in quick_check.busy_cores_warning(load=3.0, cores=2, threads=1)


def test_spread_of_interleaved_timings():
    times = quick_check.interleaved_timings([lambda: None, lambda: sum(range(1000))], repeats=4, warmup=1)
    assert [len(t) for t in times] == [4, 4]
    median, spread = quick_check.median_and_spread([1.0, 1.0, 3.0, 3.0])
    assert median == 2.0 and spread == pytest.approx(1.0)
