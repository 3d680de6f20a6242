"""Full SAE training step (forward with AuxK, backward, decoder projection, Adam, renorm) on the sae.md
shapes: pyinterp's Trainer per backend vs a dense torch trainer (GEMM + torch.topk, embedding_bag
decode), EleutherAI sparsify's SparseCoder and SAELens. Tokens/s and peak memory, one run.
Half the latents count as dead, so every provider pays for AuxK."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from harness import peak_memory_bytes
from sae_shapes import PAPER_SHAPES, SMALL_SHAPES, bench_device, skip_reason, synchronize
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "pyinterp-torch", "torch-dense",
             "sparsify", "saelens")
DEVICE = bench_device()
AUX_ALPHA = 1 / 32


def pyinterp_step(backend, x, latents, k, dead_mask):
    sae = build_sae("topk", x.shape[1], latents, k, backend=backend, device=DEVICE)
    config = TrainConfig(tokens=10**12, batch_size=x.shape[0], dead_after_tokens=10**12, progress=False)
    trainer = Trainer(sae, TensorSource(x.cpu()), config)
    # Mark the same latents dead as the peers get (a revived one costs AuxK nothing less).
    trainer.dead.tokens_since_fired.copy_(dead_mask.long() * 10**12)
    return trainer.train_step


def dense_step(x, latents, k, dead_mask):
    """What a user writes in plain torch: dense pre-activations, torch.topk, embedding_bag decode."""
    width = x.shape[1]
    W_dec = torch.randn(latents, width, device=DEVICE)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = [W_dec.clone().requires_grad_(), torch.zeros(latents, device=DEVICE, requires_grad=True),
              W_dec.requires_grad_(), x.mean(0).clone().requires_grad_()]
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
    k_aux = width // 2

    def step():
        W_enc, b_enc, W_dec, b_dec = params
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            z = (x - b_dec) @ W_enc.T + b_enc
        z = z.float()
        values, indices = z.topk(k, dim=1)
        x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=torch.relu(values), mode="sum") + b_dec
        e = x - x_hat
        fvu = e.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        aux_values, aux_indices = z.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=1)
        e_hat = F.embedding_bag(aux_indices, W_dec, per_sample_weights=torch.relu(aux_values), mode="sum")
        e = e.detach()
        scale = (dead_mask.sum() / k_aux).clamp(max=1)
        aux = scale * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        (fvu + AUX_ALPHA * aux).backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return step


def sparsify_step(x, latents, k, dead_mask):
    if DEVICE == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=latents, k=k), device=DEVICE)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step():
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + AUX_ALPHA * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return step


def make_step(provider, x, latents, k, dead_mask):
    if provider.startswith("pyinterp-"):
        return pyinterp_step(provider.removeprefix("pyinterp-"), x, latents, k, dead_mask)
    if provider == "sparsify":
        return sparsify_step(x, latents, k, dead_mask)
    return dense_step(x, latents, k, dead_mask)


def provider_skip_reason(provider, shape):
    if provider == "saelens" and importlib.util.find_spec("sae_lens") is None:
        return "sae-lens is not installed (optional extra: pip install '.[peers]')"
    if provider == "saelens":
        return "SAELens' trainer needs its own runner config; not wired in yet"
    if provider == "pyinterp-torch":
        return skip_reason("torch-eager", shape, DEVICE)
    return skip_reason(provider, shape, DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SMALL_SHAPES) + list(PAPER_SHAPES))
def test_sae_training_step(benchmark, record, request, shape, provider):
    option = request.config.getoption("--shapes")
    if (shape in PAPER_SHAPES and option == "small") or (shape in SMALL_SHAPES and option == "paper"):
        pytest.skip(f"--shapes={option}")
    width, latents, k, tokens = {**SMALL_SHAPES, **PAPER_SHAPES}[shape]
    precision = "bf16 autocast" if DEVICE == "cuda" else "float32"
    row = {"op": "sae_train_step", "shape": shape, "N": tokens, "D": width, "M": latents, "k": k,
           "dtype": precision, "direction": "train step", "provider": provider, "device_kind": DEVICE}
    reason = provider_skip_reason(provider, shape)
    if reason:
        record({**row, "skipped": reason})
        pytest.skip(reason)

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, width, device=DEVICE, generator=g) + 1
    dead_mask = torch.arange(latents, device=DEVICE) % 2 == 0
    step = make_step(provider, x, latents, k, dead_mask)
    try:
        step()  # warm-up
    except NotImplementedError as exc:  # a backend whose kernels are not built in this tree
        reason = f"kernels not built: {str(exc).splitlines()[0][:80]}"
        record({**row, "skipped": reason})
        pytest.skip(reason)

    def timed():
        step()
        synchronize(DEVICE)

    rounds = 3 if DEVICE == "cpu" else 10
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    median_ms = benchmark.stats.stats.median * 1e3
    peak = peak_memory_bytes(timed, DEVICE)
    tokens_per_s = tokens / (median_ms * 1e-3)
    record({**row, "median_ms": round(median_ms, 3), "peak_mib": round(peak / 2**20, 1),
            "throughput": f"{tokens_per_s:.0f} tok/s"})
    benchmark.extra_info.update(peak_mib=round(peak / 2**20, 1), tokens_per_s=round(tokens_per_s))
