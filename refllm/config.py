"""Model configurations, with fields named exactly as Hugging Face's `config.json`.

Shape letters, defined once here and used in every shape comment of the models:

    Llama                                   BERT
    T    tokens in this forward pass        B    texts in the batch
    P    tokens already in the KV cache     T    tokens per text (padded)
    S    P + T, keys visible to a query     H    hidden_size
    D    hidden_size                        NH   num_attention_heads
    NH   num_attention_heads                HD   H // NH, head dim
    NKV  num_key_value_heads                F    intermediate_size
    HD   head_dim                           V    vocab_size
    F    intermediate_size
    V    vocab_size
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import LLMRuntimeError


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LLMRuntimeError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise LLMRuntimeError(f"{path}: expected a JSON object")
    return data


def _from_dict(cls, d: dict[str, Any], path: Path):
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise LLMRuntimeError(f"{path}: {e}") from e


# The Llama-family architectures loaded as `Llama`, by config.json's `model_type`
# (transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): one decoder,
# differing only in which projections carry biases and in the sliding window.
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # NH
    num_key_value_heads: int | None = None  # NKV (None: = NH, plain multi-head attention)
    head_dim: int | None = None  # HD (None: D // NH)
    max_position_embeddings: int = 2048  # the context length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3"|"default", ...}
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # Llama: q/k/v/o_proj have biases
    mlp_bias: bool = False  # Llama: gate/up/down_proj have biases
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"  # "llama", "mistral" or "qwen2"
    sliding_window: int | None = None  # Mistral, Qwen2: a query sees at most this many keys
    use_sliding_window: bool = False  # Qwen2: whether its sliding_window applies

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if self.model_type not in LLAMA_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not a Llama-family model ({', '.join(LLAMA_MODEL_TYPES)})")
        window = self.sliding_window if self.model_type == "mistral" or self.use_sliding_window else None
        if window is not None and window < self.max_position_embeddings:
            # Within the window, sliding-window attention is causal attention: every key
            # 0 .. t is in (t - window, t]. So the context ends at the window, and
            # everything refllm computes is exactly the model's.
            self.max_position_embeddings = window

    # Which projections carry a bias, as transformers builds each architecture's nn.Linear:
    # LlamaAttention / LlamaMLP per attention_bias / mlp_bias; Qwen2Attention always on
    # q/k/v and never on o; Mistral never.
    @property
    def qkv_bias(self) -> bool:  # q_proj, k_proj, v_proj
        return self.model_type == "qwen2" or (self.model_type == "llama" and self.attention_bias)

    @property
    def o_bias(self) -> bool:  # o_proj
        return self.model_type == "llama" and self.attention_bias

    @property
    def mlp_biases(self) -> bool:  # gate_proj, up_proj, down_proj
        return self.model_type == "llama" and self.mlp_bias

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path = Path("config.json")) -> "LlamaConfig":
        d = dict(d)
        # transformers 5 moves rope_theta and rope_scaling into one `rope_parameters` dict.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                d.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
        return _from_dict(cls, d, path)

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        return cls.from_dict(_read_json(path), path)


@dataclass
class BertConfig:
    # The defaults are all-MiniLM-L6-v2's shape, used when a model has no config.json.
    vocab_size: int = 30522  # V
    hidden_size: int = 384  # H
    num_hidden_layers: int = 6  # L
    num_attention_heads: int = 12  # NH
    intermediate_size: int = 1536  # F
    hidden_act: str = "gelu"  # "gelu" = exact erf form; "gelu_new"/"gelu_pytorch_tanh" = tanh form
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported")

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path = Path("config.json")) -> "BertConfig":
        return _from_dict(cls, d, path)

    @classmethod
    def from_file(cls, path: str | Path) -> "BertConfig":
        path = Path(path)
        return cls.from_dict(_read_json(path), path)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from `path`, or raise runtime-error naming the file."""
    return _read_json(Path(path))
