"""Sentence embeddings over a loaded BERT encoder: SPEC.md section 4 (and Spin's profile, 6).

    profile="spec" (the default), as sentence-transformers computes it
    (Reimers & Gurevych 2019, https://arxiv.org/abs/1908.10084; its `Transformer`,
    `Pooling(mean)` and `Normalize` modules):
      1. tokenize each text with [CLS] ... [SEP], truncated to the max sequence length:
         `max_seq_length` of sentence_bert_config.json, else the truncation max_length of
         tokenizer.json, else max_position_embeddings (and never more than that);
      2. run the encoder on length-sorted chunks of at most `chunk_size` texts, each
         padded to its own longest text (and cut where a text would more than double
         in length: `length_sorted_chunks`), WITH the attention mask: a text's vector
         does not depend on what it is batched with, memory stays bounded (at most
         chunk_size x max_seq_length tokens at once) and padding small;
      3. mean-pool the last hidden states over the real tokens, then L2-normalise;
      4. usage: the real tokens of all texts, [CLS] and [SEP] included.

    profile="spin", Spin 3's local engine (spinframework/spin `crates/llm-local`,
    `generate_embeddings` in lib.rs and its copy of candle's bert.rs), where it differs:
      - tokenizer.json as it is on disk, so its own truncation (128 tokens for
        all-MiniLM-L6-v2, not sentence_bert_config's 256), padded to the longest text
        of the whole batch, one batch, no sorting;
      - the encoder sees NO attention mask: padding tokens are attended to (Spin's
        BertModel.forward takes no mask) and are averaged in: sum over T / T;
      - the tanh GELU (candle's `gelu`), whatever config.json says (Spin reads no
        config.json at all and assumes all-MiniLM-L6-v2's shape; we keep reading it);
      - normalised as x / |x| with no epsilon;
      - usage: `prompt-token-count` = T, the padded length of the batch (Spin reports
        `n_tokens` of the [B, T, H] output's dims, not B * T nor the real tokens).
    On a single text there is no padding, so the two profiles differ only by the GELU
    form (and by the truncation length past 126 word pieces).

Float math (pooling, normalisation) is in the model dtype; results are Python floats.
This module is a library over a model directory: finding models by name is the
registry's job, not this one's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .bert import Bert
from .config import read_json
from .errors import InvalidInputError, LLMRuntimeError
from .types import EmbeddingsResult, EmbeddingsUsage

PROFILES = ("spec", "spin")


# ----------------------------------------------------------------------------------------
# Pooling and normalisation: pure functions over arrays.


def mean_pool(hidden, mask):  # [B, T, H], [B, T] -> [B, H]
    """Mean of the hidden states over the real tokens (mask == 1), as sentence-transformers."""
    m = mask[:, :, None].astype(hidden.dtype)  # [B, T, 1]
    total = np.sum(hidden * m, axis=1)  # [B, H]
    count = np.maximum(np.sum(m, axis=1), hidden.dtype.type(1e-9))  # [B, 1]
    return total / count


def l2_normalize(x, eps=1e-12):  # [B, H] -> [B, H]
    """x / max(|x|, eps), as torch.nn.functional.normalize."""
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))  # [B, 1]
    return x / np.maximum(norm, x.dtype.type(eps))


def spin_pool(hidden):  # [B, T, H] -> [B, H]
    """Spin's pooling: the mean over all T positions, padding included."""
    return np.sum(hidden, axis=1) / hidden.dtype.type(hidden.shape[1])


def spin_normalize(x):  # [B, H] -> [B, H]
    """Spin's normalisation: x / |x|, no epsilon."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True))


def length_sorted_chunks(lengths: list[int], chunk_size: int) -> list[list[int]]:
    """Indices of the texts, longest first (stable), cut into chunks of at most
    `chunk_size`; a chunk also ends before a text shorter than half its longest, so no
    text is padded to more than twice its length (a few long texts do not drag a whole
    chunk of short ones to their length: attention costs T^2 per text)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks and len(chunks[-1]) < chunk_size and 2 * lengths[i] >= lengths[chunks[-1][0]]:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


# ----------------------------------------------------------------------------------------
# The max sequence length rule (SPEC 4.1).


def max_seq_length_of(model_dir: str | Path, tokenizer_json: dict, max_position_embeddings: int) -> int:
    """sentence_bert_config.json's max_seq_length, else tokenizer.json's truncation
    max_length, else max_position_embeddings; capped at max_position_embeddings."""
    sbert = Path(model_dir) / "sentence_bert_config.json"
    n = None
    if sbert.is_file():
        n = read_json(sbert).get("max_seq_length")
    if n is None:
        n = (tokenizer_json.get("truncation") or {}).get("max_length")
    if n is None:
        n = max_position_embeddings
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise LLMRuntimeError(f"{model_dir}: max sequence length {n!r} is not an integer >= 2")
    return min(n, max_position_embeddings)


# ----------------------------------------------------------------------------------------
# The embedder.


class Embedder:
    """A BERT encoder and its tokenizer, turning texts into unit vectors (SPEC 4)."""

    def __init__(self, model: Bert, tokenizer: Tokenizer, max_seq_length: int):
        """`tokenizer` as loaded from tokenizer.json; it is copied twice, once configured
        for the spec profile (truncation to `max_seq_length`, no padding: we pad) and
        once for Spin's (its own truncation, padding to the batch's longest)."""
        self.model = model
        self.max_seq_length = max_seq_length
        on_disk = tokenizer.to_str()

        self.tokenizer = Tokenizer.from_str(on_disk)
        self.tokenizer.no_padding()
        trunc = self.tokenizer.truncation or {}
        self.tokenizer.enable_truncation(
            max_seq_length, stride=trunc.get("stride", 0),
            strategy=trunc.get("strategy", "longest_first"), direction=trunc.get("direction", "right"))

        self.spin_tokenizer = Tokenizer.from_str(on_disk)
        pad = self.spin_tokenizer.padding or {}
        # Spin: keep the file's padding params but pad to the longest (BatchLongest);
        # without any, tokenizers' defaults (id 0, "[PAD]", right).
        self.spin_tokenizer.enable_padding(
            direction=pad.get("direction", "right"), pad_id=pad.get("pad_id", 0),
            pad_type_id=pad.get("pad_type_id", 0), pad_token=pad.get("pad_token", "[PAD]"),
            length=None, pad_to_multiple_of=pad.get("pad_to_multiple_of"))
        self._spin_model = None  # the same weights with the tanh GELU, made on first use

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype=np.float32, backend: str | None = None) -> "Embedder":
        """Load an embedding model directory: tokenizer.json, model.safetensors, optional
        config.json and sentence_bert_config.json (SPEC 5)."""
        model_dir = Path(model_dir)
        model = Bert.from_pretrained(model_dir, dtype=dtype, backend=backend)
        path = model_dir / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
            tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise LLMRuntimeError(f"{path}: cannot load the tokenizer ({e})") from e
        n = max_seq_length_of(model_dir, tokenizer_json, model.config.max_position_embeddings)
        return cls(model, tokenizer, n)

    @property
    def dim(self) -> int:  # H
        return self.model.config.hidden_size

    # -- input ---------------------------------------------------------------------------

    @staticmethod
    def validate(texts) -> list[str]:
        """invalid-input for anything but a non-empty list (or tuple) of strings."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
            raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise InvalidInputError("texts must not be empty")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"texts[{i}] must be a string, got {type(t).__name__}")
        return list(texts)

    def tokenize(self, texts) -> list[list[int]]:
        """Token ids of each text, [CLS] ... [SEP], truncated to max_seq_length."""
        texts = self.validate(texts)
        return [e.ids for e in _encode(self.tokenizer, texts)]

    # -- embedding -----------------------------------------------------------------------

    def embed(self, texts, *, profile: str = "spec", chunk_size: int = 32) -> EmbeddingsResult:
        """generate-embeddings: one unit vector per text, in input order, and the usage."""
        vectors, n_tokens = self.embed_array(texts, profile=profile, chunk_size=chunk_size, return_usage=True)
        return EmbeddingsResult(embeddings=vectors.tolist(), usage=EmbeddingsUsage(prompt_token_count=n_tokens))

    def embed_array(self, texts, *, profile: str = "spec", chunk_size: int = 32, return_usage: bool = False):
        """The embeddings as an array [N, H] in the model dtype (and, with return_usage,
        the prompt-token-count as a second value)."""
        if profile not in PROFILES:
            raise ValueError(f"profile {profile!r} is not supported; choose one of {', '.join(map(repr, PROFILES))}")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        texts = self.validate(texts)
        if profile == "spin":
            vectors, n_tokens = self._embed_spin(texts)
        else:
            vectors, n_tokens = self._embed_spec(texts, chunk_size)
        return (vectors, n_tokens) if return_usage else vectors

    def _embed_spec(self, texts: list[str], chunk_size: int):  # N texts -> [N, H], real tokens
        ids = [e.ids for e in _encode(self.tokenizer, texts)]
        out = np.empty((len(ids), self.dim), dtype=self.model.dtype)  # [N, H]
        for chunk in length_sorted_chunks([len(x) for x in ids], chunk_size):
            T = len(ids[chunk[0]])  # the longest of the chunk
            batch = np.zeros((len(chunk), T), dtype=np.int64)  # [B, T]  padded with 0 (masked)
            mask = np.zeros((len(chunk), T), dtype=np.int64)  # [B, T]
            for row, i in enumerate(chunk):
                batch[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            hidden = self.model(batch, mask)  # [B, T, H]
            out[chunk] = l2_normalize(mean_pool(hidden, mask))  # [B, H]
        return out, sum(len(x) for x in ids)

    def _embed_spin(self, texts: list[str]):  # N texts -> [N, H], T
        encodings = _encode(self.spin_tokenizer, texts)
        batch = np.array([e.ids for e in encodings], dtype=np.int64)  # [N, T]  padded to the longest
        T = batch.shape[1]
        if T > self.model.config.max_position_embeddings:
            raise LLMRuntimeError(f"Error occurred generating embeddings: {T} tokens exceed "
                                  f"max_position_embeddings={self.model.config.max_position_embeddings}")
        if self._spin_model is None:
            self._spin_model = self.model.with_hidden_act("gelu_new")
        hidden = self._spin_model(batch, np.ones_like(batch))  # [N, T, H]  no mask: padding attended to
        return spin_normalize(spin_pool(hidden)), T  # [N, H]


def _encode(tokenizer: Tokenizer, texts: list[str]):
    try:
        return tokenizer.encode_batch(texts, add_special_tokens=True)
    except Exception as e:  # e.g. a lone surrogate in a str
        raise InvalidInputError(f"texts could not be tokenized ({e})") from e
