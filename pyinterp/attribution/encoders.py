"""Layer-l attribution for Hugging Face / sentence-transformers encoders (BERT, RoBERTa, MPNet, DistilBERT,
any encoder whose embeddings module and layer list are reachable), and pairwise token attribution of
bi-encoder similarities (Moeller et al., "An Attribution Method for Siamese Encoders", EMNLP 2023).

The adapter runs the model once on [inputs, references] to read the states x, r at the input of layer l
(and the embeddings g(x), g(r)); each path pass then runs only the layers from l up, with the
embeddings module's output replaced by the interpolated states, followed by the model's own pooling
and any Dense / Normalize modules, so E is the model's real output width."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from pyinterp.attribution.integrated import IntegratedJacobian, integrate_batch
from pyinterp.attribution.quadrature import check_method
from pyinterp.models import forward_inputs, transformer_layers

SIMILARITIES = ("cosine", "dot")
# Default path samples per pass: as many as make this many token rows, which bounds the activations
# kept for one backward (about 0.25 GB for the upper half of a 384-wide, 6-layer encoder).
TOKENS_PER_PASS = 2048


class EncoderAdapter:
    """g(states at the input of layer l) -> sentence embedding, for one encoder model.

    model: a SentenceTransformer (pooling, Dense and Normalize modules are kept), or a Hugging Face
    encoder with `tokenizer` given (mean pooling over the attention mask)."""

    def __init__(self, model: nn.Module, tokenizer=None):
        if hasattr(model, "tokenizer") and isinstance(model, nn.Sequential) and hasattr(model[0], "auto_model"):
            self.sentence_transformer, self.transformer, self.tokenizer = model, model[0].auto_model, model.tokenizer
        elif tokenizer is not None:
            self.sentence_transformer, self.transformer, self.tokenizer = None, model, tokenizer
        else:
            raise TypeError("explain_pair: model must be a SentenceTransformer, or a Hugging Face encoder "
                            "given with its tokenizer=")
        self.embeddings = getattr(self.transformer, "embeddings", None)
        if not isinstance(self.embeddings, nn.Module):
            raise TypeError(f"explain_pair: {type(self.transformer).__name__} has no embeddings module")
        layers_path, layers = transformer_layers(self.transformer)
        owner_path, _, self.layer_attr = layers_path.rpartition(".")
        self.layer_owner = self.transformer.get_submodule(owner_path)
        self.num_layers = len(layers)
        self.device = next(self.transformer.parameters()).device

    def check_layer(self, layer: int, where: str) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{where}: layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"{where}: layer must be in [0, {self.num_layers}] for this "
                             f"{self.num_layers}-layer model (0 = the embeddings output), got {layer}")
        return layer

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in forward_inputs(self.transformer, batch).items()}

    def blank_references(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """[CLS, PAD, ..., PAD, SEP] of each input's own length, attending to all its positions."""
        tok = self.tokenizer
        first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        last = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        ids = torch.full_like(features["input_ids"], tok.pad_token_id)
        lengths = features["attention_mask"].sum(1)
        rows = torch.arange(ids.shape[0], device=ids.device)
        ids[:, 0] = first
        ids[rows, lengths - 1] = last
        return {**features, "input_ids": ids}

    def tokens(self, features: dict[str, Tensor], row: int) -> list[str]:
        length = int(features["attention_mask"][row].sum())
        return self.tokenizer.convert_ids_to_tokens(features["input_ids"][row, :length].tolist())

    def embed(self, features: dict[str, Tensor]) -> Tensor:
        """The model's own sentence embeddings (B, E)."""
        if self.sentence_transformer is not None:
            return self.sentence_transformer(dict(features))["sentence_embedding"]
        hidden = self.transformer(**features).last_hidden_state
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def states_at(self, features: dict[str, Tensor], layer: int) -> Tensor:
        """(B, S, D): the input of layer `layer` (layer 0: the embeddings output)."""
        return self.transformer(**features, output_hidden_states=True).hidden_states[layer]

    @contextlib.contextmanager
    def from_layer(self, layer: int, states: list) -> Iterator[None]:
        """Inside: a forward pass skips the layers below `layer` and starts from states[0] (a holder the
        caller fills before each pass) instead of the embeddings output."""
        layers = getattr(self.layer_owner, self.layer_attr)
        hook = self.embeddings.register_forward_hook(lambda module, args, output: states[0])
        setattr(self.layer_owner, self.layer_attr, nn.ModuleList(list(layers)[layer:]))
        try:
            yield
        finally:
            setattr(self.layer_owner, self.layer_attr, layers)
            hook.remove()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off while attributing (sentence-transformers models load in training mode)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class TextAttribution:
    """One text's integrated Jacobian at layer `layer` (P (E, S) over its tokens, eps, g(x), g(r),
    Jbar when asked), with its tokens and the layer states x, r (S, D)."""
    tokens: list[str]
    result: IntegratedJacobian
    x: Tensor
    reference: Tensor


def attribute_texts(model, texts: Sequence[str], *, layer: Optional[int] = None, n_steps: int = 10,
                    method: str = "gauss_legendre", reference: Optional[Sequence[str]] = None,
                    mode: str = "auto", chunk_size: Optional[int] = None, return_jbar: bool = False,
                    tokenizer=None, backend: str = "auto", where: str = "attribute_texts",
                    check_states: Optional[Callable[[Tensor], None]] = None) -> list[TextAttribution]:
    """Integrated Jacobian of the sentence embedding with respect to the input of layer `layer`
    (default: the middle layer), for several texts at once. chunk_size: path samples per pass
    (default: TOKENS_PER_PASS // tokens). check_states: called with the layer states (2T, S, D) of
    the texts and references before the path passes, to reject what does not fit them early."""
    adapter = EncoderAdapter(model, tokenizer)
    layer = adapter.check_layer(adapter.num_layers // 2 if layer is None else layer, where)
    check_method(method, n_steps, where)
    features = adapter.tokenize(texts)
    if reference is None:
        ref_features = adapter.blank_references(features)
    else:
        if len(reference) != len(texts):
            raise ValueError(f"{where}: give one reference text per text ({len(texts)}), got {len(reference)}")
        ref_features = adapter.tokenize(list(reference))
        if not torch.equal(ref_features["attention_mask"].sum(1), features["attention_mask"].sum(1)) or \
                ref_features["input_ids"].shape != features["input_ids"].shape:
            raise ValueError(f"{where}: each reference must tokenize to as many tokens as its text")
    lengths = features["attention_mask"].sum(1).tolist()
    if chunk_size is None:
        chunk_size = max(1, TOKENS_PER_PASS // features["input_ids"].shape[1])
    model_for_eval = adapter.sentence_transformer or adapter.transformer
    with eval_mode(model_for_eval), torch.no_grad():
        both = {k: torch.cat([features[k], ref_features[k]]) for k in features}
        states = adapter.states_at(both, layer)
    if check_states is not None:
        check_states(states)
    xs, refs = states[:len(texts)], states[len(texts):]
    holder = [None]

    def fn(path_states: Tensor, owners: Tensor) -> Tensor:
        holder[0] = path_states
        return adapter.embed({k: v[owners] for k, v in features.items()})

    with eval_mode(model_for_eval), adapter.from_layer(layer, holder):
        results = integrate_batch(fn, xs, refs, n_steps=n_steps, method=method, mode=mode,
                                  chunk_size=chunk_size, return_jbar=return_jbar, lengths=lengths,
                                  backend=backend, where=where)
    attributions = []
    for row, result in enumerate(results):
        length = lengths[row]
        result.P = result.P[:, :length]
        if result.jbar is not None:
            result.jbar = result.jbar[:, :length]
        attributions.append(TextAttribution(adapter.tokens(features, row), result, xs[row, :length],
                                            refs[row, :length]))
    return attributions


@dataclass
class FeaturePairs:
    """The full feature-pair matrix A[(s, d), (t, d')] = scale * Delta_a[s, d] (Jbar_a^T Jbar_b) Delta_b[t, d'],
    (S_a * D) x (S_b * D), produced in tiles: at S = 128, D = 768 it would be 38.7 GB in fp32."""
    jbar_a: Tensor   # (E, S_a, D)
    jbar_b: Tensor   # (E, S_b, D)
    delta_a: Tensor  # (S_a, D)
    delta_b: Tensor  # (S_b, D)
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.delta_a.numel(), self.delta_b.numel()

    def tiles(self, rows: int = 4096, cols: int = 4096) -> Iterator[tuple[slice, slice, Tensor]]:
        """(row slice, column slice, tile) over the whole matrix; rows/cols index (token, feature) pairs
        flattened token-major."""
        left = (self.jbar_a * self.delta_a.to(self.jbar_a.dtype)).flatten(1)    # (E, S_a*D)
        right = (self.jbar_b * self.delta_b.to(self.jbar_b.dtype)).flatten(1)   # (E, S_b*D)
        for i0 in range(0, left.shape[1], rows):
            for j0 in range(0, right.shape[1], cols):
                tile = left[:, i0:i0 + rows].T @ right[:, j0:j0 + cols]
                yield slice(i0, i0 + tile.shape[0]), slice(j0, j0 + tile.shape[1]), tile * self.scale

    def token_pairs(self, rows: int = 4096, cols: int = 4096) -> Tensor:
        """(S_a, S_b): the tiles summed over feature pairs (equals A_tok = P_a^T P_b, scaled)."""
        width_a, width_b = self.delta_a.shape[1], self.delta_b.shape[1]
        out = torch.zeros(self.delta_a.shape[0], self.delta_b.shape[0], dtype=self.jbar_a.dtype)
        for row_slice, col_slice, tile in self.tiles(rows, cols):
            token_rows = torch.arange(row_slice.start, row_slice.stop) // width_a
            token_cols = torch.arange(col_slice.start, col_slice.stop) // width_b
            per_row = torch.zeros(tile.shape[0], out.shape[1], dtype=tile.dtype).index_add_(1, token_cols, tile)
            out.index_add_(0, token_rows, per_row)
        return out


@dataclass
class PairExplanation:
    """Why an encoder finds text a and text b similar, token pair by token pair.

    score = attribution_sum + sum(reference_terms.values()) + error, where attribution_sum is
    A_tok.sum() and A_tok[s, t] = scale * P_a[:, s] . P_b[:, t] (scale = 1 / (|g(a)| |g(b)|) for cosine)."""
    tokens_a: list[str]
    tokens_b: list[str]
    A_tok: Tensor
    score: float
    attribution_sum: float
    reference_terms: dict[str, float]
    error: float
    eps_a: Tensor
    eps_b: Tensor
    similarity: str
    layer: int
    feature_pairs: Optional[FeaturePairs] = field(default=None, repr=False)


def pair_explanation(a: TextAttribution, b: TextAttribution, emb_a: Tensor, emb_b: Tensor, *,
                     similarity: str, layer: int, feature_pairs: bool = False) -> PairExplanation:
    """Combine two texts' attributions (the factorised A_tok = P_a^T P_b; docs/attribution.md, "Pairs")."""
    ra, rb = a.result, b.result
    scale = 1.0
    if similarity == "cosine":
        scale = 1.0 / float(emb_a.norm() * emb_b.norm())
    score = float(emb_a.double() @ emb_b.double()) * scale
    A_tok = (ra.P.T @ rb.P) * scale
    # f(a,b) = (g_a - g_ra).(g_b - g_rb) + g_ra.g_b + g_a.g_rb - g_ra.g_rb
    terms = {"g(r_a).g(b)": float(ra.g_r @ rb.g_x) * scale,
             "g(a).g(r_b)": float(ra.g_x @ rb.g_r) * scale,
             "-g(r_a).g(r_b)": -float(ra.g_r @ rb.g_r) * scale}
    attribution_sum = float(A_tok.sum())
    pairs = None
    if feature_pairs:
        pairs = FeaturePairs(ra.jbar, rb.jbar, a.x - a.reference, b.x - b.reference, scale)
    return PairExplanation(a.tokens, b.tokens, A_tok, score, attribution_sum, terms,
                           score - attribution_sum - sum(terms.values()), ra.eps, rb.eps, similarity,
                           layer, pairs)


def explain_pair(model, text_a, text_b, *, layer: Optional[int] = None, n_steps: int = 10,
                 method: str = "gauss_legendre", similarity: str = "cosine", reference=None,
                 mode: str = "auto", chunk_size: Optional[int] = None, feature_pairs: bool = False,
                 tokenizer=None, backend: str = "auto"):
    """Token-pair attribution of an encoder's similarity between text_a and text_b.

    text_a, text_b: two strings, or two equally long lists of strings (several pairs in one call,
    batched). reference: None for [CLS, PAD..., SEP] references, or (ref_a, ref_b) strings / lists that
    tokenize to their texts' lengths. layer: attribute at the input of this layer (default: middle).
    feature_pairs: also return the full feature-pair matrix (in tiles; needs Jbar, so reverse mode).
    Returns a PairExplanation, or a list of them for lists."""
    where = "explain_pair"
    if similarity not in SIMILARITIES:
        raise ValueError(f"{where}: similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    single = isinstance(text_a, str)
    texts_a = [text_a] if single else list(text_a)
    texts_b = [text_b] if isinstance(text_b, str) else list(text_b)
    if len(texts_a) != len(texts_b) or not texts_a:
        raise ValueError(f"{where}: text_a and text_b must be two strings or two equally long, non-empty "
                         f"lists, got {len(texts_a)} and {len(texts_b)}")
    refs = None
    if reference is not None:
        if not isinstance(reference, (tuple, list)) or len(reference) != 2:
            raise ValueError(f"{where}: reference must be a pair (reference of text_a, reference of text_b)")
        ref_a, ref_b = reference
        refs = ([ref_a] if isinstance(ref_a, str) else list(ref_a)) + \
               ([ref_b] if isinstance(ref_b, str) else list(ref_b))
    adapter = EncoderAdapter(model, tokenizer)
    layer = adapter.check_layer(adapter.num_layers // 2 if layer is None else layer, where)
    texts = texts_a + texts_b
    attributions = attribute_texts(model, texts, layer=layer, n_steps=n_steps, method=method,
                                   reference=refs, mode=mode, chunk_size=chunk_size,
                                   return_jbar=feature_pairs, tokenizer=tokenizer, backend=backend, where=where)
    with eval_mode(adapter.sentence_transformer or adapter.transformer), torch.no_grad():
        embeddings = adapter.embed(adapter.tokenize(texts)).double()
    count = len(texts_a)
    explanations = [pair_explanation(attributions[i], attributions[count + i], embeddings[i],
                                     embeddings[count + i], similarity=similarity, layer=layer,
                                     feature_pairs=feature_pairs)
                    for i in range(count)]
    return explanations[0] if single else explanations
