"""The SAE trainer: FVU + AuxK (docs/SAE_TRAINING.md), dead latents counted on the device, decoder
renorm and gradient projection, Adam (fused where available), bf16 autocast over fp32 master weights
(no GradScaler: bf16 has fp32's exponent range), gradient accumulation, progress bar and JSONL
metrics, verified checkpoints that resume the same run, steps with non-finite losses or gradients
skipped on the device, and DDP / latent-sharded multi-process training.

A training step reads nothing back to the host: losses, L0, the non-finite flags and the
dead-latent bookkeeping stay on the device and are read only every `log_every` steps."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from pyinterp import _validation
from pyinterp._atomic import atomic_write_text, kill_point
from pyinterp.nn.jumprelu import JumpReLUSAE
from pyinterp.nn.matryoshka import MatryoshkaBatchTopKSAE
from pyinterp.nn.matching_pursuit import MatchingPursuitSAE
from pyinterp.nn.sae import BatchTopKSAE, TopKSAE, total_variance, write_sae_folder
from pyinterp.sae import checkpoint
from pyinterp.sae.data import ActivationSource
from pyinterp.sae.distributed import LatentShardedTopKSAE, ParallelContext

PRECISIONS = ("auto", "fp32", "bf16")
ARCHITECTURES = {"topk": TopKSAE, "batch_topk": BatchTopKSAE, "jumprelu": JumpReLUSAE,
                 "matryoshka_batch_topk": MatryoshkaBatchTopKSAE, "matching_pursuit": MatchingPursuitSAE}
METRICS_FILE = "metrics.jsonl"


NONFINITE_POLICIES = ("stop", "skip")
# The FVU / AuxK denominators' floor, as a fraction of the data's per-token variance (measured on the
# first step): far below any real batch's, and it keeps a batch of identical tokens finite.
VARIANCE_FLOOR = 1e-3


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradients (TrainConfig.nonfinite)."""


@dataclasses.dataclass
class TrainConfig:
    """tokens: total training tokens. batch_size: tokens per micro-batch on each data-parallel rank;
    a step takes grad_accumulation micro-batches per rank. lr None: 2e-4 / sqrt(n_latents / 2^14)
    (Gao et al.'s scaling). A latent is dead after dead_after_tokens tokens without firing (None:
    min(10M, tokens / 10), so AuxK can act in short runs). precision: fp32, bf16 (autocast over fp32
    masters) or auto (bf16 on CUDA, fp32 on CPU). checkpoint_every: steps between checkpoints (0:
    only at the end; none without an out_dir). nonfinite: what a step with a non-finite loss or
    gradient does; its update is skipped either way, then "stop" ends the run at the next log line
    with NonFiniteError and "skip" goes on (ending it only when a whole log window was skipped).
    These defaults are also `pyinterp train-sae`'s."""
    tokens: int = 1_000_000
    batch_size: int = 1024
    grad_accumulation: int = 1
    lr: float | None = None
    lr_warmup_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    dead_after_tokens: int | None = None
    precision: str = "auto"
    log_every: int = 20
    checkpoint_every: int = 200
    seed: int = 0
    nonfinite: str = "stop"
    progress: bool = True

    def validate(self) -> None:
        name = "TrainConfig"
        for field in ("tokens", "grad_accumulation", "log_every"):
            _validation.check_int(name, field, getattr(self, field), low=1)
        if self.dead_after_tokens is not None:
            _validation.check_int(name, "dead_after_tokens", self.dead_after_tokens, low=1)
        _validation.check_int(name, "batch_size", self.batch_size, low=2,
                              meaning="the FVU needs the variance of at least 2 tokens")
        for field in ("lr_warmup_steps", "checkpoint_every", "seed"):
            _validation.check_int(name, field, getattr(self, field), low=0)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                        and self.lr > 0):
            raise ValueError(f"{name}: lr must be a positive number or None (auto), got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{name}: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"{name}: nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, "
                             f"got {self.nonfinite!r}")

    def resolved_dead_after_tokens(self) -> int:
        if self.dead_after_tokens is not None:
            return self.dead_after_tokens
        return min(10_000_000, max(self.tokens // 10, 1))


def build_sae(architecture: str, d_model: int, n_latents: int, k: int, *, parallel: str = "none",
              device=None, **options) -> TopKSAE:
    """The SAE module for an architecture and parallel mode (latent sharding needs a process group).
    k is the per-token cap (max_active) for jumprelu."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    if parallel == "latents":
        if architecture != "topk" or options.get("multi_topk"):
            raise ValueError(f"parallel='latents' supports architecture='topk' without multi_topk only, got "
                             f"{architecture!r}{' with multi_topk' if options.get('multi_topk') else ''}")
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

    def end_step(self, tokens: int, reduce=None, applied: Tensor | None = None) -> None:
        """reduce: sums the fired flags over data-parallel ranks. applied (bool, on the device):
        False for a skipped step, which leaves the counters as they were."""
        if reduce is not None:
            reduce(self._fired)
        fired = self._fired > 0
        if applied is None:
            self.tokens_since_fired.add_(tokens)
        else:
            fired &= applied
            self.tokens_since_fired.add_(applied.long() * tokens)
        self.tokens_since_fired.masked_fill_(fired, 0)
        self._fired.zero_()


def _adam(parameters, lr: float, config: TrainConfig) -> tuple[torch.optim.Adam, bool]:
    """Fused Adam where this torch has it for the device (it skips a step on the device when told
    to: see Trainer._optimizer_step), else the multi-tensor one; and whether it is the fused one."""
    options = dict(lr=lr, betas=config.adam_betas, eps=config.adam_eps)
    try:
        return torch.optim.Adam(parameters, fused=True, **options), True
    except (RuntimeError, ValueError):
        return torch.optim.Adam(parameters, foreach=True, **options), False


def _all_finite(tensors) -> Tensor:
    """One bool on the device: every tensor finite (a sum overflowing counts as non-finite)."""
    return torch.stack([torch.isfinite(t.sum()) for t in tensors]).all()


class Trainer:
    """Trains `sae` on micro-batches of `source`. With out_dir it writes metrics.jsonl, checkpoints
    (sae/checkpoint.py) and the final SAE (sae.safetensors + cfg.json); resume=True continues the
    run checkpointed in out_dir: same step, parameters, Adam state, dead counters and data position.
    A resume whose source or settings differ from the checkpoint's is refused unless allow_changes."""

    def __init__(self, sae: TopKSAE, source: ActivationSource, config: TrainConfig,
                 out_dir: str | Path | None = None, *, resume: bool = False, allow_changes: bool = False,
                 context: ParallelContext | None = None, sinks: list | None = None):
        config.validate()
        self.sinks = list(sinks or [])  # pyinterp/sae/sinks.py: TensorBoard / W&B, when asked for
        self.context = context or ParallelContext()
        self.context.check_sae(sae)
        if source.d_model != sae.d_model:
            raise ValueError(f"d_model: the activations are {source.d_model} wide "
                             f"({source.describe()}) but the SAE has d_model={sae.d_model}")
        self.sae, self.source, self.config = sae, source, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = sae.W_enc.device
        self.stream = source.shuffled(config.batch_size, seed=config.seed)
        self.tokens_per_step = config.batch_size * config.grad_accumulation * self.context.data_parallel_size
        self.total_steps = -(-config.tokens // self.tokens_per_step)
        self.base_lr = config.lr or 2e-4 / math.sqrt(sae.n_latents / 2 ** 14)
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.dead_after_tokens = config.resolved_dead_after_tokens()
        self.dead = DeadLatents(sae.W_enc.shape[0], getattr(sae, "offset", 0), self.dead_after_tokens,
                                self.device)
        self.step = 0
        self.skipped_steps = 0
        self.last_metrics: dict = {}
        # Held around each step by train(): the SAEs of one stream take turns (pyinterp/sae/stream.py).
        self.step_guard = contextlib.nullcontext()
        self._metric_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # fvu, aux, L0
        self._metric_batches = torch.zeros((), dtype=torch.float64, device=self.device)
        # Steps skipped in this log window, of them with non-finite activations, the first (-1: none).
        self._skipped = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._first_skipped = torch.full((), -1.0, dtype=torch.float64, device=self.device)
        resume_from = self._read_checkpoint(allow_changes) if resume else None
        if resume_from:
            self._load_training_state(*resume_from)
        else:
            self._init_b_dec()
        self.model = self.context.wrap(sae)
        self.optimizer, self._guard_on_device = _adam(list(sae.parameters()), self.base_lr, config)
        if resume_from:
            self._load_optimizer(resume_from[0])
        self.variance_floor = VARIANCE_FLOOR * self.data_variance

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
        """b_dec from the mean of the whole first step (every micro-batch of every rank), and the
        data's per-token variance (the FVU's floor) from the same tokens."""
        first = self.context.gather_data(torch.cat([self._batch(0, i) for i in range(self.config.grad_accumulation)]))
        if not bool(torch.isfinite(first).all()):
            raise NonFiniteError(f"the first step's activations ({self.source.describe()}) hold non-finite "
                                 f"values; b_dec is initialised from them")
        self.data_variance = float(total_variance(first)) / first.shape[0]
        if not self.data_variance > 0:
            raise ValueError(f"the first step's {first.shape[0]} tokens are all identical "
                             f"({self.source.describe()}): the FVU needs their variance")
        self.sae.init_b_dec(first)

    # ---- the step ----
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> None:
        """One optimiser step. A step whose loss or gradient is non-finite on any rank changes
        nothing (parameters, Adam moments and steps, buffers, dead counters) and is counted; all of it on
        the device, without a host sync."""
        config, sae, context = self.config, self.sae, self.context
        dead_mask = self.dead.mask() if sae.k_aux > 0 and sae.aux_alpha > 0 else None
        step_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        buffers = [(b, b.clone()) for b in sae.buffers()]  # BatchTopK's threshold moves in forward
        input_sums = []
        for accumulation in range(config.grad_accumulation):
            x = self._batch(self.step, accumulation)
            input_sums.append(x.sum())
            with context.accumulating(self.model, accumulation == config.grad_accumulation - 1):
                with self._autocast():
                    output = self.model(x, dead_mask, variance_floor=self.variance_floor)
                (output.loss / config.grad_accumulation).backward()
            self.dead.record(output.values.detach(), output.indices)
            active = (output.values.detach() > 0).sum(-1).double().mean()
            step_sums += torch.stack([output.fvu.detach().double(), output.aux_loss.detach().double(), active])
        gradients = [p.grad for p in sae.parameters() if p.grad is not None]
        finite = context.all_ranks_true(_all_finite([step_sums, *gradients]))
        self.dead.end_step(self.tokens_per_step, context.sum_over_data_ranks, finite)
        sae.project_decoder_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * min(1.0, (self.step + 1) / max(config.lr_warmup_steps, 1))
        self._optimizer_step(finite)
        self.optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder(applied=finite)
        for buffer, before in buffers:
            buffer.copy_(torch.where(finite, buffer, before))
        self._metric_sums += torch.where(finite, step_sums, 0)
        self._metric_batches += finite.double() * config.grad_accumulation
        skipped = (~finite).double()
        self._skipped += torch.stack([skipped, skipped * (~_all_finite(input_sums)).double()])
        self._first_skipped = torch.where((self._first_skipped < 0) & ~finite, float(self.step),
                                          self._first_skipped)
        self.step += 1
        kill_point("train-step")

    def _optimizer_step(self, finite: Tensor) -> None:
        if self._guard_on_device:
            # Fused Adam's found_inf (GradScaler's hook): 1 leaves parameters, moments and step as they are.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):  # devices without fused Adam pay a host sync per step
            self.optimizer.step()

    # ---- metrics ----
    def dead_fraction(self) -> Tensor:
        dead = self.context.sum_over_latent_shards(self.dead.mask().sum())
        return dead.double() / self.sae.n_latents

    def collect_metrics(self, seconds: float, steps: int) -> dict:
        """Means over the applied steps since the last call, reduced over ranks (the one host sync,
        every log_every steps). Raises NonFiniteError as config.nonfinite says."""
        sums = torch.cat([self._metric_sums, self.dead_fraction()[None], self._metric_batches[None],
                          self._skipped, self._first_skipped[None]])
        sums = self.context.sum_over_data_ranks(sums)
        sums[3:] /= self.context.data_parallel_size  # the same on every rank except the batch count
        sums[4] *= self.context.data_parallel_size
        fvu, aux, active, dead_fraction, batches, skipped, bad_input, first = sums.tolist()
        self._metric_sums.zero_()
        self._metric_batches.zero_()
        self._skipped.zero_()
        self._first_skipped.fill_(-1)
        skipped, bad_input = int(skipped), int(bad_input)
        self.skipped_steps += skipped
        mean = (lambda total: total / batches) if batches else (lambda total: None)  # noqa: E731
        metrics = {"step": self.step, "tokens": self.step * self.tokens_per_step,
                   "fvu": mean(fvu), "aux_loss": mean(aux), "l0": mean(active),
                   "dead_fraction": dead_fraction, "lr": self.optimizer.param_groups[0]["lr"],
                   "tokens_per_s": steps * self.tokens_per_step / max(seconds, 1e-9),
                   "skipped_steps": skipped}
        self._nonfinite_verdict(metrics, skipped, bad_input, int(first), applied=batches > 0)
        return metrics

    def _nonfinite_verdict(self, metrics: dict, skipped: int, bad_input: int, first: int, applied: bool) -> None:
        if not skipped or (self.config.nonfinite == "skip" and applied):
            return
        self.last_metrics = metrics
        self._write_metrics(metrics)
        cause = (f"; the activations themselves were non-finite in {bad_input} of them" if bad_input
                 else "")
        if self.config.nonfinite == "stop":
            why = ("nonfinite='stop'. To skip such steps and go on, resume with nonfinite='skip' "
                   "(--nonfinite skip)")
        else:
            why = "nonfinite='skip', but no step of the window could be applied: check the activations"
        kept = f"; the checkpoint in {self.out_dir} is untouched" if self.out_dir is not None else ""
        steps = self.step - (self.step - 1) // self.config.log_every * self.config.log_every
        raise NonFiniteError(f"step {self.step}: {skipped} of the last {steps} steps had a non-finite loss or "
                             f"gradient (the first at step {first}){cause}. Their updates were skipped and "
                             f"training stopped{kept} ({why}).")

    def _write_metrics(self, metrics: dict) -> None:
        if self.out_dir is not None and self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        if self.context.is_main:
            for sink in self.sinks:
                sink.log(metrics)

    def train(self) -> dict:
        """Run to config.tokens; returns the last logged metrics (and saves, given out_dir). A
        resumed run that had already finished only rewrites the trained SAE."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.config.progress and self.context.is_main))
        window_start, window_steps = time.perf_counter(), 0
        ran = self.step < self.total_steps
        while self.step < self.total_steps:
            with self.step_guard:
                self.train_step()
            window_steps += 1
            bar.update(1)
            if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the window's time must include its queued GPU work
                metrics = self.collect_metrics(time.perf_counter() - window_start, window_steps)
                self.last_metrics = metrics
                self._write_metrics(metrics)
                bar.set_postfix({"tok/s": f"{metrics['tokens_per_s']:.0f}", "FVU": f"{metrics['fvu'] or 0:.4f}",
                                 "L0": f"{metrics['l0'] or 0:.1f}", "dead": f"{metrics['dead_fraction']:.1%}"})
                window_start, window_steps = time.perf_counter(), 0
            if (self.out_dir is not None and self.config.checkpoint_every
                    and self.step % self.config.checkpoint_every == 0 and self.step < self.total_steps):
                self.save_checkpoint()
        bar.close()
        for sink in self.sinks:
            sink.close()
        if self.out_dir is not None:
            if ran:
                self.save_checkpoint()
            self.save_sae()
        return self.last_metrics

    # ---- checkpoints ----
    def _state(self) -> dict:
        return {"sae": self.sae.config(), "train": dataclasses.asdict(self.config), "step": self.step,
                "tokens": self.step * self.tokens_per_step,
                "micro_batches": self._micro_batch_index(self.step, 0) - self.context.data_rank,
                "world_size": self.context.world_size, "precision": self.precision,
                "lr": self.base_lr, "dead_after_tokens": self.dead_after_tokens,
                "data_variance": self.data_variance, "skipped_steps": self.skipped_steps,
                "last_metrics": self.last_metrics, "source": self.source.identity()}

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
        # The log window so far (summed over data-parallel ranks), so a resumed run logs the same lines.
        window = torch.cat([self._metric_sums, self._metric_batches[None]])
        tensors["window.sums"] = self.context.sum_over_data_ranks(window.clone())
        tensors["window.skipped"] = torch.cat([self._skipped, self._first_skipped[None]])
        return tensors

    def _check_finite(self, tensors: dict[str, Tensor], what: str) -> None:
        if self._skipped[0] > 0 and self.config.nonfinite == "stop":
            self.collect_metrics(0.0, 0)  # raises: a stop-policy run writes nothing after a skipped step
        bad = [name for name, tensor in tensors.items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if bad:
            raise NonFiniteError(f"step {self.step}: refusing to write {what} in {self.out_dir}: "
                                 f"non-finite values in {', '.join(bad)} (the previous one is kept)")

    def save_checkpoint(self) -> None:
        if self.out_dir is None:
            raise ValueError("save_checkpoint needs the trainer's out_dir")
        tensors = self.checkpoint_tensors()
        self._check_finite(tensors, "a checkpoint")
        if self.context.is_main:
            checkpoint.write_checkpoint(self.out_dir, tensors, self._state())
        self.context.barrier()  # no rank runs ahead of a checkpoint it may be asked to resume from

    def save_sae(self) -> None:
        """The trained SAE in sparsify's layout (sae.safetensors + cfg.json) in out_dir."""
        tensors = self.sae.export_tensors()
        self._check_finite(tensors, "the trained SAE")
        if self.context.is_main:
            write_sae_folder(self.out_dir, tensors, self.sae.sparsify_config())

    def _read_checkpoint(self, allow_changes: bool) -> tuple[dict[str, Tensor], dict]:
        if self.out_dir is None:
            raise ValueError("resume needs out_dir, the folder of the run to continue")
        if self.context.is_main:
            checkpoint.clean_folder(self.out_dir)
        self.context.barrier()
        tensors, state = checkpoint.read_checkpoint(self.out_dir)
        where = self.out_dir / checkpoint.MANIFEST

        def field(name, mapping=state, label=where):
            return checkpoint.require(mapping, name, label)

        saved_sae, saved_train = field("sae"), field("train")
        for key, value in self.sae.config().items():
            if field(key, saved_sae, f"{where} 'sae'") != value:
                raise checkpoint.CheckpointError(f"resume: {key}={value} but the checkpoint in {self.out_dir} "
                                                 f"was trained with {key}={saved_sae[key]}")
        for key in ("batch_size", "grad_accumulation", "seed"):
            if field(key, saved_train, f"{where} 'train'") != getattr(self.config, key):
                raise checkpoint.CheckpointError(
                    f"resume: {key}={getattr(self.config, key)} but the checkpoint in {self.out_dir} was "
                    f"trained with {key}={saved_train[key]} (the data position depends on it)")
        self.context.check_resume(field("world_size"))
        if self.config.dead_after_tokens is None:  # the default follows tokens: keep the run's
            self.dead_after_tokens = self.dead.dead_after_tokens = field("dead_after_tokens")
        changed = [f"{name}: {field(name)!r} in the checkpoint, {value!r} now"
                   for name, value in (("source", self.source.identity()), ("precision", self.precision),
                                       ("lr", self.base_lr), ("dead_after_tokens", self.dead_after_tokens))
                   if field(name) != value]
        changed += [f"{name}: {field(name, saved_train, where)!r} in the checkpoint, {value!r} now"
                    for name, value in (("lr_warmup_steps", self.config.lr_warmup_steps),
                                        ("adam_betas", list(self.config.adam_betas)),
                                        ("adam_eps", self.config.adam_eps))
                    if field(name, saved_train, where) != value]
        if changed and not allow_changes:
            raise checkpoint.CheckpointError(
                f"resume: this run differs from the one checkpointed in {self.out_dir} ("
                + "; ".join(changed) + "); to continue it anyway, pass allow_changes=True (--allow-changes)")
        step = field("step")
        if step > self.total_steps:
            raise checkpoint.CheckpointError(
                f"resume: the checkpoint in {self.out_dir} is at step {step} ({field('tokens')} tokens), past "
                f"the {self.total_steps} steps of tokens={self.config.tokens}; pass at least "
                f"{field('tokens')} tokens to continue it")
        for name in ("data_variance", "skipped_steps", "last_metrics"):
            field(name)
        whole = {name: tuple(self.sae.gather_latent_rows(name, p).shape) for name, p in self.sae.named_parameters()}
        expected = {f"sae.{name}": tuple(t.shape) for name, t in self.sae.export_tensors().items()}
        expected.update({"dead.tokens_since_fired": (self.sae.n_latents,), "window.sums": (4,),
                         "window.skipped": (3,)})
        expected.update({f"adam.{name}.{key}": shape for name, shape in whole.items()
                         for key in ("exp_avg", "exp_avg_sq")})
        expected.update({f"adam.{name}.step": (1,) for name, _ in self.sae.named_parameters()})
        for name, shape in expected.items():
            if name not in tensors:
                raise checkpoint.CheckpointError(f"resume: the checkpoint of {where} has no tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise checkpoint.CheckpointError(f"resume: tensor {name!r} of the checkpoint of {where} has shape "
                                                 f"{tuple(tensors[name].shape)}, expected {shape}")
        return tensors, state

    def _load_training_state(self, tensors: dict[str, Tensor], state: dict) -> None:
        self.sae.import_tensors({name.removeprefix("sae."): t.to(self.device)
                                 for name, t in tensors.items() if name.startswith("sae.")})
        self.dead.tokens_since_fired.copy_(
            self.sae.local_latent_rows("W_enc", tensors["dead.tokens_since_fired"].to(self.device)))
        window = tensors["window.sums"].to(self.device) * (self.context.data_rank == 0)  # counted once
        self._metric_sums.copy_(window[:3])
        self._metric_batches.copy_(window[3])
        self._skipped.copy_(tensors["window.skipped"][:2])
        self._first_skipped.copy_(tensors["window.skipped"][2])
        self.step, self.data_variance = state["step"], state["data_variance"]
        self.skipped_steps, self.last_metrics = state["skipped_steps"], state["last_metrics"]
        if self.context.is_main:
            self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """metrics.jsonl back to the checkpoint's step: the lines logged after it are logged again."""
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] > self.step:
                    break
            except (ValueError, KeyError, TypeError):  # a line torn by a kill
                break
            kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    def _load_optimizer(self, tensors: dict[str, Tensor]) -> None:
        state = {}
        for index, (name, _) in enumerate(self.sae.named_parameters()):
            state[index] = {"step": tensors[f"adam.{name}.step"].reshape(()),
                            **{key: self.sae.local_latent_rows(name, tensors[f"adam.{name}.{key}"])
                               for key in ("exp_avg", "exp_avg_sq")}}
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
