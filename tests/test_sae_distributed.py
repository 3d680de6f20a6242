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


# ---- data parallel over a stream: each rank runs the model over its own part of the corpus ----
STREAM_NAMES = ("transformer.h.0", "transformer.h.1.mlp")
STREAM_CONFIG = dict(batch_size=48, lr=3e-3, dead_after_tokens=100, log_every=3, checkpoint_every=0,
                     precision="fp32", progress=False)


def _stream_sources(model_folder: str, corpus_path: str, shard):
    from pyinterp.sae import hookpoints, stream
    from pyinterp.sae.cache import load_model

    torch.set_num_threads(1)
    model, tokenizer, _ = load_model(model_folder)
    points = hookpoints.resolve(model, list(STREAM_NAMES))
    return stream.streamed_sources(model, tokenizer, corpus_path, points, batch_size=48, seed=0,
                                   context_length=13, buffer_tokens=144, batch_windows=4, shard=shard)


def _stream_sae(source, seed=3):
    return build_sae("topk", source.d_model, 32, 4, backend="torch", k_aux=6, seed=seed)


def _stream_worker(rank: int, world_size: int, init_file: str, model_folder: str, corpus_path: str,
                   result_dir: str) -> None:
    from pyinterp.sae import stream

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        context = parallel_context("ddp")
        sources = _stream_sources(model_folder, corpus_path, (rank, world_size))
        config = TrainConfig(tokens=48 * 2 * 6, grad_accumulation=1, **STREAM_CONFIG)
        trainers = {}

        def make(name, source):
            trainers[name] = Trainer(_stream_sae(source), source, config, f"{result_dir}/run/{name}",
                                     context=context.with_own_group())
            return trainers[name]
        stream.train_streaming(sources, make)
        for name, trainer in trainers.items():
            save_file({key: t.contiguous() for key, t in trainer.sae.export_tensors().items()},
                      f"{result_dir}/{name}-rank{rank}.safetensors")
            with open(f"{result_dir}/{name}-rank{rank}.json", "w") as handle:
                json.dump(trainer.last_metrics, handle)
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _InterleavedShards:
    """The single-process run on the tokens of the two ranks: global micro-batch g is rank (g % 2)'s."""

    def __init__(self, shards, name):
        self.shards, self.name = shards, name
        self.d_model = shards[0][name].d_model

    def shuffled(self, batch_size, seed):
        return self

    def batch(self, index):
        return self.shards[index % 2][self.name].batch(index)

    def describe(self):
        return f"{self.name} of two shards"

    def identity(self):
        return {"shards": self.name}


def test_ddp_over_a_stream_two_processes_match_single_process_on_the_same_tokens(tmp_path):
    import itertools

    from test_sae_cache import tiny_model, write_corpus

    from pyinterp import models
    from pyinterp.sae import hookpoints, stream
    from pyinterp.sae.cache import load_model

    tokenizer = models.load_default_model().tokenizer
    tiny_model("gpt2", tokenizer.vocab_size).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    corpus_path, folder = str(write_corpus(tmp_path, "txt")), str(tmp_path / "model")
    # The shards are disjoint: rank r runs the model over blocks r, r + 2, ... of the windows.
    model, saved_tokenizer, _ = load_model(folder)
    points = hookpoints.resolve(model, list(STREAM_NAMES))

    def first_blocks(shard, count):
        return list(itertools.islice(stream.model_blocks(model, saved_tokenizer, corpus_path, points,
                                                         context_length=13, exclude_first=False, batch_windows=4,
                                                         shard=shard)(), count))
    whole, even, odd = first_blocks((0, 1), 4), first_blocks((0, 2), 2), first_blocks((1, 2), 2)
    assert all(torch.equal(a, b) for a, b in zip(whole, [even[0], odd[0], even[1], odd[1]]))
    mp.spawn(_stream_worker, args=(2, str(tmp_path / "init"), folder, corpus_path, str(tmp_path)), nprocs=2,
             join=True)
    shards = [_stream_sources(folder, corpus_path, (rank, 2)) for rank in range(2)]
    config = TrainConfig(tokens=48 * 2 * 6, grad_accumulation=2, **STREAM_CONFIG)
    for name in STREAM_NAMES:
        rank0 = load_file(str(tmp_path / f"{name}-rank0.safetensors"))
        rank1 = load_file(str(tmp_path / f"{name}-rank1.safetensors"))
        assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), "every rank holds the same SAE"
        source = _InterleavedShards(shards, name)
        single = Trainer(_stream_sae(source), source, config)
        single.train()
        for key, value in single.sae.export_tensors().items():
            torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        metrics = json.loads((tmp_path / f"{name}-rank0.json").read_text())
        assert metrics["fvu"] == pytest.approx(single.last_metrics["fvu"], rel=1e-4)
    assert (tmp_path / "run" / STREAM_NAMES[0] / "sae.safetensors").is_file()  # written by rank 0
