"""Corpora, hookpoints and the activation cache on tiny random-initialised Hugging Face models (built
from configs; nothing is downloaded) with the embedded MiniLM's tokenizer."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pyinterp import models
from pyinterp.sae import cache, corpus, hookpoints
from pyinterp.sae.data import ShardSource

TEXTS = [f"Document number {i} says {' '.join(['word'] * (i % 7 + 1))} and then stops." for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_default_model().tokenizer


def tiny_model(kind: str, vocab: int):
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=vocab, n_positions=64)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def write_corpus(folder, fmt: str):
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        path = folder / "corpus.txt"
        path.write_text("\n\n".join(TEXTS) + "\n")
    elif fmt == "jsonl":
        path = folder / "corpus.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "corpus.parquet"
        pq.write_table(pa.table({"text": TEXTS, "id": list(range(len(TEXTS)))}), path, row_group_size=7)
    else:
        import datasets

        path = folder / "dataset"
        datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "dataset"])
def test_every_format_yields_the_same_documents(tmp_path, fmt):
    assert list(corpus.documents(write_corpus(tmp_path, fmt))) == TEXTS


def test_corpus_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'.*--text-column"):
        list(corpus.documents(bad))
    with pytest.raises(ValueError, match="does not exist"):
        list(corpus.documents(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        list(corpus.documents(tmp_path / "empty"))


def test_windows_are_fixed_length_start_with_bos_and_keep_every_token(tokenizer):
    windows = list(corpus.context_windows(TEXTS, tokenizer, 16))
    assert windows and all(w.shape == (16,) for w in windows)
    assert all(int(w[0]) == tokenizer.cls_token_id for w in windows)
    stream = [t for text in TEXTS for t in tokenizer(text, add_special_tokens=False)["input_ids"]
              + [tokenizer.sep_token_id]]
    bodies = [t for w in windows for t in w[1:].tolist()]
    assert bodies == stream[:len(bodies)] and len(stream) - len(bodies) < 15


def test_context_longer_than_the_model_is_refused(tokenizer):
    model = tiny_model("gpt2", tokenizer.vocab_size)
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        corpus.WindowSpec(65).check(corpus.model_max_positions(model))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hookpoints_by_glob_layer_and_input_capture_what_the_model_computes(tokenizer, kind):
    model = tiny_model(kind, tokenizer.vocab_size)
    blocks = "transformer.h" if kind == "gpt2" else "model.layers"
    points = hookpoints.resolve(model, [f"{blocks}.*.mlp", f"{blocks}.1:input"], layers="2")
    names = [p.name for p in points]
    assert names == [f"{blocks}.0.mlp", f"{blocks}.1.mlp", f"{blocks}.2.mlp", f"{blocks}.1:input", f"{blocks}.1"]
    ids = torch.stack(list(corpus.context_windows(TEXTS, tokenizer, 12))[:2])
    got = hookpoints.capture(model, points, input_ids=ids)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[f"{blocks}.1:input"], hidden[1])   # input of block 1
    torch.testing.assert_close(got[f"{blocks}.1"], hidden[2])         # output of block 1 = layer 2
    assert got[f"{blocks}.0.mlp"].shape == (2, 12, 16)


def test_forward_stops_after_the_last_hookpoint(tokenizer):
    model = tiny_model("gpt2", tokenizer.vocab_size)
    ran = []
    handle = model.transformer.h[2].register_forward_hook(lambda *_: ran.append(True))
    hookpoints.capture(model, hookpoints.resolve(model, ["transformer.h.1"]),
                       input_ids=torch.ones(1, 4, dtype=torch.long))
    handle.remove()
    assert not ran


def test_unknown_hookpoint_lists_close_names(tokenizer):
    model = tiny_model("gpt2", tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlpp' matches no module.*close: transformer\.h\.1\.mlp"):
        hookpoints.resolve(model, ["transformer.h.1.mlpp"])
    with pytest.raises(ValueError, match="layers: 'a-b'"):
        hookpoints.resolve(model, layers="a-b")
    assert hookpoints.parse_layers("0-2,5,1") == [0, 1, 2, 5]


def test_cache_writes_shards_train_sae_reads_and_values_match_a_direct_forward(tmp_path, tokenizer):
    model = tiny_model("llama", tokenizer.vocab_size)
    points = hookpoints.resolve(model, ["model.layers.0", "model.layers.2.mlp"])
    path = write_corpus(tmp_path, "jsonl")
    manifest = cache.cache_activations(model, tokenizer, path, points, tmp_path / "out", tokens=150,
                                       context_length=10, exclude_first=True, dtype="fp32",
                                       windows_per_shard=4, batch_windows=3, log=lambda _: None)
    assert manifest.complete and manifest.tokens_done >= 150 and len(manifest.shards) == 5
    source = ShardSource(tmp_path / "out" / "model.layers.0")
    assert source.num_tokens == manifest.tokens_done and source.d_model == 16
    windows = torch.stack(list(corpus.context_windows(corpus.documents(path), tokenizer, 10))[:20])
    direct = hookpoints.capture(model, points, input_ids=windows)["model.layers.0"][:, 1:].reshape(-1, 16)
    import numpy as np

    torch.testing.assert_close(source.rows(np.arange(source.num_tokens)), direct)


def test_resume_after_a_kill_equals_an_uninterrupted_cache(tmp_path):
    path = write_corpus(tmp_path, "txt")
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_sae_cache import tiny_model
        from pyinterp import models
        from pyinterp.sae import cache, hookpoints
        tokenizer = models.load_default_model().tokenizer
        model = tiny_model("gpt2", tokenizer.vocab_size)
        points = hookpoints.resolve(model, ["transformer.h.*"])
        kill_after = int(sys.argv[2])
        def log(line):
            if kill_after and line.startswith(f"cache-activations: shard {{kill_after}} "):
                os.kill(os.getpid(), signal.SIGKILL)
        cache.cache_activations(model, tokenizer, {str(path)!r}, points, sys.argv[1], tokens=200,
                                context_length=8, dtype="bf16", windows_per_shard=3, log=log)
    """)
    runner = tmp_path / "run_cache.py"
    runner.write_text(script)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    killed = subprocess.run([sys.executable, str(runner), str(tmp_path / "resumed"), "3"], env=env)
    assert killed.returncode == -signal.SIGKILL
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and not manifest["complete"]
    for out, kill in (("resumed", "0"), ("straight", "0")):
        subprocess.run([sys.executable, str(runner), str(tmp_path / out), kill], env=env, check=True)
    for folder in ("transformer.h.0", "transformer.h.2"):
        resumed = sorted((tmp_path / "resumed" / folder).iterdir())
        straight = sorted((tmp_path / "straight" / folder).iterdir())
        assert [p.name for p in resumed] == [p.name for p in straight]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(resumed, straight))


def test_resume_with_other_settings_is_refused(tmp_path, tokenizer):
    model = tiny_model("gpt2", tokenizer.vocab_size)
    path = write_corpus(tmp_path, "txt")
    points = hookpoints.resolve(model, ["transformer.h.0"])
    common = dict(tokens=20, windows_per_shard=2, log=lambda _: None)
    cache.cache_activations(model, tokenizer, path, points, tmp_path / "out", context_length=8, **common)
    with pytest.raises(ValueError, match="holds another cache.*context_length: cache 8, asked 9"):
        cache.cache_activations(model, tokenizer, path, points, tmp_path / "out", context_length=9, **common)


def test_cli_errors_exit_2(tmp_path, capsys):
    from pyinterp import cli

    assert cli.main(["cache-activations", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "pyinterp cache-activations: error: --corpus" in capsys.readouterr().err
