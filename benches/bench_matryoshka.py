"""Matryoshka BatchTopK training step (BatchTopK forward with AuxK, the nested prefix losses, backward,
decoder projection, Adam, renorm) on the docs/sae.md shapes: pyinterp's Trainer per backend (one
prefix decode for all prefixes) vs SAELens' MatryoshkaBatchTopKTrainingSAE (one dense decode per
prefix), same prefixes M/16, M/8, M/4, M/2, M, in interleaved rounds. Half the latents count as dead."""
from __future__ import annotations

import pytest
import torch

from sae_shapes import (ALL_SHAPES, bench_device, measure_and_record, sae_case, saelens_training,
                        synchronize)
from pyinterp.nn.matryoshka import default_prefixes
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "saelens")
DEVICE = bench_device()


def pyinterp_step(backend, x, latents, k, dead_mask):
    sae = build_sae("matryoshka_batch_topk", x.shape[1], latents, k, backend=backend, device=DEVICE,
                    prefixes=default_prefixes(latents))
    config = TrainConfig(tokens=10**12, batch_size=x.shape[0], dead_after_tokens=10**12, progress=False,
                         precision="bf16" if DEVICE == "cuda" else "fp32")
    trainer = Trainer(sae, TensorSource(x.cpu()), config)
    trainer.dead.tokens_since_fired.copy_(dead_mask.long() * 10**12)
    return trainer.train_step


def saelens_step(x, latents, k, dead_mask):
    """SAELens' Matryoshka BatchTopK training SAE driven as its SAETrainer._train_step does: forward
    with AuxK and the inner prefix losses, the firing bookkeeping, backward, grad-norm clipping, Adam."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)

    cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=x.shape[1], d_sae=latents, k=k, device=DEVICE,
                                               matryoshka_widths=default_prefixes(latents))
    return saelens_training(MatryoshkaBatchTopKTrainingSAE(cfg), x, coefficients={}, dead_mask=dead_mask)


@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_matryoshka_training_step(record, progress, request, shape):
    case = sae_case("matryoshka_train_step", request, record, shape, "train step", PROVIDERS)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(case.tokens, case.width, device=DEVICE, generator=g) + 1
    dead_mask = torch.arange(case.latents, device=DEVICE) % 2 == 0
    steps = {}
    for provider in case.providers:
        make = saelens_step if provider == "saelens" else (
            lambda *a, backend=provider.removeprefix("pyinterp-"): pyinterp_step(backend, *a))
        def timed(step=make(x, case.latents, case.k, dead_mask)):
            step()
            synchronize(DEVICE)
        steps[provider] = timed
    measure_and_record(case, steps, record, progress, work=case.tokens, unit="tok/s")
