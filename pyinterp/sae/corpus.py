"""Text corpora for activation harvesting, streamed: plain text, JSONL, Parquet and `datasets` saved to
disk, tokenised into fixed context windows. Nothing requires the whole corpus in memory.

A document is a line of a .txt file (blank lines skipped), the `text_column` field of each JSONL record
or Parquet row, or of each row of a dataset saved with `datasets.Dataset.save_to_disk`. Windows are
cut from the documents' tokens concatenated in order, each document followed by the tokenizer's EOS
(or SEP) token; with a BOS (or CLS) token every window starts with it, so the model sees the same kind
of first position in every window. The order is deterministic: window i is the same in every run."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return [path]  # a `datasets` folder is read as one corpus
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise ValueError(f"corpus: {path} holds no {', '.join(suffixes)} files and is no saved dataset")
    return files


def _column(path: Path, names, text_column: str) -> None:
    if text_column not in names:
        raise ValueError(f"corpus: {path} has no column {text_column!r} (columns: {', '.join(names)}); "
                         "pass --text-column")


def _jsonl_documents(path: Path, text_column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"corpus: {path} line {number} is not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise ValueError(f"corpus: {path} line {number} is not a JSON object")
            _column(path, record.keys(), text_column)
            yield str(record[text_column])


def _parquet_documents(path: Path, text_column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise RuntimeError("corpus: Parquet files need pyarrow (pip install pyarrow)") from exc
    table = parquet.ParquetFile(path)
    _column(path, table.schema_arrow.names, text_column)
    for batch in table.iter_batches(columns=[text_column], batch_size=1024):
        yield from (str(text) for text in batch.column(0).to_pylist())


def _dataset_documents(path: Path, text_column: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError("corpus: a saved dataset needs the datasets package (pip install datasets)") from exc
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"corpus: {path} is a DatasetDict without a 'train' split "
                             f"(splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    _column(path, dataset.column_names, text_column)
    for row in dataset.select_columns([text_column]):  # memory-mapped Arrow: rows are read lazily
        yield str(row[text_column])


def documents(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """Every document of a corpus file or folder, in a fixed order."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"corpus: {path} does not exist")
    for file in _files(path):
        if file.is_dir():
            yield from _dataset_documents(file, text_column)
        elif file.suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(file, text_column)
        elif file.suffix in PARQUET_SUFFIXES:
            yield from _parquet_documents(file, text_column)
        else:
            with open(file, encoding="utf-8") as handle:
                yield from (line.rstrip("\n") for line in handle if line.strip())


@dataclass(frozen=True)
class WindowSpec:
    """context_length tokens per window (the BOS included); exclude_first drops the first position's
    activations (BOS or the window's first token: SAE papers exclude it, its norm is an outlier)."""
    context_length: int
    exclude_first: bool = False

    def check(self, model_max: int | None) -> None:
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) \
                or self.context_length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {self.context_length!r}")
        if model_max is not None and self.context_length > model_max:
            raise ValueError(f"context_length={self.context_length} is longer than the model's "
                             f"{model_max} positions")

    @property
    def tokens_per_window(self) -> int:
        """Activation rows each window yields."""
        return self.context_length - int(self.exclude_first)


def _special(tokenizer, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def context_windows(texts, tokenizer, context_length: int) -> Iterator[torch.Tensor]:
    """(context_length,) int64 token windows from the documents' tokens concatenated in order."""
    bos = _special(tokenizer, "bos_token_id", "cls_token_id")
    eos = _special(tokenizer, "eos_token_id", "sep_token_id")
    body = context_length - (bos is not None)
    pending: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pending.extend(ids)
        if eos is not None:
            pending.append(eos)
        while len(pending) >= body:
            window, pending = pending[:body], pending[body:]
            yield torch.tensor(([bos] if bos is not None else []) + window, dtype=torch.int64)


def model_max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
