"""The Llama decoder on the `triton` backend: `refllm.llama`'s forward pass with torch
tensors, every operator a kernel of `refllm.kernels`.

Chosen by `Llama.from_pretrained(model_dir, backend="triton")` (the default where CUDA
is available, see `refllm.backend`). The weights are read by the numpy backend's own
strict loader and then moved to the device, so both backends accept and refuse exactly
the same checkpoints. Logits come back to the host as float32 NumPy arrays, and
sampling (SPEC 3) stays on the host: both backends pick the same tokens for the same
draws wherever their logits agree.

One layer, kernel by kernel (shape letters of `refllm.config`; S = P + T):

    x   = rms_norm(h += mlp_out)                         rms_norm, residual add fused
    qkv = x @ cat(q_proj, k_proj, v_proj).T              matmul            [T, (NH + 2 NKV) HD]
    q   = rope(q), in place in qkv                       rope              [T, NH, HD]
    cache.k[P : S] = rope(k)                             rope, written straight into the cache
    cache.v[P : S] = v                                   a copy            [T, NKV, HD]
    a   = attention(q, cache.k[:S], cache.v[:S])         causal_attention (prefill, T > 1) or
                                                         decode_attention (T = 1, split-K over S)
    x   = rms_norm(h += a.reshape(T, NH HD) @ o_proj.T)  matmul, rms_norm  [T, D]
    m   = silu(x @ gate.T) * (x @ up.T)                  matmul, act="swiglu", one kernel [T, F]
    mlp_out = m @ down_proj.T                            matmul            [T, D]

The residual stream h is float32 and is updated in place by the norm kernels; the
q/k/v and gate/up projections are the numpy Llama's fused matrices, so each reads x once.
Precision is the numpy backend's float32 mode: float32 storage, float32 (IEEE, not
TF32) products, RoPE tables computed on the host in float64 and rounded once. The
kernels compute in float32, so float64 stays the numpy backend's: asking the triton
backend for it raises a ValueError that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import ops
from .config import LlamaConfig
from .errors import LLMRuntimeError
from .llama import KVCache, Llama, check_batch

if TYPE_CHECKING:
    import torch


def _kernels():
    """refllm.kernels, imported on first use (it picks the interpreter without CUDA)."""
    from . import kernels

    return kernels


@dataclass
class TritonLlamaLayer:
    input_layernorm: torch.Tensor  # [D]
    qkv_proj: torch.Tensor  # [(NH + 2 NKV) HD, D] = cat(q_proj, k_proj, v_proj)
    o_proj: torch.Tensor  # [D, NH HD]
    post_attention_layernorm: torch.Tensor  # [D]
    gate_up_proj: torch.Tensor  # [2F, D] = cat(gate_proj, up_proj)
    down_proj: torch.Tensor  # [D, F]


class TritonKVCache(KVCache):
    """`refllm.llama.KVCache` with torch buffers on the kernels' device; the position
    bookkeeping (`pos`, `check_room`, `advance`, `reset`) is KVCache's own. The kernels
    write keys and values into the buffers directly (RoPE straight into the cache)."""

    def __init__(self, config: LlamaConfig, max_len: int, device, dtype=None):
        self.device = device
        super().__init__(config, max_len, dtype)

    @staticmethod
    def shape(c: LlamaConfig, max_len: int):  # [L, max_len, NKV, HD], position-major, as the kernels write it
        return c.num_hidden_layers, max_len, c.num_key_value_heads, c.head_dim

    def allocate(self, shape, dtype):  # -> [L, max_len, NKV, HD] x2, torch on the device
        import torch

        dtype = dtype or torch.float32
        return torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device)


class TritonLlama:
    """A Llama-family causal language model on the triton backend (see the module doc).

    >>> model = TritonLlama.from_pretrained("path/to/model")
    >>> logits = model([1, 2, 3])            # [T, V] float32 NumPy, every position
    """

    backend = "triton"

    def __init__(self, config: LlamaConfig, embed_tokens, layers: list[TritonLlamaLayer], norm, lm_head, device):
        self.config = config
        self.dtype = np.dtype(np.float32)
        self.device = device
        self.embed_tokens = embed_tokens  # [V, D]
        self.layers = layers
        self.norm = norm  # [D]
        self.lm_head = lm_head  # [V, D], the same tensor as embed_tokens when tied
        self.inv_freq = ops.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)  # [HD/2] float64
        self._cos = self._sin = None  # [P, HD] float32 tables, grown on demand

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model_dir, dtype=np.float32) -> "TritonLlama":
        """Load `model_dir` with the numpy backend's strict loader, then move it to the device."""
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"the triton backend computes in float32, not {np.dtype(dtype)}; "
                             "use backend='numpy' for float64")
        return cls.from_llama(Llama.from_pretrained(model_dir, dtype=np.float32, backend="numpy"))

    @classmethod
    def from_llama(cls, model: Llama) -> "TritonLlama":
        """The same weights as a loaded numpy `Llama`, as float32 tensors on the kernels' device."""
        import torch

        if model.dtype != np.float32:
            raise ValueError(f"the triton backend computes in float32, not {model.dtype}")
        c = model.config
        if c.qkv_bias or c.o_bias or c.mlp_biases:
            raise LLMRuntimeError(f"the triton backend has no projection biases (model_type={c.model_type!r}, "
                                  f"attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias}); use backend='numpy'")
        device = _kernels().device()

        def dev(a):  # numpy -> a float32 tensor on the device (a copy)
            return torch.tensor(np.asarray(a, dtype=np.float32), device=device)

        layers = [
            TritonLlamaLayer(
                input_layernorm=dev(layer.input_layernorm),
                qkv_proj=dev(layer.qkv_proj),
                o_proj=dev(layer.o_proj),
                post_attention_layernorm=dev(layer.post_attention_layernorm),
                gate_up_proj=dev(layer.gate_up_proj),
                down_proj=dev(layer.down_proj),
            )
            for layer in model.layers
        ]
        embed_tokens = dev(model.embed_tokens)
        lm_head = embed_tokens if model.lm_head is model.embed_tokens else dev(model.lm_head)
        return cls(model.config, embed_tokens, layers, dev(model.norm), lm_head, device)

    # ---------------------------------------------------------------- forward

    def new_cache(self, max_len: int | None = None) -> TritonKVCache:
        return TritonKVCache(self.config, max_len or self.config.max_position_embeddings, self.device)

    def rope_tables(self, start: int, T: int):  # -> [T, HD], [T, HD] float32 on the device
        """cos and sin of positions start .. start + T - 1 (refllm.ops.rope_tables, cached)."""
        import torch

        if self._cos is None or self._cos.shape[0] < start + T:
            P = max(start + T, self.config.max_position_embeddings)
            cos, sin = ops.rope_tables(np.arange(P), self.inv_freq, np.float32)  # [P, HD] x2
            self._cos, self._sin = torch.tensor(cos, device=self.device), torch.tensor(sin, device=self.device)
        return self._cos[start : start + T], self._sin[start : start + T]

    def decode(self, token: int, cache: TritonKVCache):  # () -> [V]
        """The logits of one new token at position cache.pos (`Llama.decode`'s
        interface): the forward pass at T = 1, whose kernels already take that path."""
        return self([token], cache, last_only=True)[0]

    def decode_batch(self, tokens, caches, mode: str = "invariant"):  # [B] -> [B, V]
        """`Llama.decode_batch`'s interface: one `decode` per sequence, in turn, so every
        row is `decode`'s in either mode. (A GPU step is not bound by re-reading the
        weights for each row the way the CPU's is; a batched kernel is left to come.)"""
        tokens, caches = check_batch(self.config, tokens, caches, mode)
        if not tokens:
            return np.empty((0, self.config.vocab_size), dtype=np.float32)
        return np.stack([self.decode(token, cache) for token, cache in zip(tokens, caches)])  # [B, V]

    def __call__(self, ids, cache: TritonKVCache | None = None, last_only: bool = False):  # [T] -> [T, V] (or [1, V])
        """Logits for `ids`, the tokens at positions cache.pos .. cache.pos + T - 1, as a
        float32 NumPy array on the host (see `refllm.llama.Llama.__call__`)."""
        import torch

        k = _kernels()
        c = self.config
        eps = c.rms_norm_eps
        ids = np.asarray(ids, dtype=np.int64)  # [T]
        T = ids.shape[0]
        if T == 0:
            raise ValueError("no tokens to run")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(f"token id out of range [0, {c.vocab_size})")
        if cache is None:
            cache = self.new_cache(T)
        cache.check_room(T)
        start = cache.pos
        cos, sin = self.rope_tables(start, T)  # [T, HD] x2

        h = self.embed_tokens[torch.as_tensor(ids, device=self.device)]  # [T, D], the residual stream (a copy)
        L = len(self.layers)
        x = k.rms_norm(h, self.layers[0].input_layernorm, eps) if L else h  # [T, D]
        for i, layer in enumerate(self.layers):
            a = self.attention(i, layer, x, cos, sin, cache, start)  # [T, D]
            x = k.rms_norm(a, layer.post_attention_layernorm, eps, residual=h)  # h += a; [T, D]
            m = k.matmul(k.matmul(x, layer.gate_up_proj, act="swiglu"), layer.down_proj)  # [T, F] -> [T, D]
            if i + 1 < L:
                x = k.rms_norm(m, self.layers[i + 1].input_layernorm, eps, residual=h)  # h += m; [T, D]
        cache.advance(T)

        rows = slice(T - 1, T) if last_only else slice(0, T)
        if L:
            x = k.rms_norm(m[rows], self.norm, eps, residual=h[rows])  # [T, D] (or [1, D])
        else:
            x = k.rms_norm(h[rows], self.norm, eps)
        logits = k.matmul(x, self.lm_head)  # [T, V]
        return logits.cpu().numpy()

    def attention(self, i: int, layer: TritonLlamaLayer, x, cos, sin, cache: TritonKVCache, start: int):  # [T, D] -> [T, D]
        k = _kernels()
        c = self.config
        T = x.shape[0]
        NH, NKV, HD = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        S = start + T
        qkv = k.matmul(x, layer.qkv_proj)  # [T, (NH + 2 NKV) HD]
        q = qkv[:, : NH * HD].unflatten(1, (NH, HD))  # [T, NH, HD], views into qkv
        key = qkv[:, NH * HD : (NH + NKV) * HD].unflatten(1, (NKV, HD))  # [T, NKV, HD]
        value = qkv[:, (NH + NKV) * HD :].unflatten(1, (NKV, HD))  # [T, NKV, HD]
        keys, values = cache.k[i], cache.v[i]  # [max_len, NKV, HD] x2
        k.rope(q, cos, sin, out=q)
        k.rope(key, cos, sin, out=keys[start:S])
        values[start:S].copy_(value)
        if T == 1:
            out = k.decode_attention(q, keys[:S], values[:S])  # [1, NH, HD]
        else:
            out = k.causal_attention(q, keys[:S], values[:S], start)  # [T, NH, HD]
        return k.matmul(out.reshape(T, NH * HD), layer.o_proj)  # [T, D]
