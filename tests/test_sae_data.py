"""Activation sources: memory-mapped shards (safetensors f32/bf16, .npy) read the same rows as memory,
the shuffled stream visits every token once per epoch and is a pure function of the micro-batch
number, and the forward hook on the embedded default model captures the named layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pyinterp.sae import ShardSource, ShuffledStream, TensorSource
from sae_helpers import correlated_activations

torch.set_num_threads(1)


def test_shards_read_the_rows_memory_holds(tmp_path):
    x = correlated_activations(900, 6)
    save_file({"activations": x[:300]}, str(tmp_path / "0.safetensors"))
    save_file({"activations": x[300:500].bfloat16()}, str(tmp_path / "1.safetensors"), metadata={"layer": "3"})
    np.save(tmp_path / "2.npy", x[500:].numpy().astype(np.float16))
    shards = ShardSource(tmp_path)
    assert (shards.num_tokens, shards.d_model) == (900, 6)
    expected = torch.cat([x[:300], x[300:500].bfloat16().float(), x[500:].half().float()])
    indices = np.random.default_rng(0).permutation(900)[:250]
    assert torch.equal(shards.rows(indices), expected[torch.from_numpy(indices)])


@pytest.mark.parametrize("tokens,block_tokens,window_blocks", [(1000, 4096, 64), (1000, 64, 3), (1003, 50, 4)])
def test_stream_visits_every_token_once_per_epoch(tokens, block_tokens, window_blocks):
    source = TensorSource(torch.arange(tokens, dtype=torch.float32)[:, None])
    stream = ShuffledStream(source, 100, seed=5, block_tokens=block_tokens, window_blocks=window_blocks)
    epoch = np.concatenate([stream.token_indices(i) for i in range(stream.batches_per_epoch)])
    assert len(np.unique(epoch)) == len(epoch) == (tokens // 100) * 100
    assert not np.array_equal(epoch, np.sort(epoch))
    second = np.concatenate([stream.token_indices(i + stream.batches_per_epoch)
                             for i in range(stream.batches_per_epoch)])
    assert not np.array_equal(epoch, second)  # each epoch is shuffled anew
    fresh = ShuffledStream(source, 100, seed=5, block_tokens=block_tokens, window_blocks=window_blocks)
    assert np.array_equal(fresh.token_indices(7), stream.token_indices(7))  # resumable by number
    assert torch.equal(stream.batch(3)[:, 0], torch.from_numpy(stream.token_indices(3)).float())


def test_stream_rejects_a_batch_larger_than_the_source():
    with pytest.raises(ValueError, match="batch_size=200 is larger"):
        ShuffledStream(TensorSource(torch.zeros(100, 3)), 200)


@pytest.fixture(scope="module")
def default_model():
    pytest.importorskip("sentence_transformers")
    from pyinterp.models import load_default_model
    return load_default_model()


def test_hook_captures_the_named_layer(default_model):
    from pyinterp.models import docstring_sentences, hooked_activations, layer_activations

    texts = docstring_sentences(12)
    expected = layer_activations(default_model, texts, 3)
    # Other batches pad differently, which moves the float rounding only.
    torch.testing.assert_close(hooked_activations(default_model, texts, 3, batch_size=5), expected)
    assert torch.equal(hooked_activations(default_model, texts, "encoder.layer.2"), expected)
    assert torch.equal(hooked_activations(default_model, texts, 0), layer_activations(default_model, texts, 0))
    plain_hugging_face = default_model[0].auto_model
    assert torch.equal(hooked_activations(plain_hugging_face, texts, 3, tokenizer=default_model.tokenizer), expected)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        hooked_activations(plain_hugging_face, texts, 3)
    with pytest.raises(ValueError, match="layer 'encoder.layer.9' is not a module of BertModel"):
        hooked_activations(default_model, texts, "encoder.layer.9")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 6\]"):
        hooked_activations(default_model, texts, 7)


def test_demo_trains_and_fvu_falls(default_model, capsys):
    from pyinterp.sae.cli import demo

    fvus = demo(backend="torch", texts=120, steps=30)
    assert fvus[-1] < 0.8 * fvus[0]
    assert "FVU" in capsys.readouterr().out
