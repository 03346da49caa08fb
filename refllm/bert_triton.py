"""BERT on the `triton` backend: `refllm.bert`'s encoder with torch tensors, every
operator a kernel of `refllm.kernels`.

Same surface as `refllm.bert.Bert` (`from_pretrained`, `config`, `dtype`, `backend`,
`with_hidden_act`, `__call__(input_ids, attention_mask, token_type_ids) -> [B, T, H]`
float32 NumPy on the host). The weights are read by the numpy backend's strict loader
and moved to the device; the inputs are checked by the same code as Bert's.

Kernel by kernel (shape letters of `refllm.config`):

    x   = layer_norm(word[ids] + type[types], residual=pos[:T])    gathers, layer_norm   [B, T, H]
    per layer (post-norm):
    qkv = x @ cat(query, key, value).T + b                         matmul                [B T, 3H]
    a   = masked_attention(q, k, v, mask)                          flash attention with a
                                                                   key padding mask; q, k, v are
                                                                   strided views of qkv  [B, NH, T, HD]
    x   = layer_norm(a @ attention_output.T + b, residual=x)       matmul, layer_norm
    h   = gelu(x @ intermediate.T + b)                             matmul, GELU in its epilogue
    x   = layer_norm(h @ output.T + b, residual=x)                 matmul, layer_norm

GELU is the erf form for `hidden_act="gelu"` and the tanh form for transformers'
`gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`, as in Bert. float32 only: float64
stays the numpy backend's (a ValueError says so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .bert import TANH_GELUS, Bert
from .config import BertConfig

if TYPE_CHECKING:
    import torch


def _kernels():
    from . import kernels

    return kernels


@dataclass
class TritonBertLayer:
    qkv: torch.Tensor  # [3H, H] = cat(query, key, value)
    qkv_bias: torch.Tensor  # [3H]
    attention_output: torch.Tensor  # [H, H]
    attention_output_bias: torch.Tensor  # [H]
    attention_norm: tuple  # (weight [H], bias [H], eps)
    intermediate: torch.Tensor  # [F, H]
    intermediate_bias: torch.Tensor  # [F]
    output: torch.Tensor  # [H, F]
    output_bias: torch.Tensor  # [H]
    output_norm: tuple  # (weight [H], bias [H], eps)


@dataclass
class TritonBertEmbeddings:
    word_embeddings: torch.Tensor  # [V, H]
    position_embeddings: torch.Tensor  # [max_position_embeddings, H]
    token_type_embeddings: torch.Tensor  # [type_vocab_size, H]
    norm: tuple  # (weight [H], bias [H], eps)


class TritonBert:
    """BERT encoder on the triton backend: ids and mask [B, T] -> last hidden states [B, T, H]."""

    backend = "triton"
    _check_inputs = Bert._check_inputs  # the very same validation (it reads self.config only)

    def __init__(self, config: BertConfig, embeddings: TritonBertEmbeddings, layers: list[TritonBertLayer], device):
        self.config, self.embeddings, self.layers, self.device = config, embeddings, layers, device
        self.dtype = np.dtype(np.float32)
        self.act = "gelu_tanh" if config.hidden_act in TANH_GELUS else "gelu"

    @classmethod
    def from_pretrained(cls, model_dir, dtype=np.float32) -> "TritonBert":
        """Load `model_dir` with Bert's strict loader, then move the weights to the device."""
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"the triton backend computes in float32, not {np.dtype(dtype)}; "
                             "use backend='numpy' for float64")
        return cls.from_bert(Bert.from_pretrained(model_dir, dtype=np.float32, backend="numpy"))

    @classmethod
    def from_bert(cls, model: Bert) -> "TritonBert":
        """The weights of a loaded numpy `Bert`, as float32 tensors on the kernels' device."""
        import torch

        if model.dtype != np.float32:
            raise ValueError(f"the triton backend computes in float32, not {model.dtype}")
        device = _kernels().device()

        def dev(*arrays):  # numpy arrays (concatenated along dim 0) -> one float32 tensor on the device
            a = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            return torch.tensor(np.asarray(a, dtype=np.float32), device=device)

        def norm(p):
            return (dev(p.weight), dev(p.bias), float(p.eps))

        e = model.embeddings
        embeddings = TritonBertEmbeddings(dev(e.word_embeddings), dev(e.position_embeddings),
                                          dev(e.token_type_embeddings), norm(e.LayerNorm))
        layers = [
            TritonBertLayer(
                qkv=dev(layer.query.weight, layer.key.weight, layer.value.weight),
                qkv_bias=dev(layer.query.bias, layer.key.bias, layer.value.bias),
                attention_output=dev(layer.attention_output.weight),
                attention_output_bias=dev(layer.attention_output.bias),
                attention_norm=norm(layer.attention_norm),
                intermediate=dev(layer.intermediate.weight),
                intermediate_bias=dev(layer.intermediate.bias),
                output=dev(layer.output.weight),
                output_bias=dev(layer.output.bias),
                output_norm=norm(layer.output_norm),
            )
            for layer in model.layers
        ]
        return cls(model.config, embeddings, layers, device)

    def with_hidden_act(self, hidden_act: str) -> "TritonBert":
        """The same weights (shared) with another activation (see Bert.with_hidden_act)."""
        config = dataclasses.replace(self.config, hidden_act=hidden_act)
        return TritonBert(config, self.embeddings, self.layers, self.device)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):  # [B, T] x3 -> [B, T, H]
        """Last hidden states, float32 NumPy (see Bert.__call__)."""
        import torch

        k = _kernels()
        ids, mask, types = self._check_inputs(input_ids, attention_mask, token_type_ids)
        B, T = ids.shape
        H, NH = self.config.hidden_size, self.config.num_attention_heads
        HD = H // NH
        e = self.embeddings
        ids_t, types_t = torch.as_tensor(ids, device=self.device), torch.as_tensor(types, device=self.device)
        mask_t = torch.as_tensor(mask, device=self.device).to(torch.int32)  # [B, T]

        words = e.word_embeddings[ids_t] + e.token_type_embeddings[types_t]  # [B, T, H]
        x = k.layer_norm(words, *e.norm, residual=e.position_embeddings[:T].expand(B, T, H))  # [B, T, H]
        x = x.view(B * T, H)  # [B T, H]
        for layer in self.layers:
            qkv = k.matmul(x, layer.qkv, layer.qkv_bias)  # [B T, 3H]
            q, key, value = (qkv[:, i * H : (i + 1) * H].view(B, T, NH, HD).transpose(1, 2) for i in range(3))  # [B, NH, T, HD]
            a = k.masked_attention(q, key, value, mask_t)  # [B, NH, T, HD], a view of [B, T, NH, HD]
            a = a.transpose(1, 2).reshape(B * T, H)  # [B T, H], no copy
            x = k.layer_norm(k.matmul(a, layer.attention_output, layer.attention_output_bias), *layer.attention_norm, residual=x)
            h = k.matmul(x, layer.intermediate, layer.intermediate_bias, act=self.act)  # [B T, F]
            x = k.layer_norm(k.matmul(h, layer.output, layer.output_bias), *layer.output_norm, residual=x)  # [B T, H]
        out = x.view(B, T, H).cpu().numpy()  # [B, T, H]
        out[mask == 0] = 0  # padded positions are zeros, as Bert.__call__ returns them
        return out
