"""`pyinterp info`: versions, build configuration, and which backends run here (and why not the others)."""
from __future__ import annotations

import platform

import torch

HELP = "print versions, build configuration and the backends available on this machine"


def add_arguments(parser) -> None:
    del parser  # no options


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def collect() -> dict:
    import pyinterp
    from pyinterp import _dispatch, _extension

    report = {
        "pyinterp": pyinterp.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "triton_interpreter": _dispatch.triton_interpreting(),
    }
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    cpu_module = _extension.cpu_extension()
    if cpu_module is not None:
        report["_C"] = {"openmp": cpu_module.compiled_with_openmp(), "threads": cpu_module.num_threads(),
                        "compiler": cpu_module.compiler(), "cpu_features": dict(cpu_module.cpu_features())}
    else:
        report["_C"] = _extension.load_error("_C")
    cuda_module = _extension.cuda_extension()
    report["_C_cuda"] = cuda_module.__file__ if cuda_module is not None else _extension.load_error("_C_cuda")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report["backends"] = {}
    for device in devices:
        report["backends"][device] = {
            backend: (_dispatch.unavailable_reason(backend, torch.device(device)) or "available")
            for backend in _dispatch.BACKENDS}
        report["backends"][device]["auto"] = {
            op: _dispatch.op_spec(op).resolve("auto", torch.device(device)) for op in _dispatch.op_names()}
    return report


def run(args) -> int:
    del args
    report = collect()
    for key, value in report.items():
        if key == "backends":
            continue
        if isinstance(value, dict):
            print(f"{key}:")
            for sub_key, sub_value in value.items():
                print(f"  {sub_key}: {sub_value}")
        else:
            print(f"{key}: {value}")
    if not report["cuda_available"]:
        print("cuda device: none (no GPU on this machine)")
    for device, backends in report["backends"].items():
        auto = ", ".join(f"{op} -> {backend}" for op, backend in backends["auto"].items())
        print(f"backends for {device} tensors (auto: {auto}):")
        for backend, status in backends.items():
            if backend != "auto":
                print(f"  {backend:7s} {status}")
    return 0
