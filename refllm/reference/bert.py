"""BERT, the encoder of sentence-embedding models, in the plainest NumPy: the reference
that `refllm.bert` is checked against.

    Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers"

One forward pass, read top to bottom, following transformers' `models/bert/modeling_bert.py`
(BertModel without the pooler, eager attention) piece by piece:

    modeling_bert.py                        here
    BertEmbeddings                          words + token types + positions, LayerNorm
    get_extended_attention_mask             an additive mask: 0 on real keys, -inf on padding
    BertSelfAttention (eager)               Bert.self_attention: softmax(q k^T / sqrt(HD) + mask) v
    BertSelfOutput, BertOutput              dense, + residual, LayerNorm (post-LN)
    BertIntermediate                        dense, GELU: the exact erf form for "gelu",
                                              the tanh form for gelu_new / gelu_pytorch_tanh / gelu_fast

Every tensor is computed at every position of the padded [B, T] batch, padding included,
as transformers does (a padded query attends to the real keys; its state is computed,
and every pooling masks it away). `refllm.bert.Bert` computes only the real tokens and
returns zeros at padded positions; the two agree on the real ones.

Nothing here comes from `refllm.ops` or `refllm.bert` (no fused projections, no
unpadding, no blocked erf): an independent second opinion, written for reading. Only
the config (`refllm.config`) and the safetensors reader (`refllm.checkpoint`) are shared.
Tensors stay in the model's dtype (float32 or float64); erf is scipy's.
Shape letters are `refllm.config`'s: B texts, T tokens, H hidden, NH heads, HD = H / NH, F.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.special

from ..checkpoint import StrictLoader, load_checkpoint
from ..config import BertConfig


def layer_norm(x, weight, bias, eps):  # [..., H], [H], [H] -> [..., H]
    mean = np.mean(x, axis=-1, keepdims=True)  # [..., 1]
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)  # [..., 1], the biased variance
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):  # [...] -> [...]: x * Phi(x), Hendrycks & Gimpel 2016
    return 0.5 * x * (1 + scipy.special.erf(x / math.sqrt(2)))


def gelu_tanh(x):  # [...] -> [...]: the tanh approximation (transformers' NewGELUActivation)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):  # [..., S] -> [..., S]
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


class Bert:
    """`refllm.Bert`'s interface: `from_pretrained(dir, dtype)`, then
    `model(input_ids, attention_mask, token_type_ids)` [B, T] x3 -> [B, T, H]."""

    backend = "reference"

    def __init__(self, config: BertConfig, weights: dict[str, np.ndarray], dtype=np.float32):
        self.config, self.weights, self.dtype = config, weights, np.dtype(dtype)  # weights: names without "bert."
        self.act = gelu if config.hidden_act == "gelu" else gelu_tanh

    @classmethod
    def from_pretrained(cls, model_dir, dtype=np.float32) -> "Bert":
        """config.json (all-MiniLM-L6-v2's shape without one) and the safetensors weights,
        strictly; a `bert.` prefix (BertFor* checkpoints) is accepted, the pooler ignored."""
        model_dir = Path(model_dir)
        c = BertConfig.from_file(model_dir / "config.json") if (model_dir / "config.json").is_file() else BertConfig()
        H, F = c.hidden_size, c.intermediate_size
        shapes = {"embeddings.word_embeddings.weight": (c.vocab_size, H),  # name -> shape
                  "embeddings.position_embeddings.weight": (c.max_position_embeddings, H),
                  "embeddings.token_type_embeddings.weight": (c.type_vocab_size, H),
                  "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,)}
        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for name, out, inp in [("attention.self.query", H, H), ("attention.self.key", H, H),
                                   ("attention.self.value", H, H), ("attention.output.dense", H, H),
                                   ("intermediate.dense", F, H), ("output.dense", H, F)]:
                shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (out, inp), (out,)
            for name in ("attention.output.LayerNorm", "output.LayerNorm"):
                shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (H,)
        tensors = load_checkpoint(model_dir)
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
        ignore = (prefix + "pooler.", prefix + "embeddings.position_ids") + (("cls.",) if prefix else ())
        w = StrictLoader(tensors, dtype, str(model_dir), ignore_prefixes=ignore)
        weights = {name: w.take(prefix + name, shape) for name, shape in shapes.items()}
        w.finish()
        return cls(c, weights, dtype)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):  # [B, T] x3 -> [B, T, H]
        """Last hidden states; `attention_mask` is 1 on real tokens, 0 on padding
        (default: all real), `token_type_ids` default to 0."""
        c, w = self.config, self.weights
        ids = np.asarray(input_ids, dtype=np.int64)  # [B, T]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)  # [B, T]
        types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, dtype=np.int64)  # [B, T]
        B, T = ids.shape
        if ids.min() < 0 or ids.max() >= c.vocab_size or T > c.max_position_embeddings:
            raise ValueError(f"token ids must be in [0, {c.vocab_size}), at most {c.max_position_embeddings} a text")

        x = (w["embeddings.word_embeddings.weight"][ids]  # [B, T, H]
             + w["embeddings.token_type_embeddings.weight"][types]  # [B, T, H]
             + w["embeddings.position_embeddings.weight"][np.arange(T)])  # [T, H], positions 0 .. T-1
        x = self.layer_norm(x, "embeddings.LayerNorm")  # [B, T, H]
        additive = np.where(mask > 0, 0.0, -np.inf).astype(self.dtype)[:, None, None, :]  # [B, 1, 1, T], per key
        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."
            a = self.self_attention(p + "attention.self.", x, additive)  # [B, T, H]
            x = self.layer_norm(self.linear(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")  # [B, T, H]
            h = self.act(self.linear(x, p + "intermediate.dense"))  # [B, T, F]
            x = self.layer_norm(self.linear(h, p + "output.dense") + x, p + "output.LayerNorm")  # [B, T, H]
        return x

    def self_attention(self, p, x, additive):  # [B, T, H], [B, 1, 1, T] -> [B, T, H]
        B, T, H = x.shape
        NH = self.config.num_attention_heads
        HD = H // NH
        q = self.linear(x, p + "query").reshape(B, T, NH, HD).transpose(0, 2, 1, 3)  # [B, NH, T, HD]
        k = self.linear(x, p + "key").reshape(B, T, NH, HD).transpose(0, 2, 1, 3)  # [B, NH, T, HD]
        v = self.linear(x, p + "value").reshape(B, T, NH, HD).transpose(0, 2, 1, 3)  # [B, NH, T, HD]
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HD) + additive  # [B, NH, T, T]
        out = softmax(scores) @ v  # [B, NH, T, HD]
        return out.transpose(0, 2, 1, 3).reshape(B, T, H)  # [B, T, H]

    def linear(self, x, name):  # [..., in] -> [..., out]: x @ W.T + b, W as stored [out, in]
        return x @ self.weights[name + ".weight"].T + self.weights[name + ".bias"]

    def layer_norm(self, x, name):  # [..., H] -> [..., H]
        return layer_norm(x, self.weights[name + ".weight"], self.weights[name + ".bias"], self.config.layer_norm_eps)
