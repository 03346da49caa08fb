"""BERT, the encoder of sentence-embedding models such as all-MiniLM-L6-v2, in NumPy.

    Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers"
    https://arxiv.org/abs/1810.04805

The forward pass follows transformers' `modeling_bert.py` (BertModel without the pooler,
eager attention) and candle's `candle-transformers/src/models/bert.rs`, which Spin's
local engine copies. Weight names are the checkpoint's, built by prefix the way candle's
`vb.pp(...)` builds them:

    embeddings.{word,position,token_type}_embeddings.weight     [V | P | 2, H]
    embeddings.LayerNorm.{weight,bias}                          [H]
    encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}   [H, H], [H]
    encoder.layer.{i}.attention.output.dense.{weight,bias}     [H, H], [H]
    encoder.layer.{i}.attention.output.LayerNorm.{weight,bias} [H]
    encoder.layer.{i}.intermediate.dense.{weight,bias}         [F, H], [F]
    encoder.layer.{i}.output.dense.{weight,bias}               [H, F], [H]
    encoder.layer.{i}.output.LayerNorm.{weight,bias}           [H]

(a `bert.` prefix in front of all of them is accepted too, as BertFor* checkpoints have).

Shape letters are those of `refllm.config`: B texts, T tokens per text (padded), H
hidden_size, NH heads, HD = H // NH, F intermediate_size, V vocab_size.

Precision: the weights are cast once, at load, to the model dtype (float32 by default,
float64 on request; float16 and bfloat16 on disk are widened exactly), and every tensor
of the forward pass stays in that dtype (see `refllm.ops`). Linear layers compute
`x @ W.T + b` with W as stored, `[out, in]`: no transposed copy is made, the BLAS call
reads W transposed (or, for a few rows, multiplies `W @ x.T`: see `linear`), and a
float32 checkpoint stays memory-mapped.

Backends: `from_pretrained(..., backend=...)` is chosen by `refllm.backend`; "triton"
returns `refllm.bert_triton.TritonBert`, which has the same surface. The forward
pass reaches every operator through `self.ops` (`linear` below and the functions of
`refllm.ops`: layer_norm, gelu, gelu_tanh, masked_attention), so another backend
supplies those in `_backend_ops` and keeps this file's data flow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import ops
from .checkpoint import StrictLoader, load_checkpoint
from .config import BertConfig
from .errors import InvalidInputError

BACKENDS = ("numpy", "triton")
DTYPES = (np.float32, np.float64)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # transformers' names for the tanh form


# ----------------------------------------------------------------------------------------
# Parameters: plain records, one per module of the checkpoint.


WEIGHT_FIRST_ROWS = 128  # up to this many rows, `linear` multiplies W @ x.T (see there)


def linear(x, weight, bias):  # [..., in], [out, in], [out] -> [..., out]
    """x @ W.T + b, as one 2-D GEMM over all the rows (NumPy runs a 3-D @ 2-D matmul
    as a loop of smaller ones, about twice slower here).

    Up to WEIGHT_FIRST_ROWS rows the product is taken as (W @ x.T).T, the weight's rows
    first: the same dot products, which OpenBLAS computes 1.6x (one thread) to 2x (two
    threads) faster than x @ W.T when the rows are few (one sentence is ~10 tokens).
    The gain shrinks as the rows grow (1.4x at 128, none at 256), and with 320 rows the
    transposed [N, out] result slows the operators after it: batch-32 embedding was 5%
    slower, batch-1 32% faster. (Measured on an Intel Xeon, OpenBLAS 0.3.31 SkylakeX
    kernels, MiniLM's four matrices: 12 rows, 1187 vs 607 us with two threads.)
    """
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    if x2.shape[0] <= WEIGHT_FIRST_ROWS:
        y = (weight @ x2.T).T  # [N, out], a column-major view of [out, N]
    else:
        y = x2 @ weight.T  # [N, out]
    y += bias  # in place: no second [N, out] array
    return y.reshape(*x.shape[:-1], weight.shape[0])


@dataclass
class Linear:
    weight: np.ndarray  # [out, in], as stored (torch.nn.Linear layout)
    bias: np.ndarray  # [out]


@dataclass
class LayerNorm:
    weight: np.ndarray  # [H]
    bias: np.ndarray  # [H]
    eps: float


@dataclass
class BertEmbeddings:
    word_embeddings: np.ndarray  # [V, H]
    position_embeddings: np.ndarray  # [max_position_embeddings, H]
    token_type_embeddings: np.ndarray  # [type_vocab_size, H]
    LayerNorm: LayerNorm


@dataclass
class BertLayer:
    """One encoder layer. `qkv` stacks the query, key and value projections by rows, so
    that one GEMM computes all three; `query`, `key` and `value` are views of its rows."""

    query: Linear  # attention.self.query         [H, H]
    key: Linear  # attention.self.key             [H, H]
    value: Linear  # attention.self.value         [H, H]
    attention_output: Linear  # attention.output.dense        [H, H]
    attention_norm: LayerNorm  # attention.output.LayerNorm  [H]
    intermediate: Linear  # intermediate.dense    [F, H]
    output: Linear  # output.dense                [H, F]
    output_norm: LayerNorm  # output.LayerNorm    [H]
    qkv: Linear | None = None  # query; key; value  [3H, H], [3H]

    def __post_init__(self):
        if self.qkv is None:
            parts = (self.query, self.key, self.value)
            self.qkv = Linear(np.concatenate([p.weight for p in parts]), np.concatenate([p.bias for p in parts]))
        H = self.query.weight.shape[0]
        self.query, self.key, self.value = (Linear(self.qkv.weight[i * H : (i + 1) * H], self.qkv.bias[i * H : (i + 1) * H])
                                            for i in range(3))


class _Prefix:
    """A StrictLoader seen through a name prefix, like candle's `vb.pp("...")`."""

    def __init__(self, loader: StrictLoader, prefix: str = ""):
        self.loader, self.prefix = loader, prefix

    def pp(self, name: str) -> "_Prefix":
        return _Prefix(self.loader, f"{self.prefix}{name}.")

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.loader.take(self.prefix + name, shape)

    def linear(self, n_in: int, n_out: int) -> Linear:
        return Linear(self.take("weight", (n_out, n_in)), self.take("bias", (n_out,)))

    def layer_norm(self, size: int, eps: float) -> LayerNorm:
        return LayerNorm(self.take("weight", (size,)), self.take("bias", (size,)), eps)


# ----------------------------------------------------------------------------------------
# The model.


class Bert:
    """BERT encoder: token ids and attention mask [B, T] -> last hidden states [B, T, H]."""

    def __init__(self, config: BertConfig, embeddings: BertEmbeddings, layers: list[BertLayer],
                 dtype=np.float32, backend: str = "numpy"):
        self.config, self.embeddings, self.layers = config, embeddings, layers
        self.dtype = np.dtype(dtype)
        self.backend = backend
        self.ops = _backend_ops(backend)
        self.act = self.ops.gelu if config.hidden_act == "gelu" else self.ops.gelu_tanh

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype=np.float32, backend: str | None = None) -> "Bert":
        """Load `model_dir`: config.json when present (else all-MiniLM-L6-v2's shape) and
        model.safetensors (or an index and shards), strictly: a missing, mis-shaped or
        unexpected tensor is a runtime-error naming it. `pooler.*` and
        `embeddings.position_ids` are ignored (and, under a `bert.` prefix, the task
        heads `cls.*`)."""
        from .backend import resolve_backend

        backend = resolve_backend(backend)  # "numpy" here; "triton" on CUDA (refllm.bert_triton)
        if backend == "triton":
            from .bert_triton import TritonBert

            return TritonBert.from_pretrained(model_dir, dtype=dtype)
        dtype = np.dtype(dtype)
        if dtype not in [np.dtype(d) for d in DTYPES]:
            raise ValueError(f"dtype {dtype} is not supported (float32, float64)")
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        config = BertConfig.from_file(config_path) if config_path.is_file() else BertConfig()
        c = config
        H, F = c.hidden_size, c.intermediate_size

        tensors = load_checkpoint(model_dir)
        prefix = "bert." if "embeddings.word_embeddings.weight" not in tensors and \
            "bert.embeddings.word_embeddings.weight" in tensors else ""
        ignore = (f"{prefix}pooler.", f"{prefix}embeddings.position_ids") + (("cls.",) if prefix else ())
        loader = StrictLoader(tensors, dtype, source=str(model_dir), ignore_prefixes=ignore)
        root = _Prefix(loader, prefix)

        e = root.pp("embeddings")
        embeddings = BertEmbeddings(
            word_embeddings=e.pp("word_embeddings").take("weight", (c.vocab_size, H)),
            position_embeddings=e.pp("position_embeddings").take("weight", (c.max_position_embeddings, H)),
            token_type_embeddings=e.pp("token_type_embeddings").take("weight", (c.type_vocab_size, H)),
            LayerNorm=e.pp("LayerNorm").layer_norm(H, c.layer_norm_eps),
        )
        layers = []
        for i in range(c.num_hidden_layers):
            p = root.pp(f"encoder.layer.{i}")
            layers.append(BertLayer(
                query=p.pp("attention.self.query").linear(H, H),
                key=p.pp("attention.self.key").linear(H, H),
                value=p.pp("attention.self.value").linear(H, H),
                attention_output=p.pp("attention.output.dense").linear(H, H),
                attention_norm=p.pp("attention.output.LayerNorm").layer_norm(H, c.layer_norm_eps),
                intermediate=p.pp("intermediate.dense").linear(H, F),
                output=p.pp("output.dense").linear(F, H),
                output_norm=p.pp("output.LayerNorm").layer_norm(H, c.layer_norm_eps),
            ))
        loader.finish()
        return cls(config, embeddings, layers, dtype=dtype, backend=backend)

    def with_hidden_act(self, hidden_act: str) -> "Bert":
        """The same weights (shared, not copied) with another activation; Spin's engine
        runs all-MiniLM-L6-v2 with the tanh GELU although its config says `gelu`."""
        config = dataclasses.replace(self.config, hidden_act=hidden_act)
        return Bert(config, self.embeddings, self.layers, dtype=self.dtype, backend=self.backend)

    # -- forward -------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):  # [B, T], [B, T], [B, T] -> [B, T, H]
        """Last hidden states. `attention_mask` is 1 for real tokens and 0 for padding
        (default: all real); padded keys are never attended to, so a real token's state
        does not depend on the padding. Padded positions come out as zeros (transformers
        gives them states that every pooling masks away; they are computed here from
        nothing at all, see below).

        Unpadding (as Hugging Face's text-embeddings-inference does, and FlashAttention's
        variable-length kernels): every operator but attention acts on each token alone,
        so the layers carry the N real tokens as rows of an [N, H] matrix, and only
        attention sees the [B, T] batch, scattered into it and gathered back. 32 short
        sentences padded to the longest are 448 positions for 320 tokens: the linear
        layers, GELU and LayerNorm then do 29% less work.
        """
        ids, mask, types = self._check_inputs(input_ids, attention_mask, token_type_ids)
        B, T = ids.shape
        real = np.nonzero(mask > 0)  # ([N], [N]): batch row and position of each real token
        x = self.embed(ids[real], types[real], real[1])  # [N, H]
        for layer in self.layers:
            x = self.encoder_layer(layer, x, real, mask)  # [N, H]
        out = np.zeros((B, T, x.shape[-1]), dtype=self.dtype)  # [B, T, H]
        out[real] = x
        return out

    def embed(self, ids, types, positions):  # [N], [N], [N] -> [N, H]
        """Word + token-type + position embeddings, then LayerNorm (BertEmbeddings).
        Positions are absolute, 0 .. T-1 within each text's row (transformers' default
        position_ids), whatever the mask."""
        e = self.embeddings
        x = e.word_embeddings[ids] + e.token_type_embeddings[types]  # [N, H]
        x += e.position_embeddings[positions]
        return self.norm(x, e.LayerNorm)  # [N, H]

    def encoder_layer(self, layer: BertLayer, x, real, mask):  # [N, H], ([N], [N]), [B, T] -> [N, H]
        """Self-attention then the MLP, each followed by residual + LayerNorm (post-LN)."""
        (B, T), (N, H) = mask.shape, x.shape
        NH = self.config.num_attention_heads
        HD = H // NH

        qkv = self.linear(x, layer.qkv)  # [N, 3H]
        if N < B * T:  # padding: attention needs the [B, T] batch, padded with zeros
            padded = np.zeros((B, T, 3 * H), dtype=qkv.dtype)  # [B, T, 3H]
            padded[real] = qkv
            qkv = padded
        q, k, v = qkv.reshape(B, T, 3, NH, HD).transpose(2, 0, 3, 1, 4)  # [B, NH, T, HD] x3
        a = self.ops.masked_attention(q, k, v, mask)  # [B, NH, T, HD]
        a = a.transpose(0, 2, 1, 3)  # [B, T, NH, HD]
        a = (a[real] if N < B * T else a).reshape(N, H)  # [N, H], the real tokens again
        x = self.norm(self.linear(a, layer.attention_output) + x, layer.attention_norm)  # [N, H]

        h = self.act(self.linear(x, layer.intermediate))  # [N, F]
        return self.norm(self.linear(h, layer.output) + x, layer.output_norm)  # [N, H]

    def linear(self, x, p: Linear):  # [..., in] -> [..., out]
        return self.ops.linear(x, p.weight, p.bias)

    def norm(self, x, p: LayerNorm):  # [..., H] -> [..., H]
        return self.ops.layer_norm(x, p.weight, p.bias, p.eps)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        c = self.config
        try:
            ids = np.asarray(input_ids, dtype=np.int64)  # [B, T]
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)  # [B, T]
            types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, dtype=np.int64)  # [B, T]
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"input_ids, attention_mask and token_type_ids must be rectangular [B, T] integer arrays ({err})") from err
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InvalidInputError(f"input_ids must have shape [B, T] with B, T >= 1, got {list(ids.shape)}")
        if mask.shape != ids.shape or types.shape != ids.shape:
            raise InvalidInputError(f"attention_mask {list(mask.shape)} and token_type_ids {list(types.shape)} must match input_ids {list(ids.shape)}")
        if ids.shape[1] > c.max_position_embeddings:
            raise InvalidInputError(f"{ids.shape[1]} tokens exceed max_position_embeddings={c.max_position_embeddings}")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise InvalidInputError(f"token ids must be in [0, {c.vocab_size}), got {ids.min()} .. {ids.max()}")
        if types.min() < 0 or types.max() >= c.type_vocab_size:
            raise InvalidInputError(f"token_type_ids must be in [0, {c.type_vocab_size})")
        if not (mask > 0).any(axis=1).all():
            raise InvalidInputError("every row of attention_mask needs at least one real token")
        return ids, mask, types


def _backend_ops(backend: str):
    """The operators a backend computes with (the functions of `refllm.ops` for numpy)."""
    if backend == "numpy":
        return SimpleNamespace(linear=linear, layer_norm=ops.layer_norm, gelu=ops.gelu, gelu_tanh=ops.gelu_tanh,
                               masked_attention=ops.masked_attention)
    raise ValueError(f"backend {backend!r} is not supported; choose one of {', '.join(map(repr, BACKENDS))}")


__all__ = ["Bert", "BertEmbeddings", "BertLayer", "LayerNorm", "Linear", "linear", "BACKENDS"]
