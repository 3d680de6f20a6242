"""Full SAE training step (forward with AuxK, backward, decoder projection, Adam, renorm) on the docs/sae.md
shapes: pyinterp's Trainer per backend vs a dense torch trainer (GEMM + torch.topk, embedding_bag
decode), EleutherAI sparsify's SparseCoder and SAELens, in interleaved rounds. Tokens/s and peak
memory. Half the latents count as dead, so every provider pays for AuxK."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_shapes import (ALL_SHAPES, bench_device, measure_and_record, sae_case, saelens_training, sparsify_training,
                        synchronize)
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "pyinterp-torch", "torch-dense",
             "sparsify", "saelens")
DEVICE = bench_device()
AUX_ALPHA = 1 / 32


def pyinterp_step(backend, x, latents, k, dead_mask):
    sae = build_sae("topk", x.shape[1], latents, k, backend=backend, device=DEVICE)
    config = TrainConfig(tokens=10**12, batch_size=x.shape[0], dead_after_tokens=10**12, progress=False,
                         precision="bf16" if DEVICE == "cuda" else "fp32")
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
    return sparsify_training(x, latents, k, dead_mask, aux_alpha=AUX_ALPHA)[1]


def saelens_step(x, latents, k, dead_mask):
    """SAELens' TopK training SAE (with AuxK) driven as its SAETrainer._train_step does."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=latents, k=k, device=DEVICE))
    return saelens_training(sae, x, coefficients={}, dead_mask=dead_mask)


def make_step(provider, x, latents, k, dead_mask):
    if provider.startswith("pyinterp-"):
        return pyinterp_step(provider.removeprefix("pyinterp-"), x, latents, k, dead_mask)
    if provider == "sparsify":
        return sparsify_step(x, latents, k, dead_mask)
    if provider == "saelens":
        return saelens_step(x, latents, k, dead_mask)
    return dense_step(x, latents, k, dead_mask)


@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_sae_training_step(record, progress, request, shape):
    # pyinterp-torch (the plain-torch reference, ~5 s a step on cpu-small) in the full run only
    case = sae_case("sae_train_step", request, record, shape, "train step", PROVIDERS,
                    slow=frozenset({"pyinterp-torch"}) if DEVICE == "cpu" else frozenset())
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(case.tokens, case.width, device=DEVICE, generator=g) + 1
    dead_mask = torch.arange(case.latents, device=DEVICE) % 2 == 0
    steps = {}
    for provider in case.providers:
        def timed(step=make_step(provider, x, case.latents, case.k, dead_mask)):
            step()
            synchronize(DEVICE)
        steps[provider] = timed
    measure_and_record(case, steps, record, progress, work=case.tokens, unit="tok/s")
