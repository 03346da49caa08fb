"""A Hugging Face Llama directory -> an F32 GGUF file, the inverse of `gguf_to_hf`.

    write_f32_gguf(model_dir, path)   config.json + model.safetensors + tokenizer.json
                                      -> one GGUF with every tensor in float32
    ensure_f32_gguf(model_dir)        the cached GGUF of model_dir, written on first use

It writes what llama.cpp's `convert_hf_to_gguf.py --outtype f32` writes for a Llama
(https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py, `LlamaModel`;
the format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), through the
`gguf` package's `GGUFWriter`, so that llama.cpp runs the very weights refllm runs:
the benchmark's llama.cpp peer and the oracles that compare against llama.cpp read it.

The three things `gguf_to_hf` undoes are done here: tensor names become llama.cpp's
(`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`), the rows of
q_proj and k_proj are permuted within each head from rotate-half to adjacent pairs
(`permute_for_gguf`, the inverse of `gguf_to_hf.unpermute`), and the tokenizer becomes
GGUF metadata (vocabulary, merges, a type per token, the pre-tokenizer's name).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def gguf_cache_dir() -> Path:
    """Where `ensure_f32_gguf` keeps the GGUFs it writes: $XDG_CACHE_HOME/refllm/gguf."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refllm" / "gguf"


def permute_for_gguf(w, n_head: int):  # [n_head*HD, D] -> [n_head*HD, D]
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py `LlamaModel.permute`): within each
    head, the rotate-half halves [x0..x31 | x32..x63] become adjacent pairs (x0, x32), ...
    The inverse of `refllm.weights.gguf_to_hf.unpermute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f32_gguf(model_dir, path) -> Path:
    """An F32 GGUF of a Hugging Face Llama directory (config.json, model.safetensors,
    tokenizer.json), as llama.cpp's convert_hf_to_gguf.py would write it with --outtype f32."""
    import gguf

    from refllm.checkpoint import load_checkpoint
    from refllm.config import LlamaConfig

    model_dir, path = Path(model_dir), Path(path)
    c = LlamaConfig.from_file(model_dir / "config.json")
    t = load_checkpoint(model_dir)
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(partial), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    # Byte-level BPE vocabulary: tokens by id, special added tokens as CONTROL.
    tokens = [f"[PAD{i}]" for i in range(c.vocab_size)]
    types = [gguf.TokenType.UNUSED] * c.vocab_size
    for text, i in tok["model"]["vocab"].items():
        if i < c.vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        if added["id"] < c.vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_gguf_pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
        # Does the tokenizer's post-processor put the BOS in front? Then llama.cpp must too.
        from tokenizers import Tokenizer

        first = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("a", add_special_tokens=True).ids[:1]
        w.add_add_bos_token(first == [c.bos_token_id])
    if eos is not None:
        w.add_eos_token_id(eos)
    tok_config = model_dir / "tokenizer_config.json"  # convert_hf_to_gguf's SpecialVocab: the chat template
    if tok_config.is_file():
        template = json.loads(tok_config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            w.add_chat_template(template)

    def f32(name):
        return np.ascontiguousarray(t[name], dtype=np.float32)

    w.add_tensor("token_embd.weight", f32("model.embed_tokens.weight"))
    w.add_tensor("output_norm.weight", f32("model.norm.weight"))
    if not c.tie_word_embeddings or "lm_head.weight" in t:
        w.add_tensor("output.weight", f32("lm_head.weight"))
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", f32(p + "input_layernorm.weight"))
        w.add_tensor(b + "attn_q.weight", permute_for_gguf(f32(p + "self_attn.q_proj.weight"), c.num_attention_heads))
        w.add_tensor(b + "attn_k.weight", permute_for_gguf(f32(p + "self_attn.k_proj.weight"), c.num_key_value_heads))
        w.add_tensor(b + "attn_v.weight", f32(p + "self_attn.v_proj.weight"))
        w.add_tensor(b + "attn_output.weight", f32(p + "self_attn.o_proj.weight"))
        w.add_tensor(b + "ffn_norm.weight", f32(p + "post_attention_layernorm.weight"))
        w.add_tensor(b + "ffn_gate.weight", f32(p + "mlp.gate_proj.weight"))
        w.add_tensor(b + "ffn_up.weight", f32(p + "mlp.up_proj.weight"))
        w.add_tensor(b + "ffn_down.weight", f32(p + "mlp.down_proj.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(partial, path)
    return path


def _gguf_pre_tokenizer(tok: dict) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer: "smollm" for digits split one
    by one before GPT-2's byte-level split (SmolLM2, StarCoder), else GPT-2's "default"."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if any(p.get("type") == "Digits" and p.get("individual_digits") for p in steps):
        return "smollm"
    return "default"


def ensure_f32_gguf(model_dir) -> Path:
    """The cached F32 GGUF of `model_dir`, written on first use (or when the weights change)."""
    model_dir = Path(model_dir)
    source = model_dir / "model.safetensors"
    path = gguf_cache_dir() / f"{model_dir.name}-f32.gguf"
    if not path.is_file() or (source.is_file() and source.stat().st_mtime > path.stat().st_mtime):
        write_f32_gguf(model_dir, path)
    return path
