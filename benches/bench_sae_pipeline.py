"""End-to-end SAE training (model forward + SAE steps) against EleutherAI sparsify's own Trainer, in
interleaved rounds: the embedded all-MiniLM-L6-v2, 4 hookpoints (the outputs of blocks 0-3), one
top-k SAE per hookpoint (M=4096, k=32, AuxK on, Adam, fp32 on a CPU), micro-batches of 8 windows x 128
tokens over the standard library's docstrings (the demo's text, pyinterp.models.docstring_sentences).

A round is a whole run of ROUND_STEPS steps from fresh SAEs, the model loaded once: pyinterp's
streaming pipeline (pyinterp/sae/stream.py: producer thread, shuffle buffer, the forward stopping after
the last hookpoint) and sparsify's Trainer.fit (its hooks train each SAE inside the model's forward,
which runs to the end) on the same context windows in the same order, the same tokens per step, k, M.
`sparsify-1thread` is sparsify with torch at one thread: on a loaded machine its two-thread OpenMP
regions mostly wait for each other, and the best baseline is the one to beat. pyinterp's rows also
carry the pipeline's own accounting (stream.pipeline_timing, what `train-sae --corpus` prints): model
forward, SAE steps and waiting for data."""
from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

import harness
from sae_shapes import bench_device, skip_reason
from pyinterp import models
from pyinterp.sae import corpus, hookpoints, stream
from pyinterp.sae.cache import load_model
from pyinterp.sae.trainer import TrainConfig, Trainer, build_sae

LATENTS, K, CONTEXT, WINDOWS_PER_BATCH = 4096, 32, 128, 8
BATCH_TOKENS = CONTEXT * WINDOWS_PER_BATCH
LAYERS = "1-4"  # models.resolve_layer numbering: the outputs of encoder.layer.0 .. encoder.layer.3
ROUND_STEPS = {"cpu": 8, "cuda": 64}
# The shuffle buffer holds one micro-batch: the same forwards as sparsify's (which does not shuffle).
# A larger buffer costs its fill, buffer_tokens of forwards before the first step, once per run.
BUFFER_BATCHES = 1
# Both trainers count a latent dead after this many tokens without firing, so AuxK runs in both once
# latents die (sparsify's default, 10M, would leave it off in its run and on in pyinterp's, whose
# default follows the run's length).
DEAD_AFTER_TOKENS = 2 * BATCH_TOKENS
PROVIDERS = ("pyinterp", "sparsify", "sparsify-1thread")
DEVICE = bench_device()


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """(model, tokenizer, corpus file, hookpoints, the context windows in corpus order)."""
    model, tokenizer, _ = load_model("default", "fp32", DEVICE)
    path = tmp_path_factory.mktemp("pipeline") / "docstrings.txt"
    path.write_text("\n".join(models.docstring_sentences(10**6, models.TRAINING_DOC_MODULES)) + "\n")
    points = hookpoints.resolve(model, layers=LAYERS)
    windows = list(corpus.context_windows(corpus.documents(path), tokenizer, CONTEXT))
    return model, tokenizer, path, points, windows


def pyinterp_run(model, tokenizer, path, points, steps: int, backend: str):
    """One streamed run; returns its stream.pipeline_timing."""
    def run():
        sources = stream.streamed_sources(model, tokenizer, str(path), points, batch_size=BATCH_TOKENS, seed=0,
                                          context_length=CONTEXT, buffer_tokens=BUFFER_BATCHES * BATCH_TOKENS,
                                          batch_windows=WINDOWS_PER_BATCH)
        config = TrainConfig(tokens=steps * BATCH_TOKENS, batch_size=BATCH_TOKENS, log_every=steps,
                             checkpoint_every=0, dead_after_tokens=DEAD_AFTER_TOKENS, progress=False)

        def make_trainer(name, source):
            return Trainer(build_sae("topk", source.d_model, LATENTS, K, backend=backend, device=DEVICE),
                           source, config)
        with stream.timed_pipeline(sources) as timing:
            stream.train_streaming(sources, make_trainer)
        return timing
    return run


def sparsify_run(model, points, windows, steps: int, threads: int | None):
    """One run of sparsify's Trainer over the first steps x 8 windows (its DataLoader takes them in
    order), Adam and AuxK (alpha 1/32, the same dead threshold) like pyinterp's, no warm-up, no
    checkpoint written."""
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig as SparsifyConfig, Trainer as SparsifyTrainer

    dataset = Dataset.from_dict({"input_ids": [w.tolist() for w in windows[:steps * WINDOWS_PER_BATCH]]})
    dataset = dataset.with_format("torch")

    def run():
        config = SparsifyConfig(SaeConfig(num_latents=LATENTS, k=K), batch_size=WINDOWS_PER_BATCH,
                                optimizer="adam", lr_warmup_steps=0, auxk_alpha=1 / 32,
                                dead_feature_threshold=DEAD_AFTER_TOKENS,
                                hookpoints=[p.name for p in points], log_to_wandb=False, save_every=10**9)
        precision, all_threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                trainer = SparsifyTrainer(config, dataset, model)
                trainer.save = lambda: None  # its final save writes checkpoints: not the work measured
                trainer.fit()
        finally:  # fit() sets both process-wide
            torch.set_float32_matmul_precision(precision)
            torch.set_num_threads(all_threads)
            model.requires_grad_(False)
    return run


def test_sae_training_pipeline(record, progress, request):
    if request.config.getoption("--shapes") in ("demo", "paper") and DEVICE == "cpu":
        pytest.skip("minutes of whole training runs on a CPU: --shapes small or all")
    model, tokenizer, path, points, windows = request.getfixturevalue("workload")
    steps = ROUND_STEPS.get(DEVICE, 8)
    backend = "cuda" if DEVICE == "cuda" else "cpu"
    row = {"op": "sae_pipeline", "shape": f"minilm-{len(points)}hp", "N": BATCH_TOKENS, "D": 384, "M": LATENTS,
           "k": K, "dtype": "float32", "direction": f"train {steps} steps", "device_kind": DEVICE,
           "hookpoints": [p.name for p in points]}
    if len(windows) < steps * WINDOWS_PER_BATCH:
        pytest.skip(f"the corpus gives {len(windows)} windows, fewer than {steps * WINDOWS_PER_BATCH}")
    runs = {f"pyinterp-{backend}": pyinterp_run(model, tokenizer, path, points, steps, backend)}
    for provider in PROVIDERS[1:]:
        reason = skip_reason("sparsify", row["shape"], DEVICE, request.config.getoption("--shapes"))
        if provider == "sparsify-1thread" and DEVICE != "cpu":
            reason = "a CPU thread setting"
        if reason:
            record({**row, "provider": provider, "skipped": reason})
            continue
        runs[provider] = sparsify_run(model, points, windows, steps, 1 if provider.endswith("1thread") else None)
    # Whole runs of tens of seconds each: a few rounds, no repeats within a sample.
    rounds = {**harness.round_settings(request.config), "min_rounds": 3, "ceiling_s": float("inf")}
    measured = harness.measure_case(runs, DEVICE, label=f"sae_pipeline {row['shape']}", progress=progress,
                                    **rounds)
    for provider, stats in measured.items():
        result = harness.measured_row({**row, "provider": provider}, stats, work=steps * BATCH_TOKENS, unit="tok/s")
        if provider.startswith("pyinterp"):
            result["pipeline"] = stats["result"]
            progress(f"sae_pipeline {provider}: {stream.describe_timing(stats['result'])}")
        record(result)
