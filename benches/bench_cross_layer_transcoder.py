"""Cross-layer transcoder forward+backward (FVU loss of every target layer, gradients of every
parameter): pyinterp's CrossLayerTranscoder (fused top-k encoder per layer, one sparse decode per
target layer) vs the dense CLT a user writes in torch (each layer's top-k latents scattered into a
dense N x M matrix, one dense matmul per (source, target) pair), in interleaved rounds. 6 layers of
MiniLM's width (D = 384), M = 4096 latents per layer, k = 32, N from cpu-small; then peak memory of
one step at 2, 4 and 6 layers (the parameters' gradients, which every CLT trainer holds, grow with
the L(L+1)/2 decoders; what grows with tokens is N x L x k here and N x L x M dense)."""
from __future__ import annotations

import ctypes

import pytest
import torch

import harness
from sae_shapes import ALL_SHAPES, direction_step, measure_and_record, sae_case
from pyinterp.nn import CrossLayerTranscoder

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-dense")
LAYERS, LATENTS_PER_LAYER = 6, 4096
SHAPE = "cpu-small"  # its D = 384 and k = 32 and its N; M per layer is LATENTS_PER_LAYER
MEMORY_LAYERS = (2, 4, 6)


def dense_clt_loss(clt: CrossLayerTranscoder, rows: torch.Tensor) -> torch.Tensor:
    """The obvious torch CLT on clt's parameters: dense latents, a dense matmul into every later layer."""
    x, y = clt._split(rows)
    m = clt.latents_per_layer
    latents = []
    for layer, (W_enc, b_enc) in enumerate(zip(clt.W_enc.split(m), clt.b_enc.split(m))):
        z = x[:, layer] @ W_enc.T + b_enc
        top = z.topk(clt.k, dim=1)
        latents.append(torch.zeros_like(z).scatter(1, top.indices, torch.relu(top.values)))
    loss = rows.new_zeros(())
    for target in range(clt.n_layers):
        decoders = clt.W_dec[target].split(m)  # per source layer, views (split: no zero-filled slice grads)
        y_hat = clt.b_dec[target] + sum(latents[layer] @ decoders[layer] for layer in range(target + 1))
        loss = loss + (y[:, target] - y_hat).pow(2).sum() / (y[:, target] - y[:, target].mean(0)).pow(2).sum()
    return loss


def clt_steps(providers, layers: int, width: int, k: int, tokens: int, device: str, dtype):
    """(steps, parameters) of the providers for a CLT of `layers` layers, all on the same parameters
    and rows; each step is one forward+backward whose gradients are then dropped."""
    clt = CrossLayerTranscoder(layers, width, width, LATENTS_PER_LAYER, k, k_aux=0, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.randn(tokens, clt.d_model, device=device, dtype=dtype, generator=g)
    with torch.no_grad():
        clt.init_b_dec(rows)
    params = list(clt.parameters())
    runs = {}
    for provider in providers:
        if provider == "torch-dense":
            runs[provider] = lambda: dense_clt_loss(clt, rows)
        else:
            def run(backend=provider.removeprefix("pyinterp-")):
                clt.backend = backend
                return clt(rows).loss
            runs[provider] = run
    grad_output = torch.ones((), device=device, dtype=dtype)
    steps = {name: direction_step("forward+backward", run, params, grad_output, device) for name, run in runs.items()}
    return steps, runs, sum(p.numel() * p.element_size() for p in params)


def release_free_heap(device: str) -> None:
    """Give glibc's free heap pages back before a CPU peak measurement: the RSS high-water mark
    (harness.timed_peak) cannot see an allocation served from pages that are still resident (left
    free by the initialisation's temporaries or by an earlier provider), which made one step's
    gradients look free."""
    if device == "cpu":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the peak may read low
            pass


@pytest.mark.parametrize("shape", [SHAPE])
def test_cross_layer_transcoder(record, progress, request, shape):
    case = sae_case("cross_layer_transcoder", request, record, shape, "forward+backward", PROVIDERS)
    case.row.update(M=LATENTS_PER_LAYER, layers=LAYERS)
    steps, runs, _ = clt_steps(case.providers, LAYERS, case.width, case.k, case.tokens, case.device, case.dtype)
    with torch.no_grad():  # the providers compute one loss
        losses = ", ".join(f"{name} {float(run()):.6f}" for name, run in runs.items())
    progress(f"{case.label}: loss per provider: {losses}")
    measure_and_record(case, steps, record, progress, work=case.tokens, unit="tok/s")


@pytest.mark.parametrize("shape", [SHAPE])
def test_cross_layer_transcoder_memory_vs_layers(record, progress, request, shape):
    """One warm-up and one measured step per provider and layer count: the second's peak memory,
    measured after the free heap is given back (the main case's peak, from the harness, is not: it can
    read low on CPU), and its time (a single call)."""
    case = sae_case("cross_layer_transcoder", request, record, shape, "forward+backward", PROVIDERS)
    width, _, k, tokens = ALL_SHAPES[shape]
    for layers in MEMORY_LAYERS:
        steps, _, parameter_bytes = clt_steps(case.providers, layers, width, k, tokens, case.device, case.dtype)
        for provider, step in steps.items():
            step()  # a first call also pays one-time workspaces (about 150 MiB here)
            release_free_heap(case.device)
            _, seconds, peak = harness.timed_peak(step, case.device)
            ms = round(seconds * 1e3, 3)
            record({**case.row, "shape": f"{shape}-L{layers}", "layers": layers, "M": LATENTS_PER_LAYER,
                    "provider": provider, "rounds": 1, "calls_per_round": 1, "min_ms": ms, "median_ms": ms,
                    "p80_ms": ms, "peak_mib": round(peak / 2**20, 1), "gradient_mib": round(parameter_bytes / 2**20, 1),
                    "throughput": round(tokens / seconds, 1), "unit": "tok/s"})
            progress(f"cross_layer_transcoder L={layers} {provider}: peak {peak / 2**20:.0f} MiB (gradients "
                     f"{parameter_bytes / 2**20:.0f} MiB of it), {ms:.0f} ms")
