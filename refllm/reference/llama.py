"""The Llama decoder in the plainest NumPy: the reference `refllm.llama` is checked against.

One forward pass that reads top to bottom, as llama2.c's `run.c` and picoGPT's `gpt2.py`,
beside transformers' `models/llama/modeling_llama.py` (LlamaForCausalLM, eager attention):
`rms_norm` (LlamaRMSNorm), `rope_inv_freq` (modeling_rope_utils.py: default, linear,
llama3), `apply_rope` (rotate_half, apply_rotary_pos_emb), `repeat_kv`, `Llama.attention`
(eager_attention_forward: scores + an additive causal mask, softmax), `Llama.mlp`.
Each projection is its own matrix, with a bias where the config asks: `attention_bias`
(q, k, v, o), `mlp_bias` (gate, up, down), Qwen2's q, k, v (modeling_qwen2.py); an
explicit `head_dim` is read. Mistral is this architecture (its sliding window is not
modelled; nothing changes below the window's length). The KV cache is run.c's
key_cache / value_cache: a list of one [NKV, P, HD] array per layer.

Nothing comes from `refllm.ops` or `refllm.llama`: an independent second opinion, for
reading. Only the config (`refllm.config`) and the safetensors reader are shared. Tensors
stay in the model's dtype (float32 or float64); RoPE angles are computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.special

from ..checkpoint import StrictLoader, load_checkpoint
from ..config import LlamaConfig, read_json


# ------------------------------------------------------------------ the operators

def rms_norm(x, weight, eps):  # [T, D], [D] -> [T, D]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):  # [...] -> [...]
    return x * scipy.special.expit(x)  # x * sigmoid(x)


def softmax(x):  # [..., S] -> [..., S]
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def rope_inv_freq(c: LlamaConfig):  # -> [HD/2] float64
    """theta ** (-2i / HD), then scaled as `rope_scaling` says (transformers'
    modeling_rope_utils.py; llama3 as Meta's `apply_scaling` in llama-models)."""
    inv_freq = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)  # [HD/2]
    s = c.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions stretched by `factor`
        return inv_freq / s["factor"]
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a ramp between
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", c.max_position_embeddings)  # the pretraining context

        def scale(f):
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                return f
            if wavelen > old / low:
                return f / factor
            smooth = (old / wavelen - low) / (high - low)
            return (1 - smooth) * f / factor + smooth * f

        return np.array([scale(f) for f in inv_freq])
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def rope_cos_sin(positions, inv_freq, dtype):  # [T], [HD/2] -> [T, HD], [T, HD]
    angles = np.outer(positions, inv_freq)  # [T, HD/2], float64
    angles = np.concatenate([angles, angles], axis=-1)  # [T, HD]: dims i and i + HD/2 share an angle
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):  # [N, T, HD], [T, HD], [T, HD] -> [N, T, HD]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [N, T, HD], rotate_half(x)
    return x * cos + rotated * sin


def repeat_kv(x, n_rep):  # [NKV, S, HD] -> [NKV*n_rep, S, HD]: query head h reads key head h // n_rep
    return np.repeat(x, n_rep, axis=0)


def causal_mask(P, T, dtype):  # -> [T, P+T], added to the scores: query t at position P + t sees keys <= P + t
    query_pos = P + np.arange(T)[:, None]  # [T, 1]
    key_pos = np.arange(P + T)[None, :]  # [1, S]
    return np.where(key_pos <= query_pos, 0.0, -np.inf).astype(dtype)  # [T, S]


# ------------------------------------------------------------------ the model

@dataclass
class KVCache:
    """The keys and values of every position so far, one array per layer."""

    k: list[np.ndarray]  # L x [NKV, P, HD]
    v: list[np.ndarray]  # L x [NKV, P, HD]
    max_len: int

    @property
    def pos(self) -> int:  # P, the positions filled (the last layer is written last)
        return self.k[-1].shape[1]


class Llama:
    """`refllm.Llama`'s interface: `from_pretrained(dir, dtype)`, `model(ids, cache,
    last_only)` -> [T, V] logits, `new_cache(max_len)`, `decode(token, cache)` -> [V]."""

    backend = "reference"

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], dtype=np.float32):
        self.config, self.weights, self.dtype = config, weights, np.dtype(dtype)  # weights: safetensors names
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])  # [V, D]
        self.inv_freq = rope_inv_freq(config)  # [HD/2]

    @classmethod
    def from_pretrained(cls, model_dir, dtype=np.float32) -> "Llama":
        """config.json and the safetensors weights, strictly: every tensor below, nothing else."""
        path = Path(model_dir) / "config.json"
        raw = read_json(path)  # the bias flags are read here, with transformers' names and defaults
        c = LlamaConfig.from_dict({k: v for k, v in raw.items() if k not in ("attention_bias", "mlp_bias")}, path)
        D, F, V, NH, NKV, HD = (c.hidden_size, c.intermediate_size, c.vocab_size,
                                c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        attention_bias, mlp_bias = bool(raw.get("attention_bias")), bool(raw.get("mlp_bias"))
        qkv_bias = attention_bias or raw.get("model_type") == "qwen2"
        w = StrictLoader(load_checkpoint(model_dir), dtype, str(model_dir), ignore_prefixes=("model.rotary_emb.",))
        weights = {}

        def take(name, shape, bias=False):  # name.weight [out, in] (or [out]), and name.bias [out]
            weights[name + ".weight"] = w.take(name + ".weight", shape)
            if bias:
                weights[name + ".bias"] = w.take(name + ".bias", shape[:1])

        take("model.embed_tokens", (V, D))
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            take(p + "input_layernorm", (D,))
            take(p + "self_attn.q_proj", (NH * HD, D), qkv_bias)
            take(p + "self_attn.k_proj", (NKV * HD, D), qkv_bias)
            take(p + "self_attn.v_proj", (NKV * HD, D), qkv_bias)
            take(p + "self_attn.o_proj", (D, NH * HD), attention_bias)
            take(p + "post_attention_layernorm", (D,))
            take(p + "mlp.gate_proj", (F, D), mlp_bias)
            take(p + "mlp.up_proj", (F, D), mlp_bias)
            take(p + "mlp.down_proj", (D, F), mlp_bias)
        take("model.norm", (D,))
        if not c.tie_word_embeddings or w.has("lm_head.weight"):  # tied and present: transformers keeps it
            take("lm_head", (V, D))
        w.finish()  # any tensor not taken is an error
        return cls(c, weights, dtype)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        c = self.config
        empty = np.zeros((c.num_key_value_heads, 0, c.head_dim), self.dtype)  # [NKV, 0, HD]
        return KVCache([empty] * c.num_hidden_layers, [empty] * c.num_hidden_layers,
                       max_len or c.max_position_embeddings)

    def __call__(self, ids, cache: KVCache | None = None, last_only: bool = False):  # [T] -> [T, V] (or [1, V])
        """Logits of `ids`, the tokens at positions cache.pos .. cache.pos + T - 1,
        whose keys and values are appended to the cache."""
        c, w = self.config, self.weights
        ids = np.asarray(ids, dtype=np.int64)  # [T]
        T = ids.shape[0]
        if T == 0 or ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(f"need one or more token ids in [0, {c.vocab_size})")
        cache = self.new_cache(T) if cache is None else cache
        P = cache.pos
        if P + T > cache.max_len:
            raise ValueError(f"KV cache full: {P} + {T} positions > {cache.max_len}")
        cos, sin = rope_cos_sin(np.arange(P, P + T), self.inv_freq, self.dtype)  # [T, HD] x2
        mask = causal_mask(P, T, self.dtype)  # [T, S], S = P + T

        h = w["model.embed_tokens.weight"][ids]  # [T, D], the residual stream
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = rms_norm(h, w[p + "input_layernorm.weight"], c.rms_norm_eps)  # [T, D]
            h = h + self.attention(p + "self_attn.", x, cos, sin, mask, cache, i)  # [T, D]
            x = rms_norm(h, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)  # [T, D]
            h = h + self.mlp(p + "mlp.", x)  # [T, D]
        if last_only:
            h = h[-1:]  # [1, D]
        h = rms_norm(h, w["model.norm.weight"], c.rms_norm_eps)  # [T, D]
        return h @ self.lm_head.T  # [T, V]

    def decode(self, token: int, cache: KVCache):  # () -> [V]
        """One new token at position cache.pos: the forward pass with T = 1."""
        return self([token], cache, last_only=True)[0]

    def attention(self, p, x, cos, sin, mask, cache: KVCache, i: int):  # [T, D] -> [T, D]
        c = self.config
        T, NH, NKV, HD = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self.linear(x, p + "q_proj").reshape(T, NH, HD).transpose(1, 0, 2)  # [NH, T, HD]
        k = self.linear(x, p + "k_proj").reshape(T, NKV, HD).transpose(1, 0, 2)  # [NKV, T, HD]
        v = self.linear(x, p + "v_proj").reshape(T, NKV, HD).transpose(1, 0, 2)  # [NKV, T, HD]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [NH, T, HD], [NKV, T, HD]
        cache.k[i] = np.concatenate([cache.k[i], k], axis=1)  # [NKV, S, HD]
        cache.v[i] = np.concatenate([cache.v[i], v], axis=1)  # [NKV, S, HD]
        keys, values = repeat_kv(cache.k[i], NH // NKV), repeat_kv(cache.v[i], NH // NKV)  # [NH, S, HD] x2
        scores = q @ keys.transpose(0, 2, 1) / math.sqrt(HD) + mask  # [NH, T, S]
        out = softmax(scores) @ values  # [NH, T, HD]
        return self.linear(out.transpose(1, 0, 2).reshape(T, NH * HD), p + "o_proj")  # [T, D]

    def mlp(self, p, x):  # [T, D] -> [T, D]
        gate, up = self.linear(x, p + "gate_proj"), self.linear(x, p + "up_proj")  # [T, F] x2
        return self.linear(silu(gate) * up, p + "down_proj")  # [T, D]

    def linear(self, x, name):  # [T, in] -> [T, out]: x @ W.T + b, W as stored [out, in]
        y = x @ self.weights[name + ".weight"].T  # [T, out]
        bias = self.weights.get(name + ".bias")  # [out], or None
        return y if bias is None else y + bias
