"""`pyinterp bench`: the runner on tiny shapes with a fake slow provider and a missing one, the results
file schema, the plots, and the roofline helpers."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))
from harness import add_baseline_ratios, device_slug, roofline_fraction  # noqa: E402

FAKE_BENCH = '''
import time
import pytest

PROVIDERS = ("pyinterp-slow", "baseline-fast", "peer-missing")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", ["tiny-a", "tiny-b"])
def test_fake(benchmark, record, shape, provider):
    # tiny-b is quoted in a unit without a roofline (like tok/s, problems/s) and a non-torch dtype
    unit, dtype = ("GB/s", "float32") if shape == "tiny-a" else ("problems/s", "bipolar")
    row = {"op": "fake", "shape": shape, "dtype": dtype, "direction": "forward",
           "provider": provider, "device_kind": "cpu"}
    if provider == "peer-missing":
        record({**row, "skipped": "peer-missing is not installed"})
        pytest.skip("peer-missing is not installed")
    delay = 0.004 if provider == "pyinterp-slow" else 0.001
    benchmark.pedantic(lambda: time.sleep(delay), rounds=3, iterations=1)
    median_ms = benchmark.stats.stats.median * 1e3
    record({**row, "median_ms": median_ms, "peak_mib": 0.0, "throughput": 1.0 / median_ms, "unit": unit})
'''


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


def test_runner_records_slow_and_missing_providers(fake_bench_dir):
    bench_dir, out = fake_bench_dir
    result = subprocess.run([sys.executable, "-m", "pyinterp", "bench", "--device", "cpu",
                             "--bench-dir", str(bench_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: peer-missing is not installed" in result.stdout
    rows = [json.loads(line) for line in (out / f"{device_slug('cpu')}.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        for key in ("op", "shape", "dtype", "direction", "provider", "device", "device_kind", "torch",
                    "triton", "git_sha", "date"):
            assert key in row, key
    measured = {(r["shape"], r["provider"]): r for r in rows if not r.get("skipped")}
    for shape in ("tiny-a", "tiny-b"):
        slow, fast = measured[(shape, "pyinterp-slow")], measured[(shape, "baseline-fast")]
        assert slow["median_ms"] > fast["median_ms"]
        assert slow["speedup_vs_best_baseline"] < 1 and fast["speedup_vs_best_baseline"] == 1
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


def test_runner_rejects_unknown_op(fake_bench_dir):
    bench_dir, out = fake_bench_dir
    result = subprocess.run([sys.executable, "-m", "pyinterp", "bench", "--ops", "nope",
                             "--bench-dir", str(bench_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown op(s) nope" in result.stderr
