"""pyinterp.integrations: each host library's own training step, unpatched vs apply("faithful") vs
apply("fused"), on the shapes of docs/sae.md ("Benchmark shapes") with half the latents dead (so AuxK
runs), the three timed in interleaved rounds. Tokens/s and peak memory; the speed-up is the unpatched
host's step time over the patched one's, per round pair."""
from __future__ import annotations

import importlib

import pytest
import torch

from sae_shapes import ALL_SHAPES, bench_device, measure_and_record, sae_case, sparsify_training, synchronize

DEVICE = bench_device()
HOSTS = {"sparsify": "sparsify", "saelens": "sae_lens", "dictionary_learning": "dictionary_learning.trainers.top_k"}
AUX_ALPHA = 1 / 32


def sparsify_step(x, latents, k, dead_mask):
    return sparsify_training(x, latents, k, dead_mask, aux_alpha=AUX_ALPHA)


def saelens_step(x, latents, k, dead_mask):
    """As SAETrainer._train_step: forward with AuxK, firing bookkeeping, backward, clipping, Adam."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=latents, k=k, device=DEVICE))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(latents, device=DEVICE)

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead_mask,
                                                       n_training_steps=0, is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire.to_dense() if did_fire.is_sparse else did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return sae, step


def dictionary_learning_step(x, latents, k, dead_mask):
    """TopKTrainer.update (loss with AuxK, projection, clipping, Adam, schedule, renorm); the dead
    latents' counters are set before each step so the same half stays dead."""
    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(10**6, x.shape[1], latents, k, layer=0, lm_name="none", device=DEVICE, lr=1e-4)
    trainer.dead_feature_threshold = 10**12
    since_fired = dead_mask.long() * 10**12

    def step():
        trainer.num_tokens_since_fired.copy_(since_fired)
        trainer.update(1, x)
    return trainer, step


@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_integration_train_step(record, progress, request, shape, host):
    try:
        importlib.import_module(HOSTS[host])
    except ImportError as error:
        pytest.skip(f"could not import {HOSTS[host]} ({error}); `make setup` installs the pinned peers")
    if host == "dictionary_learning":  # else torch.compile fails in every later bench of the run
        importlib.import_module("pyinterp.integrations.dictionary_learning").undo_nnsight_import_patches()
    providers = [host, "pyinterp:faithful", "pyinterp:fused"]
    case = sae_case(f"{host}_step", request, record, shape, "train step", providers)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(case.tokens, case.width, device=DEVICE, generator=g) + 1
    dead_mask = torch.arange(case.latents, device=DEVICE) % 2 == 0
    integration = importlib.import_module(f"pyinterp.integrations.{host}")
    target_argument = "trainer" if host == "dictionary_learning" else "sae"
    steps = {}
    for provider in case.providers:
        target, step = globals()[f"{host}_step"](x, case.latents, case.k, dead_mask)
        mode = None if provider == host else provider.removeprefix("pyinterp:")

        # The providers' rounds interleave, so each patched step applies and reverts its own patches
        # (a few microseconds against steps of hundreds of milliseconds; counted against pyinterp).
        def timed(step=step, target=target, mode=mode):
            patches = integration.apply(mode, **{target_argument: target}) if mode else None
            try:
                step()
                synchronize(DEVICE)
            finally:
                if patches is not None:
                    patches.revert()
        steps[provider] = timed
    measure_and_record(case, steps, record, progress, work=case.tokens, unit="tok/s")
