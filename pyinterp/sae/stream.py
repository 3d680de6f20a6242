"""Streaming SAE training: a model's activations at several hookpoints, produced during training and
never stored, one SAE per hookpoint trained from the same forward passes.

A producer thread runs the model over the corpus's context windows (pyinterp/sae/corpus.py), stops
each forward after the last hookpoint (pyinterp/sae/hookpoints.py) and queues the rows, so the forward
of the next windows overlaps the SAE steps on the current ones. The rows of every hookpoint of a token
travel together through one bounded shuffle buffer of `buffer_tokens` tokens: micro-batch i takes
`batch_size` buffer slots drawn from a generator seeded with (seed, i) and refills them with the next
rows. Every hookpoint's SAE therefore sees the same tokens in the same order, the order is a pure
function of (seed, corpus, model), and the same rows given from memory (`BufferShuffle` over a list)
give the same batches. A corpus shorter than the run is read again from its start.

Each SAE is trained by its own `Trainer` in its own thread (checkpoints, metrics, dead-latent counters
and optimiser of its own, in OUT/<hookpoint>/, sparsify's layout), pulling micro-batch i of its
hookpoint; a micro-batch is dropped once every SAE has taken it. A resumed run asks for micro-batch
n first: the stream replays the model over the tokens before it (exact, at the cost of those forwards;
`pyinterp cache-activations` then `train-sae --shards` avoids the replay for long runs)."""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pyinterp.sae import corpus as corpus_module
from pyinterp.sae import hookpoints as hookpoints_module
from pyinterp.sae.data import ActivationSource

_DONE = object()


class BufferShuffle:
    """Micro-batch i of `batch_size` rows from blocks of rows (tokens, width), shuffled through a
    buffer of `buffer_tokens` rows; batches must be asked for in order (0, 1, 2, ...)."""

    def __init__(self, blocks: Iterable[torch.Tensor], batch_size: int, buffer_tokens: int, seed: int):
        if buffer_tokens < batch_size:
            raise ValueError(f"buffer_tokens={buffer_tokens} must be at least batch_size={batch_size}")
        self.blocks = blocks if hasattr(blocks, "__next__") else iter(blocks)
        self.batch_size, self.capacity, self.seed = batch_size, buffer_tokens, seed
        self.buffer: torch.Tensor | None = None
        self.filled = 0
        self.produced = 0
        self._pending = torch.empty(0)
        self.wait_seconds = 0.0
        self.batches: int | None = None  # limit(): how many micro-batches the run takes

    def limit(self, batches: int) -> None:
        """The run takes micro-batches 0 .. batches - 1: no refill after the last one, and a producer
        that can be told so (_Produced) stops after the rows they need. The batches before the limit
        are those of an unlimited stream (a refill changes only the batches after it)."""
        self.batches = batches
        if hasattr(self.blocks, "limit_rows"):
            self.blocks.limit_rows(self.capacity + (batches - 1) * self.batch_size)

    def _take(self, count: int) -> torch.Tensor:
        """Up to `count` next rows of the incoming blocks."""
        pieces, have = [], 0
        while have < count:
            if self._pending.shape[0] == 0:
                started = time.perf_counter()
                block = next(self.blocks, None)
                self.wait_seconds += time.perf_counter() - started
                if block is None:
                    break
                self._pending = block
            piece, self._pending = self._pending[:count - have], self._pending[count - have:]
            pieces.append(piece)
            have += piece.shape[0]
        return torch.cat(pieces) if pieces else torch.empty(0)

    def timing(self) -> dict[str, float]:
        """Seconds the consumers waited for rows, and the producer's seconds (when it reports them)."""
        return {"wait_s": self.wait_seconds, "forward_s": getattr(self.blocks, "forward_seconds", 0.0)}

    def next_batch(self) -> torch.Tensor:
        if self.buffer is None:
            first = self._take(self.capacity)
            if first.shape[0] < self.batch_size:
                raise ValueError(f"the stream gave {first.shape[0]} tokens, fewer than one micro-batch "
                                 f"({self.batch_size})")
            self.buffer = torch.empty((self.capacity, first.shape[1]), dtype=first.dtype)
            self.buffer[:first.shape[0]] = first
            self.filled = first.shape[0]
        if self.filled < self.batch_size:
            raise RuntimeError("the stream ended")  # the corpus cycles, so only a source error gets here
        if self.batches is not None and self.produced >= self.batches:
            raise RuntimeError(f"micro-batch {self.produced} is past the {self.batches} this stream was limited to")
        slots = np.random.default_rng([self.seed, self.produced]).choice(self.filled, self.batch_size,
                                                                        replace=False)
        slots = torch.from_numpy(np.sort(slots))
        batch = self.buffer[slots].clone()
        if self.batches is not None and self.produced == self.batches - 1:  # the last: nothing to refill
            self.produced += 1
            return batch
        fresh = self._take(self.batch_size)
        if fresh.shape[0]:
            self.buffer[slots[:fresh.shape[0]]] = fresh
        if fresh.shape[0] < self.batch_size:  # no more rows: close the holes with the buffer's tail
            holes = slots[fresh.shape[0]:].flip(0)
            for hole in holes.tolist():
                self.filled -= 1
                self.buffer[hole] = self.buffer[self.filled]
        self.produced += 1
        return batch


class _Produced:
    """The consumer's end of the producer's queue (an iterator of blocks)."""

    def __init__(self, blocks: queue.Queue, stop: threading.Event, timer: list[float], rows_limit: list):
        self.blocks, self.stop, self.timer, self._rows_limit = blocks, stop, timer, rows_limit

    @property
    def forward_seconds(self) -> float:
        return self.timer[0]

    def limit_rows(self, rows: int) -> None:
        """The producer ends after yielding `rows` rows (forwards past them would be thrown away)."""
        self._rows_limit[0] = rows

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        item = self.blocks.get()
        if item is _DONE:
            self.stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self.stop.set()
            raise RuntimeError(f"the activation producer failed: {item}") from item
        return item

    def __del__(self):
        self.stop.set()


def _producer(make_blocks: Callable[[], Iterator[torch.Tensor]], prefetch: int) -> _Produced:
    """The blocks of make_blocks(), computed in a background thread `prefetch` blocks ahead."""
    blocks: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    timer = [0.0]
    rows_limit: list[int | None] = [None]  # set by _Produced.limit_rows

    def timed(iterator):
        while True:
            started = time.perf_counter()
            block = next(iterator, None)
            timer[0] += time.perf_counter() - started
            if block is None:
                return
            yield block

    def run():
        rows = 0
        try:
            for block in timed(make_blocks()):
                while not stop.is_set():
                    try:
                        blocks.put(block, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
                rows += block.shape[0]
                if rows_limit[0] is not None and rows >= rows_limit[0]:
                    break
        except BaseException as exc:  # handed to the consumer, which raises it
            blocks.put(exc)
            return
        blocks.put(_DONE)

    thread = threading.Thread(target=run, name="pyinterp-activation-producer", daemon=True)
    thread.start()
    return _Produced(blocks, stop, timer, rows_limit)


class HookpointStream:
    """The shared stream of several hookpoints: batch(name, i) is micro-batch i of that hookpoint.
    Until start_at() says where each SAE begins (its trainer is built: b_dec initialisation reads the
    first step), every micro-batch made is kept; afterwards one is dropped once every SAE that starts
    at or before it has taken it."""

    def __init__(self, shuffle: BufferShuffle, widths: dict[str, int]):
        self.shuffle, self.widths = shuffle, widths
        offsets = np.cumsum([0] + list(widths.values()))
        self.columns = {name: (int(offsets[i]), int(offsets[i + 1])) for i, name in enumerate(widths)}
        self._cache: dict[int, tuple[torch.Tensor, set[str]]] = {}
        self._starts: dict[str, int] | None = None
        self._lock = threading.Lock()

    def _needed_by(self, index: int) -> set[str]:
        if self._starts is None:
            return {"(every consumer)"}
        return {name for name, start in self._starts.items() if start <= index}

    def start_at(self, starts: dict[str, int]) -> None:
        """starts: {consumer: its first micro-batch}; the consumers are the trainers' sources."""
        with self._lock:
            self._starts = dict(starts)
            for index in list(self._cache):
                self._cache[index] = (self._cache[index][0], set())
                if not self._needed_by(index):
                    del self._cache[index]

    def batch(self, consumer: str, index: int, names: tuple[str, ...]) -> torch.Tensor:
        """Micro-batch `index` of the hookpoints `names` side by side, for `consumer`."""
        with self._lock:
            while self.shuffle.produced <= index:
                produced = self.shuffle.produced
                rows = self.shuffle.next_batch()
                if self._needed_by(produced):
                    self._cache[produced] = (rows, set())
            if index not in self._cache:
                raise RuntimeError(f"micro-batch {index} of {consumer} was already dropped: every SAE "
                                   "takes the micro-batches in order")
            rows, taken = self._cache[index]
            if self._starts is not None:
                taken.add(consumer)
                if taken >= self._needed_by(index):
                    del self._cache[index]
            return torch.cat([rows[:, slice(*self.columns[name])] for name in names], dim=1)


class StreamedHookpoint(ActivationSource):
    """Hookpoints of a HookpointStream as an activation source for Trainer: one hookpoint's rows, or
    for a transcoder (pyinterp/nn/transcoder.py) its input's rows beside its target's."""

    def __init__(self, stream: HookpointStream, names: tuple[str, ...], identity: dict, batch_size: int,
                 seed: int, shard: tuple[int, int] = (0, 1)):
        self.stream, self.names, self._identity = stream, tuple(names), identity
        self.batch_size, self.seed, self.shard = batch_size, seed, shard
        self.name = " -> ".join(self.names)
        self.d_model = sum(stream.widths[name] for name in self.names)
        self.num_tokens = 0  # unbounded

    def paired_with(self, target: "StreamedHookpoint") -> "StreamedHookpoint":
        """A transcoder's source: this hookpoint's rows, then the target's, from the same tokens."""
        if target.stream is not self.stream:
            raise ValueError("a transcoder's input and target must come from one stream (streamed_sources)")
        return StreamedHookpoint(self.stream, self.names + target.names, self._identity, self.batch_size,
                                 self.seed, self.shard)

    def joined(self, names: tuple[str, ...]) -> "StreamedHookpoint":
        """The rows of several hookpoints of this stream side by side, in the order given (a
        cross-layer transcoder's inputs, then its targets: pyinterp/nn/cross_layer_transcoder.py)."""
        return StreamedHookpoint(self.stream, tuple(names), self._identity, self.batch_size, self.seed)

    def shuffled(self, batch_size: int, seed: int) -> "StreamedHookpoint":
        if (batch_size, seed) != (self.batch_size, self.seed):
            raise ValueError(f"the stream of {self.name} was built for batch_size={self.batch_size}, "
                             f"seed={self.seed}; the trainer asks for batch_size={batch_size}, seed={seed}")
        return self

    def local_index(self, index: int) -> int:
        """Global micro-batch `index` (the trainer's: step-major, then data-parallel rank) in this
        rank's stream, which holds the micro-batches rank, rank + world, ..."""
        rank, world = self.shard
        if index % world != rank:
            raise ValueError(f"micro-batch {index} belongs to data-parallel rank {index % world}, not to this "
                             f"stream's rank {rank} of {world}")
        return index // world

    def batch(self, index: int) -> torch.Tensor:
        return self.stream.batch(self.name, self.local_index(index), self.names)

    def describe(self) -> str:
        return (f"{self.name} of {self._identity['model']} streamed over {self._identity['corpus']} "
                f"(context {self._identity['context_length']})")

    def identity(self) -> dict:
        return dict(self._identity, hookpoints=list(self.names))


def model_blocks(model, tokenizer, corpus: str, points, *, context_length: int, exclude_first: bool,
                 batch_windows: int, text_column: str = "text",
                 shard: tuple[int, int] = (0, 1)) -> Callable[[], Iterator[torch.Tensor]]:
    """A factory of the (tokens, sum of widths) row blocks of the model over the corpus, cycling it.
    shard (rank, world): only the blocks rank, rank + world, ... of batch_windows windows each (the
    others are tokenised and skipped, never run through the model)."""
    device = next(model.parameters()).device
    rank, world = shard

    def blocks():
        number = itertools.count()
        for _ in itertools.count():
            windows = corpus_module.context_windows(corpus_module.documents(corpus, text_column), tokenizer,
                                                    context_length)
            any_window = False
            while True:
                batch = list(itertools.islice(windows, batch_windows))
                if not batch:
                    break
                any_window = True
                if next(number) % world != rank:
                    continue
                ids = torch.stack(batch).to(device)
                acts = hookpoints_module.capture(model, points, input_ids=ids, attention_mask=torch.ones_like(ids))
                first = 1 if exclude_first else 0
                yield torch.cat([a[:, first:].reshape(-1, a.shape[-1]).float().cpu() for a in acts.values()], dim=1)
            if not any_window:
                raise ValueError(f"corpus: {corpus} gives no window of {context_length} tokens")
    return blocks


def streamed_sources(model, tokenizer, corpus: str, points, *, batch_size: int, seed: int,
                     context_length: int, exclude_first: bool = False, buffer_tokens: int = 65536,
                     batch_windows: int = 8, prefetch: int = 4, model_name: str = "",
                     text_column: str = "text", shard: tuple[int, int] = (0, 1)) -> dict[str, StreamedHookpoint]:
    """{hookpoint name: source} over one shared stream (see the module's docstring). shard (rank,
    world): data parallelism, this rank's stream runs the model over blocks rank, rank + world, ...
    of the corpus's windows and gives the trainer's micro-batches rank, rank + world, ..."""
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard: rank {rank} is not one of the {world} ranks")
    corpus_module.WindowSpec(context_length, exclude_first).check(corpus_module.model_max_positions(model))
    probe = hookpoints_module.capture(model, points, input_ids=torch.ones(1, 2, dtype=torch.long,
                                                                              device=next(model.parameters()).device))
    widths = {name: int(tensor.shape[-1]) for name, tensor in probe.items()}
    make_blocks = model_blocks(model, tokenizer, corpus, points, context_length=context_length,
                               exclude_first=exclude_first, batch_windows=batch_windows,
                               text_column=text_column, shard=shard)
    stream = HookpointStream(BufferShuffle(_producer(make_blocks, prefetch), batch_size, buffer_tokens, seed),
                             widths)
    identity = {"model": model_name or type(model).__name__, "corpus": str(corpus),
                "text_column": text_column, "context_length": context_length,
                "exclude_first": exclude_first, "buffer_tokens": buffer_tokens}
    return {name: StreamedHookpoint(stream, (name,), identity, batch_size, seed, shard) for name in widths}


class _Turns:
    """The SAE steps of one stream take turns, in a fixed round-robin order of the trainers still
    running: steps at once would only contend for the same cores (on a CPU, for OpenMP's thread
    pools; the producer's forward is what overlaps them), and with data parallelism every rank then
    steps its SAEs in the same order, so their collectives pair up. (Splitting a CPU's threads
    between the producer and the steps was slower: the steps are most of the work, see
    docs/SAE_TRAINING.md.)"""

    def __init__(self, names: list[str]):
        self.order, self.position = list(names), 0
        self.changed = threading.Condition()

    def turn(self, name: str):
        turns = self

        class Turn:
            def __enter__(self):
                with turns.changed:
                    turns.changed.wait_for(lambda: turns.order[turns.position] == name)

            def __exit__(self, *exc):
                with turns.changed:
                    turns.position = (turns.position + 1) % len(turns.order)
                    turns.changed.notify_all()
        return Turn()

    def leave(self, name: str) -> None:
        with self.changed:
            index = self.order.index(name)
            self.order.remove(name)
            if index < self.position:
                self.position -= 1
            if self.order:
                self.position %= len(self.order)
            self.changed.notify_all()


def train_streaming(sources: dict[str, StreamedHookpoint], make_trainer) -> dict[str, dict]:
    """Train one SAE (or transcoder) per source, each Trainer (make_trainer(name, source)) in its own
    thread, all from the shared stream; returns {name: last metrics}. An error in any stops the run."""
    streams = {id(source.stream): source.stream for source in sources.values()}
    if len(streams) != 1:
        raise ValueError("train_streaming: the sources must share one stream (streamed_sources)")
    shared = next(iter(streams.values()))
    trainers = {name: make_trainer(name, source) for name, source in sources.items()}
    for name, trainer in trainers.items():
        shard = (trainer.context.data_rank, trainer.context.data_parallel_size)
        if shard != sources[name].shard:
            raise ValueError(f"train_streaming: the trainer of {name} is data-parallel rank {shard[0]} of "
                             f"{shard[1]} but its stream is shard {sources[name].shard[0]} of "
                             f"{sources[name].shard[1]} (streamed_sources(shard=...))")
    shared.start_at({sources[name].name: sources[name].local_index(trainer._micro_batch_index(trainer.step, 0))
                     for name, trainer in trainers.items()})
    shared.shuffle.limit(max(sources[name].local_index(trainer._micro_batch_index(trainer.total_steps, 0))
                             for name, trainer in trainers.items()))
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    turns = _Turns(list(trainers))
    for name, trainer in trainers.items():
        trainer.step_guard = turns.turn(name)

    def run(name, trainer):
        try:
            results[name] = trainer.train()
        except BaseException as exc:
            errors.append(exc)
        finally:
            turns.leave(name)

    threads = [threading.Thread(target=run, args=item, name=f"pyinterp-train-{item[0]}") for item in trainers.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def timed_pipeline(sources: dict[str, StreamedHookpoint]):
    """Around a streamed run: yields a dict that, at the end, holds the run's seconds, the producer's
    forward seconds (in its thread: they overlap the rest), the seconds the SAE steps waited for data,
    and the rest of the run (SAE steps, the trainers' set-up and bookkeeping)."""
    shuffle = next(iter(sources.values())).stream.shuffle
    timing: dict[str, float] = {}
    started = time.perf_counter()
    try:
        yield timing
    finally:
        seconds = time.perf_counter() - started
        parts = shuffle.timing()
        timing.update(seconds=seconds, forward_s=parts["forward_s"], wait_s=parts["wait_s"],
                      sae_steps_s=max(seconds - parts["wait_s"], 0.0))


def describe_timing(timing: dict[str, float]) -> str:
    share = lambda key: f"{timing[key]:.1f} s ({timing[key] / max(timing['seconds'], 1e-9):.0%})"  # noqa: E731
    return (f"model forward {share('forward_s')} in the producer thread, SAE steps {share('sae_steps_s')}, "
            f"waiting for data {share('wait_s')}")


def hookpoints_of_rank(names: list[str], rank: int, world_size: int) -> list[str]:
    """With several processes, rank r trains hookpoints r, r + world, ... (each runs its own forward)."""
    mine = names[rank::world_size]
    if not mine:
        raise ValueError(f"{world_size} processes but only {len(names)} hookpoints: every rank needs one")
    return mine


def cross_layer_points(model, pattern: str) -> tuple[list, list]:
    """`--clt PATTERN`: (inputs, outputs) hookpoints of the modules the glob names, in model order;
    the inputs all of one width and the outputs too (checked by the caller on the probe)."""
    outputs = hookpoints_module.resolve(model, [pattern])
    inputs = hookpoints_module.resolve(model, [pattern + hookpoints_module.INPUT_SUFFIX])
    return inputs, outputs


def clt_job_name(pattern: str) -> str:
    """The job (and output folder) of `--clt PATTERN`: clt-<pattern> with its wildcards spelt out."""
    return "clt-" + pattern.replace("**", "all").replace("*", "all").replace("?", "any")


def run_streaming(args) -> int:
    """`pyinterp train-sae --corpus ...`: one SAE per hookpoint (and one transcoder per --transcode) in
    OUT/<hookpoint>/, and with --clt one cross-layer transcoder over the matched modules in
    OUT/clt-<pattern>/, streamed from the model; with torchrun, the jobs are spread over ranks, or
    with --parallel ddp every rank trains every job on its own part of the corpus."""
    import os
    import sys

    from pyinterp.cli import CommandError, check_writable_folder, report
    from pyinterp.nn import CrossLayerTranscoder, TopKTranscoder
    from pyinterp.sae.cache import folder_name, load_model
    from pyinterp.sae.checkpoint import MANIFEST, CheckpointError
    from pyinterp.sae.cli import COMMAND, _check_arguments, _check_backend, _check_disk_space, _device, sae_options
    from pyinterp.sae.distributed import ParallelContext, parallel_context
    from pyinterp.sae.sinks import MissingPackageError, check_sinks, make_sinks
    from pyinterp.sae.trainer import METRICS_FILE, NonFiniteError, TrainConfig, Trainer, build_sae

    try:
        _check_arguments(args)
        if args.shards:
            raise CommandError("--corpus streams from a model; --shards trains on cached activations: give one")
        if args.parallel == "latents":
            raise CommandError("--corpus with --parallel latents is not supported: --parallel ddp (every rank "
                               "streams its own part of the corpus) or none (the hookpoints are spread over "
                               "the ranks)")
        if not args.hookpoints and args.layers is None and not args.transcode and not args.clt:
            raise CommandError("--corpus needs --hookpoints, --layers, --transcode or --clt")
        if not Path(args.corpus).exists():
            raise CommandError(f"--corpus {args.corpus} does not exist")
        check_sinks(args.log_to)
        device = _device(args.device)
        _check_backend(args.backend, device)
        out = check_writable_folder("--out", args.out)
        if args.parallel == "ddp":
            context = parallel_context("ddp")
            rank, world, shard = context.rank, context.world_size, (context.rank, context.world_size)
        else:  # the ranks train disjoint hookpoints and never talk: torchrun's variables are all they need
            context = ParallelContext()
            rank, world, shard = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), (0, 1)
        model, tokenizer, model_name = load_model(args.model, "fp32", str(device), args.device_map)
        pairs = []
        for item in args.transcode or []:
            if "=" not in item:
                raise CommandError(f"--transcode {item!r}: give IN=OUT")
            pairs.append(tuple(item.split("=", 1)))
        plain = hookpoints_module.resolve(model, args.hookpoints, args.layers) if (
            args.hookpoints or args.layers is not None) else []
        ends = hookpoints_module.resolve(model, [name for pair in pairs for name in pair]) if pairs else []
        clt_ins, clt_outs = cross_layer_points(model, args.clt) if args.clt else ([], [])
        points = list({p.name: p for p in plain + ends + clt_ins + clt_outs}.values())
        sources = streamed_sources(model, tokenizer, args.corpus, points, batch_size=args.batch_size,
                                   seed=args.seed, context_length=args.context_length,
                                   exclude_first=args.exclude_first_token, buffer_tokens=args.buffer_tokens,
                                   model_name=model_name, text_column=args.text_column, shard=shard)
        jobs = {p.name: sources[p.name] for p in plain}
        jobs.update({f"{a}={b}": sources[a].paired_with(sources[b]) for a, b in pairs})
        clt_job = clt_job_name(args.clt) if args.clt else None
        if clt_job:
            widths = {p.name: sources[p.name].d_model for p in clt_ins + clt_outs}
            for group in (clt_ins, clt_outs):
                if len({widths[p.name] for p in group}) > 1:
                    raise CommandError(f"--clt {args.clt}: the hookpoints differ in width ("
                                       + ", ".join(f"{p.name}: {widths[p.name]}" for p in group) + ")")
            jobs[clt_job] = sources[clt_ins[0].name].joined(tuple(p.name for p in clt_ins + clt_outs))
            clt_shape = (len(clt_ins), widths[clt_ins[0].name], widths[clt_outs[0].name])  # L, d_in, d_out
        if context.mode == "none":
            jobs = {name: jobs[name] for name in hookpoints_of_rank(list(jobs), rank, world)}
        config = TrainConfig(tokens=args.tokens, batch_size=args.batch_size,
                             grad_accumulation=args.grad_accumulation, lr=args.lr,
                             dead_after_tokens=args.dead_after_tokens, precision=args.precision,
                             log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                             seed=args.seed, nonfinite=args.nonfinite, progress=False)
        # A run killed early may have checkpointed some SAEs and not yet others: those start again
        # from step 0, which is what the uninterrupted run did with them.
        resuming = {name: args.resume and (out / folder_name(name) / MANIFEST).is_file() for name in jobs}
        if args.resume and not any(resuming.values()):
            raise CommandError(f"--resume: no checkpoint in {out}/<hookpoint>/ for any of {', '.join(jobs)}")
        for name in jobs:
            folder = out / folder_name(name)
            if args.resume and not resuming[name] and context.is_main:
                print(f"rank {rank}: {name} has no checkpoint yet: it starts from step 0")
                (folder / METRICS_FILE).unlink(missing_ok=True)
            if name == clt_job:  # L*M latents and L*M*d_in + L(L+1)/2*M*d_out parameters
                layers, d_in, d_out = clt_shape
                _check_disk_space(out, args.latents * layers, -(-(d_in + (layers + 1) * d_out // 2) // 2))
            else:
                _check_disk_space(out, args.latents, jobs[name].d_model)

        def make_trainer(name, source):
            if name == clt_job:
                sae = CrossLayerTranscoder(*clt_shape, args.latents, args.k, backend=args.backend, aux_alpha=args.aux_alpha, seed=args.seed,
                                           device=device, **({} if args.k_aux is None else {"k_aux": args.k_aux}))
            elif "=" in name:
                a, b = name.split("=", 1)
                sae = TopKTranscoder(sources[a].d_model, sources[b].d_model, args.latents, args.k,
                                     skip_connection=args.skip_connection, backend=args.backend,
                                     aux_alpha=args.aux_alpha, seed=args.seed, device=device,
                                     **({} if args.k_aux is None else {"k_aux": args.k_aux}))
            else:
                k, options = sae_options(args)
                sae = build_sae(args.architecture, source.d_model, args.latents, k, device=device,
                                backend=args.backend, seed=args.seed, **options)
            # Each SAE's collectives on a process group of its own: its trainer runs in a thread.
            return Trainer(sae, source, config, out / folder_name(name), resume=resuming[name],
                           allow_changes=args.allow_changes, context=context.with_own_group(),
                           sinks=make_sinks(args.log_to, out, folder_name(name)) if context.is_main else [])

        print(f"rank {rank}: streaming {model_name} over {args.corpus} into {len(jobs)} SAEs: {', '.join(jobs)}")
        with timed_pipeline(jobs) as timing:
            results = train_streaming(jobs, make_trainer)
    except (CommandError, CheckpointError, ValueError, FileNotFoundError, MissingPackageError) as exc:
        return report(COMMAND, exc)
    except (NonFiniteError, RuntimeError, OSError) as exc:
        print(f"pyinterp {COMMAND}: error: {exc}; the last committed checkpoints in {args.out} are intact "
              "(--resume continues from them)", file=sys.stderr)
        return 1
    context.close()
    if not context.is_main:
        return 0
    from pyinterp.sae.curves import plot_training_curves

    png = plot_training_curves({name: out / folder_name(name) for name in jobs},
                               out / f"training_curves{f'-rank{rank}' if world > 1 and context.mode == 'none' else ''}.png")
    seconds = timing["seconds"]
    print(f"{config.tokens} tokens per SAE in {seconds:.1f} s ({config.tokens / seconds:,.0f} tok/s of the "
          f"pipeline); {describe_timing(timing)}")
    for name, metrics in results.items():
        fvu, l0 = metrics.get("fvu"), metrics.get("l0")
        print(f"  {name}: FVU {fvu if fvu is None else round(fvu, 4)}, L0 {l0 if l0 is None else round(l0, 1)}, "
              f"dead {metrics.get('dead_fraction', 0):.2%}; saved in {out / folder_name(name)}")
    print(f"training curves: {png}")
    return 0
