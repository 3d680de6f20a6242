"""Multi-process SAE training on torch.distributed (gloo on CPU, NCCL on GPU; launch with torchrun).

- "ddp": every rank holds the whole SAE and its own micro-batches; DistributedDataParallel averages
  the gradients.
- "latents": every rank sees the same micro-batches and holds n_latents / R latents (rows of W_enc,
  b_enc, W_dec; b_dec replicated). The exact distributed top-k of docs/SAE_TRAINING.md: local fused top-k, all-gather
  the N x k candidates (values + global indices), top-k of the union; each rank decodes its own
  latents and the partial sums are all-reduced. The loss is then identical on every rank, and so is
  its gradient G; each rank's own latents get their exact gradients from G, and b_dec's encoder-side
  partial gradients are summed across ranks."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from pyinterp.nn.sae import TopKSAE
from pyinterp.ops.topk_encode import topk_encode
from pyinterp.reference.topk_encode import topk_lower_index_ties

PARALLEL_MODES = ("none", "ddp", "latents")


@dataclass
class ParallelContext:
    """This process's place in the run, and every step of the trainer that depends on the mode
    (identities for "none"), so the trainer never branches on it."""
    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    group: object = None  # the process group of every collective (None: the default group)

    def with_own_group(self) -> "ParallelContext":
        """This context on a new process group of all ranks: trainers stepping in threads of one
        process (pyinterp/sae/stream.py) then never mix up each other's collectives. Collective:
        every rank must create the groups in the same order."""
        if self.mode == "none":
            return self
        return replace(self, group=dist.new_group(list(range(self.world_size))))

    @property
    def data_parallel_size(self) -> int:
        """How many ranks read different micro-batches."""
        return self.world_size if self.mode == "ddp" else 1

    @property
    def data_rank(self) -> int:
        return self.rank if self.mode == "ddp" else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_sae(self, sae: TopKSAE) -> None:
        if (self.mode == "latents") != isinstance(sae, LatentShardedTopKSAE):
            raise ValueError("parallel='latents' needs a LatentShardedTopKSAE (build_sae(..., "
                             "parallel='latents')) and the other modes a whole SAE")

    def wrap(self, sae: TopKSAE) -> torch.nn.Module:
        """The module a step calls: DDP averages gradients over the data-parallel ranks."""
        if self.mode != "ddp":
            return sae
        device = sae.W_enc.device
        return torch.nn.parallel.DistributedDataParallel(
            sae, device_ids=[device.index] if device.type == "cuda" else None, process_group=self.group)

    def accumulating(self, model: torch.nn.Module, last: bool):
        """Around a micro-batch's backward: DDP reduces gradients on the last one only."""
        return model.no_sync() if self.mode == "ddp" and not last else contextlib.nullcontext()

    def gather_data(self, rows: Tensor) -> Tensor:
        """Every data-parallel rank's rows, in rank order."""
        return all_gather_rows(rows, self.group) if self.mode == "ddp" else rows

    def sum_over_data_ranks(self, tensor: Tensor) -> Tensor:
        return all_reduce_sum(tensor, self.group) if self.mode == "ddp" else tensor

    def sum_over_latent_shards(self, tensor: Tensor) -> Tensor:
        return all_reduce_sum(tensor, self.group) if self.mode == "latents" else tensor

    def all_ranks_true(self, flag: Tensor) -> Tensor:
        """A bool that holds on every rank (on the device: no host sync), so every rank skips the
        same steps."""
        if self.mode == "none":
            return flag
        agreed = flag.to(torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
        return agreed.bool()

    def check_resume(self, saved_world_size: int) -> None:
        if self.mode == "ddp" and saved_world_size != self.world_size:
            raise ValueError(f"resume: {self.world_size} data-parallel ranks but the checkpoint was "
                             f"written by {saved_world_size} (the data position depends on it)")

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Every rank done before any tears the group down (a rank leaving early can abort gloo
        peers)."""
        if self.mode != "none":
            dist.barrier()
            dist.destroy_process_group()


def parallel_context(mode: str) -> ParallelContext:
    """The context of this process; for "ddp"/"latents", joins the process group torchrun describes
    (NCCL when CUDA is available, else gloo) unless one is already initialised."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if mode == "none":
        return ParallelContext()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError(f"parallel={mode!r} needs torch.distributed: launch with torchrun "
                               f"(e.g. torchrun --nproc-per-node 2 -m pyinterp train-sae ...)")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # NCCL works on the current device
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ParallelContext(mode, dist.get_rank(), dist.get_world_size())


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


def all_gather_rows(tensor: Tensor, group=None) -> Tensor:
    """Concatenate every rank's tensor along dim 0 (rank order)."""
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces)


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce sum of the partial decodes. Backward: identity, because the loss after it
    is computed identically on every rank, so each rank already holds the full dL/d(sum)."""

    @staticmethod
    def forward(ctx, partial: Tensor) -> Tensor:
        return all_reduce_sum(partial.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _ReplicatedInput(torch.autograd.Function):
    """Forward: identity for a replicated tensor fed to a rank-local computation (b_dec into the
    local encoder). Backward: sum the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return all_reduce_sum(grad.contiguous().clone())


class LatentShardedTopKSAE(TopKSAE):
    """A TopKSAE whose latents are split across the ranks of the default process group: this rank
    holds latents [offset, offset + n_latents / R). Initialised as the single-process TopKSAE of the
    same seed and sliced, so both start from the same parameters. Dead masks given to forward are
    this rank's slice; returned indices are global."""

    sharded_parameters = ("W_enc", "b_enc", "W_dec")

    def __init__(self, d_model: int, n_latents: int, k: int, **kwargs):
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if n_latents % world_size:
            raise ValueError(f"n_latents={n_latents} must be divisible by the number of ranks "
                             f"({world_size}) to shard latents")
        super().__init__(d_model, n_latents, k, **kwargs)
        self.local_latents = n_latents // world_size
        self.offset = rank * self.local_latents
        with torch.no_grad():
            for name in self.sharded_parameters:
                parameter = getattr(self, name)
                parameter.data = parameter.data[self.offset:self.offset + self.local_latents].clone()

    def _merge(self, local_values: Tensor, local_indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Global top-k from every rank's local top-k. Candidates are laid out rank after rank, each
        rank's descending with ties to the lower index; a stable sort of the union therefore also
        breaks ties to the lower global index, as the single-process op does. Values keep their
        autograd link to this rank's own candidates (the others' are constants here)."""
        local_k = local_values.shape[1]
        candidates = all_gather_rows(local_values.detach()[None])           # (R, N, local_k)
        global_indices = all_gather_rows((local_indices + self.offset)[None])
        num_rows = local_values.shape[0]
        candidates = candidates.permute(1, 0, 2).reshape(num_rows, -1)
        global_indices = global_indices.permute(1, 0, 2).reshape(num_rows, -1)
        _, positions = topk_lower_index_ties(candidates, k)
        values = candidates.gather(1, positions)
        indices = global_indices.gather(1, positions)
        own = positions // local_k == dist.get_rank()
        own_values = local_values.gather(1, (positions - dist.get_rank() * local_k).clamp(0, local_k - 1))
        return torch.where(own, own_values, values), indices

    def _select(self, x: Tensor, dead_mask: Tensor | None):
        W_enc, b_enc, b_dec = self._cast(self.W_enc, self.b_enc, self.b_dec)
        use_aux = dead_mask is not None and self.k_aux > 0
        local_k, local_k_aux = min(self.k, self.local_latents), min(self.k_aux, self.local_latents)
        outputs = topk_encode(x, W_enc, b_enc, local_k, b_dec=_ReplicatedInput.apply(b_dec),
                              dead_mask=dead_mask if use_aux else None,
                              k_aux=local_k_aux if use_aux else 0, backend=self.backend)
        values, indices = self._merge(outputs[0], outputs[1], self.k)
        if not use_aux:
            return values, indices, None, None, None
        aux_values, aux_indices = self._merge(outputs[2], outputs[3], self.k_aux)
        return values, indices, aux_values, aux_indices, all_reduce_sum(dead_mask.sum())

    def _decode_sum(self, values: Tensor, indices: Tensor) -> Tensor:
        own = (indices >= self.offset) & (indices < self.offset + self.local_latents)
        local_indices = torch.where(own, indices - self.offset, 0)
        local_values = torch.where(own, values, 0)
        return _SumOverRanks.apply(super()._decode_sum(local_values, local_indices))

    # ---- whole tensors for checkpoints (collective: every rank must call) ----
    def gather_latent_rows(self, name: str, tensor: Tensor) -> Tensor:
        return all_gather_rows(tensor) if name in self.sharded_parameters else tensor

    def local_latent_rows(self, name: str, tensor: Tensor) -> Tensor:
        if name in self.sharded_parameters:
            return tensor[self.offset:self.offset + self.local_latents]
        return tensor
