"""`pyinterp train-sae`: train a top-k SAE on a model layer's activations (default: the embedded
all-MiniLM-L6-v2 on the standard library's docstrings) or on activation shards; and demo(), a short
training run for `pyinterp demo`."""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

HELP = "train a top-k SAE on a model layer's activations or on activation shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("activations")
    source.add_argument("--layer", default="3",
                        help="layer of the model to train on: an int (0 = embeddings, i = output of block i) "
                             "or a module name such as encoder.layer.2 (default 3)")
    source.add_argument("--texts", type=int, default=None,
                        help="use only the first N docstring sentences (default: all, ~100k tokens)")
    source.add_argument("--shards", default=None, metavar="DIR",
                        help="train on the .safetensors/.npy activation shards in DIR instead of a model")
    sae = parser.add_argument_group("SAE")
    sae.add_argument("--architecture", choices=("topk", "batch_topk"), default="topk")
    sae.add_argument("--latents", type=int, default=4096, help="number of latents M (default 4096)")
    sae.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    sae.add_argument("--k-aux", type=int, default=None, help="AuxK's k (default d_model / 2; 0 turns AuxK off)")
    sae.add_argument("--aux-alpha", type=float, default=1 / 32, help="AuxK loss weight (default 1/32)")
    sae.add_argument("--backend", default="auto", help="backend of the fused ops: auto, cuda, triton, cpu, torch")
    train = parser.add_argument_group("training")
    train.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (default 1M)")
    train.add_argument("--batch-size", type=int, default=1024, help="tokens per micro-batch per rank (default 1024)")
    train.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per step (default 1)")
    train.add_argument("--lr", type=float, default=None, help="Adam lr (default 2e-4 / sqrt(latents / 2^14))")
    train.add_argument("--dead-after-tokens", type=int, default=None,
                       help="tokens without firing after which a latent is dead (default 10M, or tokens/10 "
                            "for shorter runs so AuxK can act)")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="bf16: autocast over fp32 master weights; auto: bf16 on CUDA, fp32 on CPU")
    train.add_argument("--parallel", choices=("none", "ddp", "latents"), default="none",
                       help="multi-process mode under torchrun: data parallel or latent sharding")
    train.add_argument("--device", default=None, help="default: cuda (the local rank's) if available, else cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=20, help="steps between metrics lines (default 20)")
    train.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    train.add_argument("--out", default="sae-out", metavar="DIR",
                       help="metrics.jsonl, checkpoint and the trained SAE (sparsify layout) go here")
    train.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        import os
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _check_arguments(args) -> None:
    """Errors a user can fix, named by their flag, before any model is loaded."""
    for flag in ("latents", "k", "tokens", "batch_size", "grad_accumulation"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.k > args.latents:
        raise ValueError(f"--k {args.k} is more than --latents {args.latents} (need 1 <= k <= latents)")


def run(args) -> int:
    from pyinterp.sae.data import ShardSource, harvest_model_activations
    from pyinterp.sae.distributed import parallel_context
    from pyinterp.sae.trainer import TrainConfig, Trainer, build_sae

    try:
        _check_arguments(args)
        context = parallel_context(args.parallel)
        device = _device(args.device)
        if args.shards:
            source = ShardSource(args.shards)
        else:
            from pyinterp.models import TRAINING_DOC_MODULES, docstring_sentences, load_default_model
            texts = docstring_sentences(args.texts or 10**6, TRAINING_DOC_MODULES)
            layer = int(args.layer) if str(args.layer).isdigit() else args.layer
            source = harvest_model_activations(layer, model=load_default_model(device), texts=texts)
        if context.is_main:
            print(f"activations: {source.describe()}")
        dead_after = args.dead_after_tokens or min(10_000_000, max(args.tokens // 10, 1))
        config = TrainConfig(tokens=args.tokens, batch_size=args.batch_size,
                             grad_accumulation=args.grad_accumulation, lr=args.lr,
                             dead_after_tokens=dead_after, precision=args.precision,
                             log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                             seed=args.seed, parallel=args.parallel, progress=not args.no_progress)
        sae = build_sae(args.architecture, source.d_model, args.latents, args.k, parallel=args.parallel,
                        device=device, k_aux=args.k_aux, aux_alpha=args.aux_alpha, backend=args.backend,
                        seed=args.seed)
        trainer = Trainer(sae, source, config, args.out, resume=args.resume, context=context)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"train-sae: error: {exc}", file=sys.stderr)
        return 2
    metrics = trainer.train()
    if context.is_main:
        print(f"done: step {metrics['step']}, {metrics['tokens']} tokens, FVU {metrics['fvu']:.4f}, "
              f"L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.2%}, "
              f"{metrics['tokens_per_s']:.0f} tokens/s; SAE saved in {args.out}")
    if context.mode != "none":
        # Every rank done before any tears the group down (a rank leaving early can abort gloo peers).
        dist.barrier()
        dist.destroy_process_group()
    return 0


def demo(backend: str = "auto", texts: int = 400, steps: int = 60) -> list[float]:
    """A short training run on all-MiniLM-L6-v2's layer 3 (well under a minute on a laptop CPU):
    prints the FVU as it falls and returns the logged FVUs."""
    from pyinterp.models import docstring_sentences, load_default_model
    from pyinterp.sae.data import harvest_model_activations
    from pyinterp.sae.trainer import TrainConfig, Trainer, build_sae

    print("== SAE training: all-MiniLM-L6-v2 layer 3 on docstring sentences ==")
    start = time.perf_counter()
    source = harvest_model_activations(3, model=load_default_model(), texts=docstring_sentences(texts))
    batch_size = 256
    config = TrainConfig(tokens=steps * batch_size, batch_size=batch_size, lr=2e-3, log_every=10,
                         dead_after_tokens=2048, progress=False)
    sae = build_sae("topk", source.d_model, 1024, 16, backend=backend)
    trainer = Trainer(sae, source, config)
    print(f"{source.describe()}; SAE M=1024 k=16, {steps} steps of {batch_size} tokens, backend {backend}")
    fvus = []
    while trainer.step < trainer.total_steps:
        window = time.perf_counter()
        for _ in range(config.log_every):
            trainer.train_step()
        metrics = trainer.collect_metrics(time.perf_counter() - window, config.log_every)
        fvus.append(metrics["fvu"])
        print(f"step {metrics['step']:4d}  FVU {metrics['fvu']:.4f}  L0 {metrics['l0']:.1f}  "
              f"dead {metrics['dead_fraction']:.1%}  {metrics['tokens_per_s']:.0f} tokens/s")
    print(f"FVU {fvus[0]:.3f} -> {fvus[-1]:.3f} in {time.perf_counter() - start:.1f} s")
    return fvus
