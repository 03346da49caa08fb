"""The Llama decoder in NumPy, one forward pass from token ids to logits.

Follows Hugging Face's `modeling_llama.py` (LlamaForCausalLM) and Meta's reference
`llama/model.py` (Touvron et al. 2023, "LLaMA" and "Llama 2"):

    h = embed_tokens[ids]
    for each layer:
        h = h + o_proj(attention(rope(q_proj(rms_norm(h))), rope(k_proj(.)), v_proj(.)))
        h = h + down_proj(silu(gate_proj(rms_norm(h))) * up_proj(rms_norm(h)))
    logits = lm_head(rms_norm(h))          # lm_head = embed_tokens when tied

- RMSNorm (Zhang & Sennrich 2019) before attention and MLP, and at the end.
- RoPE (Su et al. 2021) in the rotate-half layout of Hugging Face checkpoints, with
  the `default`, `linear` and `llama3` frequency scalings.
- Grouped-query attention (Ainslie et al. 2023): NKV key/value heads shared by NH
  query heads, never materialised NH times.
- SwiGLU MLP (Shazeer 2020).
- A preallocated KV cache, so decoding one token costs one pass over the weights;
  `Llama.decode` is that one-token step again, in as few NumPy calls as it takes.
- The same decoder is transformers' MistralForCausalLM (`modeling_mistral.py`, a
  sliding window: `LlamaConfig` ends the context there) and Qwen2ForCausalLM
  (`modeling_qwen2.py`: biases on q_proj, k_proj, v_proj); a Llama may have biases on
  every projection (`attention_bias`, `mlp_bias`). A bias is added right after its
  product, where the layer has one (`LlamaConfig.qkv_bias`, `o_bias`, `mlp_biases`).

Weight names are the safetensors keys; shape letters are defined in `refllm.config`.
Where the weights sit in memory is `refllm.llama_loader`'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ops
from .checkpoint import load_checkpoint
from .config import LlamaConfig
from .errors import LLMRuntimeError


@dataclass
class LlamaLayer:
    """One decoder layer's weights, with the checkpoint's [out, in] shapes.

    The three attention projections are rows of one fused matrix, and so are the
    gate and up projections, so that one pass over `qkv_proj` (or `gate_up_proj`)
    computes all of them: one matrix-vector product per step instead of three (or
    two). `q_proj` .. `up_proj` are views of their rows, with the checkpoint's shapes.
    Built from the nine separate matrices, a layer fuses them itself.

    Where the matrices sit in memory (fused, Fortran order, huge pages) is decided when
    loading, by `refllm.llama_loader`; shapes and values are the checkpoint's.
    """

    input_layernorm: np.ndarray  # [D]
    q_proj: np.ndarray  # [NH*HD, D]
    k_proj: np.ndarray  # [NKV*HD, D]
    v_proj: np.ndarray  # [NKV*HD, D]
    o_proj: np.ndarray  # [D, NH*HD]
    post_attention_layernorm: np.ndarray  # [D]
    gate_proj: np.ndarray  # [F, D]
    up_proj: np.ndarray  # [F, D]
    down_proj: np.ndarray  # [D, F]
    qkv_proj: np.ndarray | None = None  # [(NH+2*NKV)*HD, D] = q_proj; k_proj; v_proj
    gate_up_proj: np.ndarray | None = None  # [2F, D] = gate_proj; up_proj
    # Biases, where the architecture has them (LlamaConfig.qkv_bias, o_bias, mlp_biases), else None:
    qkv_bias: np.ndarray | None = None  # [(NH+2*NKV)*HD] = q_proj.bias; k_proj.bias; v_proj.bias
    o_bias: np.ndarray | None = None  # [D], o_proj.bias
    gate_up_bias: np.ndarray | None = None  # [2F] = gate_proj.bias; up_proj.bias
    down_bias: np.ndarray | None = None  # [D], down_proj.bias

    def __post_init__(self):
        if self.qkv_proj is None:
            self.qkv_proj = np.asfortranarray(np.concatenate([self.q_proj, self.k_proj, self.v_proj]))  # [(NH+2*NKV)*HD, D]
        if self.gate_up_proj is None:
            self.gate_up_proj = np.asfortranarray(np.concatenate([self.gate_proj, self.up_proj]))  # [2F, D]
        # The separate projections are views of the fused rows: one copy of each weight.
        q, k = self.q_proj.shape[0], self.k_proj.shape[0]
        self.q_proj, self.k_proj, self.v_proj = np.split(self.qkv_proj, [q, q + k])
        self.gate_proj, self.up_proj = np.split(self.gate_up_proj, [self.gate_proj.shape[0]])


@dataclass
class StepBuffers:
    """The arrays one decode step of B sequences writes (`Llama.decode_batch`; `decode`
    is B = 1): row b is sequence b's. Allocated per step (six `np.empty`s: microseconds),
    so a model serves steps from many threads at once."""

    x: np.ndarray  # [B, D], normalised hidden states
    qkv: np.ndarray  # [B, (NH+2*NKV)*HD]
    qk: np.ndarray  # [B, NH+NKV, HD], queries and keys after RoPE
    out: np.ndarray  # [B, D], the o_proj or down_proj products
    gate_up: np.ndarray  # [B, 2F]
    act: np.ndarray  # [B, F], silu(gate) * up

    @classmethod
    def allocate(cls, c: LlamaConfig, B: int, dtype):
        NH, NKV, HD, D, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
        return cls(np.empty((B, D), dtype), np.empty((B, (NH + 2 * NKV) * HD), dtype), np.empty((B, NH + NKV, HD), dtype),
                   np.empty((B, D), dtype), np.empty((B, 2 * F), dtype), np.empty((B, F), dtype))


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Fixed buffers of `max_len` positions, allocated once in the model's dtype; `pos` is
    the number of positions filled. A forward pass over T new tokens writes positions
    pos .. pos+T-1 of every layer, then advances `pos` by T.

    Layout [L, NKV, max_len, HD], head-major as transformers' cache: attention reads each
    key/value head's positions as one contiguous [S, HD] block. (Position-major
    [L, max_len, NKV, HD] interleaves the heads, and a decode step's attention then
    reads 256-byte runs 768 bytes apart: 30% slower at 600 positions on SmolLM2.)
    """

    def __init__(self, config: LlamaConfig, max_len: int, dtype=np.float32):
        self.k, self.v = self.allocate(self.shape(config, max_len), dtype)
        self.max_len = max_len
        self.pos = 0
        self.dtype = dtype

    @staticmethod
    def shape(c: LlamaConfig, max_len: int):  # [L, NKV, max_len, HD]; the triton backend's cache has its own
        return c.num_hidden_layers, c.num_key_value_heads, max_len, c.head_dim

    @staticmethod
    def allocate(shape, dtype):  # -> two zero buffers of `shape`; the triton backend's cache allocates torch ones
        return np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=dtype)

    def check_room(self, T: int) -> None:
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} positions > {self.max_len}")

    def update(self, layer: int, k, v):  # [T, NKV, HD] x2 -> [S, NKV, HD] x2 (views), S = pos + T
        T = k.shape[0]
        self.check_room(T)
        self.k[layer, :, self.pos : self.pos + T] = k.transpose(1, 0, 2)
        self.v[layer, :, self.pos : self.pos + T] = v.transpose(1, 0, 2)
        S = self.pos + T
        return self.k[layer, :, :S].transpose(1, 0, 2), self.v[layer, :, :S].transpose(1, 0, 2)

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0


DECODE_BATCH_MODES = ("invariant", "throughput")  # see Llama.decode_batch


def check_batch(config: LlamaConfig, tokens, caches, mode: str):  # -> (list of int, list of caches)
    """The arguments of a `decode_batch`, checked before any cache is written, so that
    a bad batch leaves every sequence as it was (ValueError naming the fault)."""
    if mode not in DECODE_BATCH_MODES:
        raise ValueError(f"unknown decode_batch mode {mode!r}; choose one of {', '.join(DECODE_BATCH_MODES)}")
    tokens, caches = [int(t) for t in tokens], list(caches)
    if len(tokens) != len(caches):
        raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
    if len({id(cache) for cache in caches}) != len(caches):
        raise ValueError("a cache appears twice in the batch: each sequence needs its own")
    for token, cache in zip(tokens, caches):
        if not 0 <= token < config.vocab_size:
            raise ValueError(f"token id out of range [0, {config.vocab_size})")
        cache.check_room(1)
    return tokens, caches


class Llama:
    """A Llama-family causal language model.

    >>> model = Llama.from_pretrained("path/to/model")
    >>> logits = model([1, 2, 3])            # [T, V], every position
    >>> cache = model.new_cache(64)
    >>> last = model([1, 2, 3], cache, last_only=True)   # [1, V], the cache holds 3 positions
    >>> nxt = model.decode(7, cache)                      # [V], position 3, one token at a time
    >>> rows = model.decode_batch([7, 9], [cache, other])  # [2, V], each row as decode gives it
    """

    backend = "numpy"

    def __init__(self, config: LlamaConfig, embed_tokens, layers: list[LlamaLayer], norm, lm_head, dtype=np.float32):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.embed_tokens = embed_tokens  # [V, D]
        self.layers = layers
        self.norm = norm  # [D]
        self.lm_head = lm_head  # [V, D], the same array as embed_tokens when tied
        self.inv_freq = ops.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)  # [HD/2] float64
        empty = np.empty((0, config.head_dim), dtype=self.dtype)
        self.rope = (empty, empty)  # cos, sin: [P, HD] x2, grown by rope_tables

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model_dir, dtype=np.float32, backend: str | None = None, widen_on_use: bool | None = None):
        """Load config.json and the safetensors weights of `model_dir`, strictly.

        Every tensor the architecture needs must be present with its shape; a tensor the
        architecture does not use is an error too. `backend` is chosen by
        `refllm.backend.resolve_backend` ("numpy" here; "triton" on CUDA). `model_dir`
        may also be a `.gguf` file, converted once (`refllm.weights.pull.local_model_dir`).

        `widen_on_use`: keep bfloat16/float16 matrices in the mapped file and widen them
        to `dtype` a block of rows at a time as a layer multiplies by them
        (`refllm.half_weights`: a 7B model in its 13.5 GB + ~0.6 GB instead of 27 GB).
        None chooses it when the copy in `dtype` would not fit in the memory available.
        """
        from .backend import resolve_backend

        if resolve_backend(backend) == "triton":
            from .llama_triton import TritonLlama

            return TritonLlama.from_pretrained(model_dir, dtype=dtype)
        from .weights.pull import local_model_dir

        model_dir = local_model_dir(model_dir)
        try:
            config = LlamaConfig.from_file(model_dir / "config.json")
        except ValueError as e:
            raise LLMRuntimeError(f"{model_dir / 'config.json'}: {e}") from e
        return cls.from_state_dict(config, load_checkpoint(model_dir), dtype=dtype, source=str(model_dir),
                                   widen_on_use=widen_on_use)

    @classmethod
    def from_state_dict(cls, config: LlamaConfig, tensors, dtype=np.float32, source="state dict",
                        widen_on_use: bool | None = None):
        """The model from checkpoint tensors named as Hugging Face's, strictly: each one
        present with its shape, none left over. Where each lands in memory (fused, in
        Fortran order, on huge pages, or left in the file) is `refllm.llama_loader`'s job."""
        from .llama_loader import LlamaLoader

        c = config
        D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
        NH, NKV, HD = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        w = LlamaLoader(tensors, dtype, source, widen_on_use)
        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            q, k, v = p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"
            o, gate, up, down = p + "self_attn.o_proj", p + "mlp.gate_proj", p + "mlp.up_proj", p + "mlp.down_proj"
            layers.append(w.layer(
                input_layernorm=(p + "input_layernorm.weight", (D,)),
                qkv_proj=[(q + ".weight", (NH * HD, D)), (k + ".weight", (NKV * HD, D)), (v + ".weight", (NKV * HD, D))],
                o_proj=(o + ".weight", (D, NH * HD)),
                post_attention_layernorm=(p + "post_attention_layernorm.weight", (D,)),
                gate_up_proj=[(gate + ".weight", (F, D)), (up + ".weight", (F, D))],
                down_proj=(down + ".weight", (D, F)),
                # biases: Qwen2's q/k/v; Llama's with attention_bias, mlp_bias (LlamaConfig.qkv_bias, ...)
                qkv_bias=[(q + ".bias", (NH * HD,)), (k + ".bias", (NKV * HD,)), (v + ".bias", (NKV * HD,))]
                if c.qkv_bias else None,
                o_bias=[(o + ".bias", (D,))] if c.o_bias else None,
                gate_up_bias=[(gate + ".bias", (F,)), (up + ".bias", (F,))] if c.mlp_biases else None,
                down_bias=[(down + ".bias", (D,))] if c.mlp_biases else None,
            ))
        embed_tokens = w.embedding("model.embed_tokens.weight", (V, D))  # [V, D]
        norm = w.vector(("model.norm.weight", (D,)))  # [D]
        # Tied, the head is the embedding, unless the file has an lm_head.weight of its own:
        # transformers then leaves the two untied and uses the file's head.
        if c.tie_word_embeddings and not w.has("lm_head.weight"):
            lm_head = w.tied_head(embed_tokens, "model.embed_tokens.weight", (V, D))  # [V, D]
        else:
            lm_head = w.head("lm_head.weight", (V, D))  # [V, D]
        w.finish()
        return cls(c, embed_tokens, layers, norm, lm_head, dtype=dtype)

    # ---------------------------------------------------------------- forward

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, max_len or self.config.max_position_embeddings, self.dtype)

    def __call__(self, ids, cache: KVCache | None = None, last_only: bool = False):  # [T] -> [T, V] (or [1, V])
        """Logits for `ids`, the tokens at positions cache.pos .. cache.pos + T - 1.

        Without a cache the ids are the whole sequence. With one, the keys and values of
        these tokens are appended to it. `last_only` computes the head for the last
        position alone, which is all that generation needs.
        """
        c = self.config
        ids = np.asarray(ids, dtype=np.int64)  # [T]
        T = ids.shape[0]
        if T == 0:
            raise ValueError("no tokens to run")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(f"token id out of range [0, {c.vocab_size})")
        if cache is None:
            cache = self.new_cache(T)
        start = cache.pos
        cos, sin = self.rope_tables(start, T)  # [T, HD] x2

        h = self.embed_tokens[ids].astype(self.dtype, copy=False)  # [T, D], the residual stream (a copy: fancy indexing)
        for i, layer in enumerate(self.layers):
            h += self.attention(i, layer, ops.rms_norm(h, layer.input_layernorm, c.rms_norm_eps), cos, sin, cache, start)
            h += self.mlp(layer, ops.rms_norm(h, layer.post_attention_layernorm, c.rms_norm_eps))
        cache.advance(T)

        if last_only:
            h = h[-1:]  # [1, D]
        h = ops.rms_norm(h, self.norm, c.rms_norm_eps)  # [T, D]
        return h @ self.lm_head.T  # [T, V]

    def decode(self, token: int, cache: KVCache):  # () -> [V]
        """The logits of one new token at position cache.pos, appended to the cache.

        The same computation as `self([token], cache, last_only=True)[0]`, written for
        the fewest NumPy calls and allocations: it is `decode_batch` of one sequence
        (`_decode_rows`), so a row of any batch is this very computation. Through
        `__call__`, one token costs ~60 small operations per layer besides the four
        matrix-vector products, and each costs 3-5 us (its arithmetic is tiny, but the
        weights streaming through the caches have evicted the interpreter's and NumPy's
        own working set): 6-7 ms of a ~25 ms token on SmolLM2. Here:
        - RMSNorm's mean square is a dot product per row and its scale a Python float
          (`ops.rms_norm_rows`);
        - RoPE is the rotation matrix of this position, built once for all layers
          (`ops.rope_matrix`), one product for the queries and keys of a layer;
        - the projections multiply the matrices by the vector (`W @ x`), no transposes,
          into buffers allocated once for the step (`StepBuffers`), so the same few
          kilobytes are written every layer instead of fresh ones.
        Attention is `ops.causal_attention` itself. `tests/test_llama.py` checks the
        logits against `__call__`, in float32 and float64.
        """
        tokens, caches = check_batch(self.config, [token], [cache], "invariant")
        return self._decode_rows(tokens, caches)[0]  # [V]

    # ---------------------------------------------------------------- many sequences

    def decode_batch(self, tokens, caches, mode: str = "invariant"):  # [B] -> [B, V]
        """One step for B sequences at once: the logits of `tokens[b]` at position
        `caches[b].pos` of its own cache, each cache advanced by one.

        The sequences may sit at any positions and come and go between steps (a
        continuous-batching scheduler calls this with whichever are live). Two modes:

        "invariant" (the default): row b is bit for bit `self.decode(tokens[b],
        caches[b])`, whatever else is in the batch: `decode` is this step for a batch of
        one, and no number of a row depends on the other rows or on how many there are
        (`_decode_rows`); batching changes only the order of the work. The B
        matrix-vector products with a matrix run back to back, so the first reads it
        from memory and the other B - 1 mostly from the caches (a layer's matrices are
        1-7 MB on SmolLM2, the shared L3 32 MB), and the head, too large for any cache,
        is taken by blocks of rows (`head_rows`), each block read once for the whole
        batch. A decode step is bound by reading the weights, so B
        steps cost far less than B single steps. (A plain `X @ W.T` over the B rows is
        not invariant: BLAS picks its kernel and its summation order by the number of
        rows, and row 0 of a 2-row product differs from the 1-row one in the last bits.)

        "throughput": one matrix-matrix product per matrix over the B rows, as
        `__call__` does for the T positions of a prompt. It reads each weight once per
        step and is faster again at large B, but its rows differ from `decode`'s by
        float rounding: within 1e-5 (float32) or 1e-13 (float64) of the row's largest
        |logit| (`tests/test_batch_invariance.py` holds it to that; seen: 5e-7 and 1e-15),
        so a greedy choice changes only at a near tie. Below THROUGHPUT_MIN_BATCH rows it
        takes the invariant step, which is faster there. Attention is per sequence in
        both modes.
        """
        tokens, caches = check_batch(self.config, tokens, caches, mode)
        if not tokens:
            return np.empty((0, self.config.vocab_size), dtype=self.dtype)
        gemm = mode == "throughput" and len(tokens) >= self.THROUGHPUT_MIN_BATCH
        return (self._decode_gemm if gemm else self._decode_rows)(tokens, caches)

    # The smallest batch the throughput mode multiplies as one matrix. OpenBLAS's gemm at
    # 2 rows is slower than 2 matrix-vector products: SmolLM2, 2 cores of an AMD EPYC,
    # `refllm bench --streams 1,2,4,8`, three runs: 2 streams 43-44 tok/s in rows, 29-32
    # as a gemm; 4 streams 50-60 either way; 8 streams 70-81 in rows, 92-98 as a gemm.
    THROUGHPUT_MIN_BATCH = 4

    def _decode_rows(self, tokens, caches):  # [B] -> [B, V], row b as `decode(tokens[b], caches[b])`
        """The invariant step. Every product that mixes numbers of one sequence is a call
        of that sequence's own, the same whatever the batch: the four matrix-vector
        products (`W @ x[b]`, B of them back to back, so the matrix is read from memory
        once and from the caches B - 1 times), RMSNorm's dot product, RoPE's rotation and
        attention. Only elementwise arithmetic (the residual adds, RMSNorm's scaling,
        SwiGLU, the biases), where each output element is one IEEE operation on its own
        inputs, runs over the [B, ...] rows at once: the same bits, in fewer calls."""
        c = self.config
        NH, NKV, HD, F, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.rms_norm_eps
        QK = (NH + NKV) * HD  # the query and key rows of qkv
        B = len(tokens)
        b = StepBuffers.allocate(c, B, self.dtype)
        Rs = [self.rope_matrix(cache.pos) for cache in caches]  # [HD, HD] each
        h = np.ascontiguousarray(self.embed_tokens[list(tokens)].astype(self.dtype))  # [B, D], the residual streams
        rows = range(B)
        for i, layer in enumerate(self.layers):
            x = ops.rms_norm_rows(h, layer.input_layernorm, eps, out=b.x)  # [B, D]
            for r in rows:  # the matrix B times in a row, while it is in the caches
                np.matmul(layer.qkv_proj, x[r], out=b.qkv[r])
            if layer.qkv_bias is not None:
                b.qkv += layer.qkv_bias
            attended = []  # B x [NH*HD]
            for r, (R, cache) in enumerate(zip(Rs, caches)):
                qk = np.matmul(b.qkv[r, :QK].reshape(NH + NKV, HD), R, out=b.qk[r])  # q and k rotated
                keys, values = cache.update(i, qk[None, NH:], b.qkv[r, QK:].reshape(1, NKV, HD))  # [S, NKV, HD] x2
                attended.append(ops.causal_attention(qk[None, :NH], keys, values, cache.pos).reshape(NH * HD))
            for r in rows:
                np.matmul(layer.o_proj, attended[r], out=b.out[r])
            h += b.out
            if layer.o_bias is not None:
                h += layer.o_bias

            x = ops.rms_norm_rows(h, layer.post_attention_layernorm, eps, out=b.x)
            for r in rows:
                np.matmul(layer.gate_up_proj, x[r], out=b.gate_up[r])
            if layer.gate_up_bias is not None:
                b.gate_up += layer.gate_up_bias
            act = ops.silu(b.gate_up[:, :F], out=b.act)  # [B, F]
            act *= b.gate_up[:, F:]
            for r in rows:
                np.matmul(layer.down_proj, act[r], out=b.out[r])
            h += b.out
            if layer.down_bias is not None:
                h += layer.down_bias
        for cache in caches:
            cache.advance(1)
        logits = np.empty((B, c.vocab_size), dtype=self.dtype)  # [B, V]
        return self.head_rows(ops.rms_norm_rows(h, self.norm, eps, out=b.x), logits)  # by blocks of the head's rows

    def _decode_gemm(self, tokens, caches):  # [B] -> [B, V], one product per matrix
        c = self.config
        NH, NKV, HD, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        B = len(tokens)
        Rs = [self.rope_matrix(cache.pos) for cache in caches]  # [HD, HD] each
        h = self.embed_tokens[tokens].astype(self.dtype, copy=False)  # [B, D] (a copy: fancy indexing)
        a = np.empty((B, NH * HD), dtype=self.dtype)  # [B, NH*HD], attention's outputs
        for i, layer in enumerate(self.layers):
            qkv = ops.rms_norm(h, layer.input_layernorm, eps) @ layer.qkv_proj.T  # [B, (NH+2*NKV)*HD]
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            for r, (R, cache) in enumerate(zip(Rs, caches)):
                qk = qkv[r, : (NH + NKV) * HD].reshape(NH + NKV, HD) @ R  # [NH+NKV, HD], q and k rotated
                keys, values = cache.update(i, qk[None, NH:], qkv[r, (NH + NKV) * HD :].reshape(1, NKV, HD))
                a[r] = ops.causal_attention(qk[None, :NH], keys, values, cache.pos).reshape(NH * HD)
            h += a @ layer.o_proj.T  # [B, D]
            if layer.o_bias is not None:
                h += layer.o_bias
            h += self.mlp(layer, ops.rms_norm(h, layer.post_attention_layernorm, eps))  # [B, D]
        for cache in caches:
            cache.advance(1)
        return ops.rms_norm(h, self.norm, eps) @ self.lm_head.T  # [B, V]

    def rope_matrix(self, pos: int):  # -> [HD, HD]
        """RoPE at position `pos` as a matrix (`ops.rope_matrix`), from the cached tables."""
        cos, sin = self.rope_tables(pos, 1)  # [1, HD] x2
        return ops.rope_matrix(cos[0], sin[0])

    def head_rows(self, xs, out):  # B x [D] -> [B, V], written into out
        """`lm_head @ x` for each x, by blocks of the head's rows: each block (under
        16 MB) is multiplied by every x while it is in the L3 cache, so the head (113 MB
        on SmolLM2) is read from memory once for the batch. `decode` takes its one row
        through here too, so a row's blocks are the same products alone or in a batch."""
        V, D = self.lm_head.shape
        rows = self.head_block_rows()
        for start in range(0, V, rows):
            block = self.lm_head[start : start + rows]  # [rows, D], a view
            for x, y in zip(xs, out):
                np.matmul(block, x, out=y[start : start + rows])
        return out

    # What one block of the head's rows may take. SmolLM2, 2 cores of an AMD EPYC with a
    # 32 MB L3, one step at 1 and 8 sequences, medians of 5 interleaved runs: 4 MB blocks
    # (1024 rows) 34.7 / 110.3 ms, 16 MB (4096 rows, 9.4 MB) 32.6 / 104.3, 32 MB 32.8 /
    # 104.7, 64 MB 33.3 / 130.9 (a block no longer stays in the L3 across the 8 rows).
    HEAD_BLOCK_BYTES = 16 << 20

    def head_block_rows(self) -> int:
        """Rows of the head per block: the largest power of two (at least 64) whose rows
        fit in HEAD_BLOCK_BYTES. A power of two keeps the blocks on the boundaries where
        BLAS's own row blocking falls."""
        D = self.lm_head.shape[1]
        rows = 64
        while 2 * rows * D * self.lm_head.itemsize <= self.HEAD_BLOCK_BYTES:
            rows *= 2
        return rows

    def rope_tables(self, start: int, T: int):  # -> [T, HD], [T, HD]
        """cos and sin of positions start .. start + T - 1, sliced from tables computed
        once (`ops.rope_tables`) and grown by doubling, so a decode step computes none."""
        end = start + T
        cos, sin = self.rope  # one read: a thread that grows the tables swaps the pair whole
        if end > cos.shape[0]:
            P = max(end, min(2 * cos.shape[0], self.config.max_position_embeddings))
            cos, sin = ops.rope_tables(np.arange(P), self.inv_freq, self.dtype)  # [P, HD] x2
            self.rope = (cos, sin)
        return cos[start:end], sin[start:end]

    def attention(self, i, layer: LlamaLayer, x, cos, sin, cache: KVCache, start: int):  # [T, D] -> [T, D]
        c = self.config
        T, NH, NKV, HD = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = x @ layer.qkv_proj.T  # [T, (NH+2*NKV)*HD]
        if layer.qkv_bias is not None:
            qkv += layer.qkv_bias
        qkv = qkv.reshape(T, NH + 2 * NKV, HD)  # [T, NH+2*NKV, HD]
        qk = ops.rope(qkv[:, : NH + NKV], cos, sin)  # [T, NH+NKV, HD]: q and k rotated together
        q, k, v = qk[:, :NH], qk[:, NH:], qkv[:, NH + NKV :]  # [T, NH, HD], [T, NKV, HD] x2
        keys, values = cache.update(i, k, v)  # [S, NKV, HD] x2
        out = ops.causal_attention(q, keys, values, start).reshape(T, NH * HD) @ layer.o_proj.T  # [T, D]
        if layer.o_bias is not None:
            out += layer.o_bias
        return out

    def mlp(self, layer: LlamaLayer, x):  # [T, D] -> [T, D]
        F = self.config.intermediate_size
        gate_up = x @ layer.gate_up_proj.T  # [T, 2F]
        if layer.gate_up_bias is not None:
            gate_up += layer.gate_up_bias
        out = (ops.silu(gate_up[:, :F]) * gate_up[:, F:]) @ layer.down_proj.T  # [T, D]
        if layer.down_bias is not None:
            out += layer.down_bias
        return out
