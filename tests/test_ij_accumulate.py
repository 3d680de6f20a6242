"""ij_accumulate against its float64 reference on every available backend.

The op has no backward (it updates running sums in place; see pyinterp/ops/ij_accumulate.py), so there
is no gradcheck here: its correctness inside differentiation is covered by tests/test_attribution.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyinterp
from pyinterp.ops.ij_accumulate import ij_accumulate_triton_
from pyinterp.reference.ij_accumulate import ij_accumulate as reference

from helpers import backends


def ij_backends(device: str = "cpu") -> list[str]:
    return backends("ij_accumulate", device)


def make_inputs(num_nodes, outputs, tokens, features, *, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_nodes, outputs, tokens, *features, generator=g, dtype=torch.float64)
    weights = torch.rand(num_nodes, generator=g, dtype=torch.float64)
    delta = torch.randn(tokens, *features, generator=g, dtype=torch.float64)
    return grads.to(device, dtype), weights.to(device), delta.to(device, dtype)


# (K, E, S, features): one of everything, odd widths, a width past one Triton tile, a 2-D feature shape.
SHAPES = [(1, 1, 1, (1,)), (3, 5, 7, (13,)), (2, 3, 2, (130,)), (4, 2, 9, (1,)), (2, 3, 4, (2, 3))]


@pytest.mark.parametrize("backend", ij_backends())
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference(backend, shape):
    grads, weights, delta = make_inputs(*shape)
    P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend=backend)
    p_ref, jbar_ref = reference(grads, weights, delta, return_jbar=True)
    assert P.dtype == torch.float64 and Jbar.shape == (shape[1], shape[2], *shape[3])
    torch.testing.assert_close(P, p_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Jbar, jbar_ref.reshape(Jbar.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ij_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(backend, dtype):
    grads, weights, delta = make_inputs(5, 3, 6, (70,), dtype=dtype)
    P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend=backend)
    assert P.dtype == torch.float32 and Jbar.dtype == torch.float32
    # Exact float64 sums of the same (rounded) inputs: only fp32 accumulation error may remain, far
    # below what an accumulation in fp16/bf16 would make.
    p_exact, jbar_exact = reference(grads.double(), weights, delta.double(), return_jbar=True)
    torch.testing.assert_close(P.double(), p_exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Jbar.double(), jbar_exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ij_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_weight_gives_the_reference_infinities(backend, dtype):
    # Width 13 is not a multiple of the Triton tile: masked lanes must not turn inf * 0 into NaN.
    grads, weights, delta = make_inputs(3, 2, 5, (13,), dtype=dtype)
    grads, delta = grads.abs() + 0.5, delta.abs() + 0.5  # no inf * 0 in the real data
    weights[1] = float("inf")
    P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend=backend)
    p_ref, jbar_ref = reference(grads, weights.to(dtype), delta, return_jbar=True)
    assert torch.isinf(p_ref).all()  # the test's premise
    torch.testing.assert_close(P, p_ref.to(P.dtype), rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(Jbar, jbar_ref.to(Jbar.dtype).reshape(Jbar.shape), rtol=1e-6,
                               atol=0, equal_nan=True)

@pytest.mark.parametrize("backend", ij_backends())
def test_chunks_accumulate_into_running_sums(backend):
    grads, weights, delta = make_inputs(6, 4, 5, (11,), dtype=torch.float32)
    P = torch.full((4, 5), 0.5)
    Jbar = torch.full((4, 5, 11), -0.25)
    for chunk in (slice(0, 2), slice(2, 3), slice(3, 6)):
        pyinterp.ij_accumulate(grads[chunk], weights[chunk], delta, P=P, Jbar=Jbar, backend=backend)
    p_all, jbar_all = reference(grads, weights, delta, return_jbar=True)
    torch.testing.assert_close(P, p_all + 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Jbar, jbar_all - 0.25, rtol=1e-5, atol=1e-5)
    # A slice of the output rows is a valid running sum too (the attribution loop's output chunks).
    P_rows = torch.zeros(4, 5)
    pyinterp.ij_accumulate(grads[:, 1:3], weights, delta, P=P_rows[1:3], backend=backend)
    torch.testing.assert_close(P_rows[1:3], p_all[1:3], rtol=1e-5, atol=1e-5)
    assert not P_rows[[0, 3]].any()


@pytest.mark.parametrize("backend", ij_backends())
def test_p_only_does_not_build_jbar_and_is_deterministic(backend):
    grads, weights, delta = make_inputs(3, 5, 7, (33,), dtype=torch.float32)
    P1, Jbar1 = pyinterp.ij_accumulate(grads, weights, delta, backend=backend)
    P2, _ = pyinterp.ij_accumulate(grads, weights, delta, backend=backend)
    assert Jbar1 is None
    assert torch.equal(P1, P2)


def test_empty_chunk_leaves_sums_unchanged():
    for backend in ij_backends():
        grads, weights, delta = make_inputs(0, 2, 3, (4,), dtype=torch.float32)
        P = torch.ones(2, 3)
        pyinterp.ij_accumulate(grads, weights, delta, P=P, backend=backend)
        assert torch.equal(P, torch.ones(2, 3)), backend


@settings(max_examples=20, deadline=None)
@given(num_nodes=st.integers(1, 4), outputs=st.integers(1, 5), tokens=st.integers(1, 6),
       width=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_cpu_kernel_property(num_nodes, outputs, tokens, width, seed):
    backend = "cpu" if "cpu" in ij_backends() else "torch"
    grads, weights, delta = make_inputs(num_nodes, outputs, tokens, (width,), seed=seed)
    P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend=backend)
    p_ref, jbar_ref = reference(grads, weights, delta, return_jbar=True)
    torch.testing.assert_close(P, p_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Jbar, jbar_ref, rtol=1e-12, atol=1e-12)


def _kernel_args(with_jbar: bool):
    grads, weights, delta = make_inputs(3, 2, 5, (9,), dtype=torch.float32)
    jbar = torch.zeros(2, 5, 9) if with_jbar else None
    return (torch.zeros(2, 5), jbar, grads, weights.float(), delta)


@pytest.mark.parametrize("with_jbar", [True, False])
def test_opcheck(with_jbar):
    if "cpu" in ij_backends():
        torch.library.opcheck(torch.ops.pyinterp.ij_accumulate_.default, _kernel_args(with_jbar))
    if "triton" in ij_backends():
        torch.library.opcheck(ij_accumulate_triton_, _kernel_args(with_jbar))


def test_torch_compile_fullgraph_smoke():
    backend = "cpu" if "cpu" in ij_backends() else "torch"
    grads, weights, delta = make_inputs(3, 2, 5, (9,), dtype=torch.float32)

    def step(grads, weights, delta):
        P, _ = pyinterp.ij_accumulate(grads, weights, delta, backend=backend)
        return P * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(grads, weights, delta), step(grads, weights, delta))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"delta": torch.zeros(5, 8)}, ValueError, "delta must have shape"),
    ({"weights": torch.zeros(2)}, ValueError, "weights must have shape"),
    ({"P": torch.zeros(2, 5, dtype=torch.float64)}, TypeError, "P must be torch.float32"),
    ({"P": torch.zeros(5, 2).t()}, ValueError, "P must be contiguous"),
    ({"P": torch.zeros(3, 5)}, ValueError, "P must have shape"),
    ({"Jbar": torch.zeros(2, 5, 8)}, ValueError, "Jbar must have shape"),
    ({"grads": torch.zeros(3, 9)}, ValueError, "grads must be"),
    ({"grads": torch.zeros(3, 2, 5, 9, dtype=torch.int32)}, TypeError, "grads must have dtype"),
    ({"backend": "nope"}, RuntimeError, "unknown backend"),
    ({"backend": "cuda"}, RuntimeError, "not available"),
])
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    grads, weights, delta = make_inputs(3, 2, 5, (9,), dtype=torch.float32)
    args = {"grads": grads, "weights": weights, "delta": delta, **kwargs}
    with pytest.raises(error, match=match):
        pyinterp.ij_accumulate(args.pop("grads"), args.pop("weights"), args.pop("delta"), **args)


def test_cuda_kernels_load_into_this_torch():
    """The stable-ABI CUDA module, built against whatever torch is installed (the CPU wheel here),
    loads and registers its kernel with the dispatcher."""
    import pathlib

    from pyinterp import _extension
    if not list(pathlib.Path(pyinterp.__file__).parent.glob("_C_cuda*.so")):
        pytest.skip("pyinterp._C_cuda was not built (no nvcc at build time)")
    assert _extension.cuda_extension() is not None, _extension.load_error("_C_cuda")
    assert "\nCUDA: registered at" in torch._C._dispatch_dump("pyinterp::ij_accumulate_")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_backends_match_reference(dtype):
    grads, weights, delta = make_inputs(5, 7, 33, (385,), dtype=dtype, device="cuda")
    p_exact, jbar_exact = reference(grads.double(), weights, delta.double(), return_jbar=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for backend in backends("cuda"):
        P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend=backend)
        torch.testing.assert_close(P.double(), p_exact, rtol=tol, atol=tol, msg=backend)
        torch.testing.assert_close(Jbar.double(), jbar_exact, rtol=tol, atol=tol, msg=backend)
        P_only, _ = pyinterp.ij_accumulate(grads, weights, delta, backend=backend)
        assert torch.equal(P_only, P), backend
