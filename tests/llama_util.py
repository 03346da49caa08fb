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


def write_random_llama(directory: Path, overrides: dict, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """config.json + model.safetensors of a random Llama in bfloat16 or float16, of any size.

    The tensors are generated and written a block of rows at a time (the safetensors
    header first, from the shapes), so a 13.5 GB 7B-shaped checkpoint takes ~100 MB of
    memory to write. Weights are uniform with the variance of `make_tiny_llama`'s
    (1/fan_in; the embedding 1; the norms 1 +- 0.1), rounded to the nearest bfloat16.
    """
    import struct

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, torch_dtype=dtype, tie_word_embeddings=False)
    cfg.update(overrides)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    NH, NKV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    HD = cfg.get("head_dim") or D // NH
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (NH * HD, D),
                   p + "self_attn.k_proj.weight": (NKV * HD, D), p + "self_attn.v_proj.weight": (NKV * HD, D),
                   p + "self_attn.o_proj.weight": (D, NH * HD), p + "post_attention_layernorm.weight": (D,),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}
    shapes["model.norm.weight"] = (D,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": {"bfloat16": "BF16", "float16": "F16"}[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            rows = shape[0] if len(shape) == 2 else 1
            cols = shape[-1]
            half_width = np.sqrt(3.0) * (1.0 if name == "model.embed_tokens.weight" else 1 / np.sqrt(cols))
            step = max(1, (8 << 20) // cols)
            for r in range(0, rows, step):
                n = min(step, rows - r)
                x = rng.random((n, cols), dtype=np.float32)  # uniform [0, 1)
                x = 1 + 0.1 * np.sqrt(3.0) * (2 * x - 1) if len(shape) == 1 else half_width * (2 * x - 1)
                x = x.astype(np.float32)
                if dtype == "float16":
                    f.write(x.astype("<f2").tobytes())
                else:  # round to nearest even bfloat16: the top 16 bits of the float32
                    bits = x.view(np.uint32)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                    f.write(bits.astype("<u2").tobytes())
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return directory
