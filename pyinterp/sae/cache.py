"""`pyinterp cache-activations`: a Hugging Face model's activations at one or more hookpoints over a
text corpus, written as sharded safetensors with a manifest, resumable after a kill.

Layout of OUT: manifest.json, and one folder per hookpoint (its name with '/' and ':' made safe), each
holding shard-00000.safetensors, shard-00001.safetensors, ... with one (tokens, d_model) tensor each:
exactly what `pyinterp train-sae --shards OUT/<hookpoint>` reads. Window i of the corpus lands in the
same shard and row in every run, so a resumed cache equals an uninterrupted one bit for bit: a shard
enters the manifest only after every hookpoint's file of it is on disk (atomic renames), and a resume
recomputes every shard the manifest does not list."""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pyinterp.sae import corpus as corpus_module
from pyinterp.sae import hookpoints as hookpoints_module
from pyinterp._atomic import atomic_write_json, atomic_write_safetensors

HELP = "cache a Hugging Face model's activations at hookpoints over a text corpus as safetensors shards"
MANIFEST = "manifest.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def folder_name(hookpoint: str) -> str:
    return hookpoint.replace("/", "_").replace(":", "-")


@dataclass
class Manifest:
    """What the cache holds; the settings must match for a resume to continue it."""
    model: str
    corpus: str
    text_column: str
    hookpoints: list[str]
    context_length: int
    exclude_first: bool
    dtype: str
    windows_per_shard: int
    tokens: int
    d_model: dict[str, int] = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    complete: bool = False

    SETTINGS = ("model", "corpus", "text_column", "hookpoints", "context_length", "exclude_first", "dtype",
                "windows_per_shard")

    @property
    def windows_done(self) -> int:
        return sum(shard["windows"] for shard in self.shards)

    @property
    def tokens_done(self) -> int:
        return sum(shard["tokens"] for shard in self.shards)

    def write(self, out: Path) -> None:
        atomic_write_json(out / MANIFEST, asdict(self))

    @classmethod
    def read(cls, out: Path) -> "Manifest | None":
        import json

        path = out / MANIFEST
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cache-activations: {path} is not a manifest of this cache ({exc})") from None


def _open(out: Path, wanted: Manifest, overwrite: bool) -> Manifest:
    existing = Manifest.read(out)
    if existing is None or overwrite:
        return wanted
    differ = [name for name in Manifest.SETTINGS if getattr(existing, name) != getattr(wanted, name)]
    if differ:
        details = "; ".join(f"{name}: cache {getattr(existing, name)!r}, asked {getattr(wanted, name)!r}"
                            for name in differ)
        raise ValueError(f"cache-activations: {out} holds another cache ({details}); use another --out "
                         "or --overwrite")
    existing.tokens = wanted.tokens  # a resume may ask for more (or fewer) tokens
    existing.complete = existing.complete and existing.tokens_done >= wanted.tokens
    return existing


def cache_activations(model, tokenizer, corpus: str | Path, points, out: str | Path, *, tokens: int,
                      context_length: int, exclude_first: bool = False, dtype: str = "bf16",
                      windows_per_shard: int = 64, batch_windows: int = 8, text_column: str = "text",
                      model_name: str = "", overwrite: bool = False, log=print) -> Manifest:
    """Run `model` over the corpus's context windows and write the activations of `points`
    (hookpoints.resolve) to OUT until `tokens` activation rows per hookpoint are cached (or the corpus
    ends); continue a cache already in OUT with the same settings."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value, low in (("tokens", tokens, 1), ("windows_per_shard", windows_per_shard, 1),
                             ("batch_windows", batch_windows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    spec = corpus_module.WindowSpec(context_length, exclude_first)
    spec.check(corpus_module.model_max_positions(model))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = Manifest(model=model_name or type(model).__name__, corpus=str(Path(corpus).resolve()),
                      text_column=text_column, hookpoints=[p.name for p in points],
                      context_length=context_length, exclude_first=exclude_first, dtype=dtype,
                      windows_per_shard=windows_per_shard, tokens=tokens)
    manifest = _open(out, wanted, overwrite)
    if manifest is wanted:
        manifest.shards = []
    for stale in out.rglob(".shard-*.tmp-*"):  # left by a kill inside a write
        stale.unlink(missing_ok=True)
    device = next(model.parameters()).device
    windows = corpus_module.context_windows(corpus_module.documents(corpus, text_column), tokenizer,
                                            context_length)
    windows = itertools.islice(windows, manifest.windows_done, None)
    started, cached_before = time.perf_counter(), manifest.tokens_done
    while manifest.tokens_done < tokens:
        shard_windows = list(itertools.islice(windows, windows_per_shard))
        if not shard_windows:
            break
        rows: dict[str, list[torch.Tensor]] = {p.name: [] for p in points}
        for start in range(0, len(shard_windows), batch_windows):
            ids = torch.stack(shard_windows[start:start + batch_windows]).to(device)
            acts = hookpoints_module.capture(model, points, input_ids=ids,
                                             attention_mask=torch.ones_like(ids))
            for name, tensor in acts.items():
                tensor = tensor[:, 1:] if exclude_first else tensor
                rows[name].append(tensor.reshape(-1, tensor.shape[-1]).to(DTYPES[dtype]).cpu())
        index = len(manifest.shards)
        for point in points:
            table = torch.cat(rows[point.name])
            manifest.d_model[point.name] = int(table.shape[1])
            folder = out / folder_name(point.name)
            folder.mkdir(exist_ok=True)
            atomic_write_safetensors(folder / f"shard-{index:05d}.safetensors", {"activations": table})
        manifest.shards.append({"file": f"shard-{index:05d}.safetensors", "windows": len(shard_windows),
                                "tokens": len(shard_windows) * spec.tokens_per_window})
        manifest.write(out)
        elapsed = time.perf_counter() - started
        rate = (manifest.tokens_done - cached_before) / max(elapsed, 1e-9)
        log(f"cache-activations: shard {index} written, {manifest.tokens_done} tokens per hookpoint "
            f"({rate:,.0f} tok/s)")
    manifest.complete = manifest.tokens_done >= tokens
    manifest.write(out)
    if not manifest.complete:
        log(f"cache-activations: the corpus ended after {manifest.tokens_done} tokens (asked {tokens})")
    return manifest


def load_model(name_or_path: str, dtype: str = "fp32", device: str = "cpu", device_map: str | None = None):
    """(model, tokenizer, name) for a Hugging Face id or local path, or the embedded default
    all-MiniLM-L6-v2 ('default'); never downloads when HF_HUB_OFFLINE is set. device_map (e.g.
    "auto") is transformers' from_pretrained's, for a model larger than one device: the layers are
    spread over the devices (it needs accelerate) and `device` is not used."""
    import importlib.util

    from pyinterp import models

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if device_map is not None:
        if name_or_path == "default":
            raise ValueError("--device-map: the embedded all-MiniLM-L6-v2 fits one device; it applies to "
                             "a Hugging Face model given with --model")
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(f"--device-map {device_map} needs the accelerate package (pip install accelerate)")
    if name_or_path == "default":
        sentence_model = models.load_default_model(device)
        transformer, tokenizer = models.transformer_and_tokenizer(sentence_model)
        return transformer.to(torch_dtype), tokenizer, "all-MiniLM-L6-v2"
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    auto = (transformers.AutoModelForCausalLM if getattr(config, "is_decoder", False)
            or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or [])
            else transformers.AutoModel)
    if device_map is not None:
        return auto.from_pretrained(name_or_path, dtype=torch_dtype, device_map=device_map).eval(), tokenizer, \
            name_or_path
    model = auto.from_pretrained(name_or_path, dtype=torch_dtype).to(device).eval()
    return model, tokenizer, name_or_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="Hugging Face model id or local folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--corpus", required=True,
                        help="a .txt / .jsonl / .parquet file, a folder of them, or a dataset saved with "
                             "datasets' save_to_disk")
    parser.add_argument("--text-column", default="text", help="the text field of JSONL / Parquet / datasets")
    parser.add_argument("--hookpoints", nargs="*", default=None,
                        help="module paths, globs allowed, ':input' for a module's input "
                             "(e.g. 'model.layers.*.mlp')")
    parser.add_argument("--layers", default=None,
                        help="layer numbers as train-sae --layer counts them (0 = embeddings, i = output of "
                             "block i), e.g. 0-11 or 3,6")
    parser.add_argument("--out", required=True, help="output folder (resumed when it holds this cache)")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="activation rows per hookpoint")
    parser.add_argument("--context-length", type=int, default=128, help="tokens per window (BOS included)")
    parser.add_argument("--exclude-first-token", action="store_true",
                        help="drop the first position of every window (BOS), as SAE papers do")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="stored dtype (default bf16)")
    parser.add_argument("--model-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--windows-per-shard", type=int, default=64)
    parser.add_argument("--batch-windows", type=int, default=8, help="windows per model forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--device-map", default=None,
                        help="transformers' device_map (e.g. auto) for a model larger than one device; "
                             "needs accelerate")
    parser.add_argument("--overwrite", action="store_true", help="start over even if OUT holds another cache")


def run(args) -> int:
    import sys

    try:
        if not Path(args.corpus).exists():
            raise ValueError(f"--corpus {args.corpus} does not exist")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here")
        model, tokenizer, name = load_model(args.model, args.model_dtype, args.device, args.device_map)
        points = hookpoints_module.resolve(model, args.hookpoints, args.layers)
        cache_activations(model, tokenizer, args.corpus, points, args.out, tokens=args.tokens,
                          context_length=args.context_length, exclude_first=args.exclude_first_token,
                          dtype=args.dtype, windows_per_shard=args.windows_per_shard,
                          batch_windows=args.batch_windows, text_column=args.text_column,
                          model_name=name, overwrite=args.overwrite)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"pyinterp cache-activations: error: {exc}", file=sys.stderr)
        return 2
    return 0
