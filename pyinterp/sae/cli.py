"""`pyinterp train-sae`: train a top-k SAE on a model layer's activations (default: the embedded
all-MiniLM-L6-v2 on the standard library's docstrings) or on activation shards, or with --corpus
streamed from a Hugging Face model (pyinterp/sae/stream.py); and demo(), a short training run for
`pyinterp demo`."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HELP = ("train top-k, BatchTopK or JumpReLU SAEs: on a layer of the embedded model, on activation shards, or "
        "streamed from any Hugging Face model over a corpus (one SAE or transcoder per hookpoint, or one "
        "cross-layer transcoder over several)")
COMMAND = "train-sae"


def sae_options(args: argparse.Namespace) -> tuple[int, dict]:
    """build_sae's k and architecture options from the SAE arguments (jumprelu: k is the cap)."""
    if args.architecture == "jumprelu":
        max_active = args.max_active or min(4 * args.k, args.latents)
        return max_active, {"bandwidth": args.bandwidth, "l0_coefficient": args.l0_coefficient}
    options = {"k_aux": args.k_aux, "aux_alpha": args.aux_alpha}
    if args.matryoshka_prefixes is not None:
        options["prefixes"] = args.matryoshka_prefixes
    if args.multi_topk:
        options["multi_topk"] = True
    return args.k, options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pyinterp.cli import integer_at_least, finite_float, nonnegative_int, positive_int
    from pyinterp.sae.distributed import PARALLEL_MODES
    from pyinterp.sae.trainer import ARCHITECTURES, NONFINITE_POLICIES, PRECISIONS, TrainConfig

    defaults = TrainConfig()
    source = parser.add_argument_group("activations")
    source.add_argument("--layer", default="3",
                        help="layer of the model to train on: an int (0 = embeddings, i = output of block i) "
                             "or a module name such as encoder.layer.2 (default 3)")
    source.add_argument("--texts", type=positive_int, default=None,
                        help="use only the first N docstring sentences (default: all, ~100k tokens)")
    source.add_argument("--shards", default=None, metavar="DIR",
                        help="train on the .safetensors/.npy activation shards in DIR instead of a model")
    stream = parser.add_argument_group(
        "streaming from a Hugging Face model over a corpus (one SAE per hookpoint, one forward for all)")
    stream.add_argument("--corpus", default=None,
                        help="a .txt / .jsonl / .parquet file, a folder of them, or a saved dataset: streams "
                             "activations during training instead of harvesting them first")
    stream.add_argument("--model", default="default",
                        help="with --corpus: Hugging Face model id or local folder (default: the embedded "
                             "all-MiniLM-L6-v2)")
    stream.add_argument("--device-map", default=None,
                        help="with --model: transformers' device_map (e.g. auto) for a model larger than one "
                             "device, its layers spread over the GPUs; needs accelerate")
    stream.add_argument("--text-column", default="text")
    stream.add_argument("--hookpoints", nargs="*", default=None,
                        help="module paths, globs allowed ('*' one component), ':input' for a module's input")
    stream.add_argument("--layers", default=None, help="layer numbers as --layer counts them, e.g. 0-11 or 3,6")
    stream.add_argument("--transcode", action="append", default=None, metavar="IN=OUT",
                        help="train a transcoder from hookpoint IN to hookpoint OUT (e.g. "
                             "model.layers.3.mlp:input=model.layers.3.mlp); repeatable")
    stream.add_argument("--skip-connection", action="store_true", help="transcoders get a linear skip")
    stream.add_argument("--clt", default=None, metavar="GLOB",
                        help="train one cross-layer transcoder over the modules GLOB matches (e.g. "
                             "'model.layers.*.mlp'): each reads its module's input and writes into the "
                             "outputs of it and every later one; --latents and --k are per layer")
    stream.add_argument("--context-length", type=integer_at_least(2, ">= 2"), default=128)
    stream.add_argument("--exclude-first-token", action="store_true",
                        help="drop the first position of every window (BOS), as SAE papers do")
    stream.add_argument("--buffer-tokens", type=positive_int, default=65536,
                        help="tokens in the shuffle buffer (default 65536)")
    sae = parser.add_argument_group("SAE")
    sae.add_argument("--architecture", choices=tuple(ARCHITECTURES), default="topk",
                     help="matching_pursuit: the MP-SAE (k greedy steps on a tied decoder; no AuxK)")
    sae.add_argument("--matryoshka-prefixes", type=_prefix_list, default=None, metavar="M1,M2,...",
                     help="with --architecture matryoshka_batch_topk: the nested dictionary sizes, strictly "
                          "increasing, the last = --latents (default M/16,M/8,M/4,M/2,M)")
    sae.add_argument("--multi-topk", action="store_true",
                     help="with --architecture topk: add sparsify's multi-TopK loss (1/8 of the FVU of the "
                          "top-4k reconstruction)")
    sae.add_argument("--latents", type=positive_int, default=4096, help="number of latents M (default 4096)")
    sae.add_argument("--k", type=positive_int, default=32, help="active latents per token (default 32)")
    sae.add_argument("--k-aux", type=nonnegative_int, default=None,
                     help="AuxK's k (default d_model / 2; 0 turns AuxK off)")
    sae.add_argument("--aux-alpha", type=finite_float(0), default=1 / 32, help="AuxK loss weight (default 1/32)")
    sae.add_argument("--max-active", type=positive_int, default=None,
                     help="jumprelu: the cap on active latents per token (default 4 x --k)")
    sae.add_argument("--bandwidth", type=finite_float(0, inclusive=False), default=1e-3,
                     help="jumprelu: the straight-through estimator's kernel width (default 1e-3)")
    sae.add_argument("--l0-coefficient", type=finite_float(0), default=1e-3,
                     help="jumprelu: the L0 penalty's weight (default 1e-3)")
    sae.add_argument("--backend", default="auto", help="backend of the fused ops: auto, cuda, triton, cpu, torch")
    train = parser.add_argument_group("training (defaults: pyinterp.sae.TrainConfig's)")
    train.add_argument("--tokens", type=positive_int, default=defaults.tokens,
                       help=f"training tokens (default {defaults.tokens:,})")
    train.add_argument("--batch-size", type=integer_at_least(2, ">= 2 (the FVU needs a variance)"),
                       default=defaults.batch_size,
                       help=f"tokens per micro-batch per rank (default {defaults.batch_size})")
    train.add_argument("--grad-accumulation", type=positive_int, default=defaults.grad_accumulation,
                       help=f"micro-batches per step (default {defaults.grad_accumulation})")
    train.add_argument("--lr", type=finite_float(0, inclusive=False), default=defaults.lr,
                       help="Adam lr (default 2e-4 / sqrt(latents / 2^14))")
    train.add_argument("--dead-after-tokens", type=positive_int, default=defaults.dead_after_tokens,
                       help="tokens without firing after which a latent is dead (default 10M, or tokens/10 "
                            "for shorter runs so AuxK can act)")
    train.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                       help="bf16: autocast over fp32 master weights; auto: bf16 on CUDA, fp32 on CPU")
    train.add_argument("--nonfinite", choices=NONFINITE_POLICIES, default=defaults.nonfinite,
                       help="a step with a non-finite loss or gradient is skipped; then stop (default: exit "
                            "with an error at the next log line) or skip (go on; stop only when a whole "
                            "log window was skipped)")
    train.add_argument("--parallel", choices=PARALLEL_MODES, default="none",
                       help="multi-process mode under torchrun: data parallel or latent sharding; with "
                            "--corpus, ddp has every rank stream its own part of the corpus (without it "
                            "the hookpoints are spread over the ranks)")
    train.add_argument("--device", default=None, help="default: cuda (the local rank's) if available, else cpu")
    train.add_argument("--seed", type=nonnegative_int, default=defaults.seed)
    train.add_argument("--log-every", type=positive_int, default=defaults.log_every,
                       help=f"steps between metrics lines (default {defaults.log_every})")
    train.add_argument("--checkpoint-every", type=nonnegative_int, default=defaults.checkpoint_every,
                       help=f"steps between checkpoints (default {defaults.checkpoint_every}; 0: at the end only)")
    train.add_argument("--out", default="sae-out", metavar="DIR",
                       help="metrics.jsonl, checkpoint and the trained SAE (sparsify layout) go here")
    train.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    train.add_argument("--log-to", nargs="+", default=None, choices=("tensorboard", "wandb"),
                       help="also log the metrics to TensorBoard (OUT/tensorboard) or Weights & Biases "
                            "(WANDB_MODE=offline works offline); needs that package")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: continue even if the activations or settings (precision, lr, "
                            "dead-after-tokens, ...) differ from the checkpoint's")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(requested: str | None) -> torch.device:
    from pyinterp.cli import check_device

    if requested:
        return check_device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _check_backend(backend: str, device: torch.device) -> None:
    """Run the fused encoder once on a tiny SAE, so that an unknown or unavailable backend fails
    here and not after the activations were harvested."""
    from pyinterp.cli import CommandError
    from pyinterp.nn import TopKSAE

    try:
        with torch.no_grad():
            TopKSAE(4, 8, 2, backend=backend, device=device).encode(torch.zeros(2, 4, device=device))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CommandError(f"--backend {backend}: {exc}") from None


def _check_disk_space(out: Path, latents: int, d_model: int) -> None:
    """A checkpoint (parameters and two Adam moments in fp32, counters) twice while the new one is
    written, plus the trained SAE."""
    from pyinterp.cli import CommandError

    parameters = 2 * latents * d_model + latents + d_model
    needed = 2 * (3 * 4 * parameters + 8 * latents) + 4 * parameters
    free = shutil.disk_usage(out).free
    if free < needed:
        raise CommandError(f"--out {out}: {free / 2**20:.1f} MiB free, but the checkpoints and the SAE need "
                           f"about {needed / 2**20:.1f} MiB")


def _prefix_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 256,1024,4096, got {text!r}")


def _check_arguments(args) -> None:
    """Errors a user can fix, named by their flag, before any model is loaded."""
    from pyinterp.cli import CommandError

    if args.k > args.latents:
        raise CommandError(f"--k {args.k} is more than --latents {args.latents} (need 1 <= k <= latents)")
    if args.k_aux is not None and args.k_aux > args.latents:
        raise CommandError(f"--k-aux {args.k_aux} is more than --latents {args.latents}")
    if args.allow_changes and not args.resume:
        raise CommandError("--allow-changes only applies with --resume")
    if args.matryoshka_prefixes is not None and args.architecture != "matryoshka_batch_topk":
        raise CommandError("--matryoshka-prefixes only applies with --architecture matryoshka_batch_topk")
    if args.multi_topk and args.architecture != "topk":
        raise CommandError("--multi-topk only applies with --architecture topk")


def _describe(metrics: dict) -> str:
    number = lambda key, spec: "n/a" if metrics.get(key) is None else format(metrics[key], spec)  # noqa: E731
    return (f"FVU {number('fvu', '.4f')}, L0 {number('l0', '.1f')}, dead {number('dead_fraction', '.2%')}, "
            f"{number('tokens_per_s', '.0f')} tokens/s")


def run(args) -> int:
    from pyinterp.cli import CommandError, check_writable_folder, report
    from pyinterp.sae.checkpoint import MANIFEST, CheckpointError
    from pyinterp.sae.data import ShardSource, harvest_model_activations
    from pyinterp.sae.distributed import parallel_context
    from pyinterp.sae.trainer import NonFiniteError, TrainConfig, Trainer, build_sae

    if args.corpus is not None:
        from pyinterp.sae.stream import run_streaming

        return run_streaming(args)
    try:
        _check_arguments(args)
        device = _device(args.device)
        _check_backend(args.backend, device)
        out = check_writable_folder("--out", args.out)
        if args.resume and not (out / MANIFEST).is_file():
            raise CommandError(f"--resume: no checkpoint in {out} (checkpoint.json)")
        context = parallel_context(args.parallel)
        if args.shards:
            source = ShardSource(args.shards)
        else:
            from pyinterp.models import TRAINING_DOC_MODULES, docstring_sentences, load_default_model
            texts = docstring_sentences(args.texts or 10**6, TRAINING_DOC_MODULES)
            layer = int(args.layer) if str(args.layer).isdigit() else args.layer
            source = harvest_model_activations(layer, model=load_default_model(device), texts=texts)
        _check_disk_space(out, args.latents, source.d_model)
        if context.is_main:
            print(f"activations: {source.describe()}")
        config = TrainConfig(tokens=args.tokens, batch_size=args.batch_size,
                             grad_accumulation=args.grad_accumulation, lr=args.lr,
                             dead_after_tokens=args.dead_after_tokens, precision=args.precision,
                             log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                             seed=args.seed, nonfinite=args.nonfinite, progress=not args.no_progress)
        k, options = sae_options(args)
        sae = build_sae(args.architecture, source.d_model, args.latents, k, parallel=context.mode,
                        device=device, backend=args.backend, seed=args.seed, **options)
        from pyinterp.sae.sinks import make_sinks

        trainer = Trainer(sae, source, config, out, resume=args.resume, allow_changes=args.allow_changes,
                          context=context, sinks=make_sinks(args.log_to, out, COMMAND) if context.is_main else [])
    except (CommandError, CheckpointError, ValueError, FileNotFoundError, NonFiniteError,
            RuntimeError) as exc:
        return report(COMMAND, exc)
    try:
        already_done = trainer.step >= trainer.total_steps
        metrics = trainer.train()
    except NonFiniteError as exc:
        print(f"pyinterp {COMMAND}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, folder removed or made read-only mid-run
        print(f"pyinterp {COMMAND}: error: step {trainer.step}: writing to {out} failed: {exc}; the last "
              f"committed checkpoint there is intact (--resume continues from it)", file=sys.stderr)
        return 1
    except dist.DistError as exc:
        print(f"pyinterp {COMMAND}: error: rank {context.rank}, step {trainer.step}: a collective failed "
              f"(another rank died?): {exc}; the last committed checkpoint in {out} is intact",
              file=sys.stderr)
        return 1
    if context.is_main:
        what = "already finished at" if already_done else "done:"
        print(f"{what} step {trainer.step}, {trainer.step * trainer.tokens_per_step} tokens, "
              f"{_describe(metrics)}, {trainer.skipped_steps} skipped steps; SAE saved in {out}")
    context.close()
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
