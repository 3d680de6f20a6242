"""Two gloo processes on the CPU (torch.multiprocessing spawn) against the single-process result:
data parallel (DDP: 2 ranks x 1 micro-batch = 1 rank x 2 accumulated micro-batches) and latent
sharding (exact distributed top-k: the same run, latents split between the ranks). AuxK is active in
both, so dead-latent counters and their reduction are compared too."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pyinterp.nn import TopKSAE
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae, parallel_context
from sae_helpers import correlated_activations

WIDTH, LATENTS, K, K_AUX = 12, 40, 4, 6
DATA = dict(tokens=300, width=WIDTH, seed=12)


def _config(grad_accumulation: int = 1) -> TrainConfig:
    return TrainConfig(tokens=16 * 2 * 6, batch_size=16, grad_accumulation=grad_accumulation, lr=3e-3,
                       dead_after_tokens=32, log_every=3, progress=False)


def _train(parallel: str, grad_accumulation: int, out_dir=None, context=None) -> Trainer:
    torch.set_num_threads(1)
    sae = build_sae("topk", WIDTH, LATENTS, K, parallel=parallel, backend="torch", k_aux=K_AUX,
                    dtype=torch.float64, seed=3)
    source = TensorSource(correlated_activations(DATA["tokens"], WIDTH, seed=DATA["seed"]))
    trainer = Trainer(sae, source, _config(grad_accumulation), out_dir, context=context)
    trainer.train()
    return trainer


def _worker(rank: int, world_size: int, init_file: str, parallel: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        trainer = _train(parallel, 1, f"{result_dir}/run", parallel_context(parallel))
        tensors = trainer.checkpoint_tensors()  # collective under latent sharding
        if rank == 0:
            save_file({name: t.contiguous() for name, t in tensors.items()}, f"{result_dir}/tensors.safetensors")
            with open(f"{result_dir}/metrics.json", "w") as handle:
                json.dump(trainer.last_metrics, handle)
        # Without it, rank 1 can tear gloo down while rank 0 still writes, and rank 0 aborts
        # (seen once: SIGABRT, "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path, parallel: str):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), parallel, str(tmp_path)), nprocs=2, join=True)
    return load_file(str(tmp_path / "tensors.safetensors")), json.loads((tmp_path / "metrics.json").read_text())


def _assert_same_run(tensors: dict, single: Trainer, metrics: dict) -> None:
    expected = {name: t.cpu() for name, t in single.checkpoint_tensors().items()}
    assert tensors.keys() == expected.keys()
    assert (expected["dead.tokens_since_fired"] >= 32).any(), "AuxK must have been active"
    for name, value in expected.items():
        torch.testing.assert_close(tensors[name], value, rtol=1e-9, atol=1e-11, msg=name)
    for key in ("fvu", "aux_loss", "l0", "dead_fraction"):
        assert metrics[key] == pytest.approx(single.last_metrics[key], rel=1e-9, abs=1e-12), key


def test_ddp_two_processes_match_single_process_gradient_accumulation(tmp_path):
    tensors, metrics = _run_two_ranks(tmp_path, "ddp")
    _assert_same_run(tensors, _train("none", 2), metrics)


def test_latent_sharded_two_processes_match_single_process(tmp_path):
    tensors, metrics = _run_two_ranks(tmp_path, "latents")
    single = _train("none", 1)
    _assert_same_run(tensors, single, metrics)
    saved = TopKSAE.load(tmp_path / "run", backend="torch")  # written whole by rank 0
    for a, b in zip(saved.parameters(), single.sae.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
