"""The SAE trainer: FVU + AuxK (sae.md), dead latents counted on the device, decoder renorm and
gradient projection, Adam (fused where available), bf16 autocast over fp32 master weights (no
GradScaler: bf16 has fp32's exponent range), gradient accumulation, progress bar and JSONL metrics,
atomic checkpoints that resume the same run, and DDP / latent-sharded multi-process training.

A training step reads nothing back to the host: losses, L0 and the dead-latent bookkeeping stay on
the device and are read only every `log_every` steps."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from pyinterp import _validation
from pyinterp.nn.sae import BatchTopKSAE, TopKSAE, write_sae_folder
from pyinterp.sae import checkpoint
from pyinterp.sae.data import ActivationSource, ShuffledStream
from pyinterp.sae.distributed import (PARALLEL_MODES, LatentShardedTopKSAE, ParallelContext,
                                      all_gather_rows, all_reduce_sum)

PRECISIONS = ("auto", "fp32", "bf16")
ARCHITECTURES = {"topk": TopKSAE, "batch_topk": BatchTopKSAE}
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    """tokens: total training tokens. batch_size: tokens per micro-batch on each data-parallel rank;
    a step takes grad_accumulation micro-batches per rank. lr None: 2e-4 / sqrt(n_latents / 2^14)
    (Gao et al.'s scaling). A latent is dead after dead_after_tokens tokens without firing.
    precision: fp32, bf16 (autocast over fp32 masters) or auto (bf16 on CUDA, fp32 on CPU).
    checkpoint_every: steps between checkpoints (0: only at the end). parallel: none, ddp, latents."""
    tokens: int = 2_000_000
    batch_size: int = 1024
    grad_accumulation: int = 1
    lr: float | None = None
    lr_warmup_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    dead_after_tokens: int = 10_000_000
    precision: str = "auto"
    log_every: int = 20
    checkpoint_every: int = 0
    seed: int = 0
    parallel: str = "none"
    progress: bool = True

    def validate(self) -> None:
        name = "TrainConfig"
        for field in ("tokens", "grad_accumulation", "dead_after_tokens", "log_every"):
            _validation.check_int(name, field, getattr(self, field), low=1)
        _validation.check_int(name, "batch_size", self.batch_size, low=2,
                              meaning="the FVU needs the variance of at least 2 tokens")
        for field in ("lr_warmup_steps", "checkpoint_every", "seed"):
            _validation.check_int(name, field, getattr(self, field), low=0)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{name}: lr must be a positive number or None (auto), got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{name}: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"{name}: parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")


def build_sae(architecture: str, d_model: int, n_latents: int, k: int, *, parallel: str = "none",
              device=None, **options) -> TopKSAE:
    """The SAE module for an architecture and parallel mode (latent sharding needs a process group)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    if parallel == "latents":
        if architecture != "topk":
            raise ValueError(f"parallel='latents' supports architecture='topk' only, got {architecture!r}")
        return LatentShardedTopKSAE(d_model, n_latents, k, device=device, **options)
    return ARCHITECTURES[architecture](d_model, n_latents, k, device=device, **options)


class DeadLatents:
    """Tokens since each of this rank's latents last fired (value > 0 in the top-k), on the device.
    Fired flags accumulate over a step's micro-batches and are folded in by end_step (summed over
    data-parallel ranks first), so every rank keeps identical counters."""

    def __init__(self, num_latents: int, offset: int, dead_after_tokens: int, device):
        self.offset, self.dead_after_tokens = offset, dead_after_tokens
        self.tokens_since_fired = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self._fired = torch.zeros(num_latents, dtype=torch.int32, device=device)

    def mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    def record(self, values: Tensor, indices: Tensor) -> None:
        local = indices.reshape(-1).long() - self.offset
        # Latents of other ranks (latent sharding) and zero values count as no fire (weight 0).
        fired = ((values.reshape(-1) > 0) & (local >= 0) & (local < len(self._fired))).int()
        self._fired.index_add_(0, local.clamp(0, len(self._fired) - 1), fired)

    def end_step(self, tokens: int, data_parallel: bool) -> None:
        if data_parallel:
            all_reduce_sum(self._fired)
        self.tokens_since_fired.add_(tokens).masked_fill_(self._fired > 0, 0)
        self._fired.zero_()


def _adam(parameters, lr: float, config: TrainConfig) -> torch.optim.Adam:
    """Fused Adam where this torch has it for the device, else the multi-tensor one."""
    options = dict(lr=lr, betas=config.adam_betas, eps=config.adam_eps)
    try:
        return torch.optim.Adam(parameters, fused=True, **options)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(parameters, foreach=True, **options)


class Trainer:
    """Trains `sae` on micro-batches of `source`. With out_dir it writes metrics.jsonl, checkpoints
    (checkpoint.safetensors + checkpoint.json) and the final SAE (sae.safetensors + cfg.json);
    resume=True continues the run checkpointed in out_dir: same step, parameters, Adam state, dead
    counters and data position."""

    def __init__(self, sae: TopKSAE, source: ActivationSource, config: TrainConfig,
                 out_dir: str | Path | None = None, *, resume: bool = False,
                 context: ParallelContext | None = None):
        config.validate()
        self.context = context or ParallelContext()
        if self.context.mode != config.parallel:
            raise ValueError(f"parallel={config.parallel!r} but the process context is "
                             f"{self.context.mode!r}; build it with parallel_context(config.parallel)")
        if (config.parallel == "latents") != isinstance(sae, LatentShardedTopKSAE):
            raise ValueError("parallel='latents' needs a LatentShardedTopKSAE (build_sae(..., "
                             "parallel='latents')) and the other modes a whole SAE")
        if source.d_model != sae.d_model:
            raise ValueError(f"d_model: the activations are {source.d_model} wide "
                             f"({source.describe()}) but the SAE has d_model={sae.d_model}")
        self.sae, self.source, self.config = sae, source, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = sae.W_enc.device
        self.stream = ShuffledStream(source, config.batch_size, seed=config.seed)
        self.tokens_per_step = config.batch_size * config.grad_accumulation * self.context.data_parallel_size
        self.total_steps = -(-config.tokens // self.tokens_per_step)
        self.base_lr = config.lr or 2e-4 / math.sqrt(sae.n_latents / 2 ** 14)
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.dead = DeadLatents(sae.W_enc.shape[0], getattr(sae, "offset", 0), config.dead_after_tokens,
                                self.device)
        self.step = 0
        self.last_metrics: dict = {}
        self._metric_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # fvu, aux, L0
        self._metric_batches = 0
        resume_from = self._read_checkpoint() if resume else None
        if resume_from:
            self._load_training_state(*resume_from)
        else:
            self._init_b_dec()
        self.model = sae
        if config.parallel == "ddp":
            self.model = torch.nn.parallel.DistributedDataParallel(
                sae, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = _adam(list(sae.parameters()), self.base_lr, config)
        if resume_from:
            self._load_optimizer(resume_from[0])

    # ---- data ----
    def _micro_batch_index(self, step: int, accumulation: int) -> int:
        """Global micro-batch number: step-major, then accumulation, then data-parallel rank."""
        ranks = self.context.data_parallel_size
        return (step * self.config.grad_accumulation + accumulation) * ranks + self.context.data_rank

    def _batch(self, step: int, accumulation: int) -> Tensor:
        batch = self.stream.batch(self._micro_batch_index(step, accumulation))
        if self.device.type == "cuda":  # an asynchronous copy: the host reads ahead while the GPU works
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _init_b_dec(self) -> None:
        """b_dec from the mean of the whole first step (every micro-batch of every rank)."""
        first = torch.cat([self._batch(0, i) for i in range(self.config.grad_accumulation)])
        if self.context.data_parallel_size > 1:
            first = all_gather_rows(first)
        self.sae.init_b_dec(first)

    # ---- the step ----
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> None:
        config, sae = self.config, self.sae
        dead_mask = self.dead.mask() if sae.k_aux > 0 and sae.aux_alpha > 0 else None
        for accumulation in range(config.grad_accumulation):
            x = self._batch(self.step, accumulation)
            last = accumulation == config.grad_accumulation - 1
            sync = (self.model.no_sync() if config.parallel == "ddp" and not last
                    else contextlib.nullcontext())
            with sync:
                with self._autocast():
                    output = self.model(x, dead_mask)
                (output.loss / config.grad_accumulation).backward()
            self.dead.record(output.values.detach(), output.indices)
            active = (output.values.detach() > 0).sum(-1).double().mean()
            self._metric_sums += torch.stack([output.fvu.detach().double(),
                                              output.aux_loss.detach().double(), active])
            self._metric_batches += 1
        self.dead.end_step(self.tokens_per_step, config.parallel == "ddp")
        sae.project_decoder_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * min(1.0, (self.step + 1) / max(config.lr_warmup_steps, 1))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        self.step += 1

    # ---- metrics ----
    def dead_fraction(self) -> Tensor:
        dead = self.dead.mask().sum()
        if self.context.mode == "latents":
            all_reduce_sum(dead)
        return dead.double() / self.sae.n_latents

    def collect_metrics(self, seconds: float, steps: int) -> dict:
        """Means since the last call, reduced over ranks (the one host sync, every log_every steps)."""
        sums = torch.cat([self._metric_sums, self.dead_fraction()[None],
                          torch.tensor([self._metric_batches], dtype=torch.float64, device=self.device)])
        if self.context.mode == "ddp":
            all_reduce_sum(sums)
            sums[3] /= self.context.world_size  # dead fraction is the same on every rank
        fvu, aux, active, dead_fraction, batches = sums.tolist()
        self._metric_sums.zero_()
        self._metric_batches = 0
        return {"step": self.step, "tokens": self.step * self.tokens_per_step,
                "fvu": fvu / batches, "aux_loss": aux / batches, "l0": active / batches,
                "dead_fraction": dead_fraction, "lr": self.optimizer.param_groups[0]["lr"],
                "tokens_per_s": steps * self.tokens_per_step / max(seconds, 1e-9)}

    def _write_metrics(self, metrics: dict) -> None:
        if self.out_dir is not None and self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")

    def train(self) -> dict:
        """Run to config.tokens; returns the last logged metrics (and saves, given out_dir)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.config.progress and self.context.is_main))
        window_start, window_steps = time.perf_counter(), 0
        while self.step < self.total_steps:
            self.train_step()
            window_steps += 1
            bar.update(1)
            if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the window's time must include its queued GPU work
                metrics = self.collect_metrics(time.perf_counter() - window_start, window_steps)
                self.last_metrics = metrics
                self._write_metrics(metrics)
                bar.set_postfix({"tok/s": f"{metrics['tokens_per_s']:.0f}", "FVU": f"{metrics['fvu']:.4f}",
                                 "L0": f"{metrics['l0']:.1f}", "dead": f"{metrics['dead_fraction']:.1%}"})
                window_start, window_steps = time.perf_counter(), 0
            if (self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0
                    and self.step < self.total_steps):
                self.save_checkpoint()
        bar.close()
        if self.out_dir is not None:
            self.save_checkpoint()
            self.save_sae()
        return self.last_metrics

    # ---- checkpoints ----
    def _state(self) -> dict:
        return {"format": "pyinterp-sae-checkpoint", "version": 1, "sae": self.sae.config(),
                "train": dataclasses.asdict(self.config), "step": self.step,
                "tokens": self.step * self.tokens_per_step,
                "micro_batches": self._micro_batch_index(self.step, 0) - self.context.data_rank,
                "world_size": self.context.world_size, "source": self.source.describe()}

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Whole-SAE tensors: parameters, Adam moments and steps, dead counters (collective under
        latent sharding: every rank must call)."""
        tensors = {f"sae.{name}": tensor for name, tensor in self.sae.export_tensors().items()}
        for name, parameter in self.sae.named_parameters():
            state = self.optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"adam.{name}.{key}"] = self.sae.gather_latent_rows(name, state[key])
            if "step" in state:
                tensors[f"adam.{name}.step"] = state["step"].reshape(1)
        tensors["dead.tokens_since_fired"] = self.sae.gather_latent_rows("W_enc", self.dead.tokens_since_fired)
        return tensors

    def save_checkpoint(self) -> None:
        if self.out_dir is None:
            raise ValueError("save_checkpoint needs the trainer's out_dir")
        tensors = self.checkpoint_tensors()
        if self.context.is_main:
            checkpoint.write_checkpoint(self.out_dir, tensors, self._state())
        if self.context.mode != "none":
            dist.barrier()  # no rank runs ahead of a checkpoint it may be asked to resume from

    def save_sae(self) -> None:
        """The trained SAE in sparsify's layout (sae.safetensors + cfg.json) in out_dir."""
        tensors = self.sae.export_tensors()
        if self.context.is_main:
            write_sae_folder(self.out_dir, tensors, self.sae.sparsify_config())

    def _read_checkpoint(self) -> tuple[dict[str, Tensor], dict]:
        if self.out_dir is None:
            raise ValueError("resume needs out_dir, the folder of the run to continue")
        tensors, state = checkpoint.read_checkpoint(self.out_dir)
        saved_sae, saved_train = state["sae"], state["train"]
        for key, value in self.sae.config().items():
            if saved_sae.get(key) != value:
                raise ValueError(f"resume: {key}={value} but the checkpoint in {self.out_dir} was "
                                 f"trained with {key}={saved_sae.get(key)}")
        for key in ("batch_size", "grad_accumulation", "seed"):
            if saved_train[key] != getattr(self.config, key):
                raise ValueError(f"resume: {key}={getattr(self.config, key)} but the checkpoint in "
                                 f"{self.out_dir} was trained with {key}={saved_train[key]} "
                                 f"(the data position depends on it)")
        if state["world_size"] != self.context.world_size and self.context.mode == "ddp":
            raise ValueError(f"resume: {self.context.world_size} data-parallel ranks but the checkpoint "
                             f"was written by {state['world_size']} (the data position depends on it)")
        return tensors, state

    def _load_training_state(self, tensors: dict[str, Tensor], state: dict) -> None:
        self.sae.import_tensors({name.removeprefix("sae."): t.to(self.device)
                                 for name, t in tensors.items() if name.startswith("sae.")})
        self.dead.tokens_since_fired.copy_(
            self.sae.local_latent_rows("W_enc", tensors["dead.tokens_since_fired"].to(self.device)))
        self.step = state["step"]

    def _load_optimizer(self, tensors: dict[str, Tensor]) -> None:
        state = {}
        for index, (name, _) in enumerate(self.sae.named_parameters()):
            if f"adam.{name}.step" in tensors:
                state[index] = {"step": tensors[f"adam.{name}.step"].reshape(()),
                                **{key: self.sae.local_latent_rows(name, tensors[f"adam.{name}.{key}"])
                                   for key in ("exp_avg", "exp_avg_sq")}}
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
