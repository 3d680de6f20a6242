"""`pyinterp bench`: the interleaved rounds and their statistics on fake providers and a fake clock,
the runner on a fake bench with a missing provider, the results file schema, the progress lines, the
plots, the README table, and the roofline helpers. No assertion here depends on how fast anything ran."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))
import readme_table  # noqa: E402
import harness  # noqa: E402
from harness import (add_baseline_ratios, calls_per_sample, device_slug, format_table,  # noqa: E402
                     interleaved_rounds, load_warning, measure_case, pair_ratio_statistics, quantile,
                     ratios_against_baselines, roofline_fraction, time_statistics)

FAKE_BENCH = '''
import time
import pytest

import harness

PROVIDERS = ("pyinterp-slow", "baseline-fast", "peer-missing")


@pytest.mark.parametrize("shape", ["tiny-a", "tiny-b"])
def test_fake(record, progress, shape):
    # tiny-b is quoted in a unit without a roofline (like tok/s, problems/s) and a non-torch dtype
    unit, dtype = ("GB/s", "float32") if shape == "tiny-a" else ("problems/s", "bipolar")
    row = {"op": "fake", "shape": shape, "dtype": dtype, "direction": "forward", "device_kind": "cpu"}
    record({**row, "provider": "peer-missing", "skipped": "peer-missing is not installed"})
    steps = {"pyinterp-slow": lambda: time.sleep(0.004), "baseline-fast": lambda: time.sleep(0.001)}
    measured = harness.measure_case(steps, "cpu", budget_s=0.05, min_rounds=4, max_rounds=6,
                                    label=f"fake {shape}", progress=progress)
    for provider, stats in measured.items():
        record(harness.measured_row({**row, "provider": provider}, stats, work=1.0, unit=unit))
'''


class FakeClock:
    """A clock that each fake step moves on by that step's 'duration'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_steps(durations: dict, clock: FakeClock, log: list):
    def make(name, seconds):
        def step():
            log.append(name)
            clock.now += seconds
            return seconds * 1e3
        return step
    return {name: make(name, seconds) for name, seconds in durations.items()}


def test_rounds_take_turns_with_the_order_rotated_every_round():
    clock, log = FakeClock(), []
    steps = fake_steps({"A": 0.1, "B": 0.2, "C": 0.3}, clock, log)
    times = interleaved_rounds(steps, lambda step: step(), budget_s=100, min_rounds=1, max_rounds=4,
                               ceiling_s=1000, clock=clock)
    assert log == list("ABC" "BCA" "CAB" "ABC")
    # each provider's own times, in round order, however the calls were interleaved
    assert times == {"A": [100.0] * 4, "B": [200.0] * 4, "C": [300.0] * 4}


def test_rounds_go_on_until_the_budget_and_the_minimum_are_both_met():
    # one round = 0.3 s: the 1 s budget is spent after 4 rounds, the minimum (2) long before
    clock, log = FakeClock(), []
    steps = fake_steps({"A": 0.1, "B": 0.2}, clock, log)
    times = interleaved_rounds(steps, lambda step: step(), budget_s=1.0, min_rounds=2, max_rounds=100,
                               ceiling_s=10, clock=clock)
    assert len(times["A"]) == len(times["B"]) == 4
    # short rounds: more of them; the minimum wins over a budget it outlasts
    clock.now = 0.0
    times = interleaved_rounds(fake_steps({"A": 1 / 64, "B": 1 / 64}, clock, []), lambda step: step(),
                               budget_s=1.0, min_rounds=2, max_rounds=1000, ceiling_s=10, clock=clock)
    assert len(times["A"]) == 32
    times = interleaved_rounds(fake_steps({"A": 0.5, "B": 0.5}, clock, []), lambda step: step(),
                               budget_s=0.1, min_rounds=3, max_rounds=100, ceiling_s=10, clock=clock)
    assert len(times["A"]) == 3


def test_rounds_stop_at_max_rounds_and_past_the_ceiling():
    clock = FakeClock()
    times = interleaved_rounds(fake_steps({"A": 0.001}, clock, []), lambda step: step(), budget_s=100,
                               min_rounds=1, max_rounds=7, ceiling_s=1000, clock=clock)
    assert len(times["A"]) == 7
    # a round longer than the ceiling: one round, although the minimum asks for five
    times = interleaved_rounds(fake_steps({"A": 30.0, "B": 40.0}, clock, []), lambda step: step(),
                               budget_s=5, min_rounds=5, max_rounds=100, ceiling_s=20, clock=clock)
    assert len(times["A"]) == len(times["B"]) == 1
    assert interleaved_rounds({}, lambda step: step(), budget_s=1, min_rounds=1, max_rounds=5,
                              ceiling_s=4, clock=clock) == {}


def test_quantile_interpolates_between_order_statistics():
    values = [4.0, 1.0, 3.0, 2.0]
    assert quantile(values, 0.0) == 1.0 and quantile(values, 1.0) == 4.0
    assert quantile(values, 0.25) == pytest.approx(1.75)
    assert quantile(values, 0.5) == pytest.approx(2.5)
    assert quantile(values, 0.8) == pytest.approx(3.4)
    assert quantile([7.0], 0.8) == 7.0


def test_time_statistics():
    stats = time_statistics([10.0, 30.0, 20.0, 50.0, 40.0])
    assert stats == {"rounds": 5, "min_ms": 10.0, "median_ms": 30.0, "p80_ms": 42.0}


def test_pair_ratios_are_taken_within_a_round():
    # the machine slows down 10x in round 3: both providers see it, their ratio does not
    baseline, ours = [20.0, 22.0, 200.0, 21.0], [10.0, 11.0, 100.0, 7.0]
    stats = pair_ratio_statistics(baseline, ours)
    assert stats == {"pairs": 4, "median": 2.0, "p25": 2.0, "p75": 2.25, "min": 2.0, "max": 3.0}
    with pytest.raises(ValueError, match="round pairs"):
        pair_ratio_statistics([1.0, 2.0], [1.0])


def test_ratios_go_from_each_pyinterp_provider_to_each_baseline():
    round_ms = {"pyinterp-cpu": [1.0, 2.0], "pyinterp-torch": [4.0, 4.0], "eager": [2.0, 4.0],
                "peer": [3.0, 6.0]}
    ratios = ratios_against_baselines(round_ms)
    assert set(ratios) == {"pyinterp-cpu", "pyinterp-torch"}
    assert set(ratios["pyinterp-cpu"]) == {"eager", "peer"}
    assert ratios["pyinterp-cpu"]["peer"]["median"] == 3.0
    assert ratios["pyinterp-torch"]["eager"]["min"] == 0.5


def test_calls_per_sample_lengthens_short_steps_only():
    assert calls_per_sample(500.0) == 1 and calls_per_sample(20.0) == 1
    assert calls_per_sample(5.0) == 4
    assert calls_per_sample(0.0) == 100


def test_measure_case_times_every_provider_in_the_same_rounds():
    calls, lines = [], []
    steps = {"pyinterp-x": lambda: calls.append("x") or "answer-x", "base": lambda: calls.append("b") or "answer-b"}
    measured = measure_case(steps, "cpu", budget_s=0.0, min_rounds=3, max_rounds=3, ceiling_s=100,
                            label="case", progress=lines.append)
    assert measured["pyinterp-x"]["rounds"] == measured["base"]["rounds"] == 3
    assert measured["pyinterp-x"]["result"] == "answer-x"  # from the last (peak-memory) call
    assert measured["pyinterp-x"]["vs_baselines"]["base"]["pairs"] == 3
    assert measured["base"]["vs_baselines"] == {}
    n = measured["pyinterp-x"]["calls_per_round"]
    assert calls.count("x") == 1 + 3 * n + 1  # warm-up, rounds, peak memory
    assert any(line.startswith("case pyinterp-x: warm-up") for line in lines)
    assert any(line.startswith("case pyinterp-x: min") and "vs base" in line for line in lines)
    assert any(line.startswith("case base: min") for line in lines)


def test_load_warning_only_for_several_threads_on_a_busy_machine(monkeypatch):
    cores = len(harness.os.sched_getaffinity(0))
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert "--threads 1" in load_warning(2) and f"on {cores} cores" in load_warning(2)
    assert load_warning(1) == ""
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (cores - 0.5, 0.0, 0.0))
    assert load_warning(2) == ""


def test_roofline_fraction_on_known_inputs():
    roofline = {"matmul_tflops": 200.0, "copy_gbps": 3000.0}
    assert roofline_fraction(50.0, "TFLOP/s", roofline) == pytest.approx(0.25)
    assert roofline_fraction(2400.0, "GB/s", roofline) == pytest.approx(0.8)
    with pytest.raises(KeyError):
        roofline_fraction(1.0, "it/s", roofline)


def test_baseline_ratio_uses_the_best_non_pyinterp_provider_of_the_same_case():
    rows = [{"op": "o", "shape": "s", "dtype": "f", "direction": "forward", "provider": p, "median_ms": t}
            for p, t in (("pyinterp-cpu", 2.0), ("torch-eager", 8.0), ("peer", 4.0))]
    rows.append({"op": "o", "shape": "other", "dtype": "f", "direction": "forward",
                 "provider": "torch-eager", "median_ms": 1.0})
    add_baseline_ratios(rows)
    assert [r["speedup_vs_best_baseline"] for r in rows] == [2.0, 0.5, 1.0, 1.0]
    assert rows[0]["best_baseline"] == "peer" and "speedup_spread" not in rows[0]


def test_baseline_ratio_of_interleaved_rounds_is_the_median_pair_ratio_with_its_spread():
    spread = {"pairs": 3, "median": 1.5, "p25": 1.4, "p75": 1.7, "min": 1.3, "max": 1.9}
    rows = [{"op": "o", "shape": "s", "dtype": "f", "direction": "forward", "provider": "pyinterp-cpu",
             "median_ms": 2.0, "vs_baselines": {"peer": spread, "eager": {**spread, "median": 9.0}}},
            {"op": "o", "shape": "s", "dtype": "f", "direction": "forward", "provider": "peer", "median_ms": 4.0},
            {"op": "o", "shape": "s", "dtype": "f", "direction": "forward", "provider": "eager", "median_ms": 9.0}]
    add_baseline_ratios(rows)
    assert rows[0]["best_baseline"] == "peer"
    assert rows[0]["speedup_vs_best_baseline"] == 1.5 and rows[0]["speedup_spread"] == spread
    for r in rows:
        r.update(peak_mib=0.0, throughput=1.0, unit="GB/s", min_ms=1.0, p80_ms=3.0, rounds=3)
    assert "1.50x vs peer (IQR 1.40-1.70, range 1.30-1.90, 3 pairs)" in format_table(rows)


@pytest.fixture
def fake_bench_dir(tmp_path):
    bench_dir = tmp_path / "benches"
    bench_dir.mkdir()
    for name in ("conftest.py", "harness.py", "plots.py"):
        shutil.copy(BENCHES / name, bench_dir / name)
    (bench_dir / "bench_fake.py").write_text(FAKE_BENCH)
    out = tmp_path / "out"
    out.mkdir()
    return bench_dir, out


def test_runner_records_interleaved_and_missing_providers(fake_bench_dir, capsys):
    bench_dir, out = fake_bench_dir
    result = subprocess.run([sys.executable, "-m", "pyinterp", "bench", "--device", "cpu",
                             "--bench-dir", str(bench_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: peer-missing is not installed" in result.stdout
    assert "load average" in result.stdout
    # progress lines, each on a line of its own
    lines = result.stdout.splitlines()
    assert "fake tiny-a pyinterp-slow: warm-up" in result.stdout
    assert any(line.startswith("fake tiny-b pyinterp-slow: min") and "vs baseline-fast" in line for line in lines)
    rows = [json.loads(line) for line in (out / f"{device_slug('cpu')}.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        for key in ("op", "shape", "dtype", "direction", "provider", "device", "device_kind", "torch",
                    "triton", "git_sha", "date", "cpu_cores"):
            assert key in row, key
        assert set(row["load_average"]) == {"start", "end"}
    measured = {(r["shape"], r["provider"]): r for r in rows if not r.get("skipped")}
    for shape in ("tiny-a", "tiny-b"):
        slow, fast = measured[(shape, "pyinterp-slow")], measured[(shape, "baseline-fast")]
        for row in (slow, fast):
            assert 4 <= row["rounds"] <= 6 and len(row["round_ms"]) == row["rounds"]
            assert row["min_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert slow["rounds"] == fast["rounds"]
        pair = slow["vs_baselines"]["baseline-fast"]
        assert pair["pairs"] == slow["rounds"] and pair["min"] <= pair["p25"] <= pair["median"] <= pair["p75"]
        assert slow["best_baseline"] == "baseline-fast" and slow["speedup_spread"] == pair
        assert slow["speedup_vs_best_baseline"] == pair["median"]
        assert "vs_baselines" not in fast and fast["speedup_vs_best_baseline"] == 1
    # A CPU roofline is measured in the run itself and kept in the results folder.
    roofline = json.loads((out / f"roofline-{device_slug('cpu')}.json").read_text())
    assert set(roofline) == {"float32"} and roofline["float32"]["copy_gbps"] > 0
    slow = measured[("tiny-a", "pyinterp-slow")]
    assert slow["roofline_fraction"] == pytest.approx(slow["throughput"] / roofline["float32"]["copy_gbps"],
                                                      rel=1e-2, abs=1e-4)
    assert "roofline_fraction" not in measured[("tiny-b", "pyinterp-slow")]
    skipped = [r for r in rows if r.get("skipped")]
    assert {r["provider"] for r in skipped} == {"peer-missing"} and len(skipped) == 2
    plot = out / "plots" / "fake.png"
    assert plot.exists() and plot.stat().st_size > 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the README table generator reads the run back: a row per case, the spread beside the ratio
    for row in rows:
        row["shape"] = "tiny-a" if row["shape"] == "tiny-a" else "other"
    results = out / "renamed.jsonl"
    results.write_text("".join(json.dumps({**r, "op": "topk_encode"}) + "\n" for r in rows))
    readme_table.main([str(results), "--shape", "tiny-a", "--provider", "pyinterp-slow"])
    table = capsys.readouterr().out.splitlines()
    ours = measured[("tiny-a", "pyinterp-slow")]["speedup_spread"]
    assert table[-1].startswith("| topk_encode | forward | ") and table[-1].count("|") == 7
    assert (f"{ours['median']:.2f}x ({ours['p25']:.2f}-{ours['p75']:.2f}, {ours['min']:.2f}-{ours['max']:.2f}, "
            f"{ours['pairs']})") in table[-1]


def test_runner_rejects_unknown_op(fake_bench_dir):
    bench_dir, out = fake_bench_dir
    result = subprocess.run([sys.executable, "-m", "pyinterp", "bench", "--ops", "nope",
                             "--bench-dir", str(bench_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown op(s) nope" in result.stderr
