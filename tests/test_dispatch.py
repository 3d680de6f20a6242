"""The dispatch core: one OpSpec per op, auto order per device, per-request predicates, PYINTERP_BACKEND."""
import pytest
import torch

from pyinterp import _dispatch

CPU = torch.device("cpu")


def toy_spec(**overrides):
    def supports(backend, *, width):
        return "width > 4 runs on the reference only" if backend == "cpu" and width > 4 else ""

    fields = dict(name="toy", kernels={"cpu": lambda: "cpu kernel"}, supports=supports)
    fields.update(overrides)
    return _dispatch.OpSpec(**fields)


def test_every_op_is_registered_once_with_the_reference():
    assert _dispatch.op_names() == ["ij_accumulate", "matching_pursuit_encode", "prefix_decode", "resonator",
                                    "sparse_decode", "threshold_encode", "topk_encode"]
    for name in _dispatch.op_names():
        spec = _dispatch.op_spec(name)
        assert spec.name == name and "torch" in spec.backends
        assert set(spec.backends) <= set(_dispatch.BACKENDS)
    with pytest.raises(RuntimeError, match="registered twice"):
        _dispatch.register(_dispatch.op_spec("topk_encode"))
    with pytest.raises(KeyError, match="no op named 'nope'"):
        _dispatch.op_spec("nope")


def test_auto_takes_the_first_backend_that_runs_the_request(monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    spec = toy_spec()
    expected = "cpu" if "cpu" in _dispatch.available_backends(CPU) else "torch"
    assert spec.resolve("auto", CPU, width=2) == expected
    assert spec.resolve("auto", CPU, width=8) == "torch"  # the predicate routes it to the reference


def test_an_explicit_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    spec = toy_spec()
    with pytest.raises(RuntimeError, match="toy: backend='triton' is not available: .*no triton backend"):
        spec.resolve("triton", CPU, width=2)
    with pytest.raises(RuntimeError, match="unknown backend 'gpu'"):
        spec.resolve("gpu", CPU, width=2)
    with pytest.raises(TypeError, match="backend must be a string"):
        spec.resolve(None, CPU)
    if "cpu" in _dispatch.available_backends(CPU):
        with pytest.raises(ValueError, match="toy: width > 4 runs on the reference only"):
            spec.resolve("cpu", CPU, width=8)


def test_no_backend_in_the_order_runs_it():
    spec = toy_spec(auto_order={"cpu": ("cpu",)})
    with pytest.raises(RuntimeError, match="toy: no backend runs this call: cpu: "):
        spec.resolve("auto", CPU, width=8)


def test_the_order_is_per_op_and_per_device():
    spec = toy_spec(auto_order={"cpu": ("torch", "cpu")})
    assert spec.resolve("auto", CPU, width=2) == "torch"
    assert spec.resolve("auto", torch.device("meta"), width=2) == "torch"  # unknown device: reference


def test_environment_variable_replaces_auto(monkeypatch):
    spec = toy_spec()
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "torch")
    assert spec.resolve("auto", CPU, width=2) == "torch"
    assert _dispatch.op_spec("topk_encode").resolve("auto", CPU) == "torch"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="toy has no triton backend"):
        spec.resolve("auto", CPU, width=2)


def test_available_lists_only_what_runs_here():
    spec = toy_spec()
    assert spec.available(torch.device("meta")) == ["torch"]
    assert spec.kernel("cpu") == "cpu kernel"
