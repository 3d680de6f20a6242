"""The CUDA kernels of kernels/cuda executed on the CPU (tests/cuda_emu: emulated runtime, warps,
barriers, shared memory, cp.async/ldmatrix/mma and cub, under AddressSanitizer + UBSan, a subset
under ThreadSanitizer) and compared with the reference (pyinterp/reference, or float64 here).

Data are exact (small integers, quarters) wherever the kernels' fp32/tensor-core sums would
otherwise round differently from the reference, so results compare bit for bit. The first run
compiles the harness (cached by content hash under build/cuda_emu/). The CI subset runs in
`make test`; the full sweep is marked slow (`make cuda-emu` runs everything here)."""
from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cuda_emu import build as emu
from pyinterp.reference import ij_accumulate as ij_reference
from pyinterp.reference import prefix_decode as prefix_reference
from pyinterp.reference import resonator as resonator_reference
from pyinterp.reference import sparse_decode as sparse_reference
from pyinterp.reference import topk_encode as topk_reference

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}


# ---- running a case ---------------------------------------------------------------------------
def _write(case: Path, params: dict, arrays: dict[str, torch.Tensor]) -> None:
    case.mkdir(parents=True, exist_ok=True)
    (case / "params.txt").write_text("".join(f"{k} {v}\n" for k, v in params.items()))
    for name, tensor in arrays.items():
        t = tensor.detach().contiguous().cpu()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        (case / f"{name}.bin").write_bytes(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _read(case: Path, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = (case / f"{name}.out").read_bytes()
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()


SANITIZER = {"variant": "asan"}  # the build the case helpers run; the tsan fixture switches it


@pytest.fixture
def tsan(monkeypatch):
    monkeypatch.setitem(SANITIZER, "variant", "tsan")


# Which harness binary a test needs, from its name: (name fragment, kernel file or "selftest").
_BINARIES = [("harness", "selftest"), ("ij_accumulate", "ij_accumulate"), ("prefix", "prefix_decode"),
             ("resonator", "resonator"), ("sparse", "sparse_decode"), ("topk", "topk_encode")]


@pytest.fixture(scope="module", autouse=True)
def _prebuilt(request):
    """Builds the binaries the selected tests need in parallel (g++ runs take most of the CI time)."""
    needed = set()
    for item in request.session.items:
        if item.module is not request.module:
            continue
        name = item.originalname
        variant = "tsan" if "thread_sanitizer" in name else "asan"
        needed |= {(kernel, variant) for fragment, kernel in _BINARIES if fragment in name}
    with ThreadPoolExecutor(max_workers=max(1, min(len(needed), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda kv: emu.build(*kv), sorted(needed)))


def run_case(tmp_path: Path, kernel: str, params: dict, arrays: dict, *, variant: str | None = None,
             env: dict | None = None, name: str = "case") -> tuple[Path, subprocess.CompletedProcess]:
    binary = emu.build(kernel, variant or SANITIZER["variant"])
    case = tmp_path / name
    _write(case, params, arrays)
    log = case / "launches.log"
    result = emu.run(binary, case, env={"CUDA_EMU_LOG": str(log), **(env or {})})
    return case, result


def run_ok(tmp_path: Path, kernel: str, params: dict, arrays: dict, **kw) -> Path:
    case, result = run_case(tmp_path, kernel, params, arrays, **kw)
    assert result.returncode == 0, f"{kernel} {params}: exit {result.returncode}\n{result.stdout}\n{result.stderr[-6000:]}"
    return case


def launches(case: Path) -> list[str]:
    log = case / "launches.log"
    return log.read_text().splitlines() if log.exists() else []


def exact_values(shape, generator, low=-3, high=4, scale=1.0) -> torch.Tensor:
    """Small integers (times scale, e.g. 0.25): exact in every dtype and in every fp32 sum here."""
    return torch.randint(low, high, shape, generator=generator).to(torch.float64) * scale


# ---- the harness itself -----------------------------------------------------------------------
def _selftest(tmp_path, scenario, variant="asan", arrays=None, **params):
    return run_case(tmp_path, "selftest", {"scenario": scenario, **params}, arrays or {}, variant=variant,
                    name=scenario)


def test_harness_runs_a_correct_kernel(tmp_path):
    data = torch.arange(768, dtype=torch.int32)
    case, result = _selftest(tmp_path, "block_sum", arrays={"in": data}, blocks=3)
    assert result.returncode == 0, result.stderr
    assert _read(case, "out", torch.int32, (3,)).tolist() == data.view(3, 256).sum(1).tolist()


@pytest.mark.parametrize("scenario, report", [
    ("dynamic_overflow", "AddressSanitizer: heap-buffer-overflow"),
    ("static_overflow", "out of bounds"),
    ("global_overflow", "AddressSanitizer: heap-buffer-overflow"),
    ("misaligned_vector", "misaligned address"),
    ("divergent_barrier", "barrier divergence"),
    ("warp_deadlock", "deadlock"),
    ("partial_mask", "mask 0x0000ffff"),
])
def test_harness_stops_broken_kernels(tmp_path, scenario, report):
    _, result = _selftest(tmp_path, scenario, arrays={"in": torch.arange(64, dtype=torch.int32)})
    assert result.returncode != 0
    assert report in result.stderr, result.stderr[-3000:]


def test_harness_poisons_shared_memory(tmp_path):
    case, result = _selftest(tmp_path, "uninitialised_read")
    assert result.returncode == 0, result.stderr
    assert (_read(case, "out", torch.int32, (32,)) == -1).all()


def test_harness_cp_async_lands_at_its_wait(tmp_path):
    data = torch.arange(256, dtype=torch.int32)
    case, result = _selftest(tmp_path, "cp_async_order", arrays={"in": data})
    assert result.returncode == 0, result.stderr
    assert (_read(case, "before", torch.int32, (64,)) == -1).all()  # the poison: not yet copied
    assert _read(case, "after", torch.int32, (64,)).tolist() == data[::4].tolist()


def test_harness_mma_follows_the_ptx_fragment_tables(tmp_path):
    g = torch.Generator().manual_seed(0)
    A = exact_values((16, 16), g).to(torch.float16)
    Bt = exact_values((8, 16), g).to(torch.float16)
    case, result = _selftest(tmp_path, "mma_tile", arrays={"A": A, "Bt": Bt})
    assert result.returncode == 0, result.stderr
    assert torch.equal(_read(case, "D", torch.float32, (16, 8)), A.float() @ Bt.float().T)


def test_harness_enforces_launch_limits(tmp_path):
    case, result = _selftest(tmp_path, "launch_limits")
    assert result.returncode == 0, result.stderr
    invalid_config, invalid_value = 9, 1
    assert _read(case, "codes", torch.int32, (8,)).tolist() == [
        0, invalid_config, invalid_config,  # 1024 threads; 1025 threads; grid.y = 65536
        0, invalid_value,                   # 48 KiB dynamic shared memory; one byte more without opt-in
        invalid_value, 0, 0]                # opt-in above 227 KiB; 100 KiB opted in and launched


def test_harness_thread_sanitizer_sees_a_missing_barrier(tmp_path):
    _, result = _selftest(tmp_path, "missing_barrier", variant="tsan")
    assert result.returncode != 0
    assert "ThreadSanitizer: data race" in result.stderr, result.stderr[-3000:]


def test_harness_thread_sanitizer_accepts_a_correct_kernel(tmp_path):
    data = torch.arange(768, dtype=torch.int32)
    case, result = _selftest(tmp_path, "block_sum", variant="tsan", arrays={"in": data}, blocks=3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _read(case, "out", torch.int32, (3,)).tolist() == data.view(3, 256).sum(1).tolist()


# ---- ij_accumulate.cu -------------------------------------------------------------------------
def _ij_case(tmp_path, dtype, K, E, S, width, with_jbar, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = ij_reference.accumulator_dtype(DTYPES[dtype])
    exact = dtype != "f64"
    grads = (exact_values((K, E, S, width), g, scale=0.25) if exact
             else torch.randn(K, E, S, width, generator=g, dtype=torch.float64)).to(DTYPES[dtype])
    weights = (exact_values((K,), g, 0, 5, 0.25) if exact else torch.rand(K, generator=g, dtype=torch.float64)).to(acc)
    delta = (exact_values((S, width), g, scale=0.5) if exact else torch.randn(S, width, generator=g, dtype=torch.float64)).to(acc)
    P0 = exact_values((E * S,), g).to(acc)
    J0 = exact_values((E * S, width), g).to(acc)
    arrays = {"grads": grads, "weights": weights, "delta": delta, "P": P0}
    if with_jbar:
        arrays["Jbar"] = J0
    case = run_ok(tmp_path, "ij_accumulate", {"dtype": dtype, "K": K, "rows": E * S, "tokens": S, "width": width,
                                               "has_jbar": int(with_jbar)}, arrays)
    P, J = ij_reference.ij_accumulate(grads, weights, delta, return_jbar=True)
    got_P = _read(case, "P", acc, (E * S,))
    want_P = P0.double() + P.double().reshape(-1)
    want_J = J0.double() + J.double().reshape(E * S, width)
    if exact:  # every product and partial sum is a multiple of 1/32 far below 2^24: exact in fp32
        assert torch.equal(got_P.double(), want_P)
    else:
        torch.testing.assert_close(got_P.double(), want_P, rtol=1e-12, atol=1e-12)
    if with_jbar:
        got_J = _read(case, "Jbar", acc, (E * S, width)).double()
        if exact:
            assert torch.equal(got_J, want_J)
        else:
            torch.testing.assert_close(got_J, want_J, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "f64"])
def test_ij_accumulate(tmp_path, dtype):
    # 3 * 5 = 15 rows: the second block's last warp has no row and leaves; width 45: a partial lane pass
    _ij_case(tmp_path, dtype, K=3, E=3, S=5, width=45, with_jbar=True)


def test_ij_accumulate_without_jbar_and_one_node(tmp_path):
    _ij_case(tmp_path, "f32", K=1, E=2, S=1, width=1, with_jbar=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f64"])
@pytest.mark.parametrize("K, E, S, width", [(7, 4, 9, 97), (2, 17, 1, 300), (5, 1, 64, 33)])
def test_ij_accumulate_sweep(tmp_path, dtype, K, E, S, width):
    _ij_case(tmp_path, dtype, K, E, S, width, with_jbar=True, seed=K * 100 + width)


# ---- resonator.cu -----------------------------------------------------------------------------
ACTIVATION_CODE = {"identity": 0, "threshold": 1, "topk": 2}


def _resonator_case(tmp_path, *, batch=5, dim=70, sizes=(9, 12, 7), max_iters=12, update="sequential",
                    activation="identity", k=None, threshold=None, noise=0.0, seed=3, stop="fixed_point",
                    theta=None, detect_cycles=0, known=False, asymmetry=0.0, flips=10, grid=None, env=None,
                    name="case"):
    g = torch.Generator().manual_seed(seed)
    codebooks = [torch.randint(0, 2, (m, dim), generator=g).to(torch.int8) * 2 - 1 for m in sizes]
    truth = torch.stack([torch.randint(0, m, (batch,), generator=g) for m in sizes], 1)
    s = torch.ones(batch, dim, dtype=torch.int8)
    for f, cb in enumerate(codebooks):
        s *= cb[truth[:, f]]
    flip = torch.rand(batch, dim, generator=g).argsort(1)[:, :flips]  # noisy composites: real searches
    s.scatter_(1, flip, -s.gather(1, flip))
    known_t = None
    if known:
        known_t = torch.full((batch, len(sizes)), -1, dtype=torch.int64)
        known_t[::2, 0] = truth[::2, 0]
        known_t[1::3, -1] = truth[1::3, -1]
    ref = resonator_reference.resonator(
        s.double(), [cb.double() for cb in codebooks], max_iters=max_iters, update=update, activation=activation,
        k=k, threshold=threshold, noise=noise, seed=seed, stop=stop, theta=theta, detect_cycles=detect_cycles,
        known=known_t, asymmetry=asymmetry)
    similarity = resonator_reference.similarity_codebooks([cb.double() for cb in codebooks], asymmetry, seed)
    scale = resonator_reference.similarity_scale(noise)
    params = {
        "batch": batch, "dim": dim, "sizes": ",".join(map(str, sizes)), "max_iters": max_iters,
        "parallel": int(update == "parallel"), "activation": ACTIVATION_CODE[activation], "k": k or 0,
        "threshold_units": resonator_reference.threshold_units(threshold, dim, scale) if threshold is not None else 0,
        "noise": repr(float(noise)), "seed": seed, "stop_on_similarity": int(stop == "similarity"),
        "theta_units": resonator_reference.theta_units(theta, dim) if theta is not None else 0,
        "detect_cycles": detect_cycles, "has_known": int(known)}
    if grid is not None:
        params["grid"] = grid
    arrays = {"s": s, "similarity": torch.cat(similarity).to(torch.int8), "projection": torch.cat(codebooks)}
    if known:
        arrays["known"] = known_t.to(torch.int32)
    case = run_ok(tmp_path, "resonator", params, arrays, env=env, name=name)
    F = len(sizes)
    assert _read(case, "indices", torch.int32, (batch, F)).long().tolist() == ref.indices.tolist()
    assert _read(case, "iterations", torch.int32, (batch,)).long().tolist() == ref.iterations.tolist()
    assert _read(case, "converged", torch.bool, (batch,)).tolist() == ref.converged.tolist()
    assert _read(case, "cycle", torch.int32, (batch,)).long().tolist() == ref.cycle.tolist()
    assert torch.equal(_read(case, "similarities", torch.float32, (batch, F)), ref.similarities)
    return case, ref


RESONATOR_VARIANTS = {
    "identity": {},
    "parallel": {"update": "parallel"},
    "threshold": {"activation": "threshold", "threshold": 0.1},
    "topk": {"activation": "topk", "k": 3},
    "noise": {"noise": 0.7},
    "similarity_stop": {"stop": "similarity", "theta": 0.3},
    "cycles": {"update": "parallel", "detect_cycles": 4, "max_iters": 20},
    "known": {"known": True},
    "asymmetry": {"asymmetry": 0.05},
}


@pytest.mark.parametrize("variant", ["identity", "topk", "cycles", "known"])
def test_resonator(tmp_path, variant):
    # two blocks pull the seven problems from the counter while both run
    _resonator_case(tmp_path, batch=7, grid=2, **RESONATOR_VARIANTS[variant])


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(RESONATOR_VARIANTS))
@pytest.mark.parametrize("dim, sizes", [(70, (9, 12, 7)), (32, (40,)), (300, (5, 300))])
def test_resonator_sweep(tmp_path, variant, dim, sizes):
    _resonator_case(tmp_path, batch=6, dim=dim, sizes=sizes, grid=3, env={"CUDA_EMU_CONCURRENT_BLOCKS": "3"},
                    **RESONATOR_VARIANTS[variant])


def test_resonator_own_grid_pulls_several_problems_per_block(tmp_path):
    # one SM: the kernel's grid is its occupancy, fewer blocks than problems
    case, _ = _resonator_case(tmp_path, batch=9, env={"CUDA_EMU_SMS": "1", "CUDA_EMU_CONCURRENT_BLOCKS": "8"})
    grid = _launch_grid(case, "resonator_bits_kernel")
    assert 1 < grid < 9


def _launch_grid(case: Path, kernel: str) -> int:
    lines = [line for line in launches(case) if line.startswith(kernel)]
    assert lines, launches(case)
    return int(lines[-1].split("grid=")[1].split(",")[0])


def test_resonator_codebook_over_shared_memory_is_refused(tmp_path):
    # M_f * 16 bytes of similarities/weights per block pass the 227 KiB opt-in: the codebook-size query
    # refuses it before any launch (the glue turns that into an error naming M_f)
    g = torch.Generator().manual_seed(0)
    M, dim = 15000, 32
    cb = torch.randint(0, 2, (M, dim), generator=g).to(torch.int8) * 2 - 1
    params = {"batch": 1, "dim": dim, "sizes": str(M), "max_iters": 1, "parallel": 0, "activation": 0, "k": 0,
              "threshold_units": 0, "noise": "0.0", "seed": 0, "stop_on_similarity": 0, "theta_units": 0,
              "detect_cycles": 0, "has_known": 0}
    case, result = run_case(tmp_path, "resonator", params, {"s": cb[:1], "similarity": cb, "projection": cb})
    assert result.returncode == 4 and "codebook too large: M_f = 15000 > " in result.stdout, (
        result.stdout + result.stderr[-2000:])
    assert 14000 < int(result.stdout.split(" > ")[1]) < 15000  # 227 KiB / 16 bytes, less the state
    assert not [line for line in launches(case) if line.startswith("resonator_bits_kernel")]


def test_resonator_largest_codebook_runs(tmp_path):
    # 14000 codevectors: over 48 KiB of dynamic shared memory, opted in by resonator_bits_grid
    case, _ = _resonator_case(tmp_path, batch=2, dim=32, sizes=(14000,), max_iters=2, flips=3)
    smem = int([line for line in launches(case) if line.startswith("resonator_bits_kernel")][-1].split("smem=")[1])
    assert 48 * 1024 < smem <= 227 * 1024


# ---- topk_encode.cu ---------------------------------------------------------------------------
# (state capacity kc, AuxK) -> rows per CTA: kFusedConfigs in kernels/cuda/topk_encode.cu
FUSED_CONFIGS = {(32, False): 128, (64, False): 128, (128, False): 64, (256, False): 64,
                 (32, True): 128, (64, True): 64, (128, True): 64}


def _fused_smem(bm: int, kc: int, aux: bool) -> int:
    pipeline = 3 * (bm + 256) * 64              # Tile<BM>::kPipeBytes
    row_state = bm * (kc * 8 + 32 * 8 + 8 + 4 + 4)  # RowTopK<BM, KC>::kBytes
    return pipeline + (2 if aux else 1) * row_state


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _topk_run(tmp_path, dtype, x, W, b_enc, b_dec, k, k_aux=0, dead=None, *, x_offset=0, w_offset=0,
              env=None, name="case"):
    N, D = x.shape
    M = W.shape[0]
    T = DTYPES[dtype]
    arrays = {"x": x.to(T), "W_enc": W.to(T)}
    if b_enc is not None:
        arrays["b_enc"] = b_enc.to(T)
    if b_dec is not None:
        arrays["b_dec"] = b_dec.to(T)
    if k_aux:
        arrays["dead_mask"] = dead
    params = {"dtype": dtype, "N": N, "D": D, "M": M, "k": k, "k_aux": k_aux, "has_b_enc": int(b_enc is not None),
              "has_b_dec": int(b_dec is not None), "x_offset": x_offset, "w_offset": w_offset}
    case = run_ok(tmp_path, "topk_encode", params, arrays, env=env, name=name)
    out = {"values": _read(case, "values", T, (N, k)), "indices": _read(case, "indices", torch.int32, (N, k))}
    if k_aux:
        out["aux_values"] = _read(case, "aux_values", T, (N, k_aux))
        out["aux_indices"] = _read(case, "aux_indices", torch.int32, (N, k_aux))
    return case, out


def _topk_check(tmp_path, dtype, N, D, M, k, k_aux=0, *, n_dead=None, bias=True, seed=0, x_offset=0,
                w_offset=0, env=None, transform=None):
    """Exact data against the reference, bit for bit; returns the launch log."""
    g = torch.Generator().manual_seed(seed)
    x = exact_values((N, D), g)
    W = exact_values((M, D), g)
    b_enc = exact_values((M,), g, scale=0.25) if bias else None
    b_dec = exact_values((D,), g) if bias else None
    dead = None
    if k_aux:
        dead = torch.zeros(M, dtype=torch.bool)
        dead[torch.randperm(M, generator=g)[:n_dead]] = True
    if transform:
        x, W = transform(x, W)
    T = DTYPES[dtype]
    x, W = x.to(T), W.to(T)
    b_enc = b_enc.to(T) if bias else None
    b_dec = b_dec.to(T) if bias else None
    case, out = _topk_run(tmp_path, dtype, x, W, b_enc, b_dec, k, k_aux, dead, x_offset=x_offset,
                          w_offset=w_offset, env=env)
    want = topk_reference.topk_encode(x, W, b_enc, k, b_dec, dead, k_aux)
    for name, w in zip(["values", "indices", "aux_values", "aux_indices"], want):
        _assert_same(out[name], w, name)
    return launches(case)


def _fused_launch(log: list[str]) -> tuple[int, int]:
    """(smem, splits) of the fused kernel's launch."""
    lines = [line for line in log if line.startswith("kernel ")]
    assert len(lines) == 1, log
    grid = lines[0].split("grid=")[1].split()[0].split(",")
    return int(lines[0].split("smem=")[1]), int(grid[1])


def _k_for(kc: int) -> int:
    return {32: 20, 64: 50, 128: 100, 256: 200}[kc]


@pytest.mark.parametrize("kc, aux", [(32, False), (256, False), (64, True), (128, True)])
def test_topk_fused_config(tmp_path, kc, aux):
    bm = FUSED_CONFIGS[(kc, aux)]
    k, k_aux = (_k_for(kc), 0) if not aux else (9, _k_for(kc))
    # N = bm + 3: a second, partial row block; M = 600: three latent tiles (each its own split here)
    log = _topk_check(tmp_path, "f16", bm + 3, 44, 600, k, k_aux, n_dead=300)
    assert _fused_launch(log) == (_fused_smem(bm, kc, aux), 3)


# ---- sparse_decode.cu -------------------------------------------------------------------------
def _valid(indices: torch.Tensor, M: int) -> torch.Tensor:
    return (indices >= 0) & (indices < M)


def _sparse_inputs(N, k, M, D, seed, *, skew=False, invalid=False):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, M, (N, k), generator=g, dtype=torch.int32)
    if skew:  # latent 3 takes half of all pairs: its run spans many chunks of the backward
        indices[torch.rand(N, k, generator=g) < 0.5] = 3
    if invalid:  # the contract: indices outside [0, M) contribute nothing
        flat = indices.view(-1)
        flat[:: 7] = -1
        flat[3:: 11] = M
        flat[5:: 13] = 2**31 - 1
    return g, indices


SPARSE_OFFSETS = {"gather_sum": ["weight_offset", "bias_offset", "out_offset"],
                  "gather_dot": ["grad_offset", "weight_offset"],
                  "sparse_t_matmul": ["rows_offset", "out_offset"]}


def _sparse_check(tmp_path, op, dtype, N, k, M, D, *, seed=0, skew=False, invalid=False, misaligned=False,
                  bias=True, env=None):
    g, indices = _sparse_inputs(N, k, M, D, seed, skew=skew, invalid=invalid)
    T = DTYPES[dtype]
    ok = _valid(indices, M)
    safe = torch.where(ok, indices, 0).long()
    params = {"op": op, "dtype": dtype, "N": N, "k": k, "M": M, "D": D, "has_bias": int(bias)}
    if misaligned:
        params.update({name: 1 for name in SPARSE_OFFSETS[op]})
    if op == "gather_sum":
        values = exact_values((N, k), g, scale=0.25).to(T)
        weight = exact_values((M, D), g).to(T)
        b = exact_values((D,), g).to(T)
        arrays = {"values": values, "indices": indices, "weight": weight, "bias": b}
        want = (sparse_reference.gather_sum(torch.where(ok, values, 0), safe, weight, b if bias else None) if D
                else torch.empty(N, 0, dtype=T))  # the reference's embedding_bag refuses D = 0
        case = run_ok(tmp_path, "sparse_decode", params, arrays, env=env)
        _assert_same(_read(case, "out", T, (N, D)), want, "out")
    elif op == "gather_dot":
        grad = exact_values((N, D), g, scale=0.25).to(T)
        weight = exact_values((M, D), g).to(T)
        arrays = {"grad": grad, "indices": indices, "weight": weight}
        want = torch.where(ok, sparse_reference.gather_dot(grad, safe, weight), 0).to(T)
        case = run_ok(tmp_path, "sparse_decode", params, arrays, env=env)
        _assert_same(_read(case, "out", T, (N, k)), want, "out")
    else:
        coef = exact_values((N, k), g, scale=0.25).to(T)
        rows = exact_values((N, D), g).to(T)
        arrays = {"coef": coef, "indices": indices, "rows": rows}
        if D:
            want_grad, want_sum = sparse_reference.sparse_t_matmul(torch.where(ok, coef, 0), safe, rows, M)
        else:  # the reference cannot reshape (N k, 0); coef_sum as it defines it
            want_grad = torch.empty(M, 0, dtype=T)
            want_sum = torch.zeros(M).index_add_(0, safe.view(-1), torch.where(ok, coef, 0).float().view(-1))
        case = run_ok(tmp_path, "sparse_decode", params, arrays, env=env)
        _assert_same(_read(case, "weight_grad", T, (M, D)), want_grad, "weight_grad")
        _assert_same(_read(case, "coef_sum", torch.float32, (M,)), want_sum, "coef_sum")
    return launches(case)


@pytest.mark.parametrize("op", ["gather_sum", "gather_dot", "sparse_t_matmul"])
@pytest.mark.parametrize("dtype, D, misaligned", [("f16", 72, False), ("f32", 13, True)])
def test_sparse_decode(tmp_path, op, dtype, D, misaligned):
    # k = 37: two 32-pair stages; invalid indices (-1, M, 2^31 - 1) among the valid ones
    _sparse_check(tmp_path, op, dtype, 21, 37, 50, D, invalid=True, misaligned=misaligned)


def test_sparse_backward_latent_spanning_many_chunks(tmp_path):
    # one SM: ~16 chunks of the 1600 pairs; latent 3 holds ~800 of them
    log = _sparse_check(tmp_path, "sparse_t_matmul", "bf16", 200, 8, 40, 24, skew=True, env={"CUDA_EMU_SMS": "1"})
    chunks = [line for line in log if line.startswith("chunk_reduce_kernel")]
    assert chunks and int(chunks[0].split("grid=")[1].split(",")[0]) >= 8, log


@pytest.mark.parametrize("op", ["gather_sum", "gather_dot", "sparse_t_matmul"])
def test_sparse_decode_zero_width(tmp_path, op):
    # D = 0: nothing to gather, but the backward still owes coef_sum (grad of b_enc; issue 13 §2, it was
    # never written before chunk_reduce_kernel made one pass for D = 0)
    _sparse_check(tmp_path, op, "f32", 5, 3, 7, 0)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["gather_sum", "gather_dot", "sparse_t_matmul"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("N, k, M, D, misaligned", [(1, 1, 1, 1, False), (33, 5, 300, 520, False),
                                                     (9, 70, 12, 8, True), (64, 4, 5, 1030, True)])
def test_sparse_decode_sweep(tmp_path, op, dtype, N, k, M, D, misaligned):
    _sparse_check(tmp_path, op, dtype, N, k, M, D, seed=N + D, invalid=True, misaligned=misaligned,
                  skew=M > 3, env={"CUDA_EMU_SMS": "2"})


# ---- prefix_decode.cu -------------------------------------------------------------------------
PREFIX_OFFSETS = {"forward": ["weight_offset", "bias_offset", "out_offset"],
                  "gather_dot": ["grad_offset", "weight_offset"],
                  "t_matmul": ["grad_offset", "out_offset"]}


def _prefix_check(tmp_path, op, dtype, N, k, D, prefixes, *, seed=0, skew=False, invalid=False, misaligned=False,
                  bias=True, skip=(), env=None, name="case"):
    """One launcher of prefix_decode.cu against the reference prefix decode and its autograd (float64,
    exact data, so the kernel's fp32 sums round once, as the float64 result cast to T does). skip:
    latents never drawn (empty buckets); invalid: the contract's out-of-range indices (no bucket)."""
    M = prefixes[-1]
    g, indices = _sparse_inputs(N, k, M, D, seed, skew=skew, invalid=invalid)
    for latent in skip:  # moved to the next drawn latent (the tests keep it in another bucket)
        indices[indices == latent] = latent + 1
    T = DTYPES[dtype]
    ok = _valid(indices, M)
    safe = torch.where(ok, indices, 0)
    values = exact_values((N, k), g, scale=0.25).to(T)
    weight = exact_values((M, D), g).to(T)
    b = exact_values((D,), g).to(T)
    grad = exact_values((len(prefixes), N, D), g).to(T)
    grad_suffix = prefix_reference.suffix_sum(grad.double()).to(T)  # small integers: exact in T
    # float64 reference with the invalid entries' values zeroed (they lie in no prefix)
    v64 = torch.where(ok, values, 0).double().requires_grad_()
    w64 = weight.double().requires_grad_()
    want_out = prefix_reference.prefix_decode(v64, safe, w64, list(prefixes), b.double() if bias else None)
    want_out.backward(grad.double())
    params = {"op": op, "dtype": dtype, "N": N, "k": k, "D": D, "prefixes": ",".join(map(str, prefixes)),
              "has_bias": int(bias)}
    if misaligned:
        params.update({name: 1 for name in PREFIX_OFFSETS[op]})
    if op == "forward":
        case = run_ok(tmp_path, "prefix_decode", params, {"values": values, "indices": indices, "weight": weight,
                                                           "bias": b}, env=env, name=name)
        got = _read(case, "out", T, (len(prefixes), N, D))
        _assert_same(got, want_out.detach().to(T), "out")
    elif op == "gather_dot":
        case = run_ok(tmp_path, "prefix_decode", params, {"grad_suffix": grad_suffix, "indices": indices,
                                                           "weight": weight}, env=env, name=name)
        _assert_same(_read(case, "out", T, (N, k)), torch.where(ok, v64.grad, 0).to(T), "grad_values")
    else:
        case = run_ok(tmp_path, "prefix_decode", params, {"coef": torch.where(ok, values, 0), "indices": indices,
                                                           "grad_suffix": grad_suffix}, env=env, name=name)
        _assert_same(_read(case, "weight_grad", T, (M, D)), w64.grad.to(T), "grad_W_dec")
    return launches(case)


@pytest.mark.parametrize("op", ["forward", "gather_dot", "t_matmul"])
@pytest.mark.parametrize("dtype, D, misaligned", [("f16", 72, False), ("f32", 13, True), ("bf16", 20, False)])
def test_prefix_decode(tmp_path, op, dtype, D, misaligned):
    # N = 21: the third block's warps 5-7 have no row; k = 37: two 32-entry stages; D = 13 and 20 are
    # no multiple of the vector width (scalar path); invalid indices (-1, M, 2^31 - 1) among the valid
    _prefix_check(tmp_path, op, dtype, 21, 37, D, [3, 10, 24, 50], invalid=True, misaligned=misaligned)


@pytest.mark.parametrize("op", ["forward", "gather_dot", "t_matmul"])
def test_prefix_decode_empty_bucket(tmp_path, op):
    # bucket 1 = {latent 5} is never drawn: prefix 1 repeats prefix 0, and no gradient row of bucket 1
    # is read; 8 rows of k = 3: some rows also miss bucket 0
    _prefix_check(tmp_path, op, "bf16", 8, 3, 16, [5, 6, 40, 50], skip=(5,))


@pytest.mark.parametrize("op", ["forward", "gather_dot", "t_matmul"])
def test_prefix_decode_one_prefix_one_entry(tmp_path, op):
    # P = 1 (sparse_decode's own result) and k = 1
    _prefix_check(tmp_path, op, "f32", 9, 1, 8, [7], bias=False)


def test_prefix_backward_latent_spanning_many_chunks(tmp_path):
    # one SM: ~16 chunks of the 1600 pairs; latent 3 (bucket 1 of 3) holds ~800 of them
    log = _prefix_check(tmp_path, "t_matmul", "f16", 200, 8, 24, [2, 6, 40], skew=True, env={"CUDA_EMU_SMS": "1"})
    chunks = [line for line in log if line.startswith("chunk_reduce_kernel")]
    assert chunks and int(chunks[0].split("grid=")[1].split(",")[0]) >= 8, log


@pytest.mark.slow
@pytest.mark.parametrize("op", ["forward", "gather_dot", "t_matmul"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("N, k, D, prefixes, misaligned", [
    (1, 1, 1, [1], False), (33, 5, 520, [18, 37, 75, 150, 300], False), (9, 70, 8, [1, 2, 3, 12], True),
    (64, 4, 1030, [5], True), (17, 40, 24, list(range(2, 129, 2)), False)])
def test_prefix_decode_sweep(tmp_path, op, dtype, N, k, D, prefixes, misaligned):
    # the last: kMaxPrefixes = 64 prefixes, most of them empty in any one row
    _prefix_check(tmp_path, op, dtype, N, k, D, prefixes, seed=N + D, invalid=True, misaligned=misaligned,
                  skew=prefixes[-1] > 3, env={"CUDA_EMU_SMS": "2"})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("kc, aux", sorted(FUSED_CONFIGS))
def test_topk_fused_config_sweep(tmp_path, dtype, kc, aux):
    bm = FUSED_CONFIGS[(kc, aux)]
    k, k_aux = (_k_for(kc), 0) if not aux else (min(_k_for(kc), 128), _k_for(kc))
    log = _topk_check(tmp_path, dtype, 2 * bm + 1, 70, 777, k, k_aux, n_dead=400, seed=kc)
    assert _fused_launch(log) == (_fused_smem(bm, kc, aux), 4)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_topk_fused_with_centering(tmp_path, dtype):
    # fp32 centres x - b_dec in a padded copy (D = 33); bf16 folds b_dec into the bias
    _topk_check(tmp_path, dtype, 40, 33, 300, 7)


def test_topk_splits_with_several_tiles_each(tmp_path):
    # two SMs and one row block: two splits over five tiles (3 + 2), merged per row
    log = _topk_check(tmp_path, "f16", 30, 24, 1200, 16, env={"CUDA_EMU_SMS": "2"})
    assert _fused_launch(log)[1] == 2


@pytest.mark.parametrize("k, k_aux, D", [(300, 0, 40), (130, 20, 40), (9, 144, 288)])
def test_topk_general_path(tmp_path, k, k_aux, D):
    # k > 256; k > 128 with AuxK; k_aux = D/2 > 128 (the spec's default): z materialised, radix select,
    # cub sort
    log = _topk_check(tmp_path, "f16", 19, D, 600, k, k_aux, n_dead=400)
    assert any(line.startswith("gemm_store_kernel") for line in log) and not any(
        line.startswith("kernel ") for line in log), log


@pytest.mark.parametrize("n_dead", [3, 590])
def test_topk_aux_few_and_many_dead(tmp_path, n_dead):
    # 3 dead < k_aux: the rest of the AuxK outputs are the lowest-index live latents at -inf (ReLU 0)
    _topk_check(tmp_path, "f16", 10, 16, 600, 12, 20, n_dead=n_dead)


def test_topk_all_equal_rows(tmp_path):
    # every latent has the same row: all z tie, and the lowest indices win, across tiles and splits
    _topk_check(tmp_path, "f16", 20, 8, 700, 40, 10, n_dead=350, bias=False,
                transform=lambda x, W: (x, W[:1].expand_as(W).clone()))


def test_topk_nan_rows(tmp_path):
    def nan_rows(x, W):
        x[3] = float("nan")        # every z of row 3 is NaN: NaN ranks first, ties to lower index
        W[500, 2] = float("nan")   # latent 500 is NaN in every row
        return x, W
    _topk_check(tmp_path, "f16", 9, 16, 600, 5, 6, n_dead=300, transform=nan_rows)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_topk_one_feature(tmp_path, dtype):
    _topk_check(tmp_path, dtype, 7, 1, 260, 4, 3, n_dead=100)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_topk_misaligned_operands(tmp_path, dtype):
    # x and W_enc start 1 element past 16-byte alignment: both get aligned copies
    _topk_check(tmp_path, dtype, 11, 32, 300, 6, x_offset=1, w_offset=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("N, D, M, k, k_aux, n_dead", [
    (1, 1, 1, 1, 0, 0), (3, 7, 5, 5, 5, 5), (130, 100, 513, 33, 0, 0), (70, 64, 300, 129, 0, 0),
    (5, 520, 600, 300, 300, 20), (257, 16, 256, 32, 32, 256)])
def test_topk_sweep(tmp_path, dtype, N, D, M, k, k_aux, n_dead):
    _topk_check(tmp_path, dtype, N, D, M, k, k_aux, n_dead=n_dead, seed=N + M, env={"CUDA_EMU_SMS": "3"})


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_topk_large_b_dec_contract(tmp_path, dtype):
    """16-bit inputs: b_dec is folded into the bias (kernels/cuda/topk_encode.cuh), z = x W^T +
    (b_enc - b_dec W^T) in fp32. Exact data match bit for bit; realistic data (x near a large b_dec)
    stay within the documented bound 2^-24 * (D + 16) * (|x| + |b_dec|) |W|^T of the reference's z,
    and the picks are a top-k of the reference up to that bound (near-ties may order differently)."""
    T = DTYPES[dtype]
    N, D, M, k = 16, 64, 300, 10
    g = torch.Generator().manual_seed(5)
    # exact: b_dec in the hundreds, x = b_dec + small integers, integer weights
    b_dec = (exact_values((D,), g, 100, 200)).to(T)
    x = (b_dec.double() + exact_values((N, D), g)).to(T)
    W = exact_values((M, D), g).to(T)
    b_enc = exact_values((M,), g, scale=0.25).to(T)
    _, out = _topk_run(tmp_path, dtype, x, W, b_enc, b_dec, k, name="exact")
    want = topk_reference.topk_encode(x, W, b_enc, k, b_dec)
    _assert_same(out["values"], want[0], "values")
    _assert_same(out["indices"], want[1], "indices")
    # realistic: unit-scale activations around b_dec ~ 50, Gaussian weights
    b_dec = (50 + torch.randn(D, generator=g, dtype=torch.float64)).to(T)
    x = (b_dec.double() + torch.randn(N, D, generator=g, dtype=torch.float64)).to(T)
    W = (torch.randn(M, D, generator=g, dtype=torch.float64) / 8).to(T)
    b_enc = (torch.randn(M, generator=g, dtype=torch.float64) / 4).to(T)
    _, out = _topk_run(tmp_path, dtype, x, W, b_enc, b_dec, k, name="realistic")
    z = (x.double() - b_dec.double()) @ W.double().T + b_enc.double()
    bound = 2.0**-24 * (D + 16) * ((x.double().abs() + b_dec.double().abs()) @ W.double().abs().T)
    idx = out["indices"].long()
    picked = z.gather(1, idx)
    kth = z.sort(1, descending=True).values[:, k - 1:k]
    assert (picked >= kth - 2 * bound.max(1, keepdim=True).values).all()
    unit = 2.0**-10 if dtype == "f16" else 2.0**-7  # the output's rounding, relative
    got = out["values"].double()
    assert ((got - picked.clamp_min(0)).abs() <= bound.gather(1, idx) + unit * picked.abs()).all()


# ---- ThreadSanitizer: the racecheck, a subset (every fiber a TSan thread, only barriers order) ----
@pytest.mark.usefixtures("tsan")
def test_thread_sanitizer_topk_fused_and_merge(tmp_path):
    _topk_check(tmp_path, "f16", 67, 40, 600, 9, 20, n_dead=200)


@pytest.mark.usefixtures("tsan")
def test_thread_sanitizer_topk_general(tmp_path):
    _topk_check(tmp_path, "f16", 5, 40, 300, 9, 140, n_dead=200)


@pytest.mark.usefixtures("tsan")
def test_thread_sanitizer_sparse_backward(tmp_path):
    _sparse_check(tmp_path, "sparse_t_matmul", "f32", 60, 8, 20, 40, skew=True, env={"CUDA_EMU_SMS": "1"})


@pytest.mark.usefixtures("tsan")
def test_thread_sanitizer_resonator(tmp_path):
    _resonator_case(tmp_path, batch=5, grid=2, **RESONATOR_VARIANTS["cycles"])


@pytest.mark.usefixtures("tsan")
def test_thread_sanitizer_ij_accumulate(tmp_path):
    _ij_case(tmp_path, "f16", K=2, E=3, S=3, width=40, with_jbar=True)


@pytest.mark.usefixtures("tsan")
def test_thread_sanitizer_prefix_forward(tmp_path):
    _prefix_check(tmp_path, "forward", "f16", 19, 37, 72, [3, 10, 24, 50], invalid=True)


@pytest.mark.usefixtures("tsan")
def test_thread_sanitizer_prefix_backward(tmp_path):
    _prefix_check(tmp_path, "t_matmul", "f32", 60, 8, 40, [4, 9, 20], env={"CUDA_EMU_SMS": "1"})
