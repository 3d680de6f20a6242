"""Activation sources for SAE training and the shuffled stream of micro-batches drawn from them.

A source is a table of token activations (tokens, d_model) with random row access: in memory
(harvested from a model through a forward hook) or memory-mapped shards on disk (.safetensors or
.npy). The stream's order is a pure function of (seed, micro-batch number), so resuming a run or
splitting micro-batches across ranks needs no saved iterator state."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

SHARD_SUFFIXES = (".safetensors", ".npy")
_SAFETENSORS_DTYPES = {"F32": (np.float32, None), "F64": (np.float64, None), "F16": (np.float16, None),
                       "BF16": (np.uint16, torch.bfloat16)}  # numpy has no bf16: read the bits


class ActivationSource:
    """Rows of a (num_tokens, d_model) activation table; rows(i) returns float32 (len(i), d_model)."""
    num_tokens: int
    d_model: int

    def rows(self, token_indices: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def identity(self) -> dict:
        """What a checkpoint records of its source (JSON): resuming on a source with another
        identity is refused unless asked for."""
        raise NotImplementedError

    def shuffled(self, batch_size: int, seed: int):
        """The stream of micro-batches a Trainer draws: anything with batch(i) -> (batch_size, d_model)."""
        return ShuffledStream(self, batch_size, seed=seed)


class TensorSource(ActivationSource):
    """identity: how the activations were made (harvest_model_activations passes its recipe);
    None: the SHA-256 of the values."""

    def __init__(self, activations: torch.Tensor, description: str = "in-memory activations",
                 identity: dict | None = None):
        if activations.dim() != 2 or activations.shape[0] == 0:
            raise ValueError(f"activations must be a non-empty (tokens, d_model) tensor, "
                             f"got shape {tuple(activations.shape)}")
        self.activations = activations.float().cpu()
        self.num_tokens, self.d_model = self.activations.shape
        self.description = description
        self._identity = identity

    def identity(self) -> dict:
        if self._identity is None:
            values = self.activations.contiguous().numpy()
            self._identity = {"tensor_sha256": hashlib.sha256(values.data).hexdigest()}
        return {"tokens": self.num_tokens, "d_model": self.d_model, **self._identity}

    def rows(self, token_indices: np.ndarray) -> torch.Tensor:
        return self.activations[torch.from_numpy(token_indices)]

    def describe(self) -> str:
        return f"{self.description} ({self.num_tokens} tokens x {self.d_model})"


def _memmap_safetensors(path: Path) -> tuple[np.memmap, torch.dtype | None]:
    """The single 2-D tensor of a safetensors file, memory-mapped (header: u64 length + JSON)."""
    with open(path, "rb") as handle:
        header_bytes = handle.read(8)
        if len(header_bytes) != 8:
            raise ValueError("file too short for a safetensors header")
        (header_length,) = struct.unpack("<Q", header_bytes)
        if header_length > 100_000_000:
            raise ValueError("implausible safetensors header length")
        header = json.loads(handle.read(header_length))
    header.pop("__metadata__", None)
    if len(header) != 1:
        raise ValueError(f"expected exactly one tensor, found {len(header)} ({', '.join(header)})")
    (name, info), = header.items()
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {info['dtype']}; expected one of "
                         f"{', '.join(_SAFETENSORS_DTYPES)}")
    numpy_dtype, torch_view = _SAFETENSORS_DTYPES[info["dtype"]]
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if len(shape) != 2 or end - start != np.prod(shape) * np.dtype(numpy_dtype).itemsize:
        raise ValueError(f"tensor {name!r} must be 2-D (tokens, d_model) and whole, got shape {shape}")
    if 8 + header_length + end > path.stat().st_size:
        raise ValueError("file is truncated")
    return np.memmap(path, dtype=numpy_dtype, mode="r", offset=8 + header_length + start, shape=shape), torch_view


class ShardSource(ActivationSource):
    """Every *.safetensors / *.npy file of a folder (sorted by name), each one 2-D (tokens, d_model)
    tensor of a float dtype, memory-mapped: only the rows a batch needs are read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"shards: {self.folder} is not a folder")
        paths = sorted(p for p in self.folder.iterdir() if p.suffix in SHARD_SUFFIXES)
        if not paths:
            raise ValueError(f"shards: {self.folder} holds no {' or '.join(SHARD_SUFFIXES)} files")
        self.shards, self.views = [], []
        for path in paths:
            try:
                if path.suffix == ".npy":
                    array, view = np.load(path, mmap_mode="r"), None
                    if array.ndim != 2 or array.dtype.kind != "f":
                        raise ValueError(f"expected a 2-D float array, got shape {array.shape} "
                                         f"dtype {array.dtype}")
                else:
                    array, view = _memmap_safetensors(path)
            except Exception as exc:
                raise ValueError(f"shards: cannot read {path} as an activation shard: {exc}") from exc
            self.shards.append(array)
            self.views.append(view)
        widths = {array.shape[1] for array in self.shards}
        if len(widths) != 1:
            raise ValueError(f"shards: files in {self.folder} disagree on d_model: "
                             + ", ".join(f"{p.name}: {a.shape[1]}" for p, a in zip(paths, self.shards)))
        self.paths = paths
        self._identity: dict | None = None
        self.d_model = widths.pop()
        self.offsets = np.cumsum([0] + [array.shape[0] for array in self.shards])
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens == 0:
            raise ValueError(f"shards: the files in {self.folder} hold no tokens")

    def rows(self, token_indices: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(token_indices), self.d_model)
        order = np.argsort(token_indices, kind="stable")  # sorted reads are sequential on disk
        sorted_indices = token_indices[order]
        shard_of = np.searchsorted(self.offsets, sorted_indices, side="right") - 1
        for shard in np.unique(shard_of):
            selected = shard_of == shard
            local = sorted_indices[selected] - self.offsets[shard]
            block = torch.from_numpy(np.ascontiguousarray(self.shards[shard][local]))
            if self.views[shard] is not None:
                block = block.view(self.views[shard])
            out[torch.from_numpy(order[selected])] = block.float()
        return out

    def identity(self) -> dict:
        """Each file's name, shape, dtype and size, and a hash of its first and last MiB (reading
        every shard at each start would cost as much as an epoch); computed once."""
        if self._identity is None:
            self._identity = self._fingerprint()
        return self._identity

    def _fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for path in self.paths:
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(path.stat().st_size - (1 << 20), 0))
                digest.update(handle.read())
        return {"tokens": self.num_tokens, "d_model": self.d_model,
                "files": [[p.name, list(a.shape), str(a.dtype), p.stat().st_size]
                          for p, a in zip(self.paths, self.shards)],
                "sample_sha256": digest.hexdigest()}

    def describe(self) -> str:
        return f"{len(self.paths)} shards in {self.folder} ({self.num_tokens} tokens x {self.d_model})"


def harvest_model_activations(layer: int | str, *, model=None, tokenizer=None, texts: list[str] | None = None,
                              batch_size: int = 32) -> TensorSource:
    """Activations of a SentenceTransformer (default: the embedded all-MiniLM-L6-v2), or of a Hugging
    Face model with its tokenizer, at `layer` for `texts` (default: the standard library's
    docstrings), through a forward hook (models.py)."""
    from pyinterp import models

    model = models.load_default_model() if model is None else model
    texts = models.docstring_sentences(10**6, models.TRAINING_DOC_MODULES) if texts is None else texts
    if not texts:
        raise ValueError("texts: no text to run the model on")
    # Similar lengths share a batch, so little compute goes to padding (the stream shuffles anyway).
    by_length = sorted(texts, key=len)
    activations = models.hooked_activations(model, by_length, layer, batch_size=batch_size, tokenizer=tokenizer)
    transformer, _ = models.transformer_and_tokenizer(model, tokenizer)
    name = Path(str(getattr(getattr(transformer, "config", None), "_name_or_path", "") or "")).name
    recipe = {"model": f"{type(transformer).__name__} {name}".strip(), "layer": layer, "texts": len(texts),
              "texts_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest()}
    return TensorSource(activations, f"layer {layer} of {type(transformer).__name__} on {len(texts)} texts",
                        identity=recipe)


class ShuffledStream:
    """Micro-batch number i (i = 0, 1, ...) of `batch_size` rows, epoch after epoch. Each epoch
    permutes blocks of `block_tokens` consecutive tokens, then shuffles tokens within windows of
    `window_blocks` blocks: a uniform shuffle when the source fits in one window, and bounded
    memory for any source size."""

    def __init__(self, source: ActivationSource, batch_size: int, seed: int = 0,
                 block_tokens: int = 4096, window_blocks: int = 64):
        if batch_size > source.num_tokens:
            raise ValueError(f"batch_size={batch_size} is larger than the activation source "
                             f"({source.describe()})")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.block_tokens, self.window_blocks = block_tokens, window_blocks
        self.batches_per_epoch = source.num_tokens // batch_size
        self.full_blocks = source.num_tokens // block_tokens
        self._cached_window: tuple[tuple[int, int], np.ndarray] | None = None

    def _window(self, epoch: int, window: int) -> np.ndarray:
        if self._cached_window is None or self._cached_window[0] != (epoch, window):
            # The one partial block (if any) stays last, so every window but the last is full.
            block_order = np.random.default_rng([self.seed, epoch]).permutation(self.full_blocks)
            if self.source.num_tokens % self.block_tokens:
                block_order = np.append(block_order, self.full_blocks)
            blocks = block_order[window * self.window_blocks:(window + 1) * self.window_blocks]
            tokens = np.concatenate([np.arange(b * self.block_tokens,
                                               min((b + 1) * self.block_tokens, self.source.num_tokens))
                                     for b in blocks])
            shuffled = tokens[np.random.default_rng([self.seed, epoch, window]).permutation(len(tokens))]
            self._cached_window = ((epoch, window), shuffled)
        return self._cached_window[1]

    def token_indices(self, index: int) -> np.ndarray:
        epoch, batch = divmod(index, self.batches_per_epoch)
        window_tokens = self.block_tokens * self.window_blocks
        start, stop = batch * self.batch_size, (batch + 1) * self.batch_size
        pieces = []
        while start < stop:  # a batch may straddle two windows
            window, offset = divmod(start, window_tokens)
            take = min(stop - start, window_tokens - offset)
            pieces.append(self._window(epoch, window)[offset:offset + take])
            start += take
        return np.concatenate(pieces)

    def batch(self, index: int) -> torch.Tensor:
        return self.source.rows(self.token_indices(index))
