"""Tiny random Llama checkpoints shared by the decoder tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TINY_CONFIGS = {
    "mha": dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
    "odd_head_dim": dict(vocab_size=61, hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=10, tie_word_embeddings=False),
    "llama3_rope": dict(vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                        max_position_embeddings=256,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear_rope": dict(vocab_size=77, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


def make_tiny_llama(directory: Path, overrides: dict, seed: int = 0, dtype=np.float32) -> Path:
    """Write config.json and random weights in Hugging Face's layout into `directory`."""
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    cfg.update(overrides)
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    NH, NKV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    HD = cfg.get("head_dim") or D // NH

    def w(*shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(dtype)

    t = {"model.embed_tokens.weight": w(V, D, scale=1.0), "model.norm.weight": (1 + 0.1 * w(D, scale=1)).astype(dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * w(D, scale=1)).astype(dtype)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * w(D, scale=1)).astype(dtype)
        t[p + "self_attn.q_proj.weight"] = w(NH * HD, D)
        t[p + "self_attn.k_proj.weight"] = w(NKV * HD, D)
        t[p + "self_attn.v_proj.weight"] = w(NKV * HD, D)
        t[p + "self_attn.o_proj.weight"] = w(D, NH * HD)
        t[p + "mlp.gate_proj.weight"] = w(F, D)
        t[p + "mlp.up_proj.weight"] = w(F, D)
        t[p + "mlp.down_proj.weight"] = w(D, F)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(V, D)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(t, str(directory / "model.safetensors"))
    return directory


def rope_inv_freq_of(model_dir):
    from refllm.config import LlamaConfig
    from refllm.ops import rope_inv_freq

    c = LlamaConfig.from_file(Path(model_dir) / "config.json")
    return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)


def hf_model(model_dir, dtype):
    """transformers' LlamaForCausalLM on `model_dir`; in float64, really in float64.

    A float64 transformers model still does three things in float32: the RoPE angles
    `position * inv_freq` (its rotary embedding casts to float), RMSNorm (it upcasts to
    float32, meant for half precision) and the eager softmax. For float64 we use SDPA
    attention (computed in the input dtype) and patch the other two to float64, so both
    sides do the same arithmetic.
    """
    import torch
    import transformers

    attn = "sdpa" if dtype == torch.float64 else "eager"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model.eval()
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = (lambda m: lambda x: m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)))(module)
        rot = model.model.rotary_emb
        inv64 = torch.tensor(rope_inv_freq_of(model_dir), dtype=torch.float64)

        def forward(x, position_ids):
            angles = position_ids[:, :, None].to(torch.float64) * inv64[None, None, :]
            emb = torch.cat([angles, angles], dim=-1)
            return (emb.cos() * rot.attention_scaling).to(x.dtype), (emb.sin() * rot.attention_scaling).to(x.dtype)

        rot.forward = forward
    return model


def hf_logits(model_dir, ids, dtype, model=None):
    """transformers' logits [T, V] for `ids` (see `hf_model`)."""
    import torch

    model = model or hf_model(model_dir, dtype)
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()
