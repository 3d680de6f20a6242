"""pyinterp.integrations: each host library's own training step, unpatched vs apply("faithful") vs
apply("fused"), on the shapes of docs/sae.md ("Benchmark shapes") with half the latents dead (so AuxK runs). Tokens/s and peak
memory; speed-up is the unpatched host's step time over the patched one's."""
from __future__ import annotations

import importlib

import pytest
import torch

from sae_shapes import PAPER_SHAPES, SMALL_SHAPES, bench_device, sae_case, synchronize, time_and_record

DEVICE = bench_device()
HOSTS = {"sparsify": "sparsify", "saelens": "sae_lens", "dictionary_learning": "dictionary_learning.trainers.top_k"}
MODES = ("host", "pyinterp:faithful", "pyinterp:fused")  # "host": the host unpatched, named by the host
AUX_ALPHA = 1 / 32


def sparsify_step(x, latents, k, dead_mask):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=latents, k=k), device=DEVICE)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + AUX_ALPHA * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return sae, step


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("shape", list(SMALL_SHAPES) + list(PAPER_SHAPES))
def test_integration_train_step(benchmark, record, request, shape, host, mode):
    case = sae_case(f"{host}_step", request, record, shape, host if mode == "host" else mode, "train step")
    try:
        importlib.import_module(HOSTS[host])
    except ImportError as error:
        reason = f"could not import {HOSTS[host]} ({error}); pip install -r requirements-peers.txt"
        record({**case.row, "skipped": reason})
        pytest.skip(reason)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(case.tokens, case.width, device=DEVICE, generator=g) + 1
    dead_mask = torch.arange(case.latents, device=DEVICE) % 2 == 0
    target, step = globals()[f"{host}_step"](x, case.latents, case.k, dead_mask)
    integration = importlib.import_module(f"pyinterp.integrations.{host}")
    target_argument = "trainer" if host == "dictionary_learning" else "sae"
    patches = None if mode == "host" else integration.apply(mode.removeprefix("pyinterp:"),
                                                            **{target_argument: target})

    def timed():
        step()
        synchronize(DEVICE)

    try:
        time_and_record(benchmark, record, case, timed, rounds=3 if DEVICE == "cpu" else 10,
                        work=case.tokens, unit="tok/s")
    finally:
        if patches is not None:
            patches.revert()
