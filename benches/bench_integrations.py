"""pyinterp.integrations: each host library's own training step, unpatched vs apply("faithful") vs
apply("fused"), on the shapes of docs/sae.md ("Benchmark shapes") with half the latents dead (so AuxK
runs), the three timed in interleaved rounds. Tokens/s and peak memory; the speed-up is the unpatched
host's step time over the patched one's, per round pair.

Peak memory is measured for each provider in a fresh process (`python bench_integrations.py HOST
PROVIDER SHAPE`), so that no other provider's freed memory or allocator state is in it: there, after
WARMUP_STEPS steps (Adam's state exists), `peak_mib` is the extra memory at the high-water mark of one
more step over what was resident before it (params, optimizer state, the batch), and `state_mib` that
resident state over the process after its imports. On CPU the process runs with glibc's mmap threshold
at 1 MiB (MALLOC_MMAP_THRESHOLD_), so every block of 1 MiB or more comes from the kernel and goes back
when freed, and the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) sees
each step's tensors (docs/sae_family.md, "Host SAEs as pyinterp modules"); on CUDA it is the
allocator's peak."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness
from sae_shapes import ALL_SHAPES, bench_device, measure_and_record, sae_case, sparsify_training, synchronize

DEVICE = bench_device()
HOSTS = {"sparsify": "sparsify", "saelens": "sae_lens", "dictionary_learning": "dictionary_learning.trainers.top_k"}
AUX_ALPHA = 1 / 32
WARMUP_STEPS = 2
_MMAP_THRESHOLD_BYTES = 1 << 20


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


def import_host(host: str):
    """The integration module of `host`, after importing the host itself (ImportError if it is missing)."""
    importlib.import_module(HOSTS[host])
    integration = importlib.import_module(f"pyinterp.integrations.{host}")
    if host == "dictionary_learning":  # else torch.compile fails in every later bench of the run
        integration.undo_nnsight_import_patches()
    return integration


def batch_and_dead_mask(tokens: int, width: int, latents: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, width, device=DEVICE, generator=g) + 1
    return x, torch.arange(latents, device=DEVICE) % 2 == 0


def provider_step(host: str, provider: str, x, latents: int, k: int, dead_mask):
    """One training step of `host` as `provider` runs it: the unpatched host, or apply(mode) on this
    SAE / trainer around the step. The providers' rounds interleave, so each patched step applies
    and reverts its own patches (microseconds against steps of hundreds of milliseconds; counted
    against pyinterp)."""
    integration = importlib.import_module(f"pyinterp.integrations.{host}")
    target, step = globals()[f"{host}_step"](x, latents, k, dead_mask)
    target_argument = "trainer" if host == "dictionary_learning" else "sae"
    mode = None if provider == host else provider.removeprefix("pyinterp:")

    def timed():
        patches = integration.apply(mode, **{target_argument: target}) if mode else None
        try:
            step()
            synchronize(DEVICE)
        finally:
            if patches is not None:
                patches.revert()
    return timed


def resident_bytes() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else harness.rss_bytes("VmRSS")


def peak_in_fresh_process(host: str, provider: str, shape: str) -> dict:
    """{"peak_mib", "state_mib", "peak_method"} of one step of `provider`, measured in a new process."""
    env = {**os.environ, "PYINTERP_BENCH_DEVICE": DEVICE, "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD_BYTES),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), host, provider, shape], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    if done.returncode:
        raise RuntimeError(f"peak memory of {host} {provider} {shape} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def measure_peak(host: str, provider: str, shape: str) -> dict:
    """In this (fresh) process: the extra peak of one step after WARMUP_STEPS steps, and the
    resident state (SAE, optimizer, batch) before it."""
    import_host(host)
    width, latents, k, tokens = ALL_SHAPES[shape]
    after_imports = resident_bytes()
    x, dead_mask = batch_and_dead_mask(tokens, width, latents)
    step = provider_step(host, provider, x, latents, k, dead_mask)
    for _ in range(WARMUP_STEPS):
        step()
    state = resident_bytes() - after_imports
    _, _, peak = harness.timed_peak(step, DEVICE)
    method = ("CUDA allocator peak" if DEVICE == "cuda" else
              "fresh process, VmHWM over VmRSS before the step, mmap threshold 1 MiB")
    return {"peak_mib": round(peak / 2**20, 1), "state_mib": round(state / 2**20, 1), "peak_method": method}


@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_integration_train_step(record, progress, request, shape, host):
    try:
        import_host(host)
    except ImportError as error:
        pytest.skip(f"could not import {HOSTS[host]} ({error}); `make setup` installs the pinned peers")
    providers = [host, "pyinterp:faithful", "pyinterp:fused"]
    case = sae_case(f"{host}_step", request, record, shape, "train step", providers)
    x, dead_mask = batch_and_dead_mask(case.tokens, case.width, case.latents)
    steps = {provider: provider_step(host, provider, x, case.latents, case.k, dead_mask)
             for provider in case.providers}
    peaks = {}
    for provider in case.providers:
        peaks[provider] = peak_in_fresh_process(host, provider, shape)
        progress(f"{case.label} {provider}: peak {peaks[provider]['peak_mib']} MiB over "
                 f"{peaks[provider]['state_mib']} MiB resident state (fresh process)")
    measure_and_record(case, steps, record, progress, work=case.tokens, unit="tok/s", extra=peaks)


if __name__ == "__main__":
    print(json.dumps(measure_peak(*sys.argv[1:])))
